"""The SR model class every adasr option file uses: BasicSR's SRModel with the few things it lacks."""
import contextlib
import os.path as osp
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from adasr.archs.interface import arch_traits, set_halting_record, unwrap
from adasr.data.paired_dataset import DatasetError
from adasr.inference.halting import HaltingCollector
from adasr.inference.precision import resolve_precision
from adasr.inference.tile import padded_forward, tiled_forward
from adasr.utils.checkpoint import check_finite_state, load_weights, save_checkpoint
from adasr.utils.checks import check_finite
from adasr.utils.distributed import barrier, gather_to_all, rank_and_world, shard
from adasr.utils.image_io import basicsr_imwrite

MAX_NONFINITE_STEPS = 10  # default of train.max_nonfinite_steps

#: smallest image side each BasicSR metric can measure once ``crop_border`` pixels are cut from every side
#: (SSIM filters with an 11x11 Gaussian window and keeps only the valid part)
METRIC_MIN_SIDE = {'calculate_psnr': 1, 'calculate_ssim': 11}


@contextlib.contextmanager
def _atomic_image_writes():
    """BasicSR's validation saves its images with ``basicsr.models.sr_model.imwrite`` (``cv2.imwrite``: a truncated
    file on a full disk, and "Failed in writing images." without the name); for the call, the module's name points
    at :func:`adasr.utils.image_io.basicsr_imwrite` (the same encoding, written atomically, errors naming the
    file)."""
    from basicsr.models import sr_model

    saved = sr_model.imwrite
    sr_model.imwrite = basicsr_imwrite
    try:
        yield
    finally:
        sr_model.imwrite = saved


def _first(value):
    """The first path of a collated batch (a list of one), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


class ResumeMismatchError(RuntimeError):
    """A training state that the run's optimizers cannot take (saved by another optimizer type)."""


