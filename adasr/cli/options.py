"""Checks of a BasicSR option file before anything runs, with messages that name the key or the file.

BasicSR builds everything from ``opt`` with ``cls(**opt)``; a misspelled key either raises a bare ``TypeError``
deep in the pipeline or (for archs with ``**kwargs``, such as basicsr's SwinIR) is silently ignored. Here every
section we know is compared with what its consumer accepts, numbers are checked (scales that agree, positive
iteration counts, frequencies and learning rates), and dataset roots and checkpoints are checked to exist.

Option files are data: :func:`load_yaml` reads them with :class:`OptionLoader` (``yaml.SafeLoader`` with BasicSR's
ordered mappings), which refuses the tags that build Python objects.
"""
import difflib
import inspect
import math
import os.path as osp
from collections import OrderedDict
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from adasr.data.paired_dataset import DatasetError, check_data_root
from adasr.utils.checks import check_int, check_positive, is_real


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
    'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers', 'color', 'mean', 'std', 'phase',
    'scale',
}
TRAIN_KEYS = {'ema_decay', 'optim_g', 'optim_d', 'scheduler', 'total_iter', 'warmup_iter', 'net_d_iters',
              'net_d_init_iters'}


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def check_keys(section: str, given: Mapping, known: Iterable[str]) -> None:
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
    check_keys(f"{section} ({net_opt['type']})", {k: v for k, v in net_opt.items() if k != 'type'},
                constructor_keys(cls))


