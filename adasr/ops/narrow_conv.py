"""Narrow convolutions in PyTorch's own summation orders, fast: 3x3 convolutions to a single output channel
(AdaFormer's confidence-estimator logits; oneDNN's order) and 1x1 convolutions of a few channels (the EDSR MeanShift
at the input and output; :func:`conv1x1_narrow`, below).

oneDNN convolves a map to one output channel with its blocked direct kernel: the output channel padded to a vector
of 16 (AVX-512) or 8 (AVX2) lanes, so 16 or 8 times the multiply-adds, after a reorder of the input into the blocked
layout (17-19 ms for a 32 x 272 x 480 map on one AVX-512 core). Each output's sum there has a fixed order, one fused
multiply-add per product: the input channels in blocks of the vector width, in each block the taps row by row and
column by column and each tap's channels in order (taps outside the image skipped); the AVX-512 kernel sums each
block from zero, adds the bias to the first block's sum and each later block's sum to the result, the AVX2 kernel
runs one chain from the bias through every block. :func:`conv3x3_to_one` computes the same chains, vectorised over
the output columns (numba): the same numbers bit for bit, 2.6 ms there.

PyTorch hands a 3x3 float32 CPU convolution to oneDNN only for a batch above one or a map of more than 20480
elements (:func:`pytorch_uses_onednn`); smaller single maps get its own im2col and GEMM, whose order differs, and
:func:`conv3x3_to_one` leaves them to it. With ``onednn_order=True`` it gives oneDNN's numbers whatever the shape:
windows cut from a large map (with their halo) then get the numbers the whole map's convolution has there.

The order is not assumed: :func:`summation_order` compares the kernel with PyTorch's own convolution on small random
maps (a batch of two, a single map just above the threshold, rows 1000 wide) once per process and channel count,
for each order of :data:`ORDERS`. Where none matches (another oneDNN kernel, blocking or dispatch rule, a CPU
without fused multiply-add, numba missing) :func:`conv3x3_to_one` is PyTorch's convolution. Inference only:
callers use it without autograd (``adasr.ops.cpu_inference.onednn_ok``).
"""
import math
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from adasr.ops import codegen

#: the summation orders tried by :func:`summation_order`: (channels per block, one chain through all blocks) --
#: oneDNN's AVX-512 kernel (blocks of 16 summed apart) and its AVX2 kernel (blocks of 8, one chain from the bias)
ORDERS = ((16, False), (8, True), (16, True), (8, False))
#: PyTorch convolves a 3x3 float32 CPU map by oneDNN when its batch is above one or it has more elements than this
#: (``use_mkldnn`` in ATen's Convolution.cpp); smaller maps by its own im2col and GEMM, with other rounding
ONEDNN_MIN_ELEMENTS = 20480
#: output rows per task on the worker pool (:mod:`adasr.ops.scheduling`)
ROWS_PER_TASK = 16

_state = {}
_orders: Dict[int, Optional[Tuple[int, bool]]] = {}
_lock = threading.Lock()


def _kernel_rows(x, w, bias, out, pad, block, chained, r0, r1):
    """out[b, i] for rows r0 <= i < r1 of every sample: x (N, C, H, W), w (C, 3, 3), bias float32, out (N, Ho, Wo),
    ``pad`` 0 or 1, ``block`` channels per block (four channels per pass over a row, one FMA each, in order).
    ``chained``: one chain from the bias through every block; else each block's chain from zero, the bias added
    to the first block's sum and each later block's sum added to the result."""
    n, nc, h, wd = x.shape
    wo = out.shape[2]
    acc = np.empty(wo, np.float32)
    for b in range(n):
        for i in range(r0, r1):
            o = out[b, i]
            for c0 in range(0, nc, block):
                if not chained:
                    for j in range(wo):
                        acc[j] = np.float32(0.0)
                elif c0 == 0:
                    for j in range(wo):
                        acc[j] = bias
                for ky in range(3):
                    yy = i + ky - pad
                    if yy < 0 or yy >= h:
                        continue
                    for kx in range(3):
                        off = kx - pad
                        j0, j1 = max(0, -off), min(wo, wd - off)
                        a = acc[j0:j1]
                        for c in range(c0, c0 + block, 4):
                            w0, w1, w2, w3 = w[c, ky, kx], w[c + 1, ky, kx], w[c + 2, ky, kx], w[c + 3, ky, kx]
                            # the rows from their first column read (indices from zero: no wrap-around test)
                            x0, x1 = x[b, c, yy, j0 + off:j1 + off], x[b, c + 1, yy, j0 + off:j1 + off]
                            x2, x3 = x[b, c + 2, yy, j0 + off:j1 + off], x[b, c + 3, yy, j0 + off:j1 + off]
                            for j in range(j1 - j0):
                                s = a[j] + w0 * x0[j]  # fastmath 'contract': each line one FMA
                                s = s + w1 * x1[j]
                                s = s + w2 * x2[j]
                                a[j] = s + w3 * x3[j]
                if chained:
                    continue
                if c0 == 0:
                    for j in range(wo):
                        o[j] = acc[j] + bias
                else:
                    for j in range(wo):
                        o[j] = o[j] + acc[j]
            if chained:
                for j in range(wo):
                    o[j] = acc[j]


