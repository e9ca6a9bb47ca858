"""spandrel support: PFT and AdaFormer detected from their state dicts (round trips for the released and our own
configurations), official file layouts, other archs not claimed, and any spandrel model as a harness network
(``type: Spandrel``) and as ``adasr-upscale --weights`` alone."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from spandrel import MAIN_REGISTRY, ArchRegistry, ModelLoader, ModelTiling, UnsupportedDtypeError
from spandrel.architectures.DAT import DAT
from spandrel.architectures.SAFMN import SAFMN
from spandrel.architectures.SPAN import SPAN
from spandrel.architectures.SwinIR import SwinIR as SpandrelSwinIR

from adasr.archs import spandrel_support as ss
from adasr.archs.adaformer_arch import AdaFormer
from adasr.archs.interface import arch_traits, halting_record, is_adaptive
from adasr.archs.pft_arch import PFT
from adasr.cli.options import OptionsError, check_options, load_yaml
from adasr.cli.upscale import main as upscale_main
from adasr.inference.tile import padded_forward
from adasr.utils.checkpoint import CheckpointError
from tests.helpers.baseline_fixtures import TINY as BASELINE_TINY

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PHOTO = osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png')
PFT_RELEASES = [f'PFT{kind}_x{s}' for kind in ('_light', '') for s in (2, 3, 4)]

# our own configurations, off the released ones in every detectable way
PFT_SMALL = dict(upscale=3, in_chans=3, img_size=64, embed_dim=24, depths=[2, 3], num_heads=4,
                 num_topk=[64, 64, 16, 16, 16], window_size=8, convffn_kernel_size=3, img_range=1.0, mlp_ratio=1.5,
                 qkv_bias=False, patch_norm=False, upsampler='pixelshuffle', resi_connection='3conv',
                 use_checkpoint=False)
PFT_PER_HEAD = dict(upscale=2, in_chans=1, img_size=64, embed_dim=104, depths=[1, 1], num_heads=8, num_topk=[16, 4],
                    window_size=4, convffn_kernel_size=5, img_range=1.0, mlp_ratio=1.0, qkv_bias=True,
                    patch_norm=True, upsampler='pixelshuffledirect', resi_connection='1conv', use_checkpoint=False)
ADAFORMER_SMALL = dict(upscale=2, in_chans=1, n_feats=16, embed_dim=12, n_resblocks=2, depths=2, num_heads=3,
                       num_prototypes=4, window_size=4, mlp_ratio=1.5, eps_h=0.05, img_range=1.0, rgb_mean=[0.5],
                       res_scale=1.0, estimator_hidden=5, eval_global_split='auto', sparse_eval=True)


def released(name: str) -> dict:
    cfg = dict(load_yaml(osp.join(REPO, 'options', 'test', f'test_{name}.yml'))['network_g'])
    cfg.pop('type')
    return cfg


def photo(h: int, w: int, channels: int = 3) -> torch.Tensor:
    """(1, C, h, w) crop of a bundled demo photo in [0, 1] (RGB, or its first channel)."""
    img = cv2.imread(PHOTO)[60:60 + h, 80:80 + w, ::-1].astype(np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None, :channels].contiguous()


def assert_detected(detected: dict, cfg: dict) -> None:
    for key, value in cfg.items():
        got = detected[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, (key, got, value)


def assert_same_network(descriptor, net, cfg) -> None:
    """Same class, same constructor arguments and the same state dict: the same network."""
    assert type(descriptor.model) is type(net)
    assert_detected(descriptor.model.hyperparameters, cfg)
    mine, theirs = net.state_dict(), descriptor.model.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def assert_round_trip(descriptor, net, cfg, size=(9, 11), reference=None) -> torch.Tensor:
    """:func:`assert_same_network`, and the same output on a photo crop (``reference``: the net's, if known)."""
    assert_same_network(descriptor, net, cfg)
    x = photo(*size, channels=cfg['in_chans'])
    with torch.no_grad():
        reference = net.eval()(x) if reference is None else reference
        torch.testing.assert_close(descriptor.model.eval()(x), reference, rtol=0, atol=0)
    return reference


@pytest.mark.parametrize('name', PFT_RELEASES)
def test_released_pft_configs_round_trip(name):
    """All six releases; outputs are compared for PFT-light x4 and PFT x2 in the file test below (a 32x32 window
    of the classical PFT takes ~10 s on a busy 2-core CPU)."""
    cfg = released(name)
    net = PFT(**cfg)
    descriptor = MAIN_REGISTRY.load({'params_ema': net.state_dict()})  # the release's layout
    assert descriptor.architecture.id == 'PFT' and descriptor.scale == cfg['upscale']
    assert descriptor.size_requirements.none and descriptor.tiling == ModelTiling.SUPPORTED
    assert descriptor.supports_half and descriptor.supports_bfloat16
    assert_same_network(descriptor, net, cfg)


@pytest.mark.parametrize('cls, cfg', [(PFT, PFT_SMALL), (AdaFormer, ADAFORMER_SMALL)], ids=['pft', 'adaformer'])
def test_half_types_run(cls, cfg):
    """The half types the descriptors declare run on the CPU, finite and near fp32 (bf16: 8 mantissa bits)."""
    net = cls(**cfg).eval()
    descriptor = MAIN_REGISTRY.load(net.state_dict())
    x = photo(12, 12, channels=cfg['in_chans'])
    with torch.no_grad():
        reference = net(x).clamp(0, 1)
        for dtype in (torch.bfloat16, torch.float16):
            supported = descriptor.supports_bfloat16 if dtype == torch.bfloat16 else descriptor.supports_half
            if not supported:
                with pytest.raises(UnsupportedDtypeError):
                    descriptor.to(dtype)
                continue
            out = descriptor.to(dtype)(x.to(dtype)).float()  # spandrel's call
            descriptor.to(torch.float32)
            assert torch.isfinite(out).all() and (out - reference).abs().max() < 0.05, dtype


@pytest.mark.parametrize('cls, cfg', [(PFT, PFT_SMALL), (AdaFormer, ADAFORMER_SMALL)], ids=['pft', 'adaformer'])
def test_no_size_requirements_is_true(cls, cfg):
    """Declared: no size requirement (they pad themselves): any size down to 1x1 runs through spandrel's call."""
    descriptor = MAIN_REGISTRY.load(cls(**cfg).state_dict())
    assert descriptor.size_requirements.none
    s = cfg['upscale']
    for h, w in ((1, 1), (2, 3), (1, 9)):
        out = descriptor(torch.rand(1, cfg['in_chans'], h, w))
        assert out.shape == (1, cfg['in_chans'], h * s, w * s) and torch.isfinite(out).all()


def test_released_num_topk_rule_gives_the_released_schedules():
    for name in PFT_RELEASES:
        cfg = released(name)
        assert ss.released_num_topk(cfg['depths'], cfg['window_size']) == cfg['num_topk']
    assert ss.released_num_topk([2, 3], 8) == [64, 64, 16, 16, 16]


@pytest.mark.parametrize('cfg', [PFT_SMALL, PFT_PER_HEAD], ids=['pft_small', 'pft_per_head_bias'])
def test_own_pft_configs_round_trip(cfg):
    net = PFT(**cfg)
    descriptor = MAIN_REGISTRY.load(net.state_dict())
    assert_round_trip(descriptor, net, cfg, size=(7, 13))


def test_pft_heads_without_per_head_bias_follow_the_light_release():
    """embed_dim <= 100 shares one bias column: the heads are not in the state dict and PFT-light's 4 is used."""
    sd = PFT(**dict(PFT_SMALL, num_heads=2)).state_dict()
    assert ss.pft_hyperparameters(sd)['num_heads'] == 4
    odd = dict(PFT_SMALL, embed_dim=18, num_heads=3, resi_connection='1conv')
    assert ss.pft_hyperparameters(PFT(**odd).state_dict())['num_heads'] == 3  # the largest divisor up to 4


def test_adaformer_round_trips():
    cfg = released('AdaFormer_x4')
    net = AdaFormer(**cfg)
    descriptor = MAIN_REGISTRY.load({'params': net.state_dict()})
    assert descriptor.architecture.id == 'AdaFormer' and descriptor.scale == 4
    assert descriptor.tiling == ModelTiling.DISCOURAGED and descriptor.size_requirements.none
    assert descriptor.supports_bfloat16 and not descriptor.supports_half
    assert descriptor.model.hyperparameters['estimator_hidden'] == 32
    assert_round_trip(descriptor, net, cfg, size=(13, 10))
    small = AdaFormer(**ADAFORMER_SMALL)
    assert_round_trip(MAIN_REGISTRY.load(small.state_dict()), small, ADAFORMER_SMALL, size=(7, 9))


@pytest.mark.slow
def test_files_load_with_spandrels_model_loader(tmp_path):
    """PFT-light x4, PFT x2 and AdaFormer x4 saved by our networks, in the official layouts, give the same
    network and the same output."""
    for name in ('PFT_light_x4', 'PFT_x2'):
        net = PFT(**released(name))
        path = tmp_path / f'{name}.pth'
        torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, path)  # the release's layout
        descriptor = ModelLoader().load_from_file(path)
        assert descriptor.architecture.id == 'PFT'
        assert_round_trip(descriptor, net, released(name), size=(6, 9))
    ada, cfg = AdaFormer(**released('AdaFormer_x4')), released('AdaFormer_x4')
    sd, reference = ada.state_dict(), None
    for fname, obj in (('basicsr.pth', {'params': sd}),
                       ('authors_model_x4.pt', {f'model.{k}': v for k, v in sd.items()}),
                       ('dataparallel.pth', {f'module.model.{k}': v for k, v in sd.items()})):
        torch.save(obj, tmp_path / fname)
        descriptor = ModelLoader().load_from_file(tmp_path / fname)
        assert descriptor.architecture.id == 'AdaFormer', fname
        reference = assert_round_trip(descriptor, ada, cfg, size=(6, 9), reference=reference)


