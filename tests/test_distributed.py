"""Distributed runs with torchrun on the CPU (gloo, loopback): training equals one process with the summed batch
and resumes, and adasr-upscale shares a folder between processes with the same outputs as one process."""
import glob
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_pairs
from tests.test_pipeline import TINY_SWINIR, write_yaml

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TRAIN = osp.join(REPO, 'adasr', 'train.py')
TEST = osp.join(REPO, 'adasr', 'test.py')
NAMES = ('astronaut', 'coffee', 'face', 'rocket')


ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1',
           GLOO_SOCKET_IFNAME='lo')  # gloo on the loopback interface


def run(args, cwd, nproc=None):
    """``python ARGS``, or ``torchrun --standalone --nproc-per-node NPROC ARGS`` (a free loopback port)."""
    launcher = [] if nproc is None else ['-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}']
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_opt(name, hr, lr, batch, total_iter):
    """Deterministic data: crops are the whole 48x48 image, no flips or rotations, and a batch of 4 over all the
    processes is the whole dataset of 4, so every iteration sees the same 4 pairs whatever the process count."""
    return {
        'name': name, 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                      'io_backend': {'type': 'disk'}, 'gt_size': 48, 'use_hflip': False, 'use_rot': False,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': batch, 'dataset_enlarge_ratio': 1},
            'val': {'name': 'tiny_val', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                    'io_backend': {'type': 'disk'}}},
        'network_g': dict(TINY_SWINIR, drop_path_rate=0.0),  # no random layers: the processes' seeds differ
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 0.0},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [3], 'gamma': 0.5}, 'total_iter': total_iter,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        'val': {'val_freq': 100, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False, 'wandb': None},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_batch_and_resume(tmp_path):
    hr, lr = make_pairs(str(tmp_path / 'pairs'), names=NAMES)
    # one process, batch 4, 4 iterations
    run([TRAIN, '-opt', write_yaml(tmp_path / 'one.yml', train_opt('one', hr, lr, 4, 4))], tmp_path)
    # two processes, batch 2 each: 2 iterations, then --auto_resume to 4
    two = write_yaml(tmp_path / 'two.yml', train_opt('two', hr, lr, 2, 2))
    run([TRAIN, '-opt', two, '--launcher', 'pytorch'], tmp_path, nproc=2)
    out = run([TRAIN, '-opt', two, '--launcher', 'pytorch', '--auto_resume', '--force_yml', 'train:total_iter=4'],
              tmp_path, nproc=2)
    exp = tmp_path / 'experiments'
    assert 'Resuming training from epoch: 1, iter: 2.' in out.stderr

    one_2, one_4, two_4 = (torch.load(exp / name / 'models' / f'net_g_{i}.pth', weights_only=True)
                           for name, i in (('one', 2), ('one', 4), ('two', 4)))
    moved = max_difference(one_4['params'], one_2['params'])
    for key in ('params', 'params_ema'):
        diff = max_difference(one_4[key], two_4[key])
        print(f'{key}: max |1 process - 2 processes| after 4 iterations = {diff:.3g} (training moved them {moved:.3g})')
        assert diff < 1e-5 and moved > 5e-4

    # the final validation, shared by the 2 processes, logs the PSNR of one process on the same weights
    def final_psnr(name):
        log = open(sorted(glob.glob(str(exp / name / f'train_{name}_*.log')))[-1]).read()
        return float(re.findall(r'# psnr: ([0-9.]+)', log)[-1])

    assert final_psnr('two') == pytest.approx(final_psnr('one'), abs=1e-3)

    # process 0 alone wrote: one log per run, the checkpoints, no archived copy of the experiment folder
    assert sorted(os.listdir(exp)) == ['one', 'two']
    assert len(glob.glob(str(exp / 'two' / 'train_two_*.log'))) == 2
    assert sorted(os.listdir(exp / 'two' / 'models')) == ['net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth']
    assert sorted(os.listdir(exp / 'two' / 'training_states')) == ['2.state', '4.state']


@pytest.mark.slow
def test_upscale_under_torchrun_shares_the_folder_and_matches_one_process(tmp_path, capsys):
    from adasr.cli.upscale import main

    _, lr = make_pairs(str(tmp_path / 'pairs'), names=NAMES)
    args = ['-i', lr, '--arch', 'Bicubic', '--scale', '4', '-q']
    assert main([*args, '-o', str(tmp_path / 'one')]) == 0  # one process (this one)
    shared = run(['-m', 'adasr.cli.upscale', *args, '-o', str(tmp_path / 'two')], tmp_path, nproc=2)
    summary = 'done: 4 written, 0 skipped (output exists), 0 failed'
    assert summary in capsys.readouterr().out
    assert shared.stdout.count(summary) == 1  # process 0 prints the summary of both shares (2 images each)
    names = sorted(os.listdir(tmp_path / 'one'))
    assert names == [f'{n}_out.png' for n in NAMES] == sorted(os.listdir(tmp_path / 'two'))
    for name in names:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes()


