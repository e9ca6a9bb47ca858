"""Padding for graph export: the values of :func:`adasr.archs.layers.pad_to_multiple` as index gathers.

Graph exporters (``torch.onnx.export(dynamo=True)``, i.e. ``torch.export``) record tensor operations; Python
branches on the input size are fixed while tracing. These helpers pad with no such branch, so a traced graph pads
every input size (including pads larger than the image). Archs use them in their export forms
(:meth:`adasr.archs.interface.SRArch.export_module`).
"""
import torch

from adasr.archs.layers import PadMode


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
