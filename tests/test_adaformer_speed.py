"""AdaFormer's fast eval paths give the straightforward computation's numbers; the speed tooling runs."""
import pytest
import torch
from torch import nn

from adasr.ops import cpu_inference
from adasr.ops.layout import is_channels_last
from tests.helpers import adaformer_fixtures as FIX
from tests.helpers.numerics import assert_same_numbers


@pytest.fixture(scope='module')
def paper_net():
    """Paper configuration with the guard's seeded, perturbed weights (estimator gain 5: partial halting)."""
    return FIX.guard_network(estimator_gain=5.0).eval()


def _run(net, x, bias, eps_h, complete, grad=False):
    net.eps_h, net.complete_halting_maps = eps_h, complete
    try:
        with torch.no_grad():
            net.body.var[2].bias.add_(bias)
        with torch.set_grad_enabled(grad):
            y = net(x).detach()
        return y, net.last_halting
    finally:
        with torch.no_grad():
            net.body.var[2].bias.sub_(bias)
        net.eps_h, net.complete_halting_maps = 0.05, False


@pytest.mark.parametrize('shape, eps_h, bias', [((1, 3, 64, 64), 0.2, 4.0), ((2, 3, 70, 75), 0.3, 2.5)])
def test_skipping_dead_windows_changes_nothing(paper_net, shape, eps_h, bias):
    """The estimator skips halted tokens of halted windows: SR and every mask are bit for bit those of the complete
    computation, the computed logits too, only such tokens are skipped, and kept tokens of halted windows are
    computed alone (the token path)."""
    x = FIX.guard_input(shape, 3)
    full_sr, full = _run(paper_net, x, bias, eps_h, complete=True)
    sr, info = _run(paper_net, x, bias, eps_h, complete=False)
    assert all(full.complete) and not all(info.complete) and info.complete[0]
    assert torch.equal(sr, full_sr)
    for a, b in zip(info.global_keep + info.local_keep, full.global_keep + full.local_keep):
        assert torch.equal(a, b)
    alone = 0  # entries computed by the token path: kept tokens of halted windows
    for i in range(len(info.logits)):
        done = info.estimated(i)
        if not info.complete[i]:
            alone += int((done & (info.local_keep[i - 1] == 0)).sum())
        assert torch.equal(info.logits[i][done], full.logits[i][done])
        assert torch.isposinf(info.logits[i][~done]).all() and (info.confidence[i][~done] == 1).all()
        if not info.complete[i]:
            assert done.float().mean() <= 0.5
            dead = (info.global_keep[i - 1] == 0) & (info.local_keep[i - 1] == 0)  # skipped only where all halted
            assert bool(dead[~done].all())
        else:
            assert bool(done.all())
    assert alone > 0


@pytest.mark.parametrize('shape, bias, eps_h, kinds', [
    ((1, 3, 64, 64), 20.0, 0.05, {'attention', 'halted'}),
    ((1, 3, 64, 64), 3.0, 0.3, {'attention', 'kept tokens'}),
    ((1, 3, 64, 64), 6.0, 0.05, {'attention', 'kept tokens', 'halted'}),  # one kept token: the list wraps around
    ((2, 3, 40, 56), 6.0, 0.3, {'attention', 'kept tokens', 'halted'}),
])
def test_blocks_without_windows_in_the_mlp_groups_change_nothing(paper_net, shape, bias, eps_h, kinds, monkeypatch):
    """A block where no window attends runs LN1 and its doubled residual in the MLP's row groups, the kept tokens'
    global branch from their own LN1 rows: SR, every logit and mask bit for bit those of the path through the
    attention module (u + u at halted tokens, global + u at kept ones), with every token halted, a few kept, one
    kept (fewer than the chunk padding: the list repeats cyclically), and per sample in a batch of two."""
    from adasr.archs import adaformer_arch as arch
    from adasr.ops import cpu_inference

    seen = []
    fused = cpu_inference.residual_rows_

    def spy(x, fn, a=None, rows=None, twice=None, patch=None):
        seen.append('attention' if twice is None else 'halted' if patch is None else 'kept tokens')
        if patch is not None and len(patch[0]) == 1:
            seen.append('one kept')
        return fused(x, fn, a, rows, twice, patch)

    monkeypatch.setattr(cpu_inference, 'residual_rows_', spy)
    x = FIX.guard_input(shape, 5)
    sr, info = _run(paper_net, x, bias, eps_h, complete=True)
    assert kinds <= set(seen)
    if bias == 6.0 and eps_h == 0.05:
        assert 'one kept' in seen
    with monkeypatch.context() as m:
        m.setattr(arch, '_windows_halted', lambda keep_tok, keep_win: False)
        ref_sr, ref = _run(paper_net, x, bias, eps_h, complete=True)
    assert torch.equal(sr, ref_sr)
    for a, b in zip(info.logits + info.global_keep + info.local_keep, ref.logits + ref.global_keep + ref.local_keep):
        assert torch.equal(a, b)


