"""adasr.ops.narrow_conv: a 3x3 convolution to one output channel with oneDNN's numbers, and 1x1 convolutions of a
few channels with PyTorch's, bit for bit."""
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adasr.ops import narrow_conv

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _case(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 2).tanh()
    return x, torch.randn(1, shape[1], 3, 3, generator=gen) * 0.3, torch.randn(1, generator=gen)


def test_the_order_is_found_where_onednn_convolves():
    """On a CPU where PyTorch convolves by oneDNN's AVX-512 kernel the order (blocks of 16 summed apart) is found;
    elsewhere the check finds the order that matches or none (then PyTorch's convolution runs)."""
    for channels in (32, 64, 16):
        order = narrow_conv.summation_order(channels)
        assert order is None or order in narrow_conv.ORDERS
        if torch.backends.cpu.get_cpu_capability() == 'AVX512' and narrow_conv._kernel() is not None:
            assert order == (16, False), channels
    assert narrow_conv.summation_order(20) in (None, (8, True), (8, False))  # 20 is no multiple of 16


@pytest.mark.parametrize('shape, padding', [((1, 32, 37, 45), 1), ((2, 32, 20, 33), 1), ((5, 32, 10, 10), 0),
                                            ((1, 16, 9, 70), 1), ((1, 64, 12, 12), 0), ((3, 32, 3, 3), 1),
                                            ((1, 32, 20, 32), 1), ((1, 32, 26, 25), 1), ((1, 16, 40, 33), 0)])
def test_same_numbers_as_pytorch(shape, padding):
    """Batches, and single maps on both sides of PyTorch's threshold for oneDNN (20480 elements: (1, 32, 20, 32)
    is PyTorch's own im2col convolution, (1, 32, 26, 25) oneDNN's)."""
    x, w, b = _case(shape)
    with torch.no_grad():
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w, b, padding), F.conv2d(x, w, b, 1, padding))
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w, None, padding), F.conv2d(x, w, None, 1, padding))


def test_pytorchs_dispatch_rule():
    assert narrow_conv.pytorch_uses_onednn((2, 32, 3, 3)) == torch.backends.mkldnn.is_available()
    assert not narrow_conv.pytorch_uses_onednn((1, 32, 20, 32))
    assert narrow_conv.pytorch_uses_onednn((1, 32, 26, 25)) == torch.backends.mkldnn.is_available()
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        assert not narrow_conv.pytorch_uses_onednn((4, 32, 40, 40))
    finally:
        torch.backends.mkldnn.enabled = before


def test_patches_give_the_whole_maps_numbers():
    """What the estimator's window path relies on: a window convolved with its halo (no padding) gets the numbers
    the whole map's padded convolution has there, for one patch as for many (oneDNN itself takes another kernel for
    a single small patch; the compiled kernel's order does not depend on the batch)."""
    if narrow_conv.summation_order(32) is None:
        pytest.skip('no compiled kernel here: PyTorch convolution')
    x, w, b = _case((1, 32, 24, 32), 3)  # 24576 elements: oneDNN's convolution
    with torch.no_grad():
        whole = narrow_conv.conv3x3_to_one(x, w, b, 1)
        padded = F.pad(x, (1, 1, 1, 1))
        patches = torch.stack([padded[0, :, y:y + 10, c:c + 10] for y, c in ((0, 0), (8, 16), (14, 22))])
        got = narrow_conv.conv3x3_to_one(patches, w, b, 0, onednn_order=True)
        single = narrow_conv.conv3x3_to_one(patches[1:2], w, b, 0, onednn_order=True)
    for i, (y, c) in enumerate(((0, 0), (8, 16), (14, 22))):
        assert torch.equal(got[i, 0], whole[0, 0, y:y + 8, c:c + 8])
    assert torch.equal(single[0], got[1])


