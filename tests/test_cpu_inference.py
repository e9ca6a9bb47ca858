"""adasr.ops.cpu_inference: the cache-sized CPU inference engines give the plain PyTorch numbers bit for bit."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adasr.archs.layers import window_partition, window_reverse
from adasr.ops import cpu_inference as ci

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
        assert torch.equal(ci.linear(x, w, b), F.linear(x, w, b))
    w.requires_grad_(True)
    y = ci.linear(x, w, b)  # autograd: the plain op, gradients flow
    assert y.requires_grad and not ci.fast_path_ok(x)
    y.sum().backward()
    assert torch.allclose(w.grad, x.reshape(-1, 64).sum(0).expand(96, 64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('b, n, rows, threads', [(1, 5000, 2048, 1), (2, 700, 256, 1), (1, 64, 2048, 1),
                                                 (1, 9000, None, 1), (1, 9000, None, 2)])
def test_residual_rows_matches_whole_map(b, n, rows, threads, torch_threads):
    """x += a; x += MLP(LN(x)) in groups of rows = the whole-map computation (a pre-norm MLP block); the default
    groups (2048 rows on one thread, 4096 per thread on more) too."""
    torch.manual_seed(0)
    torch_threads(threads)
    norm, fc1, fc2 = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)

    def fn(r):
        return torch.ops.mkldnn._linear_pointwise(
            torch.ops.mkldnn._linear_pointwise(norm(r), fc1.weight, fc1.bias, 'gelu', [], 'none'),
            fc2.weight, fc2.bias, 'none', [], '')

    x, a = torch.randn(b, n, 64, generator=_gen(3)), torch.randn(b, n, 64, generator=_gen(4))
    groups = []
    with torch.no_grad():
        ref = x + a
        ref = ref + fn(ref)
        out = x.clone()
        assert ci.residual_rows_(out, lambda r: groups.append(len(r)) or fn(r), a, rows=rows) is out
        assert torch.equal(out, ref)
        plain = x.clone()
        ci.residual_rows_(plain, lambda r: fc2(F.gelu(fc1(norm(r)))), rows=rows)
        assert torch.equal(plain, x + fc2(F.gelu(fc1(norm(x)))))
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


def test_fast_path_only_without_autograd():
    x = torch.randn(4, 8)
    assert not ci.fast_path_ok(x)  # grad mode on
    with torch.no_grad():
        assert ci.fast_path_ok(x) and not ci.fast_path_ok(x.double())
