#!/usr/bin/env python3
"""Test2K / Test4K / Test8K from DIV8K, following the ClassSR protocol that AdaFormer reports on.

    Test2K: DIV8K 1201-1300, HR = MATLAB bicubic x1/4 of the original
    Test4K: DIV8K 1301-1400, HR = x1/2
    Test8K: DIV8K 1401-1500, HR = the original
    LR (every set) = MATLAB bicubic x1/4 of the HR (cropped to a multiple of 4)

Writes ``<out>/Test2K/HR/X4/1201.png`` and ``<out>/Test2K/LR/X4/1201.png`` etc. (resumable). See docs/datasets.md
for the sources of this protocol; the authors' own processed sets (ClassSR README) are the reference: prefer them
when you can download them, and report which you used.

Example:
    python scripts/data_preparation/prepare_test2k4k8k.py --div8k datasets/DIV8K/train_HR --out datasets --workers 2
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    from_sets = ['Test2K', 'Test4K', 'Test8K']
    parser = argparse.ArgumentParser(description='Test2K/4K/8K from DIV8K.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--div8k', required=True, help='folder with DIV8K 1201.png ... 1500.png')
    parser.add_argument('--out', default='datasets', help='output root (default: datasets)')
    parser.add_argument('--sets', nargs='+', default=from_sets, choices=from_sets)
    parser.add_argument('--allow-missing', action='store_true', help='skip DIV8K images that are not there')
    parser.add_argument('--workers', type=int, default=1, help='processes (an 8K image needs about 1.5 GB each)')
    args = parser.parse_args(argv)

    from adasr.data.prepare import build_div8k_test_sets
    from adasr.utils.files import error_text

    try:
        reports = build_div8k_test_sets(args.div8k, args.out, args.sets, allow_missing=args.allow_missing,
                                        n_workers=args.workers)
    except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
        raise SystemExit(f'error: {error_text(e)}') from None
    for name, report in reports.items():
        print(f'{name}: {report} -> {osp.join(args.out, name)}')


if __name__ == '__main__':
    main()
