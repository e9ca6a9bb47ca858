"""adasr.ops.cpu_inference: the cache-sized CPU inference engines give the plain PyTorch numbers bit for bit."""
import os
import os.path as osp
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adasr.archs.layers import window_partition, window_reverse
from adasr.ops import codegen
from adasr.ops import cpu_inference as ci
from tests.helpers.numerics import assert_same_numbers

pytestmark = pytest.mark.skipif(not ci._HAS_LINEAR_POINTWISE or not torch.backends.mkldnn.is_available(),
                                reason='needs PyTorch with oneDNN')


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('shape', [(2, 64), (16, 64), (300, 64), (4099, 64), (2, 33, 64)])
def test_linear_matches_f_linear(shape):
    x = torch.randn(*shape, generator=_gen(0))
    w, b = torch.randn(96, 64, generator=_gen(1)) * 0.1, torch.randn(96, generator=_gen(2))
    with torch.no_grad():
        assert ci.fast_path_ok(x)
        assert_same_numbers(ci.linear(x, w, b), F.linear(x, w, b))
    w.requires_grad_(True)
    y = ci.linear(x, w, b)  # autograd: the plain op, gradients flow
    assert y.requires_grad and not ci.fast_path_ok(x)
    y.sum().backward()
    assert torch.allclose(w.grad, x.reshape(-1, 64).sum(0).expand(96, 64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('shape', [(16, 64), (300, 64), (2, 2049, 64)])
def test_linear_gelu_matches_plain_gelu_of_linear(shape):
    """The fused fc1 + exact GELU (oneDNN's GELU post-op) gives ``F.gelu(F.linear(...))`` bit for bit (within
    float32 rounding where the BLAS rounds otherwise: tests/helpers/numerics.py); under autograd the plain
    operators, gradients flow."""
    x = torch.randn(*shape, generator=_gen(7))
    w, b = torch.randn(128, 64, generator=_gen(8)) * 0.1, torch.randn(128, generator=_gen(9))
    with torch.no_grad():
        assert_same_numbers(ci.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    x.requires_grad_(True)
    y = ci.linear_gelu(x, w, b)
    y.sum().backward()
    assert torch.equal(y.detach(), F.gelu(F.linear(x.detach(), w, b))) and x.grad is not None


# in a child limited to AVX2 code (MKL, oneDNN, ATen): linear and linear_gelu for the shapes of AdaFormer (64 -> 128 /
# 192, 128 -> 64) and PFT-light (52 -> 156 / 104, 104 -> 52) at one and two threads, against the plain operators and
# cut into groups of rows
_AVX2_LINEARS = r'''
import torch
import torch.nn.functional as F
from adasr.ops import cpu_inference as ci
torch.set_grad_enabled(False)
assert torch.backends.cpu.get_cpu_capability() == 'AVX2'
g = torch.Generator().manual_seed(5)
bad, worst = [], 0.0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for k, n in ((64, 128), (64, 192), (128, 64), (52, 156), (52, 104), (104, 52)):
        w, b = torch.randn(n, k, generator=g) * k ** -0.5, torch.randn(n, generator=g)
        x = torch.randn(9000, k, generator=g)
        for fn, plain in ((ci.linear, F.linear), (ci.linear_gelu, lambda *a: F.gelu(F.linear(*a)))):
            whole, ref = fn(x, w, b), plain(x, w, b)
            worst = max(worst, float((whole - ref).abs().max() / ref.abs().max()))
            for rows in (18, 20, 300, 2048, 8192):  # (every piece of at least LINEAR_MIN_ROWS rows)
                if not torch.equal(torch.cat([fn(x[s:s + rows], w, b) for s in range(0, len(x), rows)]), whole):
                    bad.append((fn.__name__, threads, k, n, rows))
print('row-invariant' if not bad else bad, worst, ci.blas_batch_invariant())
'''


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64') or not torch.backends.mkl.is_available()
                    or torch.backends.cpu.get_cpu_capability() not in ('AVX2', 'AVX512'), reason='needs x86 with MKL')
def test_linears_in_avx2_code_are_row_invariant_and_close_to_pytorch_s():
    """With AVX2 code only (as on the AVX2 machines this suite runs on, Intel ones included: there MKL picks other
    kernels for a few rows or another share per thread, and rounds a 64 -> 128 product and the GELU otherwise than
    oneDNN), ``linear`` and ``linear_gelu`` give each row the same numbers in any group of rows (18 to 8192, the
    engines' groups and blocks) at one and two threads, and the plain operators' numbers within float32 rounding
    (2e-6 relative, for every shape of the two networks)."""
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS='AVX2', ONEDNN_MAX_CPU_ISA='AVX2', DNNL_MAX_CPU_ISA='AVX2',
               ATEN_CPU_CAPABILITY='avx2')
    proc = subprocess.run([sys.executable, '-c', _AVX2_LINEARS], env=env, capture_output=True, text=True, timeout=300,
                          cwd=osp.dirname(osp.dirname(osp.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict, worst, _ = proc.stdout.split(maxsplit=2)
    assert verdict == 'row-invariant' and float(worst) < 2e-6, proc.stdout


def test_blas_batch_invariant_is_a_cached_answer(monkeypatch):
    """The check of PyTorch's BLAS (is a product's result independent of the rows and batch around it?) answers a
    bool per thread count, once: what it says holds for a product it did not check."""
    monkeypatch.setattr(ci, '_invariant', {})
    answer = ci.blas_batch_invariant()
    assert isinstance(answer, bool) and list(ci._invariant.values()) == [answer]
    assert ci.blas_batch_invariant() is answer and len(ci._invariant) == 1
    x = torch.randn(4096, 64, generator=_gen(13))
    w, b = torch.randn(128, 64, generator=_gen(14)) * 0.1, torch.randn(128, generator=_gen(15))
    with torch.no_grad():
        if answer:
            assert torch.equal(F.linear(x[:300], w, b), F.linear(x, w, b)[:300])


@pytest.mark.parametrize('b, n, rows, threads', [(1, 5000, 2048, 1), (2, 700, 256, 1), (1, 64, 2048, 1),
                                                 (1, 9000, None, 1), (1, 9000, None, 2)])
def test_residual_rows_matches_whole_map(b, n, rows, threads, torch_threads):
    """x += a; x += MLP(LN(x)) in groups of rows = the whole-map computation (a pre-norm MLP block); the default
    groups (2048 rows on one thread, 4096 per thread on more) too."""
    torch.manual_seed(0)
    torch_threads(threads)
    norm, fc1, fc2 = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)

    def fn(r):
        return ci.linear(ci.linear_gelu(norm(r), fc1.weight, fc1.bias), fc2.weight, fc2.bias)

    x, a = torch.randn(b, n, 64, generator=_gen(3)), torch.randn(b, n, 64, generator=_gen(4))
    groups = []
    with torch.no_grad():
        ref = x + a
        ref = ref + fn(ref)
        out = x.clone()
        assert ci.residual_rows_(out, lambda r: groups.append(len(r)) or fn(r), a, rows=rows) is out
        assert torch.equal(out, ref)  # oneDNN's linears: a row's numbers whatever the group, on every CPU
        plain = x.clone()
        ci.residual_rows_(plain, lambda r: fc2(F.gelu(fc1(norm(r)))), rows=rows)
        assert_same_numbers(plain, x + fc2(F.gelu(fc1(norm(x)))))
    size = rows or (2048 if threads == 1 else 4096 * threads)
    assert groups == [min(size, n - s) for _ in range(b) for s in range(0, n, size)]


def _plain_window_attention(qkv, bias, heads):
    nw, n, c3 = qkv.shape
    q, k, v = qkv.view(nw, n, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1)).add_(bias).softmax(-1)
    return (attn @ v).transpose(1, 2).reshape(nw, n, c3 // 3)


@pytest.mark.parametrize('nw, windows', [(37, 16), (5, 16), (32, 8)])
def test_window_attention_matches_batched(nw, windows):
    qkv = torch.randn(nw, 64, 192, generator=_gen(5))
    bias = torch.randn(4, 64, 64, generator=_gen(6))
    with torch.no_grad():
        assert torch.equal(ci.window_attention(qkv, bias, 4, windows), _plain_window_attention(qkv, bias, 4))


@pytest.mark.parametrize('b, h, w, windows', [(1, 24, 40, 16), (2, 16, 136, 16), (1, 8, 8, 4)])
def test_window_attention_add_matches_partition_and_reverse(b, h, w, windows):
    """Reading windows from the raster qkv map and adding into the raster destination = partition, attention,
    reverse, plus the destination."""
    s, c = 8, 64
    qkv = torch.randn(b, h, w, 3 * c, generator=_gen(7))
    bias = torch.randn(4, s * s, s * s, generator=_gen(8))
    dst = torch.randn(b, h * w, c, generator=_gen(9))
    with torch.no_grad():
        local = _plain_window_attention(window_partition(qkv, s), bias, 4)
        ref = window_reverse(local, s, h, w).view(b, h * w, c) + dst
        out = dst.clone()
        assert ci.window_attention_add_(qkv, bias, 4, s, out, windows) is out
        assert torch.equal(out, ref)


@pytest.mark.parametrize('compiled', [True, False])
def test_window_attention_by_head_layout_and_pytorch_views_agree(compiled, monkeypatch):
    """Both engines (q, k, v copied by head by the compiled kernels, or PyTorch's 4-D views) give the plain
    numbers, written or added into windows of a list and of a raster map, with a last group of fewer windows."""
    if compiled and codegen.compiled(ci._windows_to_heads) is None:
        pytest.skip('numba is not available')
    if not compiled:
        real = codegen.compiled
        monkeypatch.setattr(codegen, 'compiled', lambda fn: None if fn is ci._windows_to_heads else real(fn))
    assert ci._WindowGroups.available(torch.zeros(1)) is compiled
    s, c = 8, 64
    qkv = torch.randn(2, 16, 56, 3 * c, generator=_gen(10))
    bias = torch.randn(4, s * s, s * s, generator=_gen(11))
    dst = torch.randn(2, 16 * 56, c, generator=_gen(12))
    with torch.no_grad():
        listed = window_partition(qkv, s)  # 28 windows
        assert torch.equal(ci.window_attention(listed, bias, 4, 12), _plain_window_attention(listed, bias, 4))
        ref = window_reverse(_plain_window_attention(listed, bias, 4), s, 16, 56).view(2, -1, c) + dst
        assert torch.equal(ci.window_attention_add_(qkv, bias, 4, s, dst.clone(), 4), ref)


@pytest.mark.parametrize('b, h, w, threads', [(1, 24, 40, 1), (2, 9, 13, 1), (1, 24, 40, 2)])
def test_conv1x1_tokens_gives_the_convolution_s_numbers(b, h, w, threads, torch_threads, monkeypatch):
    """A 1x1 convolution as tokens: the convolution's numbers bit for bit at any shape and thread count. The first
    call of a shape runs both and remembers whether oneDNN's linear matches PyTorch's choice of GEMM; later calls
    run the linear alone where it did, the convolution where it did not."""
    torch_threads(threads)
    monkeypatch.setattr(ci, '_pointwise_same', {})
    x = torch.randn(b, 64, h, w, generator=_gen(20)) * 20
    wt, bias = torch.randn(48, 64, 1, 1, generator=_gen(21)) * 0.1, torch.randn(48, generator=_gen(22))
    ref = F.conv2d(x, wt, bias).flatten(2).transpose(1, 2)
    tokens = x.flatten(2).transpose(1, 2).contiguous()
    with torch.no_grad():  # a first map with a NaN decides nothing (NaN never equals itself); its NaNs pass through
        bad = x.clone()
        bad[0, 3, 1, 2] = float('nan')
        got = ci.conv1x1_tokens(bad, bad.flatten(2).transpose(1, 2).contiguous(), wt, bias)
        assert ci._pointwise_same == {} and torch.equal(got.isnan(), F.conv2d(bad, wt, bias).flatten(2).transpose(
            1, 2).isnan())
        first = ci.conv1x1_tokens(x, tokens, wt, bias)
        (key, same), = ci._pointwise_same.items()
        assert key == ((b, 64, h, w), (48, 64, 1, 1), threads) and isinstance(same, bool)
        assert torch.equal(first, ref) and first.is_contiguous()
        calls, linear, conv2d = [], ci.linear, F.conv2d
        monkeypatch.setattr(ci, 'linear', lambda *a: calls.append('linear') or linear(*a))
        monkeypatch.setattr(ci.F, 'conv2d', lambda *a: calls.append('conv') or conv2d(*a))
        assert torch.equal(ci.conv1x1_tokens(x, tokens, wt, bias), ref)
        assert calls == (['linear'] if same else ['conv'])
        monkeypatch.setitem(ci._pointwise_same, key, False)  # a machine whose GEMMs round otherwise
        calls.clear()
        assert torch.equal(ci.conv1x1_tokens(x, tokens, wt, bias), ref) and calls == ['conv']
    # under autograd: the convolution itself, gradients flow
    wt.requires_grad_(True)
    y = ci.conv1x1_tokens(x, tokens, wt, bias)
    y.sum().backward()
    assert wt.grad is not None and wt.grad.shape == wt.shape


@pytest.mark.parametrize('shape', [(2, 64), (300, 64), (2, 2049, 64)])
def test_linear_add_is_the_linear_plus_the_other(shape):
    """``F.linear(x) + other`` with the addition as oneDNN's post-op: the two roundings of the plain computation
    (oneDNN's linear as :func:`linear`), any row count; without the fast path the plain operators."""
    x = torch.randn(*shape, generator=_gen(23))
    w, b = torch.randn(32, 64, generator=_gen(24)) * 0.1, torch.randn(32, generator=_gen(25))
    other = torch.randn(*shape[:-1], 32, generator=_gen(26)) * 50
    with torch.no_grad():
        assert torch.equal(ci.linear_add(x, other, w, b), ci.linear(x, w, b) + other)
        assert_same_numbers(ci.linear_add(x, other, w, b), F.linear(x, w, b) + other)
        strided = other.transpose(-2, -1).contiguous().transpose(-2, -1)  # not contiguous: the plain operators
        assert_same_numbers(ci.linear_add(x, strided, w, b), F.linear(x, w, b) + other)
    y = ci.linear_add(x, other, w.requires_grad_(True), b)
    y.sum().backward()
    assert w.grad is not None


def test_fast_path_only_without_autograd():
    x = torch.randn(4, 8)
    assert not ci.fast_path_ok(x)  # grad mode on
    with torch.no_grad():
        assert ci.fast_path_ok(x) and not ci.fast_path_ok(x.double())
