"""Winograd convolution: a fast 3x3, stride-1, padding-1 convolution for float32 CPU inference.

A 3x3 convolution computes each output from nine products per channel pair. Winograd's minimal filtering F(m x m,
3 x 3) computes an m x m output tile from an (m + 2) x (m + 2) input tile with (m + 2)^2 products per channel pair
instead of 9 m^2: 16 instead of 36 for m = 2, 25 instead of 81 for m = 3, 36 instead of 144 for m = 4. The products
become (m + 2)^2 matrix products (tiles x Cin) @ (Cin x Cout), one batched GEMM (MKL); the input and output tile
transforms are small linear maps.

API:

* :func:`conv3x3` ``(x, weight, bias=None, relu=False, method=None)``: drop-in for
  ``F.conv2d(x, weight, bias, 1, 1)`` (then ReLU when ``relu``). ``method``: ``'direct'`` (``F.conv2d``),
  ``'winograd'`` (= :data:`DEFAULT_VARIANT`) or a variant name of :data:`VARIANTS`; ``None`` reads option
  ``conv3x3`` (``ADASR_CONV3X3``, default ``'direct'``). It falls back to the direct convolution where Winograd
  cannot run (:func:`winograd_supported`): autograd recording (``torch.is_grad_enabled()`` and a tensor requiring
  grad), a tensor that is not float32 on the CPU (or a oneDNN-layout tensor), a kernel that is not 3x3, tracing by
  ``torch.compile``. Transformed weights are cached per weight tensor (by identity and ``_version``, so in-place
  updates such as ``load_state_dict`` are seen; an entry goes with its weight).
* :func:`winograd_conv3x3` ``(x, weight, bias=None, relu=False, variant=DEFAULT_VARIANT)``: Winograd only; raises
  ``RuntimeError`` when autograd would need a gradient, ``ValueError`` on unsupported tensors.
* :class:`WinogradConv3x3` ``(weight, bias=None, variant=DEFAULT_VARIANT)``: the prepacked form (weights transformed
  once, in float64, then rounded to float32); call it as ``conv(x, relu=False)``.
* :func:`transform_matrices` ``(m, points)``: the float64 matrices ``(AT, G, BT)`` of F(m, 3) for interpolation
  points ``points`` (m + 1 finite points; the point at infinity is implied).
* :func:`numba_available`, :func:`set_engine` (``'auto'`` / ``'torch'``), :func:`kernel_source`.

Variants (:data:`VARIANTS`): ``'f2'`` F(2x2, 3x3), points 0, +-1; ``'f3'`` F(3x3, 3x3), points 0, +-1, 1/2;
``'f4'`` F(4x4, 3x3), points 0, +-1, 2, -1/2 (the default: the fastest, and about 2x less error than the usual
0, +-1, +-2); ``'f4-lavin'`` F(4x4, 3x3) with Lavin and Gray's points 0, +-1, +-2.

Input: (N, Cin, H, W) float32 on the CPU, NCHW or channels_last, any N >= 1, H, W >= 1 (zero-padded internally to
whole tiles); output (N, Cout, H, W) in the input's memory format. Channels-last is the fast form (the transforms
read and write contiguous channel vectors; an NCHW input and output cost two transposing copies): a chain of
convolutions should run channels-last from end to end.

Engines: with numba, the tile transforms are compiled from generated source (:func:`kernel_source`: the transform
unrolled with constant coefficients, vectorised over the channels), specialised to (variant, Cin, Cout), written to
``$NUMBA_CACHE_DIR/winograd_kernels`` or ``~/.cache/adasr/winograd_kernels`` (``XDG_CACHE_HOME``) and cached by
numba there (:mod:`adasr.ops.codegen`): some seconds to compile the first time, a fraction of a second after.
Without numba, the transforms are PyTorch matrix products (slower; see docs/winograd.md). The image runs in blocks
of whole tile rows, through buffers each thread keeps (a few MB); with more than one PyTorch thread the blocks run
on the worker pool of :mod:`adasr.ops.scheduling` (option ``threads``). For channels-last tensors of
:data:`_DRIVER_MIN_BLOCKS` blocks or more a compiled driver runs them (transforms, and the products by the BLAS
routine that ``torch.bmm`` calls, reached through :mod:`adasr.ops.blas`) without returning to Python between them
and without the strip copy for blocks inside the image (their inner tiles read from the input itself): the same
numbers, checked once per process and shape against ``torch.bmm`` (any difference, or no exported routine, means
the Python block loop).

Numerics: Winograd's transforms add rounding error (growing with m, and depending on the points); the float32
transformed weights are rounded once from float64. ``tests/test_winograd.py`` and ``scripts/benchmark_conv.py``
measure the error against a float64 reference (docs/winograd.md has the figures).
"""
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from adasr.ops import blas, codegen
from adasr.ops.layout import is_channels_last

# name -> (output tile m, finite interpolation points); each uses the point at infinity too
VARIANTS: Dict[str, Tuple[int, Tuple[float, ...]]] = {
    'f2': (2, (0.0, 1.0, -1.0)),
    'f3': (3, (0.0, 1.0, -1.0, 0.5)),
    'f4': (4, (0.0, 1.0, -1.0, 2.0, -0.5)),
    'f4-lavin': (4, (0.0, 1.0, -1.0, 2.0, -2.0)),
}
DEFAULT_VARIANT = 'f4'