def test_threads_do_not_change_the_numbers():
    x, w, b = _case((1, 32, 70, 41), 5)
    before = torch.get_num_threads()
    with torch.no_grad():
        one = narrow_conv.conv3x3_to_one(x, w, b)
        torch.set_num_threads(2)
        try:
            two = narrow_conv.conv3x3_to_one(x, w, b)
        finally:
            torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, F.conv2d(x, w, b, 1, 1))


def test_other_cases_are_pytorchs_convolution():
    """Channels not a multiple of the width, more output channels, padding 2, float64, autograd: PyTorch's own
    (and a tensor that requires grad, read under no_grad, by the kernel: the same numbers)."""
    x, w, b = _case((1, 20, 9, 11))
    with torch.no_grad():
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w, b), F.conv2d(x, w, b, 1, 1))
        x, w, b = _case((1, 32, 9, 11))
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w, b, 2), F.conv2d(x, w, b, 1, 2))
        assert torch.equal(narrow_conv.conv3x3_to_one(x.double(), w.double(), b.double()),
                           F.conv2d(x.double(), w.double(), b.double(), 1, 1))
        w2 = torch.cat([w, w])
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w2, None), F.conv2d(x, w2, None, 1, 1))
    x2 = _case((2, 32, 9, 11))[0].requires_grad_(True)  # a batch: oneDNN's (the kernel's) convolution
    with torch.no_grad():  # a tensor that requires grad, read without autograd
        assert torch.equal(narrow_conv.conv3x3_to_one(x2, w, b), F.conv2d(x2, w, b, 1, 1))
    x.requires_grad_(True)
    y = narrow_conv.conv3x3_to_one(x, w, b)
    y.sum().backward()
    assert y.grad_fn is not None and x.grad is not None and x.grad.abs().sum() > 0


def test_no_order_found_means_pytorch(monkeypatch):
    """When no summation order reproduces PyTorch's numbers (simulated: a reference off by one ulp), none is used."""
    real = F.conv2d

    def off_by_an_ulp(*args, **kwargs):
        y = real(*args, **kwargs)
        return torch.nextafter(y, torch.full_like(y, np.inf))

    monkeypatch.setattr(narrow_conv.F, 'conv2d', off_by_an_ulp)
    assert narrow_conv._find_order(32) is None


_AVX2_ONEDNN = """
import torch
import torch.nn.functional as F
from adasr.ops import narrow_conv
torch.manual_seed(0)
with torch.no_grad():
    for shape, pad in (((1, 32, 37, 45), 1), ((4, 32, 10, 10), 0)):
        x, w, b = torch.randn(*shape).tanh(), torch.randn(1, 32, 3, 3), torch.randn(1)
        assert torch.equal(narrow_conv.conv3x3_to_one(x, w, b, pad), F.conv2d(x, w, b, 1, pad)), shape
    x = torch.rand(1, 3, 70, 400) * 255
    w1, b1 = torch.eye(3).view(3, 3, 1, 1) + 0.02 * torch.randn(3, 3, 1, 1), torch.randn(3) * 100
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.equal(narrow_conv.conv1x1_narrow(x, w1, b1), F.conv2d(x, w1, b1)), threads
print('equal', narrow_conv.summation_order(32))
"""


