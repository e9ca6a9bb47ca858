"""The model class for AdaFormer: the uncertainty loss on the confidence logits, halting statistics in validation,
a test-time ``eps_h`` override, and optional confidence / halting-mask images."""
import math
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
import torch
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from adasr.archs.interface import (
    complete_halting_maps,
    halting_record,
    halting_threshold,
    is_adaptive,
    set_complete_halting_maps,
    set_halting_threshold,
)
from adasr.models.adasr_model import AdaSRModel
from adasr.utils.checks import is_real
from adasr.utils.image_io import basicsr_imwrite


@MODEL_REGISTRY.register()
class AdaFormerModel(AdaSRModel):
    """:class:`AdaSRModel` for :class:`~adasr.archs.adaformer_arch.AdaFormer`.

    Training: the network returns ``(sr, logits)``; ``train.pixel_opt`` (L1) is applied to ``sr`` and
    ``train.uncertainty_opt`` (:class:`~adasr.losses.uncertainty_loss.UncertaintyLoss`) to the logits.
    Testing goes through ``AdaSRModel.inference`` (eval mode returns the SR tensor).

    Extra ``val`` keys:
        eps_h (float): halting threshold used for validation/testing only (the speed/quality dial); the trained
            value is restored afterwards. Default: the network's.
        save_halting (bool): write ``<image>_confidence.png`` (confidence maps of all layers side by side),
            ``<image>_halting.png`` (global keep masks on the top row, local keep masks below; white = attended,
            black = halted) and ``<image>_depth.png`` (number of blocks whose global attention each pixel took
            part in, scaled to 0..255) next to the SR images. Default: false.

    Validation also logs the per-block halted fractions (``global_consumed`` / ``local_consumed`` of
    :func:`~adasr.archs.halting.halting_sparsity`, averaged over the images) and keeps them in
    ``self.halting_results[dataset_name]``.
    """

    val_option_keys = {'eps_h', 'save_halting'}
    loss_option_keys = {'uncertainty_opt'}

    def __init__(self, opt):
        super().__init__(opt)
        bare = self.get_bare_model(self.net_g)
        if not is_adaptive(bare):
            raise ValueError(f'AdaFormerModel needs an AdaFormer network (an adaptive arch), got '
                             f'{bare.__class__.__name__}; use model_type: AdaSRModel for other archs')
        eps_h = (self.opt.get('val') or {}).get('eps_h')
        if eps_h is not None and (not is_real(eps_h) or math.isnan(eps_h)):  # as the network's eps_h setter
            raise ValueError(f'val.eps_h must be a number, got {eps_h!r}')
        self.halting_results: Dict[str, Dict[str, List[float]]] = {}
        self._val_state: Optional[dict] = None

    # -- training ----------------------------------------------------------------------------------------------------

    def init_training_settings(self):
        super().init_training_settings()
        unc_opt = self.opt['train'].get('uncertainty_opt')
        self.cri_uncertainty = build_loss(unc_opt).to(self.device) if unc_opt else None

    def training_losses(self):
        out = self.net_g(self.lq)
        if not isinstance(out, tuple):
            raise RuntimeError('AdaFormer in train mode must return (sr, logits)')
        self.output, logits = out
        l_total, loss_dict = self.image_losses(self.output)
        if self.cri_uncertainty:
            l_unc = self.cri_uncertainty(logits, self.output, self.gt)
            l_total += l_unc
            loss_dict['l_unc'] = l_unc
        halting = halting_record(self.net_g)
        loss_dict['halted'] = self.output.new_tensor(float(np.mean(halting.sparsity['global_consumed'])))
        return l_total, loss_dict

    # -- testing -----------------------------------------------------------------------------------------------------

    def test(self):
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        val_opt = self.opt.get('val') or {}
        trained_eps, complete = halting_threshold(net), complete_halting_maps(net)
        if val_opt.get('eps_h') is not None:
            set_halting_threshold(net, val_opt['eps_h'])
        if val_opt.get('save_halting'):  # pictures show the confidence of every token (the same SR and decisions)
            set_complete_halting_maps(net, True)
        try:
            super().test()
        finally:  # the network as it was (training and later tests skip the work that decides nothing again)
            set_halting_threshold(net, trained_eps)
            set_complete_halting_maps(net, complete)
        halting = halting_record(net)
        if self._val_state is not None and halting is not None:
            state = self._val_state
            for key in ('global_consumed', 'local_consumed', 'global_by_mask', 'local_by_mask'):
                values = np.asarray(halting.sparsity[key])
                state['sums'][key] = state['sums'].get(key, 0) + values
            state['count'] += 1
            if val_opt.get('save_halting') and self._lq_path:
                self._save_halting_images(halting, state['dataset'], state['iter'])

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        self._val_state = {'dataset': dataset_name, 'iter': current_iter, 'sums': {}, 'count': 0}
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            state, self._val_state = self._val_state, None
        if state['count']:
            results = {k: (v / state['count']).tolist() for k, v in state['sums'].items()}
            self.halting_results[dataset_name] = results
            self._log_halting(dataset_name, results, current_iter, tb_logger)

    def _publish_share_means(self, merged, dataset_name, current_iter, tb_logger):
        super()._publish_share_means(merged, dataset_name, current_iter, tb_logger)
        if 'halting' in merged:
            self.halting_results[dataset_name] = merged['halting']
            self._log_halting(dataset_name, merged['halting'], current_iter, tb_logger)

    def _log_halting(self, dataset_name, results, current_iter, tb_logger):
        if self._share_means is not None:  # validating a share under torchrun: combined by dist_validation
            self._share_means['halting'] = results
            return

        def fmt(values):
            return '[' + ', '.join(f'{v:.3f}' for v in values) + ']'

        get_root_logger().info(f'Halting {dataset_name} (share of tokens / windows skipped by each block):\n'
                               f'\t # global: {fmt(results["global_consumed"])}\n'
                               f'\t # local:  {fmt(results["local_consumed"])}')
        if tb_logger:
            for branch in ('global', 'local'):
                for i, value in enumerate(results[f'{branch}_consumed']):
                    tb_logger.add_scalar(f'halting/{dataset_name}/{branch}_block{i}', value, current_iter)

    def _save_halting_images(self, halting, dataset_name, current_iter):
        stem = osp.splitext(osp.basename(self._lq_path))[0]
        if self.opt['is_train']:
            base = osp.join(self.opt['path']['visualization'], stem, f'{stem}_{current_iter}')
        else:
            suffix = self.opt['val'].get('suffix') or self.opt['name']
            base = osp.join(self.opt['path']['visualization'], dataset_name, f'{stem}_{suffix}')
        conf = halting.crop(halting.confidence)
        rows = [halting.crop(halting.global_keep), halting.crop(halting.local_keep)]
        depth = halting.crop([halting.attention_depth('global') / len(halting.global_keep)])[0]
        basicsr_imwrite(_strip([conf]), f'{base}_confidence.png')  # atomic, errors naming the file
        basicsr_imwrite(_strip(rows), f'{base}_halting.png')
        basicsr_imwrite(_to_uint8(depth[0, 0]), f'{base}_depth.png')


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _strip(rows: List[List[torch.Tensor]], gap: int = 2) -> np.ndarray:
    """Maps (first sample of each (B, 1, h, w)) laid out in a grid, separated by red lines; BGR uint8."""
    h, w = rows[0][0].shape[-2:]
    n_cols = max(len(r) for r in rows)
    canvas = np.zeros((len(rows) * (h + gap) - gap, n_cols * (w + gap) - gap, 3), np.uint8)
    canvas[..., 2] = 255  # separators: red
    for i, row in enumerate(rows):
        for j, m in enumerate(row):
            y, x = i * (h + gap), j * (w + gap)
            canvas[y:y + h, x:x + w] = _to_uint8(m[0, 0])[..., None]
    return canvas
