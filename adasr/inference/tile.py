"""Tiled, memory-bounded SR inference with overlapping tiles blended without seams.

One implementation serves the ``adasr-upscale`` CLI and ``AdaSRModel`` (``val: {tile: 256, tile_pad: 32}``).

The rule (per axis; the 2-D tiles are the products of the 1-D spans, and the blend weights are separable):

* **Cores.** The image side ``L`` is cut into ``n = ceil(L / tile)`` cores of nearly equal size whose boundaries are
  multiples of ``multiple`` (the arch's window). Cores partition the image.
* **Windows.** Each core is grown by ``tile_pad`` (rounded up to ``multiple``) on both sides and clipped to the
  image: that is what the network sees. Window starts are multiples of ``multiple`` and window sides are multiples
  of it except at the image's bottom/right border, so a window-attention network partitions a tile into exactly
  the windows it would use on the whole image (and pads only where whole-image inference pads too).
* **Blending.** Around each inner core boundary ``b`` the two neighbouring tiles are cross-faded with a raised-cosine
  ramp over ``[b - pad/2, b + pad/2]`` (LR pixels, applied at output resolution). Each tile therefore contributes
  only where it has at least ``pad/2`` LR pixels of real context, and full weight only at ``pad`` or more context
  from the seam, while the weights of all tiles sum to 1 at every output pixel (no seams, no visible steps).
  With ``tile_pad = 0`` the tiles are cut at the core boundaries (no overlap).
* **Exactness.** A network whose output at a pixel depends only on inputs within ``r`` LR pixels gives the
  whole-image result (to float rounding) when ``tile_pad >= 2 r``: MATLAB bicubic x4 (``r = 2``) needs 4.

Memory: only one tile's activations at a time plus the output canvas (``C * sH * sW`` floats, on ``out_device``);
:mod:`adasr.inference.memory` picks the tile size from the memory available.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from adasr.archs.interface import arch_traits
from adasr.archs.layers import pad_to_multiple
from adasr.utils.checks import check_int


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in LR pixels: the core ``[start, end)`` and the window ``[win_start, win_end)``."""

    start: int
    end: int
    win_start: int
    win_end: int


@dataclass(frozen=True)
class Tile:
    """One 2-D tile: its spans along y and x, and its index in the grid."""

    index: int
    count: int
    y: Span
    x: Span

    @property
    def window(self) -> Tuple[slice, slice]:
        return slice(self.y.win_start, self.y.win_end), slice(self.x.win_start, self.x.win_end)

    @property
    def core_in_window(self) -> Tuple[slice, slice]:
        """The core as slices of the window (LR pixels)."""
        return (slice(self.y.start - self.y.win_start, self.y.end - self.y.win_start),
                slice(self.x.start - self.x.win_start, self.x.end - self.x.win_start))

    @property
    def core(self) -> Tuple[slice, slice]:
        return slice(self.y.start, self.y.end), slice(self.x.start, self.x.end)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_spans(length: int, tile: int, tile_pad: int, multiple: int = 1) -> List[Span]:
    """Cores and windows along one axis of ``length`` LR pixels (see the module docstring).

    Args:
        length: image side.
        tile: largest core side; 0 (or >= length) gives one span covering everything.
        tile_pad: context added on each side of a core (rounded up to ``multiple``).
        multiple: alignment of core boundaries and window starts (the arch's window size).
    """
    for name, value, low in (('length', length, 1), ('tile', tile, 0), ('tile_pad', tile_pad, 0),
                             ('multiple', multiple, 1)):
        check_int(name, value, low)
    if tile == 0 or tile >= length:
        return [Span(0, length, 0, length)]
    tile = max(tile, multiple)
    pad = round_up(tile_pad, multiple)
    n = math.ceil(length / tile)
    bounds = [0]
    for i in range(1, n):
        b = int(round(i * length / n / multiple)) * multiple
        if bounds[-1] < b < length:
            bounds.append(b)
    bounds.append(length)
    return [Span(a, b, max(0, a - pad), min(length, b + pad)) for a, b in zip(bounds[:-1], bounds[1:])]


def make_tiles(h: int, w: int, tile: int, tile_pad: int, multiple: int = 1) -> List[Tile]:
    """The row-major grid of :class:`Tile` for an ``h x w`` image."""
    ys, xs = tile_spans(h, tile, tile_pad, multiple), tile_spans(w, tile, tile_pad, multiple)
    count = len(ys) * len(xs)
    return [Tile(i * len(xs) + j, count, y, x) for i, y in enumerate(ys) for j, x in enumerate(xs)]


