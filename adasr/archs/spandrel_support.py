"""spandrel support: AdaFormer and PFT as spandrel architectures, and any spandrel model as an adasr network.

`spandrel <https://github.com/chaiNNer-org/spandrel>`_ (chaiNNer's loader, MIT licence) detects an architecture and
its hyperparameters from a bare state dict. This module adds to its public registry (``spandrel.MAIN_REGISTRY``,
the way ``spandrel-extra-arches`` does):

* :class:`PFTArch` and :class:`AdaFormerArch`: detection (:func:`detect_pft`, :func:`detect_adaformer`) and every
  hyperparameter the state dict determines (:func:`pft_hyperparameters`, :func:`adaformer_hyperparameters`); what
  it does not determine comes from the released recipes (PFT's ``num_topk``: :func:`released_num_topk`). They are
  registered when ``adasr`` is imported; :func:`register` does it for another registry (idempotent).

and to BasicSR's registry:

* ``network_g: {type: Spandrel, path: X.pth}`` (:class:`Spandrel`): any checkpoint spandrel (with the additions
  above) recognises, as a test-time network of adasr's harness (``adasr-test``, ``scripts/benchmark.py``,
  ``adasr-upscale``). Its traits (:mod:`adasr.archs.interface`) come from the spandrel descriptor: the wrapper
  pads the input as the descriptor's ``size_requirements`` ask (spandrel's own call, so never more: models that pad
  themselves are not pre-padded), and tiles follow the descriptor's ``tiling`` flag.

See docs/spandrel.md.
"""
import math
import os.path as osp
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from spandrel import (
    MAIN_REGISTRY,
    Architecture,
    ArchRegistry,
    ArchSupport,
    ImageModelDescriptor,
    ModelLoader,
    ModelTiling,
    SizeRequirements,
    StateDict,
    UnsupportedModelError,
)
from spandrel.util import KeyCondition, get_pixelshuffle_params, get_scale_and_output_channels, get_seq_len
from torch import nn

from adasr.archs.adaformer_arch import AdaFormer
from adasr.archs.exportable import Exportable, export_module
from adasr.archs.halting import HaltingInfo
from adasr.archs.interface import ArchTraits, SRArch, arch_traits
from adasr.archs.layers import DIV2K_RGB_MEAN
from adasr.archs.pft_arch import PFT
from adasr.utils.checkpoint import CheckpointError, check_finite_state, pick_entry, read_checkpoint

#: PFT's heads when the state dict cannot tell (embed_dim <= 100: one bias column shared by all heads): PFT-light's.
PFT_LIGHT_HEADS = 4

_TILING = {'supported': ModelTiling.SUPPORTED, 'discouraged': ModelTiling.DISCOURAGED,
           'internal': ModelTiling.INTERNAL}
