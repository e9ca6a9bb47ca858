"""ops.layout: the blocked token -> NCHW transpose and the head-split window gather copy values only (bit for bit
PyTorch's reshape / gather + permuted copy)."""
import numpy as np
import pytest
import torch

from adasr.ops import layout
from adasr.ops.layout import rows_to_heads, tokens_to_nchw


@pytest.mark.parametrize('tiles', [True, False])
@pytest.mark.parametrize('b, h, w, c', [(1, 5, 7, 6), (2, 16, 24, 64), (3, 1, 1, 16), (2, 17, 19, 40)])
def test_tokens_to_nchw_equals_the_plain_reshape(monkeypatch, tiles, b, h, w, c):
    """Both engines: the compiled 16 x 16 tiles (with the tokens and channels left over, tasks that end inside a
    tile) and the PyTorch blocks."""
    monkeypatch.setattr(layout, 'BLOCK_TOKENS', 40)  # several blocks / tasks, the last one partial
    if not tiles:
        monkeypatch.setattr(layout, '_tile_transpose_kernel', lambda: None)
    elif layout._tile_transpose_kernel() is None:
        pytest.skip('numba does not import')
    t = torch.randn(b, h * w, c)
    with torch.no_grad():
        got = tokens_to_nchw(t, h, w)
    assert got.is_contiguous() and got.shape == (b, c, h, w)
    assert torch.equal(got, t.transpose(1, 2).reshape(b, c, h, w))
    assert torch.equal(got[1 % b, :, h - 1, w - 1], t[1 % b, -1])  # hand-picked entry: the last token of a sample


def test_tile_transpose_moves_a_tile_and_nothing_else():
    """One 16 x 16 tile at an offset inside larger arrays: y[c0 + i, r0 + j] = x[r0 + j, c0 + i], every other entry
    untouched."""
    kernel = layout._tile_transpose_kernel()
    if kernel is None:
        pytest.skip('numba does not import')
    x = np.arange(40 * 48, dtype=np.float32).reshape(40, 48)
    y = np.full((48, 40), -1.0, np.float32)
    kernel(x[:, :32].copy(), y[:32], 16, 32, 0, 32)  # rows 16..31, channels 0..31: two tiles
    assert np.array_equal(y[:32, 16:32], x[16:32, :32].T)
    assert (y[:32, :16] == -1).all() and (y[:32, 32:] == -1).all() and (y[32:] == -1).all()


def test_tokens_to_nchw_keeps_gradients_and_checks_the_size():
    t = torch.randn(2, 12, 3, requires_grad=True)
    y = tokens_to_nchw(t, 3, 4)
    (y * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert torch.equal(t.grad, torch.arange(3.0).expand(2, 12, 3))
    with torch.no_grad():  # a tensor that requires grad, read without autograd: the copy engines
        assert torch.equal(tokens_to_nchw(t, 3, 4), t.detach().transpose(1, 2).reshape(2, 3, 3, 4))
    with pytest.raises(ValueError, match='12 tokens do not make a 5x2 map'):
        tokens_to_nchw(t.detach(), 5, 2)


@pytest.mark.parametrize('threads', [0, 2])
@pytest.mark.parametrize('parts, heads, d, n, windows', [(3, 4, 13, 16, 20), (2, 1, 5, 4, 3)])
def test_rows_to_heads_is_the_gather_and_permuted_copy(threads, parts, heads, d, n, windows):
    """Every entry, in parallel tasks of eight windows (20 windows: a partial last task) or in the calling thread: the
    row gather, the permuted copy and part 0 times the scale, bit for bit; a hand-picked entry."""
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips

    from adasr.ops import config
    gen = torch.Generator().manual_seed(windows)
    x = torch.randn(windows * n + 3, parts * heads * d, generator=gen)
    perm = torch.randperm(x.shape[0], generator=gen)[:windows * n]
    scale = d ** -0.5
    with torch.no_grad(), config.options(threads=threads):
        got = rows_to_heads(x, perm, parts, heads, n, scale)
    want = x.index_select(0, perm).view(windows, n, parts, heads, d).permute(2, 0, 3, 1, 4).contiguous()
    want[0] *= scale
    assert got.shape == (parts, windows, heads, n, d) and got.is_contiguous() and torch.equal(got, want)
    w, t, hh = windows - 1, n - 1, heads - 1
    assert torch.equal(got[parts - 1, w, hh, t], x[perm[w * n + t], ((parts - 1) * heads + hh) * d:][:d])


def test_rows_to_heads_keeps_gradients_and_checks_its_operands():
    x = torch.randn(8, 2 * 3, requires_grad=True)
    perm = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    out = rows_to_heads(x, perm, 2, 1, 4, 0.5)  # autograd: the PyTorch ops
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.5] * 3 + [1.0] * 3).expand(8, 6))
    with torch.no_grad():
        with pytest.raises(ValueError, match='whole windows of 4'):
            rows_to_heads(x, perm[:6], 2, 1, 4)
        with pytest.raises(ValueError, match=r'not \(N, 4 x 1 x d\)'):
            rows_to_heads(x, perm, 4, 1, 4)
        if layout._rows_to_heads_kernel() is not None:
            with pytest.raises(IndexError, match='outside 0 .. 7'):
                rows_to_heads(x, perm + 1, 2, 1, 4)