def check_network_builds(net_opt: Mapping, section: str = 'network_g') -> None:
    """Build the network once without weights (on PyTorch's meta device, which allocates nothing; on the CPU for
    archs whose constructors compute with tensor values) so that a bad argument value is reported, naming
    ``section``, before the pipeline makes its folders. The class is called directly: BasicSR's ``build_network``
    logs, and its first log call would set up BasicSR's logger before the pipeline gives it its log file."""
    kwargs = {k: v for k, v in net_opt.items() if k != 'type'}
    cls = ARCH_REGISTRY.get(net_opt['type'])
    try:
        try:
            with torch.device('meta'):
                cls(**kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if 'meta' not in str(e):
                raise
            cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - any constructor failure is a problem of these arguments
        hint = ''.join(f'; {section}.{k} is {v!r} where {net_opt.get("type")}\'s default is {d!r}'
                       for k, v, d in _unlike_defaults(cls, kwargs))
        raise OptionsError(f'cannot build {section} ({net_opt.get("type")}) with these arguments: '
                           f'{type(e).__name__}: {e}{hint}') from None


def _unlike_defaults(cls: type, kwargs: Mapping) -> List[Tuple[str, Any, Any]]:
    """(key, value, default) for each argument whose value is of another kind than the constructor's default: text
    for a number, a scalar for a list, a number or text for a flag. Only a hint for a failed build: constructors
    may accept more than their default's type."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []

    def kind(x):
        if isinstance(x, bool):
            return 'flag'
        if is_real(x):
            return 'number'
        return 'text' if isinstance(x, str) else 'list' if isinstance(x, (list, tuple)) else None

    found = []
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or param.default is inspect.Parameter.empty or kind(param.default) is None:
            continue
        want, got = kind(param.default), kind(value)
        if got != want and not (want == 'list' and got is None):
            found.append((key, value, param.default))
    return found


def check_loss_opt(loss_opt: Mapping, section: str) -> None:
    if not isinstance(loss_opt, Mapping):
        raise OptionsError(f'{section} must be a mapping (type: ..., its arguments), got {loss_opt!r}')
    cls = _registered(LOSS_REGISTRY, loss_opt.get('type'), section)
    check_keys(f"{section} ({loss_opt['type']})", {k: v for k, v in loss_opt.items() if k != 'type'},
                constructor_keys(cls))
    weight = loss_opt.get('loss_weight', 1.0)
    if not (is_real(weight) and math.isfinite(weight) and weight >= 0):
        # a negative weight trains by gradient ascent, a NaN one skips every step
        raise OptionsError(f'{section}.loss_weight must be a finite number >= 0, got {weight!r}')
    if loss_opt.get('reduction', 'mean') not in ('mean', 'sum'):  # 'none' leaves a map, and backward needs a number
        raise OptionsError(f"{section}.reduction must be 'mean' or 'sum' for a training loss, got "
                           f"{loss_opt['reduction']!r}")


#: BasicSR's schedulers by the names its ``setup_schedulers`` accepts
SCHEDULERS = {'MultiStepLR': 'MultiStepRestartLR', 'MultiStepRestartLR': 'MultiStepRestartLR',
              'CosineAnnealingRestartLR': 'CosineAnnealingRestartLR'}


def check_training_setup(train: Mapping) -> None:
    """The optimizer (``train.optim_g``, ``optim_d``: a ``torch.optim`` class by name with its own arguments), the
    scheduler (one BasicSR builds, with its arguments) and the losses (a pixel or perceptual loss to train with)."""
    for key in ('optim_g', 'optim_d'):
        optim = train.get(key)
        if optim is None:
            if key == 'optim_g':
                raise OptionsError('train: missing optim_g (e.g. {type: Adam, lr: 2.0e-4})')
            continue
        if not isinstance(optim, Mapping) or 'type' not in optim:
            raise OptionsError(f'train.{key} must be a mapping with a type (a torch.optim optimizer), got {optim!r}')
        cls = getattr(torch.optim, str(optim['type']), None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                     and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != 'Optimizer']
            close = difflib.get_close_matches(str(optim['type']), names, n=1)
            raise OptionsError(f'train.{key}.type: {optim["type"]!r} is not a torch.optim optimizer'
                               + (f"; did you mean '{close[0]}'?" if close else f'; choose one of {names}'))
        check_keys(f'train.{key} ({optim["type"]})', {k: v for k, v in optim.items() if k not in ('type', 'lr')},
                    set(constructor_keys(cls)) - {'params'})
        if 'lr' not in optim:
            raise OptionsError(f'train.{key}: missing lr')
        betas = optim.get('betas')
        if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2
                                      and all(is_real(b) and 0 <= b < 1 for b in betas)):
            raise OptionsError(f'train.{key}.betas must be two numbers in [0, 1), got {betas!r}')
    scheduler = train.get('scheduler')
    if not isinstance(scheduler, Mapping) or 'type' not in scheduler:
        raise OptionsError('train.scheduler must be a mapping with a type (one of '
                           f'{sorted(SCHEDULERS)}), got {scheduler!r}')
    if scheduler['type'] not in SCHEDULERS:
        close = difflib.get_close_matches(str(scheduler['type']), list(SCHEDULERS), n=1)
        raise OptionsError(f'train.scheduler.type: {scheduler["type"]!r} is not a scheduler BasicSR builds'
                           + (f"; did you mean '{close[0]}'?" if close else f'; choose one of {sorted(SCHEDULERS)}'))
    from basicsr.models import lr_scheduler

    cls = getattr(lr_scheduler, SCHEDULERS[scheduler['type']])
    check_keys(f'train.scheduler ({scheduler["type"]})', {k: v for k, v in scheduler.items() if k != 'type'},
                set(constructor_keys(cls)) - {'optimizer', 'last_epoch'})
    for key in ('milestones', 'periods', 'restarts', 'restart_weights'):
        if key in scheduler and not isinstance(scheduler[key], (list, tuple)):
            raise OptionsError(f'train.scheduler.{key} must be a list, got {scheduler[key]!r}')
    required = 'milestones' if SCHEDULERS[scheduler['type']] == 'MultiStepRestartLR' else 'periods'
    if required not in scheduler:
        raise OptionsError(f'train.scheduler ({scheduler["type"]}): missing {required}')
    if not (train.get('pixel_opt') or train.get('perceptual_opt')):
        raise OptionsError('train: no pixel_opt or perceptual_opt: nothing to train with (e.g. pixel_opt: '
                           '{type: L1Loss, loss_weight: 1.0})')


#: the VGG networks BasicSR's ``PerceptualLoss`` accepts as ``vgg_type`` (torchvision's, by name)
VGG_TYPES = ('vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn')


def perceptual_weights(loss_opt: Mapping, section: str = 'train.perceptual_opt') -> Tuple[str, str, str]:
    """Where BasicSR's ``PerceptualLoss`` takes its ImageNet VGG weights from: (the file it loads, the address
    torchvision downloads it from, BasicSR's own ``VGG_PRETRAIN_PATH``). BasicSR loads ``VGG_PRETRAIN_PATH``
    (VGG19's weights, relative to the current directory) when it exists, whatever ``vgg_type``; else torchvision's
    ``pretrained=True`` reads its cache (``torch.hub.get_dir()/checkpoints``) or downloads there."""
    import torchvision
    from basicsr.archs import vgg_arch

    vgg_type = loss_opt.get('vgg_type', 'vgg19')
    if vgg_type not in VGG_TYPES:
        raise OptionsError(f'{section}.vgg_type: {vgg_type!r} is not a VGG BasicSR builds; choose one of '
                           f'{list(VGG_TYPES)}' + _suggest(str(vgg_type), VGG_TYPES))
    local = vgg_arch.VGG_PRETRAIN_PATH
    if osp.exists(local):
        if vgg_type != 'vgg19':
            raise OptionsError(f'{section}.vgg_type is {vgg_type}, but BasicSR loads {local} (under the directory '
                               'you run from: VGG19 weights) for every vgg_type, and they do not fit: move that file '
                               'away or use vgg_type: vgg19')
        return local, '', local
    weights = getattr(torchvision.models, f'{vgg_type.upper()}_Weights').IMAGENET1K_V1
    path = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(weights.url))
    return path, weights.url, local


def ensure_perceptual_weights(train: Mapping) -> None:
    """Before a run makes its folders: the VGG weights of ``train.perceptual_opt`` (a ``PerceptualLoss``) are on
    disk, downloaded now (BasicSR's loss would download them when built, after the experiment's folders exist) or
    refused with the file to provide. A file whose SHA-256 does not start with the prefix in its name (a copy cut
    short or damaged) is refused too. Under ``torchrun`` only local rank 0 downloads; the other processes wait for
    it in ``init_process_group`` (and would download for themselves, atomically, if they ever got there first)."""
    import hashlib
    import os

    loss_opt = train.get('perceptual_opt')
    if not (isinstance(loss_opt, Mapping) and loss_opt and loss_opt.get('type') == 'PerceptualLoss'):
        return  # BasicSR builds no VGG for an empty section; another loss type loads no VGG here
    path, url, local = perceptual_weights(loss_opt)
    vgg_type = loss_opt.get('vgg_type', 'vgg19')
    found = torch.hub.HASH_REGEX.search(osp.basename(path))  # torch.hub's: the SHA-256 prefix in the name
    digest = found.group(1) if found else None
    if not osp.exists(path):
        if os.environ.get('LOCAL_RANK', '0') != '0':
            return
        try:
            os.makedirs(osp.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=digest, progress=False)
        except Exception as e:  # noqa: BLE001 - offline, refused, a wrong hash: the same advice
            also = f' (or, for vgg19, to {local} under the directory you run from)' if vgg_type == 'vgg19' else ''
            raise OptionsError(
                f'train.perceptual_opt: the ImageNet weights of its VGG ({vgg_type}) are not at {path} and '
                f'downloading them from {url} failed ({type(e).__name__}: {e}); copy that file there{also} and '
                'start again') from None
    if digest:
        sha = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 22), b''):
                sha.update(block)
        if not sha.hexdigest().startswith(digest):
            raise OptionsError(f'train.perceptual_opt: {path} is damaged or cut short (its SHA-256 does not begin '
                               f'with {digest}, as its name says); delete it and start again (it is downloaded '
                               'again) or copy a good one there')


#: keys BasicSR reads with ``opt[...]`` (a KeyError mid-run when absent), with an example value for the message
_REQUIRED_EXAMPLES = {'save_img': 'false', 'val_freq': '!!float 5e3', 'suffix': '~', 'print_freq': '100',
                      'save_checkpoint_freq': '!!float 5e3', 'use_tb_logger': 'true'}


def _require(section: str, given: Mapping, keys: Iterable[str]) -> None:
    for key in keys:
        if key not in given:
            raise OptionsError(f'{section}: missing {key} (BasicSR reads it; e.g. {key}: {_REQUIRED_EXAMPLES[key]})')


def check_booleans(section: str, given: Mapping, keys: Iterable[str]) -> None:
    """Each of ``keys`` present in ``given`` must be true or false (YAML ``maybe`` or ``'false'`` in quotes would read
    as true in BasicSR's ``if``)."""
    for key in keys:
        if key in given and given[key] is not None and not isinstance(given[key], bool):
            raise OptionsError(f'{section}.{key} must be true or false, got {given[key]!r}')


def check_dataset_opt(phase: str, ds: Mapping, check_paths: bool = True) -> None:
    section = f'datasets.{phase}'
    if not isinstance(ds, Mapping):
        raise OptionsError(f'{section} must be a mapping')
    cls = _registered(DATASET_REGISTRY, ds.get('type'), section)
    if cls.__name__ in ('PairedImageDataset', 'PairedSRDataset'):
        check_keys(section, ds, PAIRED_DATASET_KEYS)
    io = ds.get('io_backend')
    if not isinstance(io, Mapping) or 'type' not in io:
        raise OptionsError(f'{section}: io_backend must be a mapping with a type (disk or lmdb)')
    if io['type'] not in ('disk', 'lmdb'):
        raise OptionsError(f"{section}.io_backend.type: {io['type']!r} is not supported; choose disk or lmdb")
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
    check_booleans(section, ds, ('use_hflip', 'use_rot', 'use_shuffle', 'pin_memory', 'persistent_workers'))
    mode = ds.get('prefetch_mode')
    if mode not in (None, 'cpu', 'cuda'):
        raise OptionsError(f"{section}.prefetch_mode: {mode!r} is not one of BasicSR's: leave it out (or ~), cpu or "
                           'cuda')
    if mode == 'cuda' and check_paths and not torch.cuda.is_available():
        raise OptionsError(f'{section}.prefetch_mode: cuda, but no CUDA GPU is available here')


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
    check_keys('the option file', opt, TOP_KEYS)
    for key in ('name', 'model_type', 'datasets', 'network_g'):
        if key not in opt:
            raise OptionsError(f'the option file has no "{key}"')
    name = opt['name']
    if not isinstance(name, str) or not name.strip() or name in ('.', '..') or '/' in name or '\\' in name:
        # BasicSR makes experiments/<name> and results/<name>: a path there would write elsewhere
        raise OptionsError(f'name must be a plain folder name (no path separator, not . or ..), got {name!r}')
    model_cls = _registered(MODEL_REGISTRY, opt['model_type'], 'model_type')
    check_network_opt(opt['network_g'], 'network_g')

    seed = opt.get('manual_seed')
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise OptionsError(f'manual_seed must be a non-negative integer, got {seed!r}')
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
    if is_train:  # BasicSR validates only with both: either one alone is a run that never validates, silently
        val_sets = [p for p in datasets if p.split('_')[0] != 'train']
        if val_sets and opt.get('val') is None:
            raise OptionsError(f'datasets.{val_sets[0]} is given but there is no "val" section: validation would '
                               'never run (add val: {val_freq: ..., metrics: ...}, or remove the dataset)')
        if opt.get('val') is not None and not val_sets:
            raise OptionsError('a "val" section but no validation dataset (datasets.val): validation would never '
                               'run (add one, or remove the val section)')

    path = opt.get('path')
    if not isinstance(path, Mapping):  # BasicSR's parse_options walks path's items
        raise OptionsError('the "path" section must be a mapping (e.g. path: {pretrain_network_g: ~, '
                           f'strict_load_g: true}}), got {path!r}')
    check_keys('path', path, PATH_KEYS)
    check_booleans('path', path, ('strict_load_g', 'strict_load_d'))
    for key in ('pretrain_network_g', 'pretrain_network_d', 'resume_state'):
        if check_paths and path.get(key) and not osp.isfile(osp.expanduser(path[key])):
            raise OptionsError(f'path.{key} does not exist: {path[key]}')

    val = opt.get('val')
    if val is None and not is_train:  # BasicSR's test pipeline reads val (metrics, save_img) for every set
        raise OptionsError('a test option file needs a "val" section (e.g. val: {save_img: true, metrics: {psnr: '
                           '{type: calculate_psnr, crop_border: 4, test_y_channel: true}}})')
    if val is not None and not isinstance(val, Mapping):
        raise OptionsError(f'val must be a mapping, got {val!r}')
    if val is not None:
        check_keys('val', val, VAL_KEYS | _declared_keys(model_cls, 'val_option_keys'))
        for key in ('tile', 'tile_pad'):  # AdaSRModel's tiled testing, in LR pixels; checked before training starts
            value = val.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise OptionsError(f'val.{key} must be a non-negative integer (LR pixels), got {value!r}')
        if 'precision' in val:
            check_precision_opt(val['precision'], num_gpu, check_device=check_paths)
        # missing, BasicSR's run stops with a KeyError at the first validation
        _require('val', val, ['save_img'] + (['val_freq'] if is_train else [])
                 + (['suffix'] if not is_train and val.get('save_img') else []))
        check_booleans('val', val, ('save_img', 'pbar'))
        metrics = val.get('metrics') or {}
        if not isinstance(metrics, Mapping):
            raise OptionsError(f'val.metrics must be a mapping of metric names to settings, got {metrics!r}')
        for name, m in metrics.items():
            if not isinstance(m, Mapping):
                raise OptionsError(f'val.metrics.{name} must be a mapping (e.g. {{type: calculate_psnr, crop_border: '
                                   f'4, test_y_channel: true}}), got {m!r}')
            _registered(METRIC_REGISTRY, m.get('type'), f'val.metrics.{name}')
            check_keys(f'val.metrics.{name}', m, METRIC_KEYS)
            crop = m.get('crop_border', 0)
            if not isinstance(crop, int) or isinstance(crop, bool) or crop < 0:
                raise OptionsError(f'val.metrics.{name}.crop_border must be a non-negative integer (pixels), got '
                                   f'{crop!r}')
            check_booleans(f'val.metrics.{name}', m, ('test_y_channel',))

    logger = opt.get('logger')
    if logger is not None:
        if not isinstance(logger, Mapping):
            raise OptionsError(f'logger must be a mapping, got {logger!r}')
        check_keys('logger', logger, LOGGER_KEYS)
        check_booleans('logger', logger, ('use_tb_logger',))
        if is_train:
            _require('logger', logger, ('print_freq', 'save_checkpoint_freq', 'use_tb_logger'))

    if is_train:
        train = opt.get('train')
        if not isinstance(train, Mapping):
            raise OptionsError('a training option file needs a "train" section')
        if logger is None:
            raise OptionsError('a training option file needs a "logger" section')
        loss_keys = {k for k in train if k.endswith('_opt')}
        check_keys('train', {k: v for k, v in train.items() if k not in loss_keys},
                    TRAIN_KEYS | _declared_keys(model_cls, 'train_option_keys'))
        declared = _declared_keys(model_cls, 'loss_option_keys')
        if declared:  # a model that lists the losses it reads: any other *_opt is a typo that would train without it
            check_keys(f"train (the losses {opt['model_type']} reads)", {k: train[k] for k in loss_keys}, declared)
        for key in sorted(loss_keys):
            if train[key] is not None:
                check_loss_opt(train[key], f'train.{key}')
        if 'total_iter' not in train:
            raise OptionsError('train: missing total_iter')
        check_training_setup(train)
    check_numbers(opt, is_train)


def _number(check, name: str, value, *args) -> None:
    """Run one of :mod:`adasr.utils.checks` on an option, as an :class:`OptionsError` naming it."""
    try:
        check(name, value, *args)
    except ValueError as e:
        hint = (' (YAML reads 2e-4 and 1.0e30 as text: write 2.0e-4, 1.0e+30 or !!float 2e-4)'
                if isinstance(value, str) and check is check_positive else '')
        raise OptionsError(f'{e}{hint}') from None


def _count(name: str, value, minimum: int = 1) -> None:
    """An iteration count or frequency: an integer >= ``minimum``; a whole float is accepted, as BasicSR's own option
    files write ``save_checkpoint_freq: !!float 5e3``."""
    _number(check_int, name, int(value) if is_real(value) and float(value).is_integer() else value, minimum)


def check_numbers(opt: Mapping, is_train: bool) -> None:
    """Scales that agree (top-level ``scale``, ``network_g.upscale``, ``datasets.*.scale``), crops that are a
    multiple of the scale, positive integers for iteration counts, batch sizes and frequencies (``warmup_iter``
    may be -1: none), positive learning rates."""
    scale = opt.get('scale')
    if scale is None:
        raise OptionsError('the option file has no "scale" (the upscaling factor, e.g. scale: 4)')
    _number(check_int, 'scale', scale)
    net_scale = opt['network_g'].get('upscale')
    if net_scale is not None:
        _number(check_int, 'network_g.upscale', net_scale)
        if net_scale != scale:
            raise OptionsError(f'scale: {scale} but network_g.upscale: {net_scale}; they must agree')
    for phase, ds in opt['datasets'].items():
        if ds.get('scale') is not None and ds['scale'] != scale:
            raise OptionsError(f'scale: {scale} but datasets.{phase}.scale: {ds["scale"]!r}; they must agree')
        if phase.split('_')[0] != 'train':
            continue
        for key, minimum in (('gt_size', 1), ('batch_size_per_gpu', 1), ('num_worker_per_gpu', 0),
                             ('dataset_enlarge_ratio', 1)):
            if key in ds:
                _number(check_int, f'datasets.{phase}.{key}', ds[key], minimum)
        if ds['gt_size'] % scale:
            raise OptionsError(f'datasets.{phase}.gt_size: {ds["gt_size"]} is not a multiple of scale: {scale} '
                               '(the LR crop would not be whole pixels)')
    if not is_train:
        return
    train, logger, val = opt['train'], opt['logger'], opt.get('val')
    _count('train.total_iter', train['total_iter'])
    for key, minimum in (('warmup_iter', -1), ('max_nonfinite_steps', 1)):
        if train.get(key) is not None:
            _count(f'train.{key}', train[key], minimum)
    for key in ('print_freq', 'save_checkpoint_freq'):  # (present: check_options required them)
        _count(f'logger.{key}', logger[key])
    if val is not None:
        _count('val.val_freq', val['val_freq'])
    ema = train.get('ema_decay', 0)
    if not is_real(ema) or not 0 <= ema < 1:
        raise OptionsError(f'train.ema_decay must be a number in [0, 1), got {ema!r}')
    for key in ('optim_g', 'optim_d'):
        optim = train.get(key)
        if isinstance(optim, Mapping) and 'lr' in optim:
            _number(check_positive, f'train.{key}.lr', optim['lr'])
    scheduler = train.get('scheduler') or {}
    for key in ('milestones', 'periods'):
        for i, step in enumerate(scheduler.get(key) or ()):
            _count(f'train.scheduler.{key}[{i}]', step)
    periods = scheduler.get('periods')
    if periods:  # BasicSR's cosine schedules have no rate after their periods: the step past them fails in a traceback
        total = train.get('total_iter')
        if is_real(total) and sum(periods) < total:
            raise OptionsError(f'train.scheduler.periods {list(periods)} add up to {sum(periods)} iterations, fewer '
                               f'than train.total_iter {total}: the schedule has no learning rate after them')
        weights = scheduler.get('restart_weights')
        if weights is not None and len(weights) != len(periods):
            raise OptionsError(f'train.scheduler.restart_weights has {len(weights)} entries and periods '
                               f'{len(periods)}: give one weight per period')
    if 'gamma' in scheduler:
        _number(check_positive, 'train.scheduler.gamma', scheduler['gamma'])


class OptionLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that builds ``OrderedDict`` mappings, as BasicSR's ``ordered_yaml()`` does, and keeps the
    standard tags (``!!float 2e-4``, ``!!int``, ``!!str``, ...). Tags that build Python objects
    (``!!python/object/apply:os.system``) have no constructor here and are refused."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of an option file names one key twice (PyYAML would keep the last value without a word)."""


def _ordered_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> OrderedDict:
    seen = {}
    for key_node, _ in node.value:  # the mapping's own keys; a merged anchor's keys may be overridden (YAML 1.1)
        if key_node.tag == 'tag:yaml.org,2002:merge' or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise DuplicateKeyError(None, None, f'key {key!r} appears twice in one mapping (first on line '
                                    f'{seen[key] + 1}); PyYAML would keep the second silently',
                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
    return OrderedDict(loader.construct_pairs(node))


OptionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _ordered_mapping)

Override = Union[Tuple[List[str], Any], Callable[[dict], dict]]  # (keys, value), or an edit of the whole file


def parse_overrides(entries: Sequence[str]) -> List[Override]:
    """Parse BasicSR's ``--force_yml`` entries (``train:ema_decay=0.999``, ``train:total_iter=4``) safely.

    Values are read as YAML scalars or lists with :class:`OptionLoader` (BasicSR builds Python source from the
    entry and ``exec``s it); ``none`` is ``None`` as in BasicSR.

    Raises:
        OptionsError: an entry without ``=`` or a key, a key set twice, or a value that is not plain YAML.
    """
    overrides, seen = [], {}
    for entry in entries:
        keys, sep, text = entry.partition('=')
        keys = [k.strip() for k in keys.split(':')]
        if not sep or not all(keys):
            raise OptionsError(f'--force_yml {entry!r}: expected section:key=value (e.g. train:total_iter=4)')
        if tuple(keys) in seen:  # as a key given twice in one mapping of a file
            raise OptionsError(f'--force_yml sets {":".join(keys)} twice ({seen[tuple(keys)]!r} and {entry!r})')
        seen[tuple(keys)] = entry
        text = text.strip()
        try:
            value = None if text.lower() == 'none' else yaml.load(text, Loader=OptionLoader)
        except yaml.YAMLError as e:
            raise OptionsError(f'--force_yml {entry!r}: the value is not plain YAML data: {e}') from None
        overrides.append((keys, value))
    return overrides


def select_test_sets(names: Sequence[str]) -> Callable[[dict], dict]:
    """An override (for :func:`apply_overrides`) that keeps only the ``datasets`` entries whose ``name`` is in
    ``names`` (``adasr-test --sets Set5 Urban100``), so a test option file listing every benchmark set runs on the
    sets a user has.

    Raises (when applied):
        OptionsError: a name matches no dataset of the file (the message lists the names it has).
    """
    wanted = list(dict.fromkeys(names))

    def select(opt: dict) -> dict:
        datasets = opt.get('datasets')
        if not isinstance(datasets, Mapping):
            raise OptionsError('--sets: the option file has no datasets section')
        have = {key: (ds or {}).get('name', key) for key, ds in datasets.items()}
        missing = [n for n in wanted if n not in have.values()]
        if missing:
            raise OptionsError(f'--sets: no dataset named {", ".join(missing)} in the option file (it has: '
                               f'{", ".join(str(v) for v in have.values())})')
        for key, name in have.items():
            if name not in wanted:
                del datasets[key]
        return opt

    return select


def apply_overrides(opt: dict, overrides: Sequence[Override]) -> dict:
    """Apply each override of :func:`parse_overrides` or :func:`select_test_sets` to ``opt`` in order: a
    ``(keys, value)`` pair sets one option (its sections must exist), a callable edits the whole mapping."""
    for override in overrides:
        if callable(override):
            opt = override(opt)
            continue
        keys, value = override
        node = opt
        for i, key in enumerate(keys[:-1]):
            node = node.get(key) if isinstance(node, Mapping) else None
            if not isinstance(node, Mapping):
                raise OptionsError(f'--force_yml {":".join(keys)}: the option file has no section '
                                   f'{":".join(keys[:i + 1])}')
        node[keys[-1]] = value
    return opt


def option_loader(overrides: Sequence[Override] = ()) -> type:
    """:class:`OptionLoader`, or a subclass that applies ``overrides`` to what it reads (for BasicSR's own
    ``parse_options``, which reads the option file a second time)."""
    if not overrides:
        return OptionLoader

    class OverridingLoader(OptionLoader):
        def get_single_data(self):
            return apply_overrides(super().get_single_data(), overrides)

    return OverridingLoader


def load_yaml(path: str, overrides: Sequence[Override] = ()) -> dict:
    """Read an option file with :class:`OptionLoader` (then apply ``overrides``); errors name the file and line.

    Raises:
        OptionsError: the file is missing or unreadable, is not UTF-8 text or not YAML, holds a Python tag or a key
            twice in one mapping, or is not a mapping.
    """
    if osp.isdir(path):
        raise OptionsError(f'option file {path} is a folder')
    if not osp.isfile(path):
        raise OptionsError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=OptionLoader)
    except UnicodeDecodeError as e:
        raise OptionsError(f'{path} is not a text file in UTF-8 (byte {e.start}: {e.reason}); option files are YAML '
                           'text') from None
    except OSError as e:
        raise OptionsError(f'option file {path} cannot be read: {e.strerror or e}') from None
    except yaml.constructor.ConstructorError as e:
        line = f', line {e.problem_mark.line + 1}' if e.problem_mark else ''
        why = '' if isinstance(e, DuplicateKeyError) else ('; option files are plain data and tags that build '
                                                           'Python objects (!!python/...) are refused')
        raise OptionsError(f'{path}{line}: {e.problem}{why}') from None
    except yaml.YAMLError as e:
        raise OptionsError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(opt, Mapping):
        raise OptionsError(f'{path} does not hold a mapping of options')
    return apply_overrides(opt, overrides)
