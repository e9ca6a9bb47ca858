"""AdaFormer's eval forward written for graph export (ONNX through ``torch.export``).

The network's sparse eval gathers the windows and tokens that have not halted (data-dependent shapes, Python loops
over samples). :class:`AdaFormerExport` computes the same output with the network's parameters by masked dense
computation, with no Python branch on tensor values or on the input size:

* halting: the confidence estimator, the accumulated score and the keep masks (token: ``score < 1 - eps_h``,
  window: ``avg_pool(score) < 1 - eps_h``) are computed as in the network; ``eps_h`` is a constant of the graph;
* local branch: window attention is computed for every window; kept windows take ``attention + global``, halted ones
  ``global + u`` (the network skips the attention of halted windows, whose result it never uses);
* global branch, the network's eval split: the kept tokens, listed region by region (``split x split`` regions,
  ``split`` from the padded size by the network's rule, computed in the graph), padded cyclically to a multiple of
  ``split**2`` and cut into ``split**2`` equal chunks; each chunk aggregates its own prototypes. Here every token gets
  its rank in that list (a sort of region keys and a cumulative sum), hence its chunk; the padding entries are
  counted as multiplicities of the tokens they repeat, and each chunk's softmax runs over all tokens with the
  tokens outside the chunk masked out. Halted tokens keep ``u``.

With ``sparse_eval=False`` the network's own dense path (whole-image masked global attention) is traced as it is.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from adasr.archs.exportable import mirror_pad_to_multiple
from adasr.archs.layers import window_partition, window_reverse

MAX_AUTO_SPLIT = 8  # the network's rule caps the eval split at 8


class AdaFormerExport(nn.Module):
    """Graph-export form of an AdaFormer network's eval forward (shares its parameters). ``forward(x)``:
    (B, C, H, W) in 0..1, (B, C, scale*H, scale*W) out, any H and W."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        ws = net.window_size
        if net.eval_global_split == 'auto':
            top = MAX_AUTO_SPLIT
            while ws % top:
                top //= 2
            self.max_split = top
        else:
            self.max_split = net.eval_global_split

    # -- the eval split and the region ranks ----------------------------------------------------------------------

    def _split(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        """The network's eval split as a 0-d int64 tensor: ``min(2**round(log2(min(Hp, Wp) / 48)), 8)``, at least
        1, reduced to a divisor of the window (for the power-of-two splits, the largest one <= ``max_split``)."""
        if self.net.eval_global_split != 'auto':
            return torch.tensor(self.net.eval_global_split, device=device)
        side = torch.ones((), dtype=torch.float32, device=device) * torch.sym_min(hp, wp)
        split = torch.exp2(torch.round(torch.log2(side / 48)))
        return split.clamp(1, self.max_split).long()

    @staticmethod
    def _ranks(keep: torch.Tensor, hp: int, wp: int, split: torch.Tensor) -> torch.Tensor:
        """(B, N) position of every kept token in the list of kept tokens ordered region by region (raster order
        inside a region), as :func:`adasr.archs.adaformer_arch.region_order`; halted tokens get their count of kept
        tokens before them (unused)."""
        device = keep.device
        rh, rw = hp // split, wp // split
        region = (torch.arange(hp, device=device) // rh)[:, None] * split + torch.arange(wp, device=device) // rw
        key = region.reshape(-1) * (hp * wp) + torch.arange(hp * wp, device=device)  # unique
        order = torch.sort(key).indices  # tokens in region order
        kept = keep.long().gather(1, order.expand_as(keep))
        before = kept.cumsum(1) - kept
        return torch.zeros_like(before).scatter(1, order.expand_as(keep), before)

    # -- attention -------------------------------------------------------------------------------------------------

    def _global(self, attn, u: torch.Tensor, hw: Tuple[int, int], keep: Optional[torch.Tensor],
                split: torch.Tensor) -> torch.Tensor:
        """The network's eval global branch (``AdaFormerAttention.global_sparse``) by masking; (B, N, C)."""
        b, n, c = u.shape
        if keep is None:
            keep = torch.ones(b, n, dtype=torch.bool, device=u.device)
        q, k, v = attn._heads(attn.qkv(u), 3)  # b, h, n, hd
        logits = (attn._prototype_queries() * attn.scale) @ k.transpose(-2, -1)  # b, h, M, n
        heads, protos, hd = logits.shape[1], logits.shape[2], v.shape[-1]
        slots = self.max_split ** 2 + 1  # the chunks, and a last slot that collects the halted tokens
        groups = split * split
        rank = self._ranks(keep, hw[0], hw[1], split)
        num = keep.long().sum(1, keepdim=True)  # b, 1
        per_chunk = ((num + groups - 1) // groups).clamp(min=1)
        chunk = torch.where(keep, rank // per_chunk, slots - 1)  # b, n
        token = torch.arange(n, device=u.device).expand(b, n)
        extras = self.max_split ** 2 - 1
        if extras:  # padding entries: position num + i repeats the kept token of rank (num - pad + i) mod num
            i = torch.arange(extras, device=u.device)[None]
            pad = (groups - num % groups) % groups
            extra_chunk = torch.where(i < pad, (num + i) // per_chunk, slots - 1)
            by_rank = torch.zeros(b, n + 1, dtype=torch.long, device=u.device).scatter(
                1, torch.where(keep, rank, n), token)  # the token of every rank (halted ones to a last column)
            source = by_rank.gather(1, (num - pad + i) % num.clamp(min=1))  # b, E
            members = torch.cat([token, source], 1)  # b, T: every key entry of the padded lists
            member_chunk = torch.cat([chunk, extra_chunk], 1)
            logits = logits.gather(-1, members[:, None, None].expand(b, heads, protos, -1))
            v = v.gather(2, members[:, None, :, None].expand(b, heads, -1, hd))
        else:
            member_chunk = chunk
        # per-chunk softmax of the prototype queries over the chunk's entries, then the weighted sum of v
        index = member_chunk[:, None, None].expand_as(logits)  # b, h, M, T
        top = torch.full((b, heads, protos, slots), float('-inf'), device=u.device)
        top = top.scatter_reduce(-1, index, logits, 'amax')
        e = (logits - top.gather(-1, index)).exp()
        den = torch.zeros(b, heads, protos, slots, device=u.device).scatter_add(-1, index, e)
        weighted = (e[..., None] * v[:, :, None]).permute(0, 3, 2, 1, 4)  # b, T, M, h, hd
        rows = torch.arange(b, device=u.device)[:, None]
        numer = torch.zeros(b, slots, protos, heads, hd, device=u.device).index_put_(
            (rows, member_chunk), weighted, accumulate=True)  # whole-row sums (ONNX ScatterND, reduction add)
        agg = numer.reshape(b, slots, protos, c) / den.permute(0, 3, 2, 1).repeat_interleave(hd, -1)
        kp, vp = attn._heads(attn.kv_global(agg), 2)  # b, slots, h, M, hd (NaN for an empty chunk: never read)
        kp, vp = kp[rows, chunk], vp[rows, chunk]  # b, n, h, M, hd: the prototypes of each token's chunk (GatherND)
        q = (q * attn.scale).permute(0, 2, 1, 3)[..., None, :]  # b, n, h, 1, hd
        y = ((q @ kp.transpose(-2, -1)).softmax(-1) @ vp).reshape(b, n, c)
        return torch.where(keep[..., None], y, u)

    def _attention(self, attn, u: torch.Tensor, hw: Tuple[int, int], keep_tok, keep_win,
                   split: torch.Tensor) -> torch.Tensor:
        """local + global as ``AdaFormerAttention.forward_sparse``; keep_win (B, 1, Hp/S, Wp/S) or None."""
        b, n, c = u.shape
        s = attn.window_size
        g = self._global(attn, u, hw, keep_tok, split)
        local = window_reverse(attn.window_attention(window_partition(u.view(b, hw[0], hw[1], c), s)), s, *hw)
        local = local.view(b, n, c)
        if keep_win is None:
            return local + g
        win = keep_win.repeat_interleave(s, 2).repeat_interleave(s, 3).view(b, n, 1)
        return torch.where(win, local + g, g + u)

    def _body(self, fe: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        """The adaptive module (``AdaM.forward`` in sparse eval)."""
        body, net = self.net.body, self.net
        b, _, hp, wp = fe.shape
        t = body.embed(fe)
        c = t.shape[1]
        t = t.flatten(2).transpose(1, 2)  # b, n, c
        score = torch.zeros(b, 1, hp, wp, dtype=fe.dtype, device=fe.device)
        threshold = 1 - net.eps_h
        keep_tok = keep_win = None
        for blk in body.blocks:
            t = t + self._attention(blk.attn, blk.norm1(t), (hp, wp), keep_tok, keep_win, split)
            t = t + blk.mlp(blk.norm2(t))
            score = score + torch.sigmoid(body.var(t.transpose(1, 2).reshape(b, c, hp, wp)))
            keep_tok = (score < threshold).view(b, -1)
            keep_win = F.avg_pool2d(score, body.window_size) < threshold
        return fe + body.unembed(t.transpose(1, 2).reshape(b, c, hp, wp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        h, w = x.shape[-2:]
        x = mirror_pad_to_multiple(x, net.window_size, 'reflect')
        hp, wp = x.shape[-2:]
        f0 = net.head(net.sub_mean(x * net.img_range))
        fe = net.shollow_feature_extraction(f0)
        if net.sparse_eval:
            fa = self._body(fe, self._split(hp, wp, x.device))
        else:
            fa = net.body(fe, net.eps_h, None)[0]
        fd = net.deep_feature_extraction(fa)
        sr = net.add_mean(net.tail(fd + f0))
        return sr[..., :h * net.upscale, :w * net.upscale] / net.img_range

