#!/usr/bin/env python3
"""Cut HR images (and their LR partners) into overlapping square sub-images for fast training I/O.

BasicSR's standard for DIV2K/DF2K: 480 px HR crops every 240 px (the last crop of a row or column flush with the
border), LR crops of 480/s every 240/s at exactly 1/s of the HR positions, named ``<stem>_s001.png``, ... for HR and
every LR alike. Resumable (finished images are skipped on a re-run). ``prepare_div2k.py`` runs this for DIV2K/DF2K.

Example:
    python scripts/data_preparation/extract_subimages.py \\
        --hr datasets/DIV2K/DIV2K_train_HR --hr-out datasets/DIV2K/DIV2K_train_HR_sub \\
        --lr 4 datasets/DIV2K/DIV2K_train_LR_bicubic/X4 datasets/DIV2K/DIV2K_train_LR_bicubic/X4_sub
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Extract paired sub-images.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--hr', required=True, help='HR image folder')
    parser.add_argument('--hr-out', required=True, help='output folder for HR sub-images')
    parser.add_argument('--lr', nargs=3, action='append', default=[], metavar=('SCALE', 'LR_DIR', 'OUT_DIR'),
                        help='an LR folder at SCALE and its output folder (repeat for several scales)')
    parser.add_argument('--crop-size', type=int, default=480, help='HR crop side (default 480)')
    parser.add_argument('--step', type=int, default=240, help='HR stride (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0, help='leftover beyond which a border crop is added')
    parser.add_argument('--strip-suffix', default='', help="removed from HR stems before naming (e.g. '_HR')")
    parser.add_argument('--compress-level', type=int, default=3, help='PNG compression level')
    parser.add_argument('--workers', type=int, default=1, help='processes')
    args = parser.parse_args(argv)
    try:
        lr = {int(s): (d, o) for s, d, o in args.lr}
    except ValueError:
        parser.error('--lr SCALE must be an integer')

    from adasr.data.prepare import extract_subimages
    from adasr.utils.files import error_text

    try:
        report = extract_subimages(args.hr, args.hr_out, lr, crop_size=args.crop_size, step=args.step,
                                   thresh_size=args.thresh_size, strip_suffix=args.strip_suffix,
                                   compress_level=args.compress_level, n_workers=args.workers)
    except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
        raise SystemExit(f'error: {error_text(e)}') from None
    print(f'sub-images: {report}')
    if report.processed and not report.written:  # every image smaller than one crop: nothing to train on
        raise SystemExit(f'error: no sub-image was written: every image in {args.hr} is smaller than --crop-size '
                         f'{args.crop_size}')


if __name__ == '__main__':
    main()