def _kernel():
    """The compiled :func:`_kernel_rows` (numba, cached on disk where it can be), or None without numba."""
    if 'kernel' not in _state:  # fused multiply-adds, nothing reordered
        _state['kernel'] = codegen.compile_function(_kernel_rows, fastmath={'contract'})
    return _state['kernel']


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int, order: Tuple[int, bool]
         ) -> torch.Tensor:
    from adasr.ops.scheduling import parallel_for

    n, _, h, w = x.shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    out = x.new_empty(n, 1, ho, wo)
    kernel = _kernel()
    xs, ws, ys = x.detach().numpy(), weight[0].detach().contiguous().numpy(), out.numpy().reshape(n, ho, wo)
    b = np.float32(bias.item()) if bias is not None else np.float32(0.0)
    if torch.get_num_threads() > 1 and ho > ROWS_PER_TASK:
        parallel_for(lambda r: kernel(xs, ws, b, ys, padding, order[0], order[1], r, min(ho, r + ROWS_PER_TASK)),
                     list(range(0, ho, ROWS_PER_TASK)))
    else:
        kernel(xs, ws, b, ys, padding, order[0], order[1], 0, ho)
    return out


def summation_order(channels: int) -> Optional[Tuple[int, bool]]:
    """The summation order ``(block width, chained)`` (:data:`ORDERS`) in which :func:`conv3x3_to_one`'s kernel
    gives PyTorch's CPU float32 convolution of ``channels`` input channels bit for bit (checked once per process
    and channel count on random maps: a batch of two with and without padding, one map just above PyTorch's
    threshold for oneDNN, one with rows 1000 wide), or None (then PyTorch's convolution is used)."""
    with _lock:
        if channels not in _orders:
            _orders[channels] = _find_order(channels)
        return _orders[channels]


def _find_order(channels: int) -> Optional[Tuple[int, bool]]:
    if _kernel() is None or not pytorch_uses_onednn((2, channels, 1, 1)):
        return None
    gen = torch.Generator().manual_seed(12345)
    side = math.isqrt(ONEDNN_MIN_ELEMENTS // channels) + 1  # a square single map just above the threshold
    cases = [(torch.randn(2, channels, 7, 37, generator=gen).tanh(), pad) for pad in (0, 1)]
    cases.append((torch.randn(1, channels, side, side, generator=gen).tanh(), 1))
    cases.append((torch.randn(1, channels, 9, 1000, generator=gen).tanh(), 1))  # wide rows, as images have
    w = torch.randn(1, channels, 3, 3, generator=gen) * 0.3
    b = torch.randn(1, generator=gen)
    with torch.no_grad():
        refs = [F.conv2d(x, w, b, 1, pad) for x, pad in cases]
    for order in ORDERS:
        if channels % order[0] == 0 and all(torch.equal(_run(x, w, b, pad, order), ref)
                                            for (x, pad), ref in zip(cases, refs)):
            return order
    return None


def pytorch_uses_onednn(shape) -> bool:
    """Whether PyTorch convolves a float32 CPU map of ``shape`` (N, C, H, W) by a 3x3 kernel with oneDNN."""
    n, c, h, w = shape
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (n > 1 or n * c * h * w > ONEDNN_MIN_ELEMENTS))


