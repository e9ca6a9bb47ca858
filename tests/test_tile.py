"""Tiled inference (adasr.inference.tile): the tiles cover the image, the blend weights sum to 1, tiled equals
whole-image inference exactly for local models and within tolerance for a transformer, the automatic tile size
follows the memory rule, and AdaSRModel tiles when ``val.tile`` is set."""
import math
import os.path as osp

import numpy as np
import pytest
import torch
from basicsr.archs.swinir_arch import SwinIR
from torch import nn

from adasr.archs.bicubic_arch import Bicubic
from adasr.archs.interface import UNKNOWN_BYTES_PER_PIXEL, arch_traits
from adasr.inference import memory as memory_mod
from adasr.inference.memory import auto_tile_size, choose_tile, memory_per_pixel
from adasr.inference.tile import Span, blend_weights, make_tiles, padded_forward, tile_spans, tiled_forward

TINY_SWINIR = dict(upscale=4, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[2, 2], embed_dim=24,
                   num_heads=[2, 2], mlp_ratio=2, upsampler='pixelshuffledirect', resi_connection='1conv')


def _coverage(spans, length, scale):
    total = torch.zeros(length * scale, dtype=torch.float64)
    for s, w in zip(spans, blend_weights(spans, scale, torch.float64)):
        total[s.win_start * scale:s.win_end * scale] += w
    return total


@pytest.mark.parametrize('length,tile,pad,multiple', [
    (101, 20, 8, 1), (77, 16, 4, 1), (300, 64, 32, 8), (95, 32, 5, 8), (1080, 256, 32, 8), (33, 32, 16, 32),
    (100, 10, 0, 1), (64, 16, 30, 1), (1920, 512, 32, 32)])
def test_spans_partition_align_and_weights_sum_to_one(length, tile, pad, multiple):
    spans = tile_spans(length, tile, pad, multiple)
    assert spans[0].start == 0 and spans[-1].end == length
    assert all(a.end == b.start for a, b in zip(spans[:-1], spans[1:]))  # cores partition the axis
    assert all(s.end - s.start <= max(tile, multiple) + multiple for s in spans)
    for s in spans:
        assert s.win_start % multiple == 0 and s.start % multiple == 0
        assert s.win_end == length or (s.win_end - s.win_start) % multiple == 0
        assert s.win_start <= s.start < s.end <= s.win_end
    for scale in (1, 3, 4):
        total = _coverage(spans, length, scale)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12), (total.min(), total.max())


def test_weights_use_only_inner_context_and_ramp_smoothly():
    spans = tile_spans(200, 50, 16, 1)
    weights = blend_weights(spans, 4, torch.float64)
    for i, (s, w) in enumerate(zip(spans, weights)):
        if i > 0:  # nothing from the outer half of the context at an inner edge, full weight past the blend zone
            assert torch.all(w[:8 * 4] == 0)
            core0 = (s.start - s.win_start) * 4
            assert torch.all(w[core0 + 8 * 4:core0 + (s.end - s.start - 8) * 4] == 1)
        if i < len(spans) - 1:
            assert torch.all(w[-8 * 4:] == 0)
        assert torch.all(w >= 0) and torch.all(w <= 1)
        steps = w.diff().abs().max().item()
        assert steps < math.pi / 2 / (16 * 4) + 1e-9  # a raised cosine over 16 LR px: no step, no seam


def test_no_pad_cuts_at_core_boundaries():
    spans = tile_spans(40, 10, 0, 1)
    assert [(s.win_start, s.win_end) for s in spans] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    for w in blend_weights(spans, 2):
        assert torch.all(w == 1)


def test_tile_zero_or_large_is_one_span():
    assert tile_spans(50, 0, 8) == [Span(0, 50, 0, 50)]
    assert tile_spans(50, 64, 8) == [Span(0, 50, 0, 50)]
    with pytest.raises(ValueError, match='tile_pad'):
        tile_spans(50, 16, -1)


@pytest.mark.parametrize('size,tile,pad,multiple', [((77, 101), 16, 4, 1), ((64, 40), 20, 8, 1),
                                                    ((45, 83), 32, 4, 8), ((9, 7), 4, 4, 1)])
