"""The AdaFormer option files: each one passes the option checks and builds the paper network; the training file
is the paper's recipe."""
import glob
import os.path as osp

import pytest
import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss

from adasr.cli.options import OptionsError, check_options, load_yaml

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FILES = sorted(glob.glob(osp.join(REPO, 'options', '*', '*AdaFormer*.yml')))


def test_all_four_files_exist():
    names = {osp.relpath(f, REPO) for f in FILES}
    assert names == {'options/train/train_AdaFormer_x4.yml', 'options/test/test_AdaFormer_x4.yml',
                     'options/demo/train_AdaFormer_x4_demo.yml', 'options/demo/test_AdaFormer_x4_demo.yml'}


@pytest.mark.parametrize('path', FILES, ids=[osp.basename(f) for f in FILES])
def test_option_file_builds(path):
    opt = load_yaml(path)
    is_train = 'train' in opt
    check_options(opt, is_train=is_train, check_paths=False)
    assert opt['model_type'] == 'AdaFormerModel'
    net = build_network(opt['network_g'])
    assert sum(p.numel() for p in net.parameters()) == 1_602_721
    assert net.eps_h == 0.05 and net.eval_global_split == 'auto' and net.img_range == 255
    if is_train:
        for key in ('pixel_opt', 'uncertainty_opt'):
            build_loss(opt['train'][key])


def test_test_file_covers_the_benchmarks():
    opt = load_yaml(osp.join(REPO, 'options', 'test', 'test_AdaFormer_x4.yml'))
    names = [d['name'] for d in opt['datasets'].values()]
    assert names == ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109', 'Test2K', 'Test4K', 'Test8K']
    test8k = opt['datasets']['test_8']
    assert (test8k['dataroot_gt'], test8k['dataroot_lq']) == ('datasets/Test8K/HR/X4', 'datasets/Test8K/LR/X4')
    assert {m['crop_border'] for m in opt['val']['metrics'].values()} == {4}


def test_training_file_is_the_paper_recipe():
    opt = load_yaml(osp.join(REPO, 'options', 'train', 'train_AdaFormer_x4.yml'))
    ds = opt['datasets']['train']
    assert (ds['gt_size'], ds['batch_size_per_gpu'], ds['use_hflip'], ds['use_rot']) == (192, 16, True, True)
    assert ds['io_backend']['type'] == 'lmdb' and 'DIV2K' in ds['dataroot_gt']
    tr = opt['train']
    assert tr['optim_g'] == {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.999], 'eps': 1e-8}
    assert tr['scheduler'] == {'type': 'MultiStepLR', 'milestones': [200000, 400000, 600000, 800000], 'gamma': 0.5}
    assert tr['total_iter'] == 1_000_000 and tr['ema_decay'] == 0
    # L1 on 0..1 times 255 == the authors' L1 on 0..255; alpha = 1 with the error on the 0..255 scale
    assert tr['pixel_opt']['loss_weight'] == 255 and tr['uncertainty_opt']['loss_weight'] == 1
    assert tr['uncertainty_opt']['pixel_scale'] == 255 and tr['uncertainty_opt']['detach_sr'] is True


def test_pixel_loss_weight_reproduces_the_authors_gradient():
    """255 * L1(sr/255, hr/255) has the same gradient as the authors' L1(sr, hr) on 0..255."""
    torch.manual_seed(0)
    w = torch.randn(8, requires_grad=True)
    hr = torch.rand(8) * 255
    loss_255 = (w * 100 - hr).abs().mean()
    g_255, = torch.autograd.grad(loss_255, w)
    loss_01 = 255 * build_loss({'type': 'L1Loss', 'loss_weight': 1.0})((w * 100 / 255)[None], (hr / 255)[None])
    g_01, = torch.autograd.grad(loss_01, w)
    assert torch.allclose(g_255, g_01, rtol=1e-5)


def test_a_misspelled_loss_section_is_an_error():
    """A ``train.*_opt`` that the model never reads would train without that loss (the halting estimator untrained
    for ``uncertanty_opt``): refused with the model's own loss keys; AdaSRModel does not read uncertainty_opt."""
    opt = load_yaml(osp.join(REPO, 'options', 'train', 'train_AdaFormer_x4.yml'))
    opt['train']['uncertanty_opt'] = opt['train'].pop('uncertainty_opt')
    with pytest.raises(OptionsError, match=r"unknown key 'uncertanty_opt' in train \(the losses AdaFormerModel "
                                           r"reads\) \(did you mean 'uncertainty_opt'"):
        check_options(opt, is_train=True, check_paths=False)
    opt['train']['uncertainty_opt'] = opt['train'].pop('uncertanty_opt')
    check_options(opt, is_train=True, check_paths=False)
    opt['model_type'] = 'AdaSRModel'
    with pytest.raises(OptionsError, match=r"unknown key 'uncertainty_opt' in train \(the losses AdaSRModel reads"):
        check_options(opt, is_train=True, check_paths=False)