@pytest.mark.slow
def test_yaml_testing_under_torchrun_shares_the_set_and_matches_one_process(tmp_path):
    """AdaFormer (metrics and halting statistics) tested by one process and by 2 processes with torchrun: the same
    images byte for byte, and the same logged means over the 3 images (the processes validated 2 and 1)."""
    from basicsr.archs import build_network

    from tests.test_adaformer_model import TINY_NET

    hr, lr = make_pairs(str(tmp_path / 'pairs'), names=NAMES[:3])
    torch.manual_seed(0)
    torch.save({'params': build_network(dict(TINY_NET)).state_dict()}, tmp_path / 'w.pth')

    def test_opt(name):
        return {'name': name, 'model_type': 'AdaFormerModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
                'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr,
                                        'dataroot_lq': lr, 'io_backend': {'type': 'disk'}}},
                'network_g': dict(TINY_NET), 'path': {'pretrain_network_g': str(tmp_path / 'w.pth'),
                                                      'param_key_g': 'params', 'strict_load_g': True},
                'val': {'save_img': True, 'suffix': 'sr', 'save_halting': True, 'metrics': {
                    'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}}}

    for name, nproc in (('one', None), ('two', 2)):
        run([TEST, '-opt', write_yaml(tmp_path / f'{name}.yml', test_opt(name))]
            + ([] if nproc is None else ['--launcher', 'pytorch']), tmp_path, nproc=nproc)

    def logged_means(name):
        log = open(glob.glob(str(tmp_path / 'results' / name / f'test_{name}_*.log'))[0]).read()
        return re.findall(r'# psnr: [0-9.]+|# global: .*|# local: .*', log)

    assert len(logged_means('one')) == 3 and logged_means('one') == logged_means('two')
    one, two = (tmp_path / 'results' / name / 'visualization' / 'tiny' for name in ('one', 'two'))
    names = sorted(os.listdir(one))
    assert len(names) == 12 and names == sorted(os.listdir(two))  # per image: SR, confidence, halting, depth
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()


@pytest.mark.slow
def test_two_machines_without_a_shared_experiments_folder_refuse_to_resume(tmp_path):
    """Two "machines" (two torchrun agents, each in its own folder) meet by the c10d rendezvous of the README's
    multi-node command; only the first folder holds a checkpoint, so --auto_resume would start the processes from
    different iterations: both stop with a message before any work."""
    from basicsr.archs import build_network

    hr, lr = make_pairs(str(tmp_path / 'pairs'), names=NAMES)
    opt_path = write_yaml(tmp_path / 'two.yml', train_opt('two', hr, lr, 2, 4))
    exp = tmp_path / 'a' / 'experiments' / 'two'
    os.makedirs(exp / 'models')
    os.makedirs(exp / 'training_states')
    weights = build_network(train_opt('two', hr, lr, 2, 4)['network_g']).state_dict()
    torch.save({'params': weights, 'params_ema': weights}, exp / 'models' / 'net_g_2.pth')
    torch.save({'epoch': 1, 'iter': 2, 'optimizers': [], 'schedulers': []}, exp / 'training_states' / '2.state')
    os.makedirs(tmp_path / 'b')
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc-per-node=1', '--rdzv-id=t',
               '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{free_port()}',
               TRAIN, '-opt', opt_path, '--launcher', 'pytorch', '--auto_resume']
    machines = [subprocess.Popen(command, cwd=tmp_path / m, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for m in 'ab']
    outputs = [m.communicate(timeout=600) for m in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode != 0
        assert 'error: the processes found different training states to resume from' in err, err[-3000:]
        assert 'iteration 2' in err and ': none' in err
    assert not (tmp_path / 'b' / 'experiments').exists()
    assert sorted(os.listdir(tmp_path / 'a' / 'experiments')) == ['two']  # nothing archived or started
    assert not glob.glob(str(exp / '*.log'))


@pytest.mark.parametrize('images, ratio, batch', [(4, 1, 2), (5, 2, 1), (6, 4, 3)])
def test_enlarged_sampler_gives_n_processes_the_samples_of_one_process_batch(images, ratio, batch):
    """Why the equality above holds beyond the whole-dataset batch: with images x ratio a multiple of the process
    count, BasicSR's sampler deals the one-process permutation out in turn, so in every iteration of every epoch
    the 2 processes' batches of B together are the one process's batch of 2B."""
    from basicsr.data.data_sampler import EnlargedSampler

    dataset = list(range(images))
    for epoch in range(3):
        samplers = [EnlargedSampler(dataset, world, rank, ratio) for world, rank in ((1, 0), (2, 0), (2, 1))]
        for s in samplers:
            s.set_epoch(epoch)
        one, rank0, rank1 = (list(s) for s in samplers)
        for i in range(len(one) // (2 * batch)):
            union = rank0[i * batch:(i + 1) * batch] + rank1[i * batch:(i + 1) * batch]
            assert sorted(union) == sorted(one[i * 2 * batch:(i + 1) * 2 * batch])


def test_share_means_are_weighted_by_image_count():
    """3 images over 3 processes as 2 + 1 + 0: the means are over images, not over processes."""
    from adasr.models.adasr_model import _weighted_means

    shares = [(2, {'metrics': {'psnr': 30.0}, 'halting': {'local': [0.5, 0.0]}}),
              (1, {'metrics': {'psnr': 33.0}, 'halting': {'local': [0.2, 0.3]}}),
              (0, {})]
    assert _weighted_means(shares) == {'halting': {'local': [pytest.approx(0.4), pytest.approx(0.1)]},
                                       'metrics': {'psnr': pytest.approx(31.0)}}
