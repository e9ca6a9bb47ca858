"""AdaFormerModel: training with L1 + uncertainty loss, EMA, validation halting statistics, test-time eps_h, halting
images, and a whole train-then-test run through the command-line pipelines on tiny crops of the demo photos."""
import contextlib
import logging
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.data import build_dataloader, build_dataset

from adasr.models.adaformer_model import AdaFormerModel
from adasr.utils.checkpoint import CheckpointError

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(REPO, 'datasets', 'demo')
TINY_NET = {'type': 'AdaFormer', 'upscale': 4, 'n_feats': 16, 'embed_dim': 16, 'n_resblocks': 2, 'depths': 3,
            'num_heads': 2, 'num_prototypes': 4, 'window_size': 8, 'eps_h': 0.05}


def _opt(tmp_path, is_train=True, **sections):
    root = str(tmp_path)
    for sub in ('models', 'states', 'visualization'):
        os.makedirs(osp.join(root, sub), exist_ok=True)
    opt = {
        'name': 'unit', 'model_type': 'AdaFormerModel', 'scale': 4, 'num_gpu': 0, 'is_train': is_train,
        'dist': False, 'rank': 0, 'world_size': 1, 'manual_seed': 0, 'network_g': dict(TINY_NET),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None, 'experiments_root': root,
                 'models': osp.join(root, 'models'), 'training_states': osp.join(root, 'states'),
                 'log': root, 'visualization': osp.join(root, 'visualization'), 'results_root': root},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 2e-3, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5}, 'total_iter': 10,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 255.},
                  'uncertainty_opt': {'type': 'UncertaintyLoss', 'loss_weight': 1.0, 'pixel_scale': 255.}},
        'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4,
                                                        'test_y_channel': True}}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(opt.get(key), dict):
            opt[key].update(value)
        else:
            opt[key] = value
    return opt


@contextlib.contextmanager
def _basicsr_warnings(caplog):
    """caplog gets BasicSR's warnings (its root logger does not propagate once it is set up)."""
    logger = logging.getLogger('basicsr')
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger='basicsr'):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def _batch(size=16, n=2):
    """Fixed LR/HR crops of the demo photos (0..1, RGB)."""
    lqs, gts = [], []
    for name in sorted(os.listdir(osp.join(DEMO, 'train', 'HR')))[:n]:
        hr = cv2.imread(osp.join(DEMO, 'train', 'HR', name))[:4 * size, :4 * size, ::-1]
        lr = cv2.imread(osp.join(DEMO, 'train', 'LR_bicubic', 'X4', name))[:size, :size, ::-1]
        gts.append(torch.from_numpy(hr.copy()).permute(2, 0, 1).float() / 255)
        lqs.append(torch.from_numpy(lr.copy()).permute(2, 0, 1).float() / 255)
    return {'lq': torch.stack(lqs), 'gt': torch.stack(gts)}


def _val_loader():
    opt = {'name': 'demo_val', 'type': 'PairedSRDataset', 'phase': 'val', 'scale': 4,
           'dataroot_gt': osp.join(DEMO, 'val', 'HR'), 'dataroot_lq': osp.join(DEMO, 'val', 'LR_bicubic', 'X4'),
           'io_backend': {'type': 'disk'}}
    return build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, sampler=None, seed=0)


def test_training_lowers_both_losses(tmp_path):
    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path))
    model.feed_data(_batch())
    logs = []
    for it in range(12):
        model.optimize_parameters(it)
        logs.append(dict(model.get_current_log()))
    assert set(logs[0]) == {'l_pix', 'l_unc', 'halted'}
    assert np.mean([v['l_pix'] for v in logs[-3:]]) < 0.7 * np.mean([v['l_pix'] for v in logs[:3]])
    assert np.mean([v['l_unc'] for v in logs[-3:]]) < np.mean([v['l_unc'] for v in logs[:3]])
    assert model.net_g.training


