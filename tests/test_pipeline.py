"""End-to-end runs of the entry points on tiny real images, as a user runs them (fresh processes, outputs under
the current directory)."""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.metrics import calculate_psnr
from basicsr.utils import img2tensor, tensor2img

from adasr.data.prepare import folder_to_lmdb
from adasr.utils.matlab_resize import imresize

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(REPO, 'adasr', 'train.py')
TEST = osp.join(REPO, 'adasr', 'test.py')
TINY_SWINIR = {'type': 'SwinIR', 'upscale': 4, 'in_chans': 3, 'img_size': 12, 'window_size': 4, 'img_range': 1.0,
               'depths': [1], 'embed_dim': 12, 'num_heads': [2], 'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect',
               'resi_connection': '1conv'}
METRICS = {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True},
           'ssim': {'type': 'calculate_ssim', 'crop_border': 4, 'test_y_channel': True}}


def run(script, opt_path, cwd, *extra, check=True):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, script, '-opt', opt_path, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_yaml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def test_bicubic_test_pipeline_equals_direct_matlab_bicubic(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    opt = {'name': 'bicubic_tiny', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                   'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'Bicubic', 'upscale': 4}, 'path': {'pretrain_network_g': None},
           'val': {'save_img': True, 'suffix': None, 'metrics': METRICS}}
    out = run(TEST, write_yaml(tmp_path / 'opt.yml', opt), cwd=tmp_path)
    psnrs = []
    for name in ('astronaut', 'coffee'):
        saved = cv2.imread(str(tmp_path / 'results' / 'bicubic_tiny' / 'visualization' / 'tiny'
                               / f'{name}_bicubic_tiny.png'))
        lq = img2tensor(cv2.imread(osp.join(lr, f'{name}.png')).astype(np.float32) / 255.0)
        direct = tensor2img(imresize(lq.unsqueeze(0), 4))
        assert saved is not None and saved.shape == (48, 48, 3)
        assert np.array_equal(saved, direct)
        psnrs.append(calculate_psnr(direct, cv2.imread(osp.join(hr, f'{name}.png')), 4, test_y_channel=True))
    logs = glob.glob(str(tmp_path / 'results' / 'bicubic_tiny' / 'test_*.log'))
    logged = float(re.search(r'# psnr: ([0-9.]+)', open(logs[0]).read()).group(1))
    assert logged == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert 'psnr' in out.stdout + out.stderr or logs


@pytest.mark.slow
def test_train_lmdb_and_disk_save_auto_resume_then_test(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    folder_to_lmdb(hr, str(tmp_path / 'hr.lmdb'))
    folder_to_lmdb(lr, str(tmp_path / 'lr.lmdb'))

    def train_opt(name, backend):
        roots = (str(tmp_path / 'hr.lmdb'), str(tmp_path / 'lr.lmdb')) if backend == 'lmdb' else (hr, lr)
        return {
            'name': name, 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
            'datasets': {
                'train': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': roots[0], 'dataroot_lq': roots[1],
                          'io_backend': {'type': backend}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                          'use_shuffle': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2,
                          'dataset_enlarge_ratio': 4, 'prefetch_mode': None},
                'val': {'name': 'tiny_val', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                        'io_backend': {'type': 'disk'}}},
            'network_g': dict(TINY_SWINIR),
            'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
            'train': {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 0.0},
                      'scheduler': {'type': 'MultiStepLR', 'milestones': [3], 'gamma': 0.5}, 'total_iter': 2,
                      'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
            'val': {'val_freq': 2, 'save_img': False, 'metrics': METRICS},
            'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False, 'wandb': None},
        }

    # LMDB: two iterations, checkpoint at 2
    opt_path = write_yaml(tmp_path / 'train_lmdb.yml', train_opt('tiny_lmdb', 'lmdb'))
    run(TRAIN, opt_path, tmp_path)
    exp = tmp_path / 'experiments' / 'tiny_lmdb'
    assert (exp / 'models' / 'net_g_2.pth').is_file() and (exp / 'training_states' / '2.state').is_file()
    first = torch.load(exp / 'models' / 'net_g_2.pth', weights_only=True)
    assert set(first) == {'params', 'params_ema'}
    # validated once, at iteration 2: BasicSR's loop validated the same weights again as "iter 3"
    log = ''.join(open(p).read() for p in glob.glob(str(exp / 'train_*.log')))
    assert log.count('Validation tiny_val') == 1 and '@ 2 iter' in log and '@ 3 iter' not in log
    assert 'tiny_val: validated at iter 2 already (the same weights): the final validation is not repeated' in log

    # resume from the saved iteration and continue to 4 (BasicSR 1.4.2 cannot resume on a CPU; adasr can)
    out = run(TRAIN, opt_path, tmp_path, '--auto_resume', '--force_yml', 'train:total_iter=4')
    log = out.stdout + out.stderr + ''.join(open(p).read() for p in glob.glob(str(exp / 'train_*.log')))
    assert 'Resuming training from epoch' in log and 'iter: 2.' in log
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    record = (exp / 'train_lmdb.yml').read_text()  # the run's record: the command as typed, the options that ran
    assert '--auto_resume --force_yml train:total_iter=4' in record and 'total_iter: 4' in record
    assert yaml.safe_load(record)['train']['total_iter'] == 4
    logs = ''.join(open(p).read() for p in glob.glob(str(exp / 'train_*.log')))  # both runs' log files
    assert logs.count('Validation tiny_val') == 2 and '@ 4 iter' in logs and '@ 5 iter' not in logs
    assert not any(p.endswith('_archived') for p in os.listdir(tmp_path / 'experiments'))
    resumed = torch.load(exp / 'models' / 'net_g_4.pth', weights_only=True)['params']
    assert any(not torch.equal(resumed[k], first['params'][k]) for k in resumed)  # it trained further

    # disk backend, one run
    run(TRAIN, write_yaml(tmp_path / 'train_disk.yml', train_opt('tiny_disk', 'disk')), tmp_path)
    assert (tmp_path / 'experiments' / 'tiny_disk' / 'models' / 'net_g_latest.pth').is_file()

    # test pipeline with the trained EMA weights writes images and metrics under ./results
    test_opt = {'name': 'tiny_test', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
                'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr,
                                        'dataroot_lq': lr, 'io_backend': {'type': 'disk'}}},
                'network_g': dict(TINY_SWINIR),
                'path': {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                         'strict_load_g': True},
                'val': {'save_img': True, 'suffix': None, 'metrics': METRICS}}
    run(TEST, write_yaml(tmp_path / 'test.yml', test_opt), tmp_path)
    res = tmp_path / 'results' / 'tiny_test'
    assert sorted(os.listdir(res / 'visualization' / 'tiny')) == ['astronaut_tiny_test.png', 'coffee_tiny_test.png']
    log = open(glob.glob(str(res / 'test_*.log'))[0]).read()
    assert re.search(r'# psnr: [0-9.]+', log) and re.search(r'# ssim: [0-9.]+', log)


