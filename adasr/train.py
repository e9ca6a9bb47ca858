"""Train with a BasicSR option file: ``python adasr/train.py -opt options/train/X.yml`` (or ``adasr-train``).

Flags are BasicSR's: ``--launcher none|pytorch|slurm``, ``--auto_resume``, ``--debug``, ``--local_rank``,
``--force_yml``. ``experiments/`` and ``tb_logger/`` are written under the current directory.
"""
import os.path as osp
import sys

if __name__ == '__main__':  # run as a file: import the package, not the modules beside this file
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))


def main(argv=None) -> None:
    from adasr.cli.entry import run

    run('train', argv)


if __name__ == '__main__':
    main()