def test_ema(tmp_path):
    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path, train={'ema_decay': 0.5}))
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(_batch())
    model.optimize_parameters(0)
    after = model.net_g.state_dict()
    for k, v in model.net_g_ema.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.5 * before[k] + 0.5 * after[k], atol=1e-7), k
    model.test()  # runs the EMA network
    assert model.net_g_ema.last_halting is not None and model.net_g_ema.last_halting.mode == 'sparse'
    assert model.net_g.training and not model.net_g_ema.training
    model.save(0, 1)
    saved = torch.load(osp.join(str(tmp_path), 'models', 'net_g_1.pth'), weights_only=True)
    assert set(saved) == {'params', 'params_ema'}


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, caplog):
    """The guard of AdaSRModel.optimize_parameters, through AdaFormerModel's own losses: a NaN loss changes neither
    the weights, the EMA nor the optimizer; a finite step resets the count; max_nonfinite_steps in a row stop."""
    from adasr.models.adasr_model import TrainingDivergedError

    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path, train={'ema_decay': 0.5, 'max_nonfinite_steps': 2}))
    good, bad = _batch(), _batch()
    bad['gt'][0, 0, 0, 0] = float('nan')

    def snapshot():
        return [{k: v.clone() for k, v in m.state_dict().items()} for m in (model.net_g, model.net_g_ema)]

    before, steps = snapshot(), model.optimizer_g.state_dict()['state']
    model.feed_data(bad)
    with _basicsr_warnings(caplog):
        model.optimize_parameters(1)
    assert 'iter 1: the loss is not finite (l_pix: nan' in caplog.text and '1 in a row' in caplog.text
    for old, new in zip(before, snapshot()):
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert model.optimizer_g.state_dict()['state'] == steps == {}
    model.feed_data(good)
    model.optimize_parameters(2)  # a finite step trains and resets the count
    assert any(not torch.equal(before[0][k], v) for k, v in model.net_g.state_dict().items())
    model.feed_data(bad)
    model.optimize_parameters(3)
    with pytest.raises(TrainingDivergedError, match='not finite for 2 steps in a row'):
        model.optimize_parameters(4)


def test_a_step_with_nonfinite_gradients_and_a_finite_loss_is_skipped(tmp_path, caplog):
    """A finite loss whose gradients hold inf (here: sqrt at 0 of the output) is skipped like a NaN loss: the
    weights and the optimizer state stay, with a warning; before, Adam stepped and the weights became NaN."""
    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path, train={'max_nonfinite_steps': 2}))
    model.feed_data(_batch())
    real = model.training_losses

    def sqrt_at_zero():
        l_total, terms = real()
        return l_total + (model.output.flatten()[0] * 0).sqrt(), terms  # value 0, gradient inf

    model.training_losses = sqrt_at_zero
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    with _basicsr_warnings(caplog):
        model.optimize_parameters(1)
    assert 'iter 1: the gradient is not finite' in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    assert model.optimizer_g.state_dict()['state'] == {}
    from adasr.models.adasr_model import TrainingDivergedError
    with pytest.raises(TrainingDivergedError, match='the gradient was not finite for 2 steps in a row'):
        model.optimize_parameters(2)
    model.training_losses = real
    model.nonfinite_run = 0
    model.optimize_parameters(3)  # a finite step trains
    assert model.applied_steps == 1 and any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())


def test_a_run_that_applied_no_step_fails_at_its_last_step(tmp_path):
    """A run shorter than max_nonfinite_steps whose every loss was NaN changed nothing: its last step raises
    (before: it ended with exit 0); one applied step makes a skipped last step a warning only."""
    from adasr.models.adasr_model import TrainingDivergedError

    bad = _batch()
    bad['gt'][0, 0, 0, 0] = float('nan')
    model = AdaFormerModel(_opt(tmp_path, train={'total_iter': 3, 'max_nonfinite_steps': 10}))
    model.feed_data(bad)
    model.optimize_parameters(1)
    model.optimize_parameters(2)
    with pytest.raises(TrainingDivergedError, match='not finite for 3 steps in a row .*no step of this run did'):
        model.optimize_parameters(3)
    model = AdaFormerModel(_opt(tmp_path, train={'total_iter': 2, 'max_nonfinite_steps': 10}))
    model.feed_data(_batch())
    model.optimize_parameters(1)
    model.feed_data(bad)
    model.optimize_parameters(2)  # skipped with a warning; step 1 trained


