"""ONNX export (adasr.inference.onnx_export, adasr-export): every arch's graph, run by onnxruntime on crops of a
bundled demo photo, matches the PyTorch eval forward within 1e-3 (0..1 range). Tiny configurations keep the exports
short; graphs with dynamic height and width are checked at two sizes."""
import os.path as osp

import numpy as np
import onnxruntime  # noqa: F401 - a declared dependency: a broken install fails here, never skips
import onnxscript  # noqa: F401 - a declared dependency: a broken install fails here, never skips
import pytest
import torch
import yaml
from basicsr.archs import build_network

from adasr.archs.bicubic_arch import Bicubic
from adasr.cli.export import main
from adasr.inference.onnx_export import OnnxRunner, compare, export_onnx
from adasr.inference.tile import padded_forward
from adasr.utils.image_io import read_image
from tests.conftest import REPO

PHOTO = osp.join(REPO, 'datasets', 'demo', 'val', 'LR_bicubic', 'X2', 'chelsea.png')
TOLERANCE = 1e-3


def photo_crop(h: int, w: int, top: int = 30, left: int = 20) -> torch.Tensor:
    """(1, 3, h, w) float32 crop of a real photo (0..1)."""
    color = read_image(PHOTO).color[top:top + h, left:left + w]
    return torch.from_numpy(np.ascontiguousarray(color.transpose(2, 0, 1)))[None]


def export_and_compare(tmp_path, net_opt: dict, sizes, fixed: bool = False, multiple=None):
    """Export ``network_g`` (random weights) dynamic (or fixed at sizes[0]), run onnxruntime on photo crops of
    ``sizes`` and return (net, comparisons)."""
    torch.set_num_threads(1)
    net = build_network(dict(net_opt)).eval()
    path = str(tmp_path / f'{net_opt["type"]}.onnx')
    result = export_onnx(net, path, net_opt['upscale'], size=sizes[0] if fixed else None, multiple=multiple)
    assert result.bytes == osp.getsize(path) and result.dynamic == (not fixed)
    runner = OnnxRunner(path, threads=1)
    fn = padded_forward(net, net_opt['upscale'], multiple or 1)
    out = []
    for h, w in sizes:
        cmp = compare(fn, runner, photo_crop(h, w))
        assert cmp.max_abs <= TOLERANCE, (net_opt['type'], (h, w), cmp)
        assert cmp.psnr > 60, (net_opt['type'], (h, w), cmp)
        out.append(cmp)
    return net, out


@pytest.mark.slow
def test_adaformer_halting_and_global_split(tmp_path):
    """Partial halting (eps_h 0.5 on random weights), and the eval global split computed in the graph: 2 at a
    72 x 80 crop, 1 at 45 x 37 (one dynamic graph)."""
    opt = dict(type='AdaFormer', upscale=2, n_feats=16, embed_dim=16, n_resblocks=2, depths=2, num_heads=2,
               num_prototypes=4, window_size=8, eps_h=0.5)
    net, _ = export_and_compare(tmp_path, opt, [(72, 80), (45, 37)])
    with torch.no_grad():
        net(photo_crop(72, 80))
    record = net.last_halting
    assert record.eval_global_split == 2 and record.mode == 'sparse'
    kept = [float(g.mean()) for g in record.global_keep]
    assert 0 < kept[0] < 1, kept  # some tokens halted after the first block, some did not


@pytest.mark.slow
def test_pft_progressive_topk(tmp_path):
    """Dense layers, then top-k layers that inherit and shrink their parity's key set (64 -> 32 -> 16)."""
    opt = dict(type='PFT', upscale=2, embed_dim=16, depths=[6], num_heads=2, window_size=8,
               convffn_kernel_size=3, mlp_ratio=1, upsampler='pixelshuffledirect', num_topk=[64, 64, 32, 32, 16, 16])
    export_and_compare(tmp_path, opt, [(29, 35), (40, 24)])


@pytest.mark.slow
def test_cli_bicubic(tmp_path, capsys):
    """adasr-export end to end: dynamic graph, checked on a crop of the photo; then the same file at another size."""
    path = str(tmp_path / 'bicubic_x3.onnx')
    assert main(['--arch', 'Bicubic', '--scale', '3', '-o', path, '--check-image', PHOTO, '--check-size', '29', '35',
                 '--threads', '1']) == 0
    out = capsys.readouterr().out
    assert 'dynamic height and width' in out and ': ok' in out, out
    cmp = compare(Bicubic(upscale=3), OnnxRunner(path, threads=1), photo_crop(7, 5))
    assert cmp.max_abs <= TOLERANCE, cmp


def test_cli_refuses_untrained_network_without_random_weights(tmp_path, capsys):
    assert main(['--arch', 'PFT', '--scale', '2', '-o', str(tmp_path / 'x.onnx')]) == 2
    assert '--random-weights' in capsys.readouterr().err
    assert not (tmp_path / 'x.onnx').exists()