def transform_matrices(m: int, points: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(AT (m, a), G (a, 3), BT (a, a))`` with ``a = m + 2`` such that the 1-D correlation
    ``y[k] = sum_j g[j] d[k + j]`` (k < m) is ``AT @ ((G @ g) * (BT @ d))`` for every g (3) and d (a).

    Toom-Cook: ``G`` evaluates the filter polynomial at the points (the last row, the point at infinity, takes its
    leading coefficient), ``AT`` is the transposed evaluation matrix of the output polynomial and ``BT`` the
    transposed interpolation matrix of their product (the inverse of the transposed Vandermonde matrix)."""
    a = m + 2
    if len(points) != a - 1 or len(set(points)) != len(points):
        raise ValueError(f'F({m}, 3) needs {a - 1} distinct finite points, got {list(points)}')
    p = torch.tensor(list(points), dtype=torch.float64)

    def evaluation(n: int) -> torch.Tensor:  # (a, n): rows [1, p, .., p^(n-1)], the last row picks the top coefficient
        e = torch.zeros(a, n, dtype=torch.float64)
        e[:-1] = p[:, None] ** torch.arange(n, dtype=torch.float64)
        e[-1, -1] = 1.0
        return e

    at, g, va = evaluation(m).T.contiguous(), evaluation(3), evaluation(a)
    bt = torch.linalg.inv(va).T.contiguous()
    # scale rows of BT (and G inversely) so that BT's largest entry in each row is 1: the products keep the size of
    # the data, the filter side takes the factors (exact in the float64 weight transform)
    s = bt.abs().amax(1)
    return at, g * s[:, None], bt / s[:, None]


@dataclass(frozen=True)
class _Plan:
    name: str
    m: int
    at: torch.Tensor  # (m, a) float32
    bt: torch.Tensor  # (a, a) float32
    g64: torch.Tensor  # (a, 3) float64


_plans: Dict[str, _Plan] = {}


def _plan(variant: str) -> _Plan:
    if variant not in _plans:
        if variant not in VARIANTS:
            raise ValueError(f'unknown Winograd variant {variant!r}; choose one of {sorted(VARIANTS)}')
        m, points = VARIANTS[variant]
        at, g, bt = transform_matrices(m, points)
        _plans[variant] = _Plan(variant, m, at.float(), bt.float(), g)
    return _plans[variant]


def _check(x: torch.Tensor, cin: int) -> None:
    if x.dim() != 4 or x.shape[1] != cin:
        raise ValueError(f'expected an (N, {cin}, H, W) tensor, got shape {tuple(x.shape)}')
    if x.dtype != torch.float32 or x.device.type != 'cpu':
        raise ValueError(f'Winograd convolution runs on float32 CPU tensors, got {x.dtype} on {x.device}')


class WinogradConv3x3:
    """A 3x3 stride-1 padding-1 convolution with prepacked Winograd weights (inference only).

    ``WinogradConv3x3(weight (Cout, Cin, 3, 3), bias (Cout,) or None, variant)``; ``conv(x, relu=False)`` returns
    ``F.conv2d(x, weight, bias, padding=1)`` (then ReLU) in ``x``'s memory format, computed with Winograd."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, variant: str = DEFAULT_VARIANT):
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise ValueError(f'expected a (Cout, Cin, 3, 3) weight, got shape {tuple(weight.shape)}')
        self.variant = variant
        self.plan = p = _plan(variant)
        w = weight.detach().to(torch.float64, copy=True)
        u = torch.einsum('ay,oiyx,bx->abio', p.g64, w, p.g64)  # (a, a, Cin, Cout)
        a = p.m + 2
        self.u = u.reshape(a * a, w.shape[1], w.shape[0]).float().contiguous()  # (a^2, Cin, Cout)
        self.cin, self.cout = w.shape[1], w.shape[0]
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        _check(x, self.cin)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError('Winograd convolution is inference-only: call it under torch.no_grad() / '
                               'torch.inference_mode(), or use adasr.ops.winograd.conv3x3 (falls back to F.conv2d)')
        return _forward(x, self, relu)


def _forward(x: torch.Tensor, conv: 'WinogradConv3x3', relu: bool, residual: Optional[torch.Tensor] = None,
             inplace: bool = False) -> torch.Tensor:
    """The convolution of (N, Cin, H, W) ``x`` by the prepacked ``conv``, in ``x``'s memory format; plus
    ``residual`` when given (written into it when ``inplace``): see :func:`conv3x3`.

    The image runs in blocks of whole tile rows (:data:`_BLOCK_TILES` tiles), each on one thread: the block's input
    rows are copied, zero-padded, into a channels-last strip of the thread's reused buffers (no full padded copy of
    the input, no page faults of fresh buffers; the compiled driver copies only the edges of blocks inside the
    image), then its tiles :data:`_GROUP_TILES` at a time are transformed, multiplied (one batched GEMM over the
    (m + 2)^2 points) and transformed back (the group's transformed tiles and products stay in L2), straight into
    the output where it is channels-last and made of whole tiles, else through an output strip."""
    p = conv.plan
    m = p.m
    n, c, h, w = x.shape
    nr, nq = -(-h // m), -(-w // m)
    channels_last = is_channels_last(x)
    if residual is not None:
        _check_residual(residual, (n, conv.cout, h, w), relu, x)
    kernels = _kernels(p, c, conv.cout) if _engine() == 'numba' else None
    rows = max(1, _BLOCK_TILES // nq)  # tile rows per block
    # tiles per product group, the same for the compiled driver and the Python block loop (the numbers of a tile's
    # products may depend on the group size: they must not depend on the memory format or the number of blocks)
    group = None if kernels is None else _driver_group(kernels, p, c, conv.cout, {rows * nq, nr % rows * nq})
    compiled = group is not None and channels_last and n * -(-nr // rows) >= _DRIVER_MIN_BLOCKS
    group = group or _GROUP_TILES
    # the compiled driver adds a channels-last residual as it writes the output; elsewhere it is added after
    fuse = compiled and residual is not None and is_channels_last(residual)
    out = residual if fuse and inplace else torch.empty(n, conv.cout, h, w, dtype=x.dtype,
                                                         memory_format=torch.channels_last if channels_last else
                                                         torch.contiguous_format)
    xs, ys = x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)  # (N, H, W, C) views
    if compiled:
        if fuse:
            _forward_compiled(kernels, xs, ys, conv, 2, rows, nr, nq, group, residual.permute(0, 2, 3, 1))
            return out
        _forward_compiled(kernels, xs, ys, conv, int(relu), rows, nr, nq, group)
        return _add_residual(out, residual, inplace)
    direct_out = channels_last and w == nq * m
    # NCHW in / out: the transposing copies of the strips by compiled loops (PyTorch's copy is slow there)
    nchw_in = kernels is not None and x.is_contiguous() and h * w > 1
    nchw_out = kernels is not None and out.is_contiguous() and h * w > 1
    if nchw_in or nchw_out:
        transposes = _transposes()
    items = [(b, r0, min(rows, nr - r0)) for b in range(n) for r0 in range(0, nr, rows)]

    def block(item):
        b, r0, nrb = item
        buf = _buffers(rows, nq, m, c, conv.cout, group)
        # input rows r0 m - 1 .. (r0 + nrb) m + 1, columns -1 .. nq m + 1, zero outside the image
        y0, y1 = r0 * m - 1, (r0 + nrb) * m + 1
        strip = buf['in'][:nrb * m + 2]
        lo, hi = max(y0, 0), min(y1, h)
        if lo > y0:
            strip[:lo - y0].zero_()
        if hi < y1:
            strip[hi - y0:].zero_()
        if nchw_in:
            transposes.planes_to_rows(x[b].numpy(), lo, hi, strip.numpy(), y0)
        else:
            strip[lo - y0:hi - y0, 1:w + 1].copy_(xs[b, lo:hi])
        # the zero columns are never written: set once when the buffer is made (w + 1 .. are per call)
        if w + 1 < strip.shape[1]:
            strip[:, w + 1:].zero_()
        rows_out = min(nrb * m, h - r0 * m)
        in_place = direct_out and rows_out == nrb * m
        target = ys[b, r0 * m:r0 * m + rows_out] if in_place else buf['out'][:nrb * m]
        if kernels is not None:
            _block_numba(kernels, strip, target, conv, nrb, relu, buf, group)
        else:
            _block_torch(strip, target, conv, nrb, relu)
        if not in_place:
            if nchw_out:
                transposes.rows_to_planes(target.numpy(), rows_out, out[b].numpy(), r0 * m)
            else:
                ys[b, r0 * m:r0 * m + rows_out].copy_(target[:rows_out, :w])

    from adasr.ops.scheduling import parallel_for
    if _USE_POOL and torch.get_num_threads() > 1 and len(items) > 1:
        parallel_for(block, items)
    else:
        for item in items:
            block(item)
    return _add_residual(out, residual, inplace)


def _add_residual(y: torch.Tensor, residual: Optional[torch.Tensor], inplace: bool) -> torch.Tensor:
    """``y + residual`` (into ``residual`` when ``inplace``; the same sums either way round), or ``y``."""
    if residual is None:
        return y
    return residual.add_(y) if inplace else y.add_(residual)


def _forward_compiled(kernels, xs: torch.Tensor, ys: torch.Tensor, conv: 'WinogradConv3x3', mode: int, rows: int,
                      nr: int, nq: int, group: int, rs: Optional[torch.Tensor] = None) -> None:
    """:func:`_forward`'s blocks for channels-last x and output (xs, ys: their (N, H, W, C) views) by the compiled
    ``conv_blocks``: input strip, transform, the products by the BLAS routine ``torch.bmm`` calls
    (:mod:`adasr.ops.blas`) and the output transform in one call for all blocks of an image (on one thread) or
    one call per contiguous run of blocks on the worker pool (:data:`_PARTS_PER_THREAD` runs per worker); the
    same numbers as the Python block loop, without its per-block overhead.
    ``mode`` 0: the convolution, 1: its ReLU, 2: plus the residual ``rs`` (channels-last, (N, H, W, Co) view; it
    may be ``ys`` itself), added as each output tile is written (one pass over the output less)."""
    n, h, w, c = xs.shape
    m = conv.plan.m
    bias = (conv.bias if conv.bias is not None else _zeros(conv.cout)).numpy()
    u = conv.u.numpy()
    nblocks = -(-nr // rows)

    def run(b: int, b0: int, b1: int) -> None:
        strip, v, prod, ostrip, params = _compiled_buffers(rows, nq, m, c, conv.cout, group)
        x_rows, y_rows = xs[b].detach().numpy().reshape(h, -1), ys[b].numpy().reshape(h, -1)
        r_rows = y_rows if rs is None else rs[b].detach().numpy().reshape(h, -1)
        kernels.conv_blocks(x_rows, h, w, b0, b1, rows, nr, nq, strip, v, prod, u, bias, y_rows, ostrip, mode, r_rows,
                            params, group)

    from adasr.ops.config import worker_threads
    from adasr.ops.scheduling import parallel_for
    if _USE_POOL and torch.get_num_threads() > 1 and n * nblocks > 1:
        # contiguous runs of blocks, a few per worker: one compiled call each (a call costs ~50 us of argument
        # checks: one call per block cost AdaFormer's two-thread decoder ~0.1 s of CPU)
        parts = min(nblocks, _PARTS_PER_THREAD * max(1, worker_threads()))
        bounds = [k * nblocks // parts for k in range(parts + 1)]
        parallel_for(lambda item: run(*item), [(b, bounds[k], bounds[k + 1]) for b in range(n) for k in range(parts)])
    else:
        for b in range(n):
            run(b, 0, nblocks)


def _check_residual(residual: torch.Tensor, shape: Tuple[int, ...], relu: bool, like: torch.Tensor) -> None:
    if relu:
        raise ValueError('conv3x3: relu and residual together are not supported (say which comes first)')
    if tuple(residual.shape) != shape or residual.dtype != like.dtype or residual.device != like.device:
        raise ValueError(f'conv3x3: residual must be a {like.dtype} tensor on {like.device} of the output shape '
                         f'{shape}, got {tuple(residual.shape)} {residual.dtype} on {residual.device}')


_blas_checked: Dict[Tuple[str, int, int, int], bool] = {}


def _blas_matches(kernels, plan: '_Plan', c: int, co: int, tiles) -> bool:
    """True when the compiled kernels' products by BLAS (:func:`adasr.ops.blas.sgemm_symbol`) give ``torch.bmm``'s
    numbers bit for bit for blocks of each of ``tiles`` tiles (0: none); checked once per process and shape on random
    operands. False without the symbol or on any difference: the Python block loop runs (``torch.bmm``)."""
    a2 = (plan.m + 2) ** 2
    keys = [(plan.name, c, co, t) for t in tiles if t]
    for key in keys:
        if key not in _blas_checked:
            t, same = key[3], False
            if blas.sgemm_symbol() is not None:
                g = torch.Generator().manual_seed(t)
                v, u = torch.randn(t, a2, c, generator=g), torch.randn(a2, c, co, generator=g)
                prod = torch.empty(a2, t, co)
                kernels.gemms(v.numpy().reshape(t, -1), u.numpy(), prod.numpy(), t, _gemm_params(a2, c, co))
                same = torch.equal(prod, torch.bmm(v.transpose(0, 1), u))
            _blas_checked[key] = same
    return all(_blas_checked[key] for key in keys)


def _group_sizes(block_tiles, group: Optional[int] = None) -> set:
    """The tile counts of the product groups of blocks of ``block_tiles`` tiles (``group``, by default
    :data:`_GROUP_TILES`, at a time)."""
    g = group or _GROUP_TILES
    return {size for t in block_tiles if t for size in (min(t, g), t % g) if size}


def _driver_group(kernels, plan: '_Plan', c: int, co: int, block_tiles) -> Optional[int]:
    """Tiles per product group for the compiled driver on blocks of ``block_tiles`` tiles: the first of
    :data:`_GROUP_TILES`, :data:`_GROUP_FALLBACKS` and whole blocks whose group sizes all pass :func:`_blas_matches`
    (Intel's MKL in AVX2 code multiplies 64 columns by sgemm_ and 32 by torch.bmm otherwise than the same columns
    within other sizes); None when none does (the Python block loop runs)."""
    for group in (_GROUP_TILES, *_GROUP_FALLBACKS, max(block_tiles)):
        if _blas_matches(kernels, plan, c, co, _group_sizes(block_tiles, group)):
            return group
    return None


def _gemm_params(a2: int, c: int, co: int):
    """The BLAS arguments of a block's products (``gemms``: (Co x t) = u[p]^T (Co x C) @ v[:, p]^T (C x t),
    column-major, v's rows ``a2`` C apart); ``gemms`` sets t."""
    return blas.sgemm_params(co, 0, c, co, a2 * c, co)


_local = threading.local()


def _compiled_buffers(rows: int, nq: int, m: int, c: int, co: int, group: int):
    """This thread's block buffers as the NumPy arrays ``conv_blocks`` takes, and its BLAS arguments."""
    buf = _buffers(rows, nq, m, c, co, group)
    views = buf.get('numpy')
    if views is None:
        views = (buf['in'].numpy().reshape(buf['in'].shape[0], -1), buf['v'].numpy().reshape(buf['v'].shape[0], -1),
                 buf['prod'].numpy(), buf['out'].numpy().reshape(buf['out'].shape[0], -1),
                 _gemm_params((m + 2) ** 2, c, co))
        buf['numpy'] = views
    return views


def _buffers(rows: int, nq: int, m: int, c: int, co: int, group: int) -> Dict[str, torch.Tensor]:
    """This thread's block buffers (kept between calls: a fresh large buffer costs its page faults each time).
    Normal tensors even when first made under ``torch.inference_mode()`` (an inference tensor could not be written
    in place by a later call outside it)."""
    key = (rows, nq, m, c, co, group)
    cache = getattr(_local, 'buffers', None)
    if cache is None or cache[0] != key:
        a, t = m + 2, min(rows * nq, group)
        with torch.inference_mode(False):
            strip = torch.empty(rows * m + 2, nq * m + 2, c)
            strip[:, 0].zero_()
            cache = (key, {'in': strip, 'out': torch.empty(rows * m, nq * m, co), 'v': torch.empty(t, a * a, c),
                           'prod': torch.empty(a * a * t * co)})
        _local.buffers = cache
    return cache[1]


def _block_torch(xp: torch.Tensor, yp: torch.Tensor, conv: 'WinogradConv3x3', nrb: int, relu: bool) -> None:
    """One block of ``nrb`` tile rows with PyTorch operations: xp (nrb m + 2, nq m + 2, C) zero-padded input strip,
    yp (nrb m, nq m, Co) output strip."""
    p = conv.plan
    m, a = p.m, p.m + 2
    c, co = xp.shape[-1], conv.cout
    nq = (xp.shape[1] - 2) // m
    t = nrb * nq
    sh, sw, _ = xp.stride()
    # (i, j, r, q, c): input pixel (i, j) of tile (r, q)
    tiles = xp.as_strided((a, a, nrb, nq, c), (sh, sw, m * sh, m * sw, 1), xp.storage_offset())
    v1 = torch.mm(p.bt, tiles.contiguous().view(a, -1)).view(a, a, t * c)  # rows transformed: (A, j, t c)
    v = torch.matmul(p.bt, v1).view(a * a, t, c)  # (A B, t, c)
    prod = torch.bmm(v, conv.u)  # (A B, t, co)
    o1 = torch.mm(p.at, prod.view(a, -1)).view(m, a, t * co)
    o = torch.matmul(p.at, o1).view(m, m, nrb, nq, co)  # (u, v, r, q, co)
    if conv.bias is not None:
        o += conv.bias
    dst = yp.view(nrb, m, nq, m, co).permute(1, 3, 0, 2, 4)
    dst.copy_(o.clamp_min_(0.0) if relu else o)


def _block_numba(kernels, xp: torch.Tensor, yp: torch.Tensor, conv: 'WinogradConv3x3', nrb: int, relu: bool,
                 buf: Dict[str, torch.Tensor], group: int) -> None:
    """The same block with the compiled tile transforms (:func:`_kernels`) around batched GEMMs, the block's tiles
    ``group`` at a time as the compiled driver takes them."""
    p = conv.plan
    m, a = p.m, p.m + 2
    co = conv.cout
    nq = (xp.shape[1] - 2) // m
    x_rows, y_rows = xp.numpy().reshape(xp.shape[0], -1), yp.numpy().reshape(yp.shape[0], -1)
    bias = (conv.bias if conv.bias is not None else _zeros(co)).numpy()
    out_tiles = kernels.output_tiles_relu if relu else kernels.output_tiles
    t = nrb * nq
    for i0 in range(0, t, group):
        g = min(t, i0 + group) - i0
        v = buf['v'][:g]  # tile-major: the transform writes each tile's (A B, c) block contiguously
        kernels.input_tiles(x_rows, i0, i0 + g, nq, v.numpy().reshape(g, -1))
        prod = buf['prod'][:a * a * g * co].view(a * a, g, co)
        torch.bmm(v.transpose(0, 1), conv.u, out=prod)  # (A B, g, co)
        out_tiles(prod.numpy(), i0, i0 + g, nq, bias, y_rows, y_rows)


_zero_cache: Dict[int, torch.Tensor] = {}


def _zeros(n: int) -> torch.Tensor:
    if n not in _zero_cache:
        _zero_cache[n] = torch.zeros(n)
    return _zero_cache[n]


_USE_POOL = True  # blocks on the worker pool when PyTorch has more than one thread (else: multithreaded GEMMs)
_PARTS_PER_THREAD = 2  # the compiled driver's runs of blocks per worker thread (balance against call overhead)
_BLOCK_TILES = 128  # tiles per block (rounded up to whole tile rows): one input strip where it is copied
# tiles per product group within a block: transformed, multiplied and transformed back while in L2 (F(2x2) at
# 272 x 480: 240-tile blocks took 80 ms a convolution on an AMX Xeon, groups of 64 tiles 62 ms; docs/winograd.md)
_GROUP_TILES = 64
_GROUP_FALLBACKS = (60, 56, 48)  # where the BLAS check fails for 64-tile groups (:func:`_driver_group`)
# fewest blocks for the compiled driver: it saves ~50 us of Python a block, and compiling it for a new variant and
# channel counts takes a few seconds (once per machine: numba's cache)
_DRIVER_MIN_BLOCKS = 16


# ---- compiled tile transforms (numba) ------------------------------------------------------------------------------

_numba_state: Dict[str, object] = {}


def numba_available() -> bool:
    """True when numba imports (the Winograd tile transforms are then compiled on first use; else PyTorch runs
    them, several times slower)."""
    return codegen.numba_available()


def _engine() -> str:
    return 'numba' if _numba_state.get('force', 'auto') != 'torch' and numba_available() else 'torch'


def set_engine(name: str) -> None:
    """``'auto'`` (numba when it imports) or ``'torch'`` (PyTorch tile transforms): for tests and benchmarks."""
    if name not in ('auto', 'torch'):
        raise ValueError(f"engine must be 'auto' or 'torch', got {name!r}")
    _numba_state['force'] = name


def _lin(coefs, names) -> str:
    """Source of ``sum_k coefs[k] * names[k]`` in float32, zero terms left out, +-1 without a product."""
    terms = []
    for k, name in zip(coefs, names):
        k = float(k)
        if k == 0.0:
            continue
        sign = '+ ' if k > 0 else '- '
        terms.append(sign + (name if abs(k) == 1.0 else f'F32({abs(k)!r}) * {name}'))
    s = ' '.join(terms)
    return s[2:] if s.startswith('+ ') else '-' + s[2:]


def kernel_source(plan: '_Plan', c: int, co: int) -> str:
    """Python source of the tile transforms of ``plan`` for ``c`` input and ``co`` output channels (numba compiles
    it). Every loop runs over the channels, innermost and contiguous (channels-last), with the transform unrolled
    and its coefficients constant, so it vectorises; each loop reads and writes few distinct rows (LLVM checks
    the overlap of every pair of them before it vectorises)."""
    m = plan.m
    a = m + 2
    bt, at = plan.bt.tolist(), plan.at.tolist()
    src = ['import numpy as np', 'import numba', '', 'F32 = np.float32', '', '',
           '@numba.njit(nogil=True, cache=True, inline="always")',
           'def input_tile(x, y0, x0, v):',
           '    """Tile at input row y0, element x0 of the padded rows x (Hp, Wp C) -> v (A A C), tile-major."""']
    src += [f'    row{i} = x[y0 + {i}, x0:]' for i in range(a)]
    src.append(f'    for k in range({c}):')
    src += [f'        d{i}_{j} = row{i}[{j * c} + k]' for i in range(a) for j in range(a)]
    src += [f'        r{i}_{j} = ' + _lin(bt[i], [f'd{k}_{j}' for k in range(a)]) for i in range(a) for j in range(a)]
    src += [f'        v[{(i * a + j) * c} + k] = ' + _lin(bt[j], [f'r{i}_{k}' for k in range(a)])
            for i in range(a) for j in range(a)]
    src += ['', '',
            '@numba.njit(nogil=True, cache=True)',
            'def input_tiles(x, i0, i1, nq, v):',
            '    """Tiles i0 .. i1 - 1 of a block (tile i: tile row i // nq, column i % nq of the strip x) -> v[0 ..'
            ' i1 - i0)."""',
            '    for i in range(i0, i1):',
            f'        input_tile(x, (i // nq) * {m}, (i % nq) * {m * c}, v[i - i0])',
            '', '',
            '@numba.njit(nogil=True, cache=True)',
            'def input_tiles_image(x, y0, edges, i0, i1, nq, v):',
            '    """input_tiles for a block whose input rows y0 .. lie inside the image rows x (H, W C): the inner'
            ' tile columns read x itself, the first and the last column their zero-padded strips edges[0] and'
            ' edges[1] (rows m + 2, A C)."""',
            '    for i in range(i0, i1):',
            '        r, q = i // nq, i % nq',
            '        if q == 0 or q == nq - 1:',
            f'            input_tile(edges[0 if q == 0 else 1], r * {m}, 0, v[i - i0])',
            '        else:',
            f'            input_tile(x, y0 + r * {m}, (q * {m} - 1) * {c}, v[i - i0])']
    for mode in ('', '_relu', '_add'):
        name = 'output_tile' + mode
        src += ['', '', '@numba.njit(nogil=True, cache=True, inline="always")',
                f'def {name}(prod, t, bias, y, y0, x0, s, r):',
                '    """Tile t of the products prod (A A, T, Co) -> output rows y0.. at element x0 of y (H, W Co);'
                ' s: scratch; r: rows like y, added to the output by the _add variant (which may write into r)."""']
        for j in range(a):  # first the transform over the rows of the tile, one column at a time: six rows read
            src += [f'    p{i} = prod[{i * a + j}, t]' for i in range(a)]
            src.append(f'    for k in range({co}):')
            src += [f'        q{i} = p{i}[k]' for i in range(a)]
            src += [f'        s[{(u * a + j) * co} + k] = ' + _lin(at[u], [f'q{i}' for i in range(a)])
                    for u in range(m)]
        for u in range(m):  # then over the columns, one output row at a time
            src += [f'    yr = y[y0 + {u}, x0:]']
            if mode == '_add':
                src += [f'    rr = r[y0 + {u}, x0:]']
            src += [f'    for k in range({co}):', '        bk = bias[k]']
            src += [f'        o{j} = s[{(u * a + j) * co} + k]' for j in range(a)]
            for v in range(m):
                src.append('        w = bk + (' + _lin(at[v], [f'o{j}' for j in range(a)]) + ')')
                value = {'': 'w', '_relu': 'max(w, F32(0.0))', '_add': f'w + rr[{v * co} + k]'}[mode]
                src.append(f'        yr[{v * co} + k] = {value}')
        src += ['', '', '@numba.njit(nogil=True, cache=True)',
                f'def {name.replace("tile", "tiles")}(prod, i0, i1, nq, bias, y, r):',
                '    """Tiles i0 .. i1 - 1 of a block (their products: prod[:, 0 .. i1 - i0)) -> the block\'s output'
                ' rows y."""',
                f'    s = np.empty({m * a * co}, np.float32)',
                '    for i in range(i0, i1):',
                f'        {name}(prod, i - i0, bias, y, (i // nq) * {m}, (i % nq) * {m * co}, s, r)']
    src += ['', '', blas.sgemm_declaration(), '', '',
            '@numba.njit(nogil=True, cache=True)',
            'def gemms(v, u, prod, t, params):',
            f'    """prod[p] = v[:t, p] @ u[p] for the {a * a} points p by BLAS sgemm (the products of torch.bmm):'
            ' v (T, A A C) tile-major, u (A A, C, Co), prod (A A, t, Co); params: blas.sgemm_params."""',
            '    ip = params.ctypes.data',
            '    params[2] = t',
            f'    for p in range({a * a}):',
            '        SGEMM(ip, ip, ip + 4, ip + 8, ip + 12, ip + 28, u[p].ctypes.data, ip + 16,',
            f'              v.ctypes.data + p * {4 * c}, ip + 20, ip + 32, prod[p].ctypes.data, ip + 24)',
            '', '',
            '@numba.njit(nogil=True, cache=True)',
            'def conv_blocks(x, h, w, b0, b1, rows, nr, nq, strip, v, prod, u, bias, y, ostrip, mode, r, params,'
            ' group):',
            '    """Blocks b0 .. b1 - 1 (``rows`` tile rows each, nr in all) of the convolution of one image, as'
            ' _forward\'s Python block loop computes them: x (H, W C) and y (H, W Co) channels-last rows; strip'
            ' (rows m + 2, (nq m + 2) C), v (group, A A C), prod (A A group Co,) and ostrip (rows m, nq m Co):'
            ' buffers; u (A A, C, Co) transformed weights; mode 0: y = conv, 1: ReLU(conv), 2: conv + r (r: rows'
            ' like y, which may be y itself). A block\'s tiles are transformed, multiplied and transformed back'
            ' ``group`` at a time (:func:`_driver_group`). A block whose input rows lie inside the image is not'
            ' copied: its inner tiles are read from x, its first and last tile column from zero-padded strips of'
            ' them (the same numbers, a pass over the input less)."""',
            f'    wc = w * {c}',
            f'    edges = np.empty((2, rows * {m} + 2, {a * c}), np.float32)  # the first and the last tile column',
            '    for blk in range(b0, b1):',
            '        r0 = blk * rows',
            '        nrb = min(rows, nr - r0)',
            '        t = nrb * nq',
            f'        y0 = r0 * {m} - 1  # the block reads input rows y0 .. y0 + nrb m + 1',
            f'        inside = y0 >= 0 and y0 + nrb * {m} + 1 < h',
            '        if inside:  # strips of the first and the last tile column only, zero outside the image',
            '            for e in range(2):',
            f'                x0 = -1 if e == 0 else (nq - 1) * {m} - 1  # the strip\'s first pixel column',
            f'                for i in range(nrb * {m} + 2):',
            f'                    for j in range({a}):',
            '                        if x0 + j >= 0 and x0 + j < w:',
            f'                            edges[e, i, j * {c}:(j + 1) * {c}] = x[y0 + i, (x0 + j) * {c}:'
            f'(x0 + j + 1) * {c}]',
            '                        else:',
            f'                            edges[e, i, j * {c}:(j + 1) * {c}] = 0',
            '        else:',
            f'            for i in range(nrb * {m} + 2):  # the whole strip, zero outside the image',
            '                yy = y0 + i',
            '                row = strip[i]',
            '                if yy >= 0 and yy < h:',
            f'                    row[:{c}] = 0',
            f'                    row[{c}:{c} + wc] = x[yy, :wc]',
            f'                    row[{c} + wc:] = 0',
            '                else:',
            '                    row[:] = 0',
            f'        rows_out = min(nrb * {m}, h - r0 * {m})',
            f'        whole = rows_out == nrb * {m} and w == nq * {m}',
            f'        dst = y[r0 * {m}:] if whole else ostrip',
            '        for i0 in range(0, t, group):',
            '            i1 = min(t, i0 + group)',
            '            vt = v[:i1 - i0]',
            '            if inside:',
            '                input_tiles_image(x, y0, edges, i0, i1, nq, vt)',
            '            else:',
            '                input_tiles(strip, i0, i1, nq, vt)',
            f'            pb = prod[:{a * a * co} * (i1 - i0)].reshape({a * a}, i1 - i0, {co})',
            '            gemms(vt, u, pb, i1 - i0, params)',
            '            if mode == 1:',
            '                output_tiles_relu(pb, i0, i1, nq, bias, dst, dst)',
            '            elif mode == 2 and whole:',
            f'                output_tiles_add(pb, i0, i1, nq, bias, dst, r[r0 * {m}:])',
            '            else:',
            '                output_tiles(pb, i0, i1, nq, bias, dst, dst)',
            '        if not whole:',
            '            for i in range(rows_out):',
            '                if mode == 2:',
            f'                    y[r0 * {m} + i, :w * {co}] = ostrip[i, :w * {co}] + r[r0 * {m} + i, :w * {co}]',
            '                else:',
            f'                    y[r0 * {m} + i, :w * {co}] = ostrip[i, :w * {co}]']
    return '\n'.join(src) + '\n'


def _planes_to_rows(x, lo, hi, strip, y0):
    """strip[y - y0, 1 + j, c] = x[c, y, j] for lo <= y < hi (numba: compiled by :func:`_transposes`)."""
    nc, _, w = x.shape
    tmp = np.empty((16, 16), np.float32)  # 16 x 16 blocks: contiguous reads and writes of 16 floats
    for y in range(lo, hi):
        row = strip[y - y0]
        for c0 in range(0, nc, 16):
            c1 = min(c0 + 16, nc)
            for j0 in range(0, w, 16):
                j1 = min(j0 + 16, w)
                for c in range(c0, c1):
                    src, t = x[c, y, j0:j1], tmp[:, c - c0]
                    for j in range(j1 - j0):
                        t[j] = src[j]
                for j in range(j1 - j0):
                    dst, t = row[j0 + j + 1, c0:c1], tmp[j]
                    for c in range(c1 - c0):
                        dst[c] = t[c]


def _rows_to_planes(strip, rows, out, y0):
    """out[c, y0 + r, j] = strip[r, j, c] for r < rows, j < W (numba: compiled by :func:`_transposes`)."""
    nc, _, w = out.shape
    tmp = np.empty((16, 16), np.float32)
    for r in range(rows):
        row = strip[r]
        for c0 in range(0, nc, 16):
            c1 = min(c0 + 16, nc)
            for j0 in range(0, w, 16):
                j1 = min(j0 + 16, w)
                for j in range(j1 - j0):
                    src, t = row[j0 + j, c0:c1], tmp[:, j]
                    for c in range(c1 - c0):
                        t[c] = src[c]
                for c in range(c1 - c0):
                    dst, t = out[c0 + c, y0 + r, j0:j1], tmp[c]
                    for j in range(j1 - j0):
                        dst[j] = t[j]


def _transposes():
    """Compiled NCHW <-> channels-last strip copies (:func:`adasr.ops.codegen.compile_function`: machine code cached
    next to this file, compiled per process where that is not writable)."""
    if 'transposes' not in _numba_state:
        _numba_state['transposes'] = types.SimpleNamespace(planes_to_rows=codegen.compile_function(_planes_to_rows),
                                                           rows_to_planes=codegen.compile_function(_rows_to_planes))
    return _numba_state['transposes']


def _kernels(plan: '_Plan', c: int, co: int):
    """The compiled transforms for (plan, c, co), from generated source cached on disk (:mod:`adasr.ops.codegen`:
    compiling takes some seconds; loading from the cache a fraction of one)."""
    return codegen.load_module('winograd_kernels', (plan.name, c, co), f'winograd_{plan.name}_{c}_{co}',
                               lambda: kernel_source(plan, c, co))


# ---- cache of prepacked weights, keyed on the weight tensor (identity and version) -------------------------------

_cache: Dict[Tuple[int, str], Tuple['weakref.ref', int, Optional[torch.Tensor], int, WinogradConv3x3]] = {}
_cache_lock = threading.Lock()


def _prepacked(weight: torch.Tensor, bias: Optional[torch.Tensor], variant: str) -> WinogradConv3x3:
    key = (id(weight), variant)
    bias_key = (None, -1) if bias is None else (bias, bias._version)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] is bias_key[0] \
                and hit[3] == bias_key[1]:
            return hit[4]
    conv = WinogradConv3x3(weight, bias, variant)
    with _cache_lock:
        if key not in _cache:
            weakref.finalize(weight, _cache.pop, key, None)
        _cache[key] = (weakref.ref(weight), weight._version, bias_key[0], bias_key[1], conv)
    return conv


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False,
                     variant: str = DEFAULT_VARIANT) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (then ReLU when ``relu``) by Winograd ``variant``, inference only
    (raises ``RuntimeError`` when autograd would need a gradient). Weights are transformed once and cached."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and
                                                                                 bias.requires_grad)):
        raise RuntimeError('Winograd convolution is inference-only: call it under torch.no_grad() / '
                           'torch.inference_mode(), or use adasr.ops.winograd.conv3x3 (falls back to F.conv2d)')
    _check(x, weight.shape[1])
    return _forward(x, _prepacked(weight, bias, variant), relu)


def winograd_supported(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """True when :func:`winograd_conv3x3` can run these tensors (no autograd, float32 CPU, 3x3 kernel)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad))
    return (not grad and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == 'cpu' and not x.is_mkldnn
            and weight.dtype == torch.float32 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3)
            and x.shape[1] == weight.shape[1] and not torch.compiler.is_compiling())


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False,
            method: Optional[str] = None, residual: Optional[torch.Tensor] = None,
            inplace: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1)``, then ReLU when ``relu``, by ``method`` (``None``: option
    ``conv3x3`` / ``ADASR_CONV3X3``): ``'direct'`` (also ``'auto'``: a caller that has a choice of its own resolves
    it before), ``'winograd'`` or a variant of :data:`VARIANTS`. Winograd methods fall back to the direct convolution
    where Winograd cannot run (:func:`winograd_supported`).

    ``residual`` (not with ``relu``): returns ``conv + residual``, written into ``residual`` when ``inplace`` (which
    must not be ``x``), the numbers of ``conv3x3(...).add_(residual)``; Winograd methods on channels-last tensors
    add it in the output transform (no separate pass over the output)."""
    if residual is not None and inplace and residual is x:
        raise ValueError('conv3x3: inplace residual must not be the input')
    if method is None:
        from adasr.ops.config import get_option
        method = get_option('conv3x3')
    if method not in ('direct', 'auto'):
        variant = DEFAULT_VARIANT if method == 'winograd' else method
        if variant not in VARIANTS:
            raise ValueError(f"unknown conv3x3 method {method!r}; choose 'auto', 'direct', 'winograd' or one of "
                             f'{sorted(VARIANTS)}')
        if winograd_supported(x, weight, bias):
            return _forward(x, _prepacked(weight, bias, variant), relu, residual, inplace)
    y = F.conv2d(x, weight, bias, 1, 1)
    y = F.relu(y) if relu else y
    if residual is not None:
        _check_residual(residual, tuple(y.shape), relu, y)
    return _add_residual(y, residual, inplace)


__all__ = ['VARIANTS', 'DEFAULT_VARIANT', 'transform_matrices', 'WinogradConv3x3', 'winograd_conv3x3', 'conv3x3',
           'winograd_supported']
