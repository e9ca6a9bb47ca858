"""The graph-export hook of adasr's networks, and export-friendly padding.

Graph exporters (``torch.onnx.export(dynamo=True)``, i.e. ``torch.export``) record tensor operations and need
Python control flow that does not depend on tensor values (and, for dynamic sizes, not on the input size either).
A network whose eval ``forward`` branches on data (AdaFormer's halting gathers a data-dependent number of tokens, PFT
runs its top-k attention block by block through custom kernels) declares a module that computes the same eval
output with static control flow: it subclasses :class:`Exportable` and returns that module from
:meth:`Exportable.export_module`. Generic export code calls :func:`export_module` and never names an arch.
"""
import torch
from torch import nn

from adasr.archs.layers import PadMode


class Exportable:
    """Mixin for networks with a separate graph-export form of their eval forward (same numbers, static control
    flow, any input size). ``class AdaFormer(Exportable, nn.Module)``."""

    def export_module(self) -> nn.Module:
        """A module whose ``forward(x)`` equals this network's eval ``forward(x)`` and is traceable by
        ``torch.export`` with dynamic height and width. It shares this network's parameters."""
        raise NotImplementedError


def export_module(net: nn.Module) -> nn.Module:
    """The module to trace for graph export: the network's declared export form, or the network itself."""
    return net.export_module() if isinstance(net, Exportable) else net


def mirror_indices(n: int, total: int, mode: PadMode, device: torch.device) -> torch.Tensor:
    """Source positions of ``total >= n`` samples of an axis of ``n`` samples extended at its end by mirroring:
    ``'symmetric'`` repeats the edge sample (period 2n), ``'reflect'`` does not (period 2n - 2; one sample repeats
    itself). Equal to the padding of :func:`adasr.archs.layers.pad_to_multiple` (including its periodic fallback for
    pads not smaller than the side), without Python branches on ``n``, so ``n`` may be symbolic."""
    idx = torch.arange(total, device=device)
    if mode == 'symmetric':
        idx = idx % (2 * n)
        return torch.where(idx < n, idx, 2 * n - 1 - idx)
    if mode != 'reflect':
        raise ValueError(f"mirror_indices: mode must be 'reflect' or 'symmetric', got {mode!r}")
    period = torch.sym_max(2 * n - 2, 1)  # n = 1: every position reads sample 0
    idx = idx % period
    return torch.where(idx < n, idx, period - idx)


def mirror_pad_to_multiple(x: torch.Tensor, multiple: int, mode: PadMode) -> torch.Tensor:
    """:func:`adasr.archs.layers.pad_to_multiple` for ``'reflect'`` / ``'symmetric'`` as one row and one column
    gather (also when nothing is padded), so that the traced graph serves every input size."""
    h, w = x.shape[-2:]
    hp, wp = h + (-h) % multiple, w + (-w) % multiple
    x = x.index_select(-2, mirror_indices(h, hp, mode, x.device))
    return x.index_select(-1, mirror_indices(w, wp, mode, x.device))
