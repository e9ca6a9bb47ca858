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

    pads_input = True  # reflect-pads inside forward, as the network

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
        groups = split * split
        rank = self._ranks(keep, hw[0], hw[1], split)
        num = keep.long().sum(1, keepdim=True)  # b, 1
        per_chunk = ((num + groups - 1) // groups).clamp(min=1)
        chunk = torch.where(keep, rank // per_chunk, -1)  # b, n: the chunk each kept token belongs to
        weight_extra = None
        extras = self.max_split ** 2 - 1
        if extras:  # padding entries: position num + i repeats the kept token of rank (num - pad + i) mod num
            i = torch.arange(extras, device=u.device)[None]
            pad = (groups - num % groups) % groups
            valid = i < pad  # b, E
            extra_chunk = (num + i) // per_chunk
            source = (num - pad + i) % num.clamp(min=1)
            repeats = ((rank[:, None, :] == source[:, :, None]) & keep[:, None, :]).to(u.dtype)  # b, E, n
            weight_extra = (valid, extra_chunk, repeats)
        out = u
        for j in range(self.max_split ** 2):
            member = chunk == j  # b, n
            weight = member.to(u.dtype)
            if weight_extra is not None:
                valid, extra_chunk, repeats = weight_extra
                weight = weight + ((valid & (extra_chunk == j)).to(u.dtype)[:, None, :] @ repeats).squeeze(1)
            present = (weight > 0)[:, None, None, :]  # b, 1, 1, n
            masked = torch.where(present, logits, float('-inf'))
            e = torch.where(present, (masked - masked.amax(-1, keepdim=True)).exp(), 0.0) * weight[:, None, None, :]
            agg = attn._merge((e @ v) / e.sum(-1, keepdim=True))  # b, M, c (NaN for an empty chunk: never used)
            out = torch.where(member[..., None], attn._broadcast(q, agg), out)
        return out

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

