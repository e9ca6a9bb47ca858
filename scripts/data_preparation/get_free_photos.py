#!/usr/bin/env python3
"""A free real-photo data set for users without DIV2K (Debian or Ubuntu: uses apt-get download, ~640 MB).

Writes under --out (default datasets/FreePhotos):
    train/HR/              ~66 real photographs (original files) for small training runs
    Test4K/{HR,LR}/X4/     the 18 landscape photos of >= 3840x2160: 3840x2160 centre crops, LR 960x540 (MATLAB x1/4)
    Test2K/{HR,LR}/X4/     the same crops at 1920x1080 (MATLAB x1/2), LR 480x270
    manifest.csv           package, version, path, size, licence and sha256 of every file

The test photos are not in train/. Licences vary per file (GPL, LGPL, CC-BY, CC-BY-SA, CC0, public domain, BSD;
see the manifest): use the files locally, and follow their terms before sharing them. Run `apt-get update` once
first. Resumable. Then, for example:

    python scripts/data_preparation/extract_subimages.py --hr datasets/FreePhotos/train/HR \\
        --hr-out datasets/FreePhotos/train/HR_sub --crop-size 480 --step 240
    python scripts/benchmark.py --data datasets/FreePhotos/Test2K --size 480x270
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Free real photographs from Debian packages.',
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--out', default='datasets/FreePhotos', help='output folder')
    parser.add_argument('--packages-dir', default=None,
                        help='where the .deb files are downloaded and unpacked (default: <out>/.packages)')
    parser.add_argument('--keep-packages', action='store_true', help='keep the downloaded/unpacked packages')
    parser.add_argument('--no-download', action='store_true', help='use packages already unpacked there')
    args = parser.parse_args(argv)

    from adasr.data.free_photos import PACKAGES, assemble, download, remove_downloads

    root = args.packages_dir or osp.join(args.out, '.packages')
    deb_dir, pkg_dir = osp.join(root, 'debs'), osp.join(root, 'unpacked')
    try:
        versions = {} if args.no_download else download(PACKAGES, deb_dir, pkg_dir)
        counts = assemble(pkg_dir, args.out, versions=versions)
    except (RuntimeError, ValueError, OSError) as e:
        raise SystemExit(f'error: {e}') from None
    if not args.keep_packages and not args.no_download:
        remove_downloads(deb_dir, pkg_dir)
    print(', '.join(f'{k}: {v} files' for k, v in counts.items()) + f' -> {args.out}')


if __name__ == '__main__':
    main()
