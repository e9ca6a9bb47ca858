"""Sparse attention products at given key indices: the two operations of PFT's sparse layers.

``sparse_qk(q, k, index)``: ``out[g, i, t] = sum_e q[g, i, e] * k[g, index[g, i, t], e]``  (scores at K keys)
``sparse_av(attn, v, index)``: ``out[g, i, c] = sum_t attn[g, i, t] * v[g, index[g, i, t], c]``  (aggregation)

Leading dimensions (windows x heads) are flattened into one batch dimension ``g``. Both operations have exact
gradients: the gradient with respect to the gathered operand is a scatter-add (the PFT authors' CUDA kernel drops
updates there, see docs/pft.md). Each is the other's backward, plus one "transposed scatter"
``scatter_outer(w, x, index)``: ``out[g, j] = sum_{i, t: index[g, i, t] = j} w[g, i, t] * x[g, i]``.

Two exact PyTorch implementations are kept, and one is picked per call from the shapes:

* ``gather``: gather the K rows of k / v per query, then a batched multiply. Work and memory ~ n*K*d.
* ``dense``: the full (n, m) product with BLAS, then gather (scores) or a scatter into an (n, m) map and a product
  (aggregation). Work ~ n*m*d, memory ~ n*m, but at BLAS speed: faster on the CPU for large K.

Neither ever holds more than ``chunk`` batch entries at once (the chunk is chosen from a memory budget, see
:func:`adasr.ops.memory_budget_bytes`), so an (n, m) map never exists for the whole batch.
"""
import os
from typing import Callable, Literal, Optional

import torch
from torch.autograd.function import once_differentiable

Method = Literal['auto', 'gather', 'dense']

_DEFAULT_BUDGET_MB = 256


