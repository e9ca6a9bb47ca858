"""The compiled PFT kernels (adasr/ops/pft_kernels.py: selection, dense and sparse layer kernels) against torch, and
the switch between them."""
import functools
import os
import os.path as osp
import subprocess
import sys
from typing import Optional

import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
import numpy as np
import pytest
import torch

from adasr.archs import pft_engine
from adasr.archs.layers import relative_position_index
from adasr.ops import config, pft_kernels
from adasr.ops import embedding_bag_av as ops_embedding_bag_av
from benchmarks import pft_oracle as verify
from tests.helpers import pft_fixtures as fixtures

SHAPES = [(1024, 256), (256, 128), (128, 64), (64, 32), (100, 7), (50, 49), (50, 1), (3, 2)]


def _sets(pos: torch.Tensor) -> torch.Tensor:
    return pos.long().sort(-1).values


def _assert_top(pos: torch.Tensor, s: torch.Tensor, k: int, rtol: float = 1e-5) -> None:
    """``pos`` holds k distinct positions of each row of ``s`` whose values are the k largest up to rounding: the
    kernels compute the scores in another float32 order than ``s`` (and BLAS's own order may vary with buffer
    alignment), so a near tie at the k-th value may be kept either way."""
    pos = _sets(pos)
    assert pos.shape[-1] == k and bool((pos[..., 1:] > pos[..., :-1]).all())
    kth = s.topk(k, -1).values[..., -1:]
    assert bool((torch.gather(s, -1, pos) >= kth - rtol * kth.abs().clamp_min(1)).all())


@pytest.mark.parametrize('m,k', SHAPES)
def test_topk_positions_are_torch_topk_sets_on_untied_rows(m, k):
    x = torch.randn(37, m) * 3
    x[::5] -= 100 * (torch.rand(m) < 0.4)  # shift-masked rows: two clusters 100 apart
    x[1::5] = x[1::5].abs() ** 3  # skewed rows (focused maps)
    x[2::5] = torch.rand(m) * 1e-6  # tiny values
    want = torch.topk(x, k, -1, sorted=False).indices
    got = pft_kernels.topk_positions(x, k)
    assert got.dtype == torch.int64 and got.shape == (37, k)
    assert torch.equal(_sets(got), _sets(want))


def test_topk_positions_leading_dims_and_non_contiguous_input():
    x = torch.randn(2, 3, 64, 40).transpose(-1, -2)  # (2, 3, 40, 64), rows not contiguous
    got = pft_kernels.topk_positions(x, 9)
    assert got.shape == (2, 3, 40, 9)
    assert torch.equal(_sets(got), _sets(x.topk(9, -1).indices))


def test_topk_positions_with_ties_keep_valid_distinct_positions():
    x = torch.zeros(6, 64)
    x[1, :10] = 1.  # 10 ones, k = 16: the ones and 6 of the zeros
    x[2] = torch.randint(0, 3, (64,)).float()  # three values, many ties at the boundary
    x[3, 5] = float('inf')
    x[4] = torch.arange(64).float().flip(0)
    x[5] = -torch.ones(64)
    got = pft_kernels.topk_positions(x, 16)
    for row, pos in zip(x, got):
        assert pos.unique().numel() == 16 and 0 <= pos.min() and pos.max() < 64
        # the kept values are the 16 largest values (as a multiset), whichever tied positions were taken
        torch.testing.assert_close(row[pos].sort().values, row.topk(16).values.sort().values, rtol=0, atol=0)


def test_topk_positions_rejects_bad_k():
    with pytest.raises(ValueError, match='k=0'):
        pft_kernels.topk_positions(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match='k=8'):
        pft_kernels.topk_positions(torch.randn(2, 8), 8)


