"""Reduced precision, one option everywhere: the device rules (fp16 refused on the CPU, bf16 only with native BF16),
fp32 unchanged bit for bit, bf16 on the CPU for every arch where the CPU has it, and the three entry points
(``adasr-upscale --precision``, ``val.precision``, the benchmark's precision column). GPU tests are marked ``gpu``."""
import math
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from basicsr.archs import build_network

from adasr.inference.precision import (
    Precision,
    PrecisionError,
    auto_precision,
    cpu_bf16_support,
    cpu_isa,
    parse_precision,
    resolve_precision,
)
from adasr.inference.tile import padded_forward
from tests.helpers import baseline_fixtures

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PHOTO = osp.join(REPO, 'datasets', 'demo', 'val', 'HR', 'chelsea.png')
CPU_BF16, WHY_NOT = cpu_bf16_support()
needs_cpu_bf16 = pytest.mark.skipif(not CPU_BF16, reason=f'no native bf16 on this CPU: {WHY_NOT}')

# tiny configs of every arch family (window 4 or 8; a few thousand parameters)
TINY = {
    'Bicubic': {'type': 'Bicubic', 'upscale': 4},
    'AdaFormer': {'type': 'AdaFormer', 'upscale': 4, 'n_feats': 16, 'embed_dim': 16, 'n_resblocks': 2, 'depths': 2,
                  'num_heads': 2, 'num_prototypes': 4, 'estimator_hidden': 8},
    'PFT': {'type': 'PFT', 'upscale': 4, 'img_size': 16, 'window_size': 8, 'depths': [2], 'num_topk': [32, 16],
            'embed_dim': 16, 'num_heads': 2, 'mlp_ratio': 1, 'convffn_kernel_size': 3, 'img_range': 1.,
            'upsampler': 'pixelshuffledirect', 'resi_connection': '1conv'},
    'SwinIR': {'type': 'SwinIR', 'upscale': 4, 'img_size': 16, 'window_size': 8, 'img_range': 1., 'depths': [1],
               'embed_dim': 12, 'num_heads': [2], 'mlp_ratio': 2, 'upsampler': 'pixelshuffledirect',
               'resi_connection': '1conv'},
    **baseline_fixtures.TINY,  # HAT and ATD
}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _photo_tensor(h: int = 20, w: int = 27) -> torch.Tensor:
    img = cv2.imread(PHOTO)[60:60 + h, 80:80 + w, ::-1].astype(np.float32) / 255
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None]


def _net(name: str):
    from adasr.archs.interface import arch_traits

    torch.manual_seed(0)
    net = build_network(dict(TINY[name])).eval()
    with torch.no_grad():  # non-zero biases, as trained weights have
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net, arch_traits(net, net_opt=TINY[name]).window


# ---------------------------------------------------------------------------------------------------- device rules


def test_names_and_device_rules(monkeypatch):
    assert parse_precision('bf16') == 'bf16'
    with pytest.raises(PrecisionError, match="one of fp32, bf16, fp16, got 'fp8'"):
        parse_precision('fp8')
    assert resolve_precision('fp32', 'cpu') == Precision('fp32', torch.device('cpu'))
    with pytest.raises(PrecisionError, match='fp16 on the CPU is not supported.*use bf16 on a CPU with avx512_bf16'):
        resolve_precision('fp16', 'cpu')
    import adasr.inference.precision as precision_mod

    monkeypatch.setattr(precision_mod, 'cpu_flags', lambda: frozenset({'avx2', 'fma'}))
    with pytest.raises(PrecisionError, match='bf16 on the CPU: this CPU has no native bfloat16 arithmetic '
                                             r'\(no avx512_bf16 / amx_bf16 flag'):
        resolve_precision('bf16', 'cpu')
    assert 'no native BF16' in cpu_isa()
    monkeypatch.setattr(precision_mod, 'cpu_flags', lambda: frozenset({'avx512f', 'avx512_bf16'}))
    assert resolve_precision('bf16', 'cpu').dtype == torch.bfloat16
    assert cpu_bf16_support(frozenset({'amx_bf16'})) == (True, 'CPU has amx_bf16')
    assert auto_precision('cpu', torch.bfloat16) == 'fp32'
    if not torch.cuda.is_available():
        with pytest.raises(PrecisionError, match='CUDA is not available'):
            resolve_precision('fp16', 'cuda')


