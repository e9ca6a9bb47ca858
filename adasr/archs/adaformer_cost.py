"""AdaFormer's cost model: multiply-accumulates of one forward, as this implementation does the work or as the
authors' counter reports it (:meth:`adasr.archs.adaformer_arch.AdaFormer.flops` delegates here)."""
import math
from typing import Dict, Literal, Union

from torch import nn

from adasr.utils.checks import check_choice


def adaformer_macs(net: nn.Module, h: int, w: int, convention: Literal['actual', 'authors'] = 'actual',
                   breakdown: bool = False) -> Union[float, Dict[str, float]]:
    """Multiply-accumulates for one LR image of h x w.

    Uses the keep masks of the last forward when it ran on that size (averaged over its batch), otherwise
    counts the dense model (nothing halted). ``'actual'`` counts the work this implementation does: every
    conv (mean shifts, head, ResBlocks, embed/unembed, estimator, tail), LayerNorms (1 per element), MLPs, the
    q/k/v projections of kept windows and tokens, window attention of kept windows, and the chunked global
    aggregation/broadcast of kept tokens (dense-mode forwards: whole-image global on every token, as computed).
    ``'authors'`` applies their counter's documented conventions to the same terms: no estimator, local and
    global q/k/v counted on all tokens, ``kv_global`` counted as Hp*Wp*C*2C, and block ``l`` charged with the
    mask made after block ``l`` (an underestimate). Softmax, GELU and additions are not counted.

    Returns the total, or with ``breakdown=True`` a dict of parts (and ``'total'``).
    """
    check_choice('convention', convention, ('actual', 'authors'))
    s = net.window_size
    hp, wp = math.ceil(h / s) * s, math.ceil(w / s) * s
    n = hp * wp
    body = net.body
    c_feat = body.embed.in_channels
    d = body.embed.out_channels
    attn0 = body.blocks[0].attn
    m = attn0.num_prototypes
    hidden = body.blocks[0].mlp.fc1.out_features
    in_ch = net.head[0].in_channels
    n_res = len(net.shollow_feature_extraction) + len(net.deep_feature_extraction)
    est_hidden = body.var[0].out_channels
    depth = len(body.blocks)

    info = net.last_halting
    use_masks = info is not None and info.padded_size == (hp, wp)
    if use_masks:
        g_kept = [float(g.mean()) for g in info.global_keep]
        w_kept = [float(x.mean()) for x in info.local_keep]
        dense_mode = info.mode == 'dense'
        split = info.eval_global_split
    else:
        g_kept = [1.0] * depth
        w_kept = [1.0] * depth
        dense_mode = not net.sparse_eval
        split = None if dense_mode else net.global_split(hp, wp)

    parts: Dict[str, float] = {}
    parts['mean_shift'] = float(n * in_ch * in_ch + n * net.upscale ** 2 * in_ch * in_ch)
    parts['head'] = float(n * in_ch * c_feat * 9)
    parts['resblocks'] = float(n_res * 2 * n * c_feat * c_feat * 9)
    parts['embed_unembed'] = float(2 * n * c_feat * d)
    parts['tail'] = float(n * c_feat * in_ch * net.upscale ** 2 * 9)
    parts['estimator'] = 0.0 if convention == 'authors' else float(
        depth * n * (d * est_hidden * 9 + est_hidden * 9))
    norm_mlp = local_qkv = local_attn = global_qkv = global_attn = 0.0
    for blk in range(depth):
        if convention == 'authors':
            gk, wk = g_kept[blk], w_kept[blk]  # their off-by-one: the mask made after this block
        else:
            gk, wk = (1.0, 1.0) if blk == 0 else (g_kept[blk - 1], w_kept[blk - 1])
        if dense_mode:
            gk_work = wk_work = 1.0  # the dense path computes every token and masks afterwards
        else:
            gk_work, wk_work = gk, wk
        norm_mlp += 2 * n * d + 2 * n * d * hidden
        local_qkv += n * (1.0 if convention == 'authors' else wk_work) * d * 3 * d
        local_attn += n * wk_work * 2 * s * s * d
        kept = n * gk_work
        if convention == 'authors':
            global_qkv += n * d * 3 * d + m * d * 3 * d
            global_attn += kept * 2 * m * d + n * d * 2 * d
        else:
            chunks = 1 if split is None else split * split
            padded = 0.0 if kept == 0 else math.ceil(kept / chunks) * chunks
            global_qkv += kept * d * 3 * d + m * d * d
            global_attn += padded * 2 * m * d + (chunks if kept else 0) * m * d * 2 * d
    parts.update(norm_mlp=norm_mlp, local_qkv=local_qkv, local_attention=local_attn, global_qkv=global_qkv,
                 global_attention=global_attn)
    total = sum(parts.values())
    if breakdown:
        return dict(parts, total=total)
    return total

