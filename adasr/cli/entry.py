"""What ``adasr-train`` / ``adasr-test`` do around BasicSR's own pipelines.

Before BasicSR starts: the option file is read with adasr's safe loader and checked (:mod:`adasr.cli.options`);
BasicSR's own ``parse_options`` is given the same safe loader (its ``ordered_yaml()`` loader builds Python objects)
and ``--force_yml`` values are parsed as YAML data instead of BasicSR's ``exec``. ``--auto_resume`` picks the newest
training state that can be read, together with its network file.
"""
import argparse
import functools
import os
import os.path as osp
import shlex
import sys
from collections import Counter
from contextlib import contextmanager
from typing import List, Optional, Sequence

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


def worker_message(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised by a DataLoader from a worker process (its text is "Caught X in
    DataLoader worker process N." and the worker's whole traceback), the worker's own message."""
    text = str(e)
    if not text.startswith('Caught ') or 'Original Traceback' not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f'{type(e).__module__}.{type(e).__name__}: '
    for p in (prefix, f'{type(e).__name__}: '):
        if last.startswith(p):
            return last[len(p):]
    return last


#: what each --launcher needs from its environment (BasicSR reads them and fails with a bare KeyError / ValueError)
_LAUNCHER_ENV = {'pytorch': ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'),
                 'slurm': ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')}


def _check_launcher(argv: List[str]) -> None:
    """``--launcher pytorch`` outside torchrun (or ``slurm`` outside srun): stop with what is missing."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--launcher', default='none')
    launcher = parser.parse_known_args(argv)[0].launcher
    missing = [name for name in _LAUNCHER_ENV.get(launcher, ()) if name not in os.environ]
    if launcher == 'slurm' and 'SLURM_PROCID' in os.environ:
        missing = []  # BasicSR derives the rest from SLURM's own variables
    if missing:
        how = 'torchrun --nproc-per-node N adasr/train.py ...' if launcher == 'pytorch' else 'srun ...'
        raise SystemExit(f'error: --launcher {launcher} needs the variables its launcher sets ({", ".join(missing)} '
                         f'missing): start it as {how}, or use --launcher none')


def _copy_opt_file(opt_file: str, experiments_root: str, command: str, overrides: Sequence) -> None:
    """BasicSR's record of a run, ``experiments/<name>/<file>.yml``: the command as typed (``--force_yml``
    included; BasicSR's own shows the arguments it parsed) and the options that ran: with overrides, the file as
    read with them applied (comments not kept), so that training from the copy repeats the run. Written atomically.
    """
    import time

    import yaml
    from basicsr.utils.dist_util import get_dist_info

    from adasr.cli.options import load_yaml
    from adasr.utils.files import atomic_write_bytes

    if get_dist_info()[0] != 0:  # process 0 alone, as BasicSR's (@master_only): it made the folder
        return
    header = f'# GENERATE TIME: {time.asctime()}\n# CMD:\n# {command}\n\n'
    if overrides:
        text = ('# the options of this run: the file given, with the --force_yml values of the command applied\n'
                + yaml.safe_dump(_plain(load_yaml(opt_file, overrides)), sort_keys=False, allow_unicode=True))
    else:
        with open(opt_file, encoding='utf-8') as f:
            text = f.read()
    atomic_write_bytes(osp.join(experiments_root, osp.basename(opt_file)), (header + text).encode('utf-8'))


def _plain(value):
    """Mappings (BasicSR's OrderedDicts) as dicts, recursively, for ``yaml.safe_dump``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _split_adasr_args(argv: List[str], kind: str):
    """Take ``--force_yml a:b=v ...`` (BasicSR would ``exec`` it) and, for testing, adasr's ``--sets NAME ...`` out
    of ``argv``; return (rest, force_yml entries, set names or None)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--force_yml', nargs='+', action='extend', default=[])
    if kind == 'test':
        parser.add_argument('--sets', nargs='+', default=None)
    known, rest = parser.parse_known_args(argv)
    return rest, known.force_yml, getattr(known, 'sets', None)


def _preflight(argv: List[str], is_train: bool, overrides: Sequence) -> None:
    from adasr.cli.options import (
        OptionsError,
        check_network_builds,
        check_options,
        ensure_perceptual_weights,
        load_yaml,
    )

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', required=True)
    known, _ = parser.parse_known_args(argv)
    try:
        opt = load_yaml(known.opt, overrides)
    except OptionsError as e:
        raise SystemExit(f'error: {e}') from None
    try:
        check_options(opt, is_train=is_train)
        check_network_builds(opt['network_g'])
        if is_train:
            ensure_perceptual_weights(opt['train'])
    except OptionsError as e:
        raise SystemExit(f'error: {known.opt}: {e}') from None
    if is_train:
        _read_validation_sets(opt)


def _read_validation_sets(opt: dict) -> None:
    """Before training: read every pair of the validation sets once, as validation will (decoding, the GT size
    against the LR's x scale), so that a damaged or mismatched validation image stops the run now rather than at
    the first validation, ``val_freq`` iterations in. Validation sets are small (Set5 to DIV2K's 100 images: a few
    seconds). BasicSR's logger is not touched (it is set up by the pipeline later)."""
    import copy

    from basicsr.utils.registry import DATASET_REGISTRY

    from adasr.data.paired_dataset import DatasetError

    for key, ds_opt in (opt.get('datasets') or {}).items():
        phase = key.split('_')[0]
        if phase == 'train':
            continue
        ds_opt = dict(copy.deepcopy(ds_opt), phase=phase, scale=opt['scale'])
        try:
            dataset = DATASET_REGISTRY.get(ds_opt['type'])(ds_opt)
            for index in range(len(dataset)):
                dataset[index]
        except DatasetError as e:
            raise SystemExit(f'error: datasets.{key}: {e}') from None
        except Exception as e:  # noqa: BLE001 - another dataset type's own error, named by its set
            raise SystemExit(f'error: datasets.{key}: {type(e).__name__}: {e}') from None


@contextmanager
def _safe_basicsr_yaml(overrides: Sequence):
    """Make BasicSR's ``parse_options`` read the option file with adasr's safe loader (and apply the
    ``--force_yml`` overrides) for the duration of the run."""
    from basicsr.utils import options as basicsr_options

    from adasr.cli.options import option_loader

    original = basicsr_options.ordered_yaml
    loader = option_loader(overrides)
    basicsr_options.ordered_yaml = lambda: (loader, original()[1])
    try:
        yield
    finally:
        basicsr_options.ordered_yaml = original


def _warn(message: str) -> None:
    """A warning before BasicSR's logger exists (it must be set up by the pipeline first): on stderr."""
    print(f'warning: {message}', file=sys.stderr, flush=True)


class ResumeError(RuntimeError):
    """``--auto_resume`` found training states but none that can be used."""


def _read_state(path: str, device: torch.device) -> dict:
    from adasr.utils.checkpoint import damaged_record

    damaged = damaged_record(path)
    if damaged:
        raise ValueError(f'damaged: {damaged}')
    with torch.serialization.safe_globals([Counter]):  # MultiStepRestartLR keeps its milestones in a Counter
        state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get('iter'), int):
        raise ValueError('not a BasicSR training state (no "iter")')
    return state


def _usable_state(state_dir: str, models_dir: str, device: torch.device):
    """The newest ``<iter>.state`` of ``state_dir`` that reads and whose ``net_g_<iter>.pth`` reads with finite
    weights, as (path, state); unusable ones are skipped with a warning naming them.

    Raises:
        ResumeError: there are states, and none is usable.
    """
    from adasr.utils.checkpoint import load_checkpoint

    iters = sorted((int(f[:-len('.state')]) for f in os.listdir(state_dir)
                    if f.endswith('.state') and f[:-len('.state')].isdigit()), reverse=True)
    skipped = []
    for it in iters:
        path = osp.join(state_dir, f'{it}.state')
        try:
            state = _read_state(path, device)
            for key in ('params', 'params_ema'):  # what BasicSR loads into net_g and net_g_ema on resume
                load_checkpoint(osp.join(models_dir, f'net_g_{it}.pth'), param_key=key)
        except Exception as e:  # noqa: BLE001 - a truncated file raises many kinds of errors
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            _warn(f'--auto_resume: skipping {path}: {reason}')
            skipped.append(path)
            continue
        return path, state
    if skipped:
        raise ResumeError(f'--auto_resume: no usable training state in {state_dir} (tried, newest first: '
                          f'{", ".join(osp.basename(p) for p in skipped)}); move the folder '
                          f'{osp.dirname(state_dir)} away to start again, or give path.resume_state')
    return None, None


def load_resume_state(opt: dict) -> Optional[dict]:
    """Replacement for ``basicsr.train.load_resume_state``.

    BasicSR 1.4.2 maps the state onto ``torch.cuda.current_device()`` (fails on a CPU), looks for ``--auto_resume``
    states relative to the current directory instead of the experiments root, loads the state with pickle, and
    always takes the highest-numbered state, even a truncated one. Here, with ``--auto_resume``: the newest
    ``<root>/experiments/<name>/training_states/<iter>.state`` that reads with ``weights_only=True`` and whose
    ``models/net_g_<iter>.pth`` reads (unusable ones are skipped with a warning; temporary files of interrupted
    writes are removed first); otherwise ``path.resume_state``.
    """
    from basicsr.utils import check_resume

    from adasr.utils.files import remove_orphan_temporaries

    device = torch.device('cuda', torch.cuda.current_device()) if opt['num_gpu'] else torch.device('cpu')
    state = None
    if opt['auto_resume']:
        exp = osp.join(opt['root_path'], 'experiments', opt['name'])
        state_dir, models_dir = osp.join(exp, 'training_states'), osp.join(exp, 'models')
        if opt.get('rank', 0) == 0:
            for path in remove_orphan_temporaries(state_dir, 0) + remove_orphan_temporaries(models_dir, 0):
                _warn(f'--auto_resume: removed {path}, left by an interrupted write')
        if osp.isdir(state_dir):
            path, state = _usable_state(state_dir, models_dir, device)
            if path is not None:
                opt['path']['resume_state'] = path
    elif opt['path'].get('resume_state'):
        try:
            state = _read_state(opt['path']['resume_state'], device)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ResumeError(f"path.resume_state {opt['path']['resume_state']} cannot be read: "
                              f'{type(e).__name__}: {e}') from e
        # BasicSR resumes the network of the experiment the option file names, into its folder
        net = osp.join(opt['path']['models'], f"net_g_{state['iter']}.pth")
        if not osp.isfile(net):
            raise ResumeError(f"path.resume_state {opt['path']['resume_state']} is iteration {state['iter']}, but "
                              f"experiment {opt['name']!r} has no {net}: a run resumes in its own experiment "
                              '(give its name), or starts from other weights with path.pretrain_network_g')
    if state is None:
        return None
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


def apply_basicsr_dist_shim() -> None:
    """Let BasicSR 1.4.2's ``--launcher pytorch`` run on CPUs (gloo) as well as GPUs (NCCL).

    BasicSR hard-codes the NCCL backend and ``torch.cuda.set_device(RANK % device_count)`` in
    ``basicsr.utils.dist_util._init_dist_pytorch`` (a division by zero without CUDA), and wraps networks in
    ``DistributedDataParallel(device_ids=[torch.cuda.current_device()])`` (no CUDA, no device; and DDP refuses a
    network without trainable parameters, such as ``Bicubic``). Replacements: the process group comes from
    :func:`adasr.utils.distributed.init_from_env` (``cpu:gloo,cuda:nccl`` with CUDA, gloo without; the GPU is
    ``LOCAL_RANK``), a network on the CPU is wrapped without ``device_ids``, and one without trainable parameters
    is not wrapped. The GPU path of ``model_to_device`` and everything else (samplers, rank-0-only saving and
    logging) stay BasicSR's; so does the slurm launcher (GPUs only). Safe to call more than once.
    """
    from basicsr.models.base_model import BaseModel
    from basicsr.utils import dist_util
    from torch.nn.parallel import DistributedDataParallel

    from adasr.utils.distributed import init_from_env

    if getattr(BaseModel.model_to_device, '_adasr_shim', False):
        return
    basicsr_model_to_device = BaseModel.model_to_device

    def init_dist_pytorch(backend: str = 'nccl', **kwargs) -> None:
        del backend  # BasicSR always passes 'nccl'; the backend follows the hardware instead
        init_from_env(**kwargs)

    def model_to_device(self, net):
        if self.opt['dist'] and not any(p.requires_grad for p in net.parameters()):
            return net.to(self.device)  # nothing to synchronise (Bicubic), and DDP refuses such a module
        if self.opt['dist'] and self.device.type == 'cpu':
            return DistributedDataParallel(net.to(self.device),
                                           find_unused_parameters=self.opt.get('find_unused_parameters', False))
        return basicsr_model_to_device(self, net)

    model_to_device._adasr_shim = True
    dist_util._init_dist_pytorch = init_dist_pytorch
    BaseModel.model_to_device = model_to_device


def help_parser(kind: str) -> argparse.ArgumentParser:
    """The flags of ``adasr-train`` / ``adasr-test`` as ``-h`` shows them: BasicSR's own (which its pipeline
    parses) and adasr's (taken out before it does)."""
    parser = argparse.ArgumentParser(
        prog=f'adasr-{kind}', description=f"BasicSR's {kind} pipeline with adasr's archs, models and datasets "
        'registered; outputs (experiments/, results/, tb_logger/) under the current directory.')
    parser.add_argument('-opt', required=True, metavar='FILE', help='option YAML file (read as data: safe YAML, '
                        'checked before anything runs)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher (pytorch: torchrun; gloo on CPUs, NCCL on GPUs)')
    if kind == 'train':
        parser.add_argument('--auto_resume', action='store_true',
                            help='resume from the newest training state that can be read, with its network file')
    parser.add_argument('--debug', action='store_true', help="BasicSR's debug mode")
    parser.add_argument('--local_rank', type=int, default=0, help='set by older launchers')
    parser.add_argument('--force_yml', nargs='+', metavar='KEY=VALUE',
                        help='override option keys, e.g. train:ema_decay=0.999 (values parsed as YAML data)')
    if kind == 'test':
        parser.add_argument('--sets', nargs='+', metavar='NAME',
                            help="test only these datasets of the option file (their 'name' values)")
    return parser


def run(kind: str, argv: Optional[List[str]] = None) -> None:
    """Run BasicSR's train or test pipeline with adasr registered and outputs under the current directory."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if '-h' in argv or '--help' in argv:
        help_parser(kind).print_help()
        raise SystemExit(0)
    # adasr/__init__ has already run (this module is inside the package): shim applied, everything registered
    from basicsr import test as basicsr_test
    from basicsr import train as basicsr_train

    from adasr.cli.options import OptionsError, parse_overrides, select_test_sets
    from adasr.data.paired_dataset import DatasetError
    from adasr.models.adasr_model import ResumeMismatchError, TrainingDivergedError
    from adasr.utils.checkpoint import CheckpointError
    from adasr.utils.checks import NonFiniteError
    from adasr.utils.distributed import barrier, destroy
    from adasr.utils.files import WriteError

    command = shlex.join([sys.argv[0] if sys.argv else 'adasr'] + argv)  # as typed (quoted), --force_yml included
    argv, force_yml, sets = _split_adasr_args(argv, kind)
    _check_launcher(argv)
    from adasr.ops.config import check_environment

    try:  # every ADASR_* setting, before the option file is read
        check_environment()
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    if kind == 'test':  # freed feature maps kept for the next image (no page faults each forward): adasr.utils.malloc
        from adasr.utils import malloc

        try:
            malloc.tune()
        except ValueError as e:
            raise SystemExit(f'error: {e}') from None
    try:
        overrides = parse_overrides(force_yml)
    except OptionsError as e:
        raise SystemExit(f'error: {e}') from None
    if sets:  # checked against the option file's dataset names before anything runs
        overrides.append(select_test_sets(sets))
    _preflight(argv, is_train=(kind == 'train'), overrides=overrides)
    apply_basicsr_dist_shim()  # --launcher pytorch: gloo on CPUs, NCCL on GPUs
    root = os.getcwd()
    try:
        with _argv(argv), _safe_basicsr_yaml(overrides):
            if kind == 'train':
                basicsr_train.load_resume_state = _agreed_resume_state
                basicsr_train.copy_opt_file = functools.partial(_copy_opt_file, command=command,
                                                                overrides=overrides)
                basicsr_train.train_pipeline(root)
            else:
                basicsr_test.test_pipeline(root)
    except (CheckpointError, DatasetError, NonFiniteError, ResumeError, ResumeMismatchError,
            TrainingDivergedError, WriteError) as e:  # names the cause
        raise SystemExit(f'error: {worker_message(e)}') from None
    except OSError as e:  # a folder BasicSR makes or renames (experiments/<name>, results/): read-only, full disk
        if not e.filename:
            raise
        raise SystemExit(f'error: cannot use {e.filename}: {e.strerror or e}') from None
    # under torchrun: leave together (process 0 may still be saving or validating when another one finishes; a
    # process that exits with its group open can abort the others' gloo connections)
    barrier()
    destroy()
