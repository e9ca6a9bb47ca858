"""Triton kernels for the sparse attention products (forward and backward; fp32, fp16, bf16 in, fp32 accumulation).

Imported lazily by :mod:`adasr.ops` when a CUDA tensor meets the ``triton`` / ``auto`` backend; nothing is compiled
before the first call (Triton JIT-compiles for the GPU it runs on, so sm_90 and newer work as well as older GPUs).
With ``TRITON_INTERPRET=1`` set before ``triton`` is imported, the same kernels run on CPU tensors in Triton's
interpreter (used by the test suite).

Kernels:
  * ``_qk_kernel``: out[g, i, t] = sum_e a[g, i, e] * b[g, idx[g, i, t], e]   (forward scores; backward of attn)
  * ``_av_kernel``: out[g, i, e] = sum_t w[g, i, t] * b[g, idx[g, i, t], e]   (forward aggregation; backward of q)
  * ``_scatter_kernel``: out[g, idx[g, i, t], e] += w[g, i, t] * x[g, i, e]  (backward of k and v: atomic adds into
    an fp32 buffer, so no update is lost, unlike the authors' kernel; the summation order is not fixed)
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from adasr.ops.sparse_attention import check_index


@triton.jit
def _qk_kernel(A, B, IDX, OUT, n, kk, d,
               sa_g, sa_n, sb_g, sb_m, si_g, si_n, so_g, so_n,
               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pn = tl.program_id(0)
    pt = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    m2 = (rn < n)[:, None] & (rt < kk)[None, :]
    idx = tl.load(IDX + g * si_g + rn[:, None] * si_n + rt[None, :], mask=m2, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < d
        a = tl.load(A + g * sa_g + rn[:, None] * sa_n + rd[None, :], mask=(rn < n)[:, None] & md[None, :],
                    other=0.).to(tl.float32)
        b = tl.load(B + g * sb_g + idx[:, :, None] * sb_m + rd[None, None, :],
                    mask=m2[:, :, None] & md[None, None, :], other=0.).to(tl.float32)
        acc += tl.sum(a[:, None, :] * b, axis=2)
    tl.store(OUT + g * so_g + rn[:, None] * so_n + rt[None, :], acc.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _av_kernel(W, B, IDX, OUT, n, kk, d,
               sw_g, sw_n, sb_g, sb_m, si_g, si_n, so_g, so_n,
               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pn = tl.program_id(0)
    pd = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    mn = rn < n
    md = rd < d
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, kk, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        m2 = mn[:, None] & (rt < kk)[None, :]
        w = tl.load(W + g * sw_g + rn[:, None] * sw_n + rt[None, :], mask=m2, other=0.).to(tl.float32)
        idx = tl.load(IDX + g * si_g + rn[:, None] * si_n + rt[None, :], mask=m2, other=0).to(tl.int64)
        b = tl.load(B + g * sb_g + idx[:, :, None] * sb_m + rd[None, None, :],
                    mask=m2[:, :, None] & md[None, None, :], other=0.).to(tl.float32)
        acc += tl.sum(w[:, :, None] * b, axis=1)
    tl.store(OUT + g * so_g + rn[:, None] * so_n + rd[None, :], acc.to(OUT.dtype.element_ty),
             mask=mn[:, None] & md[None, :])


@triton.jit
def _scatter_kernel(W, X, IDX, OUT, n, kk, d,
                    sw_g, sw_n, sx_g, sx_n, si_g, si_n, so_g, so_m,
                    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pn = tl.program_id(0)
    pt = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    mn = rn < n
    m2 = mn[:, None] & (rt < kk)[None, :]
    w = tl.load(W + g * sw_g + rn[:, None] * sw_n + rt[None, :], mask=m2, other=0.).to(tl.float32)
    idx = tl.load(IDX + g * si_g + rn[:, None] * si_n + rt[None, :], mask=m2, other=0).to(tl.int64)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < d
        x = tl.load(X + g * sx_g + rn[:, None] * sx_n + rd[None, :], mask=mn[:, None] & md[None, :],
                    other=0.).to(tl.float32)
        val = w[:, :, None] * x[:, None, :]
        tl.atomic_add(OUT + g * so_g + idx[:, :, None] * so_m + rd[None, None, :], val,
                      mask=m2[:, :, None] & md[None, None, :])


def _blocks(d: int):
    bd = min(32, max(16, triton.next_power_of_2(d)))
    return 16, 16, bd


def qk(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (G, n, d), b (G, m, d), idx (G, n, K) -> (G, n, K)."""
    a, b, idx = a.contiguous(), b.contiguous(), idx.contiguous()
    g, n, d = a.shape
    kk = idx.shape[-1]
    out = torch.empty(g, n, kk, dtype=out_dtype, device=a.device)
    bn, bt, bd = _blocks(d)
    grid = (triton.cdiv(n, bn), triton.cdiv(kk, bt), g)
    _qk_kernel[grid](a, b, idx, out, n, kk, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                     idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
                     BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=bd)
    return out


