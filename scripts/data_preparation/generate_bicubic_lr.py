#!/usr/bin/env python3
"""MATLAB-bicubic LR images (x2/x3/x4 ...) of an HR folder, for data sets that ship only HR images.

The HR is cropped to a multiple of the scale, then resized by 1/scale with MATLAB's bicubic kernel (antialiased),
rounded to uint8: how DIV2K's, Flickr2K's and the benchmark sets' LR images were made. Resumable: existing outputs
are kept.

Examples:
    # DIV2K layout and names (0001x4.png)
    python scripts/data_preparation/generate_bicubic_lr.py --input datasets/DIV2K/DIV2K_train_HR \\
        --output 'datasets/DIV2K/DIV2K_train_LR_bicubic/X{scale}' --scales 2 3 4 --suffix 'x{scale}'

    # same file names as the HR (the demo layout)
    python scripts/data_preparation/generate_bicubic_lr.py --input my/HR --output 'my/LR_bicubic/X{scale}' --scales 4
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='MATLAB-bicubic LR images of an HR folder.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--input', required=True, help='HR image folder')
    parser.add_argument('--output', required=True, help="output folder; '{scale}' is replaced by each scale")
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4])
    parser.add_argument('--suffix', default='', help="appended to LR file stems, e.g. 'x{scale}' (DIV2K)")
    parser.add_argument('--workers', type=int, default=1, help='processes')
    args = parser.parse_args(argv)
    if len(args.scales) > 1 and '{scale}' not in args.output:
        parser.error("with several --scales, --output must contain '{scale}'")

    from adasr.data.prepare import generate_bicubic_lr
    from adasr.utils.files import error_text

    try:
        report = generate_bicubic_lr(args.input, {s: args.output.format(scale=s) for s in args.scales},
                                     suffix_template=args.suffix, n_workers=args.workers)
    except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
        raise SystemExit(f'error: {error_text(e)}') from None
    print(f'bicubic LR: {report}')


if __name__ == '__main__':
    main()
