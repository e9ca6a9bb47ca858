"""CPU float32 inference engines for token networks that keep the numbers bit for bit.

A transformer block at inference on one CPU core is mostly memory traffic: a 130560-token map of 64 channels is
33 MB, its qkv 100 MB, a window attention map 133 MB, and every PyTorch operator reads and writes the whole map. The
engines below cut the work into groups of rows or windows whose intermediates stay in the core's L2 cache and run the
same operators on them, in the same order: every output element is computed by the same kernel with the same
operands, so the results are the plain PyTorch results bit for bit (checked by ``tests/test_cpu_inference.py`` and
the AdaFormer equivalence tests). That holds where PyTorch's BLAS gives a matrix product the same numbers whatever
the rows or batch around it (:func:`blas_batch_invariant`, a check of this machine). Intel's MKL in its AVX2 code
(Intel CPUs without AVX-512, or ``MKL_ENABLE_INSTRUCTIONS=AVX2``) does not: it picks other kernels for a few rows,
a smaller batch or a share of rows per thread, and rounds some shapes (a 64 -> 128 linear, the GELU) otherwise
than oneDNN. There the plain computation's own numbers depend on how a product is cut, the engines' numbers are
the plain ones within float32 rounding (a few 1e-7 relative), and oneDNN's linears still give every row the same
numbers in any group of rows, at any thread count. No autograd: callers use them when gradients are off
(:func:`fast_path_ok`).

* :func:`linear`: ``F.linear`` as a oneDNN linear with the bias in the product (PyTorch's ``addmm`` first copies
  the bias into the whole output, a pass over it); :func:`linear_gelu`: ``F.gelu(F.linear(...))`` as one oneDNN
  linear with a GELU post-op (no pass over the hidden activations).
* :func:`conv1x1_tokens`: a 1x1 convolution of a map as a oneDNN linear of its tokens, where a check of the
  shape finds the convolution's numbers; :func:`linear_add`: ``F.linear(...) + other`` with the addition as a
  post-op.
* :func:`residual_rows_`: ``x += a; x += fn(x)`` in groups of rows (a pre-norm MLP: LayerNorm, fc1, activation,
  fc2 and both residual additions while a group is in cache); ``x += 2 twice(x)`` instead of ``x += a`` for a block
  whose attention returns ``u + u`` (where every window halted), with ``patch`` for the rows computed otherwise.
* :func:`window_attention`: multi-head attention inside windows (relative-position bias, softmax) computed for
  groups of windows, the softmax in place; each group's q, k and v laid out by head and the result written back
  by compiled copies (numba, :class:`_WindowGroups`), so that the batched products take their operands as they are.
* :func:`window_attention_add_`: the same for every window of a raster token map, read from a raster-order qkv
  map and added straight into a raster-order destination (no window partition or reverse copies).
"""
import threading
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.nn import functional as F

from adasr.ops import codegen
from adasr.ops.layout import nchw_to_tokens

_HAS_LINEAR_POINTWISE = hasattr(torch.ops.mkldnn, '_linear_pointwise')  # oneDNN linear + post-op (torch >= 2.0)

#: rows per group in :func:`residual_rows_` on one thread (2048 x 128 hidden floats = 1 MiB, a core's L2); with
#: more threads 2 x ROWS per thread (a thread's share then leaves L2, but each operator's fork and join, and its
#: wait for a busy core, come half as often). Measured on two AVX-512 cores, one AdaFormer block of 130560 tokens:
#: groups of 4096 rows 38-42 ms against 44-52 ms for 2048; 8192 rows 40.9 ms against 42.3 ms for 4096 with the
#: second core free (25 rounds), 81 ms against 104 ms with another process on it; on one thread 2048 rows 67 ms
#: against 73 ms for 8192
ROWS = 2048
#: fewest rows for :func:`linear`'s oneDNN product (measured equal to ``F.linear`` from 4 rows up)
LINEAR_MIN_ROWS = 16
#: windows per group in the window attention (16 windows x 4 heads x 64 x 64 floats = 1 MiB of attention maps)
WINDOWS = 16


