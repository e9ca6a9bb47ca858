#!/usr/bin/env bash
# Set up adasr in a virtual environment (.venv) in the order that works with BasicSR 1.4.2 on current PyTorch:
#   1. torch + torchvision first;
#   2. basicsr from PyPI without build isolation (its setup_requires would otherwise install a second torch into a
#      throw-away build environment);
#   3. adasr itself, editable, with the test tools.
# Environment overrides: PYTHON (default python3), VENV (default .venv),
#   TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"; any torch >= 2.5, as pyproject.toml requires,
#   with its torchvision),
#   TORCH_INDEX_URL (default: PyPI; e.g. PyTorch's CPU-only wheel index, see README "Installing by hand").
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip setuptools wheel
# shellcheck disable=SC2086
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC
"${PIP[@]}" --no-build-isolation basicsr==1.4.2
"${PIP[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import adasr, torch; print(f'adasr {adasr.__version__} on torch {torch.__version__}: ready')"
echo "installed in $(( $(date +%s) - start )) s; activate with: source $VENV/bin/activate"
