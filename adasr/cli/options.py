"""Checks of a BasicSR option file before anything runs, with messages that name the key or the file.

BasicSR builds everything from ``opt`` with ``cls(**opt)``; a misspelled key either raises a bare ``TypeError``
deep in the pipeline or (for archs with ``**kwargs``, such as basicsr's SwinIR) is silently ignored. Here every
section we know is compared with what its consumer accepts, and dataset roots and checkpoints are checked to exist.
"""
import difflib
import inspect
import os.path as osp
from typing import Iterable, Mapping, Optional

import torch
import yaml
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from adasr.data.paired_dataset import DatasetError, check_data_root


class OptionsError(ValueError):
    """An option file that cannot run as written."""


TOP_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'network_d', 'path', 'train',
    'val', 'logger', 'dist_params', 'find_unused_parameters', 'use_static_graph', 'cudnn_benchmark',
    # set by BasicSR's parse_options:
    'is_train', 'dist', 'rank', 'world_size', 'root_path', 'auto_resume',
}
PATH_KEYS = {
    'pretrain_network_g', 'param_key_g', 'strict_load_g', 'pretrain_network_d', 'param_key_d', 'strict_load_d',
    'resume_state', 'ignore_resume_networks',
    # set by BasicSR's parse_options:
    'experiments_root', 'models', 'training_states', 'log', 'visualization', 'results_root',
}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'pbar'}
METRIC_KEYS = {'type', 'crop_border', 'test_y_channel', 'better', 'input_order', 'num_thread'}
PAIRED_DATASET_KEYS = {
    'name', 'type', 'dataroot_gt', 'dataroot_lq', 'meta_info_file', 'io_backend', 'filename_tmpl', 'gt_size',
    'use_hflip', 'use_rot', 'use_shuffle', 'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio',
    'prefetch_mode', 'pin_memory', 'persistent_workers', 'color', 'mean', 'std', 'phase', 'scale',
}
TRAIN_KEYS = {'ema_decay', 'optim_g', 'optim_d', 'scheduler', 'total_iter', 'warmup_iter', 'net_d_iters',
              'net_d_init_iters'}


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _check_keys(section: str, given: Mapping, known: Iterable[str]) -> None:
    known = set(known)
    for key in given:
        if key not in known:
            raise OptionsError(f"unknown key '{key}' in {section}{_suggest(key, known)}; "
                               f'accepted: {sorted(k for k in known if not k.startswith("_"))}')


def _registered(registry, name: Optional[str], section: str):
    if name is None:
        raise OptionsError(f'{section}: missing "type"')
    if name not in registry:
        raise OptionsError(f"{section}: type '{name}' is not registered{_suggest(name, registry.keys())}")
    return registry.get(name)


