"""Sparse attention operations (PFT's SMM_QmK / SMM_AmV) with a run-time backend choice.

* :func:`sparse_qk` ``(q (..., n, d), k (..., m, d), index (..., n, K), bias=None) -> (..., n, K)``: scores at given
  keys (plus an additive bias read at the keys).
* :func:`sparse_av` ``(attn (..., n, K), v (..., m, d), index (..., n, K)) -> (..., n, d)``: aggregation.

Backends: ``'torch'`` (pure PyTorch, any device and dtype, exact scatter-add gradients, memory bounded by chunks),
``'triton'`` (Triton kernels for CUDA tensors, fp32/fp16/bf16, fp32 accumulation; imported only when a CUDA tensor
reaches it) and ``'auto'`` (Triton for CUDA tensors when ``triton`` imports, PyTorch otherwise). Choose with
:func:`set_backend`, the :func:`backend` context manager, or the environment variable ``ADASR_SPARSE_BACKEND``.
Nothing is compiled at install or import time.

Also public: the exact CPU forms (:func:`sampled_qk`, :func:`embedding_bag_av`), the top-k selection
(:func:`topk_positions`), the reference definitions (:func:`dense_sparse_qk`, :func:`dense_sparse_av`), the compiled
CPU kernels of PFT's inference attention layers (:mod:`adasr.ops.pft_kernels`, numba, option ``pft_kernel``), every
``ADASR_*`` setting (:mod:`adasr.ops.config`) and the CPU worker pool (:mod:`adasr.ops.scheduling`).
"""
import contextlib
import os
from typing import Iterator, Optional

import torch

from adasr.ops import config, pft_kernels, scheduling
from adasr.ops.config import BACKENDS, get_option, memory_budget_bytes, set_option
from adasr.ops.scheduling import parallel_for
from adasr.ops.sparse_attention import (
    chunk_count,
    dense_sparse_av,
    dense_sparse_qk,
    embedding_bag_av,
    gather_bias,
    pick_method,
    sampled_qk,
    topk,
    topk_positions,
    torch_sparse_av,
    torch_sparse_qk,
)


def get_backend() -> str:
    """The backend in force: set by :func:`set_backend`, else ``ADASR_SPARSE_BACKEND``, else ``'auto'``."""
    return get_option('sparse_backend')


def set_backend(name: Optional[str]) -> None:
    """Set the backend for this process (``None`` returns to the environment variable / ``'auto'``)."""
    set_option('sparse_backend', name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with adasr.ops.backend('torch'): ...`` runs the block with that backend."""
    with config.options(sparse_backend=name):
        yield


def triton_available() -> bool:
    """True when the ``triton`` package imports (checked once, lazily)."""
    from adasr.ops.codegen import importable

    return importable('triton')


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


def sparse_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[..., i, t] = q[..., i, :] . k[..., index[..., i, t], :] (+ bias[..., i, index[..., i, t]])``.

    Args:
        q: (..., n, d) queries.
        k: (..., m, d) keys.
        index: (..., n, K) integer key positions (int16 / int32 / int64).
        bias: optional additive term broadcastable to (..., n, m) (e.g. a relative-position bias), read only at the
            index (never expanded in memory); on the CPU without autograd it is added in the sampled product's pass.

    Returns:
        (..., n, K) scores; differentiable in q, k (exact scatter-add gradients) and bias.
    """
    if resolve_backend(q.device) == 'triton':
        from adasr.ops import triton_sparse
        out = triton_sparse.sparse_qk(q, k, index)
        return out if bias is None else out + gather_bias(bias, q.shape[:-2], q.shape[-2], k.shape[-2], index)
    return torch_sparse_qk(q, k, index, bias=bias)


def sparse_av(attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[..., i, :] = sum_t attn[..., i, t] * v[..., index[..., i, t], :]``: attn (..., n, K), v (..., m, d),
    index (..., n, K) -> (..., n, d); differentiable in attn and v."""
    if resolve_backend(v.device) == 'triton':
        from adasr.ops import triton_sparse
        return triton_sparse.sparse_av(attn, v, index)
    return torch_sparse_av(attn, v, index)


__all__ = ['sparse_qk', 'sparse_av', 'get_backend', 'set_backend', 'backend', 'resolve_backend', 'triton_available',
           'torch_sparse_qk', 'torch_sparse_av', 'dense_sparse_qk', 'dense_sparse_av', 'sampled_qk',
           'embedding_bag_av', 'topk', 'topk_positions', 'pick_method', 'memory_budget_bytes', 'chunk_count',
           'parallel_for', 'config', 'scheduling', 'pft_kernels', 'BACKENDS']
