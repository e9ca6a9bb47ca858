"""Upscale images from a clone without installing adasr: ``python inference/upscale.py -i IN -o OUT --opt X.yml``.

Same flags as ``adasr-upscale`` (see ``python inference/upscale.py -h`` and docs/upscale.md).
"""
import os.path as osp
import sys

if __name__ == '__main__':  # run as a file: import the package from this clone
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def main(argv=None) -> int:
    from adasr.cli.upscale import main as upscale_main

    return upscale_main(argv)


if __name__ == '__main__':
    sys.exit(main())
