"""Layers shared by the adasr architectures.

Generic pieces only: window partition/reverse, the Swin relative-position index, an MLP, input padding,
and the pixel-shuffle upsamplers. Model-specific attention lives in each ``*_arch.py`` (the split timm uses).
"""
import math
from typing import Literal, Tuple

import torch
from torch import nn
from torch.nn import functional as F

PadMode = Literal['reflect', 'symmetric', 'replicate', 'constant']

#: DIV2K's RGB mean, subtracted at the input by EDSR-style networks (AdaFormer, PFT, HAT, ATD, SwinIR).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping square windows.

    Args:
        x: (B, H, W, C), H and W multiples of ``window_size``.
        window_size: window side.

    Returns:
        (B * nW, window_size * window_size, C); windows are batch-major, then row-major over the window
        grid, and tokens are row-major inside a window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B * nW, window_size * window_size, C) (or (B * nW, ws, ws, C)).
        window_size: window side.
        h, w: size of the feature map the windows came from.

    Returns:
        (B, H, W, C).
    """
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.reshape(b, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Swin relative-position index for a square window.

    ``index[i, j] = (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1)`` with ``(dy, dx) = pos(i) - pos(j)`` and tokens
    row-major in the window.

    Returns:
        (ws*ws, ws*ws) int64 tensor with values in [0, (2 ws - 1)^2).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # 2, ws*ws
    rel = coords[:, :, None] - coords[:, None, :]  # 2, n, n
    rel = rel + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


def symmetric_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad the bottom and right of (B, C, H, W) by mirroring with the edge pixel repeated.

    Equivalent to ``numpy.pad(mode='symmetric')``; ``F.pad(mode='reflect')`` does not repeat the edge.
    Pads larger than the image are handled by repeating the mirror (period 2H), which the PFT authors' code
    cannot do.
    """
    if pad_h:
        x = _symmetric_pad_dim(x, pad_h, dim=2)
    if pad_w:
        x = _symmetric_pad_dim(x, pad_w, dim=3)
    return x


def _symmetric_pad_dim(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    idx = torch.arange(n + pad, device=x.device) % (2 * n)
    idx = torch.where(idx < n, idx, 2 * n - 1 - idx)
    return x.index_select(dim, idx)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: PadMode = 'reflect') -> Tuple[torch.Tensor, int, int]:
    """Pad (B, C, H, W) at the bottom and right so that H and W are multiples of ``multiple``.

    When the pad is not smaller than the side (``F.pad`` would raise), ``reflect`` is continued periodically: the
    reflection without repeating the edge sample, period ``2 * (side - 1)`` (a side of 1 is repeated); the
    authors' models never see such inputs, so the faithful path is unchanged.

    Returns:
        (padded tensor, pad_h, pad_w).
    """
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, 0, 0
    if mode == 'symmetric':
        return symmetric_pad(x, pad_h, pad_w), pad_h, pad_w
    if mode == 'reflect' and (pad_h >= h or pad_w >= w):
        return _reflect_pad_periodic(x, pad_h, pad_w), pad_h, pad_w
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), pad_h, pad_w


def _reflect_pad_periodic(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    for dim, pad in ((2, pad_h), (3, pad_w)):
        n = x.shape[dim]
        if pad == 0:
            continue
        if n == 1:
            idx = torch.zeros(n + pad, dtype=torch.long, device=x.device)
        else:
            period = 2 * (n - 1)
            idx = torch.arange(n + pad, device=x.device) % period
            idx = torch.where(idx < n, idx, period - idx)
        x = x.index_select(dim, idx)
    return x


class Mlp(nn.Module):
    """Linear, GELU, Linear (the transformer MLP). Parameter names ``fc1``/``fc2`` as in Swin/timm."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int = None):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PixelShuffleDirect(nn.Sequential):
    """One 3x3 conv to ``out_ch * scale**2`` channels, then PixelShuffle (the lightweight SR head).

    State-dict names: ``0.weight``, ``0.bias``.
    """

    def __init__(self, in_ch: int, out_ch: int, scale: int):
        super().__init__(nn.Conv2d(in_ch, out_ch * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))


class PixelShuffleUpsample(nn.Sequential):
    """The classical SR upsampler: log2(s) x [conv3x3 to 4C, PixelShuffle(2)] for powers of two, or one
    conv3x3 to 9C and PixelShuffle(3) for s = 3. State-dict names ``0``, ``2``, ... as in EDSR/SwinIR."""

    def __init__(self, scale: int, num_feat: int):
        layers = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f'upscale {scale} is not supported: use a power of 2 or 3')
        super().__init__(*layers)