def test_fp32_is_the_plain_forward():
    """fp32 wraps nothing: the same function object, so the numbers cannot change."""
    fn = padded_forward(_net('SwinIR')[0], 4, 8)
    assert resolve_precision('fp32', 'cpu').wrap(fn) is fn


# ---------------------------------------------------------------------------------------------------- bf16 per arch


@needs_cpu_bf16
@pytest.mark.parametrize('name', sorted(TINY))
def test_bf16_on_the_cpu_every_arch(name):
    """bf16 autocast runs, returns float32 of the right shape, stays close to fp32 and (with weights) is not fp32."""
    net, window = _net(name)
    x = _photo_tensor()
    fn = padded_forward(net, 4, window)
    with torch.no_grad():
        ref = fn(x)
        out = resolve_precision('bf16', 'cpu').wrap(fn)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (1, 3, 80, 108)
    assert torch.isfinite(out).all()
    assert _psnr(out, ref) > 35
    if name != 'Bicubic':  # parameter-free resampling: no matrix product to run in bf16
        assert not torch.equal(out, ref)


@needs_cpu_bf16
def test_adaformer_chains_run_channels_last_under_cpu_autocast(monkeypatch):
    """Under CPU bf16 autocast AdaFormer's ResBlock chains run channels-last from end to end (oneDNN's bf16
    convolutions then need no NCHW reorders; 1.6x faster chains on an AMX Xeon) and give the plain NCHW chain's
    numbers (bit for bit there; within a bf16 rounding here), NCHW-contiguous out."""
    from torch import nn

    from adasr.archs.adaformer_arch import ResBlock, ResBlocks

    torch.manual_seed(0)
    chain = ResBlocks(*(ResBlock(16, 1.0) for _ in range(3))).eval()
    x = torch.randn(1, 16, 20, 28)
    layouts = []
    block_forward = ResBlock.forward
    monkeypatch.setattr(ResBlock, 'forward', lambda self, h: layouts.append(
        h.is_contiguous(memory_format=torch.channels_last)) or block_forward(self, h))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = chain(x)
        assert layouts == [True] * 3
        ref = nn.Sequential.forward(chain, x)
    assert layouts[3:] == [False] * 3 and y.dtype == ref.dtype == torch.bfloat16 and y.is_contiguous()
    torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
    with torch.no_grad():  # fp32 (no autocast) keeps its own path
        layouts.clear()
        chain(x)
        assert True not in layouts


# ---------------------------------------------------------------------------------------------------- adasr-upscale


def _upscale(tmp_path, name, *flags):
    from adasr.cli.upscale import main

    src = tmp_path / 'a.png'
    if not src.exists():
        cv2.imwrite(str(src), cv2.imread(PHOTO)[60:80, 80:107])
    rc = main(['-i', str(src), '-o', str(tmp_path / name), '--arch', 'AdaFormer', '--scale', '4',
               '--random-weights', '--device', 'cpu', '--tile', '0', '-q', *flags])
    return rc, tmp_path / name / 'a_out.png'


def test_upscale_precision_flags(tmp_path, capsys):
    """On the CPU the default is fp32; --precision fp32 and its alias --fp32 write the same bytes."""
    outs = []
    for name, flags in (('default', []), ('fp32', ['--precision', 'fp32']), ('alias', ['--fp32'])):
        torch.manual_seed(0)  # the same random weights each run
        rc, out = _upscale(tmp_path, name, *flags)
        assert rc == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    capsys.readouterr()
    assert _upscale(tmp_path, 'x', '--precision', 'fp16')[0] == 2
    assert 'adasr-upscale: error: --precision: fp16 on the CPU is not supported' in capsys.readouterr().err
    assert _upscale(tmp_path, 'x', '--fp32', '--half', 'bf16')[0] == 2
    assert "conflicting precisions ['bf16', 'fp32']" in capsys.readouterr().err


