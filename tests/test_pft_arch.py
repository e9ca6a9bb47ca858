"""PFT: equivalence with the authors' code, refactor guards, an independent dense formulation, and structure."""
import json
import os.path as osp

import numpy as np
import pytest
import torch

from adasr import ops
from adasr.archs import pft_arch, pft_engine
from adasr.archs.layers import symmetric_pad
from adasr.archs.pft_arch import PFT
from adasr.utils.checkpoint import CheckpointError, check_state_dict
from benchmarks import pft_oracle as verify
from tests.helpers import pft_fixtures as fixtures

DATA = osp.join(osp.dirname(__file__), 'data')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))



LIGHT = dict(upscale=4, in_chans=3, img_size=64, embed_dim=52, depths=[2, 4, 6, 6, 6], num_heads=4,
             num_topk=[1024] * 2 + [256] * 4 + [128] * 6 + [64] * 6 + [32] * 6, window_size=32,
             convffn_kernel_size=7, img_range=1., mlp_ratio=1, upsampler='pixelshuffledirect', resi_connection='1conv',
             use_checkpoint=False)
CLASSICAL = dict(upscale=2, in_chans=3, img_size=64, embed_dim=240, depths=[4, 4, 4, 6, 6, 6], num_heads=6,
                 num_topk=[1024] * 4 + [256] * 4 + [128] * 4 + [64] * 6 + [32] * 6 + [16] * 6, window_size=32,
                 convffn_kernel_size=7, img_range=1., mlp_ratio=2., upsampler='pixelshuffle',
                 resi_connection='1conv', use_checkpoint=False)
RELEASED = {
    '001_PFT_SRx2_scratch': (dict(CLASSICAL, upscale=2), 19_623_527),
    '002_PFT_SRx3_finetune': (dict(CLASSICAL, upscale=3), 19_808_167),
    '003_PFT_SRx4_finetune': (dict(CLASSICAL, upscale=4), 19_771_239),
    '101_PFT_light_SRx2_scratch': (dict(LIGHT, upscale=2), 775_532),
    '102_PFT_light_SRx3_finetune': (dict(LIGHT, upscale=3), 782_567),
    '103_PFT_light_SRx4_finetune': (dict(LIGHT, upscale=4), 792_416),
}


# ---- the authors' numbers ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_oracle_light_x4(reference_dir):
    res = verify.run_fixture(verify.load_fixture(osp.join(reference_dir, 'pft_light_x4_oracle.pt')))
    assert res['max_abs_err'] <= 1e-3 and res['mean_abs_err'] <= 1e-5, res


@pytest.mark.slow
def test_oracle_classical_x2(reference_dir):
    path = osp.join(reference_dir, 'pft_x2_oracle.pt')
    if not osp.isfile(path):
        pytest.skip('the classical x2 oracle is held back')
    res = verify.run_fixture(verify.load_fixture(path))
    assert res['max_abs_err'] <= 1e-3 and res['mean_abs_err'] <= 1e-5, res


@pytest.mark.parametrize('name', sorted(fixtures.GUARDS))
def test_refactor_guard(name):
    fx = torch.load(osp.join(DATA, f'pft_guard_{name}.pt'), weights_only=True)
    assert fx['config'] == fixtures.GUARDS[name]
    net = fixtures.build(fx['config'], fx['seed'])
    with torch.no_grad():
        out = net(fx['input'])
    err = (out - fx['output']).abs()
    assert err.max() < 1e-4 and err.mean() < 1e-6, (err.max(), err.mean())


# ---- an independent formulation: every map dense, sparsity as a boolean set --------------------------------------

class _RefState:
    kind = 'ref'

    def __init__(self, maps, keep):
        self.maps, self.keep = maps, keep


