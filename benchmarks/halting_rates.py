"""Set how much an untrained AdaFormer halts, so that adaptive inference can be timed (and its reduced-precision
decisions compared) before trained weights exist.

AdaFormer's confidence estimator is shared by all blocks; a token halts once its accumulated confidence
``sum_l sigmoid(logit_l)`` reaches ``1 - eps_h``. Adding an offset to the bias of the estimator's last convolution
shifts every logit: a large negative offset halts nothing, a large positive one halts every token after block 0,
and in between the share of halted tokens grows with depth, as it does in a trained model. :func:`calibrate_halting`
finds the offset that halts a target share of tokens per block (mean over blocks 1 .. depth-1, global branch).

This is the one place in adasr that changes the estimator's weights from outside: it knows AdaFormer's layout
(``body.var``, the estimator's checkpoint name) and checks that it is given an AdaFormer.
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

from adasr.archs.interface import halting_record, unwrap


def estimator_logit_bias(net: nn.Module) -> nn.Parameter:
    """The bias of AdaFormer's confidence-estimator output (the last conv of ``body.var``, one channel)."""
    from adasr.archs.adaformer_arch import AdaFormer

    net = unwrap(net)
    if not isinstance(net, AdaFormer):
        raise TypeError(f'estimator_logit_bias needs an AdaFormer, got {type(net).__name__}')
    return net.body.var[-1].bias


def shift_estimator_bias(net: nn.Module, offset: float) -> None:
    """Add ``offset`` to every logit of the confidence estimator (in place; shift back with ``-offset``)."""
    with torch.no_grad():
        estimator_logit_bias(net).add_(offset)


def halted_per_block(net: nn.Module) -> Dict[str, List[float]]:
    """Share of tokens (global branch) and windows (local branch) each block skipped in the last forward."""
    sp = halting_record(net).sparsity
    return {'global': list(sp['global_consumed']), 'local': list(sp['local_consumed'])}


def mean_halted(shares: List[float]) -> float:
    """Mean halted share over the blocks that can halt (block 0 always runs every token)."""
    return sum(shares[1:]) / max(len(shares) - 1, 1)


def calibrate_halting(net: nn.Module, x: torch.Tensor, target: float, steps: int = 14,
                      span: Tuple[float, float] = (-20.0, 20.0)) -> Tuple[float, float]:
    """Find the estimator offset at which ``net`` halts ``target`` of the tokens per block on ``x`` (mean over
    blocks 1 .. depth-1, global branch) by bisection, and apply it.

    The halted share grows monotonically with the offset. ``target`` 0 and 1 take the ends of ``span`` (nothing /
    everything halted after block 0). Returns (offset applied, share reached on ``x``).
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f'target halted share must be in [0, 1], got {target!r}')
    net = unwrap(net)

    def share(offset: float) -> float:
        shift_estimator_bias(net, offset)
        try:
            with torch.no_grad():
                net(x)
            return mean_halted(halted_per_block(net)['global'])
        finally:
            shift_estimator_bias(net, -offset)

    lo, hi = span
    if target <= 0.0 or target >= 1.0:
        best = lo if target <= 0.0 else hi
    else:
        best, best_err = lo, float('inf')
        for _ in range(steps):
            mid = (lo + hi) / 2
            got = share(mid)
            if abs(got - target) < best_err:
                best, best_err = mid, abs(got - target)
            if got < target:
                lo = mid
            else:
                hi = mid
    reached = share(best)
    shift_estimator_bias(net, best)
    return best, reached


def calibrate_on_centre(net: nn.Module, x: torch.Tensor, target: float, side: int = 96) -> Tuple[float, float]:
    """:func:`calibrate_halting` on the centre ``side x side`` crop of ``x`` (bisecting on a big input is slow)."""
    h, w = x.shape[-2:]
    ch, cw = min(h, side), min(w, side)
    top, left = (h - ch) // 2, (w - cw) // 2
    return calibrate_halting(net, x[..., top:top + ch, left:left + cw], target)


__all__ = ['estimator_logit_bias', 'shift_estimator_bias', 'halted_per_block', 'mean_halted', 'calibrate_halting',
           'calibrate_on_centre']