def test_entry_points_stop_with_a_clear_message(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    opt = {'name': 'bad', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr,
                                   'dataroot_lq': str(tmp_path / 'missing_LR'), 'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'Bicubic', 'upscale': 4}, 'path': {},
           'val': {'save_img': False, 'metrics': METRICS}}
    out = run(TEST, write_yaml(tmp_path / 'bad.yml', opt), tmp_path, check=False)
    assert out.returncode != 0
    assert f'dataroot_lq does not exist: {tmp_path / "missing_LR"}' in out.stderr
    assert 'Traceback' not in out.stderr
    assert not (tmp_path / 'results').exists()  # nothing was started


def test_checkpoint_mismatch_is_reported_by_key(tiny_pairs, tmp_path):
    hr, lr = tiny_pairs
    torch.save({'params': {'conv_first.weight': torch.zeros(1)}}, tmp_path / 'wrong.pth')
    opt = {'name': 'mismatch', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                   'io_backend': {'type': 'disk'}}},
           'network_g': dict(TINY_SWINIR), 'path': {'pretrain_network_g': str(tmp_path / 'wrong.pth')},
           'val': {'save_img': False, 'metrics': METRICS}}
    out = run(TEST, write_yaml(tmp_path / 'mismatch.yml', opt), tmp_path, check=False)
    assert out.returncode != 0
    assert 'missing keys' in out.stderr and 'conv_first.weight (1,) vs (12, 3, 3, 3)' in out.stderr
    assert 'Traceback' not in out.stderr