def _reference_attention(self, q, k, v, rpi, prev, topk, labels):
    """PFA written densely from the spec: sparse maps are n x n with zeros outside the kept key set."""
    nb, h, n, _ = q.shape
    s = q @ k.transpose(-2, -1) + self.bias(rpi)
    if prev is None or prev.keep is None:
        if labels is not None:
            lab = labels[torch.arange(nb) % labels.shape[0]]
            s = s + ((lab[:, :, None] != lab[:, None, :]).float() * -100.0).unsqueeze(1)
        a = torch.softmax(s, -1)
    else:
        a = torch.softmax(s.masked_fill(~prev.keep, float('-inf')), -1)
    keep = None if prev is None else prev.keep
    if prev is not None:
        prod = a * prev.maps
        if keep is not None:
            prod = prod + pft_engine.EPS * keep
        else:
            prod = prod + pft_engine.EPS
        a = prod / (prod.sum(-1, keepdim=True) + pft_engine.EPS)
    if topk < n:
        pos = a.masked_fill(~keep, -1.) .topk(topk, -1).indices if keep is not None else a.topk(topk, -1).indices
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, pos, True)
        a = a * keep
    return a @ v, _RefState(a, keep)


def _inference_and_reference(net, x, monkeypatch):
    """The network's output without autograd, and with every PFA written densely from the spec."""
    with torch.no_grad():
        out = net(x)
        monkeypatch.setattr(pft_arch.PFAttention, 'forward', _reference_attention)
        return out, net(x)


@pytest.mark.parametrize('name', sorted(fixtures.GUARDS))
def test_matches_dense_masked_formulation(name, monkeypatch):
    net = fixtures.build(fixtures.GUARDS[name], 0)
    x = torch.rand(2, 3, 19, 29)
    out, ref = _inference_and_reference(net, x, monkeypatch)
    assert (out - ref).abs().max() < 1e-5


def test_chunking_and_recomputed_maps_change_nothing(monkeypatch):
    net = fixtures.build(fixtures.GUARDS['classical_x2'], 0)
    x = torch.rand(1, 3, 19, 29)
    with torch.no_grad():
        out = net(x)
        monkeypatch.setenv('ADASR_ATTN_MEMORY_MB', '0.01')  # one window per chunk, dense maps recomputed
        small = net(x)
    torch.testing.assert_close(small, out, rtol=0, atol=1e-6)


