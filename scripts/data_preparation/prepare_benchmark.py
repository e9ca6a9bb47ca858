#!/usr/bin/env python3
"""Benchmark test sets (Set5, Set14, B100, Urban100, Manga109, ...) from HR images, in the layout the test option
files read: ``<out>/<name>/GTmod{s}/*.png`` (HR cropped to a multiple of s) and ``<out>/<name>/LRbicx{s}/*.png``
(MATLAB bicubic x1/s of it, same file names). Grayscale images stay grayscale. Resumable.

Examples:
    # from the original HR images of a set
    python scripts/data_preparation/prepare_benchmark.py --name Urban100 --hr path/to/Urban100/HR

    # distributions with one HR folder per scale (SelfExSR: Set5/x4/HR/img_001.png): '{scale}' in the path
    python scripts/data_preparation/prepare_benchmark.py --name Set5 --hr 'path/to/Set5/x{scale}/HR'

    # keep the distribution's own MATLAB LR images instead of computing them (their size is checked)
    python scripts/data_preparation/prepare_benchmark.py --name Set5 --hr 'Set5/x{scale}/HR' --lr 'Set5/x{scale}/LR'
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Benchmark sets: GTmod{s} / LRbicx{s}.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--name', required=True, help='set name, the output sub-folder (e.g. Set5)')
    parser.add_argument('--hr', required=True, help="HR folder ('{scale}' is replaced by each scale)")
    parser.add_argument('--lr', default=None, help="optional LR folder to copy instead of computing ('{scale}')")
    parser.add_argument('--out', default='datasets/benchmark', help='output root (default: datasets/benchmark)')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4])
    parser.add_argument('--strip-suffix', default='', help="removed from file stems (e.g. '_HR')")
    parser.add_argument('--workers', type=int, default=1, help='processes')
    args = parser.parse_args(argv)

    from adasr.data.prepare import prepare_benchmark_set
    from adasr.utils.files import error_text

    hr = {s: args.hr.format(scale=s) for s in args.scales}
    lr = {s: args.lr.format(scale=s) for s in args.scales} if args.lr else None
    try:
        report = prepare_benchmark_set(hr, osp.join(args.out, args.name), lr, strip_suffix=args.strip_suffix,
                                       n_workers=args.workers)
    except (OSError, ValueError) as e:  # a file named: missing input, read-only or full output, ...
        raise SystemExit(f'error: {error_text(e)}') from None
    print(f'{args.name}: {report} -> {osp.join(args.out, args.name)}')


if __name__ == '__main__':
    main()
