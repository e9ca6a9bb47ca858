"""adasr.ops.winograd: Winograd 3x3 convolution against F.conv2d in float64 (both tile-transform engines)."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adasr.ops import blas, config, winograd
from tests.helpers.numerics import assert_same_numbers

ENGINES = ['torch', pytest.param('auto', marks=pytest.mark.skipif(not winograd.numba_available(),
                                                                   reason='numba is not installed'))]
# max abs error / max |reference| for inputs ~N(0, 1) and weights ~N(0, 1/fan_in): a wrong coefficient gives O(1)
C, CO = 4, 6  # channels of most cases (the compiled transforms are specialised to them: few compilations)
REL_TOL = {'f2': 2e-6, 'f3': 1e-5, 'f4': 1e-5, 'f4-lavin': 3e-5}


@pytest.fixture(params=ENGINES)
def engine(request):
    winograd.set_engine(request.param)
    yield request.param
    winograd.set_engine('auto')


def _reference(x, w, b, relu=False):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, 1)
    return y.relu() if relu else y


def _rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize('variant', sorted(winograd.VARIANTS))
def test_transform_matrices_compute_the_1d_correlation(variant):
    m, points = winograd.VARIANTS[variant]
    at, g, bt = winograd.transform_matrices(m, points)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        k = torch.randn(3, generator=gen, dtype=torch.float64)
        d = torch.randn(m + 2, generator=gen, dtype=torch.float64)
        expected = torch.stack([(k * d[i:i + 3]).sum() for i in range(m)])
        torch.testing.assert_close(at @ ((g @ k) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_transform_matrices_reject_bad_points():
    with pytest.raises(ValueError):
        winograd.transform_matrices(4, (0.0, 1.0, -1.0, 2.0))  # 4 points for F(4, 3), which needs 5
    with pytest.raises(ValueError):
        winograd.transform_matrices(2, (0.0, 1.0, 1.0))


@pytest.mark.parametrize('variant', sorted(winograd.VARIANTS))
def test_hand_computed_box_filter(engine, variant):
    """All-ones 4x5 image (C channels), all-ones 3x3 kernels, padding 1: each output is C times the count of its
    in-image neighbours (4 in the corners, 6 on the edges, 9 inside), plus the bias 0.5."""
    x = torch.ones(1, C, 4, 5)
    w = torch.ones(CO, C, 3, 3)
    counts = torch.tensor([[4., 6., 6., 6., 4.],
                           [6., 9., 9., 9., 6.],
                           [6., 9., 9., 9., 6.],
                           [4., 6., 6., 6., 4.]])
    with torch.no_grad():
        y = winograd.winograd_conv3x3(x, w, torch.full((CO,), 0.5), variant=variant)
    torch.testing.assert_close(y, (C * counts + 0.5).expand(1, CO, 4, 5), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('variant', sorted(winograd.VARIANTS))
@pytest.mark.parametrize('shape', [(1, 1, 1), (2, 7, 9), (1, 13, 5), (2, 12, 16), (1, 17, 30)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_matches_conv2d(engine, variant, shape, channels_last):
    gen = torch.Generator().manual_seed(sum(shape))
    (n, h, w), c, co = shape, C, CO
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(co, c, 3, 3, generator=gen) / (3 * c ** 0.5)
    bias = torch.randn(co, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = winograd.winograd_conv3x3(x, weight, bias, variant=variant)
    ref = _reference(x, weight, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    if h * w > 1:  # a 1x1 map is contiguous in both formats
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert y.is_contiguous() != channels_last
    assert _rel_err(y, ref) < REL_TOL[variant]


@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_relu_and_no_bias(engine, channels_last):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 10, 11, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(CO, C, 3, 3, generator=gen) / 6
    with torch.no_grad():
        y = winograd.winograd_conv3x3(x, weight, None, relu=True)
    ref = _reference(x, weight, None, relu=True)
    assert (y >= 0).all() and (y == 0).any()
    assert _rel_err(y, ref) < REL_TOL[winograd.DEFAULT_VARIANT]


def test_engines_agree_and_threads_give_the_same_numbers():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, C, 40, 72, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(CO, C, 3, 3, generator=gen) / 6
    conv = winograd.WinogradConv3x3(weight, torch.randn(CO, generator=gen))
    threads = torch.get_num_threads()
    old_block = winograd._BLOCK_TILES
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = conv(x)
            winograd._BLOCK_TILES = 18  # one tile row per block: many blocks
            torch.set_num_threads(2)
            two = conv(x)  # blocks on the worker pool
    finally:
        torch.set_num_threads(threads)
        winograd._BLOCK_TILES = old_block
    # other blocks, so other product groups: bit for bit where the BLAS multiplies a tile alike in any group
    assert_same_numbers(two, one)
    winograd.set_engine('torch')
    try:
        with torch.no_grad():
            other = conv(x)
    finally:
        winograd.set_engine('auto')
    torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-5)


def test_refuses_autograd():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match='inference-only'):
        winograd.winograd_conv3x3(x, weight)
    with pytest.raises(RuntimeError, match='inference-only'):
        winograd.winograd_conv3x3(x.detach(), weight.requires_grad_())
    with pytest.raises(RuntimeError, match='inference-only'):
        winograd.WinogradConv3x3(weight)(x)
    with torch.no_grad():
        winograd.winograd_conv3x3(x, weight)  # fine without autograd


def test_conv3x3_falls_back_to_direct_where_winograd_cannot_run():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 9, 9, generator=gen, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, generator=gen)
    bias = torch.randn(5, generator=gen)
    y = winograd.conv3x3(x, weight, bias, relu=True, method='winograd')  # autograd: F.conv2d, differentiable
    assert y.grad_fn is not None
    torch.testing.assert_close(y, F.relu(F.conv2d(x, weight, bias, 1, 1)), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        xd = x.detach().double()  # float64: not Winograd's dtype
        torch.testing.assert_close(winograd.conv3x3(xd, weight.double(), method='f4'),
                                   F.conv2d(xd, weight.double(), None, 1, 1), rtol=0, atol=0)
        assert not winograd.winograd_supported(x.detach(), torch.randn(5, 4, 5, 5))


def test_conv3x3_method_option(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, C, 12, 12, generator=gen)
    weight = torch.randn(CO, C, 3, 3, generator=gen) / 6
    direct = F.conv2d(x, weight, None, 1, 1)
    with torch.no_grad():
        monkeypatch.delenv('ADASR_CONV3X3', raising=False)
        torch.testing.assert_close(winograd.conv3x3(x, weight), direct, rtol=0, atol=0)  # default 'auto': direct
        torch.testing.assert_close(winograd.conv3x3(x, weight, method='auto'), direct, rtol=0, atol=0)
        monkeypatch.setenv('ADASR_CONV3X3', 'f2')
        y = winograd.conv3x3(x, weight)
        assert not torch.equal(y, direct)  # another rounding
        assert _rel_err(y, _reference(x, weight, None)) < REL_TOL['f2']
        with config.options(conv3x3='direct'):
            torch.testing.assert_close(winograd.conv3x3(x, weight), direct, rtol=0, atol=0)
        monkeypatch.setenv('ADASR_CONV3X3', 'f9')
        with pytest.raises(ValueError, match='ADASR_CONV3X3'):
            winograd.conv3x3(x, weight)
    assert set(config.CONV3X3_METHODS) == {'auto', 'direct', 'winograd'} | set(winograd.VARIANTS)


def test_prepacked_weights_follow_in_place_updates():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, C, 8, 8, generator=gen)
    conv = torch.nn.Conv2d(C, CO, 3, padding=1)
    with torch.no_grad():
        first = winograd.conv3x3(x, conv.weight, conv.bias, method='winograd')
        assert winograd.conv3x3(x, conv.weight, conv.bias, method='winograd') is not first
        conv.weight.mul_(2)  # bumps the version: the cache transforms it again
        conv.bias.zero_()
        second = winograd.conv3x3(x, conv.weight, conv.bias, method='winograd')
    ref = _reference(x, conv.weight, conv.bias)
    assert _rel_err(second, ref) < REL_TOL[winograd.DEFAULT_VARIANT]
    assert not torch.allclose(first, second)


def test_rejects_unsupported_input():
    weight = torch.randn(4, 4, 3, 3)
    with torch.no_grad():
        with pytest.raises(ValueError):
            winograd.winograd_conv3x3(torch.randn(1, 3, 8, 8), weight)  # channel mismatch
        with pytest.raises(ValueError):
            winograd.winograd_conv3x3(torch.randn(1, 4, 8, 8, dtype=torch.float64), weight)
        with pytest.raises(ValueError):
            winograd.WinogradConv3x3(torch.randn(4, 4, 5, 5))
        with pytest.raises(ValueError, match='variant'):
            winograd.WinogradConv3x3(weight, variant='f7')


def test_inference_mode_and_strided_input(engine):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(1, C, 14, 22, generator=gen)
    x = base[:, :, 1:, ::2]  # neither NCHW- nor channels_last-contiguous: NCHW out
    weight = torch.randn(CO, C, 3, 3, generator=gen) / 6
    with torch.inference_mode():
        y = winograd.winograd_conv3x3(x, weight, None, relu=True)
    assert y.is_contiguous()
    assert _rel_err(y, _reference(x, weight, None, relu=True)) < REL_TOL[winograd.DEFAULT_VARIANT]


def _python_blocks(monkeypatch, fn, group=None):
    """``fn()`` with the compiled block driver turned off (the Python block loop around ``torch.bmm``), its product
    groups of ``group`` tiles when given."""
    with monkeypatch.context() as m:
        m.setattr(winograd, '_blas_matches', lambda *args: False)
        if group:
            m.setattr(winograd, '_GROUP_TILES', group)
        return fn()


needs_blas = pytest.mark.skipif(not winograd.numba_available() or blas.sgemm_symbol() is None,
                                reason="numba or PyTorch's exported BLAS sgemm_ is missing")


@needs_blas
@pytest.mark.parametrize('variant', ['f2', 'f4'])
@pytest.mark.parametrize('shape,block_tiles,group_tiles', [((1, 16, 40), 128, 64), ((2, 13, 29), 128, 64),
                                                           ((1, 12, 16), 18, 64), ((1, 9, 7), 2, 64),
                                                           ((1, 16, 40), 128, 7), ((2, 13, 29), 40, 12),
                                                           ((1, 32, 1), 4, 64), ((1, 48, 3), 4, 64),
                                                           ((2, 30, 11), 12, 4)])
def test_compiled_blocks_give_the_python_loops_numbers(monkeypatch, variant, shape, block_tiles, group_tiles):
    """The compiled driver (input strip, transforms and BLAS products in one call) gives the Python block loop's
    numbers bit for bit: whole and partial tiles (odd sizes), a last block of fewer tile rows, product groups within
    a tile row and across tile rows with a last smaller group, batches, ReLU, one and two threads (the worker pool),
    and it is the path taken for channels-last tensors. Blocks inside the image read their inner tiles from the
    input itself and the first and last tile column from zero-padded edge strips: images one to three tile columns
    wide (one column: the edge strip is cut at the image's right edge too) and wider ones."""
    gen = torch.Generator().manual_seed(sum(shape))
    (n, h, w), c, co = shape, 8, 16
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(co, c, 3, 3, generator=gen) / 8, torch.randn(co, generator=gen)
    conv = winograd.WinogradConv3x3(weight, bias, variant)
    monkeypatch.setattr(winograd, '_BLOCK_TILES', block_tiles)
    monkeypatch.setattr(winograd, '_GROUP_TILES', group_tiles)
    monkeypatch.setattr(winograd, '_DRIVER_MIN_BLOCKS', 1)
    nr, nq = -(-h // conv.plan.m), -(-w // conv.plan.m)
    rows = max(1, block_tiles // nq)
    # the driver's product groups: group_tiles, else a fallback size or whole blocks the BLAS check passes
    group = winograd._driver_group(winograd._kernels(conv.plan, c, co), conv.plan, c, co,
                                   {rows * nq, nr % rows * nq})
    calls = []
    driver = winograd._forward_compiled
    monkeypatch.setattr(winograd, '_forward_compiled', lambda *a: calls.append(1) or driver(*a))
    threads = torch.get_num_threads()
    r = torch.randn(n, co, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            for relu in (False, True):
                for t in (1, 2):
                    torch.set_num_threads(t)
                    ref = _python_blocks(monkeypatch, lambda: conv(x, relu), group)
                    y = conv(x, relu)
                    assert y.is_contiguous(memory_format=torch.channels_last)
                    torch.testing.assert_close(y, ref, rtol=0, atol=0)
            for t in (1, 2):  # the residual added in the output transform: the numbers of the addition after it
                torch.set_num_threads(t)
                ref = _python_blocks(monkeypatch, lambda: conv(x).add_(r), group)
                torch.testing.assert_close(winograd._forward(x, conv, False, r), ref, rtol=0, atol=0)
                acc = r.clone()
                assert winograd._forward(x, conv, False, acc, True) is acc
                torch.testing.assert_close(acc, ref, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    # the driver runs where this BLAS gives torch.bmm's numbers for the groups' tile counts (MKL on an AMX Xeon does
    # not below 4 tiles: there the Python loop runs, with the same numbers, as asserted above)
    assert len(calls) == (0 if group is None else 8)
    assert _rel_err(y, _reference(x, weight, bias, relu=True)) < REL_TOL[variant]


@needs_blas
def test_blas_check_rejects_other_numbers_and_falls_back(monkeypatch):
    """The driver runs only where its products equal torch.bmm's bit for bit: a BLAS giving other numbers (here a
    stand-in whose products are off by one ulp) or no exported sgemm_ means the Python loop, with its numbers."""
    plan = winograd._plan('f2')
    kernels = winograd._kernels(plan, 8, 16)

    class OffByOne:
        @staticmethod
        def gemms(v, u, prod, t, params):
            kernels.gemms(v, u, prod, t, params)
            prod[0, 0, 0] = torch.nextafter(torch.tensor(prod[0, 0, 0]), torch.tensor(float('inf'))).item()

    monkeypatch.setattr(winograd, '_blas_checked', {})
    assert winograd._blas_matches(kernels, plan, 8, 16, {24, 0})
    assert not winograd._blas_matches(OffByOne, plan, 8, 16, {25})
    assert winograd._blas_checked == {('f2', 8, 16, 24): True, ('f2', 8, 16, 25): False}
    monkeypatch.setattr(winograd, '_blas_checked', {})
    monkeypatch.setattr(winograd, '_DRIVER_MIN_BLOCKS', 1)
    monkeypatch.setattr(blas, 'sgemm_symbol', lambda: None)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 8, 10, 50, generator=gen).contiguous(memory_format=torch.channels_last)
    conv = winograd.WinogradConv3x3(torch.randn(16, 8, 3, 3, generator=gen) / 8, None, 'f2')
    with torch.no_grad():
        y = conv(x)
    assert set(winograd._blas_checked.values()) == {False}
    with torch.no_grad():
        torch.testing.assert_close(y, _python_blocks(monkeypatch, lambda: conv(x)), rtol=0, atol=0)


@pytest.mark.skipif(not winograd.numba_available(), reason='numba is not installed')
@pytest.mark.parametrize('variant', ['f2', 'f4'])
@pytest.mark.parametrize('w', [1, 2, 3, 7, 8, 13])
def test_tiles_read_inside_the_image_equal_the_strips(variant, w):
    """``input_tiles_image`` (a block inside the image: inner tile columns read from the image rows, the first and
    the last from zero-padded edge strips) gives ``input_tiles``' transformed tiles of the zero-padded strip bit for
    bit, for images one tile column wide (the first column is also the last: its strip is cut at the right edge),
    two, and more, whole and partial last tiles, and tile groups starting inside a tile row."""
    plan = winograd._plan(variant)
    m, a, c = plan.m, plan.m + 2, C
    k = winograd._kernels(plan, C, CO)
    nq, nrb, y0 = -(-w // m), 2, 3  # a block of two tile rows reading image rows 3 .. 3 + 2 m + 1
    h = y0 + nrb * m + 3
    x = torch.randn(h, w, c, generator=torch.Generator().manual_seed(w)).numpy()
    strip = np.zeros((nrb * m + 2, (nq * m + 2) * c), np.float32)
    strip.reshape(nrb * m + 2, nq * m + 2, c)[:, 1:w + 1] = x[y0:y0 + nrb * m + 2]
    edges = np.zeros((2, nrb * m + 2, a * c), np.float32)
    for edge, q in ((edges[0], 0), (edges[1], nq - 1)):  # pixel columns q m - 1 .. q m + m, zero outside the image
        for j in range(a):
            if 0 <= q * m - 1 + j < w:
                edge.reshape(nrb * m + 2, a, c)[:, j] = x[y0:y0 + nrb * m + 2, q * m - 1 + j]
    t = nrb * nq
    for i0, i1 in ((0, t), (1, t), (nq - 1, min(t, nq + 1))):
        ref, got = (np.full((i1 - i0, a * a * c), np.nan, np.float32) for _ in range(2))
        k.input_tiles(strip, i0, i1, nq, ref)
        k.input_tiles_image(x.reshape(h, -1), y0, edges, i0, i1, nq, got)
        np.testing.assert_array_equal(got, ref)


def test_sgemm_params_layout():
    p = blas.sgemm_params(64, 240, 32, 64, 1024, 64)
    assert chr(p[0]) == 'N' and p[1:7].tolist() == [64, 240, 32, 64, 1024, 64]
    assert p[7:].view(np.float32).tolist() == [1.0, 0.0]


def test_product_groups_of_blocks(monkeypatch):
    """A block's tiles are multiplied ``_GROUP_TILES`` at a time; the BLAS check covers every group size."""
    monkeypatch.setattr(winograd, '_GROUP_TILES', 64)
    assert winograd._group_sizes({240, 0}) == {64, 48}  # F(2x2) at width 480: 3 groups of 64 and one of 48
    assert winograd._group_sizes({128, 64}) == {64}
    assert winograd._group_sizes({30, 120}) == {30, 64, 56}
    assert winograd._group_sizes({240}, 56) == {56, 16}


@needs_blas
def test_driver_and_python_loop_take_the_same_groups(monkeypatch):
    """Where groups of 64 fail the BLAS check (a stand-in for Intel's MKL in AVX2 code), the driver (channels-last,
    enough blocks) and the Python block loop (NCHW) both multiply in the fallback groups of 60: a tile's numbers do
    not depend on the memory format."""
    monkeypatch.setattr(winograd, '_blas_checked', {})
    monkeypatch.setattr(winograd, '_blas_matches', lambda k, p, c, co, sizes: 64 not in sizes)
    seen = {}
    driver, loop = winograd._forward_compiled, winograd._block_numba
    monkeypatch.setattr(winograd, '_forward_compiled',
                        lambda *a: seen.setdefault('driver', a[8]) and driver(*a))
    monkeypatch.setattr(winograd, '_block_numba', lambda *a: seen.setdefault('loop', a[7]) and loop(*a))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 40, 240, generator=gen)  # F(2x2): 120-tile blocks, groups of 64 + 56 fail, 60 + 60 pass
    conv = winograd.WinogradConv3x3(torch.randn(16, 8, 3, 3, generator=gen) / 8, None, 'f2')
    with torch.no_grad():
        y_cl = conv(x.contiguous(memory_format=torch.channels_last))
        y = conv(x)
    assert seen == {'driver': 60, 'loop': 60}
    assert torch.equal(y, y_cl)


def test_driver_groups_fall_back_where_the_blas_check_fails(monkeypatch):
    """Where the BLAS multiplies some group size otherwise than torch.bmm (Intel's MKL in AVX2 code: 64 and 32
    columns), the driver takes the next size whose groups all pass, then whole blocks, then none."""
    plan = winograd._plan('f2')
    failing = set()
    monkeypatch.setattr(winograd, '_GROUP_TILES', 64)
    monkeypatch.setattr(winograd, '_GROUP_FALLBACKS', (60, 56, 48))
    monkeypatch.setattr(winograd, '_blas_matches', lambda k, p, c, co, sizes: not sizes & failing)
    assert winograd._driver_group(None, plan, 8, 16, {240, 0}) == 64
    failing = {64}
    assert winograd._driver_group(None, plan, 8, 16, {240, 0}) == 60  # four groups of 60
    failing = {64, 60}
    assert winograd._driver_group(None, plan, 8, 16, {240, 0}) == 56  # four of 56 and one of 16
    failing = {64, 60, 56, 48}
    assert winograd._driver_group(None, plan, 8, 16, {240, 120}) == 240  # whole blocks: groups of 240 and 120
    failing = {64, 60, 56, 48, 240}
    assert winograd._driver_group(None, plan, 8, 16, {240, 120}) is None


@pytest.mark.parametrize('driver', [False, True])
def test_buffers_made_under_inference_mode_serve_later_calls(monkeypatch, engine, driver):
    """The per-thread block buffers, first made inside ``torch.inference_mode()``, are normal tensors: a later call
    under ``no_grad`` writes them in place (an inference tensor would raise) and gives the same numbers."""
    monkeypatch.setattr(winograd, '_local', threading.local())
    monkeypatch.setattr(winograd, '_DRIVER_MIN_BLOCKS', 1 if driver else 10 ** 9)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, 24, 30, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 8, 3, 3, generator=gen) / 8
    with torch.inference_mode():
        first = winograd.winograd_conv3x3(x, weight, None, variant='f2')
    with torch.no_grad():
        again = winograd.winograd_conv3x3(x, weight, None, variant='f2')
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.skipif(not winograd.numba_available(), reason='numba is not installed')
def test_nchw_strip_copies_are_compiled_by_codegen(monkeypatch):
    """The NCHW <-> channels-last strip copies go through codegen.compile_function (its read-only-install fallback)
    and give the channels-last path's numbers bit for bit (copies)."""
    from adasr.ops import codegen

    compiled = []
    real = codegen.compile_function
    monkeypatch.setattr(codegen, 'compile_function', lambda fn, **kw: compiled.append(fn.__name__) or real(fn, **kw))
    monkeypatch.delitem(winograd._numba_state, 'transposes', raising=False)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, C, 11, 21, generator=gen)
    weight, bias = torch.randn(CO, C, 3, 3, generator=gen) / 6, torch.randn(CO, generator=gen)
    with torch.no_grad():
        y = winograd.winograd_conv3x3(x, weight, bias)
        y_cl = winograd.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, bias)
    assert sorted(compiled) == ['_planes_to_rows', '_rows_to_planes']
    assert y.is_contiguous() and torch.equal(y, y_cl)


@pytest.mark.parametrize('method', ['direct', 'f2', 'f4'])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'mixed'])
def test_conv3x3_residual(method, layout):
    """conv3x3(..., residual=r) is conv3x3(...) + r bit for bit (the addition in the output transform for
    channels-last Winograd, after it elsewhere), written into r with inplace; ReLU with a residual, the input as the
    in-place residual and a residual of another shape are refused."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 11, 20, generator=gen)
    r = torch.randn(2, 16, 11, 20, generator=gen)
    if layout != 'nchw':
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == 'channels_last':
        r = r.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 8, 3, 3, generator=gen) / 8, torch.randn(16, generator=gen)
    with torch.no_grad():
        want = winograd.conv3x3(x, weight, bias, method=method) + r
        got = winograd.conv3x3(x, weight, bias, method=method, residual=r)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        acc = r.clone(memory_format=torch.preserve_format)
        assert winograd.conv3x3(x, weight, bias, method=method, residual=acc, inplace=True) is acc
        torch.testing.assert_close(acc, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match='relu and residual'):
            winograd.conv3x3(x, weight, bias, relu=True, method=method, residual=r)
        with pytest.raises(ValueError, match='output shape'):
            winograd.conv3x3(x, weight, bias, method=method, residual=r[:, :8])
        sq = torch.randn(16, 16, 3, 3, generator=gen)
        with pytest.raises(ValueError, match='must not be the input'):
            winograd.conv3x3(r, sq, None, method=method, residual=r, inplace=True)
