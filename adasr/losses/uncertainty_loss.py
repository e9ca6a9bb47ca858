"""AdaFormer's uncertainty-based self-supervised loss (L_USL, paper Eq. 17).

The authors' implementation (``UNCERTY_SIGMOID``) is missing from their repository; this follows the recommended
reading in ADAFORMER_SPEC.md section 6: per layer, ``C = sigmoid(logit)``, ``C_up`` = C bilinearly upsampled to the
HR size, and

    L_USL = sum over layers of  mean(C_up * |hr - sr| * pixel_scale) + mean(-log(C_up + 1e-8))

with |hr - sr| averaged over the colour channels. The per-pixel optimum is ``C = 1 / (|err| * pixel_scale)``
(clipped at 1), so ``pixel_scale`` sets which pixels become confident: 255 (default) measures the error on the
authors' 0..255 scale, where pixels with an error below one grey level saturate at C = 1 and halt early.

Numerics. The loss is computed in float32 whatever the input type (in fp16 the 1e-8 rounds to 0 and a confidence
that underflows gives ``-log(0) = inf``; bf16 rounds the log term coarsely). Its value is the formula above. Its
gradient is that of ``-log(C_up)`` without the 1e-8: where ``C_up`` is well above 1e-8 this is the formula's own
gradient (they differ by the factor ``1 + 1e-8 / C_up``), and where the confidence has saturated towards 0 (logits
below about -18, where the 1e-8 floor makes the formula flat) it keeps the slope of ``-log(sigmoid(logit)) =
softplus(-logit)``, about -1 per unit of logit, so a pixel whose estimator has saturated can still recover. Logits
below -80 are evaluated at -80 with their gradient passed through, which keeps ``1 / C`` finite in float32.
"""
import math
from typing import Literal, Sequence, Union

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn
from torch.nn import functional as F

_REDUCTIONS = ('none', 'mean', 'sum')
_LOG_EPS = 1e-8
# logits below this are evaluated at it (sigmoid(-80) = 1.8e-35, so 1 / C stays far from float32's overflow) with
# their gradient passed through unchanged; the value moves by less than float32 can show next to the 1e-8
_LOGIT_FLOOR = -80.0


def _floor_straight_through(logit: torch.Tensor) -> torch.Tensor:
    """``logit`` clamped below at :data:`_LOGIT_FLOOR` (infinities to finite numbers first) with the identity as its
    gradient (0 for an infinite logit, which has no slope)."""
    x = torch.nan_to_num(logit, nan=math.nan, posinf=-_LOGIT_FLOOR, neginf=2 * _LOGIT_FLOOR)  # NaN stays NaN
    return x - (x - x.clamp(min=_LOGIT_FLOOR)).detach()


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
        for i, logit in enumerate(logits):
            if logit.dim() != 4 or logit.shape[1] != 1 or logit.shape[0] != hr.shape[0]:
                raise ValueError(f'logits[{i}] must be (B, 1, h, w) with B={hr.shape[0]}, got {tuple(logit.shape)}')
            if hr.shape[-2] % logit.shape[-2] or hr.shape[-1] % logit.shape[-1]:
                raise ValueError(f'logits[{i}] size {tuple(logit.shape[-2:])} does not divide the HR size '
                                 f'{tuple(hr.shape[-2:])}; crop the logits to the LR size first')
        with torch.autocast(hr.device.type, enabled=False):  # float32 throughout (see the module docstring)
            return self._loss([logit.float() for logit in logits], sr.float(), hr.float())

    def _loss(self, logits: Sequence[torch.Tensor], sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        size = hr.shape[-2:]
        err = (hr - (sr.detach() if self.detach_sr else sr)).abs().mean(1, keepdim=True) * self.pixel_scale
        total = None
        for logit in logits:
            conf = F.interpolate(torch.sigmoid(_floor_straight_through(logit)), size=size, mode='bilinear',
                                 align_corners=self.align_corners)
            log_conf = torch.log(conf)
            # the value of -log(C_up + 1e-8), the gradient of -log(C_up)
            log_term = (-torch.log(conf + _LOG_EPS)).detach() - (log_conf - log_conf.detach())
            term = conf * err + log_term
            total = term if total is None else total + term
        if self.layer_reduction == 'mean':
            total = total / len(logits)
        if self.reduction == 'mean':
            total = total.mean()
        elif self.reduction == 'sum':
            total = total.sum()
        return self.loss_weight * total