def _other_archs():
    torch.manual_seed(0)
    tiny_swinir = SpandrelSwinIR(upscale=2, in_chans=3, img_size=16, window_size=4, img_range=1.0, depths=[1],
                                 embed_dim=12, num_heads=[2], mlp_ratio=2, upsampler='pixelshuffledirect',
                                 resi_connection='1conv')
    return {'SwinIR': tiny_swinir, 'SPAN': SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
            'SAFMN': SAFMN(dim=8, n_blocks=1, ffn_scale=2.0, upscaling_factor=2),
            'DAT': DAT(img_size=16, embed_dim=32, split_size=[2, 4], depth=[2], num_heads=[2], expansion_factor=2.0,
                       upscale=2, upsampler='pixelshuffledirect'),
            'HAT': build_network(dict(BASELINE_TINY['HAT'])), 'ATD': build_network(dict(BASELINE_TINY['ATD']))}


def test_other_archs_are_not_claimed():
    for arch_id, net in _other_archs().items():
        sd = net.state_dict()
        assert not ss.detect_pft(sd) and not ss.detect_adaformer(sd), arch_id
        assert MAIN_REGISTRY.load(sd).architecture.id == arch_id


def test_register_is_idempotent():
    registry = ArchRegistry()
    ss.register(registry)
    ss.register(registry)
    ss.register()  # the main registry already has them
    assert [a.architecture.id for a in registry] == ['PFT', 'AdaFormer']
    assert MAIN_REGISTRY.get('PFT') is ss.SUPPORT[0] and MAIN_REGISTRY.get('AdaFormer') is ss.SUPPORT[1]


