"""HAT and ATD baselines, registered in BasicSR's ARCH_REGISTRY as ``HAT`` and ``ATD``.

The networks are spandrel's (MIT licence, https://github.com/chaiNNer-org/spandrel), which vendors the authors'
code with type hints, keyword-only constructors and padding inside ``forward``:

* HAT: "Activating More Pixels in Image Super-Resolution Transformer", Chen et al., CVPR 2023, arXiv:2205.04437,
  https://github.com/XPixelGroup/HAT.
* ATD: "Transcending the Limit of Local Window: Advanced Super-Resolution Transformer with Adaptive Token
  Dictionary", Zhang et al., CVPR 2024, arXiv:2401.08209, https://github.com/LabShuHangGU/Adaptive-Token-Dictionary.

What the thin subclasses here add: constructors whose keyword arguments are exactly the authors' YAML ``network_g``
keys (so their option files work with ``type: HAT`` / ``type: ATD``), validated with messages that name the key;
the RGB mean as a non-persistent buffer (it follows ``.to(device)``; the authors keep a plain attribute); and
``pads_input`` in their traits (both pad to their window inside ``forward``, exactly as the authors' test code does: HAT
reflect-pads to a multiple of ``window_size``, ATD mirror-pads with the edge repeated). State-dict keys and shapes
are the authors' (checked in the tests against key lists of their code), so official checkpoints load strictly.

The authors' ``use_checkpoint`` (gradient checkpointing while training) is not supported: drop it from their YAMLs.
"""
from typing import Literal, Sequence

import torch
from basicsr.archs.swinir_arch import SwinIR
from basicsr.utils.registry import ARCH_REGISTRY
from spandrel.architectures.ATD import ATD as _SpandrelATD
from spandrel.architectures.HAT import HAT as _SpandrelHAT

from adasr.archs.exportable import mirror_pad_to_multiple
from adasr.archs.interface import ArchTraits, SRArch, register_traits
from adasr.archs.layers import DIV2K_RGB_MEAN, pad_to_multiple
from adasr.utils.checks import check_choice, check_int, check_positive


def _stages(depths, num_heads, embed_dim: int) -> None:
    for name, seq in (('depths', depths), ('num_heads', num_heads)):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise ValueError(f'{name} must be a non-empty list, got {seq!r}')
        for v in seq:
            check_int(f'{name} entries', v)
    if len(depths) != len(num_heads):
        raise ValueError(f'depths ({len(depths)} stages) and num_heads ({len(num_heads)}) must have the same length')
    for h in num_heads:
        if embed_dim % h:
            raise ValueError(f'embed_dim {embed_dim} must be divisible by every num_heads entry, got {h}')


def _upscale(value, allowed=(2, 3, 4, 8)) -> int:
    check_int('upscale', value)
    check_choice('upscale', value, allowed)
    return value


def _mean_as_buffer(net: torch.nn.Module, in_chans: int) -> None:
    mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
    del net.mean
    net.register_buffer('mean', mean, persistent=False)


