"""HAT and ATD baselines (spandrel's networks under adasr's validated constructors): registry, the authors'
standard configurations, checkpoint layout, padding through the model class, round trips and reference outputs."""
import os.path as osp

import numpy as np
import pytest
import spandrel
import torch
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from torch.nn import functional as F

from adasr.archs.baselines_arch import ATD, HAT
from adasr.archs.interface import arch_traits
from adasr.archs.layers import symmetric_pad
from adasr.cli.options import OptionsError, check_network_opt, load_yaml
from adasr.models.adasr_model import AdaSRModel
from adasr.utils.checkpoint import CheckpointError, load_weights
from tests.helpers import baseline_fixtures as fixtures

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = fixtures.TINY

# The papers' parameter counts (HAT: Table 8 / README; ATD: Tables 2-3), and the option files with those configs.
STANDARD = {
    'options/test/test_HAT-S_x4.yml': ('HAT', 9_621_183, 'HAT-S 9.6M'),
    'options/test/test_HAT_x4.yml': ('HAT', 20_772_507, 'HAT 20.8M'),
    'options/test/test_ATD_light_x4.yml': ('ATD', 768_792, 'ATD-light 769K'),
    'options/test/test_ATD_x4.yml': ('ATD', 20_260_929, 'ATD 20.3M'),
}


def test_registered_under_their_own_names():
    assert ARCH_REGISTRY.get('HAT') is HAT and ARCH_REGISTRY.get('ATD') is ATD
    assert all(arch_traits(_tiny(name)).pads_input for name in ('HAT', 'ATD'))
    assert ARCH_REGISTRY.get('SwinIR').__module__ == 'basicsr.archs.swinir_arch'  # basicsr's own entries untouched


@pytest.mark.parametrize('path', sorted(STANDARD))
def test_standard_configs_match_the_papers_and_the_official_layout(path, monkeypatch):
    """The option files' networks have the published parameter counts, and spandrel's loader (built and tested on
    the authors' released checkpoints) recognises the state dict, infers the same hyperparameters and loads it
    strictly: the key names and shapes are the official ones."""
    import spandrel.architectures.ATD.__arch.atd_arch as atd_module
    import spandrel.architectures.HAT.__arch.HAT as hat_module

    for module in (atd_module, hat_module):  # initial values do not matter here; truncated-normal init is slow
        monkeypatch.setattr(module, 'trunc_normal_', lambda tensor, **kwargs: tensor)
    arch, n_params, label = STANDARD[path]
    net_opt = dict(load_yaml(osp.join(REPO, path))['network_g'])
    net = build_network(dict(net_opt))
    assert type(net).__name__ == arch
    assert sum(p.numel() for p in net.parameters()) == n_params, label
    state = net.state_dict()
    assert not any(k == 'mean' or k.endswith('.mean') for k in state)  # the mean is a non-persistent buffer
    desc = spandrel.ModelLoader().load_from_state_dict(dict(state))  # strict load_state_dict inside
    assert desc.architecture.id == arch
    hp = desc.model.hyperparameters
    for key, value in net_opt.items():
        if key in ('type', 'img_size'):
            continue  # img_size cannot be inferred from a state dict (it does not change the weights)
        expected = list(value) if isinstance(value, (list, tuple)) else value
        assert hp[key] == expected, f'{label}: {key} inferred as {hp[key]!r}, option file says {value!r}'


def _tiny(name):
    return fixtures.seeded_net(TINY[name])