def onednn_ok(x: torch.Tensor) -> bool:
    """Eager CPU float32 inference with oneDNN (no autograd, not traced by ``torch.compile``/``torch.export``: graphs
    keep the plain operators): oneDNN layouts and operators may stand in for PyTorch's."""
    return (not torch.is_grad_enabled() and x.device.type == 'cpu' and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling())


def fast_path_ok(x: torch.Tensor) -> bool:
    """:func:`onednn_ok`, and oneDNN's linear with post-ops is available: the engines here may run."""
    return _HAS_LINEAR_POINTWISE and onednn_ok(x)


_lock = threading.Lock()
_invariant: Dict[int, bool] = {}


def blas_batch_invariant() -> bool:
    """Whether PyTorch's float32 CPU products give a matrix the same numbers computed alone as within a larger
    product at the current thread count: a linear of 16 and of 808 rows against the same rows of 64 and 9000, a
    batched product of one (4 x 1024 x 16) @ (16 x 16) against it within a batch of four. Where they do, the engines
    here give the plain computation's numbers bit for bit; where not (module docstring), within float32 rounding.
    Checked once per process and thread count."""
    threads = torch.get_num_threads()
    with _lock:
        if threads not in _invariant:
            _invariant[threads] = _batch_invariant()
        return _invariant[threads]