def test_upscale_conv3x3_flag(tmp_path, capsys):
    """--conv3x3 winograd runs AdaFormer's chains by Winograd (8-bit output within one level of direct; the option
    is set for the process and restored here); an unknown method is refused by argparse."""
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips

    from adasr.ops.config import get_option, set_option

    try:
        torch.manual_seed(0)
        assert _upscale(tmp_path, 'direct', '--conv3x3', 'direct')[0] == 0
        torch.manual_seed(0)
        rc, out = _upscale(tmp_path, 'wino', '--conv3x3', 'winograd')
        assert rc == 0 and get_option('conv3x3') == 'winograd'
    finally:
        set_option('conv3x3', None)
    a = cv2.imread(str(tmp_path / 'direct' / 'a_out.png')).astype(np.int64)
    b = cv2.imread(str(out)).astype(np.int64)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    with pytest.raises(SystemExit):
        _upscale(tmp_path, 'x', '--conv3x3', 'fft')
    assert "invalid choice: 'fft'" in capsys.readouterr().err


@needs_cpu_bf16
def test_upscale_bf16_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    assert _upscale(tmp_path, 'fp32', '--precision', 'fp32')[0] == 0
    torch.manual_seed(0)
    rc, out = _upscale(tmp_path, 'bf16', '--precision', 'bf16')
    assert rc == 0
    a = cv2.imread(str(tmp_path / 'fp32' / 'a_out.png')).astype(np.float64)
    b = cv2.imread(str(out)).astype(np.float64)
    assert a.shape == b.shape == (80, 108, 3) and not np.array_equal(a, b)
    assert 10 * np.log10(255 ** 2 / ((a - b) ** 2).mean()) > 35


# ---------------------------------------------------------------------------------------------------- val.precision


def _model(tmp_path, val):
    from basicsr.models import build_model

    opt = {'name': 'p', 'model_type': 'AdaSRModel', 'scale': 4, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'rank': 0, 'world_size': 1, 'network_g': dict(TINY['SwinIR']),
           'path': {'pretrain_network_g': None, 'results_root': str(tmp_path), 'visualization': str(tmp_path)},
           'val': val}
    torch.manual_seed(0)
    return build_model(opt)


def test_val_precision_option_is_checked():
    from adasr.cli.options import OptionsError, check_options

    opt = {'name': 'x', 'model_type': 'AdaFormerModel', 'scale': 4, 'num_gpu': 0,
           'datasets': {'test_1': {'name': 't', 'type': 'PairedSRDataset', 'dataroot_gt': 'a', 'dataroot_lq': 'b',
                                   'io_backend': {'type': 'disk'}}},
           'network_g': dict(TINY['AdaFormer']), 'path': {'pretrain_network_g': None},
           'val': {'save_img': False, 'precision': 'fp32', 'eps_h': 0.1}}
    check_options(opt, is_train=False, check_paths=False)
    opt['val']['precision'] = 'half'
    with pytest.raises(OptionsError, match="val.precision: precision must be one of fp32, bf16, fp16, got 'half'"):
        check_options(opt, is_train=False, check_paths=False)
    opt['val']['precision'] = 'fp16'
    check_options(opt, is_train=False, check_paths=False)  # structure only: the device is not known yet
    from adasr.cli.options import check_precision_opt

    with pytest.raises(OptionsError, match='val.precision: fp16 on the CPU is not supported'):
        check_precision_opt('fp16', num_gpu=0)  # what check_options(check_paths=True) asks: num_gpu 0 is the CPU


