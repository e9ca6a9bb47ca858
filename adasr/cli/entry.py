"""What ``adasr-train`` / ``adasr-test`` do around BasicSR's own pipelines."""
import argparse
import os
import os.path as osp
import sys
from contextlib import contextmanager
from typing import List, Optional

import torch


@contextmanager
def _argv(argv: List[str]):
    """BasicSR's ``parse_options`` reads ``sys.argv``; give it ours for the duration of the call."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else 'adasr'] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def _preflight(argv: List[str], is_train: bool) -> None:
    from adasr.cli.options import OptionsError, check_options, load_yaml

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', required=True)
    known, _ = parser.parse_known_args(argv)
    try:
        check_options(load_yaml(known.opt), is_train=is_train)
    except OptionsError as e:
        raise SystemExit(f'error: {e}') from None


def load_resume_state(opt: dict) -> Optional[dict]:
    """Replacement for ``basicsr.train.load_resume_state``.

    BasicSR 1.4.2 maps the state onto ``torch.cuda.current_device()`` (fails on a CPU) and looks for
    ``--auto_resume`` states relative to the current directory instead of the experiments root; it also loads the
    state with pickle. Here: the latest ``<root>/experiments/<name>/training_states/*.state``, read with
    ``weights_only=True`` onto the model's device.
    """
    from collections import Counter

    from basicsr.utils import check_resume

    path = None
    if opt['auto_resume']:
        state_dir = osp.join(opt['root_path'], 'experiments', opt['name'], 'training_states')
        if osp.isdir(state_dir):
            iters = [int(f[:-len('.state')]) for f in os.listdir(state_dir)
                     if f.endswith('.state') and f[:-len('.state')].isdigit()]
            if iters:
                path = osp.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = path
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
    if path is None:
        return None
    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] else torch.device('cpu')
    with torch.serialization.safe_globals([Counter]):  # MultiStepRestartLR keeps its milestones in a Counter
        state = torch.load(path, map_location=device, weights_only=True)
    check_resume(opt, state['iter'])
    return state


def _agreed_resume_state(opt: dict) -> Optional[dict]:
    """:func:`load_resume_state`, checked to be the same iteration in every process of a distributed run (each
    reads ``experiments/`` itself: on several machines it must be a shared folder)."""
    from adasr.utils.distributed import gather_to_all

    state = load_resume_state(opt)
    iters = gather_to_all(None if state is None else state['iter'])
    if len(set(iters)) > 1:
        found = ', '.join(f'process {r}: {"none" if i is None else f"iteration {i}"}' for r, i in enumerate(iters))
        raise SystemExit(f'error: the processes found different training states to resume from ({found}); '
                         f'experiments/{opt["name"]} must be one folder that every machine shares')
    return state


def run(kind: str, argv: Optional[List[str]] = None) -> None:
    """Run BasicSR's train or test pipeline with adasr registered and outputs under the current directory."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # adasr/__init__ has already run (this module is inside the package): shim applied, everything registered
    from basicsr import test as basicsr_test
    from basicsr import train as basicsr_train

    from adasr.compat import apply_basicsr_dist_shim
    from adasr.data.paired_dataset import DatasetError
    from adasr.utils.checkpoint import CheckpointError

    _preflight(argv, is_train=(kind == 'train'))
    apply_basicsr_dist_shim()  # --launcher pytorch: gloo on CPUs, NCCL on GPUs
    root = os.getcwd()
    try:
        with _argv(argv):
            if kind == 'train':
                basicsr_train.load_resume_state = _agreed_resume_state
                basicsr_train.train_pipeline(root)
            else:
                basicsr_test.test_pipeline(root)
    except (CheckpointError, DatasetError) as e:  # user errors: the message names the file or keys
        raise SystemExit(f'error: {e}') from None
