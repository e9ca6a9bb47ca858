#!/usr/bin/env python3
"""Build BasicSR LMDBs (``data.mdb`` + ``meta_info.txt``) from image folders.

Examples:
    # the bundled demo set (what scripts/demo.sh does)
    python scripts/data_preparation/create_lmdb.py \\
        --input datasets/demo/train/HR datasets/demo/train/LR_bicubic/X4 \\
        --output datasets/demo/lmdb/train_HR.lmdb datasets/demo/lmdb/train_LR_X4.lmdb

    # DIV2K LR files are named 0001x4.png: strip the suffix so that LR and HR keys match
    python scripts/data_preparation/create_lmdb.py --input datasets/DIV2K/DIV2K_train_LR_bicubic/X4 \\
        --output datasets/DIV2K/DIV2K_train_LR_bicubic_X4.lmdb --strip-suffix x4
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Build BasicSR LMDBs from image folders.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--input', nargs='+', required=True, help='image folder(s)')
    parser.add_argument('--output', nargs='+', required=True, help='LMDB path(s) ending in .lmdb, one per input')
    parser.add_argument('--strip-suffix', default=None, help="remove this suffix from keys (e.g. 'x4')")
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression level inside the LMDB')
    parser.add_argument('--overwrite', action='store_true', help='replace existing LMDBs')
    parser.add_argument('--skip-existing', action='store_true', help='leave existing LMDBs as they are')
    args = parser.parse_args(argv)
    if len(args.input) != len(args.output):
        parser.error('give one --output per --input')

    from adasr.data.prepare import folder_to_lmdb
    from adasr.utils.files import error_text

    for src, dst in zip(args.input, args.output):
        if args.skip_existing and osp.exists(dst):  # an existing LMDB is a complete one (built, then renamed)
            print(f'{dst} exists, skipped')
            continue
        try:
            n, _ = folder_to_lmdb(src, dst, strip_suffix=args.strip_suffix, overwrite=args.overwrite,
                                  compress_level=args.compress_level)
        except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
            raise SystemExit(f'error: {error_text(e)}') from None
        print(f'{dst}: {n} images')


if __name__ == '__main__':
    main()