def test_residual_rows_twice_is_the_doubled_sum():
    from adasr.ops import cpu_inference

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3000, 16, generator=gen) * 100
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        ref = x + (norm(x) + norm(x))
        ref = ref + torch.tanh(ref)
        out = cpu_inference.residual_rows_(x.clone(), torch.tanh, rows=700, twice=norm)
        assert torch.equal(out, ref)
        # patched rows (flat over both samples, across group boundaries) take the given values before fn
        rows = torch.tensor([0, 699, 700, 2999, 3000, 5999])
        values = torch.randn(6, 16, generator=gen)
        ref = x + (norm(x) + norm(x))
        ref.view(-1, 16)[rows] = values
        ref = ref + torch.tanh(ref)
        out = cpu_inference.residual_rows_(x.clone(), torch.tanh, rows=700, twice=norm, patch=(rows, values))
        assert torch.equal(out, ref)
        with pytest.raises(ValueError, match='not both'):
            cpu_inference.residual_rows_(x.clone(), torch.tanh, x, twice=norm)


@pytest.mark.parametrize('size,seed,split', [((16, 24), 2, 1), ((45, 61), 4, 1), ((96, 136), 7, 2)])
def test_onednn_inference_paths_match_plain_pytorch(paper_net, size, seed, split):
    """Without autograd on the CPU the ResBlock chains, the estimator and the MLP run on oneDNN layouts and fused
    ops, tokens become NCHW maps by blocked transposes, the attention scale is folded into the q weights, and the
    cache-sized engines run the window attention in groups, the global branch chunk by chunk (eval global split 2
    for the larger input) and the MLP in row groups, the estimator's last convolution by the compiled kernel where
    PyTorch convolves by oneDNN (not at 16 x 24: 12288 elements, PyTorch's own convolution); with autograd on (same
    eval computation otherwise) they run as plain PyTorch modules: SR, masks and logits the same bit for bit
    (conv3x3 'direct': the authors' convolutions)."""
    x = FIX.guard_input((1, 3, *size), seed)
    assert paper_net.global_split(*size) == split
    paper_net.conv3x3 = 'direct'
    try:
        fast_sr, fast = _run(paper_net, x, 0.0, 0.05, complete=True)
        plain_sr, plain = _run(paper_net, x, 0.0, 0.05, complete=True, grad=True)
    finally:
        paper_net.conv3x3 = None
    assert_same_numbers(fast_sr, plain_sr)  # bit for bit where the BLAS is batch-invariant (tests/helpers/numerics)
    for key in ('logits', 'global_keep', 'local_keep'):
        for a, b in zip(getattr(fast, key), getattr(plain, key)):
            assert_same_numbers(a, b, key)