@pytest.mark.parametrize('tiles', [True, False])
@pytest.mark.parametrize('b, h, w, c', [(1, 5, 7, 6), (2, 16, 24, 64), (3, 1, 1, 16), (2, 17, 19, 40)])
def test_nchw_to_tokens_equals_the_plain_transpose(monkeypatch, tiles, b, h, w, c):
    """Both engines, several tasks (the last partial, ending inside a tile), channels and tokens left over."""
    monkeypatch.setattr(layout, 'BLOCK_TOKENS', 40)
    if not tiles:
        monkeypatch.setattr(layout, '_tile_transpose_kernel', lambda: None)
    elif layout._tile_transpose_kernel() is None:
        pytest.skip('numba does not import')
    x = torch.randn(b, c, h, w)
    with torch.no_grad():
        got = layout.nchw_to_tokens(x)
    assert got.is_contiguous() and got.shape == (b, h * w, c)
    assert torch.equal(got, x.flatten(2).transpose(1, 2))
    assert torch.equal(got[b - 1, h * w - 1], x[b - 1, :, h - 1, w - 1])  # hand-picked: the last pixel's channels


def test_nchw_to_tokens_channels_last_gradients_and_tile_offsets():
    """A channels-last map is the tokens' layout already (the same storage, no copy); with autograd the plain
    transpose (gradients flow); the kernel's column range: tiles at a token offset, nothing else written."""
    x = torch.randn(2, 16, 4, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = layout.nchw_to_tokens(x)
    assert t.data_ptr() == x.data_ptr() and torch.equal(t, x.flatten(2).transpose(1, 2))
    g = torch.randn(1, 3, 2, 2, requires_grad=True)
    (layout.nchw_to_tokens(g) * torch.arange(3.0)).sum().backward()
    assert torch.equal(g.grad, torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    kernel = layout._tile_transpose_kernel()
    if kernel is None:
        pytest.skip('numba does not import')
    x2 = np.arange(32 * 50, dtype=np.float32).reshape(32, 50)  # (C, N)
    y = np.full((50, 32), -1.0, np.float32)
    kernel(x2, y, 0, 32, 16, 40)  # channels 0..31, tokens 16..39: two full tiles and 8 tokens left over
    assert np.array_equal(y[16:40], x2[:, 16:40].T)
    assert (y[:16] == -1).all() and (y[40:] == -1).all()


@pytest.mark.parametrize('tiles', [True, False])
def test_to_channels_last_is_the_plain_conversion(monkeypatch, tiles):
    """NCHW maps (both engines), a channels-last map (returned as it is), a strided view: the values and the
    channels-last layout of ``contiguous(memory_format=torch.channels_last)``."""
    if not tiles:
        monkeypatch.setattr(layout, '_tile_transpose_kernel', lambda: None)
    for x in (torch.randn(2, 40, 17, 19), torch.randn(1, 3, 5, 4)):
        with torch.no_grad():
            got = layout.to_channels_last(x)
        assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, x)
        assert torch.equal(got.permute(0, 2, 3, 1).reshape(-1), x.permute(0, 2, 3, 1).reshape(-1))
    cl = torch.randn(1, 16, 6, 7).contiguous(memory_format=torch.channels_last)
    assert layout.to_channels_last(cl) is cl
    view = torch.randn(1, 8, 6, 14)[..., ::2]
    assert torch.equal(layout.to_channels_last(view), view)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('shape, scale', [((1, 48, 17, 30), 4), ((2, 12, 7, 9), 2), ((1, 27, 5, 6), 3),
                                          ((3, 4, 1, 1), 2)])
def test_pixel_shuffle_nchw_is_the_shuffle_and_copy(threads, shape, scale):
    """The compiled pass over a channels-last map gives F.pixel_shuffle(x, s).contiguous() (values only moved); an
    NCHW map, autograd and a channel count that is no multiple of s^2 take or refuse as PyTorch would."""
    import torch.nn.functional as F
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            got = layout.pixel_shuffle_nchw(x, scale)
            assert got.is_contiguous() and torch.equal(got, F.pixel_shuffle(x, scale))
            assert torch.equal(layout.pixel_shuffle_nchw(x.contiguous(), scale), got)
    finally:
        torch.set_num_threads(old)
    xg = x.clone().requires_grad_()
    layout.pixel_shuffle_nchw(xg, scale).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match='multiple'):
        layout.pixel_shuffle_nchw(torch.randn(1, 5, 2, 2), 2)