def conv3x3_to_one(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   padding: int = 1, onednn_order: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding)`` for a (1, C, 3, 3) ``weight`` (one output channel), bit for bit:
    by the compiled kernel where PyTorch would convolve by oneDNN (:func:`pytorch_uses_onednn`) and
    :func:`summation_order` found oneDNN's order for ``C`` channels (a float32 CPU ``x`` (N, C, H, W), ``padding`` 0 or
    1, no autograd), else by ``F.conv2d``. ``onednn_order``: oneDNN's numbers whatever the shape (those PyTorch
    gives a larger map: patches cut from a map convolved with the whole map's numbers)."""
    if (weight.shape[0] == 1 and tuple(weight.shape[2:]) == (3, 3) and padding in (0, 1) and x.dim() == 4
            and x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and not x.is_mkldnn
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.shape[-2] + 2 * padding > 2 and x.shape[-1] + 2 * padding > 2
            and (onednn_order or pytorch_uses_onednn(x.shape)) and not torch.compiler.is_compiling()):
        order = summation_order(x.shape[1]) if x.shape[1] == weight.shape[1] else None
        if order is not None:
            return _run(x.contiguous(), weight, bias, padding, order)
    return F.conv2d(x, weight, bias, 1, padding)


# ---- 1x1 convolutions of a few channels ------------------------------------------------------------------------
#
# PyTorch convolves a float32 CPU map by a 1x1 kernel with its own GEMM on one thread and with oneDNN from two threads
# up (``use_mkldnn``, ATen's Convolution.cpp: "for 1x1 filters, MKLDNN is faster than THNN when multi-threaded").
# With three channels oneDNN's kernel is slow: 25-120 ms for a 3 x 1088 x 1920 image on two AVX-512 cores (its
# blocked layout pads the channels to a vector), 4-7 ms by the GEMM on one. Each output's sum has a fixed order in
# both: from the bias through the input channels in order, a product rounded and added (the GEMM, which starts from
# the bias it was given as its output) or one fused multiply-add (oneDNN) per channel. The kernel below computes
# either chain over blocks of pixels; which one PyTorch takes for a call is checked, not assumed.

#: most input or output channels for :func:`conv1x1_narrow` (wider 1x1 convolutions are GEMMs PyTorch runs well)
NARROW_MAX_CHANNELS = 4
#: pixels per block of the compiled sum (:data:`_MIX_SOURCE`) and per task on the worker pool
MIX_PIXELS = 4096

_mix_orders: Dict[Tuple[int, int, bool, bool], Optional[bool]] = {}


_MIX_SOURCE = """import numpy as np
import numba


@numba.njit(nogil=True, cache=True{options})
def mix_pixels(x, w, bias, out, p0, p1):
    \"\"\"out[b, o, p] = bias[o] + w[o, 0] x[b, 0, p] + w[o, 1] x[b, 1, p] + ..., summed in that order, for
    pixels p0 <= p < p1 of every sample: x (N, C, P), w (Co, C), out (N, Co, P), in blocks of {block} pixels.\"\"\"
    n, nc, _ = x.shape
    co = w.shape[0]
    acc = np.empty({block}, np.float32)
    for b in range(n):
        for q0 in range(p0, p1, {block}):
            q1 = min(p1, q0 + {block})
            a = acc[:q1 - q0]
            for o in range(co):
                bo = bias[o]
                for j in range(q1 - q0):
                    a[j] = bo
                for c in range(nc):
                    wc, src = w[o, c], x[b, c, q0:q1]
                    for j in range(q1 - q0):
                        a[j] = a[j] + wc * src[j]
                dst = out[b, o, q0:q1]
                for j in range(q1 - q0):
                    dst[j] = a[j]
"""


def _mix_kernel(fused: bool):
    """The compiled sum of :data:`_MIX_SOURCE`: each product rounded and then added, or with ``fused`` one fused
    multiply-add each (fastmath 'contract'); a generated module per variant (:mod:`adasr.ops.codegen`: numba's
    cache keeps each one's machine code apart). None without numba."""
    key = 'mix_fma' if fused else 'mix'
    if key not in _state:
        options = ", fastmath={'contract'}" if fused else ''
        _state[key] = codegen.load_module('narrow_conv', key, key, lambda: _MIX_SOURCE.format(
            options=options, block=MIX_PIXELS)).mix_pixels if codegen.numba_available() else None
    return _state[key]


