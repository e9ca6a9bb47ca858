"""PFT: Progressive Focused Transformer for single image super-resolution.

Paper: Long Wei, Yufei Zhu, ..., "Progressive Focused Transformer for Single Image Super-Resolution", CVPR 2025
(arXiv 2503.20337). Upstream: https://github.com/LabShuHangGU/PFT-SR (commit 7d4a687). Written from the
implementation-level specification of that code (not copied from it); state-dict names and shapes follow the
release so the official ``params_ema`` checkpoints load with ``strict=True``. Changes from upstream:

* the sparse products run on :mod:`adasr.ops` (pure PyTorch on any device with exact gradients, or Triton on
  NVIDIA GPUs in fp32/fp16/bf16) instead of the fp32-only CUDA extension ``smm_cuda`` with its racy backward;
* attention is computed in chunks of windows from a memory budget, so no (B*nW, heads, n, n) tensor exists
  for the whole image; without autograd it runs on the tiled, in-place inference engine of
  :mod:`adasr.archs.pft_engine` (the same numbers);
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

from adasr.archs.exportable import Exportable
from adasr.archs.interface import ArchTraits, SRArch
from adasr.archs.layers import (
    DIV2K_RGB_MEAN,
    PixelShuffleDirect,
    PixelShuffleUpsample,
    pad_to_multiple,
    relative_position_index,
    window_partition,
)
from adasr.archs.pft_engine import (
    DenseMap,
    RelativeBias,
    ShiftMask,
    SparseMap,
    attend,
    dense_scores,
    focus,
    index_dtype,
    shift_labels,
    softmax,
)
from adasr.ops import chunk_count, cpu_inference, sparse_av, sparse_qk, topk_positions
from adasr.ops.layout import rows_to_heads
from adasr.utils.checks import check_choice, check_int

# ---- per-forward geometry ------------------------------------------------------------------------------------------

class _Frame:
    """Per-forward geometry shared by every layer: the token order of the windows (unshifted and shifted, as row
    permutations of the (B*H*W, C) token matrix) and the shift mask."""

    def __init__(self, b: int, hh: int, ww: int, ws: int, device):
        self.hw, self.window_size = (hh, ww), ws
        self.mask = ShiftMask(shift_labels(hh, ww, ws, device))
        self._orders = {}
        self._b, self._device = b, device

    def order(self, shift: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(perm, inverse): windows[j] = tokens[perm[j]] for ``window_partition(roll(tokens, -shift))``."""
        if shift not in self._orders:
            hh, ww = self.hw
            idx = torch.arange(self._b * hh * ww, device=self._device).view(self._b, hh, ww, 1)
            if shift:
                idx = torch.roll(idx, shifts=(-shift, -shift), dims=(1, 2))
            perm = window_partition(idx, self.window_size).reshape(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            self._orders[shift] = (perm, inv)
        return self._orders[shift]


# ---- modules ---------------------------------------------------------------------------------------------------

class DepthwiseConvGELU(nn.Module):
    """Depthwise k x k conv (zero padding, bias) then GELU on a token map. State-dict name ``depthwise_conv.0``."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=channels), nn.GELU())

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return _conv_tokens(self.depthwise_conv, x, hw)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; at CPU float32 inference a oneDNN linear with the bias in the product (the same numbers,
    2.6x faster for PFT-light's 65536 x 52 -> 156 qkv projection on one AVX-512 core: :func:`cpu_inference.linear`)."""
    return cpu_inference.linear(x, layer.weight, layer.bias)


def _conv_tokens(conv: nn.Module, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Apply a conv to a token map (B, H*W, C) read as a channels-last image (no transposed copies); -> (B, H*W, C')."""
    b, n, c = x.shape
    y = conv(x.view(b, *hw, c).permute(0, 3, 1, 2))  # b, c, h, w with channels-last strides
    return y.permute(0, 2, 3, 1).reshape(b, n, y.shape[1])


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (+ GELU(dwconv)) -> fc2."""

    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DepthwiseConvGELU(hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.act(_linear(self.fc1, x))
        x = x + self.dwconv(x, hw)
        return _linear(self.fc2, x)


class PFAttention(nn.Module):
    """Window attention with progressive focusing: owns the relative-position-bias table and ``proj``.

    The table has one column per head when ``per_head_bias`` (upstream: ``dim > 100``), else one shared column.

    With autograd the attention is the plain formulation of the spec, over chunks of whole windows sized from the
    memory budget, out of place, so gradients are the plain autograd gradients. Without autograd it runs on the
    inference engine, :func:`adasr.archs.pft_engine.attend` (tiled, in place, threaded; the same numbers).
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
        """(h or 1, n, n) relative-position bias (contiguous)."""
        return self.relative_position_bias_table.t()[:, rpi]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpi: torch.Tensor, prev,
                topk: int, labels: Optional[torch.Tensor]):
        """q (pre-scaled), k, v: (B_, h, n, d); ``prev``: state of the previous layer of the same shift parity;
        ``labels``: region labels (or :class:`~adasr.archs.pft_engine.ShiftMask`) of a shifted layer, else None.
        Returns (out (B_, h, n, d), state for the next same-parity layer)."""
        mask = labels if labels is None or isinstance(labels, ShiftMask) else ShiftMask(labels)
        if not torch.is_grad_enabled():  # the (h, n, n) bias built only where a layer needs it
            table = self.relative_position_bias_table.t().float()
            return attend(q, k, v, RelativeBias(table, rpi), mask, prev, topk, self.training)
        bias = self.bias(rpi).float()
        nb, h, n, _ = q.shape
        sparse_in = prev is not None and prev.kind == 'sparse'
        keys = prev.keys if sparse_in else n
        do_topk = topk < n and topk != keys  # k == K' would only permute the kept set
        keep_dense = topk >= n  # (validation: a sparse parity never returns to dense)
        dense_prev = prev is not None and prev.kind == 'dense'
        step = chunk_count(nb, 4 * h * n * keys * 5 + (4 * h * n * n * 2 if dense_prev else 0))
        outs, values, indices = [], [], []
        for w0 in range(0, nb, step):  # chunks of whole windows
            ws, rs = slice(w0, min(nb, w0 + step)), slice(0, n)
            if sparse_in:
                idx = prev.index[ws]
                a = softmax(sparse_qk(q[ws], k[ws], idx, bias=bias).float(), inplace=False)
                a = focus(a, prev.values[ws], self.training)
            else:
                idx = None
                a = softmax(dense_scores(q, k, bias, mask, ws, rs), inplace=False)
                if prev is not None:
                    a = focus(a, prev.probs(ws, rs), self.training)
            if do_topk:
                pos = topk_positions(a, topk)
                a = torch.gather(a, -1, pos)
                idx = pos if idx is None else torch.gather(idx, -1, pos)
                indices.append(idx.to(index_dtype(n)))
            outs.append((torch.matmul(a.to(v.dtype), v[ws]) if idx is None else sparse_av(a, v[ws], idx)).to(v.dtype))
            values.append(a)
        cat = (lambda x: torch.cat(x, 0) if len(x) > 1 else x[0])  # noqa: E731
        if keep_dense:
            return cat(outs), DenseMap(cat(values))
        return cat(outs), SparseMap(cat(values), cat(indices) if do_topk else prev.index)


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

    def forward(self, x: torch.Tensor, frame: _Frame, prev, rpi: torch.Tensor):
        """x (B, H*W, C) -> (x, PFA state of this layer)."""
        b, n_tok, c = x.shape
        heads = self.num_heads
        n = self.window_size ** 2
        perm, inv = frame.order(self.shift_size)
        qkv = _linear(self.wqkv, self.norm1(x))  # b, n_tok, 3c
        lepe = self.v_LePE(qkv[..., 2 * c:], frame.hw)  # b, n_tok, c
        # (shifted) window order, split into heads, queries scaled: windows[j] = tokens[perm[j]] (one compiled pass
        # at CPU inference, PyTorch's gather and permuted copy under autograd)
        q, k, v = rows_to_heads(qkv.reshape(b * n_tok, 3 * c), perm, 3, heads, n, self.scale).unbind(0)  # b*nW, h, n, d
        nb = q.shape[0]
        out, state = self.attn_win(q, k, v, rpi, prev, self.topk, frame.mask if self.shift_size else None)
        out = out.to(q.dtype)  # the engine scores in float32; half-precision networks continue in their type
        # back to token order (and un-shifted) in one row gather, + LePE there (channel h*d + e), then the projection
        out = out.transpose(1, 2).reshape(nb * n, c).index_select(0, inv).add_(lepe.reshape(b * n_tok, c))
        out = _linear(self.attn_win.proj, out)
        x = x + out.view(b, n_tok, c)
        x = x + self.convffn(self.norm2(x), frame.hw)
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

    def forward(self, x: torch.Tensor, frame: _Frame, states: list, rpi) -> torch.Tensor:
        y = x
        for layer in self.residual_group.layers:
            slot = layer.slot
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                y, states[slot] = checkpoint(layer, y, frame, states[slot], rpi, use_reentrant=False)
            else:
                y, states[slot] = layer(y, frame, states[slot], rpi)
        return _conv_tokens(self.conv, y, frame.hw) + x


class _PatchEmbedNorm(nn.Module):
    """Holder so that the embedding LayerNorm is named ``patch_embed.norm`` as upstream."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()


@ARCH_REGISTRY.register()
class PFT(SRArch, Exportable, nn.Module):
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
        mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, in_chans, 1, 1)
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
        check_int('in_chans', in_chans)
        check_int('embed_dim', embed_dim)
        check_int('upscale', upscale)
        window_size = check_int('window_size', window_size, 2)
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
        check_int('num_heads', num_heads)
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

    def arch_traits(self) -> ArchTraits:
        # memory calibrated on PFT-light x4 (docs/upscale.md), scaled by embed_dim for the classical PFT
        return ArchTraits(pads_input=True, window=self.window_size,
                          bytes_per_pixel=40 * 1024.0 * max(1.0, self.embed_dim / 52),
                          memory_source='PFT: 40 KiB x embed_dim/52 per LR pixel (calibrated on PFT-light)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = self.patch_embed.norm(x.flatten(2).transpose(1, 2))  # b, h*w, c
        frame = _Frame(b, hh, ww, self.window_size, x.device)
        rpi = self.relative_position_index_SA
        states = [None, None]  # PFA state per shift parity, carried across residual groups
        for blk in self.layers:
            tokens = blk(tokens, frame, states, rpi)
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
        x = self.upsample_features(self.conv_after_body(self.forward_features(x)) + x)
        x = x / self.img_range + mean
        return x[..., :h * self.upscale, :w * self.upscale]

    def upsample_features(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction head: body features (B, C, H, W) -> (B, in_chans, scale*H, scale*W), before the
        range and mean are undone."""
        if self.upsampler == 'pixelshuffle':
            return self.conv_last(self.upsample(self.conv_before_upsample(x)))
        return self.upsample(x)

    def export_module(self) -> nn.Module:
        """The eval forward with static control flow for ONNX export (:class:`~adasr.archs.pft_export.PFTExport`:
        dense scores, TopK and GatherElements; same outputs)."""
        from adasr.archs.pft_export import PFTExport

        return PFTExport(self)

    def extra_repr(self) -> str:
        return (f'upscale={self.upscale}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'upsampler={self.upsampler!r}')
