"""Test with a BasicSR option file: ``python adasr/test.py -opt options/test/X.yml`` (or ``adasr-test``).

``results/<name>/`` (images, metrics log) is written under the current directory. ``--sets Set5 Urban100`` runs only
the datasets of the file with those names (the others need not exist on disk).
"""
import os.path as osp
import sys

if __name__ == '__main__':  # run as a file: import the package, not the modules beside this file
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def main(argv=None) -> None:
    from adasr.cli.entry import run

    run('test', argv)


if __name__ == '__main__':
    main()
