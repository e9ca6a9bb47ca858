#!/usr/bin/env python3
"""Regenerate the committed refactor-guard fixtures under tests/data/ (run from the repository root).

    python scripts/make_test_fixtures.py adaformer [--out tests/data/adaformer_guard.pt]
    python scripts/make_test_fixtures.py pft [--out tests/data]
    python scripts/make_test_fixtures.py baselines

The builders live with the tests that use them (``tests/helpers/*_fixtures.py``); their docstrings say what each
file holds and how its numbers were checked against the authors' code.
"""
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODULES = {'adaformer': 'adaformer_fixtures', 'pft': 'pft_fixtures', 'baselines': 'baseline_fixtures'}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in MODULES:
        raise SystemExit(f'usage: make_test_fixtures.py {{{",".join(MODULES)}}} [options]\n\n{__doc__}')
    sys.path.insert(0, REPO)
    import importlib

    module = importlib.import_module(f'tests.helpers.{MODULES[argv[0]]}')
    module.main(argv[1:])


if __name__ == '__main__':
    main()
