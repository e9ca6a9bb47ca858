"""What generic code may ask of a network: the declared arch interface.

Tiling, memory planning, the model classes, the upscale CLI, export and the benchmarks run many architectures. They
ask this module, never a class name and never an attribute found by probing:

* :func:`arch_traits` - how to run the network: whether it pads its input itself, the multiple its input must be
  padded to (and tiles aligned to), its activation memory per LR pixel, the smallest useful tile, its preferred half
  type, whether it is adaptive (keeps a halting record);
* :func:`count_flops` - multiply-accumulates for an input size, where the arch counts them;
* :func:`halting_record` / :func:`set_halting_record` / :func:`halting_threshold` / :func:`set_halting_threshold` -
  the adaptive archs' record of their last forward (:class:`~adasr.archs.halting.HaltingInfo`) and their threshold;
* :func:`unwrap` - the network inside DataParallel / DistributedDataParallel.

adasr's own archs subclass :class:`SRArch` and declare their traits in :meth:`SRArch.arch_traits`. Networks adasr
does not own get theirs through :func:`register_traits` next to where adasr registers them (basicsr's SwinIR), or
run inside :class:`adasr.archs.spandrel_support.Spandrel`, which declares them from the spandrel descriptor (any
spandrel model); anything else gets :data:`UNKNOWN` traits with the window found in its modules (the one place where
attributes are probed).
"""
from dataclasses import dataclass, replace
from typing import Callable, Dict, Literal, Mapping, Optional, Tuple

import torch
from torch import nn

from adasr.archs.halting import HaltingInfo

#: Activation bytes per LR pixel assumed for an arch that declares none (conservative: small tiles, never too big).
UNKNOWN_BYTES_PER_PIXEL = 64 * 1024


@dataclass(frozen=True)
class ArchTraits:
    """How a network wants to be run.

    Attributes:
        pads_input: the network pads its input inside ``forward`` and crops its output: callers call it as it is and
            must not pre-pad (pre-padding would change its numbers, e.g. the reflect padding it does itself).
        window: alignment of padding and of tile boundaries (the attention window; 1 for none).
        bytes_per_pixel: peak activation memory of one fp32 CPU forward per LR input pixel (bytes), as calibrated
            with ``scripts/benchmark_upscale.py calibrate`` (docs/upscale.md).
        memory_source: where ``bytes_per_pixel`` comes from (shown to users when a tile size is chosen).
        min_window: smallest tile window side that keeps the arch's behaviour (0: any).
        preferred_half: the half type to use on CUDA when the user asks for "half" (None: float16).
        half_dtypes: the half types the network runs in (empty: full precision only).
        adaptive: the network keeps a halting record of its last forward and has a halting threshold.
        tiling: how tiles relate to the whole-image output (spandrel's ``ModelTiling``): ``'supported'`` (tiles
            with enough context give the whole-image output, up to float rounding or tiny differences),
            ``'discouraged'`` (the output depends on the whole input, so tiles differ more; tile only when memory
            requires it) or ``'internal'`` (the network tiles itself: callers must not tile).
        pretrained: the network loaded its trained weights when it was built (``network_g: {type: Spandrel, path:
            ...}``): callers need no separate checkpoint.
    """

    pads_input: bool = False
    window: int = 1
    bytes_per_pixel: float = float(UNKNOWN_BYTES_PER_PIXEL)
    memory_source: str = 'default estimate (arch not calibrated)'
    min_window: int = 0
    preferred_half: Optional[torch.dtype] = None
    half_dtypes: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    adaptive: bool = False
    tiling: Literal['supported', 'discouraged', 'internal'] = 'supported'
    pretrained: bool = False


UNKNOWN = ArchTraits()


class SRArch:
    """Mixin for adasr's networks (``class AdaFormer(SRArch, nn.Module)``): the declared interface.

    Subclasses override :meth:`arch_traits`; adaptive ones also :meth:`halting_record`, :meth:`set_halting_record`
    and the ``halting_threshold`` pair; any may override :meth:`flops`.
    """

    def arch_traits(self) -> ArchTraits:
        return UNKNOWN

    def flops(self, h: int, w: int) -> Optional[float]:
        """Multiply-accumulates of one forward on an ``h x w`` LR image (None: not counted by the arch)."""
        return None

    def halting_record(self) -> Optional[HaltingInfo]:
        return None

    def set_halting_record(self, info: Optional[HaltingInfo]) -> None:
        raise ValueError(f'{type(self).__name__} is not adaptive: it keeps no halting record')

    def get_halting_threshold(self) -> float:
        raise ValueError(f'{type(self).__name__} is not adaptive: it has no halting threshold')

    def set_halting_threshold(self, value: float) -> None:
        raise ValueError(f'{type(self).__name__} is not adaptive: it has no halting threshold')

    def get_complete_halting_maps(self) -> bool:
        raise ValueError(f'{type(self).__name__} is not adaptive: it keeps no halting maps')

    def set_complete_halting_maps(self, value: bool) -> None:
        """Make the halting record's maps complete (every token scored) for pictures, or let the arch skip work that
        decides nothing (its default); outputs and decisions are the same either way."""
        raise ValueError(f'{type(self).__name__} is not adaptive: it keeps no halting maps')