@pytest.mark.parametrize('threads', [1, 2])
def test_adam_channels_last_output_is_the_nchw_output(paper_net, threads, torch_threads):
    """AdaM for a channels-last decoder: the unembedding and the module residual as one oneDNN linear with the
    addition as a post-op give the map of the 1x1 convolution plus ``fe`` in the decoder's layout (bit for bit
    where PyTorch's convolution is that GEMM, as the check of the embedding's convolution of the same shapes found:
    here one thread; else within float32 rounding), and the same logits and masks."""
    torch_threads(threads)
    adam = paper_net.body
    fe = torch.randn(1, adam.embed.in_channels, 48, 64, generator=torch.Generator().manual_seed(5)) * 20
    with torch.no_grad():
        runs = [adam(fe, 0.05, 1, channels_last=cl) for cl in (False, True)]
    (nchw, *rest_n), (cl, *rest_c) = runs
    assert nchw.is_contiguous() and is_channels_last(cl)
    if cpu_inference._pointwise_same[(tuple(fe.shape), tuple(adam.unembed.weight.shape), threads)]:
        assert torch.equal(cl, nchw)
    else:
        torch.testing.assert_close(cl, nchw, rtol=1e-6, atol=1e-6 * float(nchw.abs().max()))
    for a, b in zip(rest_n[:4], rest_c[:4]):  # logits, global and window keep maps, complete flags
        assert len(a) == len(b) and all(torch.equal(p, q) if torch.is_tensor(p) else p == q for p, q in zip(a, b))


def test_stage_profile_names_every_stage_and_unwraps(paper_net):
    from benchmarks.adaformer_speed import stage_profile

    result = stage_profile(paper_net, FIX.guard_input((1, 3, 16, 24), 5), repeats=1, warmup=0)
    stages = result['stages']
    assert {'confidence estimator (6x)', 'LayerNorm 2 + MLP (6x)', 'encoder: 8 ResBlocks (16 conv3x3)'} <= set(stages)
    assert any(k.startswith('global attention') for k in stages) and any(k.startswith('glue') for k in stages)
    assert all(w >= 0 and c >= 0 for w, c in stages.values()) and len(result['sparsity']['global_consumed']) == 6
    assert 'forward' not in vars(paper_net) and 'estimate' not in vars(paper_net.body)  # timers removed


class _AuthorsLikeAttention(nn.Module):
    """The authors' ``LightViTAttention`` call structure: forward = forward_local + forward_global."""

    def forward_local(self, x):
        return x * 2

    def forward_global(self, x):
        return x + 1

    def forward(self, x):
        return self.forward_local(x) + self.forward_global(x)


class _AuthorsLikeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(4), _AuthorsLikeAttention(), nn.LayerNorm(4), \
            nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _AuthorsLikeNet(nn.Module):
    """A stand-in with the module names of the authors' AdaFormer (their code is not part of the tests)."""

    def __init__(self):
        super().__init__()
        self.sub_mean, self.head, self.add_mean = nn.Identity(), nn.Linear(4, 4), nn.Identity()
        self.shollow_feature_extraction, self.deep_feature_extraction = nn.Linear(4, 4), nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)
        self.body = nn.Module()
        self.body.embed, self.body.unembed, self.body.var = nn.Identity(), nn.Identity(), nn.Linear(4, 1)
        self.body.blocks = nn.ModuleList(_AuthorsLikeBlock() for _ in range(2))

    def forward(self, x):
        x = self.body.embed(self.shollow_feature_extraction(self.head(self.sub_mean(x))))
        for blk in self.body.blocks:
            x = blk(x)
            self.body.var(x)
        return self.add_mean(self.tail(self.deep_feature_extraction(self.body.unembed(x))))