def test_resume_checks_the_optimizer_and_counts_the_earlier_steps(tmp_path, caplog):
    """A state saved by Adam resumed with SGD is refused by name (before: a raw KeyError at the first step); other
    values of the same settings are kept from the state with a warning naming them (before: silently); a resumed
    run's non-finite last step is a skipped step, not "diverged" (before: no step "of this run" had applied)."""
    from adasr.models.adasr_model import ResumeMismatchError

    model = AdaFormerModel(_opt(tmp_path, train={'total_iter': 5}))
    model.feed_data(_batch())
    model.optimize_parameters(1)
    state = {'iter': 4, 'optimizers': [o.state_dict() for o in model.optimizers],
             'schedulers': [s.state_dict() for s in model.schedulers]}
    sgd = AdaFormerModel(_opt(tmp_path, train={'optim_g': {'type': 'SGD', 'lr': 1e-3, 'momentum': 0.9}}))
    with pytest.raises(ResumeMismatchError, match=r'iteration 4 was saved by another optimizer than train.optim_g '
                                                  r"\(SGD\) makes: settings only in the state: \['amsgrad', 'betas'"):
        sgd.resume_training(state)
    other = AdaFormerModel(_opt(tmp_path, train={'total_iter': 5, 'optim_g': {'type': 'Adam', 'lr': 2e-4,
                                                                              'weight_decay': 0.5}}))
    with _basicsr_warnings(caplog):
        other.resume_training(state)
    assert "weight_decay: 0 in the state, 0.5 in the option file" in caplog.text
    assert other.optimizer_g.param_groups[0]['weight_decay'] == 0  # BasicSR's resume keeps the state's
    bad = _batch()
    bad['gt'][0, 0, 0, 0] = float('nan')
    other.feed_data(bad)
    other.optimize_parameters(5)  # the last step, skipped with a warning: steps 1-4 trained the resumed weights


def test_nonfinite_weights_are_never_saved(tmp_path):
    model = AdaFormerModel(_opt(tmp_path))
    with torch.no_grad():
        next(model.net_g.parameters()).view(-1)[0] = float('inf')
    with pytest.raises(CheckpointError, match=r'refusing to save .*net_g_7\.pth: params holds non-finite'):
        model.save(0, 7)
    assert os.listdir(osp.join(str(tmp_path), 'models')) == []


def test_validation_logs_halting_and_eps_h_override(tmp_path):
    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path, is_train=False))
    loader = _val_loader()
    model.validation(loader, current_iter='test', tb_logger=None, save_img=False)
    base = model.halting_results['demo_val']
    assert len(base['global_consumed']) == 3 and base['global_consumed'][0] == 0.0
    assert 'psnr' in model.metric_results

    model.opt['val']['eps_h'] = 0.6
    model.validation(loader, current_iter='test', tb_logger=None, save_img=False)
    high = model.halting_results['demo_val']
    assert model.net_g.eps_h == 0.05  # restored after testing
    assert sum(high['global_consumed']) > sum(base['global_consumed'])


def test_save_halting_images(tmp_path):
    torch.manual_seed(0)
    model = AdaFormerModel(_opt(tmp_path, is_train=False, val={'save_img': True, 'save_halting': True,
                                                               'suffix': None}))
    model.validation(_val_loader(), current_iter='test', tb_logger=None, save_img=True)
    # the complete maps were for the pictures only: the network skips the work that decides nothing again
    assert model.get_bare_model(model.net_g).complete_halting_maps is False
    folder = osp.join(str(tmp_path), 'visualization', 'demo_val')
    for stem in ('chelsea', 'grace_hopper'):
        conf = cv2.imread(osp.join(folder, f'{stem}_unit_confidence.png'))
        masks = cv2.imread(osp.join(folder, f'{stem}_unit_halting.png'))
        depth = cv2.imread(osp.join(folder, f'{stem}_unit_depth.png'), cv2.IMREAD_UNCHANGED)
        assert cv2.imread(osp.join(folder, f'{stem}_unit.png')).shape == (288, 288, 3)
        assert conf.shape == (72, 3 * 72 + 2 * 2, 3)  # 3 layers side by side, 2-pixel separators
        assert masks.shape == (2 * 72 + 2, 3 * 72 + 2 * 2, 3)
        assert depth.shape == (72, 72) and depth.max() == 255  # block 0 only up to every block
        assert set(np.unique(masks[:72, :72, 0])) <= {0, 255}


