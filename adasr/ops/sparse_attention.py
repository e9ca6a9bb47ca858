"""Sparse attention products at given key indices: the two operations of PFT's sparse layers.

``sparse_qk(q, k, index)``: ``out[g, i, t] = sum_e q[g, i, e] * k[g, index[g, i, t], e]``  (scores at K keys)
``sparse_av(attn, v, index)``: ``out[g, i, c] = sum_t attn[g, i, t] * v[g, index[g, i, t], c]``  (aggregation)

Leading dimensions (windows x heads) are flattened into one batch dimension ``g``. Both operations have exact
gradients: the gradient with respect to the gathered operand is a scatter-add (the PFT authors' CUDA kernel drops
updates there, see docs/pft.md). Each is the other's backward, plus one "transposed scatter"
``scatter_outer(w, x, index)``: ``out[g, j] = sum_{i, t: index[g, i, t] = j} w[g, i, t] * x[g, i]``.

Exact PyTorch implementations, one picked per call from the shapes, device and dtype (:func:`pick_method`):

* scores: ``sampled`` (the CSR sampled dense-dense product, ``torch.sparse.sampled_addmm``: one d-long dot product
  per kept entry, work ~ n*K*d) for small K; ``dense`` (BLAS product of a block of queries with all keys, kept in
  cache, then a gather of the K entries per row: work ~ n*m*d at BLAS speed + n*K) when K*d is large relative to m;
  ``gather`` (gather K key rows per query, then a batched product) kept for other devices.
* aggregation: ``ebag`` (``embedding_bag`` in sum mode with per-sample weights: a weighted sum of K value rows per
  query, FBGEMM-vectorised on the CPU, work ~ n*K*d, no n x m map) on the CPU; ``dense`` (scatter into an n x m map,
  then BLAS) and ``gather`` kept for other devices.
* top-k selection (:func:`topk`): ``numpy.argpartition`` on the CPU (x86-simd-sort on AVX-512 / AVX2),
  ``torch.topk`` elsewhere.

Work is done in blocks of rows sized to stay in cache (:func:`adasr.ops.config.cache_bytes`), never more than the
memory budget (:func:`adasr.ops.config.memory_budget_bytes`) at once, so an (n, m) map never exists for the whole batch.
"""
import warnings
from typing import Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from adasr.ops.config import cache_bytes, get_option, memory_budget_bytes, worker_threads
from adasr.ops.scheduling import parallel_for, parallel_map

Method = Literal['auto', 'gather', 'dense', 'sampled', 'ebag']


