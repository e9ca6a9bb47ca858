#!/usr/bin/env python3
"""Check PFT against an oracle fixture of the authors' code (see benchmarks/pft_oracle.py):

    python scripts/verify_pft_oracle.py PATH/pft_light_x4_oracle.pt [--atol 1e-3] [--mae 1e-5]
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from benchmarks.pft_oracle import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