def test_oneDNN_limited_to_avx2_gives_its_avx2_order(tmp_path):
    """oneDNN told to use AVX2 at most (its kernel of the AVX2 machines) and the kernel compiled for Haswell: the
    numbers are PyTorch's, and on this project's CPUs the AVX2 order (blocks of 8 channels, one chain from the
    bias) is the one found (another CPU's blocking may find none: then PyTorch's convolution runs)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2', NUMBA_CPU_NAME='haswell', NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES='+avx,+avx2,+fma,+f16c,+popcnt,+sse4.2,+bmi,+bmi2,+lzcnt,+movbe')
    proc = subprocess.run([sys.executable, '-c', _AVX2_ONEDNN], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith('equal'), proc.stderr[-2000:]
    if narrow_conv._kernel() is not None:
        assert proc.stdout.split(None, 1)[1].strip() in ('(8, True)', 'None'), proc.stdout


# ---- 1x1 convolutions of a few channels ---------------------------------------------------------------------------


def _mean_shift_case(shape, seed=0):
    """A drifted MeanShift (identity plus noise, as trained checkpoints hold) and a 0..255 image with edge values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=gen) * 600 - 300
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-7, 114.444])
    w = torch.eye(shape[1]).view(shape[1], shape[1], 1, 1) + 0.02 * torch.randn(shape[1], shape[1], 1, 1, generator=gen)
    return x, w, torch.randn(shape[1], generator=gen) * 100


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('shape', [(1, 3, 272, 480), (1, 3, 5, 7), (2, 3, 64, 64), (20, 3, 9, 9), (1, 2, 40, 700)])
def test_narrow_1x1_gives_pytorchs_numbers(threads, shape):
    """The compiled 1x1 sums give F.conv2d's numbers bit for bit (as int32 patterns, signed zeros and tiny values
    included) on both sides of PyTorch's dispatch (its GEMM on one thread, oneDNN from two threads up or for batches
    of 16), with and without a bias. (On this project's AMD AVX-512 machine the GEMM's order is rounded products and
    oneDNN's fused multiply-adds; other BLAS or oneDNN builds may find another order or none.)"""
    x, w, b = _mean_shift_case(shape)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for bias in (b, None):
                got, want = narrow_conv.conv1x1_narrow(x, w, bias), F.conv2d(x, w, bias)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert narrow_conv.mix_order(shape[1], shape[1], shape) in (None, True, False)
    finally:
        torch.set_num_threads(old)


def test_narrow_1x1_is_the_path_taken_and_other_cases_are_pytorchs(monkeypatch):
    """The kernel runs (F.conv2d not called) for a float32 CPU map without autograd; with autograd, wide channels,
    another dtype or kernel size it is F.conv2d; an order that matches nowhere (a reference one ulp off) means
    F.conv2d."""
    x, w, b = _mean_shift_case((1, 3, 50, 60))
    calls = []
    real = F.conv2d
    monkeypatch.setattr(narrow_conv.F, 'conv2d', lambda *a, **k: calls.append(1) or real(*a, **k))
    if narrow_conv.mix_order(3, 3, x.shape) is None:
        pytest.skip('no compiled order here (numba missing or another BLAS/oneDNN)')
    with torch.no_grad():
        narrow_conv.conv1x1_narrow(x, w, b)
        assert not calls
        narrow_conv.conv1x1_narrow(torch.rand(1, 8, 9, 9), torch.rand(8, 8, 1, 1))
        narrow_conv.conv1x1_narrow(x.double(), w.double(), b.double())
        assert len(calls) == 2
    y = narrow_conv.conv1x1_narrow(x, w.clone().requires_grad_(), b)
    assert y.grad_fn is not None and len(calls) == 3

    def off_by_an_ulp(*args, **kwargs):
        y = real(*args, **kwargs)
        return torch.nextafter(y, torch.full_like(y, np.inf))

    monkeypatch.setattr(narrow_conv.F, 'conv2d', off_by_an_ulp)
    assert narrow_conv._find_mix_order(3, 3, False, False) is None


def test_mean_shift_runs_the_narrow_1x1(monkeypatch):
    """AdaFormer's MeanShift convolutions at CPU float32 inference go through conv1x1_narrow (same numbers as the
    module's convolution); under autocast they are the module's bf16 convolution."""
    from adasr.archs.adaformer_arch import MeanShift
    shift = MeanShift(3, (0.4488, 0.4371, 0.4040), 255.0, 1)
    with torch.no_grad():
        shift.weight.add_(0.01)
    x = torch.rand(1, 3, 40, 50) * 255
    calls = []
    real = narrow_conv.conv1x1_narrow
    monkeypatch.setattr(narrow_conv, 'conv1x1_narrow', lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(shift(x), F.conv2d(x, shift.weight, shift.bias)) and calls == [1]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert shift(x).dtype == torch.bfloat16 and calls == [1]