def test_paired_stage_profile_times_both_networks_by_the_same_stages(paper_net):
    """This tree's network and one with the authors' module names, profiled in turns under one set of stage labels
    (the authors' two attention branches by their method names); this tree's Winograd tail is its own stage, not
    glue; every timer is removed afterwards."""
    from benchmarks import adaformer_speed as S

    theirs = _AuthorsLikeNet()
    x = FIX.guard_input((1, 3, 16, 24), 5)
    ours_r, theirs_r = S.paired_stage_profile([(paper_net, x, S._wrap_adaformer),
                                               (theirs, torch.randn(3, 4), S._wrap_authors)], repeats=2, warmup=1)
    assert {S.LOCAL, S.GLOBAL, S.TAIL} <= set(theirs_r['stages']) and theirs_r['sparsity'] is None
    assert set(theirs_r['stages']) <= set(ours_r['stages'])
    assert ours_r['stages'][S.TAIL][1] > 0 and len(ours_r['sparsity']['global_consumed']) == 6
    timer = S._StageTimer()
    S._wrap_adaformer(timer, paper_net)
    wrapped = set(vars(paper_net))
    timer.remove()
    assert '_tail' in wrapped and '_tail' not in vars(paper_net)  # the Winograd tail timed as the tail
    for r in (ours_r, theirs_r):
        assert all(w >= 0 and c >= 0 for w, c in r['stages'].values()) and r['total'][0] > 0
    assert 'forward' not in vars(theirs) and '_tail' not in vars(paper_net)
    assert not {'forward', 'forward_local', 'forward_global'} & set(vars(theirs.body.blocks[0].attn))
    # a wrap that fails part of the way (this tree's attention has no forward_local) leaves no timer behind
    with pytest.raises(AttributeError, match='forward_local'):
        S.paired_stage_profile([(paper_net, x, S._wrap_authors)], repeats=1, warmup=0)
    assert not any('forward' in vars(m) for m in paper_net.modules()) and 'forward' not in vars(paper_net)


@pytest.mark.slow
def test_side_by_side_runs_in_turns():
    """Two contenders in their own processes (this tree twice: identical SR), one round each."""
    from benchmarks.adaformer_speed import side_by_side

    res = side_by_side([('a', 'adasr', None), ('b', 'adasr', None)], size=(16, 24), repeats=2, threads=1)
    assert list(res) == ['a', 'b']
    assert all(len(r['wall']) == 2 and len(r['cpu']) == 2 for r in res.values())
    assert res['b']['sr_diff_vs_first'] == 0.0


def test_map_after_the_last_block_is_computed_only_when_read(paper_net, monkeypatch):
    """Sparse eval does not run the estimator after the last block (that map decides nothing); reading the halting
    record computes it, with the numbers of the complete computation."""
    calls = []
    real = paper_net.body.estimate
    monkeypatch.setattr(paper_net.body, 'estimate', lambda *a: calls.append(1) or real(*a))
    x = FIX.guard_input((1, 3, 40, 48), 6)
    full_sr, full = _run(paper_net, x, 2.5, 0.3, complete=True)
    assert len(calls) == 6
    calls.clear()
    paper_net.eps_h = 0.3
    try:
        with torch.no_grad():
            paper_net.body.var[2].bias.add_(2.5)
            sr = paper_net(x)
            assert len(calls) == 5
            info = paper_net.last_halting
            assert len(calls) == 6 and len(info.logits) == 6
    finally:
        with torch.no_grad():
            paper_net.body.var[2].bias.sub_(2.5)
        paper_net.eps_h = 0.05
    assert torch.equal(sr, full_sr)
    assert torch.equal(info.global_keep[-1], full.global_keep[-1]) and torch.equal(info.local_keep[-1],
                                                                                   full.local_keep[-1])
    done = info.estimated(5)
    assert torch.equal(info.logits[5][done], full.logits[5][done])