def chunk_count(total: int, bytes_per_item: int, budget: Optional[int] = None) -> int:
    """How many of ``total`` items fit in the budget (default :func:`adasr.ops.config.memory_budget_bytes`) at once
    (at least 1)."""
    budget = memory_budget_bytes() if budget is None else budget
    return max(1, min(total, budget // max(1, bytes_per_item)))


def _sampled_ok(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def pick_method(op: str, m: int, k: int, d: int, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The exact formulation for one sparse product over k of m keys with head dim d (``op``: ``qk`` or ``av``).

    CPU: scores use ``sampled`` while k*d <= m (option ``sampled_limit`` scales m) and the cache-blocked ``dense``
    product + gather above; aggregation always uses ``ebag`` (docs/pft.md has the measurements). Elsewhere (CUDA
    without Triton) ``gather`` for k < m/8, else ``dense``.
    """
    if device.type == 'cpu':
        if op == 'av':
            return 'ebag'
        return 'sampled' if k * d <= get_option('sampled_limit') * m and _sampled_ok(dtype) else 'dense'
    return 'gather' if 8 * k < m else 'dense'


# ---- helpers ---------------------------------------------------------------------------------------------------

def _long(index: torch.Tensor) -> torch.Tensor:
    return index if index.dtype == torch.int64 else index.long()


def _flat_index(index: torch.Tensor, m: int) -> torch.Tensor:
    """(G, n, K) per-batch row indices -> flat rows of a (G*m, d) matrix (int32 when it fits, else int64)."""
    g = index.shape[0]
    dtype = torch.int32 if g * m < 2**31 and index.dtype != torch.int64 else torch.int64
    offs = torch.arange(g, device=index.device, dtype=dtype).mul_(m).view(g, 1, 1)
    return torch.add(index, offs) if index.dtype != torch.int64 else index + offs.long()


def _row_blocks(g: int, n: int, m: int, elem: int):
    """Yield (group slice, row slice) blocks so that one (groups, rows, m) block holds about cache_bytes()."""
    target = cache_bytes()
    per_group = n * m * elem
    if per_group <= target:
        step = max(1, target // per_group)
        for g0 in range(0, g, step):
            yield slice(g0, min(g, g0 + step)), slice(0, n)
    else:
        rows = max(1, target // (m * elem))
        for g0 in range(g):
            for r0 in range(0, n, rows):
                yield slice(g0, g0 + 1), slice(r0, min(n, r0 + rows))


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on ``device`` here, or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except TypeError:  # torch < 2.4: no device argument
        if device.type == 'cpu' and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device.type == 'cuda' and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (G, m, d), index (G, n, K) -> (G, n, K, d)."""
    g, m, d = x.shape
    return x.reshape(g * m, d).index_select(0, _long(_flat_index(index, m)).reshape(-1)).view(*index.shape, d)


def _scatter_map(w: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """w (G, n, K) at index -> dense (G, n, m) map (duplicates add up)."""
    out = torch.zeros(*w.shape[:-1], m, dtype=w.dtype, device=w.device)
    return out.scatter_add_(-1, _long(index), w)


# torch warns once per process that sparse CSR support is in beta; the CSR tensors here are internal to one product
warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta', category=UserWarning)


# ---- the three primitives in their forms (no autograd here) -------------------------------------------------------

def _qk_gather(q, k, index):
    return torch.einsum('gnkd,gnd->gnk', _gather_rows(k, index), q)


def _qk_dense(q, k, index):
    """Cache-blocked: for each block of query rows, the BLAS product with all keys, then the gather of K entries."""
    g, n, _ = q.shape
    m, kk = k.shape[1], index.shape[-1]
    cast = _autocast_dtype(q.device)  # autocast is thread-local and blocks may run on other threads: cast here
    if cast is not None:
        q, k = q.to(cast), k.to(cast)
    kt = k.transpose(-2, -1)
    dtype = torch.promote_types(q.dtype, k.dtype)
    out = torch.empty(g, n, kk, dtype=dtype, device=q.device)

    def block(b):
        gs, rs = b
        torch.gather(torch.matmul(q[gs, rs], kt[gs]), -1, _long(index[gs, rs]), out=out[gs, rs])

    blocks = list(_row_blocks(g, n, m, dtype.itemsize))
    if q.device.type == 'cpu':
        parallel_for(block, blocks)
    else:
        for b in blocks:
            block(b)
    return out


def sampled_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor,
               base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores at given keys by the CSR sampled dense-dense product (``torch.sparse.sampled_addmm``: one d-long dot
    product per kept entry, no gathered copy of the keys), plus ``base`` (G, n, K) when given; no autograd.

    q (G, n, d), k (G, m, d), index (G, n, K) -> (G, n, K); float32 / float64 only (no half-precision CPU kernel).
    """
    g, n, d = q.shape
    m, kk = k.shape[1], index.shape[-1]
    itype = torch.int32 if n * kk < 2**31 and m < 2**31 else torch.int64
    crow = torch.arange(0, n * kk + 1, kk, dtype=itype, device=q.device).expand(g, n + 1).contiguous()
    col = index.to(itype).reshape(g, n * kk)
    if base is None:
        values, beta = torch.zeros(g, n * kk, dtype=q.dtype, device=q.device), 0.
    else:
        values, beta = base.to(q.dtype).reshape(g, n * kk).contiguous(), 1.
    csr = torch.sparse_csr_tensor(crow, col, values, size=(g, n, m), check_invariants=False)
    res = torch.sparse.sampled_addmm(csr, q.contiguous(), k.contiguous().transpose(-2, -1), beta=beta)
    return res.values().view(g, n, kk)


def _av_gather(a, v, index):
    return torch.matmul(a.unsqueeze(-2), _gather_rows(v, index)).squeeze(-2)


def _av_dense(a, v, index):
    return torch.matmul(_scatter_map(a, index, v.shape[-2]), v)


_BAG = 128  # longest bag of one embedding_bag call (embedding_bag_av)


def embedding_bag_av(a: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Aggregation as the weighted sum of K value rows per query (``embedding_bag``, sum mode, per-sample weights:
    one vectorised kernel, no n x m map); no autograd. a (G, n, K), v (G, m, d), index (G, n, K) -> (G, n, d)."""
    g, n, kk = a.shape
    m, d = v.shape[-2:]
    if kk > _BAG and kk % _BAG == 0:  # FBGEMM's kernel slows down about 7x per key from bags of 128 to 256
        # (1 thread, AVX-512, this repository's measurement): bags of 128, summed in pairs (or fours, ...)
        parts = kk // _BAG
        out = embedding_bag_av(a.reshape(g, n * parts, _BAG), v, index.reshape(g, n * parts, _BAG))
        return out.view(g, n, parts, d).sum(2)
    flat = _flat_index(index, m).reshape(g * n, kk)
    out = F.embedding_bag(flat, v.reshape(g * m, d), per_sample_weights=a.reshape(g * n, kk).to(v.dtype),
                          mode='sum')
    return out.view(g, n, d)


def _outer_gather(w, x, index, m):
    g, n, kk = w.shape
    d = x.shape[-1]
    contrib = (w.unsqueeze(-1) * x.unsqueeze(-2)).reshape(g * n * kk, d)
    out = torch.zeros(g * m, d, dtype=x.dtype, device=x.device)
    return out.index_add_(0, _long(_flat_index(index, m)).reshape(-1), contrib).view(g, m, d)


def _outer_dense(w, x, index, m):
    return torch.matmul(_scatter_map(w, index, m).transpose(-2, -1), x)


def _per_item_bytes(n, m, k, d, elem, method):
    if method in ('gather',):
        return elem * (n * k * d + n * k)
    if method in ('sampled', 'ebag'):
        return elem * 3 * n * k + elem * n * d
    return elem * (n * m + n * max(k, d))


def _chunked(fn, g: int, per_item: int, *tensors):
    step = chunk_count(g, per_item)
    if step >= g:
        return fn(*tensors)
    return torch.cat([fn(*(t[s:s + step] for t in tensors)) for s in range(0, g, step)], 0)


def _resolve(method: str, op: str, m: int, kk: int, d: int, x: torch.Tensor) -> str:
    if method == 'auto':
        return pick_method(op, m, kk, d, x.device, x.dtype)
    if method == 'sampled' and not _sampled_ok(x.dtype):
        return 'dense'  # torch.sparse.sampled_addmm has no half / bfloat16 kernels on the CPU
    return method


def qk_forward(q, k, index, method: Method = 'auto', base: Optional[torch.Tensor] = None):
    """Scores at given keys without autograd, (G, n, d) x (G, m, d) at (G, n, K), plus ``base`` (G, n, K) when given
    (in the sampled product's own pass; added after the others)."""
    g, n, d = q.shape
    m, kk = k.shape[-2], index.shape[-1]
    method = _resolve(method, 'qk', m, kk, d, q)
    if method == 'ebag':
        raise ValueError("method 'ebag' is an aggregation (sparse_av) method")
    per_item = _per_item_bytes(n, m, kk, d, q.element_size(), method)
    if method == 'sampled':
        if base is None:
            return _chunked(sampled_qk, g, per_item, q, k, index)
        return _chunked(sampled_qk, g, per_item, q, k, index, base.to(q.dtype))
    out = _chunked({'gather': _qk_gather, 'dense': _qk_dense}[method], g, per_item, q, k, index)
    return out if base is None else out + base


def av_forward(a, v, index, method: Method = 'auto'):
    g, n, kk = a.shape
    m, d = v.shape[-2:]
    method = _resolve(method, 'av', m, kk, d, v)
    if method == 'sampled':
        raise ValueError("method 'sampled' is a scores (sparse_qk) method")
    fn = {'gather': _av_gather, 'dense': _av_dense, 'ebag': embedding_bag_av}[method]
    return _chunked(fn, g, _per_item_bytes(n, m, kk, d, v.element_size(), method), a, v, index)


def scatter_outer(w, x, index, m: int, method: Method = 'auto'):
    """``out[g, j] = sum_{i,t: index[g,i,t]=j} w[g,i,t] * x[g,i]`` -> (G, m, d)."""
    g, n, kk = w.shape
    d = x.shape[-1]
    if method == 'auto':  # (the backward passes reduce the forward's method to gather / dense / auto)
        method = 'gather' if kk * d <= 1.3 * m else 'dense'
    if method == 'gather':
        fn = lambda w_, x_, i_: _outer_gather(w_, x_, i_, m)  # noqa: E731
    else:
        fn = lambda w_, x_, i_: _outer_dense(w_, x_, i_, m)  # noqa: E731
    return _chunked(fn, g, _per_item_bytes(n, m, kk, d, x.element_size(), method), w, x, index)


# ---- top-k -------------------------------------------------------------------------------------------------------

_POOL_MIN_ELEMENTS = 1 << 18  # below this a split over threads costs more than it saves


def _argpartition_top(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(x, x.shape[-1] - k, axis=-1)[:, x.shape[-1] - k:]


def _numpy_topk_positions(a2: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of each row of a contiguous (rows, K) float32 CPU tensor (any order)."""
    x = a2.numpy()
    rows = x.shape[0]
    parts = max(1, min(worker_threads(), rows // 2)) if x.size >= _POOL_MIN_ELEMENTS else 1
    step = -(-rows // parts)
    found = parallel_map(lambda s: _argpartition_top(x[s:s + step], k), range(0, rows, step))
    return torch.from_numpy(np.concatenate(found, 0) if len(found) > 1 else np.ascontiguousarray(found[0]))


def topk_positions(a: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (int64) of the k largest entries of each row of ``a`` (..., K), in no particular order.

    On the CPU in float32 they come from ``numpy.argpartition`` (vectorised introselect, x86-simd-sort on AVX-512 /
    AVX2; faster than ``torch.topk`` there, docs/pft.md), split over the worker threads; elsewhere from
    ``torch.topk``. Ties at the k-th value may be broken differently from ``torch.topk`` (both are arbitrary there).
    NaN counts as the largest (as in torch.topk).
    """
    kk = a.shape[-1]
    if not 0 < k < kk:
        raise ValueError(f'topk: k={k} must be in [1, {kk - 1}] for rows of length {kk}')
    if a.device.type != 'cpu' or a.dtype != torch.float32 or get_option('torch_topk'):
        return torch.topk(a.detach(), k, dim=-1, largest=True, sorted=False).indices
    flat = a.detach().reshape(-1, kk)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return _numpy_topk_positions(flat, k).view(*a.shape[:-1], k)


def topk(a: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(a, k, -1, largest=True, sorted=False)`` through :func:`topk_positions`: (values, positions),
    differentiable in ``a`` (the values are gathered at the positions)."""
    pos = topk_positions(a, k)
    return torch.gather(a, -1, pos), pos


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
        method = ctx.method if ctx.method in ('gather', 'dense') else 'auto'
        gq = av_forward(grad, k, index, method) if ctx.needs_input_grad[0] else None
        gk = scatter_outer(grad, q, index, k.shape[-2], method) if ctx.needs_input_grad[1] else None
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
        method = ctx.method if ctx.method in ('gather', 'dense') else 'auto'
        ga = qk_forward(grad, v, index, method) if ctx.needs_input_grad[0] else None
        gv = scatter_outer(a, grad, index, v.shape[-2], method) if ctx.needs_input_grad[1] else None
        return ga, gv, None, None


def _flatten3(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f'{name} must have at least 3 dimensions (..., rows, cols), got shape {tuple(x.shape)}')
    return x.reshape(-1, *x.shape[-2:])


def check_index(index: torch.Tensor, lead, n: int, m: int, op: str, attn: Optional[torch.Tensor] = None) -> None:
    """Checks of the index of ``op`` shared by both backends: an integer (..., n, K) tensor with leading dims
    ``lead``, the shape of ``attn`` when given (sparse_av), and at least one key (``m``); raises TypeError /
    ValueError."""
    if index.dtype not in (torch.int64, torch.int32, torch.int16):
        raise TypeError(f'{op}: index must be an integer tensor (int64/int32/int16), got {index.dtype}')
    if tuple(index.shape[:-1]) != tuple(lead) + (n,):
        raise ValueError(f'{op}: index shape {tuple(index.shape)} does not match (..., n={n}, K) with leading '
                         f'dims {tuple(lead)}')
    if attn is not None and index.shape != attn.shape:
        raise ValueError(f'{op}: attn {tuple(attn.shape)} and index {tuple(index.shape)} differ')
    if m == 0:
        raise ValueError(f'{op}: no keys to index')


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gather_bias(bias: torch.Tensor, lead, n: int, m: int, index: torch.Tensor) -> torch.Tensor:
    """``bias`` (broadcastable to (*lead, n, m)) at the index: (*lead, n, K), nothing expanded in memory."""
    try:
        full = bias.expand(*lead, n, m)
    except RuntimeError:
        raise ValueError(f'sparse_qk: bias {tuple(bias.shape)} does not broadcast to {(*lead, n, m)}') from None
    return torch.gather(full, -1, _long(index))


def torch_sparse_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, method: Method = 'auto',
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch :func:`adasr.ops.sparse_qk`. q (..., n, d), k (..., m, d), index (..., n, K), optional bias
    broadcastable to (..., n, m) -> (..., n, K)."""
    lead = q.shape[:-2]
    n, m = q.shape[-2], k.shape[-2]
    check_index(index, lead, n, m, 'sparse_qk')
    q3, k3, i3 = _flatten3(q, 'q'), _flatten3(k, 'k'), _flatten3(index, 'index')
    dtype = torch.promote_types(q.dtype, k.dtype)
    q3, k3 = q3.to(dtype), k3.to(dtype)
    base = None if bias is None else gather_bias(bias, lead, n, m, index)
    if _needs_grad(q3, k3) or (base is not None and base.requires_grad and torch.is_grad_enabled()):
        out = SparseQK.apply(q3, k3, i3, method)
        out = out if base is None else out + base.reshape(out.shape)
    else:  # no autograd node, nothing saved
        out = qk_forward(q3, k3, i3, method, None if base is None else base.reshape(*i3.shape))
    return out.view(*lead, *out.shape[-2:])


def torch_sparse_av(attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor, method: Method = 'auto') -> torch.Tensor:
    """PyTorch :func:`adasr.ops.sparse_av`. attn (..., n, K), v (..., m, d), index (..., n, K) -> (..., n, d)."""
    lead = attn.shape[:-2]
    check_index(index, lead, attn.shape[-2], v.shape[-2], 'sparse_av', attn)
    a3, v3, i3 = _flatten3(attn, 'attn'), _flatten3(v, 'v'), _flatten3(index, 'index')
    dtype = torch.promote_types(attn.dtype, v.dtype)
    a3, v3 = a3.to(dtype), v3.to(dtype)
    if _needs_grad(a3, v3):
        out = SparseAV.apply(a3, v3, i3, method)
    else:
        out = av_forward(a3, v3, i3, method)
    return out.view(*lead, *out.shape[-2:])


def dense_sparse_qk(q, k, index):
    """Reference by definition (full product, then gather); for tests."""
    return torch.gather(q @ k.transpose(-2, -1), -1, index.long())


def dense_sparse_av(attn, v, index):
    """Reference by definition (scatter into a full map, then product); for tests."""
    full = torch.zeros(*attn.shape[:-1], v.shape[-2], dtype=attn.dtype, device=attn.device)
    return full.scatter_add(-1, index.long(), attn) @ v


__all__ = ['torch_sparse_qk', 'torch_sparse_av', 'dense_sparse_qk', 'dense_sparse_av', 'chunk_count', 'pick_method',
           'topk', 'topk_positions', 'sampled_qk', 'embedding_bag_av', 'qk_forward', 'av_forward', 'check_index',
           'gather_bias']
