"""Speed and precision reports: the halting-rate helper reaches its target and leaves the weights as they were, the
precision report counts no flips for fp32 against itself, and the speed report runs end to end on tiny sizes."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from adasr.archs.adaformer_arch import AdaFormer
from adasr.archs.interface import halting_record
from benchmarks.halting_rates import (
    calibrate_halting,
    estimator_logit_bias,
    halted_per_block,
    mean_halted,
    shift_estimator_bias,
)
from benchmarks.harness import perturb_weights, read_rgb
from benchmarks.profiling import MALLOC_ENV

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PHOTO = osp.join(REPO, 'datasets', 'demo', 'val', 'LR_bicubic', 'X4', 'chelsea.png')
TINY = dict(n_feats=16, embed_dim=16, n_resblocks=2, depths=4, num_heads=2, num_prototypes=4, estimator_hidden=8)


def _tiny_adaformer():
    torch.manual_seed(0)
    net = AdaFormer(**TINY)
    perturb_weights(net)
    return net.eval()


def test_perturb_weights_is_seeded_as_benchmark_adaformer_was():
    """Seed, build, perturb: the weights benchmark_adaformer.py always used (randn_like in parameter order)."""
    torch.manual_seed(3)
    a = AdaFormer(**TINY)
    expect = [p.detach() + 0.02 * torch.randn_like(p) for p in a.parameters()]
    torch.manual_seed(3)
    b = AdaFormer(**TINY)
    perturb_weights(b)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), expect))


def test_halting_rate_is_calibrated_and_reversible():
    net = _tiny_adaformer()
    x = read_rgb(PHOTO)[..., :40, :48]
    bias0 = estimator_logit_bias(net).clone()
    offset, reached = calibrate_halting(net, x, 0.5)
    assert torch.allclose(estimator_logit_bias(net), bias0 + offset)  # the offset is applied ...
    with torch.no_grad():
        net(x)
    shares = halted_per_block(net)
    assert shares['global'][0] == 0 and mean_halted(shares['global']) == pytest.approx(reached)
    assert abs(reached - 0.5) < 0.1
    shift_estimator_bias(net, -offset)  # ... and can be taken back exactly enough
    assert torch.allclose(estimator_logit_bias(net), bias0, atol=1e-6)
    for target, expect in ((0.0, 0.0), (1.0, 1.0)):
        net = _tiny_adaformer()
        _, reached = calibrate_halting(net, x, target)
        assert reached == expect
    with pytest.raises(TypeError, match='needs an AdaFormer'):
        estimator_logit_bias(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r'in \[0, 1\]'):
        calibrate_halting(net, x, 1.5)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, 'scripts', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_precision_report_fp32_against_itself_has_no_flips():
    net = _tiny_adaformer()
    calibrate_halting(net, read_rgb(PHOTO)[..., :32, :32], 0.5)
    images = [read_rgb(PHOTO)[..., :24, :40], read_rgb(PHOTO)[..., 30:62, 8:40]]
    res = _script('precision_report').compare(net, 4, 8, images, ['fp32'], 'cpu', adaptive=True)['fp32']
    assert res['psnr'] == [float('inf')] * 2 and res['max_diff'] == 0
    assert res['global'] == res['local'] == [0, 0, 0] and res['tokens'] == 24 * 40 + 32 * 32
    assert halting_record(net).input_size == (32, 32)


def test_precision_report_compares_the_winograd_convolutions():
    """'conv3x3=winograd' runs the AdaFormer chains by Winograd for the call only (other rounding: SR differs, far
    below a grey level) and leaves the reference fp32 call's method alone; a reduced precision name still works."""
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips

    from adasr.ops import config

    net = _tiny_adaformer()
    calibrate_halting(net, read_rgb(PHOTO)[..., :32, :32], 0.5)
    images = [read_rgb(PHOTO)[..., :24, :40]]
    report = _script('precision_report')
    res = report.compare(net, 4, 8, images, ['conv3x3=winograd'], 'cpu', adaptive=True)['conv3x3=winograd']
    assert 60 < res['psnr'][0] < float('inf') and 0 < res['max_diff'] < 0.05
    assert res['global'] == res['local'] == [0, 0, 0]
    assert config.get_option('conv3x3') == 'auto'
    with pytest.raises(Exception, match='fp16'):
        report.configuration('fp16', 'cpu')