# ---- any spandrel model as a harness network ------------------------------------------------------------------------


@pytest.fixture(scope='module')
def spandrel_files(tmp_path_factory):
    """Tiny x2 checkpoints: SwinIR (reflect-pads to its window inside forward; minimum 16), DAT (pads its features
    inside each attention; minimum 16), SPAN (no requirement) and SAFMN (the caller pads to a multiple of 8)."""
    root = tmp_path_factory.mktemp('spandrel')
    out = {}
    for arch_id, net in _other_archs().items():
        if arch_id in ('SwinIR', 'DAT', 'SPAN', 'SAFMN'):
            out[arch_id] = str(root / f'{arch_id}.pth')
            torch.save({'params_ema': net.state_dict()}, out[arch_id])
    return out


def test_harness_runs_spandrel_models_as_spandrel_does(spandrel_files):
    x = photo(19, 23)
    for arch_id, path in spandrel_files.items():
        net = build_network({'type': 'Spandrel', 'path': path}).eval()
        descriptor = ModelLoader().load_from_file(path)
        traits = arch_traits(net)
        assert traits.pads_input and traits.pretrained and net.scale == 2
        harness = padded_forward(net, 2, traits.window)  # what AdaSRModel.test and the benchmark call
        with torch.no_grad():
            out = harness(x)
            own = descriptor.model.eval()(x).clamp(0, 1) if arch_id != 'SAFMN' else None
        torch.testing.assert_close(out, descriptor(x), rtol=0, atol=0)
        if own is not None:  # needs no padding from the caller: the model's own forward, untouched
            torch.testing.assert_close(out, own, rtol=0, atol=0)
        assert list(net.state_dict()) == list(descriptor.model.state_dict())  # the model's keys, no prefix
    dat = ModelLoader().load_from_file(spandrel_files['DAT']).model.eval()
    with torch.no_grad():  # pre-padding to a window (as the harness did for undeclared archs) changes the numbers
        assert (padded_forward(dat, 2, 8)(x) - dat(x)).abs().max() > 1e-3
    assert arch_traits(build_network({'type': 'Spandrel', 'path': spandrel_files['SAFMN']})).window == 8
    assert arch_traits(build_network({'type': 'Spandrel', 'path': spandrel_files['SwinIR']})).tiling == 'discouraged'