def constructor_keys(cls) -> Optional[set]:
    """Keyword arguments ``cls`` accepts; ``**kwargs`` is ignored on purpose (it would swallow typos)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != 'self' and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_network_opt(net_opt: Mapping, section: str = 'network_g') -> None:
    """Check ``type`` is a registered arch and every other key is one of its constructor arguments."""
    if not isinstance(net_opt, Mapping):
        raise OptionsError(f'{section} must be a mapping with a "type"')
    cls = _registered(ARCH_REGISTRY, net_opt.get('type'), section)
    _check_keys(f"{section} ({net_opt['type']})", {k: v for k, v in net_opt.items() if k != 'type'},
                constructor_keys(cls))


def check_loss_opt(loss_opt: Mapping, section: str) -> None:
    cls = _registered(LOSS_REGISTRY, loss_opt.get('type'), section)
    _check_keys(f"{section} ({loss_opt['type']})", {k: v for k, v in loss_opt.items() if k != 'type'},
                constructor_keys(cls))


def check_dataset_opt(phase: str, ds: Mapping, check_paths: bool = True) -> None:
    section = f'datasets.{phase}'
    if not isinstance(ds, Mapping):
        raise OptionsError(f'{section} must be a mapping')
    cls = _registered(DATASET_REGISTRY, ds.get('type'), section)
    if cls.__name__ in ('PairedImageDataset', 'PairedSRDataset'):
        _check_keys(section, ds, PAIRED_DATASET_KEYS)
    io = ds.get('io_backend')
    if not isinstance(io, Mapping) or 'type' not in io:
        raise OptionsError(f'{section}: io_backend must be a mapping with a type (disk or lmdb)')
    for root in ('dataroot_gt', 'dataroot_lq'):
        if not check_paths:
            break
        if root in ds or cls.__name__ in ('PairedImageDataset', 'PairedSRDataset'):
            try:
                check_data_root(ds.get(root), io['type'], f'{section}.{root}')
            except DatasetError as e:
                raise OptionsError(str(e)) from e
    meta = ds.get('meta_info_file')
    if check_paths and meta and not osp.isfile(meta):
        raise OptionsError(f'{section}.meta_info_file does not exist: {meta}')
    if phase.split('_')[0] == 'train':
        for key in ('gt_size', 'batch_size_per_gpu', 'num_worker_per_gpu'):
            if key not in ds:
                raise OptionsError(f'{section}: missing {key}')


def check_precision_opt(value, num_gpu='auto', check_device: bool = True) -> None:
    """``val.precision``: one of fp32/bf16/fp16 and, with ``check_device``, runnable on the device BasicSR will
    pick (CUDA when ``num_gpu`` is not 0 and a GPU is present, else the CPU), so a run is refused before it starts."""
    from adasr.inference.precision import PrecisionError, parse_precision, resolve_precision

    try:
        parse_precision(value)
        if check_device:
            resolve_precision(value, 'cuda' if num_gpu != 0 and torch.cuda.is_available() else 'cpu')
    except PrecisionError as e:
        raise OptionsError(f'val.precision: {e}') from None


def _declared_keys(model_cls, attr: str) -> set:
    """Extra option keys a model class declares, together with those of its base classes (a subclass that declares
    its own set keeps its parents' keys)."""
    keys = set()
    for cls in model_cls.__mro__:
        keys |= set(vars(cls).get(attr, ()))
    return keys


def check_options(opt: Mapping, is_train: bool, check_paths: bool = True) -> None:
    """Validate a parsed option dict; raise :class:`OptionsError` naming the first problem found.

    With ``check_paths`` off, only the structure is checked (dataset roots and checkpoints may be absent).
    """
    _check_keys('the option file', opt, TOP_KEYS)
    for key in ('name', 'model_type', 'datasets', 'network_g'):
        if key not in opt:
            raise OptionsError(f'the option file has no "{key}"')
    model_cls = _registered(MODEL_REGISTRY, opt['model_type'], 'model_type')
    check_network_opt(opt['network_g'], 'network_g')

    num_gpu = opt.get('num_gpu', 'auto')
    if num_gpu != 'auto' and (not isinstance(num_gpu, int) or num_gpu < 0):
        raise OptionsError(f'num_gpu must be a non-negative integer or "auto", got {num_gpu!r}')
    if check_paths and isinstance(num_gpu, int) and num_gpu > torch.cuda.device_count():
        raise OptionsError(f'num_gpu: {num_gpu} but this machine has {torch.cuda.device_count()} CUDA device(s); '
                           'use num_gpu: auto (or 0 for the CPU)')

    datasets = opt['datasets']
    if not isinstance(datasets, Mapping) or not datasets:
        raise OptionsError('datasets must be a non-empty mapping')
    for phase, ds in datasets.items():
        kind = phase.split('_')[0]
        if kind not in ('train', 'val', 'test'):
            raise OptionsError(f"datasets.{phase}: phase must start with train, val or test")
        check_dataset_opt(phase, ds, check_paths)
    if is_train and 'train' not in datasets:
        raise OptionsError('a training option file needs datasets.train')

    path = opt.get('path') or {}
    _check_keys('path', path, PATH_KEYS)
    for key in ('pretrain_network_g', 'pretrain_network_d', 'resume_state'):
        if check_paths and path.get(key) and not osp.isfile(osp.expanduser(path[key])):
            raise OptionsError(f'path.{key} does not exist: {path[key]}')

    val = opt.get('val')
    if val is not None:
        _check_keys('val', val, VAL_KEYS | _declared_keys(model_cls, 'val_option_keys'))
        for key in ('tile', 'tile_pad'):  # AdaSRModel's tiled testing, in LR pixels; checked before training starts
            value = val.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise OptionsError(f'val.{key} must be a non-negative integer (LR pixels), got {value!r}')
        if 'precision' in val:
            check_precision_opt(val['precision'], num_gpu, check_device=check_paths)
        for name, m in (val.get('metrics') or {}).items():
            _registered(METRIC_REGISTRY, m.get('type'), f'val.metrics.{name}')
            _check_keys(f'val.metrics.{name}', m, METRIC_KEYS)

    logger = opt.get('logger')
    if logger is not None:
        _check_keys('logger', logger, LOGGER_KEYS)

    if is_train:
        train = opt.get('train')
        if not isinstance(train, Mapping):
            raise OptionsError('a training option file needs a "train" section')
        loss_keys = {k for k in train if k.endswith('_opt')}
        _check_keys('train', {k: v for k, v in train.items() if k not in loss_keys},
                    TRAIN_KEYS | _declared_keys(model_cls, 'train_option_keys'))
        for key in sorted(loss_keys):
            if train[key] is not None:
                check_loss_opt(train[key], f'train.{key}')
        if 'total_iter' not in train:
            raise OptionsError('train: missing total_iter')
        if logger is None:
            raise OptionsError('a training option file needs a "logger" section')


def load_yaml(path: str) -> dict:
    """Read an option file with BasicSR's ordered YAML loader; errors name the file."""
    if not osp.isfile(path):
        raise OptionsError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as e:
        raise OptionsError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(opt, Mapping):
        raise OptionsError(f'{path} does not hold a mapping of options')
    return opt
