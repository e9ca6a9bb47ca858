"""The numba row kernels of PFT's top-k layers (adasr/ops/pft_kernels.py) against torch, and the switch between them."""
import os.path as osp

import numpy as np
import pytest
import torch

from adasr.archs import pft_engine
from adasr.ops import config, pft_kernels
from benchmarks import pft_oracle as verify
from tests.helpers import pft_fixtures as fixtures

pytest.importorskip('numba')

SHAPES = [(1024, 256), (256, 128), (128, 64), (64, 32), (100, 7), (50, 49), (50, 1), (3, 2)]


def _sets(pos: torch.Tensor) -> torch.Tensor:
    return pos.long().sort(-1).values


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


@pytest.mark.parametrize('m,k', [(1024, 256), (64, 16), (10, 3)])
def test_topk_softmax_is_softmax_at_the_top_k(m, k):
    s = torch.randn(2, 3, 17, m) * 4
    s[0, 0] -= 100 * (torch.rand(m) < 0.5)  # masked keys: their exp underflows
    before = s.clone()
    vals, pos = pft_kernels.topk_softmax(s, k)
    assert torch.equal(s, before)  # read only
    assert torch.equal(_sets(pos), _sets(s.topk(k, -1).indices))
    want = torch.gather(torch.softmax(s, -1), -1, pos)
    torch.testing.assert_close(vals, want, rtol=1e-6, atol=1e-30)


def test_exp_is_within_an_ulp_or_two_of_float32_exp():
    y = np.concatenate([np.linspace(-87.3, 0, 200001), -np.geomspace(1e-8, 1, 1001)]).astype(np.float32)
    out = np.empty_like(y)
    bits = np.empty(y.shape[0], np.int32)
    total = pft_kernels._exp_shifted(y, y.shape[0], np.float32(0), out, bits)
    want = np.exp(y.astype(np.float64))
    assert np.max(np.abs(out / want - 1)) < 3e-7
    assert abs(total / want.sum() - 1) < 1e-5
    under = np.array([-87.7, -100, -1e4, -np.inf], np.float32)
    pft_kernels._exp_shifted(under, 4, np.float32(0), out, bits)
    assert np.all(out[:4] == 0)


def _chain(kernel: str, mask: bool, training: bool, d: int = 5):
    """One parity of a PFA stack on hand-sized windows: dense, first top-k, sparse (k = K', then smaller); head dim
    5: the sparse products by the sampled product, 13: by BLAS with every key (K' = 24) and sampled (K' = 12)."""
    torch.manual_seed(3)
    nb, h, n = 6, 2, 64
    ks = [64, 24, 24, 12, 5]
    labels = pft_engine.shift_labels(16, 24, 8, 'cpu') if mask else None
    shift = pft_engine.ShiftMask(labels) if mask else None
    bias = torch.randn(h, n, n) * 0.3
    outs, prev = [], None
    with config.options(pft_kernel=kernel), torch.no_grad():
        for k in ks:
            q, kk, v = (torch.randn(nb, h, n, d) for _ in range(3))
            out, prev = pft_engine.attend(q * d ** -0.5, kk, v, bias, shift, prev, k, training)
            outs.append((out.clone(), prev.values.clone() if prev.kind == 'sparse' else None,
                         prev.index.clone() if prev.kind == 'sparse' else None))
    return outs


@pytest.mark.parametrize('mask,training,d', [(False, False, 5), (True, False, 5), (True, True, 5), (True, False, 13),
                                             (False, True, 13)])
def test_engine_kernels_match_the_torch_path(mask, training, d):
    got, want = _chain('numba', mask, training, d), _chain('torch', mask, training, d)
    for (o1, v1, i1), (o2, v2, i2) in zip(got, want):
        torch.testing.assert_close(o1, o2, rtol=0, atol=2e-6)
        if i1 is None:
            continue
        order1, order2 = i1.long().argsort(-1), i2.long().argsort(-1)
        assert torch.equal(torch.gather(i1.long(), -1, order1), torch.gather(i2.long(), -1, order2))
        torch.testing.assert_close(torch.gather(v1, -1, order1), torch.gather(v2, -1, order2), rtol=1e-5, atol=1e-12)


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
