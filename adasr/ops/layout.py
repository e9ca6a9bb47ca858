"""Layout changes done fast: token sequences (B, N, C) to NCHW feature maps (B, C, H, W) (:func:`tokens_to_nchw`)
and back (:func:`nchw_to_tokens`, :func:`to_channels_last`), rows of fused projections gathered into head-split
attention windows (:func:`rows_to_heads`, below) and the pixel shuffle of a channels-last map into an NCHW image
(:func:`pixel_shuffle_nchw`).

A transformer between convolutions keeps its tokens channels-last, the convolutions want NCHW. PyTorch's copy of a
permuted 4-D view walks the destination with large strides (``t.transpose(1, 2).reshape(b, c, h, w).contiguous()``
of a 1 x 130560 x 64 token map takes ~45 ms on one AVX-512 core, ``to_mkldnn`` of the permuted view as long);
PyTorch's copy of 2-D blocks of a few thousand tokens that stay in cache takes ~13 ms; a compiled transpose of
16 x 16 tiles in vector registers (:func:`_tile_transpose_kernel`: 16 row loads, four rounds of two-register
shuffles, 16 row stores) ~4.6 ms, near a plain copy of the map (~3.3 ms). The values are copied, never computed:
the result is the same tensor bit for bit, so the network's numbers do not change. The other way, NCHW to tokens,
the same tiles read channel rows and write token rows (PyTorch's copy of the transposed view: ~17 ms, the tiles
~3 ms).

Without autograd only (the tiles or blocks are written into a fresh tensor in place); with autograd the plain
PyTorch reshape is used, so gradients flow as before. Without numba, the PyTorch blocks.
"""
import numpy as np
import torch
import torch.nn.functional as F

from adasr.ops import codegen

