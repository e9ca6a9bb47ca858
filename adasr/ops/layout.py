"""Layout changes done fast: token sequences (B, N, C) to NCHW feature maps (B, C, H, W) (:func:`tokens_to_nchw`),
and rows of fused projections gathered into head-split attention windows (:func:`rows_to_heads`, below).

A transformer between convolutions keeps its tokens channels-last, the convolutions want NCHW. PyTorch's copy of a
permuted 4-D view walks the destination with large strides (``t.transpose(1, 2).reshape(b, c, h, w).contiguous()``
of a 1 x 130560 x 64 token map takes ~45 ms on one AVX-512 core, ``to_mkldnn`` of the permuted view as long);
transposing it as 2-D blocks of a few thousand tokens that stay in cache takes ~12 ms. The values are copied, never
computed: the result is the same tensor bit for bit, so the network's numbers do not change. (The other way, NCHW to
tokens, PyTorch's own copy is as fast as the blocks.)

Without autograd only (the blocks are written into a fresh tensor in place); with autograd the plain PyTorch
reshape is used, so gradients flow as before.
"""
import numpy as np
import torch

#: tokens per 2-D block: 4096 x 64 floats = 1 MiB, read and written while in L2
BLOCK_TOKENS = 4096


def tokens_to_nchw(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) tokens in raster order -> a (B, C, H, W) map with the same values: contiguous without autograd,
    else the channels-last view ``t.transpose(1, 2).reshape(b, c, h, w)``."""
    b, n, c = t.shape
    if n != h * w:
        raise ValueError(f'tokens_to_nchw: {n} tokens do not make a {h}x{w} map')
    if (torch.is_grad_enabled() and t.requires_grad) or torch.compiler.is_compiling():
        return t.transpose(1, 2).reshape(b, c, h, w)
    out = t.new_empty(b, c, n)
    for i in range(b):
        for s in range(0, n, BLOCK_TOKENS):
            out[i, :, s:s + BLOCK_TOKENS].copy_(t[i, s:s + BLOCK_TOKENS].t())
    return out.view(b, c, h, w)


# ---- token rows -> head-split windows ------------------------------------------------------------------------------

def _rows_to_heads_torch(x: torch.Tensor, perm: torch.Tensor, parts: int, heads: int, n: int,
                         scale: float) -> torch.Tensor:
    rows = x.index_select(0, perm)
    d = x.shape[1] // (parts * heads)
    out = rows.view(-1, n, parts, heads, d).permute(2, 0, 3, 1, 4).contiguous()
    out[0].mul_(scale)
    return out


def _rows_to_heads_loops(x, perm, j0, j1, parts, heads, d, n, scale, out):
    """The copy of output rows j0 .. j1 - 1 (compiled by numba: :func:`_rows_to_heads_kernel`)."""
    c = heads * d
    for j in range(j0, j1):  # output row j (window j // n, position j % n) is input row perm[j]
        row = x[perm[j]]
        w = j // n
        t = j - w * n
        for hh in range(heads):
            dst = out[0, w, hh, t]
            for e in range(d):
                dst[e] = row[hh * d + e] * scale
        for p in range(1, parts):
            for hh in range(heads):
                dst = out[p, w, hh, t]
                base = p * c + hh * d
                for e in range(d):
                    dst[e] = row[base + e]


_kernel = None


def _rows_to_heads_kernel():
    """:func:`_rows_to_heads_loops` compiled (numba, on first use; None where numba does not import)."""
    global _kernel
    if _kernel is None:
        try:
            import numba
        except Exception:  # noqa: BLE001 - any import failure: the PyTorch ops
            _kernel = False
            return None
        try:
            _kernel = numba.njit(nogil=True, cache=True)(_rows_to_heads_loops)
        except RuntimeError:  # no writable cache location: compile per process
            _kernel = numba.njit(nogil=True, cache=False)(_rows_to_heads_loops)
    return _kernel or None


def rows_to_heads(x: torch.Tensor, perm: torch.Tensor, parts: int, heads: int, n: int,
                  scale: float = 1.0) -> torch.Tensor:
    """Rows of a (N, parts * heads * d) matrix (e.g. the fused q, k, v projections of N tokens) gathered in the order
    ``perm`` (N' indices, a multiple of ``n``) and split into ``(parts, N' / n, heads, n, d)``: part p, window w, head
    hh, position t is ``x[perm[w n + t], (p heads + hh) d : ... + d]``, times ``scale`` in part 0 (the attention scale
    of the queries). The values are copied (part 0 multiplied in float32), so the result is that of
    ``x[perm].view(-1, n, parts, heads, d).permute(2, 0, 3, 1, 4).contiguous()`` with ``[0] *= scale``, bit for bit;
    one pass instead of a row gather, a permuted copy (PyTorch walks its destination with 13-float rows: ~36 ms for
    PFT-light's 65536 x 156 map on one AVX-512 core) and a scaling pass. Without autograd, on float32 CPU tensors;
    else the PyTorch ops."""
    if x.dim() != 2 or x.shape[1] % (parts * heads) or perm.dim() != 1 or perm.numel() % n:
        raise ValueError(f'rows_to_heads: x {tuple(x.shape)} is not (N, {parts} x {heads} x d) or {perm.numel()} '
                         f'indices are not whole windows of {n}')
    kernel = None
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if not ((torch.is_grad_enabled() and x.requires_grad) or traced) and x.device.type == 'cpu' and \
            x.dtype == torch.float32:
        kernel = _rows_to_heads_kernel()
    if kernel is None:
        return _rows_to_heads_torch(x, perm, parts, heads, n, scale)
    from adasr.ops.scheduling import parallel_for

    d = x.shape[1] // (parts * heads)
    total = perm.numel()
    out = x.new_empty(parts, total // n, heads, n, d)
    xs, ps, os_ = x.detach().contiguous().numpy(), perm.contiguous().numpy(), out.numpy()
    if ps.size and (ps.min() < 0 or ps.max() >= x.shape[0]):
        raise IndexError(f'rows_to_heads: indices outside 0 .. {x.shape[0] - 1}')
    s = np.float32(scale)
    step = 8 * n  # eight windows per task
    parallel_for(lambda j0: kernel(xs, ps, j0, min(j0 + step, total), parts, heads, d, n, s, os_),
                 list(range(0, total, step)))
    return out
