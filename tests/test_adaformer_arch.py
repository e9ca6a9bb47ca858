"""AdaFormer network: authors' checkpoint layout, equivalence with their code, sparse eval, robustness."""
import importlib.util
import json
import math
import os.path as osp

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

from adasr.archs.adaformer_arch import (
    AdaFormer,
    AdaFormerAttention,
    chunk_padding_positions,
    halting_sparsity,
    load_authors_weights,
    region_order,
)
from adasr.utils.checkpoint import CheckpointError
from tests.helpers import adaformer_fixtures as FIX

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA = osp.join(REPO, 'tests', 'data')
UNUSED = ('attn.proj.', 'attn.norm2.', 'attn.norm3.', 'project_out.')




@pytest.fixture(scope='module')
def paper_net():
    """Paper configuration with the guard's seeded, perturbed weights (estimator gain 5: partial halting)."""
    return FIX.guard_network(estimator_gain=5.0).eval()


def test_registered():
    assert 'AdaFormer' in ARCH_REGISTRY
    assert 'UncertaintyLoss' in LOSS_REGISTRY
    assert 'AdaFormerModel' in MODEL_REGISTRY


# -- checkpoint layout -------------------------------------------------------------------------------------------------


def test_state_dict_matches_authors_key_list():
    with open(osp.join(DATA, 'adaformer_state_dict_keys.json')) as f:
        expected = [(k, tuple(s)) for k, s in json.load(f)]
    state = AdaFormer().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected  # same names, shapes and order (242 keys)


def test_parameter_counts():
    net = AdaFormer()
    params = dict(net.named_parameters())
    assert sum(p.numel() for p in params.values()) == 1_602_721
    assert sum(p.numel() for k, p in params.items() if any(u in k for u in UNUSED)) == 51_456
    assert sum(p.numel() for k, p in params.items() if 'mean' in k) == 24


def test_mean_shift_initialised_from_img_range():
    net = AdaFormer()
    mean = torch.tensor([0.4488, 0.4371, 0.4040])
    assert torch.equal(net.sub_mean.weight.view(3, 3), torch.eye(3))
    assert torch.allclose(net.sub_mean.bias, -255 * mean)
    assert torch.allclose(net.add_mean.bias, 255 * mean)
    assert net.sub_mean.weight.requires_grad  # trainable, as the authors' (they drift in their checkpoints)


def test_every_used_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = AdaFormer(n_resblocks=2, depths=2, eps_h=float('-inf')).train()  # nothing halts: every branch runs
    sr, logits = net(torch.rand(2, 3, 16, 16))
    (sr.mean() + sum(lg.mean() for lg in logits)).backward()
    for name, p in net.named_parameters():
        unused = any(u in name for u in UNUSED)
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad != unused, name


def test_load_authors_weights_layouts(tmp_path):
    src = FIX.guard_network()
    state = src.state_dict()
    x = FIX.guard_input((1, 3, 16, 16), 0)
    with torch.no_grad():
        expected = src.eval()(x)
    for name, saved in (('bare', state), ('module', {f'module.{k}': v for k, v in state.items()}),
                        ('model', {f'model.{k}': v for k, v in state.items()}), ('basicsr', {'params': state})):
        path = str(tmp_path / f'{name}.pt')
        torch.save(saved, path)
        net = load_authors_weights(AdaFormer(), path).eval()
        with torch.no_grad():
            assert torch.equal(net(x), expected), name


def test_strict_load_error_names_the_keys(tmp_path):
    state = AdaFormer().state_dict()
    del state['body.var.2.bias']
    state['tail.0.weight'] = torch.zeros(12, 64, 3, 3)
    state['extra.weight'] = torch.zeros(1)
    path = str(tmp_path / 'bad.pt')
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_authors_weights(AdaFormer(), path)
    msg = str(err.value)
    assert 'body.var.2.bias' in msg and 'extra.weight' in msg and 'tail.0.weight (12, 64, 3, 3)' in msg


@pytest.mark.parametrize('kwargs, words', [
    ({'n_resblocks': 15}, 'n_resblocks'), ({'embed_dim': 60, 'num_heads': 7}, 'divisible'),
    ({'eval_global_split': 3}, 'eval_global_split'), ({'eval_global_split': 'whole'}, 'eval_global_split'),
    ({'rgb_mean': [0.5, 0.5]}, 'rgb_mean'), ({'eps_h': float('nan')}, 'eps_h'), ({'eps_h': '0.1'}, 'eps_h'),
    ({'sparse_eval': 1}, 'sparse_eval'), ({'upscale': 0}, 'upscale'), ({'depths': 2.0}, 'depths'),
    ({'img_range': -1}, 'img_range')])