def blend_weights(spans: Sequence[Span], scale: int, dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None) -> List[torch.Tensor]:
    """1-D blend weights of every span over its window, at output resolution (``scale`` pixels per LR pixel).

    The weights of all spans sum to 1 at every output position. Around an inner boundary ``b`` shared by spans
    A (left) and B (right) the ramp runs over ``[b - z/2, b + z/2]`` LR pixels with ``z`` the pad actually
    available on both sides (``min(pad of A, pad of B)``, and at most the shorter core so that ramps never overlap):
    ``w_B = (1 - cos(pi t)) / 2`` at output-pixel centres, ``w_A = 1 - w_B``.

    Returns:
        one float tensor of length ``scale * (win_end - win_start)`` per span.
    """
    ramps = []  # per inner boundary: (b, z) in LR pixels
    for a, b in zip(spans[:-1], spans[1:]):
        z = min(a.win_end - a.end, b.start - b.win_start)  # context on each side of the boundary
        z = min(z, a.end - a.start, b.end - b.start)
        ramps.append((a.end, z))
    out = []
    for i, s in enumerate(spans):
        pos = (torch.arange(s.win_start * scale, s.win_end * scale, dtype=torch.float64, device=device) + 0.5) / scale
        w = torch.ones_like(pos)
        if i > 0:  # rising edge at the boundary with the previous span
            w = w * _rise(pos, *ramps[i - 1])
        if i < len(spans) - 1:  # falling edge at the boundary with the next span
            w = w * (1 - _rise(pos, *ramps[i]))
        out.append(w.to(dtype))
    return out


def _rise(pos: torch.Tensor, b: int, z: int) -> torch.Tensor:
    """0 before ``b - z/2``, 1 after ``b + z/2``, raised cosine between (a step at ``b`` when ``z == 0``)."""
    if z <= 0:
        return (pos >= b).to(pos.dtype)
    t = ((pos - (b - z / 2)) / z).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def tiled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int, tile: int,
                  tile_pad: int = 32, multiple: int = 1, *, out_device: Optional[torch.device] = None,
                  out_dtype: torch.dtype = torch.float32, progress: bool = False, desc: str = 'tiles',
                  on_tile: Optional[Callable[[Tile, torch.Tensor], None]] = None) -> torch.Tensor:
    """Run ``fn`` tile by tile and blend the outputs (see the module docstring for the rule).

    Args:
        fn: maps (B, C, h, w) to (B, C_out, scale*h, scale*w) for any h, w (pad inside; see :func:`padded_forward`).
        x: (B, C, H, W) input on the device ``fn`` runs on (tiles are sliced from it without copying it).
        scale: output pixels per input pixel.
        tile: core side in LR pixels; 0 runs the whole image in one call.
        tile_pad: context on each side of a core, LR pixels (rounded up to ``multiple``).
        multiple: alignment of tiles (the arch's window size).
        out_device: where the output canvas lives (default: ``x``'s device); e.g. the CPU for a GPU run.
        out_dtype: canvas dtype. Default: float32.
        progress: show a tqdm bar over tiles.
        desc: the bar's label.
        on_tile: called after each tile as ``on_tile(tile, tile_output)`` (e.g. to collect AdaFormer's halting maps
            of that tile from the network).

    Returns:
        (B, C_out, scale*H, scale*W) on ``out_device``.
    """
    if x.dim() != 4:
        raise ValueError(f'tiled_forward expects (B, C, H, W), got shape {tuple(x.shape)}')
    h, w = x.shape[-2:]
    tiles = make_tiles(h, w, tile, tile_pad, multiple)
    out_device = torch.device(out_device) if out_device is not None else x.device
    ys = sorted({t.y for t in tiles}, key=lambda s: s.start)
    xs = sorted({t.x for t in tiles}, key=lambda s: s.start)
    wy = dict(zip(ys, blend_weights(ys, scale, out_dtype, out_device)))
    wx = dict(zip(xs, blend_weights(xs, scale, out_dtype, out_device)))

    bar = None
    if progress and len(tiles) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(tiles), desc=desc, unit='tile', leave=False, dynamic_ncols=True)
    out = None
    try:
        for t in tiles:
            ry, rx = t.window
            y = fn(x[..., ry, rx])
            expect = ((t.y.win_end - t.y.win_start) * scale, (t.x.win_end - t.x.win_start) * scale)
            if tuple(y.shape[-2:]) != expect:
                raise RuntimeError(f'the network returned {tuple(y.shape[-2:])} for a {ry.stop - ry.start}x'
                                   f'{rx.stop - rx.start} tile; expected {expect} at scale {scale}')
            if on_tile is not None:
                on_tile(t, y)
            if len(tiles) == 1:
                return y.to(device=out_device, dtype=out_dtype)
            if out is None:
                out = torch.zeros(*y.shape[:-2], h * scale, w * scale, dtype=out_dtype, device=out_device)
            y = y.to(device=out_device, dtype=out_dtype)
            weight = wy[t.y][:, None] * wx[t.x][None, :]
            out[..., ry.start * scale:ry.stop * scale, rx.start * scale:rx.stop * scale].addcmul_(y, weight)
            del y
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def padded_forward(net: nn.Module, scale: int, multiple: int = 1,
                   mode: str = 'reflect') -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(x)`` that pads ``x`` to ``multiple`` (bottom/right), runs ``net`` and crops to ``scale * size``.

    Archs that pad inside ``forward`` (``arch_traits(net).pads_input``) are called as they are.
    """
    if arch_traits(net).pads_input or multiple <= 1:
        return net

    def fn(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded, _, _ = pad_to_multiple(x, multiple, mode=mode)
        return net(padded)[..., :h * scale, :w * scale]

    return fn