@pytest.mark.slow
def test_speed_report_quick_end_to_end(tmp_path):
    out = tmp_path / 'speed.md'
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', **MALLOC_ENV)  # no re-exec needed
    proc = subprocess.run([sys.executable, osp.join(REPO, 'scripts', 'speed_report.py'), '--quick', '--threads', '1',
                           '--halted', '0', '1', '--out', str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = out.read_text()
    for needle in ('PyTorch ISA', 'load average at start', 'MALLOC_MMAP_THRESHOLD_',
                   '## AdaFormer x4 at 32x24 LR, 1 thread', '| AdaFormer, exact path (sparse_eval), fp32 |',
                   '| AdaFormer, dense mode (sparse_eval=False), fp32 |', '| SwinIR-light, fp32 |',
                   "| AdaFormer, exact path, fp32, the authors' convolutions bit for bit (conv3x3=direct) |",
                   '| AdaFormer, sparse_eval, fp32, Winograd F(4x4) convolutions everywhere (conv3x3=winograd; other '
                   'rounding) |',
                   '## PFT-light x4 against SwinIR-light x4 at 24x24 LR', '| PFT-light, fp32 |',
                   '| 0% | -20.00 | 0 0 0 0 0 0 |', '| 100% | +20.00 | 0 100 100 100 100 100 |'):
        assert needle in md, needle
    from adasr.inference.precision import cpu_bf16_support

    native_bf16 = cpu_bf16_support()[0]
    assert ('| AdaFormer, sparse_eval, bf16 (autocast; other rounding) |' in md) == native_bf16
    refused = next(line for line in md.splitlines() if line.startswith('- refused precisions: '))
    assert 'fp16: fp16 on the CPU is not supported' in refused
    assert ('bf16: ' in refused) != native_bf16  # refused, with its reason, exactly where the CPU lacks native bf16
    if not native_bf16:
        assert 'no native bfloat16 arithmetic' in refused, refused


def test_speed_report_refuses_a_device_it_cannot_use():
    """--device names the device before any work: not cpu/cuda, or CUDA where torch sees none, is a clear error."""
    report = _script('speed_report')
    with pytest.raises(SystemExit, match='runs on cpu or cuda'):
        report.main(['--quick', '--device', 'xpu'])
    with pytest.raises(SystemExit, match='error: .*tpu'):
        report.main(['--quick', '--device', 'tpu'])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='torch sees no CUDA device'):
            report.main(['--quick', '--device', 'cuda'])


@pytest.mark.gpu
@pytest.mark.slow
def test_speed_report_quick_on_cuda(tmp_path):
    """The report's sections on a GPU: fp16 (and bf16 where supported) by autocast, no CPU convolution-engine rows."""
    out = tmp_path / 'speed.md'
    proc = subprocess.run([sys.executable, osp.join(REPO, 'scripts', 'speed_report.py'), '--quick', '--device', 'cuda',
                           '--halted', '0', '1', '--out', str(out)],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = out.read_text()
    for needle in ('- device: ', '(cuda), CUDA ', '| AdaFormer, exact path (sparse_eval), fp32 |',
                   '| AdaFormer, sparse_eval, fp16 (autocast; other rounding) |', '| SwinIR-light, fp32 |',
                   '| PFT-light, fp32 |'):
        assert needle in md, needle
    assert 'conv3x3=direct' not in md and 'conv3x3=winograd' not in md


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA: the script would run its GPU steps')
def test_gpu_checks_script_refuses_without_cuda(tmp_path):
    """scripts/gpu_checks.sh, without a CUDA device: exit 2 with a message that says so, before any step (no output
    folder made)."""
    out = tmp_path / 'gpu'
    proc = subprocess.run(['bash', osp.join(REPO, 'scripts', 'gpu_checks.sh'), str(out)],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'no CUDA device' in proc.stderr and not out.exists()
