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

Memory: only one tile's activations at a time plus the output canvas (``C * sH * sW`` floats, on ``out_device``).
:func:`auto_tile_size` picks the core side from the memory available (psutil on the CPU,
``torch.cuda.mem_get_info`` on CUDA) with the per-pixel memory model in :data:`MEMORY_MODEL`.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

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


def _round_up(value: int, multiple: int) -> int:
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
    pad = _round_up(tile_pad, multiple)
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

    Archs that pad inside ``forward`` (class attribute ``pads_input = True``) are called as they are.
    """
    bare = net.module if hasattr(net, 'module') else net
    if getattr(bare, 'pads_input', False) or multiple <= 1:
        return net

    def fn(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded, _, _ = pad_to_multiple(x, multiple, mode=mode)
        return net(padded)[..., :h * scale, :w * scale]

    return fn


def window_multiple(net: nn.Module, default: int = 1, net_opt: Optional[Mapping] = None) -> int:
    """The alignment a network wants for padding and tiles: ``net_opt['window_size']`` when its option file gives
    one (BasicSR's ``SwinIRModel`` pads to it), else the network's ``window_size``, else the largest ``window_size``
    of its submodules (basicsr's SwinIR keeps it only in its blocks), else ``default``."""
    if net_opt and net_opt.get('window_size'):
        return int(net_opt['window_size'])
    bare = net.module if hasattr(net, 'module') else net

    def size(m) -> int:
        ws = getattr(m, 'window_size', None)
        if isinstance(ws, (tuple, list)) and ws and all(isinstance(v, int) for v in ws):
            ws = max(ws)
        return ws if isinstance(ws, int) and not isinstance(ws, bool) and ws > 0 else 0

    found = size(bare) or max((size(m) for m in bare.modules()), default=0)
    return found or default


# ---------------------------------------------------------------------------------------------------------------------
# Automatic tile size
# ---------------------------------------------------------------------------------------------------------------------

GiB = 1024 ** 3
DEFAULT_CPU_BUDGET = 4 * GiB  # cap on the CPU; bigger tiles only save the overlap (<= 30 % at 512 px cores)
CPU_AVAILABLE_SHARE = 0.5  # of psutil's available memory
CUDA_AVAILABLE_SHARE = 0.8  # of torch.cuda.mem_get_info's free memory
UNKNOWN_BYTES_PER_PIXEL = 64 * 1024  # archs not in MEMORY_MODEL (conservative: small tiles, never too big)


def _width(net: nn.Module, first_conv: str, default: int) -> int:
    conv = getattr(net, first_conv, None)
    conv = conv[0] if isinstance(conv, nn.Sequential) and len(conv) else conv
    return int(getattr(conv, 'out_channels', default))


def _swinir_bytes(net: nn.Module) -> float:
    # basicsr's SwinIR x4, window 8: light (embed 60) measured 8.0 KiB/px, classical (embed 180) 14.7-22.9 KiB/px
    return 150.0 * getattr(net, 'embed_dim', 60)


# Peak memory growth of one fp32 forward pass per LR input pixel on the CPU (bytes), per arch class; the numbers were
# measured with ``scripts/benchmark_upscale.py calibrate`` (fresh process, RSS high-water mark minus RSS before the
# forward, windows of 256 and 512 px) and rounded up. ``min_window`` is the smallest window side that keeps the arch's
# behaviour (AdaFormer: 272 px keeps the eval global split at 8, as on big whole images).
MEMORY_MODEL = {
    'Bicubic': {'bytes_per_pixel': lambda net: 100.0 * net.upscale ** 2, 'min_window': 0},  # x4: 1.1-1.5 KiB/px
    'SwinIR': {'bytes_per_pixel': _swinir_bytes, 'min_window': 0},
    # PFT-light x4 (embed 52, window 32): 27.8 KiB/px at 256 px, 35.4 KiB/px at 384 px (the top-k state grows with
    # the windows, and dense maps are recomputed above ADASR_ATTN_MEMORY_MB); scaled by embed_dim for PFT classical
    # AdaFormer x4 (paper config): 5.4 KiB/px at 256 px, 5.8 KiB/px at 384 px (random weights, 50-80 % halted after
    # block 0); 8 KiB/px leaves room for inputs where few tokens halt. min_window 272: eval global split 8 in tiles
    'AdaFormer': {'bytes_per_pixel': lambda net: 8 * 1024.0 * max(1.0, _width(net, 'head', 64) / 64),
                  'min_window': 272},
    'PFT': {'bytes_per_pixel': lambda net: 40 * 1024.0 * max(1.0, getattr(net, 'embed_dim', 52) / 52), 'min_window': 0},
}


def memory_per_pixel(net: nn.Module) -> Tuple[float, int, str]:
    """(bytes per LR pixel of an fp32 forward, smallest useful window side, where the estimate comes from)."""
    bare = net.module if hasattr(net, 'module') else net
    entry = MEMORY_MODEL.get(type(bare).__name__)
    if entry is None:
        return float(UNKNOWN_BYTES_PER_PIXEL), 0, 'default estimate (arch not calibrated)'
    return float(entry['bytes_per_pixel'](bare)), int(entry['min_window']), f'MEMORY_MODEL[{type(bare).__name__!r}]'


def measure_cuda_bytes_per_pixel(fn: Callable[[torch.Tensor], torch.Tensor], in_channels: int, device: torch.device,
                                 dtype: torch.dtype, side: int = 128) -> float:
    """Peak CUDA memory of one forward of a ``side x side`` probe tile, per pixel (CUDA counts exactly)."""
    x = torch.rand(1, in_channels, side, side, device=device, dtype=dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        fn(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / (side * side)


def available_memory(device: torch.device) -> int:
    """Free memory that one run may use: psutil's ``available`` on the CPU, free device memory on CUDA."""
    device = torch.device(device)
    if device.type == 'cuda':
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def memory_budget(device: torch.device, max_memory: Optional[float] = None) -> int:
    """Bytes the activations of one tile may take: a share of :func:`available_memory`, capped by ``max_memory``
    (bytes; default :data:`DEFAULT_CPU_BUDGET` on the CPU, no cap on CUDA)."""
    device = torch.device(device)
    share = CUDA_AVAILABLE_SHARE if device.type == 'cuda' else CPU_AVAILABLE_SHARE
    budget = available_memory(device) * share
    cap = max_memory if max_memory is not None else (None if device.type == 'cuda' else DEFAULT_CPU_BUDGET)
    return int(budget if cap is None else min(budget, cap))


def choose_tile(h: int, w: int, bytes_per_pixel: float, budget: float, tile_pad: int, multiple: int = 1,
                min_window: int = 0, fixed_bytes: float = 0.0) -> int:
    """The core side (LR pixels) for an ``h x w`` image, or 0 when the whole image fits.

    Rule: a window of side ``s`` costs ``bytes_per_pixel * s**2``; the largest window that fits in
    ``budget - fixed_bytes`` (the output canvas) is used, minus ``2 * tile_pad`` of context, rounded down to
    ``multiple``; never smaller than ``multiple`` and ``tile_pad``, and grown until every window, edge windows
    included, is at least ``min_window`` px wide and high (where the image is that big).
    """
    if bytes_per_pixel <= 0:
        raise ValueError(f'bytes_per_pixel must be positive, got {bytes_per_pixel}')
    usable = max(budget - fixed_bytes, 0.0)
    if h * w * bytes_per_pixel <= usable:
        return 0
    pad = _round_up(tile_pad, multiple)
    side = int(math.sqrt(usable / bytes_per_pixel))
    core = (side - 2 * pad) // multiple * multiple
    core = max(core, multiple, tile_pad)
    if min_window:  # grow the tile until every window (edge ones included) is at least min_window where possible
        def smallest_window(t: int) -> bool:
            return all(s.win_end - s.win_start >= min(min_window, length)
                       for length in (h, w) for s in tile_spans(length, t, tile_pad, multiple))

        while core < max(h, w) and not smallest_window(core):
            core += multiple
    return 0 if core >= max(h, w) else core


def auto_tile_size(net: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], h: int, w: int, scale: int, *,
                   in_channels: int = 3, out_channels: int = 3, device: torch.device = torch.device('cpu'),
                   dtype: torch.dtype = torch.float32, tile_pad: int = 32, multiple: int = 1,
                   max_memory: Optional[float] = None, canvas_on_device: bool = False) -> Tuple[int, str]:
    """Pick the tile (core side, 0 = whole image) for one ``h x w`` input from the memory available.

    On the CPU the per-pixel cost comes from :data:`MEMORY_MODEL` (halved for half precision); on CUDA it is
    measured on a probe tile. The output canvas (``out_channels * (scale*h) * (scale*w)`` float32, twice for the
    final conversion) is charged to the budget when it lives on the same device. Returns (tile, explanation).
    """
    device = torch.device(device)
    bpp, min_window, source = memory_per_pixel(net)
    if device.type == 'cuda':
        bpp = 1.25 * measure_cuda_bytes_per_pixel(fn, in_channels, device, dtype, side=max(128, multiple * 2))
        source = 'measured on a CUDA probe tile (x1.25)'
    elif dtype in (torch.float16, torch.bfloat16):
        bpp *= 0.5
    budget = memory_budget(device, max_memory)
    canvas = 2.0 * 4 * out_channels * h * w * scale * scale
    fixed = canvas if (device.type == 'cpu' or canvas_on_device) else 0.0
    tile = choose_tile(h, w, bpp, budget, tile_pad, multiple, min_window, fixed)
    why = (f'{"whole image" if tile == 0 else f"tile {tile}"}: budget {budget / GiB:.2f} GiB, output canvas '
           f'{fixed / GiB:.2f} GiB, {bpp / 1024:.1f} KiB per LR pixel ({source})')
    return tile, why