#: tokens per 2-D block: 4096 x 64 floats = 1 MiB, read and written while in L2 (and per task of the tile kernel)
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
    kernel = _tile_transpose_kernel() if t.device.type == 'cpu' and t.dtype == torch.float32 else None
    if kernel is not None:
        from adasr.ops.scheduling import parallel_for

        src, dst = t.detach().contiguous().numpy(), out.numpy()
        parallel_for(lambda job: kernel(src[job[0]], dst[job[0]], job[1], min(n, job[1] + BLOCK_TOKENS), 0, c),
                     [(i, s) for i in range(b) for s in range(0, n, BLOCK_TOKENS)])
        return out.view(b, c, h, w)
    for i in range(b):
        for s in range(0, n, BLOCK_TOKENS):
            out[i, :, s:s + BLOCK_TOKENS].copy_(t[i, s:s + BLOCK_TOKENS].t())
    return out.view(b, c, h, w)


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map -> contiguous (B, H*W, C) tokens in raster order with the same values: ``x.flatten(2)
    .transpose(1, 2).contiguous()``, for an NCHW-contiguous float32 CPU map without autograd by 16 x 16 register
    tiles (a 1 x 64 x 272 x 480 map: ~17 ms -> ~3 ms on one AVX-512 core); a channels-last map is that layout
    already (no copy)."""
    b, c, h, w = x.shape
    n = h * w
    kernel = None
    if x.is_contiguous() and x.device.type == 'cpu' and x.dtype == torch.float32 and n > 1 and not (
            (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling()):
        kernel = _tile_transpose_kernel()
    if kernel is None:
        return x.flatten(2).transpose(1, 2).contiguous()
    from adasr.ops.scheduling import parallel_for

    out = x.new_empty(b, n, c)
    src, dst = x.detach().view(b, c, n).numpy(), out.numpy()
    parallel_for(lambda job: kernel(src[job[0]], dst[job[0]], 0, c, job[1], min(n, job[1] + BLOCK_TOKENS)),
                 [(i, s) for i in range(b) for s in range(0, n, BLOCK_TOKENS)])
    return out


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also NCHW-contiguous, as with one channel or one pixel)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous(memory_format=torch.channels_last)`` for a (B, C, H, W) map: the same values, the NCHW map copied
    by the register tiles of :func:`nchw_to_tokens` where they run (a 1 x 64 x 272 x 480 map: ~17 ms -> ~5 ms on one
    AVX-512 core); a channels-last map itself."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last) or not x.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    return nchw_to_tokens(x).view(b, h, w, c).permute(0, 3, 1, 2)


_TILE = 16  # float32 lanes of a vector register: the tile kernel moves 16 x 16 tiles


def _tile_intrinsic():
    """``_tile16(x, r0, c0, y)``: ``y[c0 + i, r0 + j] = x[r0 + j, c0 + i]`` for i, j < 16 (2-D C-contiguous float32
    arrays; the caller keeps the tile inside both). Rows of 16 floats loaded, transposed by four rounds of
    two-register shuffles (round s swaps the off-diagonal s x s blocks of each 2s x 2s block: after s = 8, 4, 2, 1 row
    i holds column i), stored as rows."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _tile16(typingctx, x, r0, c0, y):
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == 'C' and a.dtype == types.float32
                   for a in (x, y)):
            return None
        sig = types.void(x, r0, c0, y)

        def codegen(context, builder, signature, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v16f = ir.VectorType(ir.FloatType(), _TILE)
            xa = context.make_array(signature.args[0])(context, builder, args[0])
            ya = context.make_array(signature.args[3])(context, builder, args[3])
            r0v = context.cast(builder, args[1], signature.args[1], types.intp)
            c0v = context.cast(builder, args[2], signature.args[2], types.intp)

            def row(arr, r, c):  # address of arr[r, c] (strides in bytes)
                off = builder.add(builder.mul(r, builder.extract_value(arr.strides, 0)),
                                  builder.mul(c, ir.Constant(i64, 4)))
                return builder.inttoptr(builder.add(builder.ptrtoint(arr.data, i64), off), v16f.as_pointer())

            rows = [builder.load(row(xa, builder.add(r0v, ir.Constant(i64, j)), c0v), align=4)
                    for j in range(_TILE)]
            for s in (8, 4, 2, 1):
                lo = ir.Constant(ir.VectorType(i32, _TILE), [e if e & s == 0 else _TILE + e - s for e in range(_TILE)])
                hi = ir.Constant(ir.VectorType(i32, _TILE), [e + s if e & s == 0 else _TILE + e for e in range(_TILE)])
                for i in range(_TILE):
                    if i & s == 0:
                        a, b = rows[i], rows[i + s]
                        rows[i], rows[i + s] = builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi)
            for i in range(_TILE):
                builder.store(rows[i], row(ya, builder.add(c0v, ir.Constant(i64, i)), r0v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return _tile16


def _tile_transposes(x, y, r0, r1, c0, c1):
    """y[c0:c1, r0:r1] = x[r0:r1, c0:c1].T for 2-D float32 x (N, C), y (C, N): 16 x 16 tiles
    (:func:`_tile_intrinsic`), the rows and columns left over element by element (compiled by numba:
    :func:`_tile_transpose_kernel`)."""
    full_r = r0 + (r1 - r0) // _TILE * _TILE
    full_c = c0 + (c1 - c0) // _TILE * _TILE
    for r in range(r0, full_r, _TILE):
        for ch in range(c0, full_c, _TILE):
            _tile16(x, r, ch, y)
    for r in range(r0, r1):
        for ch in range(full_c if r < full_r else c0, c1):
            y[ch, r] = x[r, ch]


_tile_kernel = None
_tile16 = None


def _tile_transpose_kernel():
    """``kernel(x, y, r0, r1, c0, c1)``: :func:`_tile_transposes` compiled (numba, on first use; None where numba
    does not import: the PyTorch blocks)."""
    global _tile_kernel, _tile16
    if _tile_kernel is None:
        _tile_kernel = codegen.compile_function(_tile_transposes) or False
        if _tile_kernel:
            _tile16 = _tile_intrinsic()  # (a global of the compiled function: set before its first call compiles it)
    return _tile_kernel or None


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


def _rows_to_heads_kernel():
    """:func:`_rows_to_heads_loops` compiled (numba, on first use; None where numba does not import)."""
    return codegen.compiled(_rows_to_heads_loops)


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


def _shuffle_rows(x, s, out, i0, i1):
    """out[b, c, i s + a, j s + k] = x[b, i, j, (c s + a) s + k] for input rows i0 <= i < i1: x (N, H, W, C s s)
    channels-last rows, out (N, C, H s, W s); each input pixel read once, its values written to s rows of each
    output channel."""
    n, _, w, _ = x.shape
    nc = out.shape[1]
    for b in range(n):
        for i in range(i0, i1):
            src = x[b, i]
            for j in range(w):
                px = src[j]
                for c in range(nc):
                    for a in range(s):
                        dst = out[b, c, i * s + a]
                        ch = (c * s + a) * s
                        for k in range(s):
                            dst[j * s + k] = px[ch + k]


def pixel_shuffle_nchw(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.pixel_shuffle(x, scale).contiguous()``: an NCHW-contiguous image with the same values. For a channels-last
    float32 CPU map without autograd one compiled pass (PyTorch's shuffle of a channels-last 48 x 272 x 480 map and
    the NCHW copy after it take ~19 ms on one AVX-512 core; the pass ~4 ms); else PyTorch's operations."""
    n, c, h, w = x.shape
    if c % (scale * scale):
        raise ValueError(f'pixel_shuffle_nchw: {c} channels are not a multiple of {scale}^2')
    kernel = None
    if (is_channels_last(x) and x.device.type == 'cpu'
            and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
            and not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())):
        kernel = codegen.compiled(_shuffle_rows)
    if kernel is None:
        return F.pixel_shuffle(x, scale).contiguous()
    from adasr.ops.scheduling import parallel_for

    out = x.new_empty(n, c // (scale * scale), h * scale, w * scale)
    xs, os_ = x.detach().permute(0, 2, 3, 1).numpy(), out.numpy()
    step = 4  # input rows per task
    parallel_for(lambda i0: kernel(xs, scale, os_, i0, min(h, i0 + step)), list(range(0, h, step)))
    return out
