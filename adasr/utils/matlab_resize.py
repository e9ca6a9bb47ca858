"""MATLAB-compatible bicubic ``imresize`` for batched tensors on any device.

The kernel weights and source indices come from BasicSR's own MATLAB port
(:func:`basicsr.utils.matlab_functions.calculate_weights_indices`: Keys cubic a=-0.5, antialiasing when
downscaling, symmetric border handling, output size ``ceil(in * scale)``). BasicSR applies them with a Python loop
over output rows and channels on (C, H, W) CPU tensors; here the same weights are applied with one gather per
kernel tap, on (..., H, W) tensors, in float32 or float64, on the CPU or a GPU. The result equals BasicSR's
``imresize`` up to float rounding (checked in the tests).
"""
import math
from functools import lru_cache
from typing import Tuple

import torch
from basicsr.utils.matlab_functions import calculate_weights_indices


@lru_cache(maxsize=64)
def weights_indices(in_len: int, out_len: int, scale: float, antialiasing: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """MATLAB bicubic resampling along one axis of ``in_len`` samples to ``out_len``: (out_len, taps) float32
    weights and int64 source indices already folded into [0, in_len). ``taps`` is the kernel support."""
    weights, indices, sym_start, _ = calculate_weights_indices(in_len, out_len, scale, 'cubic', 4, antialiasing)
    # BasicSR's indices are 0-based positions in the axis padded by ``sym_start`` mirrored samples at the start;
    # map them back to the original axis, mirroring with the edge sample repeated (MATLAB's 'symmetric').
    # The fold is periodic (period 2 * in_len) so that tiny inputs with wide antialiasing kernels stay in range.
    return weights, _fold(indices.long() - sym_start, in_len)


def _fold(src: torch.Tensor, in_len: int) -> torch.Tensor:
    """Positions on an axis extended by mirroring with the edge sample repeated, folded into [0, in_len)."""
    src = src % (2 * in_len)
    return torch.where(src < in_len, src, 2 * in_len - 1 - src)


def imresize(x: torch.Tensor, scale: float, antialiasing: bool = True) -> torch.Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')`` on the last two dimensions of ``x``.

    Args:
        x: (..., H, W) floating tensor (any range; not clamped or rounded).
        scale: the same factor for both sides; output size is ``ceil(H*scale) x ceil(W*scale)``.
        antialiasing: widen the kernel when downscaling, as MATLAB does. Default: True.

    Returns:
        (..., ceil(H*scale), ceil(W*scale)) tensor of the input's dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f'imresize expects a floating tensor, got {x.dtype}')
    h, w = x.shape[-2:]
    out_h, out_w = math.ceil(h * scale), math.ceil(w * scale)
    x = _resize_dim(x, -2, h, out_h, scale, antialiasing)
    return _resize_dim(x, -1, w, out_w, scale, antialiasing)


def _resize_dim(x: torch.Tensor, dim: int, in_len: int, out_len: int, scale: float, aa: bool) -> torch.Tensor:
    weights, src = weights_indices(in_len, out_len, float(scale), bool(aa))
    return _apply_taps(x, dim, weights, src)


def _apply_taps(x: torch.Tensor, dim: int, weights: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Output sample i along ``dim`` = sum over taps t of ``weights[i, t] * x[src[i, t]]``."""
    weights = weights.to(device=x.device, dtype=x.dtype)
    src = src.to(x.device)
    shape = [1] * x.dim()
    shape[dim] = src.shape[0]
    out = None
    for t in range(weights.shape[1]):
        term = x.index_select(dim, src[:, t]) * weights[:, t].view(shape)
        out = term if out is None else out + term
    return out


#: Colour images with more pixels than this are resized one channel at a time (a third of the float64 memory).
LARGE_IMAGE_PIXELS = 16_000_000


def imresize_uint8(img, scale: float):
    """MATLAB ``imresize(img, scale, 'bicubic')`` on a uint8 (H, W) or (H, W, C) numpy image, rounded to uint8.

    This is how the classic benchmark LR images (and DIV2K's bicubic LR) were made. Channels of very large images
    (above :data:`LARGE_IMAGE_PIXELS`, e.g. 8K) are resized one at a time: same result, about a third of the memory.
    """
    import numpy as np

    if img.dtype != np.uint8:
        raise TypeError(f'expected a uint8 image, got {img.dtype}')
    if img.ndim == 3 and img.shape[2] > 1 and img.shape[0] * img.shape[1] > LARGE_IMAGE_PIXELS:
        return np.ascontiguousarray(np.stack([imresize_uint8(np.ascontiguousarray(img[:, :, c]), scale)
                                              for c in range(img.shape[2])], axis=2))
    x = torch.from_numpy(np.ascontiguousarray(img)).double()
    x = x.permute(2, 0, 1) if x.dim() == 3 else x
    y = imresize(x, scale).clamp_(0, 255).round_().to(torch.uint8)
    y = y.permute(1, 2, 0) if y.dim() == 3 else y
    return y.numpy()


def upscale_phases(scale: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """MATLAB bicubic weights of an integer upscale, which repeat with period ``scale`` along the output:
    output sample ``q * scale + r`` is ``sum_t weights[r, t] * x[q + offsets[r, t]]`` before the symmetric fold.
    Returns (scale, taps) float32 weights and int64 offsets, from BasicSR's weights (for an axis of 4 samples)."""
    weights, src, sym_start, _ = calculate_weights_indices(4, 4 * scale, float(scale), 'cubic', 4, True)
    return weights[:scale], src[:scale].long() - sym_start


def imresize_upscale_traceable(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`imresize` for an integer upscale, given its :func:`upscale_phases`, without Python code on the input
    size (for graph export with dynamic sizes): the source indices are computed with tensor operations."""
    scale = weights.shape[0]
    for dim in (-2, -1):
        n = x.shape[dim]
        i = torch.arange(n * scale, device=x.device)
        phase = i % scale
        src = _fold((i // scale)[:, None] + offsets[phase], n)
        x = _apply_taps(x, dim, weights[phase], src)
    return x


def kernel_taps(in_len: int, scale: float, antialiasing: bool = True) -> int:
    """Kernel taps per output sample when an axis of ``in_len`` samples is resized by ``scale``."""
    return int(weights_indices(in_len, math.ceil(in_len * scale), float(scale), antialiasing)[0].shape[1])
