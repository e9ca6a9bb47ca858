"""AdaFormer: adaptive token halting for efficient image super-resolution.

Paper: "Transformer-based Image Super-Resolution with Adaptive Token Halting" / AdaFormer, AAAI 2024.
Authors' code: github.com/xiaotongtt/AdaFormer (commit 9a7602d), read for facts only; this file is written from
``ADAFORMER_SPEC.md`` (the project's description of their computation) and keeps their parameter names so that
their checkpoints load with ``strict=True``.

What differs from the authors' code (their batch-1 results on their supported inputs are unchanged):

* BasicSR range convention outside (input and output in 0..1), their 0..255 range inside (``img_range``).
* Any batch size at eval, with per-sample masks (theirs crashes for B > 1).
* Any input size: the eval global split is at least 1 (theirs crashes for a padded short side <= 32), reflect
  padding falls back to a periodic mirror when the pad is not smaller than the side, and the eval chunk padding
  repeats the kept-token list cyclically when fewer tokens remain than the padding needs (theirs crashes).
* Eval computes the attention only for kept windows and tokens, vectorised over windows and chunks.
"""
import contextlib
import math
from typing import Dict, Literal, Optional, Sequence, Tuple, Union

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from adasr.archs.exportable import Exportable
from adasr.archs.halting import HaltingInfo, halting_sparsity
from adasr.archs.interface import ArchTraits, SRArch
from adasr.archs.layers import (
    DIV2K_RGB_MEAN,
    Mlp,
    PixelShuffleDirect,
    pad_to_multiple,
    relative_position_index,
    window_partition,
    window_reverse,
)
from adasr.ops import cpu_inference, narrow_conv, winograd
from adasr.ops.config import CONV3X3_METHODS, get_option
from adasr.ops.layout import is_channels_last, nchw_to_tokens, pixel_shuffle_nchw, to_channels_last, tokens_to_nchw
from adasr.utils.checks import check_int, check_positive, is_real

_POLICY_EPS = 1e-6  # the masked softmax of the authors' training-mode global branch
# sparse eval's global chunks of at least this many tokens are computed one at a time at CPU inference (in cache; the
# same numbers: measured bit for bit from 16 tokens up, tiny chunks take other product kernels in a batch of one;
# below ~1000 tokens the per-chunk calls cost more than the cache saves)
_CHUNKWISE_MIN = 1024
# ... on one thread. With more, each step takes whole chunks up to this many tokens (a 48 MiB qkv; a step holds one
# chunk or this many tokens, whichever is larger): a chunk's dozen small operators, each split over the threads,
# spend their time forking and joining, and stall whenever another core is busy. Measured on two cores, 270 x 480
# (64 chunks of 2040 tokens), one block: all chunks at once 62-79 ms against 94-114 ms one at a time with the second
# core free, 186 ms against 390 ms with another process on it (one thread, one at a time: 134 ms); this rule (two
# steps of 32 chunks there) in the whole forward: docs/adaformer.md, *Twelfth round*. The same numbers: the
# operators batch the chunks (a batched product runs each matrix's kernel)
_GLOBAL_STEP_TOKENS = 65536


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """EDSR residual block: conv3x3, ReLU, conv3x3, times ``res_scale``, plus the input. Names ``body.{0,2}``."""

    def __init__(self, n_feats: int, res_scale: float):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feats, n_feats, 3, 1, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_feats, n_feats, 3, 1, 1))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)  # a fresh tensor that no backward needs: in-place is safe, also in training
        if self.res_scale != 1:
            out.mul_(self.res_scale)
        return out.add_(x)

    def forward_mkldnn(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on a oneDNN-layout tensor (no autograd): the convolutions run in the blocked layout that
        oneDNN would reorder an NCHW tensor into and back from, so the result is bit for bit ``forward``'s."""
        out = _conv_onednn(_conv_onednn(x, self.body[0], relu=True), self.body[2])
        if self.res_scale != 1:
            out = out.mul_(self.res_scale)
        return out.add_(x)


_CONV_POINTWISE = hasattr(torch.ops.mkldnn, '_convolution_pointwise')  # oneDNN convolution + post-op


def _cpu_autocast_inference(x: torch.Tensor) -> bool:
    """CPU inference (no autograd) under autocast (``--precision bf16``)."""
    return x.device.type == 'cpu' and not torch.is_grad_enabled() and torch.is_autocast_enabled('cpu')


def _conv_onednn(x: torch.Tensor, conv: nn.Conv2d, relu: bool = False) -> torch.Tensor:
    """``conv`` (then ReLU when ``relu``: a oneDNN post-op, the same numbers without a pass over the output)
    applied to a oneDNN-layout tensor (see :func:`adasr.ops.cpu_inference.onednn_ok`); returns one."""
    if relu and _CONV_POINTWISE:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                       conv.dilation, conv.groups, 'relu', [], '')
    y = torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return y.relu_() if relu else y


