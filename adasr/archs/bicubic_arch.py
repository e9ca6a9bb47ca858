"""Parameter-free MATLAB bicubic upsampling, so every results table can carry the classic bicubic row."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from adasr.archs.exportable import Exportable
from adasr.archs.interface import ArchTraits, SRArch
from adasr.utils.checks import check_int
from adasr.utils.matlab_resize import imresize, imresize_upscale_traceable, kernel_taps, upscale_phases


class _BicubicExport(nn.Module):
    """Graph-export form of :class:`Bicubic` (the same weights; source indices computed in the graph)."""

    def __init__(self, upscale: int):
        super().__init__()
        weights, offsets = upscale_phases(upscale)
        self.register_buffer('weights', weights, persistent=False)
        self.register_buffer('offsets', offsets, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize_upscale_traceable(x, self.weights, self.offsets)


@ARCH_REGISTRY.register()
class Bicubic(SRArch, Exportable, nn.Module):
    """MATLAB ``imresize(lr, upscale, 'bicubic')`` as a network (``network_g: {type: Bicubic, upscale: 4}``).

    Args:
        upscale (int): integer upscaling factor. Default: 4.

    Input (B, C, H, W) in any range; output (B, C, upscale*H, upscale*W), not clamped (BasicSR's ``tensor2img``
    clamps and rounds, as MATLAB does for uint8 images). It has no parameters, so it is for testing only.
    """


    def __init__(self, *, upscale: int = 4):
        super().__init__()
        self.upscale = check_int('upscale', upscale)

    def arch_traits(self) -> ArchTraits:
        # any input size (no padding wanted); memory calibrated in docs/upscale.md
        return ArchTraits(pads_input=True, bytes_per_pixel=100.0 * self.upscale ** 2,
                          memory_source='Bicubic: 100 B x scale**2 per LR pixel (calibrated)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize(x, self.upscale, antialiasing=True)

    def export_module(self) -> nn.Module:
        """For ONNX export: the same resize with its indices computed in the graph (any input size)."""
        return _BicubicExport(self.upscale)

    def flops(self, h: int, w: int, channels: int = 3) -> float:
        """Multiply-accumulates for one h x w LR image: every output sample of each separable pass (rows, then
        columns) takes one MAC per kernel tap that :func:`imresize` applies."""
        s = self.upscale
        taps_h, taps_w = kernel_taps(h, s), kernel_taps(w, s)
        return float(channels * (h * s * w * taps_h + h * s * w * s * taps_w))

    def extra_repr(self) -> str:
        return f'upscale={self.upscale}'