def memory_budget_bytes() -> int:
    """Working-memory budget for one chunk of a sparse or dense attention step (env ``ADASR_ATTN_MEMORY_MB``)."""
    raw = os.environ.get('ADASR_ATTN_MEMORY_MB', str(_DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f'ADASR_ATTN_MEMORY_MB must be a number of megabytes, got {raw!r}') from None
    if mb <= 0:
        raise ValueError(f'ADASR_ATTN_MEMORY_MB must be positive, got {raw!r}')
    return int(mb * 2**20)


def chunk_count(total: int, bytes_per_item: int, budget: Optional[int] = None) -> int:
    """How many of ``total`` items fit in the budget at once (at least 1)."""
    budget = memory_budget_bytes() if budget is None else budget
    return max(1, min(total, budget // max(1, bytes_per_item)))


def pick_method(op: str, m: int, k: int, d: int, device: torch.device) -> str:
    """``dense`` or ``gather`` for one sparse product over k of m keys with head dim d (``op``: ``qk`` or ``av``).

    On the CPU the BLAS product over all m keys wins once k*d is a sizeable share of m (measured on 2 cores for
    m = 1024, d = 13 and 40: the gather path is faster up to k*d ~ 0.7 m for scores and ~ 1.3 m for aggregation;
    both paths are exact). Elsewhere (CUDA without Triton) the dense path is used from k >= m/8.
    """
    if device.type == 'cpu':
        limit = 0.7 * m if op == 'qk' else 1.3 * m
        return 'gather' if k * d <= limit else 'dense'
    return 'gather' if 8 * k < m else 'dense'


def _chunked(fn: Callable, n_out_rows: int, g: int, per_item: int, *tensors):
    step = chunk_count(g, per_item)
    if step >= g:
        return fn(*tensors)
    return torch.cat([fn(*(t[s:s + step] for t in tensors)) for s in range(0, g, step)], 0)


def _flat_index(index: torch.Tensor, m: int) -> torch.Tensor:
    """(G, n, K) per-batch row indices -> flat rows of a (G*m, d) matrix."""
    offs = torch.arange(index.shape[0], device=index.device, dtype=torch.long).mul_(m)
    return (index.long() + offs[:, None, None]).reshape(-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, m, d), index (G, n, K) -> (G, n, K, d)."""
    g, m, d = x.shape
    return x.reshape(g * m, d).index_select(0, _flat_index(index, m)).view(*index.shape, d)


def _scatter_map(w: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """w (G, n, K) at index -> dense (G, n, m) map (duplicates add up)."""
    out = torch.zeros(*w.shape[:-1], m, dtype=w.dtype, device=w.device)
    return out.scatter_add_(-1, index.long(), w)


# ---- the three primitives, each in its two forms (no autograd here) --------------------------------------------

def _qk_gather(q, k, index):
    return torch.einsum('gnkd,gnd->gnk', _gather_rows(k, index), q)


def _qk_dense(q, k, index):
    return torch.gather(torch.matmul(q, k.transpose(-2, -1)), -1, index.long())


def _av_gather(a, v, index):
    return torch.matmul(a.unsqueeze(-2), _gather_rows(v, index)).squeeze(-2)


def _av_dense(a, v, index):
    return torch.matmul(_scatter_map(a, index, v.shape[-2]), v)


def _outer_gather(w, x, index, m):
    g, n, kk = w.shape
    d = x.shape[-1]
    contrib = (w.unsqueeze(-1) * x.unsqueeze(-2)).reshape(g * n * kk, d)
    out = torch.zeros(g * m, d, dtype=x.dtype, device=x.device)
    return out.index_add_(0, _flat_index(index, m), contrib).view(g, m, d)


def _outer_dense(w, x, index, m):
    return torch.matmul(_scatter_map(w, index, m).transpose(-2, -1), x)


def _per_item_bytes(n, m, k, d, elem, method):
    return elem * (n * k * d + n * k if method == 'gather' else n * m + n * max(k, d))


def qk_forward(q, k, index, method: Method = 'auto'):
    g, n, d = q.shape
    m, kk = k.shape[-2], index.shape[-1]
    method = pick_method('qk', m, kk, d, q.device) if method == 'auto' else method
    fn = _qk_gather if method == 'gather' else _qk_dense
    return _chunked(fn, n, g, _per_item_bytes(n, m, kk, d, q.element_size(), method), q, k, index)


def av_forward(a, v, index, method: Method = 'auto'):
    g, n, kk = a.shape
    m, d = v.shape[-2:]
    method = pick_method('av', m, kk, d, v.device) if method == 'auto' else method
    fn = _av_gather if method == 'gather' else _av_dense
    return _chunked(fn, n, g, _per_item_bytes(n, m, kk, d, v.element_size(), method), a, v, index)


def scatter_outer(w, x, index, m: int, method: Method = 'auto'):
    """``out[g, j] = sum_{i,t: index[g,i,t]=j} w[g,i,t] * x[g,i]`` -> (G, m, d)."""
    g, n, kk = w.shape
    d = x.shape[-1]
    method = pick_method('av', m, kk, d, x.device) if method == 'auto' else method
    if method == 'gather':
        fn = lambda w_, x_, i_: _outer_gather(w_, x_, i_, m)  # noqa: E731
    else:
        fn = lambda w_, x_, i_: _outer_dense(w_, x_, i_, m)  # noqa: E731
    return _chunked(fn, m, g, _per_item_bytes(n, m, kk, d, x.element_size(), method), w, x, index)


# ---- autograd --------------------------------------------------------------------------------------------------

class SparseQK(torch.autograd.Function):
    """Scores at given key indices; saves only q, k and the index (no gathered copy) for backward."""

    @staticmethod
    def forward(ctx, q, k, index, method):
        ctx.save_for_backward(q, k, index)
        ctx.method = method
        return qk_forward(q, k, index, method)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, index = ctx.saved_tensors
        grad = grad.to(q.dtype)
        gq = av_forward(grad, k, index, ctx.method) if ctx.needs_input_grad[0] else None
        gk = scatter_outer(grad, q, index, k.shape[-2], ctx.method) if ctx.needs_input_grad[1] else None
        return gq, gk, None, None


class SparseAV(torch.autograd.Function):
    """Aggregation over given key indices; saves only attn, v and the index for backward."""

    @staticmethod
    def forward(ctx, a, v, index, method):
        ctx.save_for_backward(a, v, index)
        ctx.method = method
        return av_forward(a, v, index, method)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, v, index = ctx.saved_tensors
        grad = grad.to(v.dtype)
        ga = qk_forward(grad, v, index, ctx.method) if ctx.needs_input_grad[0] else None
        gv = scatter_outer(a, grad, index, v.shape[-2], ctx.method) if ctx.needs_input_grad[1] else None
        return ga, gv, None, None


def _flatten3(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f'{name} must have at least 3 dimensions (..., rows, cols), got shape {tuple(x.shape)}')
    return x.reshape(-1, *x.shape[-2:])


def _check(index: torch.Tensor, lead, n: int, m: int, op: str) -> None:
    if index.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f'{op}: index must be an integer tensor (int64/int32/int16), got {index.dtype}')
    if tuple(index.shape[:-1]) != tuple(lead) + (n,):
        raise ValueError(f'{op}: index shape {tuple(index.shape)} does not match (..., n={n}, K) with leading '
                         f'dims {tuple(lead)}')
    if m == 0:
        raise ValueError(f'{op}: no keys to index')


def torch_sparse_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, method: Method = 'auto') -> torch.Tensor:
    """PyTorch :func:`adasr.ops.sparse_qk`. q (..., n, d), k (..., m, d), index (..., n, K) -> (..., n, K)."""
    lead = q.shape[:-2]
    _check(index, lead, q.shape[-2], k.shape[-2], 'sparse_qk')
    q3, k3, i3 = _flatten3(q, 'q'), _flatten3(k, 'k'), _flatten3(index, 'index')
    dtype = torch.promote_types(q.dtype, k.dtype)
    out = SparseQK.apply(q3.to(dtype), k3.to(dtype), i3, method)
    return out.view(*lead, *out.shape[-2:])


def torch_sparse_av(attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor, method: Method = 'auto') -> torch.Tensor:
    """PyTorch :func:`adasr.ops.sparse_av`. attn (..., n, K), v (..., m, d), index (..., n, K) -> (..., n, d)."""
    lead = attn.shape[:-2]
    _check(index, lead, attn.shape[-2], v.shape[-2], 'sparse_av')
    if index.shape != attn.shape:
        raise ValueError(f'sparse_av: attn {tuple(attn.shape)} and index {tuple(index.shape)} differ')
    a3, v3, i3 = _flatten3(attn, 'attn'), _flatten3(v, 'v'), _flatten3(index, 'index')
    dtype = torch.promote_types(attn.dtype, v.dtype)
    out = SparseAV.apply(a3.to(dtype), v3.to(dtype), i3, method)
    return out.view(*lead, *out.shape[-2:])


def dense_sparse_qk(q, k, index):
    """Reference by definition (full product, then gather); for tests."""
    return torch.gather(q @ k.transpose(-2, -1), -1, index.long())


def dense_sparse_av(attn, v, index):
    """Reference by definition (scatter into a full map, then product); for tests."""
    full = torch.zeros(*attn.shape[:-1], v.shape[-2], dtype=attn.dtype, device=attn.device)
    return full.scatter_add(-1, index.long(), attn) @ v


__all__ = ['torch_sparse_qk', 'torch_sparse_av', 'dense_sparse_qk', 'dense_sparse_av', 'memory_budget_bytes',
           'chunk_count', 'pick_method']