def test_strict_load_error_names_keys(tmp_path):
    from adasr.archs.adaformer_arch import AdaFormer

    kwargs = {k: v for k, v in TINY_NET.items() if k != 'type'}
    state = AdaFormer(**kwargs).state_dict()
    del state['body.blocks.0.attn.prototype']
    path = str(tmp_path / 'bad.pth')
    torch.save({'params': state}, path)
    with pytest.raises(CheckpointError, match='body.blocks.0.attn.prototype'):
        AdaFormerModel(_opt(tmp_path, is_train=False, path={'pretrain_network_g': path}))


def test_rejects_other_archs(tmp_path):
    opt = _opt(tmp_path, is_train=False)
    opt['network_g'] = {'type': 'Bicubic', 'upscale': 4}
    with pytest.raises(ValueError, match='AdaFormer network'):
        AdaFormerModel(opt)


def test_train_then_test_through_the_pipelines(tmp_path, monkeypatch, caplog):
    """A few iterations on tiny crops through adasr-train, then adasr-test with halting images."""
    from adasr.cli.entry import run

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger='basicsr')  # BasicSR writes its log file only for a process's first run
    net = dict(TINY_NET)
    train = {
        'name': 'tiny_adaformer', 'model_type': 'AdaFormerModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'demo_train', 'type': 'PairedSRDataset', 'dataroot_gt': osp.join(DEMO, 'train', 'HR'),
                      'dataroot_lq': osp.join(DEMO, 'train', 'LR_bicubic', 'X4'), 'io_backend': {'type': 'disk'},
                      'gt_size': 64, 'use_hflip': True, 'use_rot': True, 'use_shuffle': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 10,
                      'prefetch_mode': None},
            'val': {'name': 'demo_val', 'type': 'PairedSRDataset', 'dataroot_gt': osp.join(DEMO, 'val', 'HR'),
                    'dataroot_lq': osp.join(DEMO, 'val', 'LR_bicubic', 'X4'), 'io_backend': {'type': 'disk'}}},
        'network_g': net,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5}, 'total_iter': 6,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 255.},
                  'uncertainty_opt': {'type': 'UncertaintyLoss', 'pixel_scale': 255.}},
        'val': {'val_freq': 6, 'save_img': False, 'metrics': {
            'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 2, 'save_checkpoint_freq': 6, 'use_tb_logger': False, 'wandb': None},
    }
    with open('train.yml', 'w') as f:
        yaml.safe_dump(train, f)
    run('train', ['-opt', 'train.yml'])
    exp = osp.join(str(tmp_path), 'experiments', 'tiny_adaformer')
    assert osp.isfile(osp.join(exp, 'models', 'net_g_latest.pth'))
    assert 'l_unc' in caplog.text and 'Halting demo_val' in caplog.text and '# psnr' in caplog.text

    test = {k: train[k] for k in ('model_type', 'scale', 'num_gpu', 'manual_seed', 'network_g')}
    test.update(name='tiny_adaformer_test', datasets={'test_1': train['datasets']['val']},
                path={'pretrain_network_g': osp.join(exp, 'models', 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                      'strict_load_g': True},
                val={'save_img': True, 'suffix': None, 'save_halting': True, 'eps_h': 0.1,
                     'metrics': train['val']['metrics']})
    with open('test.yml', 'w') as f:
        yaml.safe_dump(test, f)
    run('test', ['-opt', 'test.yml'])
    vis = osp.join(str(tmp_path), 'results', 'tiny_adaformer_test', 'visualization', 'demo_val')
    written = sorted(os.listdir(vis))
    for stem in ('chelsea', 'grace_hopper'):
        for suffix in ('', '_confidence', '_halting', '_depth'):
            assert f'{stem}_tiny_adaformer_test{suffix}.png' in written
