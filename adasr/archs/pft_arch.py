"""PFT: Progressive Focused Transformer for single image super-resolution.

Paper: Long Wei, Yufei Zhu, ..., "Progressive Focused Transformer for Single Image Super-Resolution", CVPR 2025
(arXiv 2503.20337). Upstream: https://github.com/LabShuHangGU/PFT-SR (commit 7d4a687). Written from the
implementation-level specification of that code (not copied from it); state-dict names and shapes follow the
release so the official ``params_ema`` checkpoints load with ``strict=True``. Changes from upstream:

* the sparse products run on :mod:`adasr.ops` (pure PyTorch on any device with exact gradients, or Triton on
  NVIDIA GPUs in fp32/fp16/bf16) instead of the fp32-only CUDA extension ``smm_cuda`` with its racy backward;
* attention is computed in chunks of windows from a memory budget, so no (B*nW, heads, n, n) tensor exists
  for the whole image; dense attention maps that a later layer needs are kept, or recomputed from the layer's
  q and k when keeping them would exceed the budget (inference only; the numbers do not change);
* a layer whose k equals the number of keys it already has skips the (set-preserving) top-k;
* ``use_checkpoint`` enables activation checkpointing per layer in training (upstream: no effect);
* padding handles inputs smaller than half a window (upstream fails there), and the '' (denoising) and
  'nearest+conv' upsamplers, never used by a released model (the first is broken upstream), are rejected.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.utils.checkpoint import checkpoint

from adasr.archs.layers import (
    PixelShuffleDirect,
    PixelShuffleUpsample,
    check_choice,
    pad_to_multiple,
    relative_position_index,
    window_partition,
    window_reverse,
)
from adasr.ops import sparse_av, sparse_qk
from adasr.ops.sparse_attention import chunk_count, memory_budget_bytes

EPS = 1e-20  # PFA's epsilon in the Hadamard renormalisation (float32 in the authors' code)
MASK_VALUE = -100.0  # shift-mask value for keys of another region (not -inf, as upstream)
RGB_MEAN = (0.4488, 0.4371, 0.4040)


# ---- PFA state passed from layer to layer --------------------------------------------------------------------

class _DenseMap:
    """A dense (B_, h, n, n) attention map kept for the next layer of the same shift parity."""

    kind = 'dense'

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def probs(self, sl: slice) -> torch.Tensor:
        return self.maps[sl]


class _DenseRecipe:
    """A dense map that is recomputed per chunk of windows from the layer's q, k and bias (and the map before it)
    instead of being stored: q and k cost 2*n*d per window and head, the map n*n."""

    kind = 'dense'

    def __init__(self, attn: 'PFAttention', q, k, bias, labels, prev: Optional['_DenseRecipe'], training: bool):
        self.attn, self.q, self.k, self.bias, self.labels, self.prev = attn, q, k, bias, labels, prev
        self.training = training

    def probs(self, sl: slice) -> torch.Tensor:
        a = self.attn.dense_probs(self.q[sl], self.k[sl], self.bias, self.labels, sl)
        if self.prev is not None:
            a = _transfer(a, self.prev.probs(sl), self.training)
        return a


class _SparseMap:
    """Top-k weights (B_, h, n, K) and their in-window key indices (stored as int16 / int32)."""

    kind = 'sparse'

    def __init__(self, values: torch.Tensor, index: torch.Tensor):
        self.values, self.index = values, index


def _transfer(a: torch.Tensor, prev: torch.Tensor, training: bool) -> torch.Tensor:
    """Progressive focusing: multiply by the previous map of the same parity and renormalise (spec section 2.4)."""
    prod = a * prev
    if training:
        return (prod + EPS) / (prod.sum(-1, keepdim=True) + EPS)
    prod = prod + EPS
    return prod / (prod.sum(-1, keepdim=True) + EPS)


def _shift_labels(hp: int, wp: int, ws: int, device) -> torch.Tensor:
    """Region label of every token of every window for the shifted layers: (nW, ws*ws), int."""
    shift = ws // 2
    img = torch.zeros(1, hp, wp, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for wsl in cuts:
            img[:, hs, wsl, :] = label
            label += 1
    return window_partition(img, ws).squeeze(-1)


# ---- modules ---------------------------------------------------------------------------------------------------

class DepthwiseConvGELU(nn.Module):
    """Depthwise k x k conv (zero padding, bias) then GELU on a token map. State-dict name ``depthwise_conv.0``."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=channels), nn.GELU())

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *hw)  # b, c, h, w
        return self.depthwise_conv(x).flatten(2).transpose(1, 2)  # b, n, c


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (+ GELU(dwconv)) -> fc2."""

    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DepthwiseConvGELU(hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x, hw)
        return self.fc2(x)


class PFAttention(nn.Module):
    """Window attention with progressive focusing: owns the relative-position-bias table and ``proj``.

    The table has one column per head when ``per_head_bias`` (upstream: ``dim > 100``), else one shared column.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, per_head_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads if per_head_bias else 1))
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    def bias(self, rpi: torch.Tensor) -> torch.Tensor:
        """(h or 1, n, n) relative-position bias."""
        n = rpi.shape[0]
        return self.relative_position_bias_table[rpi.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    @staticmethod
    def dense_probs(q, k, bias, labels: Optional[torch.Tensor], sl: slice) -> torch.Tensor:
        """softmax(q k^T + bias (+ shift mask)) in float32 for windows ``sl`` (q, k: (c, h, n, d))."""
        s = torch.matmul(q, k.transpose(-2, -1)).float() + bias.float()
        if labels is not None:
            n_win = labels.shape[0]
            win = torch.arange(sl.start, sl.start + q.shape[0], device=labels.device) % n_win
            lab = labels[win]  # c, n
            mask = (lab[:, :, None] != lab[:, None, :]).to(s.dtype) * MASK_VALUE
            s = s + mask.unsqueeze(1)
        return torch.softmax(s, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpi: torch.Tensor, prev,
                topk: int, labels: Optional[torch.Tensor]):
        """q (pre-scaled), k, v: (B_, h, n, d). Returns (out (B_, h, n, d), state for the next same-parity layer)."""
        nb, h, n, d = q.shape
        bias = self.bias(rpi)
        sparse_in = prev is not None and prev.kind == 'sparse'
        keys = prev.index.shape[-1] if sparse_in else n
        do_topk = topk < n and topk != keys  # k == K' would only permute the kept set
        keep_dense = topk >= n
        recompute = (keep_dense and not torch.is_grad_enabled()
                     and nb * h * n * n * 4 > memory_budget_bytes())
        per_window = 4 * h * n * keys * 5 + (4 * h * n * n * 2 if prev is not None and prev.kind == 'dense' else 0)
        step = chunk_count(nb, per_window)

        index_dtype = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
        outs, vals, idxs = [], [], []
        for s in range(0, nb, step):
            sl = slice(s, min(nb, s + step))
            if sparse_in:
                index = prev.index[sl].long()
                scores = sparse_qk(q[sl], k[sl], index).float()
                scores = scores + torch.gather(bias.float().expand(index.shape[0], h, n, n), -1, index)
                a = torch.softmax(scores, -1)
                a = _transfer(a, prev.values[sl], self.training)
            else:
                index = None
                a = self.dense_probs(q[sl], k[sl], bias, labels, sl)
                if prev is not None:
                    a = _transfer(a, prev.probs(sl), self.training)
            if do_topk:
                a, pos = torch.topk(a, topk, dim=-1, largest=True, sorted=False)
                index = pos if index is None else torch.gather(index, -1, pos)
            if index is None:
                out = torch.matmul(a.to(v.dtype), v[sl])
            else:
                out = sparse_av(a, v[sl], index)
                idxs.append(index.to(index_dtype))  # int16 for windows up to 181x181: 1/4 of int64
            outs.append(out.to(v.dtype))
            if not recompute:
                vals.append(a)

        out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
        if keep_dense and not sparse_in:
            if recompute:
                state = _DenseRecipe(self, q, k, bias, labels, prev if prev is not None else None, self.training)
            else:
                state = _DenseMap(torch.cat(vals, 0) if len(vals) > 1 else vals[0])
        else:
            cat = (lambda x: torch.cat(x, 0) if len(x) > 1 else x[0])  # noqa: E731
            state = _SparseMap(cat(vals), cat(idxs))
        return out, state


class PFTLayer(nn.Module):
    """One PFT transformer layer: LePE + (shifted) window PFA, then ConvFFN, both pre-norm with residuals."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, topk: int, kernel_size: int,
                 mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.shift_size = window_size // 2 if shift else 0
        self.topk = topk
        self.scale = (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.v_LePE = DepthwiseConvGELU(dim, kernel_size)
        self.attn_win = PFAttention(dim, num_heads, window_size, per_head_bias=dim > 100)
        self.norm2 = nn.LayerNorm(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), kernel_size)

    @property
    def slot(self) -> int:
        return 1 if self.shift_size else 0

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], prev, rpi: torch.Tensor, labels: torch.Tensor):
        """x (B, H*W, C) -> (x, PFA state of this layer)."""
        b, n_tok, c = x.shape
        hh, ww = hw
        ws, heads = self.window_size, self.num_heads
        d = c // heads
        qkv = self.wqkv(self.norm1(x))  # b, n_tok, 3c
        lepe = self.v_LePE(qkv[..., 2 * c:], hw)  # b, n_tok, c
        qkvp = torch.cat([qkv, lepe], -1).view(b, hh, ww, 4 * c)
        if self.shift_size:
            qkvp = torch.roll(qkvp, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        win = window_partition(qkvp, ws)  # b*nW, n, 4c
        q, k, v, lp = win.view(win.shape[0], ws * ws, 4, heads, d).permute(2, 0, 3, 1, 4)  # b*nW, h, n, d
        out, state = self.attn_win(q * self.scale, k, v, rpi, prev, self.topk,
                                   labels if self.shift_size else None)
        out = (out + lp).transpose(1, 2).reshape(win.shape[0], ws * ws, c)
        out = self.attn_win.proj(out)
        out = window_reverse(out, ws, hh, ww)  # b, h, w, c
        if self.shift_size:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x + out.reshape(b, n_tok, c)
        x = x + self.convffn(self.norm2(x), hw)
        return x, state


class _ResidualGroupLayers(nn.Module):
    """Holder so that state-dict names read ``residual_group.layers.{j}``."""

    def __init__(self, layers: List[PFTLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


def _body_conv(dim: int, resi_connection: str) -> nn.Module:
    if resi_connection == '1conv':
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(dim // 4, dim, 3, 1, 1))


class PFTB(nn.Module):
    """Residual group: ``depth`` PFT layers, a 3x3 conv, and a residual connection."""

    def __init__(self, layers: List[PFTLayer], dim: int, resi_connection: str, use_checkpoint: bool):
        super().__init__()
        self.residual_group = _ResidualGroupLayers(layers)
        self.conv = _body_conv(dim, resi_connection)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], states: list, rpi, labels) -> torch.Tensor:
        y = x
        for layer in self.residual_group.layers:
            slot = layer.slot
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                y, states[slot] = checkpoint(layer, y, hw, states[slot], rpi, labels, use_reentrant=False)
            else:
                y, states[slot] = layer(y, hw, states[slot], rpi, labels)
        b, n, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        return y + x


class _PatchEmbedNorm(nn.Module):
    """Holder so that the embedding LayerNorm is named ``patch_embed.norm`` as upstream."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
    return value


@ARCH_REGISTRY.register()
class PFT(nn.Module):
    """PFT / PFT-light super-resolution network (``network_g: {type: PFT, ...}``).

    Args (the keys of the released ``network_g`` blocks; defaults as upstream):
        img_size (int): training patch size; bookkeeping only. Default: 64.
        patch_size (int): must be 1. Default: 1.
        in_chans (int): image channels (in and out). Default: 3.
        embed_dim (int): channels C. ``embed_dim > 100`` selects a per-head relative-position bias (as upstream).
            Default: 90.
        depths (list[int]): layers per residual group. Default: (6, 6, 6, 6).
        num_heads (int): heads of every layer (a list is accepted when all its values are equal). Default: 6.
        num_topk (list[int]): k of every layer by global layer index (``len >= sum(depths)``); ``k >= ws**2`` is
            a dense layer. Non-increasing within each shift parity once sparse. Default: None (all dense).
        window_size (int): attention window side (even). Default: 8.
        convffn_kernel_size (int): odd kernel of the LePE and ConvFFN depthwise convs. Default: 5.
        mlp_ratio (float): ConvFFN hidden = int(C * mlp_ratio). Default: 2.
        qkv_bias (bool): bias in the qkv projection. Default: True.
        ape (bool): absolute position embedding: not supported (no released model uses it). Default: False.
        patch_norm (bool): LayerNorm after the patch embedding. Default: True.
        use_checkpoint (bool): activation checkpointing of every layer in training (upstream: ignored). Default:
            False.
        upscale (int): scale factor. Default: 2.
        img_range (float): image range multiplier. Default: 1.
        upsampler (str): 'pixelshuffle' (classical, 64 features, LeakyReLU slope 0.01) or 'pixelshuffledirect'
            (lightweight). Default: 'pixelshuffle'.
        resi_connection (str): '1conv' or '3conv'. Default: '1conv'.

    Input (B, in_chans, H, W) of any size (padded inside by symmetric mirroring to a multiple of window_size);
    output (B, in_chans, H*upscale, W*upscale).
    """

    pads_input = True

    def __init__(self, *, img_size: Union[int, Sequence[int]] = 64, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 90, depths: Sequence[int] = (6, 6, 6, 6), num_heads: Union[int, Sequence[int]] = 6,
                 num_topk: Optional[Sequence[int]] = None, window_size: int = 8, convffn_kernel_size: int = 5,
                 mlp_ratio: float = 2., qkv_bias: bool = True, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, upscale: int = 2, img_range: float = 1.,
                 upsampler: str = 'pixelshuffle', resi_connection: str = '1conv'):
        super().__init__()
        depths, num_heads, num_topk = self._validate(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, num_topk=num_topk, window_size=window_size,
            convffn_kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio, ape=ape, upscale=upscale,
            img_range=img_range, upsampler=upsampler, resi_connection=resi_connection)
        self.img_size, self.in_chans, self.embed_dim = img_size, in_chans, embed_dim
        self.window_size, self.upscale, self.img_range = window_size, upscale, float(img_range)
        self.upsampler, self.depths, self.num_heads, self.num_topk = upsampler, depths, num_heads, num_topk
        self.use_checkpoint = use_checkpoint

        self.register_buffer('relative_position_index_SA', relative_position_index(window_size), persistent=True)
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, in_chans, 1, 1)
        self.register_buffer('mean', mean, persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchEmbedNorm(embed_dim, patch_norm)
        layers, gid = [], 0
        for depth in depths:
            blk = []
            for j in range(depth):
                blk.append(PFTLayer(embed_dim, num_heads, window_size, shift=j % 2 == 1, topk=num_topk[gid],
                                    kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias))
                gid += 1
            layers.append(PFTB(blk, embed_dim, resi_connection, use_checkpoint))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _body_conv(embed_dim, resi_connection)

        if upsampler == 'pixelshuffle':
            num_feat = 64
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))  # slope 0.01, as upstream
            self.upsample = PixelShuffleUpsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.upsample = PixelShuffleDirect(embed_dim, in_chans, upscale)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @staticmethod
    def _validate(*, img_size, patch_size, in_chans, embed_dim, depths, num_heads, num_topk, window_size,
                  convffn_kernel_size, mlp_ratio, ape, upscale, img_range, upsampler, resi_connection):
        if upsampler == '':
            raise ValueError("upsampler='' (denoising / artefact removal) is not supported: it is broken in the "
                             "PFT authors' code (forward_features is called without its PFA state) and no released "
                             "model uses it; use 'pixelshuffle' or 'pixelshuffledirect'")
        if upsampler == 'nearest+conv':
            raise ValueError("upsampler='nearest+conv' is not supported: no released PFT model uses it; use "
                             "'pixelshuffle' or 'pixelshuffledirect'")
        check_choice('upsampler', upsampler, ('pixelshuffle', 'pixelshuffledirect'))
        check_choice('resi_connection', resi_connection, ('1conv', '3conv'))
        if ape:
            raise ValueError('ape=True (absolute position embedding) is not supported: no released PFT model uses '
                             'it')
        if patch_size != 1:
            raise ValueError(f'patch_size must be 1 (PFT embeds single pixels), got {patch_size!r}')
        if not (isinstance(img_size, int) or (isinstance(img_size, (list, tuple)) and len(img_size) == 2)):
            raise ValueError(f'img_size must be an integer or a pair, got {img_size!r}')
        _positive_int('in_chans', in_chans)
        _positive_int('embed_dim', embed_dim)
        _positive_int('upscale', upscale)
        window_size = _positive_int('window_size', window_size, 2)
        if window_size % 2:
            raise ValueError(f'window_size must be even (the shift is window_size/2), got {window_size}')
        if not isinstance(convffn_kernel_size, int) or convffn_kernel_size < 1 or convffn_kernel_size % 2 == 0:
            raise ValueError(f'convffn_kernel_size must be a positive odd integer, got {convffn_kernel_size!r}')
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f'mlp_ratio must be positive, got {mlp_ratio!r}')
        if not isinstance(img_range, (int, float)) or img_range <= 0:
            raise ValueError(f'img_range must be positive, got {img_range!r}')
        if upsampler == 'pixelshuffle' and not (upscale & (upscale - 1) == 0 or upscale == 3):
            raise ValueError(f"upscale={upscale} is not supported by upsampler 'pixelshuffle': use a power of 2 or 3")
        if isinstance(depths, int) or not depths or not all(
                isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in depths):
            raise ValueError(f'depths must be a non-empty list of positive integers, got {depths!r}')
        depths = list(depths)
        if isinstance(num_heads, (list, tuple)):
            if not num_heads or len(set(num_heads)) != 1:
                raise ValueError(f'num_heads must be one integer (every PFT layer has the same heads); got '
                                 f'{num_heads!r}')
            num_heads = num_heads[0]
        _positive_int('num_heads', num_heads)
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim={embed_dim} is not divisible by num_heads={num_heads}')
        if resi_connection == '3conv' and embed_dim % 4:
            raise ValueError(f"resi_connection='3conv' needs embed_dim divisible by 4, got {embed_dim}")
        n = window_size * window_size
        total = sum(depths)
        if num_topk is None:
            num_topk = [n] * total
        if isinstance(num_topk, int) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                for x in num_topk):
            raise ValueError(f'num_topk must be a list of positive integers, got {num_topk!r}')
        num_topk = list(num_topk)
        if len(num_topk) < total:
            raise ValueError(f'num_topk has {len(num_topk)} entries but the network has sum(depths)={total} layers')
        kept = [n, n]  # keys each parity carries (n = dense)
        gid = 0
        for depth in depths:
            for j in range(depth):
                slot, k = j % 2, num_topk[gid]
                if k > kept[slot] and kept[slot] < n:
                    raise ValueError(f'num_topk[{gid}]={k} exceeds the {kept[slot]} keys that layer inherits from the '
                                     f'previous layer with the same shift; k must not increase within a parity')
                kept[slot] = min(k, n)
                gid += 1
        return depths, num_heads, num_topk

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = self.patch_embed.norm(x.flatten(2).transpose(1, 2))  # b, h*w, c
        labels = _shift_labels(hh, ww, self.window_size, x.device)
        rpi = self.relative_position_index_SA
        states = [None, None]  # PFA state per shift parity, carried across residual groups
        for blk in self.layers:
            tokens = blk(tokens, (hh, ww), states, rpi, labels)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'PFT expects (B, {self.in_chans}, H, W) input, got shape {tuple(x.shape)}')
        h, w = x.shape[-2:]
        x, _, _ = pad_to_multiple(x, self.window_size, mode='symmetric')
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        if self.upsampler == 'pixelshuffle':
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        x = x / self.img_range + mean
        return x[..., :h * self.upscale, :w * self.upscale]

    def extra_repr(self) -> str:
        return (f'upscale={self.upscale}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'upsampler={self.upsampler!r}')