def pytorch_1x1_uses_onednn(shape) -> bool:
    """Whether PyTorch convolves a float32 CPU map of ``shape`` (N, C, H, W) by a 1x1 kernel (stride 1) with oneDNN
    at the current thread count."""
    n, c, h, w = shape
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (n >= 16 or torch.get_num_threads() > 1) and (n > 1 or n * c * h * w > ONEDNN_MIN_ELEMENTS))


def _mix(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    from adasr.ops.scheduling import parallel_for

    n, c, h, w = x.shape
    co = weight.shape[0]
    out = x.new_empty(n, co, h, w)
    kernel = _mix_kernel(fused)
    xs, ys = x.detach().reshape(n, c, h * w).numpy(), out.view(n, co, h * w).numpy()
    ws = weight.detach().reshape(co, c).contiguous().numpy()
    bs = (bias.detach().contiguous() if bias is not None else torch.zeros(co)).numpy()
    p = h * w
    if torch.get_num_threads() > 1 and p > MIX_PIXELS:
        parallel_for(lambda q: kernel(xs, ws, bs, ys, q, min(p, q + MIX_PIXELS)), list(range(0, p, MIX_PIXELS)))
    else:
        kernel(xs, ws, bs, ys, 0, p)
    return out


def mix_order(cin: int, cout: int, shape) -> Optional[bool]:
    """Whether PyTorch's 1x1 convolution of a map of ``shape`` at the current thread count sums with fused
    multiply-adds (True) or rounded products (False), as :data:`_MIX_SOURCE` computes them, or None where neither
    gives its numbers bit for bit. Checked once per process, channel counts and dispatch case (oneDNN or not, batch
    of 16 or more) on random maps of that case."""
    onednn, big_batch = pytorch_1x1_uses_onednn(shape), shape[0] >= 16
    key = (cin, cout, onednn, big_batch)
    with _lock:
        if key not in _mix_orders:
            _mix_orders[key] = _find_mix_order(cin, cout, onednn, big_batch)
        return _mix_orders[key]


def _find_mix_order(cin: int, cout: int, onednn: bool, big_batch: bool) -> Optional[bool]:
    if _mix_kernel(False) is None or _mix_kernel(True) is None:
        return None
    gen = torch.Generator().manual_seed(4321)
    if big_batch:
        shapes = [(16, cin, 5, 9)]
    elif onednn:  # more than one thread here: a batch of two and a single map above the threshold
        shapes = [(2, cin, 7, 37), (1, cin, 3, ONEDNN_MIN_ELEMENTS // (3 * cin) + 5)]
    else:
        shapes = [(1, cin, 7, 37)] + ([(2, cin, 7, 37), (1, cin, 9, 3000)] if torch.get_num_threads() == 1 else [])
    cases = [torch.randn(s, generator=gen) * 100 for s in shapes]
    w = torch.randn(cout, cin, 1, 1, generator=gen)
    b = torch.randn(cout, generator=gen) * 100
    if any(pytorch_1x1_uses_onednn(x.shape) != onednn for x in cases):
        return None
    with torch.no_grad():
        refs = [F.conv2d(x, w, b) for x in cases]
    for fused in (True, False):
        if all(torch.equal(_mix(x, w, b, fused), ref) for x, ref in zip(cases, refs)):
            return fused
    return None


def conv1x1_narrow(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` of at most :data:`NARROW_MAX_CHANNELS` input and output
    channels, bit for bit: by the compiled kernel where :func:`mix_order` found PyTorch's order for this call (a
    float32 CPU map, no autograd), else by ``F.conv2d``."""
    if (x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and x.shape[1] == weight.shape[1]
            and max(weight.shape[:2]) <= NARROW_MAX_CHANNELS and x.device.type == 'cpu' and not x.is_mkldnn
            and x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                                  (bias is not None and bias.requires_grad)))
            and x.numel() > 0 and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                                       or torch.onnx.is_in_onnx_export())):
        fused = mix_order(weight.shape[1], weight.shape[0], x.shape)
        if fused is not None:
            return _mix(x.contiguous(), weight, bias, fused)
    return F.conv2d(x, weight, bias)


__all__ = ['conv3x3_to_one', 'summation_order', 'pytorch_uses_onednn', 'ORDERS', 'ONEDNN_MIN_ELEMENTS',
           'conv1x1_narrow', 'mix_order', 'pytorch_1x1_uses_onednn', 'NARROW_MAX_CHANNELS']
