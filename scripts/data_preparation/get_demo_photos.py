#!/usr/bin/env python3
"""Rebuild the bundled demo set ``datasets/demo`` from public-domain / CC0 photographs in PyPI wheels.

Provenance (each file is read out of a wheel fetched with ``pip download``; nothing is installed):

    name          source wheel           member                                            licence
    astronaut     scikit-image           skimage/data/astronaut.png                        public domain (NASA)
    coffee        scikit-image           skimage/data/coffee.png                           CC0 (Rachel Michetti)
    chelsea       scikit-image           skimage/data/chelsea.png                          CC0 (Stefan van der Walt)
    rocket        scikit-image           skimage/data/rocket.jpg                           public domain (SpaceX)
    face          scipy==1.11.4          scipy/misc/face.dat (bz2 raw RGB 768x1024)        public domain
    grace_hopper  matplotlib             matplotlib/mpl-data/sample_data/grace_hopper.jpg  public domain (US Navy)

Each photo is centre-cropped to SIZE x SIZE (a multiple of 12, so x2/x3/x4 divide it) and written as
``<split>/HR/<name>.png``; ``<split>/LR_bicubic/X{2,3,4}/<name>.png`` are MATLAB-bicubic downscales (``imresize``
with antialiasing, rounded to uint8), the way DIV2K and the classic benchmark LR images were made. ``chelsea`` and
``grace_hopper`` form the ``val`` split, the other four ``train``.

Usage: python scripts/data_preparation/get_demo_photos.py [--out datasets/demo] [--size 288]
"""
import argparse
import bz2
import glob
import os
import os.path as osp
import subprocess
import sys
import tempfile
import zipfile

import cv2
import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

PHOTOS = [  # (name, requirement, member)
    ('astronaut', 'scikit-image', 'skimage/data/astronaut.png'),
    ('coffee', 'scikit-image', 'skimage/data/coffee.png'),
    ('chelsea', 'scikit-image', 'skimage/data/chelsea.png'),
    ('rocket', 'scikit-image', 'skimage/data/rocket.jpg'),
    ('face', 'scipy==1.11.4', 'scipy/misc/face.dat'),
    ('grace_hopper', 'matplotlib', 'matplotlib/mpl-data/sample_data/grace_hopper.jpg'),
]
SCALES = (2, 3, 4)
VAL = ('chelsea', 'grace_hopper')


def fetch_wheel(requirement: str, dest: str) -> str:
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
                    '--python-version', '3.11', '--platform', 'manylinux2014_x86_64', '-d', dest, requirement],
                   check=True)
    name = requirement.split('=')[0].replace('-', '_')
    found = glob.glob(osp.join(dest, f'{name}-*.whl'))
    if not found:
        raise RuntimeError(f'pip download produced no wheel for {requirement} in {dest}')
    return found[0]


def decode(member: str, raw: bytes) -> np.ndarray:
    """Return an RGB uint8 (H, W, 3) image."""
    if member.endswith('face.dat'):
        return np.frombuffer(bz2.decompress(raw), np.uint8).reshape(768, 1024, 3).copy()
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RuntimeError(f'cannot decode {member}')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) < size:
        raise ValueError(f'image {w}x{h} is smaller than the crop {size}')
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def main() -> None:
    from adasr.utils.matlab_resize import imresize_uint8

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='datasets/demo', help='output folder (default: datasets/demo)')
    parser.add_argument('--size', type=int, default=288, help='HR crop side, a multiple of 12 (default: 288)')
    args = parser.parse_args()
    if args.size % 12:
        parser.error('--size must be a multiple of 12 so that x2, x3 and x4 divide it')

    with tempfile.TemporaryDirectory() as tmp:
        wheels = {req: fetch_wheel(req, osp.join(tmp, req.split('=')[0])) for req in {p[1] for p in PHOTOS}}
        for name, req, member in PHOTOS:
            rgb = decode(member, zipfile.ZipFile(wheels[req]).read(member))
            hr = centre_crop(rgb, args.size)
            root = osp.join(args.out, 'val' if name in VAL else 'train')
            os.makedirs(osp.join(root, 'HR'), exist_ok=True)
            cv2.imwrite(osp.join(root, 'HR', f'{name}.png'), cv2.cvtColor(hr, cv2.COLOR_RGB2BGR))
            for s in SCALES:
                lr = imresize_uint8(hr, 1 / s)
                d = osp.join(root, 'LR_bicubic', f'X{s}')
                os.makedirs(d, exist_ok=True)
                cv2.imwrite(osp.join(d, f'{name}.png'), cv2.cvtColor(lr, cv2.COLOR_RGB2BGR))
            print(f'{name:13s} {rgb.shape[1]}x{rgb.shape[0]} -> HR {args.size}x{args.size}  '
                  f'from {osp.basename(wheels[req])}:{member}')


if __name__ == '__main__':
    main()