def test_spandrel_network_errors_name_the_file(tmp_path, spandrel_files):
    torch.save({'params': {'foo.weight': torch.zeros(2)}}, tmp_path / 'unknown.pth')
    with pytest.raises(CheckpointError, match='recognises no architecture'):
        build_network({'type': 'Spandrel', 'path': str(tmp_path / 'unknown.pth')})
    with pytest.raises(CheckpointError, match='not found'):
        build_network({'type': 'Spandrel', 'path': str(tmp_path / 'missing.pth')})
    with pytest.raises(CheckpointError, match='x2 SPAN model, but scale 4'):
        build_network({'type': 'Spandrel', 'path': spandrel_files['SPAN'], 'scale': 4})


def test_spandrel_network_picks_the_entry(tmp_path):
    torch.manual_seed(0)
    a, b = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2), SPAN(num_in_ch=3, num_out_ch=3,
                                                                                  feature_channels=8, upscale=2)
    torch.save({'params': a.state_dict(), 'params_ema': b.state_dict()}, tmp_path / 'basicsr.pth')
    torch.save({'model_state_dict': a.state_dict(), 'epoch': 7}, tmp_path / 'other.pth')  # unwrapped by spandrel
    key = 'conv_1.sk.weight'
    for path, param_key, expect in (('basicsr.pth', 'params_ema', b), ('basicsr.pth', 'params', a),
                                    ('other.pth', 'params_ema', a)):
        net = build_network({'type': 'Spandrel', 'path': str(tmp_path / path), 'param_key': param_key})
        assert torch.equal(net.state_dict()[key], expect.state_dict()[key]), (path, param_key)


def test_own_archs_through_spandrel_keep_their_interface(tmp_path):
    cfg = dict(ADAFORMER_SMALL, in_chans=3, rgb_mean=[0.4488, 0.4371, 0.4040])
    torch.save({'params': AdaFormer(**cfg).state_dict()}, tmp_path / 'ada.pth')
    net = build_network({'type': 'Spandrel', 'path': str(tmp_path / 'ada.pth')}).eval()
    assert is_adaptive(net) and arch_traits(net).tiling == 'discouraged' and arch_traits(net).pretrained
    with torch.no_grad():
        net(photo(8, 8))
    assert halting_record(net) is not None and net.flops(8, 8) > 0


