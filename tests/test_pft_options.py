"""Every PFT option file parses, passes the option checks, and builds its network with the real hyperparameters."""
import glob
import os.path as osp

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from adasr.cli.options import check_options, load_yaml

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FILES = sorted(glob.glob(osp.join(REPO, 'options', '**', '*PFT*.yml'), recursive=True))
CHECKPOINTS = {('PFT', 2): '001_PFT_SRx2_scratch.pth', ('PFT', 3): '002_PFT_SRx3_finetune.pth',
               ('PFT', 4): '003_PFT_SRx4_finetune.pth', ('PFT_light', 2): '101_PFT_light_SRx2_scratch.pth',
               ('PFT_light', 3): '102_PFT_light_SRx3_finetune.pth', ('PFT_light', 4): '103_PFT_light_SRx4_finetune.pth'}
PARAMS = {'PFT': {2: 19_623_527, 3: 19_808_167, 4: 19_771_239},
          'PFT_light': {2: 775_532, 3: 782_567, 4: 792_416}}


def test_all_recipes_present():
    names = {osp.relpath(f, REPO) for f in FILES}
    for arch in ('PFT', 'PFT_light'):
        for s in (2, 3, 4):
            assert f'options/train/train_{arch}_x{s}.yml' in names
            assert f'options/test/test_{arch}_x{s}.yml' in names
    assert {'options/demo/train_PFT_light_x4_demo.yml', 'options/demo/test_PFT_light_x4_demo.yml'} <= names


@pytest.mark.parametrize('path', FILES, ids=lambda p: osp.relpath(p, REPO))
def test_option_file_builds(path):
    opt = load_yaml(path)
    is_train = osp.basename(path).startswith('train')
    check_options(opt, is_train=is_train, check_paths=False)
    net_opt = dict(opt['network_g'])
    cls = ARCH_REGISTRY.get(net_opt.pop('type'))
    with torch.device('meta'):
        net = cls(**net_opt)
    assert net_opt['upscale'] == opt['scale']
    stem = osp.basename(path)[:-4]
    if 'demo' in stem:
        return
    arch = 'PFT_light' if 'light' in stem else 'PFT'
    scale = opt['scale']
    assert sum(p.numel() for p in net.parameters()) == PARAMS[arch][scale]
    crop = {m['crop_border'] for m in opt['val']['metrics'].values()}
    assert crop == {scale} and all(m['test_y_channel'] for m in opt['val']['metrics'].values())
    path_opt = opt['path']
    if not is_train:
        assert path_opt['pretrain_network_g'] == f'experiments/pretrained_models/{CHECKPOINTS[(arch, scale)]}'
        assert path_opt['param_key_g'] == 'params_ema' and path_opt['strict_load_g'] is True
        assert [d['name'] for d in opt['datasets'].values()] == ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109']
        return
    train = opt['train']
    assert train['optim_g']['type'] == 'AdamW' and train['ema_decay'] == 0.999
    data = opt['datasets']['train']
    assert data['dataroot_gt'].startswith('datasets/DIV2K/' if arch == 'PFT_light' else 'datasets/DF2K/')
    assert data['gt_size'] == 64 * scale
    if scale == 2:
        assert path_opt['pretrain_network_g'] is None and train['total_iter'] == 500_000
        assert train['optim_g']['lr'] == (5e-4 if arch == 'PFT_light' else 2e-4)
    else:  # fine-tuned from the x2 release; the differently shaped head is dropped
        assert path_opt['pretrain_network_g'] == f'experiments/pretrained_models/{CHECKPOINTS[(arch, 2)]}'
        assert path_opt['strict_load_g'] is False and train['total_iter'] == 250_000
        assert train['optim_g']['lr'] == 2e-4