_FOREIGN: Dict[type, Callable[[nn.Module], ArchTraits]] = {}


def register_traits(cls: type, traits: Callable[[nn.Module], ArchTraits]) -> None:
    """Declare the traits of a network class adasr does not own (``traits(net)`` is called per instance)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f'register_traits expects an nn.Module class, got {cls!r}')
    _FOREIGN[cls] = traits


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (``net`` itself otherwise)."""
    while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return net


def _found_window(net: nn.Module) -> int:
    """The network's ``window_size``, else the largest of its submodules' (basicsr's SwinIR keeps it in its blocks)."""

    def size(m) -> int:
        ws = getattr(m, 'window_size', None)
        if isinstance(ws, (tuple, list)) and ws and all(isinstance(v, int) for v in ws):
            ws = max(ws)
        return ws if isinstance(ws, int) and not isinstance(ws, bool) and ws > 0 else 0

    return size(net) or max((size(m) for m in net.modules()), default=0) or 1


def arch_traits(net: nn.Module, net_opt: Optional[Mapping] = None) -> ArchTraits:
    """The traits of ``net`` (wrappers removed).

    ``net_opt`` (the option file's ``network_g``) can set the window of a network that does not pad itself, as
    BasicSR's ``SwinIRModel`` pads to ``network_g.window_size``.
    """
    net = unwrap(net)
    if isinstance(net, SRArch):
        traits = net.arch_traits()
    else:
        declared = next((fn for cls, fn in _FOREIGN.items() if type(net) is cls), None)
        if declared is None:
            declared = next((fn for cls, fn in _FOREIGN.items() if isinstance(net, cls)), None)
        traits = declared(net) if declared is not None else replace(UNKNOWN, window=_found_window(net))
    if net_opt and net_opt.get('window_size') and not traits.pads_input:
        traits = replace(traits, window=int(net_opt['window_size']))
    return traits


def count_flops(net: nn.Module, h: int, w: int) -> Optional[float]:
    """Multiply-accumulates the arch counts for an ``h x w`` input (None when it does not count them)."""
    net = unwrap(net)
    return net.flops(h, w) if isinstance(net, SRArch) else None


def is_adaptive(net: nn.Module) -> bool:
    return arch_traits(net).adaptive


def _adaptive(net: nn.Module) -> SRArch:
    net = unwrap(net)
    if not (isinstance(net, SRArch) and net.arch_traits().adaptive):
        raise ValueError(f'{type(net).__name__} is not adaptive: it keeps no halting record and has no threshold')
    return net


def halting_record(net: nn.Module) -> Optional[HaltingInfo]:
    """The halting record of the last forward of an adaptive network (None before the first forward)."""
    return _adaptive(net).halting_record()


def set_halting_record(net: nn.Module, info: Optional[HaltingInfo]) -> None:
    """Replace the record (tiled inference puts the whole image's record back after the last tile)."""
    _adaptive(net).set_halting_record(info)


def set_complete_halting_maps(net: nn.Module, value: bool = True) -> None:
    """Ask an adaptive network for complete halting maps (for pictures of its confidence): see
    :meth:`SRArch.set_complete_halting_maps`."""
    _adaptive(net).set_complete_halting_maps(value)


def complete_halting_maps(net: nn.Module) -> bool:
    """Whether an adaptive network makes complete halting maps (:func:`set_complete_halting_maps`)."""
    return _adaptive(net).get_complete_halting_maps()


def halting_threshold(net: nn.Module) -> float:
    return _adaptive(net).get_halting_threshold()


def set_halting_threshold(net: nn.Module, value: float) -> None:
    """Set an adaptive network's test-time halting threshold (AdaFormer: ``eps_h``); ValueError on a bad value."""
    _adaptive(net).set_halting_threshold(value)
