"""Parameter-free MATLAB bicubic upsampling, so every results table can carry the classic bicubic row."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from adasr.utils.matlab_resize import imresize


@ARCH_REGISTRY.register()
class Bicubic(nn.Module):
    """MATLAB ``imresize(lr, upscale, 'bicubic')`` as a network (``network_g: {type: Bicubic, upscale: 4}``).

    Args:
        upscale (int): integer upscaling factor. Default: 4.

    Input (B, C, H, W) in any range; output (B, C, upscale*H, upscale*W), not clamped (BasicSR's ``tensor2img``
    clamps and rounds, as MATLAB does for uint8 images). It has no parameters, so it is for testing only.
    """

    pads_input = True  # works at any input size; the model class must not pad for it

    def __init__(self, *, upscale: int = 4):
        super().__init__()
        if not isinstance(upscale, int) or isinstance(upscale, bool) or upscale < 1:
            raise ValueError(f'upscale must be a positive integer, got {upscale!r}')
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize(x, self.upscale, antialiasing=True)

    def extra_repr(self) -> str:
        return f'upscale={self.upscale}'