def test_val_precision_in_yaml_testing(tmp_path):
    lq = _photo_tensor(17, 21)
    outs = {}
    for name, val in (('none', {}), ('fp32', {'precision': 'fp32'}), ('bf16', {'precision': 'bf16'})):
        if name == 'bf16' and not CPU_BF16:
            continue
        model = _model(tmp_path, dict(val, save_img=False))
        model.feed_data({'lq': lq})
        model.test()
        outs[name] = model.output
    assert torch.equal(outs['none'], outs['fp32'])  # fp32 is the default and changes nothing
    if 'bf16' in outs:
        assert outs['bf16'].dtype == torch.float32 and not torch.equal(outs['bf16'], outs['fp32'])
        assert _psnr(outs['bf16'], outs['fp32']) > 35


@needs_cpu_bf16
def test_val_precision_bf16_adaformer_halting_record(tmp_path):
    """AdaFormerModel.test() with val.precision bf16 reads the halting record after the autocast region, which
    computes the deferred map after the last block then (it raised a dtype mismatch): the test runs, its statistics
    count every block, and the maps match those the same bf16 forward gives with every map computed in it."""
    from basicsr.models import build_model

    from adasr.archs.interface import halting_record

    opt = {'name': 'p', 'model_type': 'AdaFormerModel', 'scale': 4, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'rank': 0, 'world_size': 1, 'network_g': dict(TINY['AdaFormer']),
           'path': {'pretrain_network_g': None, 'results_root': str(tmp_path), 'visualization': str(tmp_path)},
           'val': {'precision': 'bf16', 'save_img': False}}
    torch.manual_seed(0)
    model = build_model(opt)
    model.feed_data({'lq': _photo_tensor(40, 48)})
    model.test()
    info = halting_record(model.net_g)
    assert model.output.dtype == torch.float32 and len(info.logits) == TINY['AdaFormer']['depths']
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.net_g.complete_halting_maps = True
        model.net_g(model.lq)
        full = halting_record(model.net_g)
    for a, b in zip(info.global_keep + info.local_keep, full.global_keep + full.local_keep):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- benchmark


def test_benchmark_rows_per_precision(tmp_path):
    from benchmarks.harness import RowSpec, find_dataset, measure_row, table_rows, to_markdown, with_precisions

    rows = [RowSpec(label='S', source='x.yml', network_g=dict(TINY['SwinIR']), scale=4)]
    assert with_precisions(rows, None) == rows
    expanded = with_precisions(rows, ['fp32', 'bf16'])
    assert [(r.label, r.precision) for r in expanded] == [('S', 'fp32'), ('S bf16', 'bf16')]
    with pytest.raises(PrecisionError):
        with_precisions(rows, ['fp64'])
    if not CPU_BF16:
        pytest.skip(f'no native bf16 on this CPU: {WHY_NOT}')
    data = find_dataset(osp.join(REPO, 'datasets', 'demo', 'val'), 4)
    d = [{'name': data.name, 'hr_dir': data.hr_dir, 'lr_dir': data.lr_dir, 'pairs': data.pairs[:1]}]
    threads = torch.get_num_threads()
    results = {}
    try:
        for row in expanded:
            spec = {'network_g': row.network_g, 'scale': 4, 'checkpoint': None, 'precision': row.precision}
            results[row.label] = measure_row(spec, d, size=(9, 11), repeats=1, warmup=0, device='cpu', threads=1,
                                             max_images=1)
    finally:
        torch.set_num_threads(threads)
    q32, q16 = (results[r.label]['quality']['demo_val']['psnr'] for r in expanded)
    assert q32 != q16 and abs(q32 - q16) < 0.5
    md = to_markdown(*table_rows(expanded, results, ['demo_val']))
    assert '| S (untrained) | untrained (random init) | fp32 |' in md
    assert '| S bf16 (untrained) | untrained (random init) | bf16 |' in md


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
@pytest.mark.parametrize('name', ['AdaFormer', 'PFT', 'SwinIR', 'HAT', 'ATD'])
def test_cuda_autocast_every_arch(name, precision):
    net, window = _net(name)
    net = net.cuda()
    x = _photo_tensor(40, 52).cuda()
    fn = padded_forward(net, 4, window)
    with torch.no_grad():
        ref = fn(x)
        out = resolve_precision(precision, 'cuda').wrap(fn)(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _psnr(out, ref) > 35
