"""The halting record of an adaptive network: which tokens and windows each layer halted in the last forward.

AdaFormer fills one after every forward (``net.halting_record()``); generic code (tiling, pictures, benchmarks, the
model class) reads it through :mod:`adasr.archs.interface` and this type, never through a network class.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch


@dataclass
class HaltingInfo:
    """The halting decisions of one forward pass (``AdaFormer.last_halting``), all detached, at the padded size.

    Index ``l`` of every list is the *mask index*: the map computed from the output of block ``l``
    (``l = 0 .. depths-1``). Mask ``l`` is consumed by block ``l + 1``; block 0 always runs with all tokens, and
    the last mask is computed (and used by the loss) but consumed by no block. This is the authors' indexing.

    Attributes:
        logits: per mask index, the estimator output before the sigmoid, (B, 1, Hp, Wp).
        confidence: ``sigmoid(logits)``, (B, 1, Hp, Wp).
        global_keep: 1 where the token still takes part in the global branch of the next block, else 0
            (float 0/1, (B, 1, Hp, Wp)). The paper's halting mask M is ``1 - global_keep``.
        local_keep: 1 where the token's 8x8 window still runs window attention in the next block, repeated over
            the window's pixels (float 0/1, (B, 1, Hp, Wp)).
        complete: per mask index, True when the estimator ran on every token. Sparse eval skips the tokens whose
            logit can no longer change a decision: the accumulated score only grows, so a halted token stays halted
            and so does a halted 8x8 window; a kept window's tokens are all computed (its mean decides), in a halted
            window only the kept tokens. Skipped entries hold logit +inf (confidence 1), and :meth:`estimated` tells
            them apart. Masks are always complete.
        input_size: unpadded LR size (H, W); crop maps with ``[..., :H, :W]`` to align them with the image.
        padded_size: (Hp, Wp), the size the maps have.
        mode: ``'sparse'`` (eval, gathered attention) or ``'dense'`` (training, or eval with ``sparse_eval=False``:
            attention on every token, masked).
        eval_global_split: the split of the sparse-eval global branch (kept tokens cut into split**2 chunks);
            ``None`` for the dense mode (global attention over the whole image).
        sparsity: per-layer halted fractions, batch means (see :func:`halting_sparsity`).
    """

    logits: List[torch.Tensor]
    confidence: List[torch.Tensor]
    global_keep: List[torch.Tensor]
    local_keep: List[torch.Tensor]
    complete: List[bool]
    input_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    mode: str
    eval_global_split: Optional[int]
    sparsity: Dict[str, List[float]] = field(default_factory=dict)

    def crop(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Crop padded maps (e.g. ``self.confidence``) to the unpadded LR size."""
        h, w = self.input_size
        return [m[..., :h, :w] for m in maps]

    def estimated(self, index: int) -> torch.Tensor:
        """Where the estimator ran for mask ``index``: (B, 1, Hp, Wp) bool, all True for a complete map."""
        logits = self.logits[index]
        if self.complete[index]:
            return torch.ones_like(logits, dtype=torch.bool)
        return ~torch.isposinf(logits)

    def attention_depth(self, branch: Literal['global', 'local'] = 'global') -> torch.Tensor:
        """Number of blocks in which each token took part in the branch's attention, (B, 1, Hp, Wp) float.

        Block 0 always counts; block ``l + 1`` counts where mask ``l`` keeps the token.
        """
        masks = self.global_keep if branch == 'global' else self.local_keep
        return 1 + torch.stack(masks[:-1], 0).sum(0) if len(masks) > 1 else torch.ones_like(masks[0])


def halting_sparsity(global_keep: Sequence[torch.Tensor], local_keep: Sequence[torch.Tensor],
                     input_size: Tuple[int, int]) -> Dict[str, List[float]]:
    """Halted fractions per layer, averaged over the batch.

    Keys:
        ``global_by_mask`` / ``local_by_mask``: ``1 - mean(keep mask l)`` over the padded map, indexed by mask (the
            authors' Fig. 4 indexing: entry ``l`` is the mask made after block ``l``; the last one is unused).
        ``global_consumed`` / ``local_consumed``: indexed by block: the share of tokens (windows) whose attention block
            ``l`` skipped (0 for block 0, then ``*_by_mask[l - 1]``). This is the work actually removed.
        ``global_authors`` / ``local_authors``: the authors' test-loop formula, indexed by mask: the global share
            divides the kept count by the *unpadded* H*W (it can be negative when the input is padded); the local
            share equals ``local_by_mask``.
    """
    h, w = input_size
    out: Dict[str, List[float]] = {k: [] for k in (
        'global_by_mask', 'local_by_mask', 'global_consumed', 'local_consumed', 'global_authors', 'local_authors')}
    if global_keep:  # one device-to-host transfer for all layers (no sync per value)
        n_unpadded = global_keep[0].shape[0] * h * w
        kept = torch.stack([torch.stack([g.double().mean(), loc.double().mean(), g.double().sum() / n_unpadded])
                            for g, loc in zip(global_keep, local_keep)]).tolist()
        for g_mean, loc_mean, g_authors in kept:
            out['global_by_mask'].append(1.0 - g_mean)
            out['local_by_mask'].append(1.0 - loc_mean)
            out['global_authors'].append(1.0 - g_authors)
    out['local_authors'] = list(out['local_by_mask'])
    out['global_consumed'] = [0.0] + out['global_by_mask'][:-1]
    out['local_consumed'] = [0.0] + out['local_by_mask'][:-1]
    return out