def test_bicubic_tiled_equals_whole_image(size, tile, pad, multiple):
    """MATLAB bicubic x4 reads 2 LR pixels around each output pixel: tile_pad >= 4 gives the whole-image result
    (to float rounding: the kernel weights of a tile are computed at other positions, so they differ in the ulp)."""
    net = Bicubic(upscale=4)
    x = torch.rand(2, 3, *size)
    whole = net(x)
    tiled = tiled_forward(net, x, 4, tile, pad, multiple)
    assert len(make_tiles(*size, tile, pad, multiple)) > 1
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-6
    # as 8-bit images: identical except where float rounding straddles a .5 boundary
    diff = ((tiled.clamp(0, 1) * 255).round() - (whole.clamp(0, 1) * 255).round()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-4


def test_bicubic_too_little_pad_is_detectably_different():
    net = Bicubic(upscale=4)
    x = torch.rand(1, 3, 40, 40)
    assert (tiled_forward(net, x, 4, 10, 0) - net(x)).abs().max().item() > 1e-2
    assert (tiled_forward(net, x, 4, 10, 2) - net(x)).abs().max().item() > 1e-5


class Pointwise(nn.Module):
    """A per-pixel network: 1x1 convs, then nearest upsampling."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return torch.nn.functional.interpolate(self.body(x), scale_factor=3, mode='nearest')


def test_pointwise_model_tiled_equals_whole_even_without_pad():
    net = Pointwise().eval()
    x = torch.rand(1, 3, 31, 45)
    with torch.no_grad():
        whole = net(x)
        for pad in (0, 3, 8):
            out = tiled_forward(net, x, 3, 8, pad)
            assert (out - whole).abs().max().item() < 1e-6


def _psnr(a, b):
    return 10 * math.log10(1 / ((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean().item())


@pytest.mark.slow
def test_swinir_tiled_close_to_whole_and_closer_with_more_pad(repo_root):
    net = SwinIR(**TINY_SWINIR).eval()
    import cv2

    img = cv2.imread(osp.join(repo_root, 'datasets', 'demo', 'val', 'HR', 'chelsea.png'))[:48, :56, ::-1]
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    fn = padded_forward(net, 4, arch_traits(net).window)
    assert arch_traits(net).window == 8
    with torch.no_grad():
        whole = fn(x)
        errors = {pad: (tiled_forward(fn, x, 4, 16, pad, 8) - whole).abs().max().item() for pad in (0, 8, 16)}
    assert errors[0] > 1e-2  # hard cuts without context are visibly wrong ...
    assert errors[16] < errors[8] < errors[0]  # ... and more context converges to the whole-image output
    assert errors[16] < 1e-4
    tiled = tiled_forward(fn, x, 4, 16, 16, 8)
    assert _psnr(tiled, whole) > 80


def test_on_tile_sees_every_tile_once():
    seen = []
    x = torch.rand(1, 3, 30, 50)
    tiled_forward(Bicubic(upscale=2), x, 2, 12, 4, on_tile=lambda t, y: seen.append((t.index, tuple(y.shape))))
    tiles = make_tiles(30, 50, 12, 4)
    assert [i for i, _ in seen] == list(range(len(tiles)))
    for (_, shape), t in zip(seen, tiles):
        assert shape[-2:] == (2 * (t.y.win_end - t.y.win_start), 2 * (t.x.win_end - t.x.win_start))


def test_wrong_output_size_is_reported():
    with pytest.raises(RuntimeError, match='expected'):
        tiled_forward(Bicubic(upscale=2), torch.rand(1, 3, 20, 20), 4, 8, 4)


def test_choose_tile_rule():
    kib = 1024
    # fits: whole image
    assert choose_tile(100, 100, 10 * kib, 10 * kib * 100 * 100, 16, 8) == 0
    # a 2 GiB budget at 12 KiB/px: window side sqrt(2 GiB / 12 KiB) = 418 -> core 418 - 64 = 354 -> 352 (multiple 8)
    assert choose_tile(1080, 1920, 12 * kib, 2 * 1024 ** 3, 32, 8) == 352
    # the canvas is paid first
    assert choose_tile(1080, 1920, 12 * kib, 2 * 1024 ** 3, 32, 8, fixed_bytes=1024 ** 3) == (
        (int(math.sqrt(1024 ** 3 / (12 * kib))) - 64) // 8 * 8)
    # never below min_window (AdaFormer keeps windows >= 272 px), the multiple, or the pad
    tile = choose_tile(1080, 1920, 12 * kib, 10 * kib, 32, 8, min_window=272)
    windows = [s.win_end - s.win_start for n in (1080, 1920) for s in tile_spans(n, tile, 32, 8)]
    assert min(windows) >= 272 and tile == 272  # 240 would leave 248 px edge windows on the 1080 side
    assert choose_tile(200, 300, 12 * kib, 10 * kib, 32, 8, min_window=272) == 0  # no tiling keeps 272 px here
    assert choose_tile(1080, 1920, 12 * kib, 10 * kib, 5, 32) == 32


def test_auto_tile_size_from_memory(monkeypatch):
    net = SwinIR(**TINY_SWINIR)
    bpp, min_window, source = memory_per_pixel(net)
    assert bpp == pytest.approx(150.0 * TINY_SWINIR['embed_dim']) and 'SwinIR' in source
    assert memory_per_pixel(Pointwise())[0] == UNKNOWN_BYTES_PER_PIXEL
    monkeypatch.setattr(memory_mod, 'available_memory', lambda device: 64 * 1024 ** 3)
    assert memory_mod.memory_budget('cpu') == memory_mod.DEFAULT_CPU_BUDGET
    assert memory_mod.memory_budget('cpu', max_memory=1024 ** 3) == 1024 ** 3
    monkeypatch.setattr(memory_mod, 'available_memory', lambda device: 1024 ** 3)
    assert memory_mod.memory_budget('cpu') == 1024 ** 3 // 2  # half of what is available
    tile, why = auto_tile_size(net, net, 64, 64, 4, tile_pad=16, multiple=8)
    assert tile == 0 and why.startswith('whole image')
    tile, why = auto_tile_size(net, net, 2000, 3000, 4, tile_pad=16, multiple=8, max_memory=512 * 1024 ** 2)
    canvas = 2.0 * 4 * 3 * 2000 * 3000 * 16
    usable = 512 * 1024 ** 2 - canvas
    assert usable < 0 and tile == 16  # the canvas alone exceeds the budget: smallest tile
    tile, _ = auto_tile_size(net, net, 600, 800, 4, tile_pad=16, multiple=8, max_memory=512 * 1024 ** 2)
    expect = choose_tile(600, 800, bpp, 512 * 1024 ** 2, 16, 8, 0, 2.0 * 4 * 3 * 600 * 800 * 16)
    assert tile == expect and 0 < tile < 600


def test_adasr_model_val_tile_matches_whole_image(tmp_path):
    from basicsr.models import build_model

    def opt(val):
        return {'name': 'tiled', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'is_train': False,
                'dist': False, 'rank': 0, 'world_size': 1, 'network_g': {'type': 'SwinIR', **TINY_SWINIR},
                'path': {'pretrain_network_g': None, 'results_root': str(tmp_path), 'visualization': str(tmp_path)},
                'val': val}

    whole_model = build_model(opt({'save_img': False}))
    tiled_model = build_model(opt({'save_img': False, 'tile': 24, 'tile_pad': 16}))
    tiled_model.net_g.load_state_dict(whole_model.net_g.state_dict())
    lq = torch.rand(1, 3, 50, 61)
    outs = []
    for model in (whole_model, tiled_model):
        model.feed_data({'lq': lq})
        model.test()
        outs.append(model.output)
    assert outs[0].shape == outs[1].shape == (1, 3, 200, 244)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-3
    assert _psnr(outs[0], outs[1]) > 70


def test_a_failed_test_call_leaves_the_training_network_in_training_mode(tmp_path):
    """AdaSRModel.test puts the network in eval mode for the forward; an error inside (out of memory, an image the
    network refuses) must not leave a network being trained in eval mode (dropout, batch statistics)."""
    from basicsr.models import build_model

    model = build_model({'name': 'x', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'is_train': False,
                         'dist': False, 'rank': 0, 'world_size': 1, 'network_g': {'type': 'SwinIR', **TINY_SWINIR},
                         'path': {'pretrain_network_g': None, 'results_root': str(tmp_path),
                                  'visualization': str(tmp_path)}, 'val': {'save_img': False}})
    model.net_g.train()
    model.feed_data({'lq': torch.rand(1, 3, 16, 16)})

    def fails(net, lq):
        assert not net.training  # the forward runs in eval mode
        raise RuntimeError('out of memory')

    model.inference = fails
    with pytest.raises(RuntimeError, match='out of memory'):
        model.test()
    assert model.net_g.training
    del model.inference
    model.test()
    assert model.net_g.training and model.output.shape == (1, 3, 64, 64)


@pytest.mark.parametrize('model_type,net', [('AdaSRModel', {'type': 'Bicubic', 'upscale': 4}),
                                             ('AdaFormerModel', {'type': 'AdaFormer', 'upscale': 4})])
def test_val_tile_keys_pass_the_option_checker(model_type, net):
    """Also for subclasses that declare their own val keys (AdaFormerModel: eps_h, save_halting)."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from adasr.cli.options import OptionsError, check_options

    assert model_type in MODEL_REGISTRY
    opt = {'name': 'x', 'model_type': model_type, 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 't', 'type': 'PairedSRDataset', 'dataroot_gt': 'a', 'dataroot_lq': 'b',
                                   'io_backend': {'type': 'disk'}}},
           'network_g': net, 'path': {'pretrain_network_g': None},
           'val': {'save_img': False, 'tile': 128, 'tile_pad': 16}}
    check_options(opt, is_train=False, check_paths=False)
    opt['val']['tiles'] = 3
    with pytest.raises(OptionsError, match="unknown key 'tiles' in val.*did you mean 'tile'"):
        check_options(opt, is_train=False, check_paths=False)
    del opt['val']['tiles']
    opt['val']['tile_pad'] = -8
    with pytest.raises(OptionsError, match=r'val.tile_pad must be a non-negative integer'):
        check_options(opt, is_train=False, check_paths=False)  # before any training or testing starts