_TILING_NAMES = {v: k for k, v in _TILING.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters from state dicts
# ---------------------------------------------------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Tuple[str, ...] = ('model.', 'module.')) -> StateDict:
    """Remove prefixes that every key carries (the AdaFormer authors' EDSR-style trainer saves ``model.<name>``,
    DataParallel adds ``module.``), repeatedly, in any order."""
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _window_from_table(table: torch.Tensor) -> int:
    """Window side of a Swin relative-position bias table of (2w - 1)**2 rows."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(f'a relative-position bias table of {table.shape[0]} rows is not (2w-1)**2')
    return (side + 1) // 2


def _ratio(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` with ``int(dim * ratio) == hidden`` (the hidden width the archs compute from it)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


_PFT_LAYER = 'layers.0.residual_group.layers.0.'

detect_pft = KeyCondition.has_all(
    'relative_position_index_SA', 'conv_first.weight', 'norm.weight',
    _PFT_LAYER + 'wqkv.weight', _PFT_LAYER + 'v_LePE.depthwise_conv.0.weight',
    _PFT_LAYER + 'attn_win.relative_position_bias_table', _PFT_LAYER + 'attn_win.proj.weight',
    _PFT_LAYER + 'convffn.fc1.weight', _PFT_LAYER + 'convffn.dwconv.depthwise_conv.0.weight',
    KeyCondition.has_any('conv_after_body.weight', 'conv_after_body.0.weight'), 'upsample.0.weight')
"""True for a PFT / PFT-light state dict (keys of the release, ``params_ema`` unwrapped)."""


def released_num_topk(depths: List[int], window_size: int) -> List[int]:
    """PFT's ``num_topk`` by the rule of the six released schedules (options/test/test_PFT*.yml).

    The first residual group is dense (k = window_size**2); group ``g >= 1`` keeps ``window_size**2 / 2**(g + 1)``
    keys (at least 1) in every layer. For 32x32 windows: 1024, 256, 128, 64, 32 (PFT-light, depths [2, 4, 6, 6, 6])
    and 1024, 256, 128, 64, 32, 16 (PFT, depths [4, 4, 4, 6, 6, 6]), exactly the released lists.
    """
    n = window_size * window_size
    out = []
    for g, depth in enumerate(depths):
        out += [n if g == 0 else max(n >> (g + 1), 1)] * depth
    return out


def pft_hyperparameters(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """PFT's constructor arguments (the ``network_g`` keys) from a state dict.

    Read from the state dict: ``in_chans``, ``embed_dim``, ``depths``, ``window_size``, ``convffn_kernel_size``,
    ``mlp_ratio``, ``qkv_bias``, ``patch_norm``, ``resi_connection``, ``upsampler``, ``upscale``, and ``num_heads``
    when ``embed_dim > 100`` (one relative-position bias column per head). Not stored in it, so taken from the
    releases: ``num_heads`` = 4 when ``embed_dim <= 100`` (the bias column is shared; PFT-light's value),
    ``num_topk`` by :func:`released_num_topk`, ``img_range`` 1, ``img_size`` 64 (bookkeeping only).
    """
    sd = state_dict
    embed_dim, in_chans = (int(v) for v in sd['conv_first.weight'].shape[:2])
    depths = [get_seq_len(sd, f'layers.{i}.residual_group.layers') for i in range(get_seq_len(sd, 'layers'))]
    table = sd[_PFT_LAYER + 'attn_win.relative_position_bias_table']
    window_size = _window_from_table(table)
    if embed_dim > 100:
        num_heads = int(table.shape[1])
    else:
        num_heads = max(h for h in range(1, PFT_LIGHT_HEADS + 1) if embed_dim % h == 0)
    if 'conv_before_upsample.0.weight' in sd:
        upsampler = 'pixelshuffle'
        upscale, _ = get_pixelshuffle_params(sd, 'upsample')
    else:
        upsampler = 'pixelshuffledirect'
        upscale, _ = get_scale_and_output_channels(int(sd['upsample.0.weight'].shape[0]), in_chans)
    return {
        'upscale': upscale, 'in_chans': in_chans, 'img_size': 64, 'embed_dim': embed_dim, 'depths': depths,
        'num_heads': num_heads, 'num_topk': released_num_topk(depths, window_size), 'window_size': window_size,
        'convffn_kernel_size': int(sd[_PFT_LAYER + 'v_LePE.depthwise_conv.0.weight'].shape[-1]), 'img_range': 1.0,
        'mlp_ratio': _ratio(int(sd[_PFT_LAYER + 'convffn.fc1.weight'].shape[0]), embed_dim),
        'qkv_bias': _PFT_LAYER + 'wqkv.bias' in sd, 'patch_norm': 'patch_embed.norm.weight' in sd,
        'upsampler': upsampler,
        'resi_connection': '1conv' if 'conv_after_body.weight' in sd else '3conv', 'use_checkpoint': False,
    }


_ADAFORMER_KEYS = KeyCondition.has_all(
    'sub_mean.weight', 'add_mean.weight', 'head.0.weight', 'body.embed.weight', 'body.unembed.weight',
    'body.blocks.0.attn.prototype', 'body.blocks.0.attn.relative_position_bias_table',
    'body.blocks.0.attn.qkv_local.weight', 'body.blocks.0.attn.kv_global.weight', 'body.blocks.0.mlp.fc1.weight',
    'body.var.0.weight', 'body.var.2.weight', 'tail.0.weight')


def detect_adaformer(state_dict: Mapping[str, Any]) -> bool:
    """True for an AdaFormer state dict (BasicSR's, or the authors' with a ``model.`` / ``module.`` prefix)."""
    return _ADAFORMER_KEYS(strip_prefixes(state_dict))


def adaformer_hyperparameters(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """AdaFormer's constructor arguments (the ``network_g`` keys) from a state dict (prefixes removed).

    Read from the state dict: ``upscale``, ``in_chans``, ``n_feats``, ``embed_dim``, ``n_resblocks``, ``depths``,
    ``num_heads`` and ``window_size`` (relative-position bias table), ``num_prototypes``, ``mlp_ratio``,
    ``estimator_hidden``, and ``img_range``: 255 (the authors') when the input mean-shift bias is larger than 1 in
    magnitude (it is ``-img_range * mean``), else 1. Not stored, so the released recipe's: ``eps_h`` 0.05,
    ``res_scale`` 1, ``eval_global_split`` 'auto', ``sparse_eval`` true; ``rgb_mean`` is only the initial value of
    the mean-shift convs, whose trained values the state dict holds (the DIV2K mean for 3 channels, else the
    mean-shift bias / -img_range).
    """
    sd = strip_prefixes(state_dict)
    n_feats, in_chans = (int(v) for v in sd['head.0.weight'].shape[:2])
    embed_dim = int(sd['body.embed.weight'].shape[0])
    table = sd['body.blocks.0.attn.relative_position_bias_table']
    upscale, _ = get_scale_and_output_channels(int(sd['tail.0.weight'].shape[0]), in_chans)
    shift = sd['sub_mean.bias'].float()
    img_range = 255.0 if float(shift.abs().max()) > 1 else 1.0
    rgb_mean = list(DIV2K_RGB_MEAN) if in_chans == 3 else [round(-float(v) / img_range, 6) for v in shift]
    return {
        'upscale': upscale, 'in_chans': in_chans, 'n_feats': n_feats, 'embed_dim': embed_dim,
        'n_resblocks': 2 * get_seq_len(sd, 'shollow_feature_extraction'), 'depths': get_seq_len(sd, 'body.blocks'),
        'num_heads': int(table.shape[1]), 'num_prototypes': int(sd['body.blocks.0.attn.prototype'].shape[1]),
        'window_size': _window_from_table(table),
        'mlp_ratio': _ratio(int(sd['body.blocks.0.mlp.fc1.weight'].shape[0]), embed_dim), 'eps_h': 0.05,
        'img_range': img_range, 'rgb_mean': rgb_mean, 'res_scale': 1.0,
        'estimator_hidden': int(sd['body.var.0.weight'].shape[0]), 'eval_global_split': 'auto', 'sparse_eval': True,
    }


# ---------------------------------------------------------------------------------------------------------------------
# spandrel architectures
# ---------------------------------------------------------------------------------------------------------------------


def _descriptor(arch: Architecture, model: SRArch, state_dict: StateDict, hyperparameters: Dict[str, Any],
                tags: List[str]) -> ImageModelDescriptor:
    """The descriptor of one of adasr's networks, from its declared traits: no size requirements (it pads
    itself), tiling and half types as it declares them."""
    model.hyperparameters = hyperparameters  # spandrel's convention (``store_hyperparameters``)
    traits = model.arch_traits()
    scale, channels = hyperparameters['upscale'], hyperparameters['in_chans']
    return ImageModelDescriptor(model, state_dict, architecture=arch, purpose='SR' if scale > 1 else 'Restoration',
                                tags=tags, supports_half=torch.float16 in traits.half_dtypes,
                                supports_bfloat16=torch.bfloat16 in traits.half_dtypes, scale=scale,
                                input_channels=channels, output_channels=channels,
                                size_requirements=SizeRequirements(), tiling=_TILING[traits.tiling])


class PFTArch(Architecture[PFT]):
    """PFT and PFT-light (CVPR 2025) for spandrel."""

    def __init__(self) -> None:
        super().__init__(id='PFT', name='PFT', detect=detect_pft)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[PFT]:
        hp = pft_hyperparameters(state_dict)
        tags = ['light' if hp['upsampler'] == 'pixelshuffledirect' else 'classical', f'{hp["embed_dim"]}dim',
                f'{sum(hp["depths"])}layers', f'w{hp["window_size"]}']
        return _descriptor(self, PFT(**hp), state_dict, hp, tags)


class AdaFormerArch(Architecture[AdaFormer]):
    """AdaFormer (AAAI 2024) for spandrel; accepts the authors' ``model.`` prefix."""

    def __init__(self) -> None:
        super().__init__(id='AdaFormer', name='AdaFormer', detect=detect_adaformer)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[AdaFormer]:
        hp = adaformer_hyperparameters(state_dict)
        tags = [f'{hp["n_feats"]}nf', f'{hp["embed_dim"]}dim', f'{hp["depths"]}blocks', f'w{hp["window_size"]}']
        return _descriptor(self, AdaFormer(**hp), strip_prefixes(state_dict), hp, tags)


SUPPORT = (ArchSupport.from_architecture(PFTArch()), ArchSupport.from_architecture(AdaFormerArch()))


def register(registry: ArchRegistry = MAIN_REGISTRY) -> None:
    """Add PFT and AdaFormer to a spandrel registry (default: ``spandrel.MAIN_REGISTRY``, which
    ``spandrel.ModelLoader()`` uses). Idempotent: architectures whose id the registry already has are kept as they
    are (spandrel raises on duplicate ids otherwise)."""
    registry.add(*SUPPORT, ignore_duplicates=True)


register()


# ---------------------------------------------------------------------------------------------------------------------
# Any spandrel model as an adasr network
# ---------------------------------------------------------------------------------------------------------------------


def load_descriptor(path: str, param_key: str = 'params_ema', strict_key: bool = False) -> ImageModelDescriptor:
    """Detect and load the model in ``path`` with spandrel's registry (adasr's additions included).

    ``.pth``/``.pt``/``.ckpt`` files are read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`),
    ``.safetensors`` with spandrel's loader. ``param_key`` picks that entry when the file has it; otherwise spandrel
    unwraps the file as it does (``params_ema``, ``params``, ``state_dict``, ``model``, ... and a ``module.`` prefix),
    except that with ``strict_key`` another name than ``params`` / ``params_ema`` that the file lacks is an error
    (:func:`adasr.utils.checkpoint.pick_entry`, as for every checkpoint reader).

    Raises:
        CheckpointError: unreadable file, an architecture spandrel does not know, NaN/inf in the weights, or not an
            image-to-image model.
    """
    if osp.splitext(path)[1].lower() == '.safetensors':
        if not osp.isfile(path):
            raise CheckpointError(f'checkpoint not found: {path}')
        try:
            state = ModelLoader().load_state_dict_from_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise CheckpointError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file may '
                                  'be truncated or not a checkpoint') from None
    else:
        state = read_checkpoint(path)
        if isinstance(state.get(param_key), Mapping):
            state = state[param_key]
        elif strict_key and param_key not in ('params', 'params_ema'):
            state = pick_entry(state, param_key, path)  # a name the file lacks: the readers' error (bare dicts pass)
    try:
        descriptor = MAIN_REGISTRY.load(state)
    except UnsupportedModelError:
        raise CheckpointError(f'{path}: spandrel {_spandrel_version()} (with adasr\'s PFT and AdaFormer) recognises '
                              'no architecture in this checkpoint') from None
    except (KeyError, ValueError, RuntimeError, AssertionError, AttributeError, TypeError) as e:
        # (a value that is no tensor where a weight belongs ends in AttributeError / TypeError inside spandrel)
        raise CheckpointError(f'{path}: spandrel detected an architecture but could not load it: {e}') from e
    check_finite_state(descriptor.model.state_dict(), f'checkpoint {path}')
    if not isinstance(descriptor, ImageModelDescriptor):
        raise CheckpointError(f'{path}: {descriptor.architecture.name} is a {descriptor.purpose} model (image + '
                              'mask); only image-to-image models run in adasr')
    return descriptor


def _spandrel_version() -> str:
    import spandrel

    return spandrel.__version__


@ARCH_REGISTRY.register()
class Spandrel(SRArch, Exportable, nn.Module):
    """Any model spandrel recognises (``network_g: {type: Spandrel, path: X.pth}``), for testing and upscaling.

    The checkpoint is loaded here (so the option file needs no ``path.pretrain_network_g``; one given there must hold
    the same architecture and is loaded over it, strictly). The state dict of this wrapper is the model's own (no
    prefix), so checkpoints saved from it load in spandrel and vice versa.

    ``forward`` is spandrel's call of the model: the input is padded only as far as the descriptor's
    ``size_requirements`` ask (reflect, then replicate; cropped back), the output clamped to 0..1. Networks of adasr
    (PFT, AdaFormer) are called directly and keep their own traits, halting record and FLOP count. Inference only:
    spandrel runs the model under ``torch.inference_mode``.

    Args:
        path (str): the checkpoint (.pth, .pt, .ckpt or .safetensors).
        scale (int, optional): the expected scale; a :class:`CheckpointError` if the checkpoint's differs.
            Default: not checked.
        param_key (str, optional): the checkpoint entry to use (params and params_ema stand in for each other, as in
            BasicSR; another name the file lacks is an error). Default: params_ema when the file has it, else
            spandrel's unwrapping (params, state_dict, ...).
    """

    def __init__(self, *, path: str, scale: Optional[int] = None, param_key: Optional[str] = None):
        super().__init__()
        if not isinstance(path, str) or not path:
            raise ValueError(f'path must be a checkpoint file, got {path!r}')
        descriptor = load_descriptor(osp.expanduser(path), param_key or 'params_ema', strict_key=bool(param_key))
        if scale is not None and scale != descriptor.scale:
            raise CheckpointError(f'{path} holds a x{descriptor.scale} {descriptor.architecture.name} model, '
                                  f'but scale {scale} was given')
        self.descriptor = descriptor
        self.model = descriptor.model
        self.path = path

    # -- what the checkpoint held --------------------------------------------------------------------------------

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def in_channels(self) -> int:
        return self.descriptor.input_channels

    def hyperparameters(self) -> Dict[str, Any]:
        """The detected hyperparameters (spandrel's ``hyperparameters`` record of the model; empty if it has none)."""
        return dict(getattr(self.model, 'hyperparameters', None) or {})

    def describe(self) -> str:
        """One line: architecture, scale, tags, size requirements, tiling, half types and hyperparameters."""
        d = self.descriptor
        req = d.size_requirements
        needs = 'none (pads itself)' if req.none else (
            f'multiple of {req.multiple_of}, minimum {req.minimum}' + (', square' if req.square else ''))
        halves = [n for n, ok in (('fp16', d.supports_half), ('bf16', d.supports_bfloat16)) if ok]
        hp = ', '.join(f'{k}={v}' for k, v in self.hyperparameters().items()
                       if v is None or isinstance(v, (bool, int, float, str, list, tuple)))  # not classes
        return (f'{d.architecture.name} x{d.scale} ({d.input_channels}->{d.output_channels} ch; '
                f'tags {", ".join(d.tags) or "-"}; size requirements {needs}; tiling '
                f'{_TILING_NAMES[d.tiling]}; half {"/".join(halves) or "none"})' + (f': {hp}' if hp else ''))

    # -- state dict: the model's own keys ------------------------------------------------------------------------

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- forward -------------------------------------------------------------------------------------------------

    def _own(self) -> Optional[SRArch]:
        return self.model if isinstance(self.model, SRArch) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = self._own()
        if own is not None:
            return own(x)
        # spandrel's call runs under inference_mode; a clone is a normal tensor (callers may change it in place)
        return self.descriptor(x).clone()

    # -- the declared interface ----------------------------------------------------------------------------------

    def arch_traits(self) -> ArchTraits:
        """Own networks: their traits. Others: from the descriptor. The wrapper pads as required, so callers do not
        pad; tiles are aligned to the required multiple and to the model's ``window_size`` hyperparameter (where
        spandrel records one), so that windows inside a tile are the whole image's; the smallest useful tile is the
        required minimum; memory per pixel is not calibrated (the default estimate). Both are ``pretrained``: the
        weights came with the checkpoint."""
        own = self._own()
        if own is not None:
            return replace(arch_traits(own), pretrained=True)
        d = self.descriptor
        align = d.size_requirements.multiple_of
        window = self.hyperparameters().get('window_size')
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            align = math.lcm(align, window)
        halves = tuple(t for t, ok in ((torch.float16, d.supports_half), (torch.bfloat16, d.supports_bfloat16))
                       if ok)
        return ArchTraits(pads_input=True, window=align, min_window=d.size_requirements.minimum, pretrained=True,
                          memory_source=f'{d.architecture.name} via spandrel: default estimate (not calibrated)',
                          preferred_half=None if d.supports_half else (torch.bfloat16 if halves else None),
                          half_dtypes=halves, tiling=_TILING_NAMES[d.tiling])

    def flops(self, h: int, w: int) -> Optional[float]:
        own = self._own()
        return None if own is None else own.flops(h, w)

    def halting_record(self) -> Optional[HaltingInfo]:
        own = self._own()
        return None if own is None else own.halting_record()

    def set_halting_record(self, info: Optional[HaltingInfo]) -> None:
        self._adaptive().set_halting_record(info)

    def get_halting_threshold(self) -> float:
        return self._adaptive().get_halting_threshold()

    def set_halting_threshold(self, value: float) -> None:
        self._adaptive().set_halting_threshold(value)

    def get_complete_halting_maps(self) -> bool:
        return self._adaptive().get_complete_halting_maps()

    def set_complete_halting_maps(self, value: bool) -> None:
        self._adaptive().set_complete_halting_maps(value)

    def export_module(self) -> nn.Module:
        """Own networks: their export form (:mod:`adasr.archs.exportable`); others: this wrapper."""
        own = self._own()
        return self if own is None else export_module(own)

    def _adaptive(self) -> SRArch:
        own = self._own()
        if own is None or not arch_traits(own).adaptive:
            raise ValueError(f'{self.descriptor.architecture.name} is not adaptive: it keeps no halting record '
                             'and has no threshold')
        return own

    def extra_repr(self) -> str:
        return f'path={self.path!r}, {self.descriptor.architecture.name} x{self.scale}'