class TokenMlp(Mlp):
    """The TSAB MLP (``fc1``, exact GELU, ``fc2``). At CPU float32 inference ``fc1`` and the GELU run as one oneDNN
    linear with a GELU post-op (the same numbers without a pass over the hidden activations), and ``fc2`` as a
    oneDNN linear with its bias in the product (the same numbers without a pass that copies the bias):
    :func:`adasr.ops.cpu_inference.linear_gelu` and ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (cpu_inference.fast_path_ok(x) and self.act.approximate == 'none'):
            return super().forward(x)
        hidden = cpu_inference.linear_gelu(x, self.fc1.weight, self.fc1.bias)
        return cpu_inference.linear(hidden, self.fc2.weight, self.fc2.bias)


class ResBlocks(nn.Sequential):
    """A chain of :class:`ResBlock` (an ``nn.Sequential``: the authors' state-dict names). On the CPU without
    autograd, in float32, the chain runs in oneDNN's blocked layout from end to end (one conversion in and one out
    instead of two reorders per convolution): the same numbers, about a tenth less time.

    ``conv3x3`` (None: the ops option ``conv3x3``, ``ADASR_CONV3X3``, default ``'auto'``): ``'winograd'`` or a
    variant of :data:`adasr.ops.winograd.VARIANTS` runs the convolutions there by Winograd's algorithm instead,
    channels-last from end to end with the ReLU in the first convolution's output transform (about 1.8x faster on
    one AVX-512 core for F(4x4, 3x3), 1.2x for F(2x2, 3x3); other rounding, docs/winograd.md); ``'auto'`` is the
    chain's :attr:`auto` method (AdaFormer: ``'direct'`` in the encoder, ``'f2'`` in the decoder). Under CPU
    autocast (``--precision bf16``, no autograd) the chain runs channels-last from end to end instead: oneDNN's bf16
    convolutions then take their input as it is, without reordering NCHW in and out of every call."""

    conv3x3: Optional[str] = None
    auto: str = 'direct'

    def method(self) -> str:
        """The convolution method in effect: :attr:`conv3x3`, else the ops option; ``'auto'`` is :attr:`auto`."""
        method = self.conv3x3 or get_option('conv3x3')
        return self.auto if method == 'auto' else method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self) and _cpu_autocast_inference(x):
            # reduced precision on the CPU: channels-last from end to end (oneDNN's bf16 convolutions take NHWC as
            # it is instead of reordering NCHW in and out of every call: the chains 1.6x faster, the same numbers)
            h = x.contiguous(memory_format=torch.channels_last)
            for blk in self:
                h = blk(h)
            return h.contiguous()
        if not len(self) or not cpu_inference.onednn_ok(x):
            return super().forward(x)
        method = self.method()
        if method != 'direct':
            return self.forward_channels_last(x, method)
        h = x.to_mkldnn()
        for blk in self:
            h = blk.forward_mkldnn(h)
        return h.to_dense()

    def forward_channels_last(self, x: torch.Tensor, method: str) -> torch.Tensor:
        """The chain (no autograd) channels-last from end to end, its convolutions by
        :func:`adasr.ops.winograd.conv3x3` ``method`` (``'direct'``: oneDNN's channels-last convolution, else a
        Winograd variant) with the ReLU fused into the first; returns channels-last for a channels-last input, else
        NCHW."""
        h = to_channels_last(x)
        for blk in self:
            out = winograd.conv3x3(h, blk.body[0].weight, blk.body[0].bias, relu=True, method=method)
            if blk.res_scale == 1:  # the residual added as the output is written (into h when it is the chain's own)
                h = winograd.conv3x3(out, blk.body[2].weight, blk.body[2].bias, method=method, residual=h,
                                     inplace=h is not x)
                continue
            out = winograd.conv3x3(out, blk.body[2].weight, blk.body[2].bias, method=method)
            h = out.mul_(blk.res_scale).add_(h)
        return h if is_channels_last(x) else h.contiguous()


class MeanShift(nn.Conv2d):
    """The EDSR MeanShift as a trainable 1x1 conv (identity weight, bias ``sign * img_range * mean``).

    The authors' MeanShift parameters are trainable in practice (``requires_grad=False`` is set on the module
    object, which freezes nothing), so a trained checkpoint may hold drifted values: it stays a real conv. At CPU
    float32 inference it runs by :func:`adasr.ops.narrow_conv.conv1x1_narrow`: PyTorch's numbers bit for bit without
    its oneDNN kernel for three channels, which it takes from two threads up (25-120 ms for a 1088 x 1920 image on
    two cores, the compiled sum 5 ms)."""

    def __init__(self, n_colors: int, rgb_mean: Sequence[float], img_range: float, sign: int):
        super().__init__(n_colors, n_colors, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(n_colors).view(n_colors, n_colors, 1, 1))
            self.bias.copy_(sign * img_range * torch.tensor(rgb_mean, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return narrow_conv.conv1x1_narrow(x, self.weight, self.bias)


#: cost of the estimator's window path per pixel (a window with its two-pixel halo, gathered) against the whole
#: map's, measured at 270 x 480, S = 8, one thread: 900 of 2040 windows took 78 ms, the whole map 73 ms, 73 windows
#: 6.9 ms (0.087-0.094 ms against 0.036 ms per window: 2.5x, of which the halo is 2.25x)
WINDOW_PATH_COST = 1.1
#: cost of the estimator's token path per token (its 5 x 5 patch gathered, the hidden 3 x 3 around it, the logit)
#: against the whole map's per pixel (:meth:`AdaM.live_windows`); measured at 270 x 480 for 206 to 19790 tokens:
#: 15.6-18.9 on one thread (1628 tokens 17.2 ms, the whole map 82.7 ms), 16.4-23.8 on two
TOKEN_PATH_COST = 20.0


def region_order(hp: int, wp: int, split: int, device: torch.device) -> torch.Tensor:
    """Token indices (raster numbering of an Hp x Wp map) listed region by region.

    The map is cut into ``split x split`` rectangles of (Hp/split) x (Wp/split), ordered row-major over the grid;
    tokens are raster-ordered inside a region.
    """
    rh, rw = hp // split, wp // split
    idx = torch.arange(hp * wp, device=device).view(split, rh, split, rw)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def chunk_padding_positions(num_kept: int, groups: int, device: torch.device) -> torch.Tensor:
    """Positions into the kept-token list that form the padded list cut into ``groups`` equal chunks.

    The list is padded to a multiple of ``groups`` by appending its last ``pad`` entries in order
    (positions ``L - pad .. L - 1``), as the authors do. When fewer than ``pad`` tokens are kept (their code fails),
    the positions wrap around the list: ``(L - pad + j) mod L``, i.e. the list repeated cyclically.
    """
    pad = (-num_kept) % groups
    base = torch.arange(num_kept, device=device)
    if pad == 0:
        return base
    extra = torch.remainder(torch.arange(num_kept - pad, num_kept, device=device), num_kept)
    return torch.cat([base, extra])


class AdaFormerAttention(nn.Module):
    """The TSAB token mixer (the authors' ``LightViTAttention``): window attention (local) plus prototype
    attention (global), each applied only to tokens that have not halted.

    Names follow the authors' checkpoint. ``proj``, ``norm2`` and ``norm3`` are defined there but never used;
    they are kept so that checkpoints load strictly.

    ``forward`` returns ``local + global`` (B, N, C): halted tokens contribute their input ``u`` to each branch.
    """

    def __init__(self, dim: int, num_heads: int, num_prototypes: int, window_size: int):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prototypes = num_prototypes
        self.window_size = window_size
        self._folded: Dict[int, tuple] = {}  # id(linear) -> (weight key, weight, bias) with scale folded into q

        self.prototype = nn.Parameter(torch.zeros(1, num_prototypes, dim))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size).flatten())
        self.qkv = nn.Linear(dim, dim * 3)
        self.qkv_local = nn.Linear(dim, dim * 3)
        self.kv_global = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)  # unused by the authors' forward
        self.norm1 = nn.LayerNorm(dim)  # applied to the prototypes
        self.norm2 = nn.LayerNorm(dim)  # unused
        self.norm3 = nn.LayerNorm(dim)  # unused
        nn.init.trunc_normal_(self.prototype, std=0.02)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    # -- shared pieces -------------------------------------------------------------------------------------------

    def _qkv(self, linear: nn.Linear, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``linear(x)`` split into heads (q, k, v), with q multiplied by ``scale``."""
        if self._foldable(linear, x):
            return self._heads(self._scaled_linear(linear, x), 3)
        q, k, v = self._heads(linear(x), 3)
        return q * self.scale, k, v

    def _qkv_scaled(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` (..., 3C) with its q part multiplied by ``scale``."""
        if self._foldable(linear, x):
            return self._scaled_linear(linear, x)
        out = linear(x)
        if torch.is_grad_enabled() and out.requires_grad:
            return torch.cat((out[..., :self.dim] * self.scale, out[..., self.dim:]), -1)
        out[..., :self.dim].mul_(self.scale)
        return out

    def _foldable(self, linear: nn.Linear, x: torch.Tensor) -> bool:
        """Without autograd, when ``scale`` is a power of two (head_dim 4, 16, 64, ...), the factor can be folded
        into the q rows of the weight and bias: a product with a power of two is exact, so q is bit for bit
        ``linear(x)[q] * scale``, and the pass over q is saved."""
        return (math.frexp(self.scale)[0] == 0.5 and linear.bias is not None and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)))

    def _scaled_linear(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w, b = linear.weight, linear.bias
        key = (w.data_ptr(), w._version, w.dtype, b.data_ptr(), b._version)
        cached = self._folded.get(id(linear))
        if cached is None or cached[0] != key:
            scale = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
            scale[:self.dim] = self.scale
            cached = (key, (w * scale).detach(), (b * scale[:, 0]).detach())
            self._folded[id(linear)] = cached
        return cpu_inference.linear(x, cached[1], cached[2])  # (oneDNN, bias in the product, at CPU inference)

    def _heads(self, x: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
        """(..., n, parts*C) with channels ordered [part][head][head_dim] -> ``parts`` tensors (..., heads, n, hd)."""
        *lead, n, _ = x.shape
        x = x.view(*lead, n, parts, self.num_heads, self.head_dim)
        x = x.permute(*range(len(lead)), len(lead) + 1, len(lead) + 2, len(lead), len(lead) + 3)
        return x.unbind(len(lead))

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        """(..., heads, n, hd) -> (..., n, heads*hd)."""
        x = x.transpose(-3, -2)
        return x.reshape(*x.shape[:-2], -1)

    def _position_bias(self) -> torch.Tensor:
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1)  # heads, n, n

    def _prototype_queries(self) -> torch.Tensor:
        """Queries of the prototypes: the shared ``qkv`` applied to LN(prototype), q part; (heads, M, hd)."""
        p = F.linear(self.norm1(self.prototype[0]), self.qkv.weight[:self.dim], self.qkv.bias[:self.dim])
        return p.view(self.num_prototypes, self.num_heads, self.head_dim).transpose(0, 1)

    def window_attention(self, xw: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention inside windows with the relative-position bias; (n, S*S, C) -> same."""
        if self._grouped_ok(xw):  # the same numbers, computed for groups of windows that stay in cache
            return cpu_inference.window_attention(self._scaled_linear(self.qkv_local, xw),
                                                  self._position_bias().contiguous(), self.num_heads)
        q, k, v = self._qkv(self.qkv_local, xw)
        attn = (q @ k.transpose(-2, -1)).add_(self._position_bias())  # (the product's grad needs q, k)
        return self._merge(attn.softmax(-1) @ v)

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """CPU float32 inference with the scale folded into the weights: the window attention may run by
        :mod:`adasr.ops.cpu_inference` (groups of windows, the same numbers)."""
        return cpu_inference.fast_path_ok(x) and self._foldable(self.qkv_local, x)

    def _broadcast(self, q: torch.Tensor, agg: torch.Tensor) -> torch.Tensor:
        """Tokens attend over the aggregated prototypes. q (..., h, n, hd), already times ``scale``; agg (..., M, C)
        -> (..., n, C)."""
        kp, vp = self._heads(self.kv_global(agg), 2)
        attn = q @ kp.transpose(-2, -1)
        return self._merge(attn.softmax(-1) @ vp)

    # -- dense (training) path -------------------------------------------------------------------------------------

    def local_dense(self, u: torch.Tensor, hw: Tuple[int, int], keep_win: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, c = u.shape
        xw = window_partition(u.view(b, hw[0], hw[1], c), self.window_size)  # b*nW, S*S, c
        if keep_win is None:
            out = self.window_attention(xw)
        else:
            m = keep_win.to(u.dtype).view(-1, 1, 1)
            out = self.window_attention(xw * m)  # halted windows' inputs are zeroed (then blended away)
            out = out * m + xw * (1 - m)
        return window_reverse(out, self.window_size, hw[0], hw[1]).view(b, n, c)

    def global_dense(self, u: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """Prototype attention over the whole image; halted tokens are removed from the aggregation by the authors'
        masked softmax (logits times mask, softmax over all keys, times mask, +eps/M over the sum + eps)."""
        q, k, v = self._qkv(self.qkv, u)  # b, h, n, hd
        logits = (self._prototype_queries() * self.scale) @ k.transpose(-2, -1)  # b, h, M, n
        if keep is None:
            agg = logits.softmax(-1) @ v
        else:
            m = keep.to(u.dtype)[:, None, None, :]
            logits = logits * m
            e = (logits - logits.amax(-1, keepdim=True)).exp() * m
            attn = (e + _POLICY_EPS / self.num_prototypes) / (e.sum(-1, keepdim=True) + _POLICY_EPS)
            agg = (attn * m) @ v
        out = self._broadcast(q, self._merge(agg))
        if keep is not None:
            m = keep.to(u.dtype)[..., None]
            out = out * m + u * (1 - m)
        return out

    # -- sparse (eval) path ------------------------------------------------------------------------------------------

    def global_sparse(self, u: torch.Tensor, hw: Tuple[int, int], keep: Optional[torch.Tensor],
                      split: int, plus_u: bool = False) -> torch.Tensor:
        """The authors' eval global branch, per sample: kept tokens listed region by region (split x split
        regions), padded to a multiple of split**2 and cut into split**2 consecutive chunks; each chunk aggregates
        its own prototypes and broadcasts them back to its tokens. Only kept tokens are projected.

        Returns ``u`` itself when no token of any sample is kept, else a new tensor (halted tokens = ``u``).
        ``plus_u``: returns ``global + u`` instead, always a new tensor (what :meth:`forward_sparse` returns where no
        window attends; one pass over the map less than adding ``u`` afterwards, the same sums)."""
        if keep is not None and not bool(keep.any()):
            return u + u if plus_u else u
        groups = split * split
        qp = self._prototype_queries() * self.scale  # h, M, hd
        # every token of a sample whose tokens are all kept is overwritten below: no copy of u needed
        partial = keep is not None and not bool(keep.all())
        out = (u + u if plus_u else u.clone()) if partial else torch.empty_like(u)
        for i, idx, padded, step in self._kept_lists(u, hw, keep, split):
            self._global_chunks_into(u[i], idx, padded, groups, qp, out[i], plus_u, step)
        return out

    def _kept_lists(self, u: torch.Tensor, hw: Tuple[int, int], keep: Optional[torch.Tensor], split: int):
        """Per sample with a kept token: (sample, its kept-token list in region order, that list padded to
        split**2 equal chunks or None when it is every token in raster order (no gather or scatter), chunks a
        step) for :meth:`_global_chunks_into`."""
        groups = split * split
        order = region_order(hw[0], hw[1], split, u.device)
        for i in range(u.shape[0]):
            idx = order if keep is None else order[keep[i][order]]
            num = idx.numel()
            if num == 0:
                continue
            whole = num == u.shape[1] and split == 1  # all kept, one chunk in raster order: no gather
            pos = chunk_padding_positions(num, groups, u.device)
            padded = None if whole else idx if pos.numel() == num else idx[pos]
            step = groups  # every chunk in one step: the batched computation
            if not whole and pos.numel() >= _CHUNKWISE_MIN * groups and cpu_inference.fast_path_ok(u):
                # CPU inference: one chunk a step in cache on one thread, steps of whole chunks on more
                step = 1 if torch.get_num_threads() == 1 else max(1, _GLOBAL_STEP_TOKENS * groups // pos.numel())
            yield i, idx, padded, step

    def global_plus_u_kept(self, x: torch.Tensor, norm: nn.Module, hw: Tuple[int, int], keep: torch.Tensor,
                           split: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``global + u`` (:meth:`global_sparse` with ``plus_u``) at the kept tokens only, u = ``norm(x)`` computed
        for the rows the branch reads and no others (a LayerNorm acts on each row on its own: the numbers of
        normalising the whole map). Returns (flat row indices over B x N, ascending; their values (k, C)). No
        autograd (sparse eval on the CPU)."""
        n, c = x.shape[1:]
        groups = split * split
        qp = self._prototype_queries() * self.scale
        rows, values = [], []
        for i, idx, padded, step in self._kept_lists(x, hw, keep, split):
            gathered = norm(x[i] if padded is None else x[i].index_select(0, padded))  # the list order (padded)
            vals = x.new_empty(idx.numel(), c)
            self._global_chunks_into(gathered, idx, padded, groups, qp, vals, True, step, gathered=True)
            rows.append(idx + i * n)
            values.append(vals)
        rows, values = torch.cat(rows), torch.cat(values)
        rows, perm = rows.sort()
        return rows, values[perm]

    def _global_chunks_into(self, u: torch.Tensor, idx: torch.Tensor, padded: Optional[torch.Tensor], groups: int,
                            qp: torch.Tensor, out: torch.Tensor, plus_u: bool, step: int,
                            gathered: bool = False) -> None:
        """:meth:`global_sparse` for one sample, ``step`` chunks at a time: their tokens gathered (the padded list
        before the projection: the same rows, one copy of qkv less), projected, aggregated, broadcast and written
        back. Every chunk's numbers are those of the batched computation over all chunks (``step = groups``).
        u, out (N, C); idx: the kept-token list in region order; padded: that list padded to ``groups`` equal
        chunks, or None when idx is every token in raster order (no gather, no scatter); ``plus_u``: writes
        ``global + u``. ``gathered``: ``u`` holds the rows of the padded list in its order already and ``out`` (the
        list's length) receives the list's values in its order."""
        c = u.shape[-1]
        num = idx.numel()
        chunk = (num if padded is None else padded.numel()) // groups
        in_order = padded is None or gathered
        for j in range(0, groups, step):
            start, m = j * chunk, min(step, groups - j)
            valid = min(m * chunk, num - start)
            if valid <= 0:
                break
            x = u[start:start + m * chunk] if in_order else u.index_select(0, padded[start:start + m * chunk])
            qkv = self._qkv_scaled(self.qkv, x)
            q, k, v = self._heads(qkv.view(m, chunk, 3 * c), 3)  # m, h, chunk, hd
            agg = self._merge((qp @ k.transpose(-2, -1)).softmax(-1) @ v)  # m, M, c
            y = self._broadcast(q, agg).reshape(m * chunk, c)[:valid]
            if plus_u:
                y = y + x[:valid]  # (x: the kept tokens in list order, then the padding)
            if in_order:
                out[start:start + valid] = y
            else:
                out.index_copy_(0, idx[start:start + valid], y)

    def forward_sparse(self, u: torch.Tensor, hw: Tuple[int, int], keep_tok: Optional[torch.Tensor],
                       keep_win: Optional[torch.Tensor], split: int) -> torch.Tensor:
        """local + global with attention computed only for kept windows and tokens. The result is assembled in
        one tensor: ``global + u`` (halted windows give ``u``), then kept windows are overwritten with
        ``window_attention + global`` (the same sums, in the same order, as adding the two branch outputs)."""
        b, n, c = u.shape
        s = self.window_size
        if keep_win is not None and not bool(keep_win.any()):  # no window attends: global + u
            return self.global_sparse(u, hw, keep_tok, split, plus_u=True)
        g = self.global_sparse(u, hw, keep_tok, split)
        if (keep_win is None or bool(keep_win.all())) and self._grouped_ok(u):
            # every window: attention read from the raster qkv map and added into g in place, window groups at a
            # time (g + local: the same sums as below)
            g = g.clone() if g is u else g
            qkv = self._scaled_linear(self.qkv_local, u).view(b, hw[0], hw[1], 3 * c)
            return cpu_inference.window_attention_add_(qkv, self._position_bias().contiguous(), self.num_heads, s, g)
        if keep_win is None or bool(keep_win.all()):
            local = self.window_attention(window_partition(u.view(b, hw[0], hw[1], c), s))
            return window_reverse(local, s, hw[0], hw[1]).view(b, n, c).add_(g)
        out = g + u
        ids = keep_win.nonzero().squeeze(1)
        if ids.numel():
            nwy, nwx = hw[0] // s, hw[1] // s
            bi, rest = ids.div(nwy * nwx, rounding_mode='floor'), ids.remainder(nwy * nwx)
            wy, wx = rest.div(nwx, rounding_mode='floor'), rest.remainder(nwx)

            def windows(t):  # b, nwy, nwx, s, s, c view
                return t.view(b, nwy, s, nwx, s, c).permute(0, 1, 3, 2, 4, 5)

            xw = windows(u)[bi, wy, wx].reshape(-1, s * s, c)
            local = self.window_attention(xw).view(-1, s, s, c)
            windows(out)[bi, wy, wx] = local + windows(g)[bi, wy, wx]
        return out

    def forward(self, u: torch.Tensor, hw: Tuple[int, int], keep_tok: Optional[torch.Tensor] = None,
                keep_win: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
        """u: LN1 of the tokens (B, Hp*Wp, C), raster order. keep_tok: (B, N) bool; keep_win: (B*nW,) bool
        (window order of :func:`window_partition`); ``None`` means all kept. ``split=None``: dense masked path
        (training); an int: sparse path with that eval global split. Returns local + global, (B, N, C)."""
        if split is None:
            return self.local_dense(u, hw, keep_win) + self.global_dense(u, keep_tok)
        return self.forward_sparse(u, hw, keep_tok, keep_win, split)


def _windows_halted(keep_tok: Optional[torch.Tensor], keep_win: Optional[torch.Tensor]) -> bool:
    """No window of any sample kept (``None`` means all kept)."""
    return keep_tok is not None and keep_win is not None and not bool(keep_win.any())


class TSAB(nn.Module):
    """Token-selective attention block, pre-norm: ``x + attn(LN1 x)`` then ``x + MLP(LN2 x)``.

    The MLP, both LayerNorms and the residuals run on every token, halted or not. ``project_out`` exists in the
    authors' checkpoints but is never used.
    """

    def __init__(self, dim: int, num_heads: int, num_prototypes: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.attn = AdaFormerAttention(dim, num_heads, num_prototypes, window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.project_out = nn.Conv2d(dim, dim, 1)  # unused
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], keep_tok=None, keep_win=None, split=None) -> torch.Tensor:
        if split is not None and _windows_halted(keep_tok, keep_win) and cpu_inference.fast_path_ok(x):
            return self._forward_windows_halted(x, hw, keep_tok, split)
        a = self.attn(self.norm1(x), hw, keep_tok, keep_win, split)
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
            x = x + a
            return x + self.mlp(self.norm2(x))
        if cpu_inference.fast_path_ok(x):
            # both residual additions, LayerNorm 2 and the MLP in groups of rows that stay in cache: the same numbers
            return cpu_inference.residual_rows_(x, lambda r: self.mlp(self.norm2(r)), a)
        x = x.add_(a)  # no autograd: update the token stream in place (it is this block's own tensor)
        return x.add_(self.mlp(self.norm2(x)))

    def _forward_windows_halted(self, x: torch.Tensor, hw: Tuple[int, int], keep_tok: torch.Tensor,
                                split: int) -> torch.Tensor:
        """Sparse eval on the CPU when no window attends: the local branch gives u = LN1(x) everywhere and the
        global branch u at halted tokens, so the attention is u + u there and ``global + u`` at the kept tokens.
        LN1 and the doubled residual run in the MLP's row groups (no map of u or of the attention); the kept tokens'
        rows get ``x + (global + u)``, computed from their LN1 rows alone (:meth:`AdaFormerAttention.
        global_plus_u_kept`). The numbers of :meth:`forward` through the attention module, bit for bit."""
        patch = None
        if bool(keep_tok.any()):
            rows, values = self.attn.global_plus_u_kept(x, self.norm1, hw, keep_tok, split)
            patch = (rows, x.view(-1, x.shape[-1]).index_select(0, rows).add_(values))
        return cpu_inference.residual_rows_(x, lambda r: self.mlp(self.norm2(r)), twice=self.norm1, patch=patch)


class AdaM(nn.Module):
    """The adaptive module (the authors' ``PSPL``): embed, TSAB blocks with halting bookkeeping between them,
    unembed, plus the module residual. ``var`` is the confidence estimator shared by all blocks."""

    def __init__(self, n_feats: int, embed_dim: int, depths: int, num_heads: int, num_prototypes: int,
                 window_size: int, mlp_ratio: float, estimator_hidden: int):
        super().__init__()
        self.window_size = window_size
        self.embed = nn.Conv2d(n_feats, embed_dim, 1)
        self.blocks = nn.ModuleList(
            TSAB(embed_dim, num_heads, num_prototypes, window_size, mlp_ratio) for _ in range(depths))
        self.var = nn.Sequential(nn.Conv2d(embed_dim, estimator_hidden, 3, 1, 1), nn.Tanh(),
                                 nn.Conv2d(estimator_hidden, 1, 3, 1, 1))
        self.unembed = nn.Conv2d(embed_dim, n_feats, 1)

    def forward(self, fe: torch.Tensor, eps_h: float, split: Optional[int], skip_dead: bool = False,
                channels_last: bool = False):
        """fe (B, n_feats, Hp, Wp). Returns (output, logits, global keep maps, window keep maps (B, 1, Hp/S, Wp/S),
        complete flags, pending), maps as bool, logits live (they carry the estimator's graph in training).

        ``skip_dead`` (sparse eval): the estimator runs only on the windows that can still change a decision
        (:meth:`live_windows`); the others get logit +inf and their map is flagged incomplete. The map made after the
        last block decides nothing: it is not computed; the returned ``pending`` (else None) computes it, the same
        numbers, when the halting record is read (:meth:`last_map`), under this call's autocast state.

        At CPU float32 inference an NCHW ``fe`` is taken as tokens once: the embedding is a oneDNN linear of them
        where that gives the convolution's numbers (:func:`adasr.ops.cpu_inference.conv1x1_tokens`, checked per
        shape); with ``channels_last`` (the decoder's layout) the output is channels-last, the unembedding and the
        module residual one oneDNN linear of the tokens with the addition as a post-op (the same sums as the 1x1
        convolution plus ``fe``, in the decoder's layout without a copy)."""
        b, _, hp, wp = fe.shape
        t, fe_tokens = self.embed_tokens(fe)
        score = fe.new_zeros(b, 1, hp, wp)
        threshold = 1 - eps_h
        keep_tok = keep_win = live = None
        logits, g_maps, w_maps, complete = [], [], [], []
        pending = None
        for i, blk in enumerate(self.blocks):
            t = blk(t, (hp, wp), keep_tok, keep_win, split)
            if skip_dead and i == len(self.blocks) - 1:
                # the tokens are not written after the last block; the record may be read outside this autocast
                dev = t.device.type
                amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
                pending = (t, score, live, threshold, amp)
                break
            logit = self.estimate(t, (hp, wp), live)
            complete.append(live is None)
            score = score + torch.sigmoid(logit.detach())
            g = score < threshold
            w = F.avg_pool2d(score, self.window_size) < threshold
            keep_tok, keep_win = g.view(b, -1), w.reshape(-1)
            if skip_dead:
                live = self.live_windows(g, w)
            logits.append(logit)
            g_maps.append(g)
            w_maps.append(w)
        return self.unembed_add(t, fe, fe_tokens, channels_last), logits, g_maps, w_maps, complete, pending

    def embed_tokens(self, fe: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The embedding of fe (B, n_feats, Hp, Wp) as tokens (B, Hp*Wp, C), and fe's own tokens where they were
        made (an NCHW fe at CPU float32 inference: the embedding is then a linear of them), else None."""
        if cpu_inference.fast_path_ok(fe) and not is_channels_last(fe) and not _cpu_autocast_inference(fe):
            fe_tokens = nchw_to_tokens(fe)
            return cpu_inference.conv1x1_tokens(fe, fe_tokens, self.embed.weight, self.embed.bias), fe_tokens
        return nchw_to_tokens(self.embed(fe)), None  # (register-tile transposes; channels-last: no copy)

    def unembed_add(self, t: torch.Tensor, fe: torch.Tensor, fe_tokens: Optional[torch.Tensor],
                    channels_last: bool) -> torch.Tensor:
        """``fe + unembed(tokens t as a map)``: channels-last from one linear of the tokens with the addition of fe's
        tokens as its post-op where those were made and ``channels_last`` is asked for; else by the convolution,
        NCHW for an NCHW fe."""
        b, _, hp, wp = fe.shape
        if fe_tokens is not None and channels_last:
            out = cpu_inference.linear_add(t, fe_tokens, self.unembed.weight.flatten(1), self.unembed.bias)
            return out.view(b, hp, wp, -1).permute(0, 3, 1, 2)
        # NCHW by a blocked transpose; for a channels-last fe (Winograd chains) the tokens are that layout already
        return fe + self.unembed(t.transpose(1, 2).reshape(b, -1, hp, wp) if is_channels_last(fe)
                                 else tokens_to_nchw(t, hp, wp))

    def last_map(self, pending: tuple) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """The map after the last block that sparse eval deferred: (logit, token keep map, window keep map,
        complete), computed as the loop of :meth:`forward` would have (no autograd; autocast as that call had it)."""
        t, score, live, threshold, amp = pending
        hp, wp = score.shape[-2:]
        with torch.no_grad(), (contextlib.nullcontext() if amp is None else torch.autocast(t.device.type, dtype=amp)):
            logit = self.estimate(t, (hp, wp), live)
            score = score + torch.sigmoid(logit)
            return (logit, score < threshold, F.avg_pool2d(score, self.window_size) < threshold, live is None)

    def live_windows(self, g: torch.Tensor, w: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Where the estimator's next output can still change a decision, as (flat window indices over B x window
        grid, flat token indices over B x Hp x Wp), or None when the whole map is cheaper.

        The accumulated score only grows (sigmoid > 0), so a token at or above the threshold stays halted, and so
        does a window whose mean score is. A window still kept needs every token's logit (its mean decides); in a
        halted window only the tokens still kept need theirs. Costs against the whole map, per pixel: a window is
        convolved with its halo, (S+4)^2 pixels for S^2 (2.25x at S = 8), plus gathering it
        (:data:`WINDOW_PATH_COST`); a token alone takes its 5 x 5 patch and the 3 x 3 hidden values around it
        (:data:`TOKEN_PATH_COST`). g: token keep map (B, 1, Hp, Wp); w: window keep map (B, 1, Hp/S, Wp/S)."""
        b, _, nwy, nwx = w.shape
        s = self.window_size
        wins = w.flatten().nonzero().squeeze(1)
        cost = wins.numel() * (s + 4) ** 2 * WINDOW_PATH_COST
        whole = w.numel() * s * s
        if cost >= whole:
            return None
        # kept tokens of halted windows
        alone = g.view(b, nwy, s, nwx, s).logical_and(~w.view(b, nwy, 1, nwx, 1)).flatten().nonzero().squeeze(1)
        if cost + alone.numel() * TOKEN_PATH_COST >= whole:
            return None
        return wins, alone

    def _estimator_logits(self, hidden: torch.Tensor, padding: int, whole: Tuple[int, ...]) -> torch.Tensor:
        """The estimator's last convolution (hidden -> one logit map) at inference, with the numbers PyTorch gives
        the whole hidden map of shape ``whole``: where that is oneDNN's, by the compiled kernel of
        :mod:`adasr.ops.narrow_conv` once it has found oneDNN's summation order (oneDNN pads the one output channel
        to a vector of 16 or 8 and reorders the input: 6-7x the time), for the whole map as for windows cut from it."""
        conv2 = self.var[2]
        return narrow_conv.conv3x3_to_one(hidden, conv2.weight, conv2.bias, padding,
                                          onednn_order=narrow_conv.pytorch_uses_onednn(whole))

    def estimate(self, t: torch.Tensor, hw: Tuple[int, int],
                 live: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Estimator logits (B, 1, Hp, Wp) of the tokens t (B, Hp*Wp, C). ``live``: (flat window indices, flat
        token indices) to compute (:meth:`live_windows`; the others get +inf), or None for the whole map (detached
        input in training, as the authors).

        The window path convolves each window with a halo of two pixels, the token path each token's 5 x 5 patch
        (one pixel per 3x3 conv; zero outside the image, the hidden map zeroed outside the image as the padding of
        the second conv): the same sums as the whole-map convolutions, bit for bit."""
        b, n, c = t.shape
        hp, wp = hw
        if live is None and cpu_inference.onednn_ok(t):
            # the tokens as an NCHW map (a blocked transpose, ops.layout), then oneDNN's blocked layout
            hidden = _conv_onednn(tokens_to_nchw(t, hp, wp).to_mkldnn(), self.var[0]).to_dense()
            return self._estimator_logits(torch.tanh(hidden, out=hidden), 1, hidden.shape)
        if live is None:
            # NCHW-contiguous, as the authors' estimator sees it (the reshape alone is a channels_last view, which
            # oneDNN convolves with other rounding at batch > 1)
            feat = tokens_to_nchw(t, hp, wp).contiguous()
            return self.var(feat.detach() if self.training else feat)
        windows, tokens = live
        s = self.window_size
        logit = t.new_full((b, 1, hp, wp), float('inf'))
        if windows.numel():
            bi, wy, wx = torch.unravel_index(windows, (b, hp // s, wp // s))
            out = self._patch_logits(t, hw, bi, wy * s, wx * s, s)  # n, 1, s, s
            logit.view(b, hp // s, s, wp // s, s).permute(0, 1, 3, 2, 4)[bi, wy, wx] = out[:, 0]
        if tokens.numel():
            bi, ys, xs = torch.unravel_index(tokens, (b, hp, wp))
            logit.view(-1)[tokens] = self._patch_logits(t, hw, bi, ys, xs, 1).view(-1)
        return logit

    def _patch_logits(self, t: torch.Tensor, hw: Tuple[int, int], bi: torch.Tensor, y0: torch.Tensor,
                      x0: torch.Tensor, size: int) -> torch.Tensor:
        """Estimator logits (n, 1, size, size) of the size x size squares of tokens at rows y0, columns x0 of image
        bi (tokens t (B, Hp*Wp, C)), each convolved from its patch with a two-pixel halo. oneDNN convolves a batch
        of one patch with another kernel (other rounding) and PyTorch's tanh takes the scalar function for the
        last elements of a thread's share that do not fill two vectors: the batch is padded (repeating the first
        patch) to a multiple of twice the thread count, so every patch gets the whole map's numbers."""
        n, (hp, wp), c = bi.numel(), hw, t.shape[-1]
        extra = -n % (2 * max(1, torch.get_num_threads()))
        if extra:
            bi, y0, x0 = (torch.cat([v, v[:1].expand(extra)]) for v in (bi, y0, x0))
        conv1 = self.var[0]
        # the squares with their halo gathered from the token map, zero outside the image (no padded copy of the map)
        pos = torch.arange(-2, size + 2, device=t.device)
        ys, xs = y0[:, None] + pos, x0[:, None] + pos  # m, size+4
        inside = ((ys >= 0) & (ys < hp))[:, :, None] & ((xs >= 0) & (xs < wp))[:, None, :]
        patches = t.view(-1, hp, wp, c)[bi[:, None, None], ys.clamp(0, hp - 1)[:, :, None],
                                        xs.clamp(0, wp - 1)[:, None, :]]  # m, size+4, size+4, c
        patches = patches.masked_fill_(~inside[..., None], 0).permute(0, 3, 1, 2).contiguous()  # m, c, .., ..
        hidden = self.var[1](F.conv2d(patches, conv1.weight, conv1.bias))  # m, hidden, size+2, size+2
        inside = inside[:, 1:-1, 1:-1]
        hidden = hidden * inside[:, None]
        out = self._estimator_logits(hidden, 0, (t.shape[0], hidden.shape[1], hp, wp))  # m, 1, size, size
        return out[:n]


# ---------------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------------


@ARCH_REGISTRY.register()
class AdaFormer(SRArch, Exportable, nn.Module):
    """AdaFormer (AAAI-24) super-resolution network; ``AdaFormer()`` is the paper's x4 model (1,602,721 parameters).

    Input (B, in_chans, H, W) in 0..1, any size and batch (padded inside by reflection to a multiple of
    ``window_size``, cropped back). Internally the authors' 0..255 range (``img_range``). To feed the authors'
    0..255 tensors: ``sr255 = net(x255 / 255) * 255``.

    Returns:
        eval mode: the SR tensor (B, in_chans, upscale*H, upscale*W), not clamped.
        train mode: ``(sr, logits)`` with ``logits`` the list of ``depths`` estimator outputs (before the sigmoid),
        cropped to (B, 1, H, W), carrying gradient to the estimator only (it runs on detached features);
        :class:`~adasr.losses.uncertainty_loss.UncertaintyLoss` takes them.

    After every forward, ``net.last_halting`` (a :class:`HaltingInfo`, detached) holds the per-layer logits,
    confidence, global and local keep masks at the padded size, the unpadded size, and the sparsity of that call.
    The record is built when first read: a forward only keeps references to the (detached) maps it made anyway, so
    training pays no device-to-host sync and no full-resolution mask for it.
    :meth:`flops` counts the multiply-accumulates of that call.

    Args:
        upscale (int): upscaling factor. Default: 4.
        in_chans (int): image channels. Default: 3.
        n_feats (int): channels of the convolutional encoder/decoder. Default: 64.
        embed_dim (int): token channels in AdaM. Default: 64.
        n_resblocks (int): EDSR residual blocks in all, half before AdaM (encoder), half after (decoder). Default: 16.
        depths (int): number of TSAB blocks in AdaM (the authors' ``pspl_depths``). Default: 6.
        num_heads (int): attention heads. Default: 4.
        num_prototypes (int): global prototypes per block (``query_num``). Default: 16.
        window_size (int): local window side, also the padding multiple. Default: 8.
        mlp_ratio (float): MLP hidden width / embed_dim. Default: 2.
        eps_h (float): halting threshold: a token halts once its accumulated confidence reaches ``1 - eps_h``.
            Larger is faster. Can be changed after construction (``net.eps_h = 0.2``). Default: 0.05.
        img_range (float): the pixel range the network works in (255 for the authors' weights). Default: 255.
        rgb_mean (sequence of float): mean subtracted (times img_range) before the head. Default: DIV2K mean.
        res_scale (float): residual scaling in the ResBlocks. Default: 1.
        estimator_hidden (int, optional): hidden channels of the confidence estimator. Default: embed_dim // 2.
        eval_global_split ('auto' or int): sparse-eval global branch: ``'auto'`` follows the authors (kept tokens
            cut into split**2 chunks, split = min(2**round(log2(min(Hp, Wp) / 48)), 8), at least 1); an int fixes
            the split; ``1`` is whole-image global attention, as in training and the paper's Eq. 13.
            Default: 'auto'.
        sparse_eval (bool): eval computes attention for kept windows/tokens only. ``False`` computes every token
            and masks (the training computation, whole-image global), for comparisons. Default: True.
        complete_halting_maps (bool): sparse eval runs the confidence estimator on every token, as the authors.
            ``False`` skips the tokens where it can no longer change a decision (halted tokens of halted windows;
            ``HaltingInfo.complete`` flags such maps, whose skipped entries hold logit +inf); masks and SR are the
            same bit for bit. Can be changed after construction. Default: False.
    """

    def __init__(self, *, upscale: int = 4, in_chans: int = 3, n_feats: int = 64, embed_dim: int = 64,
                 n_resblocks: int = 16, depths: int = 6, num_heads: int = 4, num_prototypes: int = 16,
                 window_size: int = 8, mlp_ratio: float = 2.0, eps_h: float = 0.05, img_range: float = 255.0,
                 rgb_mean: Sequence[float] = DIV2K_RGB_MEAN, res_scale: float = 1.0,
                 estimator_hidden: Optional[int] = None, eval_global_split: Union[Literal['auto'], int] = 'auto',
                 sparse_eval: bool = True, complete_halting_maps: bool = False, conv3x3: Optional[str] = None):
        super().__init__()
        for name, value, low in (('upscale', upscale, 1), ('in_chans', in_chans, 1), ('n_feats', n_feats, 1),
                                 ('embed_dim', embed_dim, 1), ('n_resblocks', n_resblocks, 0), ('depths', depths, 1),
                                 ('num_heads', num_heads, 1), ('num_prototypes', num_prototypes, 1),
                                 ('window_size', window_size, 1)):
            check_int(name, value, low)
        if n_resblocks % 2:
            raise ValueError(f'n_resblocks must be even (half encoder, half decoder), got {n_resblocks}')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim={embed_dim} must be divisible by num_heads={num_heads}')
        estimator_hidden = embed_dim // 2 if estimator_hidden is None else estimator_hidden
        check_int('estimator_hidden', estimator_hidden, 1)
        for name, value in (('mlp_ratio', mlp_ratio), ('img_range', img_range), ('res_scale', res_scale)):
            check_positive(name, value)
        rgb_mean = tuple(rgb_mean) if isinstance(rgb_mean, (list, tuple)) else rgb_mean
        if not isinstance(rgb_mean, tuple) or len(rgb_mean) != in_chans or not all(is_real(v) for v in rgb_mean):
            raise ValueError(f'rgb_mean must be a list of {in_chans} numbers, got {rgb_mean!r}')
        for name, value in (('sparse_eval', sparse_eval), ('complete_halting_maps', complete_halting_maps)):
            if not isinstance(value, bool):
                raise ValueError(f'{name} must be true or false, got {value!r}')

        self.upscale = upscale
        self.window_size = window_size
        self.img_range = float(img_range)
        self.eps_h = eps_h  # validated by the property setter
        self.eval_global_split = eval_global_split
        self.sparse_eval = sparse_eval
        self.complete_halting_maps = complete_halting_maps
        self._halting_raw: Optional[tuple] = None  # what the last forward made; HaltingInfo built when first read
        self._halting: Optional[HaltingInfo] = None

        # registration order = the authors' (their state-dict order)
        self.sub_mean = MeanShift(in_chans, rgb_mean, self.img_range, -1)
        self.add_mean = MeanShift(in_chans, rgb_mean, self.img_range, 1)
        self.head = nn.Sequential(nn.Conv2d(in_chans, n_feats, 3, 1, 1))
        self.shollow_feature_extraction = ResBlocks(  # sic: the authors' spelling, kept for their checkpoints
            *[ResBlock(n_feats, res_scale) for _ in range(n_resblocks // 2)])
        self.body = AdaM(n_feats, embed_dim, depths, num_heads, num_prototypes, window_size, mlp_ratio,
                         estimator_hidden)
        self.deep_feature_extraction = ResBlocks(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks // 2)])
        # conv3x3 'auto': the decoder (and the tail) come after every halting decision, so a convolution there can
        # move SR but no mask; F(2x2, 3x3) moves it least of the Winograd variants (docs/winograd.md)
        self.deep_feature_extraction.auto = 'f2'
        self.tail = PixelShuffleDirect(n_feats, in_chans, upscale)
        self.conv3x3 = conv3x3

    # -- the declared interface (adasr.archs.interface) ---------------------------------------------------------

    def arch_traits(self) -> ArchTraits:
        # memory: calibrated in docs/upscale.md, with room for inputs where few tokens halt; a 272 px window keeps
        # the eval global split at 8, as on big whole images. Half: bf16 only (it works in the 0..255 range, where
        # fp16's range is not verified with trained weights); tiles differ slightly from the whole image (global
        # branch and halting see the tile), hence 'discouraged' (docs/spandrel.md).
        return ArchTraits(pads_input=True, window=self.window_size,
                          bytes_per_pixel=8 * 1024.0 * max(1.0, self.head[0].out_channels / 64),
                          memory_source='AdaFormer: 8 KiB x n_feats/64 per LR pixel (calibrated)', min_window=272,
                          preferred_half=torch.bfloat16, half_dtypes=(torch.bfloat16,), adaptive=True,
                          tiling='discouraged')

    def halting_record(self) -> Optional[HaltingInfo]:
        return self.last_halting

    def set_halting_record(self, info: Optional[HaltingInfo]) -> None:
        self.last_halting = info

    def get_halting_threshold(self) -> float:
        return self.eps_h

    def set_halting_threshold(self, value: float) -> None:
        self.eps_h = value

    def get_complete_halting_maps(self) -> bool:
        return self.complete_halting_maps

    def set_complete_halting_maps(self, value: bool) -> None:
        self.complete_halting_maps = bool(value)

    @property
    def last_halting(self) -> Optional[HaltingInfo]:
        """The :class:`HaltingInfo` of the last forward (None before the first), built on first access."""
        if self._halting is None and self._halting_raw is not None:
            self._halting = self._record(*self._halting_raw)
            self._halting_raw = None
        return self._halting

    @last_halting.setter
    def last_halting(self, info: Optional[HaltingInfo]) -> None:
        self._halting, self._halting_raw = info, None

    # -- run-time switches -----------------------------------------------------------------------------------------

    @property
    def eps_h(self) -> float:
        return self._eps_h

    @eps_h.setter
    def eps_h(self, value: float) -> None:
        if not is_real(value) or math.isnan(value):
            raise ValueError(f'eps_h must be a number, got {value!r}')
        self._eps_h = float(value)

    @property
    def eval_global_split(self) -> Union[str, int]:
        return self._eval_global_split

    @eval_global_split.setter
    def eval_global_split(self, value: Union[str, int]) -> None:
        if value != 'auto':
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or self.window_size % value:
                raise ValueError(f"eval_global_split must be 'auto' or a positive divisor of window_size="
                                 f'{self.window_size} (1 = whole-image global attention), got {value!r}')
        self._eval_global_split = value

    def global_split(self, hp: int, wp: int) -> int:
        """The eval global split for a padded size: the authors' rule, at least 1, and a divisor of window_size
        (so that the regions tile the padded map)."""
        if self._eval_global_split != 'auto':
            return self._eval_global_split
        split = min(2.0 ** round(math.log2(min(hp, wp) / 48)), 8)
        split = max(int(split), 1)
        while self.window_size % split:
            split //= 2
        return split

    @property
    def conv3x3(self) -> Optional[str]:
        """How the 32 convolutions of the encoder and decoder chains and the tail's run at CPU float32 inference:
        ``'direct'`` (oneDNN, the authors' numbers bit for bit), ``'auto'`` (the encoder direct, so every halting
        decision and mask is the authors' bit for bit; the decoder and the tail by Winograd F(2x2, 3x3): SR within
        a few 1e-4 of the authors' on the 0..255 scale, docs/winograd.md), ``'winograd'`` (= ``'f4'``) or another
        variant of :data:`adasr.ops.winograd.VARIANTS` everywhere; None follows the ops option ``conv3x3``
        (``ADASR_CONV3X3``, default ``'auto'``). The confidence estimator always runs directly; so do training,
        autograd and other devices."""
        return self.shollow_feature_extraction.conv3x3

    def _conv_methods(self) -> Tuple[str, str]:
        """The methods in effect in the encoder and in the decoder (and the tail)."""
        return self.shollow_feature_extraction.method(), self.deep_feature_extraction.method()

    @conv3x3.setter
    def conv3x3(self, value: Optional[str]) -> None:
        if value is not None and value not in CONV3X3_METHODS:
            raise ValueError(f'conv3x3 must be one of {list(CONV3X3_METHODS)} (or null: the ADASR_CONV3X3 option), '
                             f'got {value!r}')
        self.shollow_feature_extraction.conv3x3 = self.deep_feature_extraction.conv3x3 = value

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f'AdaFormer expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}')
        h, w = x.shape[-2:]
        x, _, _ = pad_to_multiple(x, self.window_size, mode='reflect')
        hp, wp = x.shape[-2:]
        dense = self.training or not self.sparse_eval
        split = None if dense else self.global_split(hp, wp)

        # No channels_last: it is ~20% faster on CPU but its 3x3 convs are ~2x less accurate in float32 and move SR
        # 3x further from the authors' outputs. The NCHW numbers (theirs, bit for bit) are kept; CPU inference runs
        # the ResBlock chains in oneDNN's blocked layout, which gives the same numbers (ResBlocks).
        f0 = self.head(self.sub_mean(x * self.img_range))
        encoder, decoder = self._conv_methods()
        if encoder != 'direct' and cpu_inference.onednn_ok(f0):
            # Winograd chains: channels-last from the head to the tail (the tokens are channels-last, the 1x1
            # convolutions and residual additions keep the layout): no layout change between the chains
            f0 = to_channels_last(f0)
        fe = self.shollow_feature_extraction(f0)
        fa, logits, g_maps, w_maps, complete, pending = self.body(
            fe, self._eps_h, split, skip_dead=split is not None and not self.complete_halting_maps,
            channels_last=decoder != 'direct')
        if decoder != 'direct' and cpu_inference.onednn_ok(fa):
            # a Winograd decoder and tail run channels-last (their NCHW transposes cost more than one conversion)
            fa = to_channels_last(fa)
        fd = self.deep_feature_extraction(fa)
        if is_channels_last(fd) and not is_channels_last(f0):
            f0 = to_channels_last(f0)  # an addition of two layouts walks one of them with large strides
        sr = self.add_mean(self._tail(fd.add_(f0)))  # fd is the decoder's own output: in place is safe
        sr = (sr[..., :h * self.upscale, :w * self.upscale] / self.img_range).contiguous()

        self._halting, self._halting_raw = None, ([lg.detach() for lg in logits], g_maps, w_maps, complete, (h, w),
                                                  (hp, wp), split, pending)
        if self.training:
            return sr, [lg[..., :h, :w] for lg in logits]
        return sr

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """The tail (conv3x3 + pixel shuffle); its convolution by Winograd when the decoder uses it (:attr:`conv3x3`):
        it comes after every halting decision, like the decoder."""
        method = self._conv_methods()[1]
        if method == 'direct' or not cpu_inference.onednn_ok(x):
            return self.tail(x)
        conv = self.tail[0]
        # the SR map NCHW, as the authors' (their add_mean convolves NCHW), shuffled from the channels-last
        # convolution in one compiled pass (PyTorch's shuffle of it and the NCHW copy after it: ~3x the time)
        return pixel_shuffle_nchw(winograd.conv3x3(x, conv.weight, conv.bias, method=method),
                                  self.tail[1].upscale_factor)

    def _record(self, logits, g_maps, w_maps, complete, size, padded, split, pending) -> HaltingInfo:
        s = self.window_size
        if pending is not None:  # the last map, deferred by sparse eval
            logit, g, w, done = self.body.last_map(pending)
            logits, g_maps, w_maps, complete = logits + [logit], g_maps + [g], w_maps + [w], complete + [done]
        logits = [lg.detach() for lg in logits]
        g_keep = [g.float() for g in g_maps]
        l_keep = [w.float().repeat_interleave(s, 2).repeat_interleave(s, 3) for w in w_maps]
        return HaltingInfo(logits=logits, confidence=[torch.sigmoid(lg) for lg in logits], global_keep=g_keep,
                           local_keep=l_keep, complete=list(complete), input_size=size, padded_size=padded,
                           mode='dense' if split is None else 'sparse', eval_global_split=split,
                           sparsity=halting_sparsity(g_keep, l_keep, size))

    def export_module(self) -> nn.Module:
        """The eval forward with static control flow for ONNX export
        (:class:`~adasr.archs.adaformer_export.AdaFormerExport`: masked dense computation of the same halting,
        windows and global chunks; same outputs)."""
        from adasr.archs.adaformer_export import AdaFormerExport

        return AdaFormerExport(self)

    # -- cost ------------------------------------------------------------------------------------------------------

    def flops(self, h: int, w: int, convention: Literal['actual', 'authors'] = 'actual',
              breakdown: bool = False) -> Union[float, Dict[str, float]]:
        """Multiply-accumulates for one LR image of h x w (:func:`adasr.archs.adaformer_cost.adaformer_macs`: the
        conventions, and the keep masks of the last forward when it ran on that size)."""
        from adasr.archs.adaformer_cost import adaformer_macs

        return adaformer_macs(self, h, w, convention, breakdown)

def load_authors_weights(net: AdaFormer, path: str, strict: bool = True) -> AdaFormer:
    """Load a checkpoint saved by the authors' EDSR-style trainer (``model_x4.pt``: a bare state dict of the network,
    possibly with a ``module.`` or ``model.`` prefix) or a BasicSR file (``params``/``params_ema``) into ``net``,
    read with ``weights_only=True``. Mismatches raise a :class:`~adasr.utils.checkpoint.CheckpointError` naming
    the keys."""
    from adasr.utils.checkpoint import load_weights

    load_weights(net, path, 'params', strict)
    return net