def _batch_invariant() -> bool:
    gen = torch.Generator().manual_seed(2025)
    with torch.no_grad():
        for rows, part, k, n in ((64, 16, 64, 128), (9000, 808, 128, 64), (9000, 808, 64, 128)):
            x = torch.randn(rows, k, generator=gen)
            w, b = torch.randn(n, k, generator=gen) * k ** -0.5, torch.randn(n, generator=gen)
            if not torch.equal(F.linear(x[:part], w, b), F.linear(x, w, b)[:part]):
                return False
        q, kp = torch.randn(4, 4, 1024, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
        return torch.equal(q[:1] @ kp[:1], (q @ kp)[:1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; under :func:`fast_path_ok`, from :data:`LINEAR_MIN_ROWS` rows, a oneDNN linear
    with the bias in the product (the same numbers, without the pass that copies the bias into the output; with
    fewer rows the BLAS behind ``F.linear`` takes other kernels, whose rounding differs). Groups of at least that
    many rows get the whole map's numbers."""
    if bias is None or x.numel() < LINEAR_MIN_ROWS * x.shape[-1] or not fast_path_ok(x):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (the exact GELU); under :func:`fast_path_ok` one oneDNN linear with the
    GELU as a post-op, at any row count (the same numbers, without a pass over the hidden activations; a group of
    rows gets the whole map's numbers)."""
    if bias is None or not fast_path_ok(x):
        return F.gelu(F.linear(x, weight, bias))
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu', [], 'none')


_pointwise_same: Dict[tuple, bool] = {}


def conv1x1_tokens(x: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` (a 1x1 convolution of the (B, Cin, H, W) map ``x``) as contiguous (B, H*W,
    Cout) tokens in raster order, given ``tokens``, ``x`` as (B, H*W, Cin) tokens. Under :func:`fast_path_ok` a
    oneDNN linear of the tokens (no transposes of the output, no pass that copies the bias into it) wherever it
    gives the convolution's numbers bit for bit: PyTorch's 1x1 convolution is a GEMM of its own choosing (by batch,
    thread count and shape), so the first call of each shape and thread count runs both and compares (a map with a
    non-finite value decides nothing); a difference keeps the convolution for that shape in this process. Otherwise
    the convolution and a transpose."""
    def conv() -> torch.Tensor:
        return nchw_to_tokens(F.conv2d(x, weight, bias))

    if bias is None or not (fast_path_ok(x) and fast_path_ok(tokens)) or x.dim() != 4:
        return conv()
    key = (tuple(x.shape), tuple(weight.shape), torch.get_num_threads())
    same = _pointwise_same.get(key)
    if same is False:
        return conv()
    out = linear(tokens, weight.flatten(1), bias)
    if same is None:
        ref = conv()
        if not bool(torch.isfinite(ref).all()):  # (NaN never equals itself: no verdict from such a map)
            return ref
        with _lock:
            _pointwise_same[key] = same = torch.equal(out, ref)
        return out if same else ref
    return out


_HAS_LINEAR_BINARY = _HAS_LINEAR_POINTWISE and hasattr(torch.ops.mkldnn._linear_pointwise, 'binary')


def linear_add(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias) + other`` (``other`` of the output's shape); under :func:`fast_path_ok` one
    oneDNN linear with the addition as a post-op (the bias added to each sum, then ``other``: the same two
    roundings, without a pass over the output)."""
    if (bias is None or not _HAS_LINEAR_BINARY or not fast_path_ok(x) or not other.is_contiguous()
            or x.numel() < LINEAR_MIN_ROWS * x.shape[-1] or other.shape != x.shape[:-1] + weight.shape[:1]):
        return F.linear(x, weight, bias) + other
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, 'add')


def residual_rows_(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], a: Optional[torch.Tensor] = None,
                   rows: Optional[int] = None,
                   twice: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   patch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``x += a`` (if given), then ``x += fn(x)``, in place on (..., N, C) ``x``, computed in groups of ``rows`` rows
    of the last-but-one axis (default :data:`ROWS` on one PyTorch thread, twice that per thread on more). ``fn``
    must act on each row on its own (LayerNorm, linears, pointwise functions): its output for a group is then its
    output for those rows of the whole map, whatever the group size. ``twice`` (instead of ``a``; acting on each
    row on its own too): ``x += twice(x) + twice(x)``, as ``x += 2 twice(x)`` (doubling is exact, so one rounding
    either way: the same numbers without a map of ``twice(x)`` or of the sum). ``patch`` (rows, values): after that
    first update the rows ``rows`` (flat indices over the leading dimensions and N, ascending) are set to ``values``
    instead (rows whose update the caller computed otherwise), before ``fn``. Returns ``x``."""
    if a is not None and twice is not None:
        raise ValueError('residual_rows_: give a or twice, not both')
    if x.dim() < 2:
        raise ValueError(f'residual_rows_ needs (..., N, C) rows, got shape {tuple(x.shape)}')
    threads = torch.get_num_threads()
    rows = rows or (ROWS if threads <= 1 else 2 * ROWS * threads)
    flat = x.view(-1, x.shape[-2], x.shape[-1])
    fa = None if a is None else a.expand_as(x).reshape(flat.shape)
    n = flat.shape[1]
    if patch is not None:  # the patch rows of each group: bounds from one search
        starts = torch.arange(0, flat.shape[0] * n + 1, n, device=x.device)
        starts = (starts[:-1, None] + torch.arange(0, n, rows, device=x.device)).flatten()
        bounds = torch.searchsorted(patch[0], torch.cat([starts, starts.new_tensor([flat.shape[0] * n])])).tolist()
    g = 0
    for i in range(flat.shape[0]):
        for s in range(0, n, rows):
            part = flat[i, s:s + rows]
            if fa is not None:
                part.add_(fa[i, s:s + rows])
            elif twice is not None:
                part.add_(twice(part), alpha=2)
            if patch is not None:
                lo, hi = bounds[g], bounds[g + 1]
                if hi > lo:
                    part.index_copy_(0, patch[0][lo:hi] - (i * n + s), patch[1][lo:hi])
            g += 1
            part.add_(fn(part))
    return x


def _windows_to_heads(src, a0, da, b0, db, m, heads, hd, out):
    """out[p, w heads + hh, ry S + rx, e] = src[a0 + w da, ry, (b0 + w db) S + rx, p C + hh hd + e] for windows
    w < m: src (A, S, B S, 3C) holds the windows (a window row of a raster map: A the window rows, da = 0, db = 1; a
    list of windows: B = 1, da = 1, db = 0), out (3, >= m heads, S*S, hd): each window's q, k and v split into heads,
    every head's rows contiguous (compiled by numba; C-contiguous arrays, so the copies are vector moves)."""
    s = src.shape[1]
    c = heads * hd
    for w in range(m):
        a, b = a0 + w * da, (b0 + w * db) * s
        for ry in range(s):
            for rx in range(s):
                px = src[a, ry, b + rx]
                t = ry * s + rx
                for p in range(3):
                    for hh in range(heads):
                        dst = out[p, w * heads + hh, t]
                        base = p * c + hh * hd
                        for e in range(hd):
                            dst[e] = px[base + e]


def _heads_to_windows(o, heads, hd, dst, a0, da, b0, db, m, accumulate):
    """The way back of :func:`_windows_to_heads` (one kernel for both directions, a branch on the direction in its
    loops, took about 1.1x the time in AVX2 code): dst[a0 + w da, ry, (b0 + w db) S + rx, hh hd + e] = o[w heads + hh,
    ry S + rx, e] for windows w < m (``accumulate``: +=, one float32 addition each, the numbers of PyTorch's
    ``add_``); dst (A, S, B S, C), o (m heads, S*S, hd) (compiled by numba)."""
    s = dst.shape[1]
    for w in range(m):
        a, b = a0 + w * da, (b0 + w * db) * s
        for ry in range(s):
            for rx in range(s):
                px = dst[a, ry, b + rx]
                t = ry * s + rx
                for hh in range(heads):
                    src = o[w * heads + hh, t]
                    base = hh * hd
                    if accumulate:
                        for e in range(hd):
                            px[base + e] += src[e]
                    else:
                        for e in range(hd):
                            px[base + e] = src[e]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v for (..., heads, n, hd) q, k, v and a (heads, n, n) bias, softmax in place."""
    attn = (q @ k.transpose(-2, -1)).add_(bias)
    torch.softmax(attn, -1, out=attn)
    return attn @ v


def _heads(qkv: torch.Tensor, heads: int):
    """(m, n, 3C) -> q, k, v (m, heads, n, hd) views."""
    m, n, c3 = qkv.shape
    return qkv.view(m, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


class _WindowGroups:
    """Window attention of groups of windows with q, k and v laid out by head (one compiled copy a group): every
    head's rows contiguous, so that PyTorch's batched products take them as they are (``q @ k^T`` on 4-D views
    copies q and k, ``attn @ v`` copies v) and the result is written or added straight into its windows by a
    compiled pass (PyTorch walks the window layout with rows of ``hd`` floats). The products, the bias addition and
    the softmax are PyTorch's on the same operands: the numbers of :func:`_attend` bit for bit
    (tests/test_cpu_inference.py)."""

    def __init__(self, like: torch.Tensor, windows: int, heads: int, n: int, hd: int):
        self.heads, self.n, self.hd = heads, n, hd
        self.gather, self.scatter = codegen.compiled(_windows_to_heads), codegen.compiled(_heads_to_windows)
        self.buf = like.new_empty(3, windows * heads, n, hd)
        self.attn = like.new_empty(windows * heads, n, n)
        self.out = like.new_empty(windows * heads, n, hd)

    def __call__(self, src, dst, where: tuple, m: int, bias: torch.Tensor, accumulate: bool) -> None:
        """Window attention of m windows of ``src`` (numpy (A, S, B S, 3C), q already scaled) written into
        (``accumulate``: added to) the same windows of ``dst`` (numpy (A, S, B S, C)); ``where``: (a0, da, b0, db),
        window w at [a0 + w da, :, (b0 + w db) S : ...] (:func:`_windows_to_heads`)."""
        heads, n, hd = self.heads, self.n, self.hd
        mh = m * heads
        t = self.buf[:, :mh]
        self.gather(src, *where, m, heads, hd, t.numpy())
        attn = torch.bmm(t[0], t[1].transpose(1, 2), out=self.attn[:mh])
        attn.view(m, heads, n, n).add_(bias)
        torch.softmax(attn, -1, out=attn)
        o = torch.bmm(attn, t[2], out=self.out[:mh])
        self.scatter(o.numpy(), heads, hd, dst, *where, m, accumulate)

    @staticmethod
    def available(x: torch.Tensor) -> bool:
        return (x.device.type == 'cpu' and x.dtype == torch.float32 and codegen.compiled(_windows_to_heads) is not None
                and codegen.compiled(_heads_to_windows) is not None)


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int, windows: int = WINDOWS) -> torch.Tensor:
    """Windowed multi-head attention: qkv (nW, n, 3C) with channels [q|k|v][head][hd] and q already scaled, bias
    (heads, n, n) -> (nW, n, C), computed ``windows`` windows at a time (the plain ``softmax(q k^T + bias) v`` of
    the whole batch, bit for bit)."""
    nw, n, c3 = qkv.shape
    c = c3 // 3
    out = qkv.new_empty(nw, n, c)
    s = int(round(n ** 0.5))
    if s * s == n and _WindowGroups.available(qkv):
        run = _WindowGroups(qkv, min(windows, nw), heads, n, c // heads)
        src, dst = qkv.contiguous().view(nw, s, s, c3).numpy(), out.view(nw, s, s, c).numpy()
        for w0 in range(0, nw, windows):
            run(src, dst, (w0, 1, 0, 0), min(windows, nw - w0), bias, False)
        return out
    for w0 in range(0, nw, windows):
        q, k, v = _heads(qkv[w0:w0 + windows], heads)
        o = _attend(q, k, v, bias)  # m, heads, n, hd
        out[w0:w0 + windows].view(-1, n, heads, c // heads).copy_(o.transpose(1, 2))
    return out


def window_attention_add_(qkv: torch.Tensor, bias: torch.Tensor, heads: int, window_size: int, dst: torch.Tensor,
                          windows: int = WINDOWS) -> torch.Tensor:
    """``dst += window attention`` of every window of a raster token map: qkv (B, H, W, 3C) (q already scaled),
    bias (heads, S*S, S*S), dst (B, H*W, C) raster order; H and W multiples of ``window_size`` S. The windows of a
    window row are taken in groups of at most ``windows``; their q, k, v are read from the raster qkv map and the
    result is added into ``dst`` in place (``dst + local``: the same sums as adding the partitioned result).
    Returns ``dst``."""
    b, h, w, c3 = qkv.shape
    s, c = window_size, c3 // 3
    nwy, nwx = h // s, w // s
    hd = c // heads
    per_row = -(-nwx // windows)
    group = -(-nwx // per_row)  # balanced groups along a window row
    if _WindowGroups.available(qkv) and qkv.is_contiguous() and dst.is_contiguous():
        run = _WindowGroups(qkv, group, heads, s * s, hd)
        for i in range(b):
            src, out = qkv[i].view(nwy, s, w, c3).numpy(), dst[i].view(nwy, s, w, c).numpy()
            for wy in range(nwy):
                for x0 in range(0, nwx, group):
                    run(src, out, (wy, 0, x0, 1), min(group, nwx - x0), bias, True)
        return dst
    src = qkv.view(b, nwy, s, nwx, s, c3)
    out = dst.view(b, nwy, s, nwx, s, heads, hd)
    for i in range(b):
        for wy in range(nwy):
            for x0 in range(0, nwx, group):
                x1 = min(x0 + group, nwx)
                m = x1 - x0
                part = src[i, wy, :, x0:x1].permute(1, 0, 2, 3).reshape(m, s * s, c3)
                q, k, v = _heads(part, heads)
                o = _attend(q, k, v, bias)  # m, heads, S*S, hd
                out[i, wy, :, x0:x1].add_(o.view(m, heads, s, s, hd).permute(2, 0, 3, 1, 4))
    return dst
