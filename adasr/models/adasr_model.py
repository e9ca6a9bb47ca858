"""The SR model class every adasr option file uses: BasicSR's SRModel with the few things it lacks."""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from adasr.inference.halting import HaltingCollector, has_halting
from adasr.inference.tile import padded_forward, tiled_forward, window_multiple
from adasr.utils.checkpoint import load_weights
from adasr.utils.distributed import barrier, gather_to_all, rank_and_world, shard


@MODEL_REGISTRY.register()
class AdaSRModel(SRModel):
    """BasicSR's ``SRModel`` (training loop, EMA, validation, saving: all unchanged) plus:

    * every ``torch.optim`` optimizer by name (``optim_g: {type: AdamW, ...}``; basicsr 1.4.2 knows only Adam);
    * checkpoints read with ``weights_only=True``, bare state dicts accepted, and mismatches reported by key name;
    * ``test()`` that pads the input to the arch's window (reflect, as BasicSR's ``SwinIRModel``) unless the arch
      pads inside ``forward`` (``pads_input = True``), so SwinIR, HAT and our archs share one harness;
    * tiled testing for big images: ``val: {tile: 256, tile_pad: 32}`` (LR pixels; see :mod:`adasr.inference.tile`);
    * validation and testing under ``torchrun`` shared between the processes (:meth:`dist_validation`).
    """

    val_option_keys = {'tile', 'tile_pad'}
    _share_means: Optional[dict] = None  # while this process validates its share: the means it would have logged

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not in torch.optim')
        return optim_cls(params, lr, **kwargs)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        logger = get_root_logger()
        net = self.get_bare_model(net)
        incompatible = load_weights(net, load_path, param_key, strict)
        logger.info(f'Loaded {net.__class__.__name__} from {load_path} [{param_key}]'
                    + ('' if strict else f'; not loaded: {sorted(incompatible.missing_keys)}'))

    def test(self):
        # the bare network: under torchrun, processes validate different images (DDP's forward would synchronise)
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self.inference(net, self.lq)
        if was_training:
            net.train()

    def inference(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Run ``net`` on an LR batch, padding and cropping if the arch needs it, tile by tile when ``val.tile``
        is set (``val.tile_pad`` LR pixels of blended context, default 32)."""
        bare = self.get_bare_model(net)
        multiple = window_multiple(bare, net_opt=self.opt['network_g'])
        scale = self.opt.get('scale', 1)
        fn = padded_forward(net, scale, multiple, mode='reflect')
        val = self.opt.get('val') or {}
        tile, tile_pad = val.get('tile') or 0, val.get('tile_pad', 32)  # checked by adasr.cli.options
        if not tile:
            return fn(lq)
        collector = HaltingCollector(bare, *lq.shape[-2:]) if has_halting(bare) else None
        out = tiled_forward(fn, lq, scale, tile, tile_pad, multiple, out_dtype=lq.dtype, on_tile=collector)
        if collector is not None:  # AdaFormer: the halting record of the whole image, not of the last tile
            bare.last_halting = collector.to_info()
        return out

    # -- validation shared between processes -------------------------------------------------------------------------

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Under ``torchrun``: each process validates (and saves) every ``world_size``-th image of the set, and the
        means over the whole set are kept and logged, as one process would (to float rounding).

        BasicSR's ``SRModel`` validates everything on process 0 while the others wait. Here BasicSR's
        ``nondist_validation`` runs on this process's share with its logging held back (:attr:`_share_means`);
        the shares' means are then combined, weighted by their image counts, and published on every process.
        """
        barrier()  # process 0 has made the output folders (BasicSR's make_exp_dirs) before anyone writes
        rank, world_size = rank_and_world()
        share = _Share(dataloader.dataset, rank, world_size)
        self._share_means = {}
        try:
            if len(share):
                loader = torch.utils.data.DataLoader(share, batch_size=1, shuffle=False, num_workers=0)
                self.nondist_validation(loader, current_iter, tb_logger, save_img)
            means = self._share_means
        finally:
            self._share_means = None
        merged = _weighted_means(gather_to_all((len(share), means)))
        self._publish_share_means(merged, dataloader.dataset.opt['name'], current_iter, tb_logger)

    def _publish_share_means(self, merged: dict, dataset_name: str, current_iter, tb_logger) -> None:
        """Keep and log the means over all shares (what ``nondist_validation`` does with its own)."""
        if 'metrics' in merged:
            self._initialize_best_metric_results(dataset_name)
            self.metric_results = merged['metrics']
            for metric, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, metric, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _update_best_metric_result(self, dataset_name, metric, val, current_iter):
        if self._share_means is None:  # a share's mean is not a result
            super()._update_best_metric_result(dataset_name, metric, val, current_iter)

    def _log_validation_metric_values(self, current_iter, dataset_name, tb_logger):
        if self._share_means is not None:
            self._share_means['metrics'] = dict(self.metric_results)
        else:
            super()._log_validation_metric_values(current_iter, dataset_name, tb_logger)


class _Share(torch.utils.data.Subset):
    """Every ``world_size``-th item from ``rank``, keeping the dataset's ``opt`` (BasicSR's validation reads it)."""

    def __init__(self, dataset, rank: int, world_size: int):
        super().__init__(dataset, shard(range(len(dataset)), rank, world_size))
        self.opt = dataset.opt


def _weighted_means(shares: Sequence[Tuple[int, Dict[str, dict]]]) -> Dict[str, dict]:
    """``[(image count, {group: {key: mean}})]`` of the shares -> ``{group: {key: mean over all images}}``; a
    mean may be a number or a list of numbers (the same shape in every share)."""
    merged: Dict[str, dict] = {}
    for group in sorted({g for _, means in shares for g in means}):
        parts: List[Tuple[int, dict]] = [(n, means[group]) for n, means in shares if n and group in means]
        weights = [n for n, _ in parts]
        merged[group] = {key: np.average(np.asarray([m[key] for _, m in parts], dtype=np.float64), axis=0,
                                         weights=weights).tolist() for key in parts[0][1]}
    return merged
