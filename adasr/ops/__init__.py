"""Sparse attention operations (PFT's SMM_QmK / SMM_AmV) with a run-time backend choice.

* :func:`sparse_qk` ``(q (..., n, d), k (..., m, d), index (..., n, K)) -> (..., n, K)``: scores at given keys.
* :func:`sparse_av` ``(attn (..., n, K), v (..., m, d), index (..., n, K)) -> (..., n, d)``: aggregation.

Backends: ``'torch'`` (pure PyTorch, any device and dtype, exact scatter-add gradients, memory bounded by chunks),
``'triton'`` (Triton kernels for CUDA tensors, fp32/fp16/bf16, fp32 accumulation; imported only when a CUDA tensor
reaches it) and ``'auto'`` (Triton for CUDA tensors when ``triton`` imports, PyTorch otherwise). Choose with
:func:`set_backend`, the :func:`backend` context manager, or the environment variable ``ADASR_SPARSE_BACKEND``.
Nothing is compiled at install or import time.
"""
import contextlib
import os
from typing import Iterator, Optional

import torch

from adasr.ops.sparse_attention import (
    chunk_count,
    dense_sparse_av,
    dense_sparse_qk,
    memory_budget_bytes,
    torch_sparse_av,
    torch_sparse_qk,
)

BACKENDS = ('auto', 'torch', 'triton')
_backend: Optional[str] = None  # None: read the environment variable
_triton_ok: Optional[bool] = None


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f'{source}={name!r} is not a sparse attention backend; choose one of {list(BACKENDS)}')
    return name


def get_backend() -> str:
    """The backend in force: set by :func:`set_backend`, else ``ADASR_SPARSE_BACKEND``, else ``'auto'``."""
    if _backend is not None:
        return _backend
    return _validate(os.environ.get('ADASR_SPARSE_BACKEND', 'auto'), 'ADASR_SPARSE_BACKEND')


def set_backend(name: Optional[str]) -> None:
    """Set the backend for this process (``None`` returns to the environment variable / ``'auto'``)."""
    global _backend
    _backend = None if name is None else _validate(name, 'backend')


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with adasr.ops.backend('torch'): ...`` runs the block with that backend."""
    global _backend
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = old


def triton_available() -> bool:
    """True when the ``triton`` package imports (checked once, lazily)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _triton_ok = False
    return _triton_ok


def resolve_backend(device: torch.device) -> str:
    """``'torch'`` or ``'triton'`` for tensors on ``device``; raises if Triton is forced where it cannot run."""
    name = get_backend()
    if name == 'torch':
        return 'torch'
    if name == 'auto':
        return 'triton' if device.type == 'cuda' and triton_available() else 'torch'
    if not triton_available():
        raise RuntimeError('sparse attention backend "triton" was requested but triton cannot be imported')
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError(f'sparse attention backend "triton" needs CUDA tensors (got {device.type}); set '
                           'TRITON_INTERPRET=1 before importing triton to run the kernels in its CPU interpreter')
    return 'triton'


def sparse_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[..., i, t] = q[..., i, :] . k[..., index[..., i, t], :]``; see the module docstring."""
    if resolve_backend(q.device) == 'triton':
        from adasr.ops import triton_sparse
        return triton_sparse.sparse_qk(q, k, index)
    return torch_sparse_qk(q, k, index)


def sparse_av(attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[..., i, :] = sum_t attn[..., i, t] * v[..., index[..., i, t], :]``; see the module docstring."""
    if resolve_backend(v.device) == 'triton':
        from adasr.ops import triton_sparse
        return triton_sparse.sparse_av(attn, v, index)
    return torch_sparse_av(attn, v, index)


__all__ = ['sparse_qk', 'sparse_av', 'get_backend', 'set_backend', 'backend', 'resolve_backend', 'triton_available',
           'torch_sparse_qk', 'torch_sparse_av', 'dense_sparse_qk', 'dense_sparse_av', 'memory_budget_bytes',
           'chunk_count', 'BACKENDS']