@pytest.mark.parametrize('m,k', SHAPES)
def test_positive_selection_is_torch_topk_on_heavy_tailed_rows(m, k):
    """The selection on float bit patterns (rows of focused weights) keeps torch.topk's sets, NaN counted largest."""
    x = (torch.rand(37, m) * torch.exp(torch.randn(37, m) * 4)).clamp_min(1e-30)
    x[3] = torch.rand(m) * 1e-20  # the epsilon level of PFA's renormalisation
    x[4, m // 2] = float('nan')
    xs = x.numpy()
    sel, cand = np.empty(m + pft_kernels._SLACK, np.int32), np.empty(m + pft_kernels._SLACK, np.int32)
    code, y = np.empty(m, np.uint8), np.empty(m, np.float64)
    z, dens = pft_kernels.normal_guess(k, m)
    for i, row in enumerate(xs):
        pft_kernels._select_positive(row, m, k, np.float32(z), np.float32(dens), sel, cand, code, y)
        want = torch.topk(torch.from_numpy(row).nan_to_num(nan=float('inf')), k).indices
        assert torch.equal(_sets(torch.from_numpy(sel[:k].copy())), _sets(want)), i


@pytest.mark.parametrize('m,k', [(1024, 256), (64, 16), (10, 3)])
def test_topk_softmax_is_softmax_at_the_top_k(m, k):
    """The first top-k layers of large head dims (BLAS scores, then this per-row kernel)."""
    s = torch.randn(2, 3, 17, m) * 4
    s[0, 0] -= 100 * (torch.rand(m) < 0.5)  # masked keys: their exp underflows
    before = s.clone()
    vals, pos = pft_kernels.topk_softmax(s, k)
    assert torch.equal(s, before)  # read only
    assert torch.equal(_sets(pos), _sets(s.topk(k, -1).indices))
    want = torch.gather(torch.softmax(s, -1), -1, pos)
    torch.testing.assert_close(vals, want, rtol=1e-6, atol=1e-30)


def _dense_case(d, dv, masked):
    torch.manual_seed(1)
    nb, h, n = 3, 2, 64
    q, k, v = torch.randn(nb, h, n, d) * 0.5, torch.randn(nb, h, n, d), torch.randn(nb, h, n, dv)
    bias = torch.randn(1, n, n)
    masks = kinds = None
    full = bias.expand(nb, h, n, n)
    if masked:  # window 1 with pattern 1 (added twice: two masked layers in the chain), window 2 with pattern 2
        masks = torch.cat([torch.zeros(1, n, n), (torch.rand(2, n, n) < 0.4).float() * -100])
        kinds = [0, 1, 2]
        full = bias + 2 * masks[kinds][:, None]
    return pft_kernels.DenseRows(q, k, v, bias, masks, kinds, 2), q @ k.transpose(-2, -1) + full, v


@pytest.mark.parametrize('d,dv,masked', [(13, 13, False), (26, 13, True), (5, 5, True)])
def test_dense_rows_are_softmax_attention(d, dv, masked):
    rows, s, v = _dense_case(d, dv, masked)
    out = rows.output()
    rows.run(0, 2, out)
    rows.run(2, 3, out)  # windows in any split
    torch.testing.assert_close(out.permute(0, 2, 1, 3), torch.softmax(s, -1) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('d,masked,k', [(13, False, 16), (26, True, 16), (5, True, 63)])
def test_dense_rows_selection_is_softmax_at_the_top_k(d, masked, k):
    rows, s, _ = _dense_case(d, 13, masked)
    nb, h, n = s.shape[:3]
    vals, idx = torch.empty(nb, h, n, k), torch.empty(nb, h, n, k, dtype=torch.int16)
    rows.select(0, nb, k, vals, idx)
    _assert_top(idx, s, k)
    torch.testing.assert_close(vals, torch.gather(torch.softmax(s, -1), -1, idx.long()), rtol=1e-5, atol=1e-30)
    with pytest.raises(ValueError, match='k=64'):
        rows.select(0, 1, n, vals, idx)
    # with the values: the kept weights aggregated head by head in the same call, aggregate's numbers
    v = torch.randn(nb, h, n, 13)
    out = torch.full((nb, n, h, 13), float('nan')).permute(0, 2, 1, 3)  # the engine's (B, h, n, d) view
    vals2, idx2 = torch.empty_like(vals), torch.empty_like(idx)
    rows.select(1, nb, k, vals2, idx2, v=v, out=out)  # windows 1..: window 0 not written
    assert torch.equal(vals2[1:], vals[1:]) and torch.equal(idx2[1:], idx[1:]) and torch.isnan(out[0]).all()
    assert torch.equal(out[1:], pft_kernels.aggregate(vals[1:].flatten(0, 1), v[1:].flatten(0, 1),
                                                      idx[1:].flatten(0, 1)).view(nb - 1, h, n, 13))
    with pytest.raises(ValueError, match='do not fit'):
        rows.select(0, nb, k, vals, idx, v=v, out=out[..., :5])


@pytest.mark.parametrize('d,shared', [(13, False), (5, True), (20, False)])
def test_sparse_rows_read_a_relative_bias_table_with_the_bias_rows_numbers(d, shared):
    """A relative-position bias table (Swin's index, 8 x 8 windows) in place of the (n, n) bias rows: the same bits
    in every form of a sparse layer's scores (16-key gathered steps, scalar gathered products above head dim 16,
    products with every key), with and without a selection, with the aggregation; operands that do not fit are
    refused."""
    torch.manual_seed(5)
    nb, h, ws, kk = 2, 3, 8, 20
    n = ws * ws
    q, k, v = torch.randn(nb, h, n, d) * 0.4, torch.randn(nb, h, n, d), torch.randn(nb, h, n, d)
    table = torch.randn(1 if shared else h, (2 * ws - 1) ** 2)
    bias = table[:, relative_position_index(ws)]
    index = torch.stack([torch.randperm(n)[:kk] for _ in range(nb * h * n)]).view(nb, h, n, kk).to(torch.int16)
    prev = torch.rand(nb, h, n, kk)
    for full in (False, True):
        results = []
        for given in (dict(bias=bias), dict(bias=None, table=table)):
            rows = pft_kernels.SparseRows(q, k, prev_values=prev, prev_index=index, full=full, **given)
            got = []
            for topk in (kk, 8):
                vals = prev.clone() if topk == kk else torch.empty(nb, h, n, topk)
                at = index if topk == kk else torch.empty(nb, h, n, topk, dtype=torch.int16)
                out = torch.empty(nb, n, h, d).permute(0, 2, 1, 3)
                rows.run(0, nb, topk, True, vals, at, v=v, out=out)
                got += [vals, at, out]
            results.append(got)
        assert all(torch.equal(a, b) for a, b in zip(*results)), full
    with pytest.raises(ValueError, match='either'):
        pft_kernels.SparseRows(q, k, bias, prev, index, table=table)
    with pytest.raises(ValueError, match='does not fit'):
        pft_kernels.SparseRows(q, k, None, prev, index, table=torch.randn(h, 14 * 14))
    with pytest.raises(ValueError, match='is not'):
        pft_kernels.SparseRows(q, k, None, prev, index, table=torch.randn(h + 1, 15 * 15))


@pytest.mark.parametrize('d,kk', [(13, 20), (16, 33), (3, 9), (17, 20), (40, 20), (48, 9), (49, 20)])
def test_sparse_rows_products_with_every_key_or_at_the_keys_agree(d, kk):
    """Both forms of a sparse layer's scores (with every key; at the gathered keys: by the vectorised 16-key steps
    for head dims up to 48, in one to three chunks of 16 dims, by scalar code above) give the layer's focused
    weights and selection."""
    torch.manual_seed(2)
    nb, h, n = 2, 3, 64
    q, k = torch.randn(nb, h, n, d) * 0.4, torch.randn(nb, h, n, d)
    bias = torch.randn(h, n, n)  # one bias per head
    index = torch.stack([torch.randperm(n)[:kk] for _ in range(nb * h * n)]).view(nb, h, n, kk).to(torch.int16)
    prev = torch.rand(nb, h, n, kk)
    s = torch.gather(q @ k.transpose(-2, -1) + bias, -1, index.long())
    a = torch.softmax(s, -1) * prev + 1e-20
    want = a / (a.sum(-1, keepdim=True) + 1e-20)  # eval focusing
    for full in (True, False):
        rows = pft_kernels.SparseRows(q, k, bias, prev, index, full=full)
        vals = torch.empty(nb, h, n, kk)
        rows.run(0, nb, kk, False, vals, index)  # k = K': no selection
        torch.testing.assert_close(vals, want, rtol=2e-5, atol=1e-12)
        v8, i8 = torch.empty(nb, h, n, 8), torch.empty(nb, h, n, 8, dtype=torch.int16)
        rows.run(0, nb, 8, False, v8, i8)
        top = want.topk(8, -1).indices
        inverse = torch.full((nb, h, n, n), -1.0).scatter_(-1, index.long(), want)  # focused weight by key
        _assert_top(i8, inverse, 8, rtol=2e-5)
        torch.testing.assert_close(v8.sort(-1).values, torch.gather(want, -1, top).sort(-1).values, rtol=2e-5,
                                   atol=1e-12)
        # with the values: the aggregation head by head in the same call (with and without a selection)
        v = torch.randn(nb, h, n, 7)
        for topk, (kept, at) in ((8, (torch.empty_like(v8), torch.empty_like(i8))), (kk, (prev.clone(), index))):
            out = torch.empty(nb, n, h, 7).permute(0, 2, 1, 3)
            rows.run(0, nb, topk, False, kept, at, v=v, out=out)
            assert torch.equal(out, pft_kernels.aggregate(kept.flatten(0, 1), v.flatten(0, 1),
                                                          at.flatten(0, 1)).view(nb, h, n, 7))


@pytest.mark.parametrize('d', [16, 32, 40, 48])
def test_gathered_steps_give_the_full_pass_numbers_where_the_tree_is_the_padded_one(d):
    """Where the balanced tree over the head dims has no term left over at any level but in whole blocks of 8
    (16, 24, 32, 40, 48 dims), the gathered steps sum exactly as the full pass (the same fused multiply-adds, the
    chunk sums in the tree's order): PFT's sparse layers (head dim 40) give the same bits whichever form runs, so
    the K' = 256 layers, which ran the full pass before the three-chunk steps, kept their numbers."""
    torch.manual_seed(3)
    nb, h, n, kk = 2, 3, 64, 20
    q, k = torch.randn(nb, h, n, d) * 0.4, torch.randn(nb, h, n, d)
    bias = torch.randn(h, n, n)
    index = torch.stack([torch.randperm(n)[:kk] for _ in range(nb * h * n)]).view(nb, h, n, kk).to(torch.int16)
    prev = torch.rand(nb, h, n, kk)
    vals = []
    for full in (True, False):
        vals.append(torch.empty(nb, h, n, kk))
        pft_kernels.SparseRows(q, k, bias, prev, index, full=full).run(0, nb, kk, False, vals[-1], index)
    assert torch.equal(vals[0], vals[1])


def test_layer_kernels_reject_mismatched_operands():
    q = torch.randn(2, 2, 16, 5)
    with pytest.raises(ValueError, match='do not fit'):
        pft_kernels.DenseRows(q, q, torch.randn(2, 2, 16, 5), torch.randn(1, 16, 15))
    with pytest.raises(ValueError, match='window kinds'):
        pft_kernels.DenseRows(q, q, torch.randn(2, 2, 16, 5), torch.randn(1, 16, 16), torch.zeros(2, 16, 16), [0, 2])
    with pytest.raises(ValueError, match='inherited'):
        pft_kernels.SparseRows(q, q, torch.randn(1, 16, 16), torch.rand(2, 2, 16, 4),
                               torch.zeros(2, 2, 16, 3, dtype=torch.int16))


def test_layer_source_is_specialised_to_the_head_dims():
    src = pft_kernels.layer_source(13, 13)
    assert 'a1_12 = q[w, hh, i + 1, 12]' in src and 'a1_13' not in src
    # the dense aggregation: both rows by a few value channels per pass, the last channel alone
    assert '(o0_12, o1_12) = _dots16((e[0], e[1]), (vtw[12],), n)' in src and '_dot16(' not in src
    assert '_scores16(kp, q16, brow, boff, prow, t0, kk, x)' in src  # head dim 13: the vectorised gathered scores
    # the module's digest in the source: a changed module gets new cached kernels (numba inlines its functions)
    assert pft_kernels._module_digest() in src.splitlines()[0]
    src = pft_kernels.layer_source(26, 13)
    assert 'k25 = ktw[25, j]' in src and 'vtw[12]' in src and 'vtw[13]' not in src
    # 17-32 dims: gathered key rows of two chunks of 16 floats; PFT's 40: three
    assert '_scores32(kp, q16, brow, boff, prow, t0, kk, x)' in src and 'kp = _aligned_rows(n, 32)' in src
    compile(src, 'layer_source', 'exec')
    src = pft_kernels.layer_source(40, 40)
    assert '_scores48(kp, q16, brow, boff, prow, t0, kk, x)' in src and 'q16[39] = q[w, hh, i, 39]' in src
    src = pft_kernels.layer_source(49, 49)
    sparse = src.split('def sparse_rows')[1]
    assert '_scores' not in sparse and 'a48 * kw[j, 48]' in sparse  # above 48: scalar gathered products
    compile(src, 'layer_source', 'exec')


def _documented_sum(x: np.ndarray, m: int):
    """The kernels' sum of x[:m] in its documented order (:func:`pft_kernels._sum_intrinsic`), step by step in
    x's dtype: 16 running lane sums over the whole chunks, folded onto the lower half (8, 4, 2, 1), the tail in
    order."""
    lanes = np.zeros(16, x.dtype)
    whole = m - m % 16
    for c in range(0, whole, 16):
        lanes = lanes + x[c:c + 16]
    for half in (8, 4, 2, 1):
        lanes = np.concatenate([lanes[:half] + lanes[half:2 * half], lanes[half:]])
    total = lanes[0]
    for j in range(whole, m):
        total = total + x[j]
    return total


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_sums_are_in_the_documented_order(dtype):
    """The loop sums of the kernels (softmax totals, focusing's denominators, the selection's moments, the dense
    aggregation) are 16-lane running sums in a fixed order: the same bits as the documented order written out in
    NumPy, for lengths with and without a tail; the products' form (fused multiply-adds) by ones is the sum, and
    several products computed in one pass are each the single product's bits."""

    sum16 = numba.njit(lambda x, m: pft_kernels._sum16(x, m))
    dot16 = numba.njit(lambda x, y, m: pft_kernels._dot16(x, y, m))
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(1030) * np.exp(rng.uniform(-6, 6, 1030))).astype(dtype)  # terms of many magnitudes
    ones = np.ones_like(x)
    for m in (0, 1, 15, 16, 37, 1024, 1030):
        want = _documented_sum(x, m)  # (numba returns the float32 sums as Python floats: exact)
        assert dtype(sum16(x, m)).tobytes() == want.tobytes(), m
        assert dtype(dot16(x, ones, m)).tobytes() == want.tobytes(), m
    # products: exact small-integer terms, any order gives the exact sum
    a, b = rng.integers(-8, 9, 100).astype(dtype), rng.integers(-8, 9, 100).astype(dtype)
    assert dot16(a, b, 100) == float(a.astype(np.int64) @ b.astype(np.int64))
    # several products in one pass (_dots16): each one _dot16's bits
    dots = numba.njit(lambda x0, x1, y0, y1, y2, m: pft_kernels._dots16((x0, x1), (y0, y1, y2), m))
    rows = (rng.standard_normal((5, 1030)) * np.exp(rng.uniform(-6, 6, (5, 1030)))).astype(dtype)
    for m in (0, 1, 15, 16, 37, 1024, 1030):
        got = dots(*rows, m)
        want = [dot16(rows[i], rows[j], m) for i in (0, 1) for j in (2, 3, 4)]
        assert np.array(got, dtype).tobytes() == np.array(want, dtype).tobytes(), m


def test_exp_is_within_an_ulp_or_two_of_float32_exp():
    y = np.concatenate([np.linspace(-87.3, 0, 200001), -np.geomspace(1e-8, 1, 1001)]).astype(np.float32)
    out = np.empty_like(y)
    total = pft_kernels._exp_shifted(y, y.shape[0], np.float32(0), out)
    want = np.exp(y.astype(np.float64))
    assert np.max(np.abs(out / want - 1)) < 3e-7
    assert abs(total / want.sum() - 1) < 1e-5
    under = np.array([-87.7, -100, -1e4, -np.inf], np.float32)
    pft_kernels._exp_shifted(under, 4, np.float32(0), out)
    assert np.all(out[:4] == 0)


def _chain(kernel: str, mask: bool, training: bool, d: int = 5, relative: Optional[str] = None):
    """One parity of a PFA stack on hand-sized windows: dense, first top-k, sparse (k = K', then smaller). Compiled
    path: sparse products with every key at K' = 24 (>= n / 4) and at the keys at K' = 12; head dims 5 and 13: dense
    and first top-k layers (score dims 10, 26) on the dense-row kernel, 20: SDPA and BLAS scores (first top-k score
    dim 40 > DENSE_ROWS_MAX_DIM) with the per-row top-k kernel. ``relative``: the bias from a relative-position
    table and Swin's index ('swin') or another one ('other') as a :class:`pft_engine.RelativeBias`, or as the bias
    rows built from them ('swin rows', 'other rows')."""
    torch.manual_seed(3)
    nb, h, n = 6, 2, 64
    ks = [64, 24, 24, 12, 5]
    labels = pft_engine.shift_labels(16, 24, 8, 'cpu') if mask else None
    shift = pft_engine.ShiftMask(labels) if mask else None
    bias = torch.randn(h, n, n) * 0.3
    if relative is not None:
        table, index = torch.randn(h, 15 * 15) * 0.3, relative_position_index(8)
        index = index.flip(1) if relative.startswith('other') else index
        bias = table[:, index] if relative.endswith('rows') else pft_engine.RelativeBias(table, index)
        assert relative.endswith('rows') or (bias.swin_table() is table) == (relative == 'swin')
    outs, prev = [], None
    with config.options(pft_kernel=kernel), torch.no_grad():
        for k in ks:
            q, kk, v = (torch.randn(nb, h, n, d) for _ in range(3))
            out, prev = pft_engine.attend(q * d ** -0.5, kk, v, bias, shift, prev, k, training)
            outs.append((out.clone(), prev.values.clone() if prev.kind == 'sparse' else None,
                         prev.index.clone() if prev.kind == 'sparse' else None))
    return outs


@pytest.mark.parametrize('mask,training,d', [(False, False, 5), (True, False, 5), (True, True, 5), (True, False, 13),
                                             (False, True, 13), (True, False, 20)])
def test_engine_kernels_match_the_torch_path(mask, training, d):
    got, want = _chain('numba', mask, training, d), _chain('torch', mask, training, d)
    for (o1, v1, i1), (o2, v2, i2) in zip(got, want):
        torch.testing.assert_close(o1, o2, rtol=0, atol=2e-6)
        if i1 is None:
            continue
        order1, order2 = i1.long().argsort(-1), i2.long().argsort(-1)
        assert torch.equal(torch.gather(i1.long(), -1, order1), torch.gather(i2.long(), -1, order2))
        torch.testing.assert_close(torch.gather(v1, -1, order1), torch.gather(v2, -1, order2), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize('kernel', ['numba', 'torch'])
def test_engine_reads_a_relative_bias_from_its_table_with_the_rows_numbers(kernel):
    """The bias as a table and its index (:class:`pft_engine.RelativeBias`, what the network passes): the compiled
    sparse layers read the table where the index is Swin's, the bias rows built from it elsewhere (another index,
    dense and first top-k layers, the PyTorch path): the numbers of the bias given as rows, bit for bit."""
    for relative in ('swin', 'other'):
        want = _chain(kernel, True, False, 13, relative=relative + ' rows')
        for got, ref in zip(_chain(kernel, True, False, 13, relative=relative), want):
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, ref)), relative


