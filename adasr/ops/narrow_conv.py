"""3x3 convolutions to a single output channel (AdaFormer's confidence-estimator logits), fast and in oneDNN's
summation order.

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


__all__ = ['conv3x3_to_one', 'summation_order', 'pytorch_uses_onednn', 'ORDERS', 'ONEDNN_MIN_ELEMENTS']
