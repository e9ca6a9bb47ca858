"""The SR model class every adasr option file uses: BasicSR's SRModel with the few things it lacks."""
import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from adasr.archs.layers import pad_to_multiple
from adasr.utils.checkpoint import check_state_dict, load_checkpoint


@MODEL_REGISTRY.register()
class AdaSRModel(SRModel):
    """BasicSR's ``SRModel`` (training loop, EMA, validation, saving: all unchanged) plus:

    * every ``torch.optim`` optimizer by name (``optim_g: {type: AdamW, ...}``; basicsr 1.4.2 knows only Adam);
    * checkpoints read with ``weights_only=True``, bare state dicts accepted, and mismatches reported by key name;
    * ``test()`` that pads the input to the arch's window (reflect, as BasicSR's ``SwinIRModel``) unless the arch
      pads inside ``forward`` (``pads_input = True``), so SwinIR, HAT and our archs share one harness.
    """

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not in torch.optim')
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        logger = get_root_logger()
        net = self.get_bare_model(net)
        state = load_checkpoint(load_path, param_key)
        state = check_state_dict(net, state, strict=strict, source=f'checkpoint {load_path}')
        incompatible = net.load_state_dict(state, strict=strict)
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
        """Run ``net`` on a whole LR batch, padding and cropping if the arch needs it."""
        return padded_forward(net, lq, window_size=int(self.opt['network_g'].get('window_size', 1) or 1),
                              scale=self.opt.get('scale', 1), bare=self.get_bare_model(net))


def padded_forward(net: nn.Module, lq: torch.Tensor, window_size: int, scale: int,
                   bare: nn.Module = None) -> torch.Tensor:
    """``net(lq)`` for archs that pad inside ``forward`` (``pads_input = True``); otherwise reflect-pad the LR to a
    multiple of ``window_size`` (as BasicSR's ``SwinIRModel``), run, and crop to ``scale`` times the LR size.

    ``bare`` is the unwrapped network (DataParallel/DDP) when ``net`` is wrapped. Used by :class:`AdaSRModel` and the
    benchmark, so both run every arch the same way.
    """
    if getattr(bare if bare is not None else net, 'pads_input', False):
        return net(lq)
    h, w = lq.shape[-2:]
    padded, _, _ = pad_to_multiple(lq, window_size, mode='reflect')
    return net(padded)[..., :h * scale, :w * scale]
