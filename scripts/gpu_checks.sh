#!/usr/bin/env bash
# Every check and benchmark that needs a GPU, in one command, for a machine with CUDA: the GPU-marked tests (Triton
# kernels against PyTorch, fp16/bf16 autocast of every arch), the speed report at 2K, 4K and 8K output (AdaFormer
# exact and reduced precision against SwinIR-light, PFT-light, the halting sweep), PFT's sparse attention by Triton
# against dense, and reduced precision against fp32 on the demo photos. Each step's output goes to OUTDIR/<step>.log
# (the tables also to OUTDIR/<step>.md); the steps run in this order, each under a time limit.
#   bash scripts/gpu_checks.sh [OUTDIR]          default OUTDIR: results/gpu_checks
#   GPU_CHECKS_STEPS="tests speed_2k" bash scripts/gpu_checks.sh     only these steps
#   GPU_CHECKS_TIMEOUT=600 ...                   seconds per step (default 300)
# Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_checks}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT=${GPU_CHECKS_TIMEOUT:-300}
STEPS=${GPU_CHECKS_STEPS:-tests speed_2k speed_4k speed_8k pft precision}
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_checks: no CUDA device here (torch.cuda.is_available() is False in $PY); nothing was run" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
          "| CUDA", torch.version.cuda)' | tee "$OUT/device.txt"

status=0
step() {  # step NAME COMMAND...: runs COMMAND under the time limit, its output in OUT/NAME.log
  local name=$1 start rc
  shift
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "   $name: exit $rc after $(( $(date +%s) - start )) s$([ $rc -eq 124 ] && echo " (time limit $LIMIT s)")"
  [ $rc -eq 0 ] || status=1
}

step tests "$PY" -m pytest -q -m gpu -p no:cacheprovider
step speed_2k "$PY" scripts/speed_report.py --device cuda --size 480x270 --halted 0 0.5 1 --out "$OUT/speed_2k.md"
step speed_4k "$PY" scripts/speed_report.py --device cuda --size 960x540 --halted 0 0.5 1 --out "$OUT/speed_4k.md"
step speed_8k "$PY" scripts/speed_report.py --device cuda --size 1920x1080 --halted 0 1 --out "$OUT/speed_8k.md"
step pft "$PY" scripts/benchmark_pft.py --device cuda
step precision "$PY" scripts/precision_report.py --device cuda --halted 0.5
echo "gpu_checks: $([ $status -eq 0 ] && echo "every step passed" || echo "a step failed: see its log"); logs in $OUT/"
exit $status
