"""adasr.ops: sparse scores / aggregation at given key indices against their dense definitions."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from adasr import ops
from adasr.ops import config, scheduling
from adasr.ops import sparse_attention as sa


def _case(g=3, n=20, m=24, d=7, k=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, n, d, generator=gen, dtype=dtype)
    kk = torch.randn(g, m, d, generator=gen, dtype=dtype)
    v = torch.randn(g, m, d, generator=gen, dtype=dtype)
    idx = torch.rand(g, n, m, generator=gen).topk(k, -1).indices
    a = torch.rand(g, n, k, generator=gen, dtype=dtype)
    return q, kk, v, a, idx


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize('method', ['gather', 'dense'])
def test_sparse_qk_matches_dense_masked_autograd(method):
    q, k, _, _, idx = _case()
    out, (gq, gk) = _grads(lambda a, b: sa.torch_sparse_qk(a, b, idx, method), q, k)
    ref, (rq, rk) = _grads(lambda a, b: ops.dense_sparse_qk(a, b, idx), q, k)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gq, rq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gk, rk, rtol=1e-12, atol=1e-12)
    # keys never selected get exactly zero gradient; selected ones do not
    chosen = torch.zeros(k.shape[:2], dtype=torch.bool).scatter_(1, idx.flatten(1), True)
    assert (gk[~chosen] == 0).all() and (gk[chosen].abs().sum(-1) > 0).all()


@pytest.mark.parametrize('method', ['gather', 'dense'])
def test_sparse_av_matches_dense_masked_autograd(method):
    _, _, v, a, idx = _case()
    out, (ga, gv) = _grads(lambda x, y: sa.torch_sparse_av(x, y, idx, method), a, v)
    ref, (ra, rv) = _grads(lambda x, y: ops.dense_sparse_av(x, y, idx), a, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, ra, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, rv, rtol=1e-12, atol=1e-12)


def test_sparse_ops_by_definition():
    """Element-wise definition, written as loops, on a tiny case."""
    q, k, v, a, idx = _case(g=2, n=4, m=6, d=3, k=2)
    qk = ops.sparse_qk(q, k, idx)
    av = ops.sparse_av(a, v, idx)
    for g in range(2):
        for i in range(4):
            for t in range(2):
                assert torch.isclose(qk[g, i, t], (q[g, i] * k[g, idx[g, i, t]]).sum())
            want = sum(a[g, i, t] * v[g, idx[g, i, t]] for t in range(2))
            torch.testing.assert_close(av[g, i], want)


@pytest.mark.parametrize('method', ['gather', 'dense'])
def test_gradcheck_float64(method):
    q, k, v, a, idx = _case(g=2, n=5, m=6, d=3, k=3)
    args = [t.requires_grad_() for t in (q, k)]
    assert torch.autograd.gradcheck(lambda x, y: sa.torch_sparse_qk(x, y, idx, method), args)
    args = [t.requires_grad_() for t in (a, v)]
    assert torch.autograd.gradcheck(lambda x, y: sa.torch_sparse_av(x, y, idx, method), args)


def test_duplicate_indices_add_up():
    v = torch.arange(12.).view(1, 4, 3)
    idx = torch.tensor([[[1, 1], [0, 3]]])
    a = torch.tensor([[[0.5, 0.25], [1., 2.]]])
    out, (ga, gv) = _grads(lambda x, y: ops.sparse_av(x, y, idx), a, v)
    torch.testing.assert_close(out[0, 0], 0.75 * v[0, 1])
    ref, (ra, rv) = _grads(lambda x, y: ops.dense_sparse_av(x, y, idx), a, v)
    torch.testing.assert_close(gv, rv)


def test_chunked_equals_unchunked(monkeypatch):
    q, k, v, a, idx = _case(g=7, n=16, m=16, d=4, k=6, dtype=torch.float32)
    whole = [ops.sparse_qk(q, k, idx), ops.sparse_av(a, v, idx)]
    _, g_whole = _grads(lambda x, y: ops.sparse_qk(x, y, idx), q, k)
    monkeypatch.setenv('ADASR_ATTN_MEMORY_MB', '0.001')  # ~1 KB: one batch entry per chunk
    assert sa.chunk_count(7, 4 * 16 * 16) == 1
    chunked = [ops.sparse_qk(q, k, idx), ops.sparse_av(a, v, idx)]
    _, g_chunked = _grads(lambda x, y: ops.sparse_qk(x, y, idx), q, k)
    for x, y in zip(whole + g_whole, chunked + g_chunked):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_leading_dims_and_int32_index():
    q, k, v, a, idx = _case(g=6, dtype=torch.float32)
    q4, k4, v4, a4 = (t.view(2, 3, *t.shape[1:]) for t in (q, k, v, a))
    i4 = idx.view(2, 3, *idx.shape[1:]).int()
    torch.testing.assert_close(ops.sparse_qk(q4, k4, i4).view_as(ops.sparse_qk(q, k, idx)), ops.sparse_qk(q, k, idx))
    torch.testing.assert_close(ops.sparse_av(a4, v4, i4).view(6, 20, 7), ops.sparse_av(a, v, idx))


def test_bad_arguments_raise_clear_errors():
    q, k, v, a, idx = _case()
    with pytest.raises(TypeError, match='integer'):
        ops.sparse_qk(q, k, idx.double())
    with pytest.raises(ValueError, match='index shape'):
        ops.sparse_qk(q, k, idx[:, :3])
    with pytest.raises(ValueError, match='not a sparse attention backend'):
        ops.set_backend('cuda')
    with pytest.raises(ValueError, match='ADASR_MEMORY|ADASR_ATTN_MEMORY_MB'):
        os.environ['ADASR_ATTN_MEMORY_MB'] = 'lots'
        try:
            config.memory_budget_bytes()
        finally:
            del os.environ['ADASR_ATTN_MEMORY_MB']


def test_backend_switch(monkeypatch):
    assert ops.resolve_backend(torch.device('cpu')) == 'torch'  # auto on CPU tensors
    monkeypatch.setenv('ADASR_SPARSE_BACKEND', 'torch')
    assert ops.get_backend() == 'torch'
    monkeypatch.setenv('ADASR_SPARSE_BACKEND', 'bogus')
    with pytest.raises(ValueError, match='ADASR_SPARSE_BACKEND'):
        ops.get_backend()
    monkeypatch.delenv('ADASR_SPARSE_BACKEND')
    with ops.backend('torch'):
        assert ops.get_backend() == 'torch'
    assert ops.get_backend() == 'auto'
    if os.environ.get('TRITON_INTERPRET') != '1':
        with ops.backend('triton'):
            with pytest.raises(RuntimeError, match='CUDA tensors|cannot be imported'):
                ops.sparse_qk(*_case(dtype=torch.float32)[:2], _case()[4])


def test_import_does_not_load_triton_kernels():
    code = 'import adasr, sys; assert "adasr.ops.triton_sparse" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, env=dict(os.environ))


TRITON_SCRIPT = textwrap.dedent('''
    import torch
    from adasr import ops
    from adasr.ops import triton_sparse
    gen = torch.Generator().manual_seed(0)
    g, n, m, d, k = 3, 20, 24, 13, 7
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        q, kk, v = (torch.randn(g, r, d, generator=gen) for r in (n, m, m))
        a = torch.rand(g, n, k, generator=gen)
        idx = torch.rand(g, n, m, generator=gen).topk(k, -1).indices
        low = [t.to(dtype).detach().requires_grad_() for t in (q, kk, v, a)]
        ref = [t.to(dtype).double().detach().requires_grad_() for t in (q, kk, v, a)]
        w1 = torch.randn(g, n, k, generator=gen)
        w2 = torch.randn(g, n, d, generator=gen)
        with ops.backend('triton'):
            o1, o2 = ops.sparse_qk(low[0], low[1], idx), ops.sparse_av(low[3], low[2], idx)
        assert o1.dtype == dtype and o2.dtype == dtype
        ((o1.float() * w1).sum() + (o2.float() * w2).sum()).backward()
        r1, r2 = ops.dense_sparse_qk(ref[0], ref[1], idx), ops.dense_sparse_av(ref[3], ref[2], idx)
        ((r1 * w1.double()).sum() + (r2 * w2.double()).sum()).backward()
        for x, y in [(o1, r1), (o2, r2)] + [(p.grad, r.grad) for p, r in zip(low, ref)]:
            err = (x.double() - y).abs().max().item() / (y.abs().max().item() + 1e-12)
            assert err < tol, (dtype, err)
    print('TRITON-INTERPRETER-OK')
''')


@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'TRITON-INTERPRETER-OK' in res.stdout


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_cuda_matches_torch(dtype):
    pytest.importorskip('triton')
    q, k, v, a, idx = (t.cuda() for t in _case(g=8, n=1024, m=1024, d=40, k=64, dtype=torch.float32))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    low = [t.to(dtype) for t in (q, k, v, a)]
    with ops.backend('triton'):
        o_qk, g_qk = _grads(lambda x, y: ops.sparse_qk(x, y, idx), low[0], low[1])
        o_av, g_av = _grads(lambda x, y: ops.sparse_av(x, y, idx), low[3], low[2])
    with ops.backend('torch'):
        r_qk, h_qk = _grads(lambda x, y: ops.sparse_qk(x, y, idx), *(t.double() for t in low[:2]))
        r_av, h_av = _grads(lambda x, y: ops.sparse_av(x, y, idx), low[3].double(), low[2].double())
    for x, y in zip([o_qk, o_av] + g_qk + g_av, [r_qk, r_av] + h_qk + h_av):
        assert x.dtype == dtype
        assert (x.double() - y).abs().max() <= tol * (y.abs().max() + 1)


# ---- the CPU formulations picked for speed (sampled scores, embedding-bag aggregation, blocked dense, top-k) -----

@pytest.mark.parametrize('method', ['sampled', 'dense'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_qk_cpu_methods_match_definition_with_and_without_autograd(method, dtype):
    q, k, _, _, idx = _case(g=4, n=40, m=24, d=7, k=6, dtype=dtype)
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    with config.options(cache_kb=8 * 24 * 4 / 1024):  # dense: blocks of a few query rows
        ref, ref_grads = _grads(lambda x, y: sa.dense_sparse_qk(x, y, idx), q, k)
        with torch.no_grad():  # the inference path: no autograd node, blocked / out= kernels
            torch.testing.assert_close(sa.torch_sparse_qk(q, k, idx, method), ref, **tol)
        out, grads = _grads(lambda x, y: sa.torch_sparse_qk(x, y, idx, method), q, k)
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_av_embedding_bag_matches_definition_with_and_without_autograd(dtype):
    _, _, v, a, idx = _case(g=4, n=40, m=24, d=7, k=6, dtype=dtype)
    idx[:, :, 1] = idx[:, :, 0]  # duplicate keys add up
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    ref, ref_grads = _grads(lambda x, y: sa.dense_sparse_av(x, y, idx), a, v)
    with torch.no_grad():
        torch.testing.assert_close(sa.torch_sparse_av(a, v, idx, 'ebag'), ref, **tol)
        torch.testing.assert_close(sa.torch_sparse_av(a, v, idx.to(torch.int16), 'ebag'), ref, **tol)
    out, grads = _grads(lambda x, y: sa.torch_sparse_av(x, y, idx, 'ebag'), a, v)
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_embedding_bag_av_cuts_long_bags_into_bags_of_128():
    _, _, v, a, idx = _case(g=2, n=5, m=400, d=13, k=384)
    with torch.no_grad():
        ref = sa.dense_sparse_av(a, v, idx)
        torch.testing.assert_close(sa.embedding_bag_av(a, v, idx.to(torch.int16)), ref, rtol=1e-5, atol=1e-5)
        _, _, v, a, idx = _case(g=2, n=5, m=300, d=13, k=200)  # not a multiple of 128: one bag
        torch.testing.assert_close(sa.embedding_bag_av(a, v, idx), sa.dense_sparse_av(a, v, idx), rtol=1e-5,
                                   atol=1e-5)


def test_gradcheck_float64_cpu_methods():
    q, k, v, a, idx = _case(g=2, n=6, m=8, d=3, k=3)
    args = (q.requires_grad_(), k.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: sa.torch_sparse_qk(x, y, idx, 'sampled'), args)
    args = (a.requires_grad_(), v.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: sa.torch_sparse_av(x, y, idx, 'ebag'), args)


def test_cpu_method_choice_and_wrong_op():
    cpu = torch.device('cpu')
    assert sa.pick_method('qk', 1024, 16, 13, cpu) == 'sampled'
    assert sa.pick_method('qk', 1024, 256, 13, cpu) == 'dense'
    assert sa.pick_method('qk', 1024, 16, 13, cpu, torch.bfloat16) == 'dense'  # no half-precision sampled kernel
    assert sa.pick_method('av', 1024, 256, 13, cpu) == 'ebag'
    q, k, v, a, idx = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match='aggregation'):
        sa.torch_sparse_qk(q, k, idx, 'ebag')
    with pytest.raises(ValueError, match='scores'):
        sa.torch_sparse_av(a, v, idx, 'sampled')


def test_topk_matches_torch_topk_and_is_differentiable():
    x = torch.randn(3, 5, 40)
    pos = sa.topk_positions(x, 9)
    assert pos.shape == (3, 5, 9) and pos.dtype == torch.int64
    torch.testing.assert_close(torch.gather(x, -1, pos).sort(-1, descending=True).values, x.topk(9, -1).values,
                               rtol=0, atol=0)
    xt = x[:, :, ::2]  # a non-contiguous view
    torch.testing.assert_close(torch.gather(xt, -1, sa.topk_positions(xt, 4)).sort(-1).values,
                               xt.topk(4, -1).values.sort(-1).values, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    values, pos = sa.topk(leaf, 9)
    values.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(x).scatter_(-1, pos, 1.))
    with pytest.raises(ValueError, match='k=40'):
        sa.topk_positions(x, 40)


def test_parallel_blocks_runs_every_item_and_raises(monkeypatch):
    threads = torch.get_num_threads()
    seen = []
    scheduling.parallel_for(seen.append, list(range(50)))
    assert sorted(seen) == list(range(50))
    grad_modes = []
    leaf = torch.ones(3, requires_grad=True)
    scheduling.parallel_for(lambda i: grad_modes.append((leaf * 2).requires_grad), [0, 1, 2])
    assert grad_modes == [False] * 3  # blocks never record autograd, whatever the worker thread's default
    with pytest.raises(ZeroDivisionError):
        scheduling.parallel_for(lambda i: 1 / 0, [1, 2])
    assert torch.get_num_threads() == threads
    monkeypatch.setenv('ADASR_ATTN_THREADS', '0')
    seen.clear()
    scheduling.parallel_for(seen.append, [3, 1, 2])
    assert seen == [3, 1, 2]  # sequential, in order, in this thread


def test_parallel_for_from_two_threads_at_once_and_a_pool_per_thread_count(monkeypatch):
    """Two callers at once (a server running two inferences): both run every item; one pool per worker thread count
    (asking for a count again reuses its pool: no new threads each time), none shut down under a caller."""
    import threading

    monkeypatch.setenv('ADASR_ATTN_THREADS', '2')
    first_in, first_done, seen = threading.Event(), threading.Event(), []

    def slow(item):
        first_in.set()
        assert first_done.wait(30)
        seen.append(('slow', item))

    caller = threading.Thread(target=scheduling.parallel_for, args=(slow, [0]))
    caller.start()
    assert first_in.wait(30)
    scheduling.parallel_for(lambda i: seen.append(('quick', i)), [0, 1])  # returns while the other call still runs
    first_done.set()
    caller.join(30)
    assert sorted(seen) == [('quick', 0), ('quick', 1), ('slow', 0)]
    old = scheduling._worker_pool(2)
    monkeypatch.setenv('ADASR_ATTN_THREADS', '3')
    seen.clear()
    scheduling.parallel_for(seen.append, list(range(6)))
    assert sorted(seen) == list(range(6)) and scheduling._worker_pool(3) is not old
    assert scheduling._worker_pool(2) is old and scheduling._worker_pool(3) is scheduling._worker_pool(3)


def test_memory_budget_default_and_override(monkeypatch):
    monkeypatch.delenv('ADASR_ATTN_MEMORY_MB', raising=False)
    assert config.memory_budget_bytes() == 256 * 2**20
    monkeypatch.setenv('ADASR_ATTN_MEMORY_MB', '2')
    assert config.memory_budget_bytes() == 2 * 2**20
    assert config.cache_bytes() <= 2 * 2**20 and config.tile_bytes() <= 2 * 2**20


def test_config_options_from_python_win_over_the_environment(monkeypatch):
    monkeypatch.setenv('ADASR_ATTN_THREADS', '0')
    assert config.get_option('threads') == 0 and config.worker_threads() == 0
    with config.options(threads=1, memory_mb=2):
        assert config.worker_threads() == 1 and config.memory_budget_bytes() == 2 * 2**20
        with config.options(threads=None):  # back to the environment inside the block
            assert config.worker_threads() == 0
        assert config.worker_threads() == 1
    assert config.worker_threads() == 0 and config.memory_budget_bytes() == 256 * 2**20
    monkeypatch.delenv('ADASR_ATTN_THREADS')
    assert config.worker_threads() == torch.get_num_threads()
    config.set_option('sampled_limit', 2)
    try:
        assert sa.pick_method('qk', 1024, 128, 13, torch.device('cpu')) == 'sampled'  # 128 * 13 <= 2 * 1024
    finally:
        config.set_option('sampled_limit', None)
    assert sa.pick_method('qk', 1024, 128, 13, torch.device('cpu')) == 'dense'


def test_config_rejects_bad_values_naming_the_setting(monkeypatch):
    for env, raw in (('ADASR_ATTN_THREADS', '-1'), ('ADASR_ATTN_THREADS', '1.5'), ('ADASR_TORCH_TOPK', 'yes'),
                     ('ADASR_SAMPLED_LIMIT', '0'), ('ADASR_ATTN_BLOCK_KB', 'big')):
        with monkeypatch.context() as m:
            m.setenv(env, raw)
            name = {'ADASR_ATTN_THREADS': 'threads', 'ADASR_TORCH_TOPK': 'torch_topk',
                    'ADASR_SAMPLED_LIMIT': 'sampled_limit', 'ADASR_ATTN_BLOCK_KB': 'tile_kb'}[env]
            with pytest.raises(ValueError, match=env):
                config.get_option(name)
            with pytest.raises(ValueError, match=env):
                config.check_environment()  # what the CLIs call before any work
    with pytest.raises(ValueError, match='memory_mb'):
        config.set_option('memory_mb', -3)
    with pytest.raises(KeyError, match='not an adasr.ops option'):
        config.get_option('speed')
    monkeypatch.setenv('ADASR_TORCH_TOPK', '1')
    assert config.get_option('torch_topk') is True
    config.check_environment()


def test_clis_refuse_a_bad_setting_before_any_work(monkeypatch, tmp_path, capsys):
    """adasr-upscale and adasr-export: a usage error (exit 2) before the output folder or the model exists;
    adasr-train / adasr-test: an error before the option file is read."""
    import cv2
    import numpy as np

    from adasr.cli.entry import run
    from adasr.cli.export import main as export_main
    from adasr.cli.upscale import main as upscale_main

    monkeypatch.setenv('ADASR_PFT_KERNEL', 'bogus')
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SystemExit) as stop:
        upscale_main(['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--arch', 'Bicubic', '-s', '2'])
    assert stop.value.code == 2 and "ADASR_PFT_KERNEL='bogus'" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()
    with pytest.raises(SystemExit) as stop:
        export_main(['--arch', 'Bicubic', '-s', '2', '-o', str(tmp_path / 'b.onnx')])
    assert stop.value.code == 2 and "ADASR_PFT_KERNEL='bogus'" in capsys.readouterr().err
    for kind in ('train', 'test'):
        with pytest.raises(SystemExit, match="error: ADASR_PFT_KERNEL='bogus'"):
            run(kind, ['-opt', str(tmp_path / 'missing.yml')])


def test_sparse_qk_bias_is_read_at_the_index():
    q, k, _, _, idx = _case(g=6)
    bias = torch.randn(3, 20, 24, dtype=torch.float64)  # broadcast over a leading dim of 2
    q4, k4, i4 = q.view(2, 3, 20, 7), k.view(2, 3, 24, 7), idx.view(2, 3, 20, 5)
    want = ops.dense_sparse_qk(q4, k4, i4) + torch.gather(bias.expand(2, 3, 20, 24), -1, i4)
    for method in ('sampled', 'dense', 'gather'):
        with torch.no_grad():
            torch.testing.assert_close(sa.torch_sparse_qk(q4, k4, i4, method, bias=bias), want)
    leaf = bias.clone().requires_grad_()
    ops.sparse_qk(q4, k4, i4, bias=leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros_like(bias).index_put_(
        (torch.arange(3).view(1, 3, 1, 1).expand_as(i4), torch.arange(20).view(1, 1, 20, 1).expand_as(i4), i4),
        torch.ones(i4.shape, dtype=bias.dtype), accumulate=True))
