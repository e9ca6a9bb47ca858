"""The SR model class every adasr option file uses: BasicSR's SRModel with the few things it lacks."""
import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from adasr.archs.interface import arch_traits, set_halting_record, unwrap
from adasr.inference.halting import HaltingCollector
from adasr.inference.precision import resolve_precision
from adasr.inference.tile import padded_forward, tiled_forward
from adasr.utils.checkpoint import load_weights


@MODEL_REGISTRY.register()
class AdaSRModel(SRModel):
    """BasicSR's ``SRModel`` (training loop, EMA, validation, saving: all unchanged) plus:

    * every ``torch.optim`` optimizer by name (``optim_g: {type: AdamW, ...}``; basicsr 1.4.2 knows only Adam);
    * checkpoints read with ``weights_only=True``, bare state dicts accepted, and mismatches reported by key name;
    * ``test()`` that pads the input to the arch's window (reflect, as BasicSR's ``SwinIRModel``) unless the arch
      pads inside ``forward`` (``arch_traits(net).pads_input``), so SwinIR, HAT and our archs share one harness;
    * tiled testing for big images: ``val: {tile: 256, tile_pad: 32}`` (LR pixels; see :mod:`adasr.inference.tile`);
    * reduced-precision testing: ``val: {precision: bf16}`` (fp32 default, bf16, fp16; autocast, see
      :mod:`adasr.inference.precision`; checked against the device before anything runs).
    """

    val_option_keys = {'tile', 'tile_pad', 'precision'}

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not in torch.optim')
        return optim_cls(params, lr, **kwargs)

    def get_bare_model(self, net):
        return unwrap(net)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        logger = get_root_logger()
        net = self.get_bare_model(net)
        incompatible = load_weights(net, load_path, param_key, strict)
        logger.info(f'Loaded {net.__class__.__name__} from {load_path} [{param_key}]'
                    + ('' if strict else f'; not loaded: {sorted(incompatible.missing_keys)}'))

    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self.inference(net, self.lq)
        if was_training:
            net.train()

    def inference(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Run ``net`` on an LR batch, padding and cropping if the arch needs it, tile by tile when ``val.tile``
        is set (``val.tile_pad`` LR pixels of blended context, default 32), in ``val.precision`` (default fp32)."""
        traits = arch_traits(net, net_opt=self.opt['network_g'])
        multiple = traits.window
        scale = self.opt.get('scale', 1)
        val = self.opt.get('val') or {}
        precision = resolve_precision(val.get('precision', 'fp32'), lq.device)
        fn = precision.wrap(padded_forward(net, scale, multiple, mode='reflect'))
        tile, tile_pad = val.get('tile') or 0, val.get('tile_pad', 32)  # checked by adasr.cli.options
        if not tile:
            return fn(lq)
        collector = HaltingCollector(net, *lq.shape[-2:]) if traits.adaptive else None
        out = tiled_forward(fn, lq, scale, tile, tile_pad, multiple, out_dtype=lq.dtype, on_tile=collector)
        if collector is not None:  # adaptive archs: the halting record of the whole image, not of the last tile
            set_halting_record(unwrap(net), collector.to_info())
        return out
