"""AdaFormer's uncertainty-based self-supervised loss (L_USL, paper Eq. 17).

The authors' implementation (``UNCERTY_SIGMOID``) is missing from their repository; this follows the recommended
reading in ADAFORMER_SPEC.md section 6: per layer, ``C = sigmoid(logit)``, ``C_up`` = C bilinearly upsampled to the
HR size, and

    L_USL = sum over layers of  mean(C_up * |hr - sr| * pixel_scale) + mean(-log(C_up + 1e-8))

with |hr - sr| averaged over the colour channels. The per-pixel optimum is ``C = 1 / (|err| * pixel_scale)``
(clipped at 1), so ``pixel_scale`` sets which pixels become confident: 255 (default) measures the error on the
authors' 0..255 scale, where pixels with an error below one grey level saturate at C = 1 and halt early.
"""
from typing import Literal, Sequence, Union

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn
from torch.nn import functional as F

_REDUCTIONS = ('none', 'mean', 'sum')
_LOG_EPS = 1e-8


@LOSS_REGISTRY.register()
class UncertaintyLoss(nn.Module):
    """Uncertainty loss on the confidence logits of AdaFormer.

    Args:
        loss_weight (float): weight of the loss (the paper's alpha). Default: 1.0.
        reduction (str): ``'mean'`` (the paper), ``'sum'`` (over pixels and batch) or ``'none'``: the per-pixel map
            (B, 1, H_hr, W_hr), summed (or averaged) over layers. Default: 'mean'.
        pixel_scale (float): multiplies |hr - sr| (BasicSR images are in 0..1; 255 gives the authors' scale).
            Default: 255.
        detach_sr (bool): stop the gradient into ``sr`` (then the loss trains only the confidence estimator; the
            paper's Eq. 25 does not detach). Default: True.
        align_corners (bool): ``align_corners`` of the bilinear upsampling (the authors' EdgeFormer uses True).
            Default: True.
        layer_reduction (str): ``'sum'`` over layers (the paper) or ``'mean'``. Default: 'sum'.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: Literal['none', 'mean', 'sum'] = 'mean',
                 pixel_scale: float = 255.0, detach_sr: bool = True, align_corners: bool = True,
                 layer_reduction: Literal['sum', 'mean'] = 'sum'):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'Unsupported reduction mode: {reduction}. Supported ones are: {list(_REDUCTIONS)}')
        if layer_reduction not in ('sum', 'mean'):
            raise ValueError(f"layer_reduction must be 'sum' or 'mean', got {layer_reduction!r}")
        for name, value in (('loss_weight', loss_weight), ('pixel_scale', pixel_scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f'{name} must be a non-negative number, got {value!r}')
        for name, value in (('detach_sr', detach_sr), ('align_corners', align_corners)):
            if not isinstance(value, bool):
                raise ValueError(f'{name} must be true or false, got {value!r}')
        self.loss_weight = float(loss_weight)
        self.reduction = reduction
        self.pixel_scale = float(pixel_scale)
        self.detach_sr = detach_sr
        self.align_corners = align_corners
        self.layer_reduction = layer_reduction

    def forward(self, logits: Union[torch.Tensor, Sequence[torch.Tensor]], sr: torch.Tensor,
                hr: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: one (B, 1, h, w) tensor or a list of them (one per layer): the estimator outputs before the
                sigmoid at the LR size (``AdaFormer`` returns them in train mode). The HR size must be an integer
                multiple of (h, w).
            sr: (B, C, H, W) network output, 0..1.
            hr: (B, C, H, W) ground truth, 0..1.
        """
        if isinstance(logits, torch.Tensor):
            logits = [logits]
        if len(logits) == 0:
            raise ValueError('UncertaintyLoss needs at least one logit map')
        if sr.shape != hr.shape:
            raise ValueError(f'sr {tuple(sr.shape)} and hr {tuple(hr.shape)} must have the same shape')
        size = hr.shape[-2:]
        err = (hr - (sr.detach() if self.detach_sr else sr)).abs().mean(1, keepdim=True) * self.pixel_scale
        total = None
        for i, logit in enumerate(logits):
            if logit.dim() != 4 or logit.shape[1] != 1 or logit.shape[0] != hr.shape[0]:
                raise ValueError(f'logits[{i}] must be (B, 1, h, w) with B={hr.shape[0]}, got {tuple(logit.shape)}')
            if size[0] % logit.shape[-2] or size[1] % logit.shape[-1]:
                raise ValueError(f'logits[{i}] size {tuple(logit.shape[-2:])} does not divide the HR size '
                                 f'{tuple(size)}; crop the logits to the LR size first')
            conf = F.interpolate(torch.sigmoid(logit), size=size, mode='bilinear', align_corners=self.align_corners)
            term = conf * err - torch.log(conf + _LOG_EPS)
            total = term if total is None else total + term
        if self.layer_reduction == 'mean':
            total = total / len(logits)
        if self.reduction == 'mean':
            total = total.mean()
        elif self.reduction == 'sum':
            total = total.sum()
        return self.loss_weight * total