def test_adaformer_through_spandrel_saves_halting_exports_and_keeps_its_entry(tmp_path, capsys):
    """--weights alone (spandrel detects AdaFormer): --save-halting works (it raised "Spandrel is not adaptive");
    the ONNX export takes AdaFormer's export form (it failed tracing the wrapper); --param-key names an entry that
    must exist (it was ignored here, an error with --opt)."""
    from adasr.cli.export import main as export_main

    cfg = dict(ADAFORMER_SMALL, in_chans=3, rgb_mean=[0.4488, 0.4371, 0.4040])
    torch.save({'params': AdaFormer(**cfg).state_dict()}, tmp_path / 'ada.pth')
    cv2.imwrite(str(tmp_path / 'a.png'), (photo(12, 10).numpy()[0].transpose(1, 2, 0) * 255).astype(np.uint8))
    base = ['-i', str(tmp_path / 'a.png'), '--weights', str(tmp_path / 'ada.pth')]
    assert upscale_main([*base, '-o', str(tmp_path / 'o'), '--save-halting']) == 0
    assert os.listdir(tmp_path / 'o' / 'halting' / 'a')
    assert upscale_main([*base, '-o', str(tmp_path / 'p'), '--param-key', 'foo']) == 2
    assert "has no entry 'foo'" in capsys.readouterr().err
    onnx = str(tmp_path / 'ada.onnx')
    assert export_main(['--weights', str(tmp_path / 'ada.pth'), '-o', onnx, '--check-size', '9', '11']) == 0
    assert ': ok' in capsys.readouterr().out