@ARCH_REGISTRY.register()
class HAT(SRArch, _SpandrelHAT):
    """Hybrid Attention Transformer (HAT). Defaults are the paper's HAT x4; HAT-S is ``embed_dim: 144,
    compress_ratio: 24, squeeze_factor: 24`` (see ``options/test/test_HAT-S_x4.yml``).

    Args (the authors' ``network_g`` keys):
        upscale (int): 2, 3, 4 or 8. Default: 4.
        in_chans (int): image channels. Default: 3.
        img_size (int): training patch size (sizes only the unused ``patches_resolution``). Default: 64.
        window_size (int): attention window; inputs are padded to a multiple of it. Default: 16.
        compress_ratio (float): channel compression of the conv branch (CAB). Default: 3.
        squeeze_factor (float): channel-attention squeeze factor. Default: 30.
        conv_scale (float): weight of the conv branch. Default: 0.01.
        overlap_ratio (float): OCAB window enlargement, in [0, 1). Default: 0.5.
        img_range (float): images are scaled by this after mean subtraction. Default: 1.
        depths (list[int]): blocks per residual group. Default: [6] * 6.
        embed_dim (int): feature channels. Default: 180.
        num_heads (list[int]): heads per group. Default: [6] * 6.
        mlp_ratio (float): MLP hidden size / embed_dim. Default: 2.
        upsampler (str): 'pixelshuffle' (the only one HAT implements). Default: 'pixelshuffle'.
        resi_connection (str): '1conv' or 'identity'. Default: '1conv'.
        patch_size, qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm: as in Swin/HAT
            (defaults 1, True, None, 0, 0, 0.1, False, True).
    """

    def arch_traits(self) -> ArchTraits:
        return ArchTraits(pads_input=True, window=self.window_size)  # memory not calibrated

    def __init__(self, *, upscale: int = 4, in_chans: int = 3, img_size: int = 64, window_size: int = 16,
                 compress_ratio: float = 3, squeeze_factor: float = 30, conv_scale: float = 0.01,
                 overlap_ratio: float = 0.5, img_range: float = 1.0, depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 embed_dim: int = 180, num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6), mlp_ratio: float = 2.0,
                 upsampler: Literal['pixelshuffle'] = 'pixelshuffle',
                 resi_connection: Literal['1conv', 'identity'] = '1conv', patch_size: int = 1, qkv_bias: bool = True,
                 qk_scale=None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 ape: bool = False, patch_norm: bool = True):
        _upscale(upscale)
        for name, v in (('in_chans', in_chans), ('img_size', img_size), ('window_size', window_size),
                        ('embed_dim', embed_dim), ('patch_size', patch_size)):
            check_int(name, v)
        for name, v in (('compress_ratio', compress_ratio), ('squeeze_factor', squeeze_factor),
                        ('img_range', img_range), ('mlp_ratio', mlp_ratio)):
            check_positive(name, v)
        _stages(depths, num_heads, embed_dim)
        if not 0 <= overlap_ratio < 1:
            raise ValueError(f'overlap_ratio must be in [0, 1), got {overlap_ratio!r}')
        if embed_dim // compress_ratio < 1 or embed_dim // squeeze_factor < 1:
            raise ValueError(f'embed_dim {embed_dim} is too small for compress_ratio {compress_ratio} / '
                             f'squeeze_factor {squeeze_factor} (a layer would have no channels)')
        check_choice('upsampler', upsampler, ('pixelshuffle',))
        check_choice('resi_connection', resi_connection, ('1conv', 'identity'))
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                         compress_ratio=compress_ratio, squeeze_factor=squeeze_factor, conv_scale=conv_scale,
                         overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, ape=ape,
                         patch_norm=patch_norm, upscale=upscale, img_range=img_range, upsampler=upsampler,
                         resi_connection=resi_connection, num_feat=64)
        _mean_as_buffer(self, in_chans)

    def check_image_size(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad the bottom/right to a multiple of ``window_size`` (the authors pad the same way in their model
        class); unlike ``F.pad``, this also works when the pad is larger than the image (tiny inputs). Done as index
        gathers with no branch on the size (the same values), so an exported graph pads every input size."""
        return mirror_pad_to_multiple(x, self.window_size, 'reflect')


@ARCH_REGISTRY.register()
class ATD(SRArch, _SpandrelATD):
    """Adaptive Token Dictionary transformer (ATD). Defaults are the paper's ATD x4; ATD-light is ``embed_dim: 48,
    depths: [6]*4, num_heads: [4]*4, category_size: 128, num_tokens: 64, reducted_dim: 8, convffn_kernel_size: 7,
    mlp_ratio: 1, upsampler: pixelshuffledirect`` (see ``options/test/test_ATD_light_x4.yml``).

    Args (the authors' ``network_g`` keys):
        upscale (int): 2, 3, 4 or 8 (nearest+conv: 4 only). Default: 4.
        in_chans (int): image channels. Default: 3.
        img_size (int): training patch size (sizes only the unused ``patches_resolution``). Default: 64.
        embed_dim (int): feature channels. Default: 210.
        depths (list[int]): layers per block. Default: [6] * 6.
        num_heads (list[int]): heads per block. Default: [6] * 6.
        window_size (int): attention window; inputs are padded to a multiple of it. Default: 16.
        category_size (int): tokens per group of the category attention (AC-MSA). Default: 256.
        num_tokens (int): entries of the token dictionary. Default: 128.
        reducted_dim (int): query/key size of the dictionary cross-attention. Default: 20.
        convffn_kernel_size (int): depth-wise conv of the ConvFFN. Default: 5.
        img_range (float): images are scaled by this after mean subtraction. Default: 1.
        mlp_ratio (float): FFN hidden size / embed_dim. Default: 2.
        upsampler (str): 'pixelshuffle', 'pixelshuffledirect' or 'nearest+conv'. Default: 'pixelshuffle'.
        resi_connection (str): '1conv' or '3conv'. Default: '1conv'.
        patch_size, qkv_bias, ape, patch_norm: as in Swin (defaults 1, True, False, True).
    """

    def arch_traits(self) -> ArchTraits:
        return ArchTraits(pads_input=True, window=self.window_size)  # memory not calibrated

    def __init__(self, *, upscale: int = 4, in_chans: int = 3, img_size: int = 64, embed_dim: int = 210,
                 depths: Sequence[int] = (6, 6, 6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
                 window_size: int = 16, category_size: int = 256, num_tokens: int = 128, reducted_dim: int = 20,
                 convffn_kernel_size: int = 5, img_range: float = 1.0, mlp_ratio: float = 2.0,
                 upsampler: Literal['pixelshuffle', 'pixelshuffledirect', 'nearest+conv'] = 'pixelshuffle',
                 resi_connection: Literal['1conv', '3conv'] = '1conv', patch_size: int = 1, qkv_bias: bool = True,
                 ape: bool = False, patch_norm: bool = True):
        _upscale(upscale)
        for name, v in (('in_chans', in_chans), ('img_size', img_size), ('embed_dim', embed_dim),
                        ('window_size', window_size), ('category_size', category_size), ('num_tokens', num_tokens),
                        ('reducted_dim', reducted_dim), ('convffn_kernel_size', convffn_kernel_size),
                        ('patch_size', patch_size)):
            check_int(name, v)
        for name, v in (('img_range', img_range), ('mlp_ratio', mlp_ratio)):
            check_positive(name, v)
        _stages(depths, num_heads, embed_dim)
        if window_size % 2:
            raise ValueError(f'window_size must be even (the shift is window_size/2), got {window_size}')
        if convffn_kernel_size % 2 == 0:
            raise ValueError(f'convffn_kernel_size must be odd, got {convffn_kernel_size}')
        check_choice('upsampler', upsampler, ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv'))
        check_choice('resi_connection', resi_connection, ('1conv', '3conv'))
        if upsampler == 'nearest+conv' and upscale != 4:
            raise ValueError(f"upsampler 'nearest+conv' supports upscale 4 only, got {upscale}")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                         category_size=category_size, num_tokens=num_tokens, reducted_dim=reducted_dim,
                         convffn_kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ape=ape,
                         patch_norm=patch_norm, upscale=upscale, img_range=img_range, upsampler=upsampler,
                         resi_connection=resi_connection, norm=True)
        _mean_as_buffer(self, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, upscale*H, upscale*W). The input is mirror-padded (edge repeated) to a multiple of
        ``window_size`` exactly as the authors' ``forward`` does; here first, so that inputs smaller than half a
        window work too (the authors' concatenation of one flipped copy cannot pad that far)."""
        h, w = x.shape[-2:]
        x, _, _ = pad_to_multiple(x, self.window_size, mode='symmetric')
        return super().forward(x)[..., :h * self.upscale, :w * self.upscale]


def _swinir_traits(net: SwinIR) -> ArchTraits:
    """basicsr's SwinIR does not pad itself (its ``SwinIRModel`` pads the input to the window); the window lives in
    its blocks. Memory per pixel calibrated in docs/upscale.md."""
    window = net.layers[0].residual_group.blocks[0].window_size if len(net.layers) else 1
    return ArchTraits(window=int(window), bytes_per_pixel=150.0 * net.embed_dim,
                      memory_source='SwinIR: 150 B x embed_dim per LR pixel (calibrated)')


register_traits(SwinIR, _swinir_traits)