def test_constructor_validates(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AdaFormer(**kwargs)


def test_constructor_is_keyword_only_without_kwargs():
    with pytest.raises(TypeError):
        AdaFormer(4)
    with pytest.raises(TypeError):
        AdaFormer(scale=4)


# -- equivalence with the authors' code ------------------------------------------------------------------------------

_ORACLE = {}


def _oracle_checks(reference_dir, conv3x3=None):
    path = osp.join(reference_dir, 'adaformer_x4_oracle.pt')
    if not osp.isfile(path):
        pytest.skip(f'{path} not found')
    if (path, conv3x3) not in _ORACLE:
        from adasr.cli.options import load_yaml
        from benchmarks.adaformer_oracle import compare_with_oracle, load_oracle

        network_g = dict(load_yaml(osp.join(REPO, 'options', 'test', 'test_AdaFormer_x4.yml'))['network_g'])
        network_g.pop('type')
        _ORACLE[path, conv3x3] = compare_with_oracle(AdaFormer(**network_g, conv3x3=conv3x3), load_oracle(path))
    return _ORACLE[path, conv3x3]


@pytest.mark.parametrize('input_key', ['input', 'input_37x45'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('conv3x3', [None, 'direct'])
def test_oracle_equivalence(reference_dir, input_key, mode, conv3x3):
    """The authors' code, run unchanged: masks exactly, SR within 1e-3 (0..255), logits, sparsity, intermediates;
    by default (conv3x3 'auto': the decoder and tail by Winograd F(2x2, 3x3) at CPU inference) and with the
    authors' direct convolutions everywhere."""
    from benchmarks.adaformer_oracle import format_table

    checks = [c for c in _oracle_checks(reference_dir, conv3x3) if c.input_key == input_key and c.mode == mode]
    quantities = {c.quantity for c in checks}
    assert 'sr' in quantities and 'global_keep_masks[5]' in quantities and 'local_keep_masks[5]' in quantities
    for c in checks:
        if 'masks' in c.quantity:
            assert c.error == 0, c
        if c.quantity == 'sr':
            assert c.error <= 1e-3, c
    assert all(c.passed for c in checks), format_table(checks, only_failures=True)


def test_verify_script_runs(reference_dir, capsys):
    path = osp.join(reference_dir, 'adaformer_x4_oracle.pt')
    if not osp.isfile(path):
        pytest.skip(f'{path} not found')
    spec = importlib.util.spec_from_file_location('verify', osp.join(REPO, 'scripts', 'verify_adaformer_oracle.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script's CLI itself is under test
    assert module.main([path, '--opt', osp.join(REPO, 'options/test/test_AdaFormer_x4.yml'), '--modes', 'eval']) == 0
    out = capsys.readouterr().out
    assert 'PASS' in out and 'FAIL' not in out


@pytest.mark.parametrize('case', sorted(FIX.GUARD_CASES))
def test_refactor_guard(case):
    """Seeded weights and inputs; outputs of this implementation recorded after it matched the authors' oracle."""
    spec = FIX.GUARD_CASES[case]
    stored = torch.load(osp.join(DATA, 'adaformer_guard.pt'), weights_only=True)['cases'][case]
    net = FIX.guard_network(spec.get('estimator_gain', 1.0), **spec['net'])
    x = FIX.guard_input(spec['shape'], spec['seed'])
    assert torch.equal(x, stored['input'])
    for mode in spec['modes']:
        got, ref = FIX.run_case(net, x, mode), stored[mode]
        for key in ('global_keep', 'local_keep'):
            assert torch.equal(got[key], ref[key]), (mode, key)
        assert torch.allclose(got['logits'], ref['logits'], atol=1e-4, rtol=0), mode
        assert torch.allclose(got['sr_sub'], ref['sr_sub'], atol=1e-3 / 255, rtol=0), mode
        assert math.isclose(float(got['sr_sum']), float(ref['sr_sum']), rel_tol=1e-6), mode


# -- sparse eval ------------------------------------------------------------------------------------------------------


def _naive_global_eval(attn: AdaFormerAttention, u, hw, keep, split):
    """Spec section 5 read literally, one sample: kept tokens listed region by region, padded with the last `pad`
    kept tokens (cyclically when fewer remain), cut into split**2 chunks; per chunk [LN(P); tokens] through the
    shared qkv, prototype aggregation over the chunk, kv_global, broadcast; padding dropped."""
    hp, wp = hw
    rh, rw = hp // split, wp // split
    kept = [y * wp + x for ry in range(split) for rx in range(split)
            for y in range(ry * rh, (ry + 1) * rh) for x in range(rx * rw, (rx + 1) * rw) if keep[y * wp + x]]
    out = u.clone()
    num, groups = len(kept), split * split
    if num == 0:
        return out
    pad = (-num) % groups
    padded = kept + [kept[(num - pad + j) % num] for j in range(pad)]
    size = len(padded) // groups
    heads, hd, m = attn.num_heads, attn.head_dim, attn.num_prototypes
    protos = attn.norm1(attn.prototype[0])
    for g in range(groups):
        idx = padded[g * size:(g + 1) * size]
        qkv = attn.qkv(torch.cat([protos, u[idx]])).view(m + size, 3, heads, hd)
        qp, k, v, q = qkv[:m, 0], qkv[m:, 1], qkv[m:, 2], qkv[m:, 0]
        agg = torch.stack([torch.softmax(qp[:, h] @ k[:, h].T * attn.scale, -1) @ v[:, h] for h in range(heads)], 1)
        kv = attn.kv_global(agg.reshape(m, -1)).view(m, 2, heads, hd)
        res = torch.stack([torch.softmax(q[:, h] @ kv[:, 0, h].T * attn.scale, -1) @ kv[:, 1, h]
                           for h in range(heads)], 1).reshape(size, -1)
        for j, t in enumerate(idx):
            if g * size + j < num:
                out[t] = res[j]
    return out


@pytest.fixture(scope='module')
def attn():
    """Perturbed weights giving aggregation logits of about +-6. (Much larger weights make the authors' training
    masked softmax differ from a true masked softmax: it subtracts the max over all keys, halted ones counting as
    0, so when every kept logit is far below 0 its eps terms dominate. That is their semantics, kept as is.)"""
    torch.manual_seed(3)
    a = AdaFormerAttention(64, 4, 16, 8)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return a.eval()


@pytest.mark.parametrize('split, hw, kept', [
    (1, (24, 40), 'half'), (2, (24, 40), 'half'), (2, (24, 40), 'all'), (4, (32, 32), 'half'), (2, (24, 40), 7),
    (4, (32, 32), 5), (8, (64, 64), 1), (8, (64, 64), 31), (8, (64, 64), 100), (2, (24, 40), 0)])
def test_chunked_global_matches_spec_reading(attn, split, hw, kept):
    """Vectorised chunking == the literal per-chunk reading, incl. L < pad (the authors' crash) and L = 0."""
    torch.manual_seed(4)
    n = hw[0] * hw[1]
    u = torch.randn(2, n, 64)
    if kept == 'all':
        keep = torch.ones(2, n, dtype=torch.bool)
    elif kept == 'half':
        keep = torch.rand(2, n) < 0.5
    else:
        keep = torch.zeros(2, n, dtype=torch.bool)
        for b in range(2):
            keep[b, torch.randperm(n)[:kept]] = True
    with torch.no_grad():
        got = attn.global_sparse(u, hw, keep, split)
        for b in range(2):
            ref = _naive_global_eval(attn, u[b], hw, keep[b].tolist(), split)
            assert torch.allclose(got[b], ref, atol=2e-5, rtol=1e-5), b


def test_chunk_padding_rule():
    assert chunk_padding_positions(10, 4, 'cpu').tolist() == list(range(10)) + [8, 9]  # the last `pad`, in order
    assert chunk_padding_positions(13, 4, 'cpu').tolist() == list(range(13)) + [10, 11, 12]
    assert chunk_padding_positions(16, 4, 'cpu').tolist() == list(range(16))
    assert chunk_padding_positions(5, 64, 'cpu').tolist() == list(range(5)) + [(5 - 59 + j) % 5 for j in range(59)]
    order = region_order(4, 6, 2, 'cpu').tolist()  # 2x3 regions, row-major, raster inside
    assert order == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16, 17, 21, 22, 23]


def test_sparse_attention_equals_dense_masked(attn):
    """Block level: gathered windows/tokens (split 1) == every token computed then masked (training path)."""
    torch.manual_seed(5)
    hw = (24, 40)
    u = torch.randn(2, 960, 64)
    keep_tok = torch.rand(2, 960) < 0.4
    keep_win = torch.rand(2 * 15) < 0.5
    with torch.no_grad():
        sparse = attn(u, hw, keep_tok, keep_win, split=1)
        dense = attn(u, hw, keep_tok, keep_win, split=None)
    assert torch.allclose(sparse, dense, atol=1e-5, rtol=1e-5)
    halted = ~keep_tok[0].view(24, 40)
    win = keep_win[:15].view(3, 5).repeat_interleave(8, 0).repeat_interleave(8, 1)
    both_halted = (halted & ~win).flatten()
    assert torch.equal(sparse[0, both_halted], 2 * u[0, both_halted])  # a fully halted token gets u + u


def test_sparse_eval_equals_dense_masked_network(paper_net):
    """Whole network, eval: sparse_eval (gather) == sparse_eval=False (dense masked), whole-image global."""
    x = FIX.guard_input((2, 3, 37, 45), 7)
    net = paper_net
    net.eps_h, net.eval_global_split = -0.5, 1
    try:
        with torch.no_grad():
            sparse = net(x)
            info_s = net.last_halting
            net.sparse_eval = False
            dense = net(x)
            info_d = net.last_halting
    finally:
        net.eps_h, net.eval_global_split, net.sparse_eval = 0.05, 'auto', True
    assert info_s.mode == 'sparse' and info_d.mode == 'dense'
    s = info_s.sparsity
    assert 0.2 < s['global_consumed'][2] < 0.95 and 0.2 < s['local_consumed'][2] < 0.95  # partial halting
    for a, b in zip(info_s.global_keep + info_s.local_keep, info_d.global_keep + info_d.local_keep):
        assert torch.equal(a, b)
    assert torch.allclose(sparse, dense, atol=1e-5, rtol=0)


def test_batch_equals_single_runs(paper_net):
    x = FIX.guard_input((2, 3, 70, 75), 8)  # padded 72x80: eval global split 2 (auto)
    with torch.no_grad():
        both = paper_net(x)
        info = paper_net.last_halting
        singles = [(paper_net(x[i:i + 1]), paper_net.last_halting) for i in range(2)]
    assert info.eval_global_split == 2
    for i, (y, single) in enumerate(singles):
        assert torch.allclose(both[i:i + 1], y, atol=1e-5, rtol=0)
        for a, b in zip(info.global_keep + info.local_keep, single.global_keep + single.local_keep):
            assert torch.equal(a[i:i + 1], b)


@pytest.mark.parametrize('size', [(8, 8), (5, 13), (1, 1), (3, 40), (16, 300)])
def test_small_and_odd_inputs(paper_net, size):
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        y = paper_net(x)
    assert y.shape == (1, 3, 4 * size[0], 4 * size[1]) and torch.isfinite(y).all()
    info = paper_net.last_halting
    assert info.input_size == size and info.eval_global_split == 1
    assert info.global_keep[0].shape[-2:] == info.padded_size == (-(-size[0] // 8) * 8, -(-size[1] // 8) * 8)


def test_few_tokens_left_at_split_8(paper_net):
    """Forced split 8 on a 64x64 input with a biased estimator: 1..31 tokens remain in some blocks (the authors'
    reshape error); the run completes and matches the dense masked computation's halting."""
    net = paper_net
    x = FIX.guard_input((1, 3, 64, 64), 9)
    net.eval_global_split = 8
    try:
        with torch.no_grad():
            net.body.var[2].bias.add_(4.0)
            y = net(x)
            kept = [int(g.sum()) for g in net.last_halting.global_keep]
    finally:
        with torch.no_grad():
            net.body.var[2].bias.sub_(4.0)
        net.eval_global_split = 'auto'
    assert any(1 <= k <= 31 for k in kept[:-1]), kept
    assert torch.isfinite(y).all()


def test_eval_split_rule():
    net = AdaFormer()
    sides = {8: 1, 32: 1, 40: 1, 64: 1, 72: 2, 128: 2, 136: 4, 264: 4, 272: 8, 2048: 8}
    for side, split in sides.items():
        assert net.global_split(side, 4096) == split, side
    net.eval_global_split = 1
    assert net.global_split(272, 480) == 1


def test_eps_h_override_changes_sparsity_monotonically(paper_net):
    x = FIX.guard_input((1, 3, 40, 48), 10)
    halted, outputs, macs = [], [], []
    try:
        for eps in (-1.0, -0.5, 0.05, 0.2, 0.5):
            paper_net.eps_h = eps
            with torch.no_grad():
                outputs.append(paper_net(x))
            halted.append(sum(paper_net.last_halting.sparsity['global_consumed']))
            macs.append(paper_net.flops(40, 48))
    finally:
        paper_net.eps_h = 0.05
    assert halted == sorted(halted) and halted[0] < halted[-1]
    assert macs == sorted(macs, reverse=True) and macs[0] > macs[-1]
    assert not torch.allclose(outputs[0], outputs[-1])


def test_halting_record(paper_net):
    x = FIX.guard_input((1, 3, 37, 45), 11)
    with torch.enable_grad():
        paper_net(x)
    info = paper_net.last_halting
    assert len(info.logits) == len(info.global_keep) == len(info.local_keep) == 6
    assert all(not t.requires_grad for t in info.logits + info.confidence)
    assert info.input_size == (37, 45) and info.padded_size == (40, 48)
    for lg, c in zip(info.logits, info.confidence):
        assert torch.equal(c, torch.sigmoid(lg))
    score = torch.cumsum(torch.stack(info.confidence), 0)
    for r, g, loc in zip(score, info.global_keep, info.local_keep):
        assert torch.equal(g, (r < 0.95).float())
        win = torch.nn.functional.avg_pool2d(r, 8) < 0.95
        assert torch.equal(loc, win.float().repeat_interleave(8, 2).repeat_interleave(8, 3))
    s = info.sparsity
    assert s['global_consumed'] == [0.0] + s['global_by_mask'][:-1]
    assert s['local_authors'] == s['local_by_mask']
    kept0 = float(info.global_keep[0].sum())
    assert s['global_authors'][0] == pytest.approx(1 - kept0 / (37 * 45))  # their formula: kept / unpadded H*W
    assert s['global_by_mask'][0] == pytest.approx(1 - kept0 / (40 * 48))
    assert halting_sparsity(info.global_keep, info.local_keep, (40, 48))['global_authors'] == s['global_by_mask']
    depth = info.attention_depth('global')
    assert torch.equal(depth, 1 + torch.stack(info.global_keep[:-1]).sum(0))


def test_train_mode_returns_cropped_logits_with_estimator_graph(paper_net):
    paper_net.train()
    try:
        sr, logits = paper_net(FIX.guard_input((2, 3, 21, 35), 12))
    finally:
        paper_net.eval()
    assert sr.shape == (2, 3, 84, 140) and len(logits) == 6
    assert all(lg.shape == (2, 1, 21, 35) and lg.requires_grad for lg in logits)
    assert paper_net.last_halting.mode == 'dense' and paper_net.last_halting.eval_global_split is None


def test_flops(paper_net):
    net = FIX.guard_network()
    h, w = 40, 48
    n = h * w
    dense = net.flops(h, w, breakdown=True)  # no forward yet: nothing halted
    assert dense['resblocks'] == 16 * 2 * n * 64 * 64 * 9
    assert dense['total'] == pytest.approx(sum(v for k, v in dense.items() if k != 'total'))
    assert dense['local_attention'] == 6 * n * 2 * 64 * 64
    with torch.no_grad():
        net.eval()(torch.rand(1, 3, h, w))
        net.body.var[2].bias.add_(30.0)  # everything halts after block 0
        net(torch.rand(1, 3, h, w))
    halted = net.flops(h, w, breakdown=True)
    assert halted['local_attention'] == dense['local_attention'] / 6  # only block 0 attends
    assert halted['global_qkv'] == n * 64 * 192 + 6 * 16 * 64 * 64
    assert halted['resblocks'] == dense['resblocks'] and halted['total'] < dense['total']
    authors = net.flops(h, w, convention='authors', breakdown=True)
    assert authors['estimator'] == 0 and authors['local_attention'] == 0  # their off-by-one: mask after block l
    with pytest.raises(ValueError, match='convention'):
        net.flops(h, w, convention='fvcore')