def _write_test_yaml(path, hr, lr, weights, extra_path=None):
    opt = {'name': 'spandrel_span', 'model_type': 'AdaSRModel', 'scale': 2, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedSRDataset', 'dataroot_gt': hr, 'dataroot_lq': lr,
                                   'io_backend': {'type': 'disk'}}},
           'network_g': {'type': 'Spandrel', 'path': weights},
           'path': {'pretrain_network_g': extra_path},
           'val': {'save_img': True, 'suffix': None,
                   'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}}}}
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return opt


def test_option_files_with_a_spandrel_network_are_checked(tmp_path, spandrel_files):
    from tests.conftest import make_pairs

    hr, lr = make_pairs(str(tmp_path / 'pairs'), size=24, scale=2)
    opt = _write_test_yaml(tmp_path / 'o.yml', hr, lr, spandrel_files['SPAN'])
    check_options(opt, is_train=False)
    opt['network_g']['pth'] = 'x'
    with pytest.raises(OptionsError, match="unknown key 'pth' in network_g \\(Spandrel\\) \\(did you mean 'path'"):
        check_options(opt, is_train=False)


def _span_test_setup(tmp_path, spandrel_files):
    """Two 38x38 / 19x19 (odd) x2 photo pairs and a test option file with the SPAN checkpoint as network_g (and, as
    accepted too, the same file as path.pretrain_network_g)."""
    from tests.conftest import make_pairs

    hr, lr = make_pairs(str(tmp_path / 'pairs'), size=38, scale=2)
    _write_test_yaml(tmp_path / 'o.yml', hr, lr, spandrel_files['SPAN'], extra_path=spandrel_files['SPAN'])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return hr, lr, env


def _y_psnr(sr_bgr, hr_path) -> float:
    from basicsr.metrics import calculate_psnr

    return calculate_psnr(sr_bgr, cv2.imread(hr_path), crop_border=2, test_y_channel=True)


@pytest.mark.slow
def test_adasr_test_with_a_spandrel_checkpoint(tmp_path, spandrel_files):
    hr, lr, env = _span_test_setup(tmp_path, spandrel_files)
    proc = subprocess.run([sys.executable, osp.join(REPO, 'adasr', 'test.py'), '-opt', str(tmp_path / 'o.yml')],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    descriptor = ModelLoader().load_from_file(spandrel_files['SPAN'])
    for name in ('astronaut', 'coffee'):
        saved = cv2.imread(str(tmp_path / 'results' / 'spandrel_span' / 'visualization' / 'tiny'
                               / f'{name}_spandrel_span.png')).astype(np.float64)
        lq = cv2.imread(osp.join(lr, f'{name}.png'))[..., ::-1].astype(np.float32) / 255
        x = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None]
        ref = descriptor(x)[0].permute(1, 2, 0).numpy()[..., ::-1] * 255
        assert saved.shape == (38, 38, 3) and np.abs(saved - np.rint(ref)).max() <= 1


@pytest.mark.slow
def test_benchmark_row_from_a_spandrel_checkpoint(tmp_path, spandrel_files):
    import csv

    hr, lr, env = _span_test_setup(tmp_path, spandrel_files)
    data = tmp_path / 'bench_data'  # the benchmark's HR + LR_bicubic/X2 layout
    shutil.copytree(hr, data / 'HR')
    shutil.copytree(lr, data / 'LR_bicubic' / 'X2')
    out = tmp_path / 'bench'
    proc = subprocess.run([sys.executable, osp.join(REPO, 'scripts', 'benchmark.py'), '--data', f'tiny={data}',
                           '--rows', '--opt', f'SPAN={tmp_path / "o.yml"}', '--scale', '2', '--size', '16x12',
                           '--repeats', '1', '--warmup', '0', '--threads', '1', '--out', str(out),
                           '--no-malloc-env'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / 'benchmark.csv') as f:
        (row,) = list(csv.DictReader(f))
    descriptor = ModelLoader().load_from_file(spandrel_files['SPAN'])
    psnrs = []
    for name in ('astronaut', 'coffee'):  # spandrel's own call, scored as the test pipeline scores
        lq = cv2.imread(osp.join(lr, f'{name}.png'))[..., ::-1].astype(np.float32) / 255
        sr = descriptor(torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None])
        psnrs.append(_y_psnr(np.rint(sr[0].permute(1, 2, 0).numpy()[..., ::-1] * 255), osp.join(hr, f'{name}.png')))
    assert row['model'] == 'SPAN' and float(row['PSNR-Y tiny']) == pytest.approx(np.mean(psnrs), abs=1e-3)


def _save_photo(path, h, w):
    img = cv2.imread(PHOTO)[60:60 + h, 80:80 + w]
    cv2.imwrite(str(path), img)
    return torch.from_numpy(np.ascontiguousarray(img[..., ::-1].astype(np.float32) / 255)).permute(2, 0, 1)[None]


@pytest.mark.parametrize('kind', ['SPAN', pytest.param('PFT_light_x4', marks=pytest.mark.slow), 'AdaFormer_x4'])
def test_upscale_with_weights_alone(kind, tmp_path, capsys, spandrel_files):
    if kind == 'SPAN':
        weights, scale = spandrel_files['SPAN'], 2
        descriptor = ModelLoader().load_from_file(weights)
        model, expect = descriptor.model, 'SPAN x2'
    else:
        cls = PFT if kind.startswith('PFT') else AdaFormer
        model, scale = cls(**released(kind)), 4
        weights = str(tmp_path / 'w.pth')
        torch.save({'params_ema': model.state_dict()}, weights)
        expect = 'PFT x4' if cls is PFT else 'AdaFormer x4'
    x = _save_photo(tmp_path / 'a.png', 13, 17)
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--weights', weights,
                         '--tile', '0']) == 0
    printed = capsys.readouterr().out
    assert f'detected by spandrel in {weights}: {expect}' in printed
    if kind == 'PFT_light_x4':
        assert 'embed_dim=52, depths=[2, 4, 6, 6, 6], num_heads=4, num_topk=[1024, 1024, 256' in printed
    with torch.no_grad():
        ref = model.eval()(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()[..., ::-1]
    out = cv2.imread(str(tmp_path / 'o' / 'a_out.png')).astype(np.float64)
    assert out.shape == (13 * scale, 17 * scale, 3) and np.abs(out - np.rint(ref * 255)).max() <= 1


def test_upscale_weights_alone_errors(tmp_path, capsys, spandrel_files):
    _save_photo(tmp_path / 'a.png', 8, 8)
    torch.save({'params': {'foo.weight': torch.zeros(2)}}, tmp_path / 'unknown.pth')
    from safetensors.torch import save_file

    save_file(torch.load(spandrel_files['SPAN'], weights_only=True)['params_ema'], str(tmp_path / 'cut.safetensors'))
    good = (tmp_path / 'cut.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(good[:len(good) // 2])  # a download cut short
    (tmp_path / 'empty.safetensors').write_bytes(b'')
    for extra, message in ((['--weights', str(tmp_path / 'unknown.pth')], 'recognises no architecture'),
                           (['--weights', str(tmp_path / 'cut.safetensors')], 'not a readable safetensors file'),
                           (['--weights', str(tmp_path / 'empty.safetensors')], 'not a readable safetensors file'),
                           (['--weights', spandrel_files['SPAN'], '--scale', '4'], 'but scale 4 was given'),
                           ([], 'give --opt (an option file), --arch (an arch name) or --weights')):
        assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), *extra]) == 2
        assert message in capsys.readouterr().err


