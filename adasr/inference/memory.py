"""How big a tile may be: the memory available and each arch's declared activation memory per LR pixel.

The per-pixel figures are declared by the archs (:class:`~adasr.archs.interface.ArchTraits`) and calibrated with
``scripts/benchmark_upscale.py calibrate`` (docs/upscale.md); on CUDA a probe tile is measured instead.
"""
import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from adasr.archs.interface import arch_traits
from adasr.inference.tile import round_up, tile_spans

GiB = 1024 ** 3
DEFAULT_CPU_BUDGET = 4 * GiB  # cap on the CPU; bigger tiles only save the overlap (<= 30 % at 512 px cores)
CPU_AVAILABLE_SHARE = 0.5  # of psutil's available memory
CUDA_AVAILABLE_SHARE = 0.8  # of torch.cuda.mem_get_info's free memory


def memory_per_pixel(net: nn.Module) -> Tuple[float, int, str]:
    """(bytes per LR pixel of an fp32 CPU forward, smallest useful window side, where the estimate comes from), as
    the arch declares them (:class:`~adasr.archs.interface.ArchTraits`)."""
    traits = arch_traits(net)
    return float(traits.bytes_per_pixel), int(traits.min_window), traits.memory_source


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
    pad = round_up(tile_pad, multiple)
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

    On the CPU the per-pixel cost is the arch's declared ``bytes_per_pixel`` (halved for half precision); on CUDA
    it is measured on a probe tile. The output canvas (``out_channels * (scale*h) * (scale*w)`` float32, twice for the
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