def test_cli_checks_the_output_before_building_anything(tmp_path, capsys):
    """An existing output is kept unless --overwrite; the checkpoint being read is never the output; a folder, a
    missing folder: named before the network is built (exit status 2)."""
    weights = tmp_path / 'w.pth'
    weights.write_bytes(b'checkpoint bytes')
    existing = tmp_path / 'old.onnx'
    existing.write_bytes(b'old graph')
    cases = [(['--weights', str(weights), '-o', str(weights), '--overwrite'], 'is the --weights file'),
             (['--arch', 'Bicubic', '--scale', '2', '-o', str(existing)], 'pass --overwrite'),
             (['--arch', 'Bicubic', '--scale', '2', '-o', str(tmp_path)], 'is a folder'),
             (['--arch', 'Bicubic', '--scale', '2', '-o', str(tmp_path / 'nope' / 'x.onnx')], 'does not exist')]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err, argv
    assert weights.read_bytes() == b'checkpoint bytes' and existing.read_bytes() == b'old graph'
    assert main(['--arch', 'Bicubic', '--scale', '2', '-o', str(existing), '--overwrite', '--no-check']) == 0
    assert existing.read_bytes() != b'old graph'


def test_cli_refuses_before_exporting_what_it_cannot_honour(tmp_path, capsys):
    """The option file's own checkpoint is never the output; a NaN tolerance, a check size that a fixed-size graph
    cannot take, an opset below 18 (the exporter writes nothing older), negative threads: usage errors before
    anything is built; an option file whose scale is not the network's (SwinIR without upscale is x2) is named."""
    weights = tmp_path / 'w.pth'
    weights.write_bytes(b'checkpoint bytes')
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'scale': 2, 'network_g': {'type': 'Bicubic', 'upscale': 2},
                                   'path': {'pretrain_network_g': str(weights)}}))
    base = ['--arch', 'Bicubic', '--scale', '2']
    for argv, words in ((['--opt', str(opt), '-o', str(weights), '--overwrite'], 'path.pretrain_network_g file'),
                        ([*base, '-o', str(tmp_path / 'a.onnx'), '--tolerance', 'nan'], 'positive number, got nan'),
                        ([*base, '-o', str(tmp_path / 'a.onnx'), '--size', '16', '16', '--check-size', '20', '24'],
                         'takes only that size'),
                        ([*base, '-o', str(tmp_path / 'a.onnx'), '--opset', '7', '--no-check'],
                         '--opset 7: the exporter writes opset 18 or later'),
                        ([*base, '-o', str(tmp_path / 'a.onnx'), '--threads', '-3'], '--threads must be 0')):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and words in capsys.readouterr().err, argv
    assert weights.read_bytes() == b'checkpoint bytes' and not (tmp_path / 'a.onnx').exists()
    noup = tmp_path / 'noup.yml'
    noup.write_text(yaml.safe_dump({'scale': 4, 'network_g': {'type': 'SwinIR', 'img_size': 16, 'window_size': 8,
                                                              'depths': [1], 'embed_dim': 12, 'num_heads': [2],
                                                              'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect'}}))
    assert main(['--opt', str(noup), '--random-weights', '-o', str(tmp_path / 'a.onnx')]) == 2
    assert 'the network built is x2, but x4 was given' in capsys.readouterr().err
    assert not (tmp_path / 'a.onnx').exists()


@pytest.mark.slow
def test_swinir_harness_padding(tmp_path):
    """basicsr's SwinIR does not pad itself: the graph includes the harness's reflect padding to the window."""
    opt = dict(type='SwinIR', upscale=2, in_chans=3, img_size=16, window_size=8, img_range=1., depths=[2],
               embed_dim=12, num_heads=[2], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')
    export_and_compare(tmp_path, opt, [(29, 35)], fixed=True, multiple=8)


@pytest.mark.slow
def test_hat(tmp_path):
    opt = dict(type='HAT', upscale=2, window_size=8, depths=[2], embed_dim=12, num_heads=[2], compress_ratio=3,
               squeeze_factor=6)
    export_and_compare(tmp_path, opt, [(29, 35)], fixed=True)


@pytest.mark.slow
def test_atd(tmp_path):
    """ATD sorts tokens by category (many ties): the graph sorts stably, and is compared with PyTorch sorting
    stably (its default sort orders ties as its implementation pleases)."""
    opt = dict(type='ATD', upscale=2, window_size=8, depths=[2], embed_dim=12, num_heads=[2], category_size=32,
               num_tokens=8, reducted_dim=4, upsampler='pixelshuffledirect')
    _, (cmp,) = export_and_compare(tmp_path, opt, [(29, 35)], fixed=True)
    assert cmp.max_abs < 1e-5, cmp  # the same ties: float rounding only