def test_upscale_with_a_spandrel_option_file(tmp_path, spandrel_files):
    """SAFMN needs its input padded to a multiple of 8: the harness pads as spandrel does, on an odd photo crop."""
    opt = {'name': 'safmn', 'model_type': 'AdaSRModel', 'scale': 2,
           'network_g': {'type': 'Spandrel', 'path': spandrel_files['SAFMN'], 'scale': 2}}
    (tmp_path / 'o.yml').write_text(yaml.safe_dump(opt))
    x = _save_photo(tmp_path / 'a.png', 13, 17)
    assert upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--opt', str(tmp_path / 'o.yml'),
                         '--tile', '0', '-q']) == 0
    ref = ModelLoader().load_from_file(spandrel_files['SAFMN'])(x)[0].permute(1, 2, 0).numpy()[..., ::-1]
    out = cv2.imread(str(tmp_path / 'o' / 'a_out.png')).astype(np.float64)
    assert out.shape == (26, 34, 3) and np.abs(out - np.rint(ref * 255)).max() <= 1


def test_a_network_that_tiles_itself_is_never_tiled():
    """``tiling: internal`` (spandrel's ModelTiling.INTERNAL): adasr-upscale and AdaSRModel run the whole image even
    when a tile is asked for; ``discouraged`` tiles as asked and says so."""
    from types import SimpleNamespace

    from adasr.archs.interface import ArchTraits, SRArch
    from adasr.cli.upscale import Upscaler, _run_model, build_parser
    from adasr.inference.precision import resolve_precision
    from adasr.models.adasr_model import AdaSRModel

    class Net(SRArch, torch.nn.Module):
        def __init__(self, tiling):
            super().__init__()
            self.tiling, self.calls = tiling, []

        def arch_traits(self):
            return ArchTraits(pads_input=True, tiling=self.tiling)

        def forward(self, x):
            self.calls.append(tuple(x.shape[-2:]))
            return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')

    x = photo(20, 20)
    args = build_parser().parse_args(['-i', 'x', '-q'])
    for tiling, calls, note in (('internal', 1, 'tiles internally'), ('discouraged', 9, 'discouraged')):
        net = Net(tiling)
        up = Upscaler(net, 2, 1, torch.device('cpu'), resolve_precision('fp32', 'cpu'), 3, 'test', tiling)
        y, tile, why = _run_model(up, x, args, desc='x', tile=8)
        assert len(net.calls) == calls and note in why and y.shape == (1, 3, 40, 40)
    net = Net('internal')
    model = SimpleNamespace(opt={'scale': 2, 'network_g': {}, 'val': {'tile': 8, 'tile_pad': 4}})
    assert AdaSRModel.inference(model, net, x).shape == (1, 3, 40, 40) and net.calls == [(20, 20)]
