"""PFT's eval forward written for graph export (ONNX through ``torch.export``).

:class:`PFTExport` computes what :class:`~adasr.archs.pft_arch.PFT` computes in eval mode, with the network's own
parameters, as whole-tensor operations with no Python branch on the input size or on tensor values:

* windows come from a roll and a reshape (the same permutation as the network's row gathers);
* the shift mask is built from the padded size with comparisons (the -100 of tokens of different regions);
* progressive focusing keeps its semantics: a layer with a dense input computes all scores, adds the bias (and the
  shift mask), softmaxes and multiplies by the previous map of its parity; a layer with a sparse input gathers the
  scores at the key indices it inherited (``GatherElements``), softmaxes over them and multiplies by the inherited
  values; the k largest weights are kept with ``torch.topk`` (ONNX ``TopK``) and their key indices are composed with
  the inherited ones, exactly as the network does (ties at the k-th value are broken by the lower index, where the
  network's top-k leaves them arbitrary);
* sparse aggregation scatters the kept weights into a dense row (``ScatterElements``) and multiplies by v.

It trades memory for simplicity (all windows' n x n scores at once), so it is meant for export and moderate sizes.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from adasr.archs.exportable import mirror_pad_to_multiple
from adasr.archs.layers import window_partition, window_reverse

EPS = 1e-20  # as adasr.archs.pft_arch (the authors' PFA epsilon)
MASK_VALUE = -100.0  # as adasr.archs.pft_arch


def shift_mask(hp: int, wp: int, ws: int, device: torch.device) -> torch.Tensor:
    """(nW, n, n) float32: 0 where query and key of a shifted window lie in the same region, -100 elsewhere.

    Regions as Swin's: the padded map is cut at ``-ws`` and ``-ws/2`` along each axis (3 x 3 regions)."""
    shift = ws // 2

    def band(length: int) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        return (pos >= length - ws).long() + (pos >= length - shift).long()

    labels = band(hp)[:, None] * 3 + band(wp)[None, :]
    lab = window_partition(labels[None, :, :, None], ws).squeeze(-1)  # nW, n
    return (lab[:, :, None] != lab[:, None, :]).float() * MASK_VALUE


def _focus(a: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Eval-mode progressive focusing: ``(a * prev + eps) / (sum(a * prev + eps) + eps)``."""
    prod = a * prev + EPS
    return prod / (prod.sum(-1, keepdim=True) + EPS)


class PFTExport(nn.Module):
    """Graph-export form of a PFT network's eval forward (shares its parameters). ``forward(x)``: (B, C, H, W) in,
    (B, C, scale*H, scale*W) out, any H and W."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def _attention(self, layer, q, k, v, mask: Optional[torch.Tensor], prev):
        """q (pre-scaled), k, v: (B*nW, h, n, d). ``prev``: None, ('dense', probs) or ('sparse', values, index).
        Returns (out (B*nW, h, n, d), this layer's state)."""
        nb, h, n, _ = q.shape
        scores = q @ k.transpose(-2, -1) + layer.attn_win.bias(self.net.relative_position_index_SA).float()
        if prev is not None and prev[0] == 'sparse':
            values, index = prev[1], prev[2]
            a = _focus(torch.gather(scores, -1, index).softmax(-1), values)  # no shift mask here, as the network
        else:
            index = None
            if mask is not None:
                nw = mask.shape[0]
                scores = (scores.view(nb // nw, nw, h, n, n) + mask[None, :, None]).view(nb, h, n, n)
            a = scores.softmax(-1)
            if prev is not None:
                a = _focus(a, prev[1])
        keys = n if index is None else index.shape[-1]
        if layer.topk < n and layer.topk != keys:
            a, pos = torch.topk(a, layer.topk, dim=-1)
            index = pos if index is None else torch.gather(index, -1, pos)
        if index is None:
            return a @ v, ('dense', a)
        dense = torch.zeros(nb, h, n, n, dtype=a.dtype, device=a.device).scatter(-1, index, a)
        return dense @ v, ('sparse', a, index)

    def _layer(self, layer, x: torch.Tensor, hw: Tuple[int, int], mask: torch.Tensor, prev):
        b, n_tok, c = x.shape
        heads, ws, shift = layer.num_heads, layer.window_size, layer.shift_size
        qkv = layer.wqkv(layer.norm1(x))  # b, n_tok, 3c
        lepe = layer.v_LePE(qkv[..., 2 * c:], hw)
        grid = qkv.view(b, hw[0], hw[1], 3 * c)
        if shift:
            grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
        qkv_w = window_partition(grid, ws)  # b*nW, n, 3c
        nb, n = qkv_w.shape[:2]
        q, k, v = qkv_w.view(nb, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # b*nW, h, n, d
        out, state = self._attention(layer, q * layer.scale, k, v, mask if shift else None, prev)
        out = window_reverse(out.transpose(1, 2).reshape(nb, n, c), ws, hw[0], hw[1])  # b, H, W, c
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        out = layer.attn_win.proj(out.reshape(b, n_tok, c) + lepe)
        x = x + out
        return x + layer.convffn(layer.norm2(x), hw), state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        h, w = x.shape[-2:]
        x = mirror_pad_to_multiple(x, net.window_size, 'symmetric')
        mean = net.mean.to(x.dtype)
        x = net.conv_first((x - mean) * net.img_range)
        b, c, hp, wp = x.shape
        hw = (hp, wp)
        mask = shift_mask(hp, wp, net.window_size, x.device)
        tokens = net.patch_embed.norm(x.flatten(2).transpose(1, 2))  # b, hp*wp, c
        states: List = [None, None]  # per shift parity, across residual groups
        for group in net.layers:
            y = tokens
            for layer in group.residual_group.layers:
                y, states[layer.slot] = self._layer(layer, y, hw, mask, states[layer.slot])
            conv = group.conv(y.transpose(1, 2).reshape(b, c, hp, wp))
            tokens = conv.flatten(2).transpose(1, 2) + tokens
        feat = net.norm(tokens).transpose(1, 2).reshape(b, c, hp, wp)
        x = net.upsample_features(net.conv_after_body(feat) + x)
        x = x / net.img_range + mean
        return x[..., :h * net.upscale, :w * net.upscale]