def test_test_runs_only_the_sets_asked_for(tiny_pairs, tmp_path):
    """``adasr-test --sets``: a file listing a set that is not on disk runs on the sets that are; a name the file
    does not have is refused before anything runs, naming the names it has."""
    hr, lr = tiny_pairs
    missing = str(tmp_path / 'Urban100')
    opt = {'name': 'bicubic_sets', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                   'io_backend': {'type': 'disk'}},
                        'test_2': {'name': 'Urban100', 'type': 'PairedSRDataset', 'dataroot_gt': missing,
                                   'dataroot_lq': missing, 'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'Bicubic', 'upscale': 4}, 'path': {'pretrain_network_g': None},
           'val': {'save_img': False, 'suffix': None, 'metrics': METRICS}}
    path = write_yaml(tmp_path / 'opt.yml', opt)
    proc = run(TEST, path, tmp_path, check=False)
    assert proc.returncode != 0 and 'Urban100' in proc.stderr  # the whole file needs every folder
    run(TEST, path, tmp_path, '--sets', 'tiny')
    log = glob.glob(str(tmp_path / 'results' / 'bicubic_sets' / 'test_*.log'))[-1]
    text = open(log).read()
    assert 'Validation tiny' in text and 'Urban100' not in text.split('Validation tiny', 1)[1]
    proc = run(TEST, path, tmp_path, '--sets', 'Set5', check=False)
    assert proc.returncode != 0 and 'no dataset named Set5 in the option file (it has: tiny, Urban100)' in proc.stderr


@pytest.mark.parametrize('total, trained, calls, measured', [
    (4, 4, [2, 4, 5], [2, 4]),  # the loop stopped at total_iter: its final call (5) repeats 4
    (4, 4, [4, 6], [4]),  # ... one past it for each epoch it had planned after the last one (BasicSR)
    (4.0, 4, [4, 5], [4]),  # total_iter a whole float (YAML's !!float 4)
    (4, 4, [3, 5], [3, 4]),  # not validated at 4 in the loop: the final call measures 4
    (2, 2, [2, 2], [2]),  # the loop ran out of epochs at total_iter (the loader drops short batches)
    (4, 6, [7], [6]),  # resumed at 6, past total_iter: nothing trained, the weights of iteration 6
])
def test_final_validation_numbered_by_its_weights_and_not_repeated(total, trained, calls, measured):
    """BasicSR's training loop validates after its last iteration with its counter one past it; adasr numbers that
    validation as the iteration whose weights it measures and skips it for a set already validated there."""
    import types

    from adasr.models.adasr_model import AdaSRModel

    model = object.__new__(AdaSRModel)
    model.is_train, model.opt = True, {'dist': False, 'train': {'total_iter': total}}
    model.trained_iter = trained  # (set by optimize_parameters and resume_training)
    seen = []
    model.nondist_validation = lambda loader, it, tb, save: seen.append((loader.dataset.opt['name'], it))
    loaders = [types.SimpleNamespace(dataset=types.SimpleNamespace(opt={'name': n})) for n in ('a', 'b')]
    for it in calls:
        for loader in loaders:
            model.validation(loader, it, None, False)
    assert seen == [(n, it) for it in measured for n in ('a', 'b')]
    model.is_train = False  # testing: BasicSR's numbering ('' or a name) untouched, nothing skipped
    model.validation(loaders[0], calls[-1], None, False)
    assert seen[-1] == ('a', calls[-1])