def _same_setting(a, b) -> bool:
    """Optimizer settings compared as values (a YAML list and a saved tuple of the same betas are the same)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors of other shapes
        return False


class TrainingDivergedError(RuntimeError):
    """The loss or its gradients were not finite for ``train.max_nonfinite_steps`` training steps in a row."""


@MODEL_REGISTRY.register()
class AdaSRModel(SRModel):
    """BasicSR's ``SRModel`` (training loop, EMA, validation: unchanged) plus:

    * every ``torch.optim`` optimizer by name (``optim_g: {type: AdamW, ...}``; basicsr 1.4.2 knows only Adam);
    * checkpoints read with ``weights_only=True``, bare state dicts accepted, and mismatches reported by key name;
    * ``test()`` that pads the input to the arch's window (reflect, as BasicSR's ``SwinIRModel``) unless the arch
      pads inside ``forward`` (``arch_traits(net).pads_input``), so SwinIR, HAT and our archs share one harness;
    * tiled testing for big images: ``val: {tile: 256, tile_pad: 32}`` (LR pixels; see :mod:`adasr.inference.tile`);
    * finite or stop: a step whose loss or gradients hold NaN or inf is skipped (no optimizer step, no EMA update)
      with a warning, and ``train.max_nonfinite_steps`` (default 10) such steps in a row stop the run with
      :class:`TrainingDivergedError`, as does a run that reaches ``total_iter`` without applying one step; weights
      with NaN or inf are never saved;
    * checkpoints (``net_g_*.pth``, ``*.state``) written atomically, and a failed write stops the run with an error
      naming the file (BasicSR logs "Just ignore it" and goes on);
    * validation refuses, before running the network, a ground truth too small for a metric (SSIM needs 11 pixels
      per side after ``crop_border``; BasicSR would report ``ssim: nan`` or fail inside OpenCV), and refuses a
      network output with NaN or infinite values (BasicSR would write a black image and average NaN): both are
      errors naming the image;
    * validation and testing under ``torchrun`` shared between the processes (:meth:`dist_validation`);
    * the validation after the last iteration numbered as that iteration (BasicSR: one more), and not repeated for
      a set validated there (:meth:`validation`);
    * reduced-precision testing: ``val: {precision: bf16}`` (fp32 default, bf16, fp16; autocast, see
      :mod:`adasr.inference.precision`; checked against the device before anything runs).
    """

    val_option_keys = {'tile', 'tile_pad', 'precision'}
    train_option_keys = {'max_nonfinite_steps'}
    loss_option_keys = {'pixel_opt', 'perceptual_opt'}  # the train.*_opt sections this model reads (SRModel's)
    _share_means: Optional[dict] = None  # while this process validates its share: the means it would have logged
    _lq_path: Optional[str] = None
    _gt: Optional[Tuple[str, int, int]] = None  # (path, height, width) of the ground truth fed with the image

    def feed_data(self, data):
        super().feed_data(data)
        self._lq_path = _first(data.get('lq_path'))
        gt = data.get('gt')
        self._gt = None if gt is None else (_first(data.get('gt_path')) or self._lq_path, *gt.shape[-2:])

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not in torch.optim')
        return optim_cls(params, lr, **kwargs)

    def get_bare_model(self, net):
        return unwrap(net)

    # -- training ----------------------------------------------------------------------------------------------------

    def init_training_settings(self):
        super().init_training_settings()
        self.max_nonfinite_steps = self.opt['train'].get('max_nonfinite_steps', MAX_NONFINITE_STEPS)
        self.nonfinite_run = 0  # steps in a row whose loss or gradients were not finite
        self.applied_steps = 0  # steps that changed the weights (a resumed run counts the earlier ones)

    def resume_training(self, resume_state):
        """BasicSR's resume (optimizer and scheduler states), after checking that the saved optimizers are the ones
        ``train.optim_g`` makes: another type (other settings) is a :class:`ResumeMismatchError`; other values of the
        same settings are kept from the state, as BasicSR does, with a warning naming them. The steps before the
        resumed iteration count as applied (a non-finite last step does not make the run "diverged")."""
        it = resume_state.get('iter')
        for i, (saved, optimizer) in enumerate(zip(resume_state.get('optimizers', []), self.optimizers)):
            key = 'train.optim_g' if i == 0 else f'optimizer {i}'
            was, now = saved.get('param_groups', []), optimizer.param_groups
            if len(was) != len(now):
                raise ResumeMismatchError(f'the training state of iteration {it} holds {len(was)} parameter groups '
                                          f'for {key}, the network now has {len(now)}')
            for g_was, g_now in zip(was, now):
                k_was, k_now = set(g_was) - {'params'}, set(g_now) - {'params'}
                if k_was - k_now:  # (settings only in the option file: a newer PyTorch's, filled in by default)
                    raise ResumeMismatchError(
                        f'the training state of iteration {it} was saved by another optimizer than {key} '
                        f'({type(optimizer).__name__}) makes: settings only in the state: {sorted(k_was - k_now)}, '
                        f'only in the option file: {sorted(k_now - k_was)}; resume with the optimizer the run '
                        'started with, or start a new run from its weights (path.pretrain_network_g)')
                changed = [f'{k}: {g_was[k]!r} in the state, {g_now[k]!r} in the option file' for k in sorted(k_was)
                           if k != 'lr' and not _same_setting(g_was[k], g_now[k])]
                if changed:
                    get_root_logger().warning(f'resuming iteration {it}: {key} keeps the saved settings, not the '
                                              f'option file\'s ({"; ".join(changed)})')
        super().resume_training(resume_state)
        self.applied_steps = max(self.applied_steps, int(it or 0))
        self.trained_iter = it

    def optimize_parameters(self, current_iter):
        self.trained_iter = current_iter
        self.optimizer_g.zero_grad()
        l_total, loss_dict = self.training_losses()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if not self._is_finite(l_total, current_iter, 'loss'):
            return
        l_total.backward()
        if not self._is_finite(self._gradient_norm(), current_iter, 'gradient'):  # a finite loss, inf/NaN gradients
            self.optimizer_g.zero_grad()
            return
        self.optimizer_g.step()
        self.nonfinite_run = 0
        self.applied_steps += 1
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _gradient_norm(self) -> torch.Tensor:
        """The sum of the gradients' norms: finite exactly when every gradient is (one small pass over them)."""
        grads = [p.grad for group in self.optimizer_g.param_groups for p in group['params'] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.stack(torch._foreach_norm(grads)).sum()

    def training_losses(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Run the network on the batch (sets ``self.output``); return the total loss and its named terms."""
        self.output = self.net_g(self.lq)
        return self.image_losses(self.output)

    def image_losses(self, output: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """SRModel's pixel and perceptual losses of ``output`` against ``self.gt``: (total, named terms)."""
        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(output, self.gt)
            l_total += l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            for name, value in (('l_percep', l_percep), ('l_style', l_style)):
                if value is not None:
                    l_total += value
                    loss_dict[name] = value
        return l_total, loss_dict

    def _is_finite(self, value: torch.Tensor, current_iter: int, what: str) -> bool:
        """True when ``value`` (the ``what``: loss, gradient) is finite on every process; otherwise count the step
        as skipped, warn, and raise :class:`TrainingDivergedError` after ``max_nonfinite_steps`` skipped steps in a
        row (or at the last step when no step of this run applied)."""
        bad = torch.logical_not(torch.isfinite(value.detach()).all()).float()
        if self.opt.get('dist'):  # every process skips the same steps, or DDP's gradient reduction would hang
            torch.distributed.all_reduce(bad)
        if not bad.item():
            return True
        self.nonfinite_run += 1
        terms = ', '.join(f'{k}: {v:.4g}' for k, v in self.log_dict.items())
        last_step = current_iter >= self.opt['train'].get('total_iter', float('inf'))
        if self.nonfinite_run >= self.max_nonfinite_steps or (last_step and not self.applied_steps):
            message = (
                f'training diverged: the {what} was not finite for {self.nonfinite_run} steps in a row (iter '
                f'{current_iter}; {terms}); these steps did not change the weights'
                f'{"" if self.applied_steps else ", and no step of this run did"}. Lower train.optim_g.lr or '
                'check the data (train.max_nonfinite_steps sets the limit)')
            get_root_logger().error(message)
            raise TrainingDivergedError(message)
        get_root_logger().warning(f'iter {current_iter}: the {what} is not finite ({terms}); step skipped '
                                  f'({self.nonfinite_run} in a row; the run stops at {self.max_nonfinite_steps}, '
                                  'train.max_nonfinite_steps)')
        return False

    # -- checkpoints -------------------------------------------------------------------------------------------------

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's ``save_network`` (same file name and layout), written atomically; raises a
        :class:`~adasr.utils.checkpoint.CheckpointError` naming the file when a weight is not finite or the write
        fails."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys')
        label = 'latest' if current_iter == -1 else current_iter
        path = osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        save_dict = {}
        for net_, key in zip(nets, keys):
            state = OrderedDict((k[7:] if k.startswith('module.') else k, v.cpu())
                                for k, v in self.get_bare_model(net_).state_dict().items())
            check_finite_state(state, f'refusing to save {path}: {key}')
            save_dict[key] = state
        save_checkpoint(save_dict, path)

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's ``save_training_state`` (``<iter>.state``: epoch, iter, optimizers, schedulers), written
        atomically; a failed write raises a :class:`~adasr.utils.checkpoint.CheckpointError` naming the file."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        save_checkpoint(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    # -- testing -----------------------------------------------------------------------------------------------------

    def load_network(self, net, load_path, strict=True, param_key='params'):
        logger = get_root_logger()
        net = self.get_bare_model(net)
        incompatible = load_weights(net, load_path, param_key, strict)
        logger.info(f'Loaded {net.__class__.__name__} from {load_path} [{param_key}]')
        if not strict and (incompatible.missing_keys or incompatible.unexpected_keys):
            logger.warning(f'{load_path} [{param_key}] loaded in part (strict_load: false): network entries left as '
                           f'initialised: {sorted(incompatible.missing_keys)}; checkpoint entries not used: '
                           f'{sorted(incompatible.unexpected_keys)}')

    def test(self):
        self.check_metric_sizes()
        # the bare network: under torchrun, processes validate different images (DDP's forward would synchronise)
        net = unwrap(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                self.output = self.inference(net, self.lq)
        finally:  # an error (out of memory, a bad image) must not leave the training network in eval mode
            if was_training:
                net.train()
        check_finite(f'the network output for {self._lq_path or "the test batch"}', self.output)

    def check_metric_sizes(self) -> None:
        """Raise a :class:`DatasetError` naming the ground truth when it is too small for a ``val.metrics`` metric
        (see :data:`METRIC_MIN_SIDE`)."""
        if self._gt is None:
            return
        path, h, w = self._gt
        metrics = (self.opt.get('val') or {}).get('metrics') or {}
        for name, metric in metrics.items():
            crop = metric.get('crop_border', 0)
            need = METRIC_MIN_SIDE.get(metric.get('type'), 1) + 2 * crop
            if min(h, w) < need:
                raise DatasetError(f'{path}: the ground truth is {w}x{h}, too small for the metric {name!r} '
                                   f'({metric.get("type")}, crop_border {crop}), which needs at least {need} pixels '
                                   'per side; remove the image from the validation set or lower crop_border')

    def inference(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Run ``net`` on an LR batch, padding and cropping if the arch needs it, tile by tile when ``val.tile``
        is set (``val.tile_pad`` LR pixels of blended context, default 32) and the arch does not tile itself, in
        ``val.precision`` (default fp32)."""
        traits = arch_traits(net, net_opt=self.opt['network_g'])
        multiple = traits.window
        scale = self.opt.get('scale', 1)
        val = self.opt.get('val') or {}
        precision = resolve_precision(val.get('precision', 'fp32'), lq.device)
        fn = precision.wrap(padded_forward(net, scale, multiple, mode='reflect'))
        tile, tile_pad = val.get('tile') or 0, val.get('tile_pad', 32)  # checked by adasr.cli.options
        if not tile or traits.tiling == 'internal':
            return fn(lq)
        collector = HaltingCollector(net, *lq.shape[-2:]) if traits.adaptive else None
        out = tiled_forward(fn, lq, scale, tile, tile_pad, multiple, out_dtype=lq.dtype, on_tile=collector)
        if collector is not None:  # adaptive archs: the halting record of the whole image, not of the last tile
            set_halting_record(unwrap(net), collector.to_info())
        return out

    # -- validation ----------------------------------------------------------------------------------------------------

    _validated: Optional[dict] = None  # id of a loader -> the iteration this process last validated it at
    trained_iter: Optional[int] = None  # the iteration of the weights: the last one trained, or the one resumed

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        """BasicSR's validation, numbered as the weights it measures, and not repeated for the same weights. After
        its last iteration BasicSR's training loop validates once more, with its counter one past that iteration
        when it stopped at ``total_iter`` (plus one for each epoch it had planned after that one: images saved as
        ``*_{total_iter + 1}`` or more, the log's iteration off), even when it has just validated the same
        weights. Here a call past ``total_iter`` is numbered as the weights' iteration (the last one trained, or
        the one resumed), and a set this process has validated at that iteration already is skipped, with a line
        in the log (also when the loop ran out of epochs at an iteration it had validated)."""
        if self.is_train and isinstance(current_iter, int):
            total = (self.opt.get('train') or {}).get('total_iter')
            if total is not None and current_iter > total:
                current_iter = self.trained_iter if self.trained_iter is not None else int(total)
            if self._validated is None:
                self._validated = {}
            if self._validated.get(id(dataloader)) == current_iter:
                get_root_logger().info(f'{dataloader.dataset.opt.get("name")}: validated at iter {current_iter} '
                                       'already (the same weights): the final validation is not repeated')
                return
            self._validated[id(dataloader)] = current_iter
        with _atomic_image_writes():
            super().validation(dataloader, current_iter, tb_logger, save_img)

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