def av(w: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """w (G, n, K), b (G, m, d), idx (G, n, K) -> (G, n, d)."""
    w, b, idx = w.contiguous(), b.contiguous(), idx.contiguous()
    g, n, kk = w.shape
    d = b.shape[-1]
    out = torch.empty(g, n, d, dtype=out_dtype, device=b.device)
    bn, bt, bd = _blocks(d)
    grid = (triton.cdiv(n, bn), triton.cdiv(d, bd), g)
    _av_kernel[grid](w, b, idx, out, n, kk, d, w.stride(0), w.stride(1), b.stride(0), b.stride(1),
                     idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
                     BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=bd)
    return out


def scatter_outer(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[g, idx[g,i,t]] += w[g,i,t] * x[g,i]: w (G, n, K), x (G, n, d) -> (G, m, d)."""
    w, x, idx = w.contiguous(), x.contiguous(), idx.contiguous()
    g, n, kk = w.shape
    d = x.shape[-1]
    out = torch.zeros(g, m, d, dtype=torch.float32, device=x.device)
    bn, bt, bd = _blocks(d)
    grid = (triton.cdiv(n, bn), triton.cdiv(kk, bt), g)
    _scatter_kernel[grid](w, x, idx, out, n, kk, d, w.stride(0), w.stride(1), x.stride(0), x.stride(1),
                          idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
                          BLOCK_N=bn, BLOCK_T=bt, BLOCK_D=bd)
    return out.to(out_dtype)


class TritonSparseQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, index):
        ctx.save_for_backward(q, k, index)
        return qk(q, k, index, torch.promote_types(q.dtype, k.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, index = ctx.saved_tensors
        gq = av(grad, k, index, q.dtype) if ctx.needs_input_grad[0] else None
        gk = scatter_outer(grad, q, index, k.shape[1], k.dtype) if ctx.needs_input_grad[1] else None
        return gq, gk, None


class TritonSparseAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, v, index):
        ctx.save_for_backward(a, v, index)
        return av(a, v, index, torch.promote_types(a.dtype, v.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, v, index = ctx.saved_tensors
        ga = qk(grad, v, index, a.dtype) if ctx.needs_input_grad[0] else None
        gv = scatter_outer(a, grad, index, v.shape[1], v.dtype) if ctx.needs_input_grad[1] else None
        return ga, gv, None


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f'triton sparse attention supports float32/float16/bfloat16 {name}, got {x.dtype}')


def sparse_qk(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton :func:`adasr.ops.sparse_qk`: q (..., n, d), k (..., m, d), index (..., n, K) -> (..., n, K)."""
    _check(q, 'q')
    _check(k, 'k')
    lead = q.shape[:-2]
    check_index(index, lead, q.shape[-2], k.shape[-2], 'sparse_qk')
    out = TritonSparseQK.apply(q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]),
                               index.reshape(-1, *index.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def sparse_av(attn: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton :func:`adasr.ops.sparse_av`: attn (..., n, K), v (..., m, d), index (..., n, K) -> (..., n, d)."""
    _check(attn, 'attn')
    _check(v, 'v')
    lead = attn.shape[:-2]
    check_index(index, lead, attn.shape[-2], v.shape[-2], 'sparse_av', attn)
    out = TritonSparseAV.apply(attn.reshape(-1, *attn.shape[-2:]), v.reshape(-1, *v.shape[-2:]),
                               index.reshape(-1, *index.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])