def test_map_after_the_last_block_under_autocast_read_outside_it(paper_net):
    """A forward under bf16 autocast (YAML testing with val.precision bf16, the precision report) whose halting record
    is read after the autocast region: the deferred map after the last block is computed under the call's autocast
    (it raised a dtype mismatch before), with the numbers of the complete computation under autocast."""
    x = FIX.guard_input((1, 3, 40, 48), 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        full_sr, full = _run(paper_net, x, 2.5, 0.3, complete=True)
    paper_net.eps_h = 0.3
    try:
        with torch.no_grad():
            paper_net.body.var[2].bias.add_(2.5)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                sr = paper_net(x)
            info = paper_net.last_halting  # read outside the autocast region
    finally:
        with torch.no_grad():
            paper_net.body.var[2].bias.sub_(2.5)
        paper_net.eps_h = 0.05
    assert len(info.logits) == 6 and torch.equal(sr, full_sr)
    assert torch.equal(info.global_keep[-1], full.global_keep[-1])
    done = info.estimated(5)
    assert torch.equal(info.logits[5][done], full.logits[5][done])


def test_winograd_convolutions_keep_sr_close_and_masks(paper_net, monkeypatch):
    """conv3x3='winograd' (encoder/decoder chains and tail by Winograd F(4x4, 3x3)): SR within float32 noise of the
    direct convolutions, the same halting masks. The default 'auto' runs only the decoder and the tail by Winograd
    F(2x2, 3x3): logits and masks are the direct path's bit for bit (the encoder and estimator run directly), SR
    moves less than with 'winograd'. 'direct' gives the direct numbers; under autograd the convolutions run
    directly."""
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips

    from adasr.ops import winograd

    monkeypatch.delenv('ADASR_CONV3X3', raising=False)
    x = FIX.guard_input((2, 3, 40, 44), 7)
    assert paper_net.conv3x3 is None and paper_net._conv_methods() == ('direct', 'f2')
    variants = []
    real = winograd._forward
    monkeypatch.setattr(winograd, '_forward', lambda x, conv, relu, *rest: variants.append(conv.variant) or
                        real(x, conv, relu, *rest))
    auto_sr, auto = _run(paper_net, x, 2.5, 0.3, complete=True)
    assert variants == ['f2'] * 17  # the decoder's 16 convolutions and the tail's
    try:
        paper_net.conv3x3 = 'direct'
        direct_sr, direct = _run(paper_net, x, 2.5, 0.3, complete=True)
        paper_net.conv3x3 = 'winograd'
        wino_sr, wino = _run(paper_net, x, 2.5, 0.3, complete=True)
        # batch 1: oneDNN's blocked and plain convolutions round alike there at any thread count
        paper_net.conv3x3 = 'direct'
        plain_sr, _ = _run(paper_net, x[:1], 2.5, 0.3, complete=True, grad=True)
        assert_same_numbers(plain_sr, _run(paper_net, x[:1], 2.5, 0.3, complete=True)[0])  # autograd: direct
    finally:
        paper_net.conv3x3 = None
    assert not torch.equal(wino_sr, direct_sr) and not torch.equal(auto_sr, direct_sr)  # Winograd really ran
    scale = float(direct_sr.abs().max())
    auto_err, wino_err = float((auto_sr - direct_sr).abs().max()), float((wino_sr - direct_sr).abs().max())
    assert wino_err <= 1e-5 * scale and auto_err < wino_err
    for a, b in zip(wino.global_keep + wino.local_keep, direct.global_keep + direct.local_keep):
        assert torch.equal(a, b)
    for key in ('logits', 'global_keep', 'local_keep'):
        for a, b in zip(getattr(auto, key), getattr(direct, key)):
            assert torch.equal(a, b), key
    with pytest.raises(ValueError, match="conv3x3 must be one of"):
        paper_net.conv3x3 = 'fft'


def test_winograd_against_the_authors_oracle(reference_dir):
    """The opt-in Winograd convolutions against the authors' outputs (eval): every mask identical, logits and
    confidences within the oracle tolerances, SR within 2e-3 on 0..255 (measured 1.5e-3; direct: 2.7e-4, the
    default 'auto' 3.4e-4; the faithful tolerance is 1e-3, which is why 'winograd' stays opt-in)."""
    import os.path as osp

    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    path = osp.join(reference_dir, 'adaformer_x4_oracle.pt')
    if not osp.isfile(path):
        pytest.skip(f'{path} not found')
    from adasr.archs.adaformer_arch import AdaFormer
    from adasr.cli.options import load_yaml
    from benchmarks.adaformer_oracle import compare_with_oracle, load_oracle

    repo = osp.dirname(osp.dirname(osp.abspath(__file__)))
    network_g = dict(load_yaml(osp.join(repo, 'options', 'test', 'test_AdaFormer_x4.yml'))['network_g'])
    network_g.pop('type')
    checks = compare_with_oracle(AdaFormer(**network_g, conv3x3='winograd'), load_oracle(path), modes=('eval',))
    assert {c.input_key for c in checks} == {'input', 'input_37x45'}
    for c in checks:
        if c.quantity == 'sr':
            assert c.error <= 2e-3, c
        elif not c.quantity.startswith('intermediates.'):  # masks (0 differing entries), logits, confidences
            assert c.passed, c


def _plain_cpu(monkeypatch):
    """Turn off the cache-sized CPU inference engines (adasr.ops.cpu_inference): the batched computation."""
    from adasr.ops import cpu_inference

    monkeypatch.setattr(cpu_inference, 'fast_path_ok', lambda x: False)


@pytest.mark.parametrize('keep_share', [None, 1.0, 0.6, 0.3, 0.01])
@pytest.mark.parametrize('threads, step_tokens', [(1, 7500), (2, 5000), (3, 10 ** 9)])
def test_chunkwise_global_and_grouped_local_match_batched(paper_net, monkeypatch, keep_share, threads, step_tokens,
                                                         torch_threads):
    """CPU inference computes the global chunks of at least 1024 tokens one at a time on one thread and in steps of
    whole chunks up to _GLOBAL_STEP_TOKENS on more (here 5000: at 30% kept two steps of two chunks, the padded one
    in the second; 10 ** 9: one step of all four), and the window attention in groups of windows read from the
    raster qkv map: bit for bit the batched computation (random keep maps, split 2, chunks from 40 to 8192 tokens;
    every window kept, so that the local branch takes the raster path). The steps are counted."""
    from adasr.archs import adaformer_arch

    monkeypatch.setattr(adaformer_arch, '_GLOBAL_STEP_TOKENS', step_tokens)
    torch_threads(threads)
    attn = paper_net.body.blocks[1].attn
    hw, split = (128, 256), 2
    u = torch.randn(2, hw[0] * hw[1], 64, generator=torch.Generator().manual_seed(11))
    keep = None if keep_share is None else torch.rand(2, u.shape[1], generator=torch.Generator().manual_seed(12)) \
        < keep_share
    steps = []
    with torch.no_grad():
        with monkeypatch.context() as m:  # the rows projected per call of the global branch: one call per step
            m.setattr(attn, '_qkv_scaled', lambda lin, x, real=attn._qkv_scaled: steps.append(len(x)) or real(lin, x))
            fast_g = attn.global_sparse(u, hw, keep, split)
        fast = attn.forward_sparse(u, hw, keep, None, split)
        with monkeypatch.context() as m:
            _plain_cpu(m)
            plain_g = attn.global_sparse(u, hw, keep, split)
            plain = attn.forward_sparse(u, hw, keep, None, split)
    assert_same_numbers(fast_g, plain_g)
    assert_same_numbers(fast, plain)
    kept = [u.shape[1]] * 2 if keep is None else keep.sum(1).tolist()
    chunks = [-(-k // 4) for k in kept]  # split 2: four chunks per sample, the list padded to whole chunks
    if chunks[0] < 1024:  # below _CHUNKWISE_MIN: one batched call per sample
        assert steps == [4 * c for c in chunks]
    else:
        per_step = [1 if threads == 1 else max(1, step_tokens // c) for c in chunks]
        assert steps == [min(n, 4 - j) * c for c, n in zip(chunks, per_step) for j in range(0, 4, n)]
        if threads > 1 and keep_share == 0.3:  # steps of several chunks, the padded last one among them
            assert len(steps) < 8 and min(steps) >= 2 * chunks[0]
    # no window attends: global + u, the sum computed while the global branch writes its tokens
    none = torch.zeros(2 * (hw[0] // 8) * (hw[1] // 8), dtype=torch.bool)
    with torch.no_grad():
        assert_same_numbers(attn.forward_sparse(u, hw, keep, none, split), plain_g + u)
        with monkeypatch.context() as m:
            _plain_cpu(m)
            assert torch.equal(attn.forward_sparse(u, hw, keep, none, split), plain_g + u)


@pytest.mark.parametrize('threads', [1, 2])
def test_estimator_window_and_token_paths_give_the_whole_maps_numbers(paper_net, threads, torch_threads):
    """Logits computed for chosen windows (with their halo) and single tokens (their 5 x 5 patch) are the whole
    map's bit for bit, at the image's edges and corners too, for one patch and odd counts, on one and two threads
    (oneDNN's kernel for a batch of one and PyTorch's scalar tanh for a share's last elements would round otherwise);
    everything else is +inf."""
    adam = paper_net.body
    b, hp, wp, s = 2, 40, 48, adam.window_size
    t = torch.randn(b, hp * wp, adam.embed.out_channels, generator=torch.Generator().manual_seed(3)) * 3
    none = torch.zeros(0, dtype=torch.long)
    nwin = (hp // s) * (wp // s)
    cases = [(torch.tensor([0, 7, nwin + 29]), none),
             (none, torch.tensor([0, 5, wp - 1, hp * wp - 1, hp * wp + 3 * wp + 47, 2 * hp * wp - wp])),
             (torch.tensor([1]), torch.tensor([3 * wp + 20])), (none, torch.tensor([17])), (none, none)]
    torch_threads(threads)
    with torch.no_grad():
        whole = adam.estimate(t, (hp, wp), None)
        for wins, toks in cases:
            out = adam.estimate(t, (hp, wp), (wins, toks))
            expected = torch.zeros(b, hp // s, wp // s, s, s, dtype=torch.bool)
            expected.view(-1, s, s)[wins] = True
            expected = expected.permute(0, 1, 3, 2, 4).reshape(b, 1, hp, wp)
            expected.view(-1)[toks] = True
            assert torch.equal(~torch.isposinf(out), expected)
            assert torch.equal(out[expected], whole[expected])


def test_live_windows_lists_kept_windows_whole_and_kept_tokens_of_halted_windows(paper_net):
    """A window still kept needs all its logits (its mean decides); in a halted window only its kept tokens do."""
    adam = paper_net.body
    s, b, nwy, nwx = adam.window_size, 1, 6, 8
    g = torch.zeros(b, 1, nwy * s, nwx * s, dtype=torch.bool)
    w = torch.zeros(b, 1, nwy, nwx, dtype=torch.bool)
    w[0, 0, 2, 3] = True  # window 19 kept, with a kept token in it
    g[0, 0, 2 * s + 1, 3 * s + 1] = True
    g[0, 0, 5, 9] = g[0, 0, 40, 63] = True  # kept tokens of halted windows 1 and 47
    wins, toks = adam.live_windows(g, w)
    assert wins.tolist() == [19] and toks.tolist() == [5 * nwx * s + 9, 40 * nwx * s + 63]
    g[0, 0, ::2] = True  # half the tokens kept: the whole map is cheaper
    assert adam.live_windows(g, w) is None
    w[:] = True
    assert adam.live_windows(torch.zeros_like(g), w) is None
