#!/usr/bin/env python3
"""DIV2K or DF2K (DIV2K + Flickr2K) from the download to the training LMDBs, in one command.

Expects under --root (default ``datasets``), as downloaded and unzipped:
    DIV2K/DIV2K_train_HR/0001.png ...                 (https://data.vision.ee.ethz.ch/cvl/DIV2K/)
    DIV2K/DIV2K_train_LR_bicubic/X{2,3,4}/0001x4.png  optional: generated with MATLAB bicubic when missing
    Flickr2K/Flickr2K_HR/000001.png ...               DF2K only
    Flickr2K/Flickr2K_LR_bicubic/X{2,3,4}/            optional

Writes (the names the train option files read):
    DIV2K/DIV2K_train_HR_sub.lmdb, DIV2K/DIV2K_train_LR_bicubic_X{s}_sub.lmdb
    DF2K/DF2K_HR_sub.lmdb, DF2K/DF2K_LR_bicubic_X{s}_sub.lmdb
and, on the way, the sub-image folders (``*_sub``; ``--remove-sub`` deletes them afterwards). Every step is
resumable: run the same command again after an interruption.

Examples:
    python scripts/data_preparation/prepare_div2k.py --dataset DIV2K --workers 8
    python scripts/data_preparation/prepare_div2k.py --dataset DF2K --scales 4 --workers 8 --remove-sub
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='DIV2K/DF2K to training LMDBs.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--dataset', choices=['DIV2K', 'DF2K'], required=True)
    parser.add_argument('--root', default='datasets', help='data root (default: datasets)')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4])
    parser.add_argument('--crop-size', type=int, default=480)
    parser.add_argument('--step', type=int, default=240)
    parser.add_argument('--thresh-size', type=int, default=0)
    parser.add_argument('--no-lmdb', action='store_true', help='stop after the sub-image folders')
    parser.add_argument('--remove-sub', action='store_true', help='delete sub-image folders once in LMDBs')
    parser.add_argument('--workers', type=int, default=1, help='processes')
    args = parser.parse_args(argv)

    from adasr.data.prepare import prepare_training_set
    from adasr.utils.files import error_text

    try:
        prepare_training_set(args.dataset, args.root, args.scales, crop_size=args.crop_size, step=args.step,
                             thresh_size=args.thresh_size, make_lmdb=not args.no_lmdb, remove_sub=args.remove_sub,
                             n_workers=args.workers)
    except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
        raise SystemExit(f'error: {error_text(e)}') from None


if __name__ == '__main__':
    main()
