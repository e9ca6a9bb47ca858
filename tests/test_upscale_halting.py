"""AdaFormer with the upscaler: halting pictures from the CLI, and tiles that keep the halting record whole."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
import yaml

from adasr.archs.adaformer_arch import AdaFormer
from adasr.cli.upscale import main
from adasr.inference.halting import HaltingCollector
from adasr.inference.tile import tiled_forward

TINY = dict(upscale=2, n_feats=16, embed_dim=16, n_resblocks=2, depths=3, num_heads=2, num_prototypes=4,
            window_size=8, eps_h=0.05)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = AdaFormer(**TINY)
    with torch.no_grad():  # make the estimator confident enough that some tokens halt after one or two blocks
        net.body.var[2].bias.fill_(0.3)
    return net.eval()


def photo(h, w, repo_root):
    img = cv2.imread(os.path.join(repo_root, 'datasets', 'demo', 'val', 'HR', 'chelsea.png'))
    return np.ascontiguousarray(img[40:40 + h, 50:50 + w])


def test_tiled_halting_record_matches_whole_image(repo_root):
    net = tiny_net()
    img = photo(64, 80, repo_root)
    x = torch.from_numpy(img[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        whole = net(x)
        ref = net.last_halting
        collector = HaltingCollector(net, 64, 80)
        tiled = tiled_forward(net, x, 2, 32, 16, 8, on_tile=collector)
    info = collector.to_info()
    assert info.input_size == info.padded_size == (64, 80)
    assert len(info.global_keep) == 3 and info.global_keep[0].shape == (1, 1, 64, 80)
    for key in ('confidence', 'global_keep', 'local_keep'):
        for a, b in zip(getattr(info, key), ref.crop(getattr(ref, key))):
            assert a.shape == b.shape
            if key == 'confidence':
                assert (a - b).abs().max().item() < 0.05  # features differ a little near seams
            else:
                assert (a != b).float().mean().item() < 0.05  # few halting decisions flip
    halted = info.sparsity['global_by_mask']
    assert halted[0] < halted[-1] and 0 < halted[-1] <= 1
    assert (tiled - whole).abs().max().item() < 0.05


def test_save_halting_pictures_from_the_cli(tmp_path, repo_root):
    net = tiny_net()
    torch.save({'params': net.state_dict()}, tmp_path / 'w.pth')
    opt = {'scale': 2, 'network_g': {'type': 'AdaFormer', **TINY}}
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump(opt))
    cv2.imwrite(str(tmp_path / 'cat.png'), photo(40, 56, repo_root))
    status = main(['-i', str(tmp_path / 'cat.png'), '-o', str(tmp_path / 'out'), '--opt', str(tmp_path / 'opt.yml'),
                   '--weights', str(tmp_path / 'w.pth'), '--save-halting', '--tile', '24', '--tile_pad', '8', '-q'])
    assert status == 0
    assert cv2.imread(str(tmp_path / 'out' / 'cat_out.png')).shape == (80, 112, 3)
    folder = tmp_path / 'out' / 'halting' / 'cat'
    names = sorted(os.listdir(folder))
    assert names == sorted([f'layer{i}_{k}.png' for i in range(3) for k in ('confidence', 'global', 'local')]
                           + ['halting.json', 'overview.png', 'sparsity.png'])
    assert cv2.imread(str(folder / 'overview.png')).shape[0] > 300
    for i in range(3):
        for kind in ('confidence', 'global', 'local'):
            pic = cv2.imread(str(folder / f'layer{i}_{kind}.png'))
            assert pic.shape == (40, 56, 3)
    summary = json.loads((folder / 'halting.json').read_text())
    assert summary['layers'] == 3
    for key in ('mean_confidence', 'global_halted', 'local_halted'):
        assert len(summary[key]) == 3 and all(0 <= v <= 1 for v in summary[key])
    assert summary['global_halted'][0] < summary['global_halted'][-1]
    # the global overlay is the photo where tokens are kept and red-tinted where they halted
    keep = summary['global_halted'][1]
    g1 = cv2.imread(str(folder / 'layer1_global.png')).astype(int)
    src = cv2.imread(str(tmp_path / 'cat.png')).astype(int)
    same = (np.abs(g1 - src).max(axis=2) <= 1).mean()
    assert same == pytest.approx(1 - keep, abs=0.02)
    assert cv2.imread(str(folder / 'sparsity.png')).shape[0] > 100
    # a run stopped between the image and its pictures: the re-run redoes the image instead of skipping it
    import shutil

    shutil.rmtree(folder)
    assert main(['-i', str(tmp_path / 'cat.png'), '-o', str(tmp_path / 'out'), '--opt', str(tmp_path / 'opt.yml'),
                 '--weights', str(tmp_path / 'w.pth'), '--save-halting', '-q']) == 0
    assert (folder / 'halting.json').exists() and (folder / 'overview.png').exists()


def test_pictures_get_complete_maps(monkeypatch, tmp_path, repo_root):
    """Sparse eval skips the estimator on windows that can no longer change a decision (their confidence is not
    computed); pictures ask for complete maps through the interface: the same SR and decisions, every token scored."""
    from adasr.archs.interface import halting_record, set_complete_halting_maps

    net = tiny_net()
    with torch.no_grad():
        net.body.var[2].bias.fill_(20.0)  # everything halts after block 0: later maps are skipped
    img = photo(64, 80, repo_root)
    x = torch.from_numpy(img[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        fast = net(x)
        skipped = halting_record(net)
        set_complete_halting_maps(net)
        full = net(x)
        complete = halting_record(net)
    assert not all(skipped.complete) and all(complete.complete)
    assert torch.equal(fast, full)
    for a, b in zip(skipped.global_keep + skipped.local_keep, complete.global_keep + complete.local_keep):
        assert torch.equal(a, b)
    # the CLI's --save-halting asks for them
    asked = []
    monkeypatch.setattr(AdaFormer, 'set_complete_halting_maps', lambda self, value: asked.append(value))
    torch.save({'params': tiny_net().state_dict()}, tmp_path / 'w.pth')
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump({'scale': 2, 'network_g': {'type': 'AdaFormer', **TINY}}))
    cv2.imwrite(str(tmp_path / 'cat.png'), photo(24, 24, repo_root))
    assert main(['-i', str(tmp_path / 'cat.png'), '-o', str(tmp_path / 'out'), '--opt', str(tmp_path / 'opt.yml'),
                 '--weights', str(tmp_path / 'w.pth'), '--save-halting', '-q']) == 0
    assert asked == [True]