@pytest.mark.parametrize('name', ['HAT', 'ATD'])
def test_tiny_reference_outputs(name):
    ref = torch.load(osp.join(REPO, 'tests', 'data', 'baselines_tiny.pt'), weights_only=True)[name]
    assert ref['network_g'] == TINY[name]
    net = fixtures.seeded_net(ref['network_g'], ref['seed'])
    with torch.no_grad():
        out = net(ref['input'])
    # Tolerance relative to the output's scale (HAT's tiny net reaches ~195): float summation order differs between
    # ISAs (AVX2, AVX-512) and thread counts by ~1e-6 of the scale; a wrong port is off by O(scale).
    scale = float(ref['output'].abs().max())
    torch.testing.assert_close(out, ref['output'], atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize('name', ['HAT', 'ATD'])
def test_same_numbers_as_spandrel_loaded_from_our_state_dict(name):
    net = _tiny(name)
    other = spandrel.ModelLoader().load_from_state_dict(dict(net.state_dict())).model.eval()
    if name == 'ATD':
        other.category_size = 256  # spandrel guesses category_size from the width; the tiny config sets it
        for blk in other.layers:
            for layer in blk.residual_group.layers:
                layer.attn_aca.category_size = 256
    x = fixtures.demo_input()
    with torch.no_grad():
        torch.testing.assert_close(net(x), other(x), atol=1e-6, rtol=0)


def _model(net_opt):
    opt = {'is_train': False, 'num_gpu': 0, 'dist': False, 'scale': net_opt['upscale'], 'rank': 0, 'world_size': 1,
           'network_g': dict(net_opt), 'path': {'pretrain_network_g': None}, 'val': {}}
    return AdaSRModel(opt)


@pytest.mark.parametrize('name, pad', [('HAT', 'reflect'), ('ATD', 'symmetric')])
def test_odd_size_input_through_the_model_class_pads_like_the_authors(name, pad):
    """An odd-size LR through AdaSRModel.test equals the authors' procedure: pad the LR to a multiple of the
    window (HAT's model class reflect-pads; ATD's forward mirror-pads with the edge repeated), run, crop."""
    model = _model(TINY[name])
    seeded = fixtures.seeded_net(TINY[name])
    model.net_g.load_state_dict(seeded.state_dict())
    x = fixtures.demo_input()[..., :7, :10]
    model.feed_data({'lq': x})
    model.test()
    padded = F.pad(x, (0, 2, 0, 1), mode='reflect') if pad == 'reflect' else symmetric_pad(x, 1, 2)
    with torch.no_grad():
        expected = seeded(padded)[..., :28, :40]
    assert model.output.shape == (1, 3, 28, 40)
    torch.testing.assert_close(model.output, expected, atol=1e-6, rtol=0)
    # and the padding matters: zero padding gives another result
    with torch.no_grad():
        other = seeded(F.pad(x, (0, 2, 0, 1)))[..., :28, :40]
    assert (other - expected).abs().max() > 1e-3


@pytest.mark.parametrize('name, mode', [('HAT', 'reflect'), ('ATD', 'symmetric')])
def test_inputs_smaller_than_the_window(name, mode):
    """A pad larger than the image (3 rows on a 1-row image, 3 columns on 2: F.pad and the authors' flip-concat
    cannot): the output is the network's on the input mirror-padded as NumPy's ``np.pad`` continues the mirror
    (reflect for HAT, edge repeated for ATD), cropped."""
    net = _tiny(name)
    for h, w in ((1, 3), (2, 1), (3, 2)):
        x = fixtures.demo_input()[..., :h, :w]
        padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (0, -h % 4), (0, -w % 4)), mode=mode))
        with torch.no_grad():
            y, expected = net(x), net(padded)[..., :4 * h, :4 * w]
        assert y.shape == (1, 3, 4 * h, 4 * w)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['HAT', 'ATD'])
def test_strict_round_trip_and_every_parameter_trains(name, tmp_path):
    net = _tiny(name).train()
    x = fixtures.demo_input()
    net(x).abs().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    torch.save({'params': net.state_dict()}, tmp_path / 'net.pth')
    fresh = build_network(dict(TINY[name])).eval()
    load_weights(fresh, str(tmp_path / 'net.pth'))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), atol=0, rtol=0)
    wider = build_network(dict(TINY[name], embed_dim=16))
    with pytest.raises(CheckpointError, match=r'conv_first.weight \(12, 3, 3, 3\) vs \(16, 3, 3, 3\)'):
        load_weights(wider, str(tmp_path / 'net.pth'))


def test_mean_follows_device_and_dtype():
    net = _tiny('HAT').double()
    assert net.mean.dtype == torch.float64
    y = net(fixtures.demo_input().double())
    assert y.dtype == torch.float64


@pytest.mark.parametrize('opt, message', [
    ({'type': 'HAT', 'embed_dim': 12, 'depths': [1], 'num_heads': [5]},
     'embed_dim 12 must be divisible by every num_heads entry'),
    ({'type': 'HAT', 'depths': [6, 6], 'num_heads': [6]}, r'depths \(2 stages\) and num_heads \(1\)'),
    ({'type': 'HAT', 'upsampler': 'pixelshuffledirect'}, "upsampler='pixelshuffledirect' is not supported"),
    ({'type': 'HAT', 'upscale': 5}, 'upscale=5 is not supported'),
    ({'type': 'HAT', 'overlap_ratio': 1.0}, r'overlap_ratio must be in \[0, 1\)'),
    ({'type': 'ATD', 'window_size': 15}, 'window_size must be even'),
    ({'type': 'ATD', 'upsampler': 'nearest+conv', 'upscale': 2}, "'nearest\\+conv' supports upscale 4 only"),
    ({'type': 'ATD', 'convffn_kernel_size': 4}, 'convffn_kernel_size must be odd'),
])
def test_bad_hyperparameters_are_named(opt, message):
    with pytest.raises(ValueError, match=message):
        build_network(dict(opt))


def test_unknown_yaml_keys_are_rejected_by_the_option_check():
    with pytest.raises(OptionsError, match="unknown key 'use_checkpoint' in network_g \\(ATD\\)"):
        check_network_opt({'type': 'ATD', 'use_checkpoint': True})
    with pytest.raises(OptionsError, match="unknown key 'windows_size'.*did you mean 'window_size'"):
        check_network_opt({'type': 'HAT', 'windows_size': 16})