def test_switch_and_fallbacks(monkeypatch):
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert pft_kernels.enabled(x32)
    assert not pft_kernels.enabled(x64)  # other dtypes keep the torch path
    with config.options(pft_kernel='torch'):
        assert not pft_kernels.enabled(x32)
    monkeypatch.setenv('ADASR_PFT_KERNEL', 'torch')
    assert not pft_kernels.enabled(x32)
    monkeypatch.setenv('ADASR_PFT_KERNEL', 'fast')
    with pytest.raises(ValueError, match='ADASR_PFT_KERNEL'):
        pft_kernels.enabled(x32)
    monkeypatch.setenv('ADASR_PFT_KERNEL', 'numba')
    monkeypatch.setattr(pft_kernels, 'numba', None)
    with pytest.raises(RuntimeError, match='numba'):
        pft_kernels.enabled(x32)
    monkeypatch.setenv('ADASR_PFT_KERNEL', 'auto')
    assert not pft_kernels.enabled(x32)  # auto without numba: the torch path


def test_network_same_output_on_both_paths():
    net = fixtures.build(fixtures.GUARDS['light_x4'], 0)
    x = torch.rand(1, 3, 19, 29)
    with torch.no_grad():
        with config.options(pft_kernel='numba'):
            got = net(x)
        with config.options(pft_kernel='torch'):
            want = net(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize('kernel', ['numba', 'torch'])
def test_oracle_light_x4_on_both_paths(reference_dir, kernel):
    with config.options(pft_kernel=kernel):
        res = verify.run_fixture(verify.load_fixture(osp.join(reference_dir, 'pft_light_x4_oracle.pt')))
    assert res['passed'], res


def _compaction_matches_the_scalar_one(dtype, m):
    """The vector compaction against the scalar loop and numpy on a row with NaN, ties at both ends of the bracket,
    blocks of 16 and a scalar tail, into scratch with its spare entries (also run by the AVX2 child process)."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal(m).astype(dtype)
    x[::7] = 0.5  # ties with lo
    x[1::11] = 0.75  # ties with hi
    x[min(3, m - 1)] = np.nan
    for lo, hi in ((0.5, 0.75), (-np.inf, 0.75), (0.5, np.inf), (-9.0, 9.0)):
        lo, hi = np.float32(lo), np.float32(hi)
        got = [np.full(m + pft_kernels._SLACK, -1, np.int32) for _ in range(2)]
        want = [np.full(m + 1, -1, np.int32) for _ in range(2)]
        code = np.empty(m, np.uint8)
        ns, nc = pft_kernels._compact_vector(x, m, lo, hi, got[0], got[1], code)
        assert (ns, nc) == pft_kernels._compact_scalar(x, m, lo, hi, want[0], want[1], code), (dtype, m, lo, hi)
        assert np.array_equal(got[0][:ns], np.flatnonzero(x > hi)) and np.array_equal(want[0][:ns], got[0][:ns])
        assert np.array_equal(got[1][:nc], np.flatnonzero((x <= hi) & (x > lo))), (dtype, m, lo, hi)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('m', [1024, 256, 47, 16, 5])
def test_vector_compaction_is_the_scalar_one(dtype, m):
    """The selection's compaction 16 positions at a time (AVX-512 compression, or AVX2's table of lane permutations:
    this CPU's form here, the AVX2 form in the AVX2 child process) writes the positions above the bracket and inside
    it, in order, as the scalar loop does; the selection uses the vector one there."""
    if pft_kernels._compact_vector is None:
        assert pft_kernels._compact is pft_kernels._compact_scalar
        pytest.skip('numba targets neither AVX-512 nor AVX2 here')
    assert pft_kernels._compact is pft_kernels._compact_vector
    _compaction_matches_the_scalar_one(dtype, m)


def test_left_pack_table_packs_each_mask_s_lanes_to_the_front():
    """The AVX2 compaction's permutation table, by hand for a few masks and for all 256 against the set bits."""
    import llvmlite.ir as ir

    module = ir.Module()
    builder = ir.IRBuilder(ir.Function(module, ir.FunctionType(ir.VoidType(), []), 'f').append_basic_block())
    table = pft_kernels._left_pack_table(builder)
    assert pft_kernels._left_pack_table(builder) is table  # one table per module
    rows = np.array([c.constant for c in table.initializer.constant], np.uint8).reshape(256, 8)
    assert rows[0].tolist() == [0] * 8 and rows[255].tolist() == list(range(8))
    assert rows[0b10100110].tolist() == [1, 2, 5, 7, 0, 0, 0, 0] and rows[0b10000000].tolist()[0] == 7
    for b in range(256):
        lanes = [lane for lane in range(8) if b >> lane & 1]
        assert rows[b, :len(lanes)].tolist() == lanes


@pytest.mark.parametrize('g,n,m,d,kk,dtype', [
    (2, 64, 1024, 13, 256, torch.int16),  # PFT-light's first top-k / 256-key layers: two bags of 128 summed
    (2, 64, 1024, 13, 128, torch.int16),
    (3, 7, 50, 13, 5, torch.int64),  # rows not a multiple of the four per pass
    (2, 9, 40, 26, 300, torch.int32),  # one bag above 128 keys (not a multiple), two 16-lane column blocks
    (2, 10, 33, 40, 512, torch.int16),  # four bags; head dim 40 (PFT)
    (1, 5, 8, 3, 1, torch.int64),
])
def test_aggregate_is_embedding_bag_bit_for_bit(g, n, m, d, kk, dtype):
    """The vectorised aggregation sums in FBGEMM's order: the same float32 numbers as embedding_bag_av, and within
    float rounding of the exact sum."""
    torch.manual_seed(0)
    v, a = torch.randn(g, m, d), torch.rand(g, n, kk)
    idx = torch.randint(0, m, (g, n, kk)).to(dtype)
    want = ops_embedding_bag_av(a, v, idx)
    buf = torch.full((g, n, d + 3), float('nan'))
    out = buf[..., :d]  # a strided destination: only its d columns are written
    got = pft_kernels.aggregate(a, v, idx, out)
    assert got is out and torch.equal(got, want)
    assert torch.isnan(buf[..., d:]).all()
    exact = torch.einsum('gnk,gnkd->gnd', a.double(), v.double()[torch.arange(g)[:, None, None], idx.long()])
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    v_strided = torch.randn(g, d, m).transpose(1, 2)  # values need not be contiguous
    assert torch.equal(pft_kernels.aggregate(a, v_strided, idx), ops_embedding_bag_av(a, v_strided.contiguous(), idx))


def test_aggregate_hand_computed_and_bad_operands():
    v = torch.tensor([[[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]]])
    a = torch.tensor([[[0.5, 2.0], [1.0, 0.0]]])
    idx = torch.tensor([[[0, 2], [1, 1]]])
    assert torch.equal(pft_kernels.aggregate(a, v, idx), torch.tensor([[[200.5, 401.0], [10.0, 20.0]]]))
    # an index out of range reads the last row instead of memory outside the values
    bad = torch.tensor([[[7, -1], [1, 1]]])
    assert torch.equal(pft_kernels.aggregate(a, v, bad)[0, 0], torch.tensor([250.0, 500.0]))
    with pytest.raises(ValueError, match='must be'):
        pft_kernels.aggregate(a, v, idx[..., :1])
    with pytest.raises(ValueError, match='must be'):
        pft_kernels.aggregate(a[0], v, idx[0])
    with pytest.raises(ValueError, match='must be'):
        pft_kernels.aggregate(a, v, idx.float())
    with pytest.raises(ValueError, match='float32'):
        pft_kernels.aggregate(a.double(), v.double(), idx)
    with pytest.raises(ValueError, match='unit stride'):
        pft_kernels.aggregate(a, v, idx, torch.empty(1, 2, 4)[..., ::2])
    assert torch.equal(pft_kernels.aggregate(a[..., :0], v, idx[..., :0]), torch.zeros(1, 2, 2))


def test_network_aggregation_is_embedding_bags_bit_for_bit(monkeypatch):
    """PFT-light with the vectorised aggregation inside the layer kernels (head by head, after the rows) gives the
    network output of the layer kernels without it followed by FBGEMM's embedding_bag per window, bit for bit (the
    aggregation's numbers are unchanged; only its speed is)."""
    config_32 = dict(fixtures.GUARDS['light_x4'], img_size=32, window_size=32,
                     num_topk=[1024, 1024, 256, 256, 128, 128])
    net = fixtures.build(config_32, 0)
    x = torch.rand(1, 3, 40, 37)  # padded to 64 x 64: four windows of 1024 tokens
    calls = []

    def then_bags(kernel):
        def run(self, w0, w1, *args, v=None, out=None):  # (the engine passes v and out by name)
            passes = kernel(self, w0, w1, *args)
            values, index = args[-2:]
            for w in range(w0, w1):
                calls.append(index.shape[-1])
                out[w].copy_(ops_embedding_bag_av(values[w], v[w], index[w]))
            return passes
        return run

    with torch.no_grad(), config.options(pft_kernel='numba'):
        got = net(x)
        monkeypatch.setattr(pft_kernels.SparseRows, 'run', then_bags(pft_kernels.SparseRows.run))
        monkeypatch.setattr(pft_kernels.DenseRows, 'select', then_bags(pft_kernels.DenseRows.select))
        want = net(x)
    assert calls and max(calls) == 256  # the first top-k layers and those with 256 inherited keys were aggregated
    assert torch.equal(got, want)


def _scores_in_order(kp, q16, brow, pos):
    """_scores16's documented sums emulated with NumPy: per key and chunk of 16 dims, fma(k_2c, q_2c, k_2c+1 q_2c+1)
    for the eight dim pairs (the product of float32 numbers is exact in float64), then neighbouring sums in float32;
    the chunk sums added in order (c0 + c1) + c2 (the top of the balanced tree over the dims), then the bias."""
    rows = kp[pos]
    total = None
    for c0 in range(0, kp.shape[1], 16):
        chunk, q = rows[:, c0:c0 + 16], q16[c0:c0 + 16]
        odd = chunk[:, 1::2] * q[1::2]  # float32 products
        level = (chunk[:, 0::2].astype(np.float64) * q[0::2] + odd).astype(np.float32)
        while level.shape[1] > 1:
            level = level[:, 0::2] + level[:, 1::2]
        total = level[:, 0] if total is None else total + level[:, 0]
    return brow[pos] + total


def _scores_case(n, d, kk, dtype, seed=0):
    rng = np.random.default_rng(seed)
    width = 16 * pft_kernels.key_chunks(d)
    kp = np.zeros((n, width), np.float32)
    kp[:, :d] = rng.standard_normal((n, d))
    q16 = np.zeros(width, np.float32)
    q16[:d] = rng.standard_normal(d)
    brow = rng.standard_normal(n).astype(np.float32)
    pos = rng.integers(0, n, kk).astype(dtype)
    return kp, q16, brow, pos


@functools.cache
def _scores_kernel(form='_scores16'):

    step = getattr(pft_kernels, form)

    @numba.njit
    def row(kp, q16, brow, boff, pos, x):
        for t0 in range(0, pos.shape[0], 16):
            step(kp, q16, brow, boff, pos, t0, pos.shape[0], x)

    return row


def _scores_row(kp, q16, brow, pos, fill=np.nan, form='_scores16', boff=None):
    """One row's scores by _scores16 (or the named form of it), 16 keys per step, into a buffer 16 longer than the
    keys (filled with ``fill``); the bias of key j at ``brow[boff[j]]`` (default: ``brow[j]``)."""
    x = np.full(pos.shape[0] + 16, fill, np.float32)
    boff = np.arange(kp.shape[0], dtype=np.int32) if boff is None else boff
    _scores_kernel(form)(kp, q16, brow, boff, pos, x)
    return x


@pytest.mark.parametrize('form', ['wide', 'halves'])
@pytest.mark.parametrize('n,d,kk,dtype', [
    (1024, 13, 256, np.int16), (1024, 13, 128, np.int16), (1024, 13, 32, np.int16),  # PFT-light's sparse layers
    (64, 16, 17, np.int32), (64, 3, 40, np.int64), (9, 1, 5, np.int16), (50, 13, 1, np.int64),
    (1024, 13, 7, np.int16), (64, 13, 24, np.int32),
    (1024, 40, 256, np.int16), (1024, 40, 16, np.int16), (1024, 40, 7, np.int16),  # PFT's sparse layers
    (64, 17, 24, np.int32), (64, 32, 33, np.int64), (64, 33, 5, np.int32), (64, 48, 40, np.int16)])
def test_gathered_scores_are_the_documented_sums(n, d, kk, dtype, form):
    """The vectorised score step in both its forms (16-lane registers, the AVX-512 one; two transposed groups of
    eight, the AVX2 one): bias plus q . k at 16 gathered keys per step, summed in the documented order (the same
    float32 numbers as its NumPy emulation, bit for bit, signed zeros included), within float rounding of the float64
    products, and nothing written past the keys (the last step's store is masked; 7 and 24 keys end inside the
    first and the second group of eight)."""
    kp, q16, brow, pos = _scores_case(n, d, kk, dtype)
    kp[::7, 0] = -0.0
    x = _scores_row(kp, q16, brow, pos, form=f'_scores{kp.shape[1]}_{form}')
    want = _scores_in_order(kp, q16, brow, pos.astype(np.int64))
    assert np.array_equal(x[:kk].view(np.int32), want.view(np.int32))
    exact = brow[pos].astype(np.float64) + kp[pos].astype(np.float64) @ q16.astype(np.float64)
    np.testing.assert_allclose(x[:kk], exact, rtol=1e-5, atol=1e-5)
    assert np.isnan(x[kk:]).all()


@pytest.mark.parametrize('form', ['wide', 'halves'])
@pytest.mark.parametrize('d', [13, 40])
def test_gathered_scores_of_strided_operands_are_the_packed_ones(d, form):
    """The score step reads key rows of the documented width (16 floats a chunk) and contiguous positions, offsets and
    bias without a multiplication per key; key rows further apart (a view into wider rows) and strided positions,
    offsets and bias rows take the general path: the same numbers bit for bit."""
    kp, q16, brow, pos = _scores_case(256, d, 37, np.int16, seed=5)
    width = kp.shape[1]
    step = f'_scores{width}_{form}'
    boff = np.arange(256, dtype=np.int32)
    want = _scores_row(kp, q16, brow, pos, form=step, boff=boff)
    wide = np.zeros((256, width + 16), np.float32)
    wide[:, :width] = kp

    def strided(a):  # every other entry of a twice as long array: the same values, layout 'A'
        twice = np.zeros(2 * a.shape[0], a.dtype)
        twice[::2] = a
        return twice[::2]

    x = _scores_row(wide[:, :width], q16, strided(brow), strided(pos), form=step, boff=strided(boff))
    assert np.array_equal(x[:37].view(np.int32), want[:37].view(np.int32))
    x = _scores_row(wide[:, :width], q16, brow, pos, form=step, boff=boff)
    assert np.array_equal(x[:37].view(np.int32), want[:37].view(np.int32))


@functools.cache
def _max_kernel():

    return numba.njit(lambda x: pft_kernels._max16(x, x.shape[0]))


def _max_row(x):
    return _max_kernel()(x)


@pytest.mark.parametrize('m', [1, 2, 15, 16, 17, 33, 256, 1024, 1100])
def test_vector_maximum_is_the_maximum(m):
    """The row maximum of softmax and focusing (16-lane compares, a lane reduction, a scalar tail): numpy's maximum
    of rows of every length class, with the largest value in the tail, the blocks or first, and with -inf and
    signed zeros."""
    rng = np.random.default_rng(m)
    for case in range(6):
        x = (rng.standard_normal(m) * 5).astype(np.float32)
        if case == 1:
            x[-1] = 100.0  # in the scalar tail (or the last block)
        elif case == 2:
            x[0] = 100.0
        elif case == 3:
            x[:] = -np.inf
            x[m // 2] = -3.0
        elif case == 4:
            x[:] = -0.0
        elif case == 5:
            x[:] = -1e30
        assert _max_row(x) == x.max()


def test_gathered_scores_hand_computed_and_clamped():
    kp = np.zeros((3, 16), np.float32)
    kp[0, :3] = [1, 2, 3]
    kp[1, :3] = [-1, 0.5, 4]
    kp[2, :3] = [10, 20, 30]
    q16 = np.zeros(16, np.float32)
    q16[:3] = [1, 2, 0.25]
    brow = np.array([100, 200, 300], np.float32)
    x = _scores_row(kp, q16, brow, np.array([1, 0, 1, 2], np.int16))
    assert x[:4].tolist() == [201.0, 105.75, 201.0, 357.5] and np.isnan(x[4:]).all()
    # positions outside the rows read the last row, never memory outside the keys
    x = _scores_row(kp, q16, brow, np.array([7, -1], np.int64))
    assert x[:2].tolist() == [357.5, 357.5]
    # the bias of key j read at brow[boff[j]] (a relative-position table's layout, pft_kernels._bias_layout)
    for form in ('_scores16_wide', '_scores16_halves'):
        x = _scores_row(kp, q16, brow, np.array([1, 0, 1, 2], np.int16), form=form,
                        boff=np.array([2, 0, 1], np.int32))
        assert x[:4].tolist() == [101.0, 305.75, 101.0, 257.5]


_AVX2_KERNELS = """
import numpy as np
import torch
from adasr.ops import embedding_bag_av, pft_kernels
assert not pft_kernels._avx512_target()
torch.manual_seed(0)
for g, n, m, d, kk in ((2, 13, 64, 13, 256), (1, 6, 9, 20, 3)):
    v, a = torch.randn(g, m, d), torch.rand(g, n, kk)
    idx = torch.randint(0, m, (g, n, kk), dtype=torch.int16)
    assert torch.equal(pft_kernels.aggregate(a, v, idx), embedding_bag_av(a, v, idx)), (g, n, m, d, kk)
from tests.test_pft_kernels import _scores_case, _scores_in_order, _scores_row
for n, d, kk in ((1024, 13, 128), (64, 16, 21), (1024, 40, 100), (64, 27, 9)):
    kp, q16, brow, pos = _scores_case(n, d, kk, np.int16)
    x = _scores_row(kp, q16, brow, pos, form=f'_scores{kp.shape[1]}')
    assert np.array_equal(x[:kk], _scores_in_order(kp, q16, brow, pos.astype(int))), (n, d, kk)
from tests.test_pft_kernels import _max_row
for m in (1, 17, 256, 1030):
    x = np.random.default_rng(m).standard_normal(m).astype(np.float32)
    assert _max_row(x) == x.max(), m
from adasr.ops import layout
t = torch.randn(2, 37 * 45, 40)
with torch.no_grad():
    assert torch.equal(layout.tokens_to_nchw(t, 37, 45), t.transpose(1, 2).reshape(2, 40, 37, 45))
q, k, v = torch.randn(2, 2, 64, 26) * 0.2, torch.randn(2, 2, 64, 26), torch.randn(2, 2, 64, 13)
bias = torch.randn(1, 64, 64)
from tests.test_pft_kernels import _compaction_matches_the_scalar_one
assert pft_kernels._avx2_target() and pft_kernels._compact is pft_kernels._compact_vector
for dtype in (np.float32, np.float64):
    for m in (1024, 256, 47, 16, 5, 1):
        _compaction_matches_the_scalar_one(dtype, m)
rows = pft_kernels.DenseRows(q, k, v, bias)  # a first top-k layer: score head dim 26 (FMA chains), AVX2 compaction
vals, idx, out = torch.empty(2, 2, 64, 16), torch.empty(2, 2, 64, 16, dtype=torch.int16), torch.empty(2, 2, 64, 13)
rows.select(0, 2, 16, vals, idx, v=v, out=out)
from tests.test_pft_kernels import _assert_top
_assert_top(idx, q @ k.transpose(-1, -2) + bias, 16)
assert torch.equal(out, embedding_bag_av(vals.flatten(0, 1), v.flatten(0, 1), idx.flatten(0, 1)).view(2, 2, 64, 13))
import sys
dense = pft_kernels.DenseRows(q[..., :13].contiguous(), k[..., :13].contiguous(), v, bias)  # 13 value channels
out = dense.output()
dense.run(0, 2, out)
torch.save(dict(q=q, k=k, v=v, bias=bias, dense=out), sys.argv[1])  # compared with this CPU's build by the test
from adasr.ops import narrow_conv
x, w, b = torch.randn(2, 32, 19, 37).tanh(), torch.randn(1, 32, 3, 3), torch.randn(1)
with torch.no_grad():
    assert torch.equal(narrow_conv.conv3x3_to_one(x, w, b), torch.nn.functional.conv2d(x, w, b, 1, 1))
print('equal')
"""


def _host_has_avx2() -> bool:
    import platform

    from llvmlite import binding

    return platform.machine().lower() in ('x86_64', 'amd64') and bool(binding.get_host_cpu_features().get('avx2'))


@pytest.mark.skipif(not _host_has_avx2(), reason='runs code compiled for Haswell: needs an x86 CPU with AVX2')
def test_vector_kernels_compiled_for_avx2_give_the_same_numbers(tmp_path):
    """The vector IR of the aggregation, of the gathered score step, of the row maximum and of the tile transpose
    lowered for an AVX2-only CPU (numba told to target Haswell, as on the AVX2 machines this suite runs on; the code
    runs here as well): still embedding_bag's numbers, the documented score sums, the maximum, the transposed tokens,
    the selection's compaction (AVX2's permutation table) as the scalar loop; a first top-k layer with its
    aggregation in the kernel; a dense layer
    (its aggregation in passes of half as many value channels there): the bits of this CPU's build; and the
    one-channel convolution (8-lane vectors, the same per-output order: oneDNN's numbers)."""
    env = dict(os.environ, NUMBA_CPU_NAME='haswell', NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES='+avx,+avx2,+fma,+f16c,+popcnt,+sse4.2,+bmi,+bmi2,+lzcnt,+movbe')
    proc = subprocess.run([sys.executable, '-c', _AVX2_KERNELS, str(tmp_path / 'avx2.pt')], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=osp.dirname(osp.dirname(osp.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip() == 'equal', proc.stderr[-2000:]
    got = torch.load(tmp_path / 'avx2.pt', weights_only=True)
    dense = pft_kernels.DenseRows(got['q'][..., :13].contiguous(), got['k'][..., :13].contiguous(), got['v'],
                                  got['bias'])
    out = dense.output()
    dense.run(0, 2, out)
    assert torch.equal(out, got['dense'])


# every compiled kernel on one small case (a 64-token window, head dims 5 / 7): the results saved for comparison
_CACHE_PROBE = r'''
import sys
import torch
from adasr.ops import pft_kernels as P
torch.manual_seed(3)
nb, h, n, d, dv = 3, 2, 64, 5, 7
q, k, v = torch.randn(nb, h, n, d), torch.randn(nb, h, n, d), torch.randn(nb, h, n, dv)
bias = torch.randn(1, n, n)
masks = torch.cat([torch.zeros(1, n, n), (torch.rand(1, n, n) < 0.4).float() * -100])
got = {}
s = torch.randn(40, 300) * 3 - 200 * (torch.rand(40, 300) < 0.3)
got['topk_vals'], got['topk_pos'] = P.topk_softmax(s, 37)
rows = P.DenseRows(q, k, v, bias, masks, [0, 1, 1], 2)
out = rows.output()
rows.run(0, nb, out)
got['dense'] = out
for name, agg in (('first', False), ('first_agg', True)):
    vals, idx = torch.empty(nb, h, n, 24), torch.empty(nb, h, n, 24, dtype=torch.int16)
    aout = torch.empty(nb, n, h, dv).permute(0, 2, 1, 3)
    rows.select(0, nb, 24, vals, idx, **(dict(v=v, out=aout) if agg else {}))
    got[name], got[name + '_idx'] = vals, idx
    if agg:
        got[name + '_out'] = aout.contiguous()
for full in (False, True):
    for training in (False, True):
        sparse = P.SparseRows(q, k, bias, got['first'], got['first_idx'], full=full)
        vals, at = torch.empty(nb, h, n, 9), torch.empty(nb, h, n, 9, dtype=torch.int16)
        aout = torch.empty(nb, n, h, dv).permute(0, 2, 1, 3)
        sparse.run(0, nb, 9, training, vals, at, v=v, out=aout)
        got[f'sparse_{full}_{training}'], got[f'sparse_{full}_{training}_out'] = vals, aout.contiguous()
torch.save(got, sys.argv[1])
print('numba compiles for:', P.codegen.configure_numba())
'''


def test_numbers_do_not_depend_on_the_compilation_cache(tmp_path):
    """Every kernel gives the same bits compiled in the process and loaded from numba's cache: one process compiles
    them into an empty cache directory, a second one loads them from it (checked in numba's cache log). With LLVM
    free to reassociate the loop sums (fast-math 'reassoc', before) the two differed by an ulp on an AVX2 machine:
    the first top-k layer's weights, so a network's output depended on whether its kernels had been compiled.
    On an AVX-512 CPU, a third process compiles them with LLVM's default vector width for the host
    (``ADASR_NUMBA_WIDE=0``; adasr turns the 256-bit preference off): the same bits."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / 'cache'), NUMBA_DEBUG_CACHE='1')
    logs = {}
    for run in ('compiled', 'cached'):
        proc = subprocess.run([sys.executable, '-c', _CACHE_PROBE, str(tmp_path / f'{run}.pt')], env=env,
                              cwd=osp.dirname(osp.dirname(osp.abspath(__file__))), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[run] = proc.stdout
    assert 'data saved' in logs['compiled'] and 'data saved' not in logs['cached'] and 'data loaded' in logs['cached']
    runs = ['compiled', 'cached']
    if pft_kernels._avx512_target():  # and with LLVM's default vector width (wide vectors off)
        assert '512-bit vectors' in logs['compiled']
        proc = subprocess.run([sys.executable, '-c', _CACHE_PROBE, str(tmp_path / 'narrow.pt')],
                              env=dict(env, NUMBA_CACHE_DIR=str(tmp_path / 'narrow'), ADASR_NUMBA_WIDE='0'),
                              cwd=osp.dirname(osp.dirname(osp.abspath(__file__))), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and 'ADASR_NUMBA_WIDE=0' in proc.stdout, proc.stderr[-3000:]
        runs.append('narrow')
    a, *others = (torch.load(tmp_path / f'{run}.pt', weights_only=True) for run in runs)
    assert len(a) == 16
    for b in others:
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # the fused aggregation leaves the kept weights as they are
    assert torch.equal(a['first'], a['first_agg']) and torch.equal(a['first_idx'], a['first_agg_idx'])