def _input_and_param_grads(net, x):
    leaf = x.clone().requires_grad_()
    net.zero_grad(set_to_none=True)
    out = net(leaf)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), leaf.grad] + [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize('name', ['light_x4', 'classical_x2'])
def test_autograd_path_matches_dense_masked_formulation(name, monkeypatch):
    """With autograd (chunks of whole windows, no in-place / out= kernels): outputs and every gradient equal the dense
    masked formulation's. ws 8, k 16 and 8: the scores take the dense (k*d > n) and the sampled (k*d <= n) forms."""
    net = fixtures.build(fixtures.GUARDS[name], 0)
    x = torch.rand(1, 3, 19, 29)
    with torch.no_grad():
        fast = net(x)
    got = _input_and_param_grads(net, x)
    monkeypatch.setattr(pft_arch.PFAttention, 'forward', _reference_attention)
    ref = _input_and_param_grads(net, x)
    torch.testing.assert_close(got[0], fast, rtol=0, atol=1e-5)
    for a, b in zip(got, ref):  # float32 sums in another order: within 1e-4 of each gradient's scale
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8


def test_blocks_threads_and_small_budgets_change_nothing(monkeypatch):
    """Inference: row blocks (tiny ADASR_ATTN_BLOCK_KB), sequential blocks (ADASR_ATTN_THREADS=0) and dense maps
    recomputed under a small ADASR_ATTN_MEMORY_MB give the default result."""
    net = fixtures.build(fixtures.GUARDS['classical_x2'], 0)
    x = torch.rand(2, 3, 19, 29)
    with torch.no_grad():
        out = net(x)
        results = {}
        for env in ({'ADASR_ATTN_THREADS': '0'}, {'ADASR_ATTN_BLOCK_KB': '8'},
                    {'ADASR_ATTN_MEMORY_MB': '0.05', 'ADASR_ATTN_BLOCK_KB': '8'}):
            with monkeypatch.context() as m:
                for key, value in env.items():
                    m.setenv(key, value)
                results[str(env)] = net(x)
    for env, res in results.items():
        torch.testing.assert_close(res, out, rtol=0, atol=1e-6, msg=env)


def test_dense_chain_and_first_topk_match_dense_masked_formulation(monkeypatch):
    """Four dense layers (a chain focused dense-by-dense, as in the classical PFT's layers 0-3), then the first top-k
    and sparse layers: the inference engine equals the spec's dense formulation."""
    config = dict(fixtures.GUARDS['classical_x2'], depths=[4, 4], num_topk=[64] * 4 + [16] * 2 + [8] * 2)
    out, ref = _inference_and_reference(fixtures.build(config, 1), torch.rand(1, 3, 19, 29), monkeypatch)
    assert (out - ref).abs().max() < 1e-5


def test_kept_softmax_is_softmax_at_the_kept_keys():
    s = torch.randn(3, 2, 5, 40)
    pos = s.topk(7, -1).indices
    want = torch.gather(torch.softmax(s, -1), -1, pos)
    torch.testing.assert_close(pft_engine.kept_softmax(s.clone(), pos), want, rtol=1e-6, atol=0)


def test_engine_refuses_a_state_made_with_autograd():
    q = torch.randn(1, 1, 4, 2)
    with torch.no_grad(), pytest.raises(TypeError, match='autograd'):
        pft_engine.attend(q, q, q, torch.zeros(1, 4, 4), None, pft_engine.DenseMap(torch.rand(1, 1, 4, 4)), 2, False)


def test_shift_mask_is_added_to_mixed_windows_only():
    mask = pft_engine.ShiftMask(pft_engine.shift_labels(24, 32, 8, 'cpu'))
    mixed = [w for w in range(mask.n_win) if mask.labels[w].unique().numel() > 1]
    assert [w for w, kind in enumerate(mask.kind) if kind] == mixed
    s = torch.zeros(mask.n_win, 1, 64, 64)
    mask.add_to(s, slice(0, mask.n_win), slice(0, 64))
    lab = mask.labels
    expect = (lab[:, :, None] != lab[:, None, :]).float() * pft_engine.MASK_VALUE
    torch.testing.assert_close(s[:, 0], expect, rtol=0, atol=0)


# ---- structure ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_configs_param_count_and_keys(name):
    config, count = RELEASED[name]
    with torch.device('meta'):
        net = PFT(**config)
    assert sum(p.numel() for p in net.parameters()) == count
    keys = json.load(open(osp.join(DATA, 'pft_state_dict_keys.json')))[name]
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert sorted(ours) == sorted(keys)
    assert 'mean' not in net.state_dict() and net.state_dict()['relative_position_index_SA'].dtype == torch.int64


def test_relative_position_index_buffer_is_swin_index():
    net = PFT(**fixtures.GUARDS['light_x4'])
    rpi = net.relative_position_index_SA
    ws = 8
    i, j = 3 * ws + 5, 1 * ws + 7  # (3, 5) and (1, 7): dy = 2, dx = -2
    assert rpi[i, j] == (2 + ws - 1) * (2 * ws - 1) + (-2 + ws - 1)


def test_strict_load_errors_name_keys():
    net = PFT(**fixtures.GUARDS['light_x4'])
    other = PFT(**dict(fixtures.GUARDS['light_x4'], upscale=2)).state_dict()
    del other['norm.weight']
    with pytest.raises(CheckpointError) as err:
        check_state_dict(net, other, strict=True)
    msg = str(err.value)
    assert 'norm.weight' in msg and 'upsample.0.weight' in msg and '(12, 16, 3, 3)' in msg
    kept = check_state_dict(net, other, strict=False)
    assert 'upsample.0.weight' not in kept and 'conv_first.weight' in kept


def test_every_parameter_gets_a_gradient():
    config = dict(fixtures.GUARDS['classical_x3'], embed_dim=104, resi_connection='3conv')
    net = PFT(**config).train()
    out = net(torch.rand(2, 3, 16, 16))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_use_checkpoint_gives_the_same_gradients():
    config = fixtures.GUARDS['light_x4']
    x = torch.rand(1, 3, 16, 16)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        net = PFT(**dict(config, use_checkpoint=flag)).train()
        net(x).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('size', [(10, 10), (33, 47), (8, 16)])
def test_small_and_odd_inputs(size):
    net = fixtures.build(fixtures.GUARDS['light_x4'], 0)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = net(x)
        ph, pw = (-size[0]) % 8, (-size[1]) % 8
        full = net(symmetric_pad(x, ph, pw))
    assert out.shape == (1, 3, 4 * size[0], 4 * size[1])
    torch.testing.assert_close(out, full[..., :4 * size[0], :4 * size[1]])


def test_window_32_input_smaller_than_half_a_window():
    """Pads of 22 rows and 20 columns on a 10 x 12 input (the authors' flip-concat cannot pad that far): the network's
    output on the input mirror-padded as NumPy continues the mirror (edge repeated), cropped."""
    net = PFT(**dict(LIGHT, depths=[2], num_topk=[1024, 1024])).eval()
    x = torch.rand(1, 3, 10, 12)
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (0, 22), (0, 20)), mode='symmetric'))
    with torch.no_grad():
        out, full = net(x), net(padded)
    assert out.shape == (1, 3, 40, 48)
    torch.testing.assert_close(out, full[..., :40, :48], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu():
    net = fixtures.build(fixtures.GUARDS['classical_x2'], 0)
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 2e-2 * ref.abs().mean()
    net.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        net(x).float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_train_and_eval_focusing_agree():
    net = fixtures.build(fixtures.GUARDS['light_x4'], 0)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ev = net(x)
        tr = net.train()(x)
    torch.testing.assert_close(ev, tr, rtol=0, atol=1e-6)


@pytest.mark.parametrize('bad, match', [
    (dict(upsampler=''), 'broken'),
    (dict(upsampler='nearest+conv'), 'not supported'),
    (dict(upsampler='pixelshuffle', upscale=5), 'power of 2 or 3'),
    (dict(num_topk=[64, 64, 16]), 'sum\\(depths\\)=6'),
    (dict(num_topk=[64, 64, 16, 16, 32, 8]), 'must not increase'),
    (dict(num_heads=[2, 4]), 'one integer'),
    (dict(embed_dim=17), 'divisible'),
    (dict(window_size=7), 'even'),
    (dict(ape=True), 'ape'),
    (dict(convffn_kernel_size=4), 'odd'),
])
def test_bad_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        PFT(**dict(fixtures.GUARDS['light_x4'], **bad))


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match='windowsize'):
        PFT(**dict(fixtures.GUARDS['light_x4'], windowsize=8))


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_triton_matches_torch_backend(dtype):
    net = fixtures.build(fixtures.GUARDS['classical_x2'], 0).cuda()
    x = torch.rand(2, 3, 40, 40, device='cuda')
    with torch.no_grad():
        with ops.backend('torch'):
            ref = net(x)
        with ops.backend('triton'), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = net(x)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (out.float() - ref).abs().mean() < tol
    net.train()
    with ops.backend('triton'), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        net(x).float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_finetune_from_x2_checkpoint_drops_only_the_head(tmp_path):
    from adasr.utils.checkpoint import load_weights
    x2 = PFT(**dict(fixtures.GUARDS['light_x4'], upscale=2))
    path = tmp_path / 'x2.pth'
    torch.save({'params_ema': x2.state_dict()}, path)
    x3 = PFT(**dict(fixtures.GUARDS['light_x4'], upscale=3))
    with pytest.raises(CheckpointError, match='upsample.0.weight'):
        load_weights(x3, str(path), 'params_ema', strict=True)
    load_weights(x3, str(path), 'params_ema', strict=False)
    torch.testing.assert_close(x3.conv_first.weight, x2.conv_first.weight)
    assert x3.upsample[0].weight.shape[0] == 27


def test_inference_mode_matches_no_grad():
    """Blocks run on worker threads write into tensors made by the caller: inference tensors under inference_mode."""
    net = fixtures.build(fixtures.GUARDS['classical_x2'], 0)
    x = torch.rand(1, 3, 19, 29)
    with torch.no_grad():
        ref = net(x)
    with torch.inference_mode():
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
