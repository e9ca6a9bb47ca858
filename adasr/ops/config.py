"""Every run-time setting of :mod:`adasr.ops`, read in this one place.

Each setting has an environment variable and a default. A value set from Python (:func:`set_option` or the
:func:`options` context manager) wins over the environment; the environment is read at call time, so a variable
changed while the process runs takes effect on the next call. Invalid values raise ``ValueError`` naming the
variable.

=====================  ========================  ==========  =========================================================
option                 environment variable      default     meaning
=====================  ========================  ==========  =========================================================
``sparse_backend``     ``ADASR_SPARSE_BACKEND``  ``'auto'``  backend of the sparse products: ``'auto'`` (Triton for CUDA
                                                             tensors when it imports, else PyTorch), ``'torch'``,
                                                             ``'triton'``
``memory_mb``          ``ADASR_ATTN_MEMORY_MB``  256         working-memory budget of one attention step, in MB
                                                             (:func:`memory_budget_bytes`)
``tile_kb``            ``ADASR_ATTN_BLOCK_KB``   4096        float32 work per tile of the inference attention, in KB
                                                             (:func:`tile_bytes`; at most the memory budget)
``cache_kb``           (none)                    1024        working set of one cache-resident row block of the CPU
                                                             score products, in KB (:func:`cache_bytes`)
``threads``            ``ADASR_ATTN_THREADS``    ``None``    worker threads of :func:`adasr.ops.scheduling.
                                                             parallel_for`: ``None`` = ``torch.get_num_threads()``,
                                                             ``0`` = run tiles sequentially in the calling thread
``sampled_limit``      ``ADASR_SAMPLED_LIMIT``   1.0         CPU scores use the sampled product while
                                                             ``K * d <= sampled_limit * m``
``torch_topk``         ``ADASR_TORCH_TOPK``      ``False``   ``True`` (``1``): top-k by ``torch.topk`` on the CPU too,
                                                             instead of ``numpy.argpartition``
``conv3x3``            ``ADASR_CONV3X3``         ``'auto'``  engine of :func:`adasr.ops.winograd.conv3x3` (callers that
                                                             opt in): ``'direct'`` (``F.conv2d``), ``'winograd'`` (the
                                                             default variant) or a variant (``'f2'``, ``'f3'``,
                                                             ``'f4'``, ``'f4-lavin'``); ``'auto'``: each caller's
                                                             choice within its reference tolerances (``'direct'`` in
                                                             :func:`~adasr.ops.winograd.conv3x3`; AdaFormer: its
                                                             ``conv3x3``); CPU float32 inference only
``pft_kernel``         ``ADASR_PFT_KERNEL``      ``'auto'``  PFT's inference attention layers on the CPU in float32:
                                                             ``'numba'`` (compiled layer kernels,
                                                             :mod:`adasr.ops.pft_kernels`), ``'torch'`` (PyTorch /
                                                             NumPy ops), ``'auto'`` (numba when it imports)
``numba_wide``         ``ADASR_NUMBA_WIDE``      ``True``    on CPUs with AVX-512: numba vectorises adasr's loops in
                                                             512-bit registers where LLVM's tuning for the CPU prefers
                                                             256 (:func:`adasr.ops.codegen.configure_numba`; read once,
                                                             before the first compilation of the process)
=====================  ========================  ==========  =========================================================
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional

import torch

BACKENDS = ('auto', 'torch', 'triton')
CONV3X3_METHODS = ('auto', 'direct', 'winograd', 'f2', 'f3', 'f4', 'f4-lavin')  # VARIANTS + three names


def _positive(source: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f'{source} must be a number, got {raw!r}') from None
    if not value > 0:
        raise ValueError(f'{source} must be positive, got {raw!r}')
    return value


def _threads(source: str, raw: Any) -> Optional[int]:
    if raw is None:
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f'{source} must be a non-negative integer, got {raw!r}') from None
    if value < 0 or str(value) != str(raw).strip():
        raise ValueError(f'{source} must be a non-negative integer, got {raw!r}')
    return value


def _backend(source: str, raw: Any) -> str:
    if raw not in BACKENDS:
        raise ValueError(f'{source}={raw!r} is not a sparse attention backend; choose one of {list(BACKENDS)}')
    return raw


def _conv3x3(source: str, raw: Any) -> str:
    if raw not in CONV3X3_METHODS:
        raise ValueError(f'{source}={raw!r} is not a 3x3 convolution method; choose one of {list(CONV3X3_METHODS)}')
    return raw


PFT_KERNELS = ('auto', 'numba', 'torch')


def _pft_kernel(source: str, raw: Any) -> str:
    if raw not in PFT_KERNELS:
        raise ValueError(f'{source}={raw!r} is not a PFT kernel choice; choose one of {list(PFT_KERNELS)}')
    return raw


def _flag(source: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if str(raw) in ('0', '1', ''):
        return str(raw) == '1'
    raise ValueError(f'{source} must be 0 or 1, got {raw!r}')


@dataclass(frozen=True)
class _Option:
    env: Optional[str]
    default: Any
    parse: Callable[[str, Any], Any]


_OPTIONS: Dict[str, _Option] = {
    'sparse_backend': _Option('ADASR_SPARSE_BACKEND', 'auto', _backend),
    'memory_mb': _Option('ADASR_ATTN_MEMORY_MB', 256.0, _positive),
    'tile_kb': _Option('ADASR_ATTN_BLOCK_KB', 4096.0, _positive),
    'cache_kb': _Option(None, 1024.0, _positive),
    'threads': _Option('ADASR_ATTN_THREADS', None, _threads),
    'sampled_limit': _Option('ADASR_SAMPLED_LIMIT', 1.0, _positive),
    'torch_topk': _Option('ADASR_TORCH_TOPK', False, _flag),
    'conv3x3': _Option('ADASR_CONV3X3', 'auto', _conv3x3),
    'pft_kernel': _Option('ADASR_PFT_KERNEL', 'auto', _pft_kernel),
    'numba_wide': _Option('ADASR_NUMBA_WIDE', True, _flag),
}
_overrides: Dict[str, Any] = {}


def _option(name: str) -> _Option:
    if name not in _OPTIONS:
        raise KeyError(f'{name!r} is not an adasr.ops option; choose one of {sorted(_OPTIONS)}')
    return _OPTIONS[name]


def get_option(name: str) -> Any:
    """The value in force: set from Python, else the environment variable (read now), else the default."""
    opt = _option(name)
    if name in _overrides:
        return _overrides[name]
    raw = os.environ.get(opt.env) if opt.env else None
    if raw is None or raw == '':
        return opt.default
    return opt.parse(opt.env, raw)


def check_environment() -> None:
    """Read every option's environment variable now, so that a bad value stops a command before any work (the ops
    read them only when first used, which may be after a model is built or an image is done).

    Raises:
        ValueError: naming the variable, its value and what it takes.
    """
    for opt in _OPTIONS.values():
        raw = os.environ.get(opt.env) if opt.env else None
        if raw:
            opt.parse(opt.env, raw)


def set_option(name: str, value: Any) -> None:
    """Set an option for this process (validated); ``None`` returns it to its environment variable / default."""
    opt = _option(name)
    if value is None:
        _overrides.pop(name, None)
    else:
        _overrides[name] = opt.parse(name, value)


@contextlib.contextmanager
def options(**values: Any) -> Iterator[None]:
    """``with adasr.ops.config.options(threads=0, memory_mb=64): ...`` sets options for the block, then restores
    them (a value of ``None`` means "as the environment says")."""
    old = {name: _overrides.get(name) for name in values}
    for name, value in values.items():
        _option(name)
    try:
        for name, value in values.items():
            if value is None:
                _overrides.pop(name, None)
            else:
                set_option(name, value)
        yield
    finally:
        for name, value in old.items():
            if value is None:
                _overrides.pop(name, None)
            else:
                _overrides[name] = value


# ---- typed accessors used by the ops ---------------------------------------------------------------------------

def memory_budget_bytes() -> int:
    """Working-memory budget of one attention step in bytes (option ``memory_mb``, ``ADASR_ATTN_MEMORY_MB``)."""
    return int(get_option('memory_mb') * 2**20)


def tile_bytes() -> int:
    """Bytes of float32 work per tile of the inference attention (option ``tile_kb``), at most the memory budget."""
    return max(1, min(int(get_option('tile_kb') * 1024), memory_budget_bytes()))


def cache_bytes() -> int:
    """Bytes of one cache-resident row block of the CPU score products (option ``cache_kb``), at most the budget."""
    return max(1, min(int(get_option('cache_kb') * 1024), memory_budget_bytes()))


def worker_threads() -> int:
    """Worker threads of the tile pool: option ``threads`` (0 = sequential), else ``torch.get_num_threads()``."""
    threads = get_option('threads')
    return torch.get_num_threads() if threads is None else threads


__all__ = ['BACKENDS', 'CONV3X3_METHODS', 'PFT_KERNELS', 'get_option', 'set_option', 'options', 'memory_budget_bytes',
           'tile_bytes', 'cache_bytes', 'worker_threads']
