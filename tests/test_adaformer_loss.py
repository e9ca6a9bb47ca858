"""UncertaintyLoss (AdaFormer's L_USL): hand-computed values, gradient routing, numerical safety, BasicSR contract."""
import math

import pytest
import torch
from basicsr.losses import build_loss

from adasr.archs.adaformer_arch import AdaFormer
from adasr.losses.uncertainty_loss import UncertaintyLoss


def _logit(c: float) -> float:
    return math.log(c / (1 - c))


def test_hand_computed_value_constant_maps():
    # two layers with constant confidence 0.25 and 0.8; |hr - sr| is 0.01 on channel 0 and 0.04 on channel 1,
    # 0 on channel 2: channel mean 0.05/3 on the 0..1 scale, times 255
    hr = torch.zeros(1, 3, 4, 8)
    sr = hr.clone()
    sr[:, 0] += 0.01
    sr[:, 1] -= 0.04
    logits = [torch.full((1, 1, 1, 2), _logit(0.25)), torch.full((1, 1, 1, 2), _logit(0.8))]
    err = 0.05 / 3 * 255
    expected = (0.25 * err - math.log(0.25 + 1e-8)) + (0.8 * err - math.log(0.8 + 1e-8))
    assert UncertaintyLoss()(logits, sr, hr).item() == pytest.approx(expected, rel=1e-6)
    assert UncertaintyLoss(loss_weight=0.5)(logits, sr, hr).item() == pytest.approx(expected / 2, rel=1e-6)
    assert UncertaintyLoss(layer_reduction='mean')(logits, sr, hr).item() == pytest.approx(expected / 2, rel=1e-6)
    assert UncertaintyLoss(pixel_scale=1)(logits, sr, hr).item() == pytest.approx(
        1.05 * 0.05 / 3 - math.log(0.25 + 1e-8) - math.log(0.8 + 1e-8), rel=1e-6)


def test_hand_computed_value_bilinear_upsampling():
    # one row of two LR confidences (0.2, 0.8) upsampled x2 to 4 columns: align_corners=True gives
    # 0.2, 0.4, 0.6, 0.8; the error is 1/255 in column j only (so the first term picks C_up at column j)
    logits = torch.tensor([[[[_logit(0.2), _logit(0.8)]]]])
    c_up = [0.2, 0.4, 0.6, 0.8]
    for j in range(4):
        hr = torch.zeros(1, 3, 2, 4)
        sr = hr.clone()
        sr[:, :, :, j] = 1 / 255  # all channels, both rows
        expected = (c_up[j] * 2 / 8) + sum(-math.log(c + 1e-8) for c in c_up) / 4
        assert UncertaintyLoss()(logits, sr, hr).item() == pytest.approx(expected, rel=1e-5), j
    # align_corners=False: 0.2, 0.35, 0.65, 0.8
    hr, sr = torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4)
    expected = sum(-math.log(c + 1e-8) for c in (0.2, 0.35, 0.65, 0.8)) / 4
    assert UncertaintyLoss(align_corners=False)(logits, sr, hr).item() == pytest.approx(expected, rel=1e-5)


def test_reductions():
    torch.manual_seed(0)
    logits = [torch.randn(2, 1, 3, 5) for _ in range(3)]
    sr, hr = torch.rand(2, 3, 12, 20), torch.rand(2, 3, 12, 20)
    per_pixel = UncertaintyLoss(reduction='none')(logits, sr, hr)
    assert per_pixel.shape == (2, 1, 12, 20)
    assert torch.allclose(UncertaintyLoss(reduction='mean')(logits, sr, hr), per_pixel.mean())
    assert torch.allclose(UncertaintyLoss(reduction='sum')(logits, sr, hr), per_pixel.sum())
    single = UncertaintyLoss()(logits[0], sr, hr)  # one tensor = one layer
    assert torch.allclose(single, UncertaintyLoss()([logits[0]], sr, hr))


@pytest.mark.parametrize('kwargs, words', [({'reduction': 'avg'}, 'reduction'), ({'layer_reduction': 'max'},
                                           'layer_reduction'), ({'pixel_scale': -1}, 'pixel_scale'),
                                           ({'detach_sr': 'yes'}, 'detach_sr'), ({'loss_weight': None}, 'loss_weight')])
def test_invalid_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        UncertaintyLoss(**kwargs)


def test_shape_errors_name_the_problem():
    loss = UncertaintyLoss()
    sr = hr = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match='does not divide'):
        loss([torch.zeros(1, 1, 3, 3)], sr, hr)
    with pytest.raises(ValueError, match=r'logits\[1\]'):
        loss([torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2)], sr, hr)
    with pytest.raises(ValueError, match='same shape'):
        loss([torch.zeros(1, 1, 2, 2)], sr, torch.zeros(1, 3, 8, 4))


def test_built_from_options():
    loss = build_loss({'type': 'UncertaintyLoss', 'loss_weight': 1.0, 'pixel_scale': 255., 'detach_sr': False})
    assert isinstance(loss, UncertaintyLoss) and not loss.detach_sr


@pytest.mark.parametrize('value', [float('inf'), float('-inf'), 100.0, -100.0])
def test_finite_at_confidence_zero_and_one(value):
    logits = torch.full((1, 1, 2, 2), value, requires_grad=True)
    sr = torch.rand(1, 3, 8, 8, requires_grad=True)
    hr = torch.rand(1, 3, 8, 8)
    loss = UncertaintyLoss(detach_sr=False)(logits, sr, hr)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and torch.isfinite(sr.grad).all()
    if value < 0:  # C = 0: the log term is -log(1e-8)
        assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-4)


def test_gradient_reaches_only_the_estimator():
    torch.manual_seed(0)
    net = AdaFormer(n_resblocks=2, depths=2).train()
    x, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    sr, logits = net(x)
    UncertaintyLoss()(logits, sr, hr).backward()
    for name, p in net.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == name.startswith('body.var.'), name

    net.zero_grad(set_to_none=True)
    sr, logits = net(x)
    UncertaintyLoss(detach_sr=False)(logits, sr, hr).backward()  # paper Eq. 25: also through sr
    assert net.tail[0].weight.grad is not None and net.body.var[0].weight.grad is not None


def test_minimum_is_at_inverse_error():
    """Per pixel, c * e - log(c) is minimal at c = 1 / e: confidence tracks the inverse error (0..255 scale)."""
    hr = torch.zeros(1, 3, 4, 4)
    sr = torch.full((1, 3, 4, 4), 4 / 255)  # error 4 grey levels
    values = {c: UncertaintyLoss()([torch.full((1, 1, 1, 1), _logit(c))], sr, hr).item() for c in (0.15, 0.25, 0.4)}
    assert values[0.25] < values[0.15] and values[0.25] < values[0.4]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_give_the_formula_in_float32(dtype):
    # C = sigmoid(-20) = 2.1e-9: in fp16 it underflows (smallest subnormal 6e-8) and the 1e-8 rounds to 0, so the
    # formula evaluated in fp16 is -log(0) = inf; the loss computes it in float32 whatever the input type
    values = [-20.0, -3.0, 0.0, 8.0]  # exact in fp16 and bf16
    logits = torch.tensor(values, dtype=dtype).view(1, 1, 2, 2).requires_grad_()
    hr = torch.zeros(1, 3, 2, 2, dtype=dtype)
    sr = torch.full((1, 3, 2, 2), 2 / 255, dtype=dtype)
    err = float(sr[0, 0, 0, 0]) * 255  # the stored half value, on the 0..255 scale
    cs = [1 / (1 + math.exp(-v)) for v in values]
    expected = sum(c * err - math.log(c + 1e-8) for c in cs) / 4
    loss = UncertaintyLoss()(logits, sr, hr)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    if dtype == torch.float16:
        assert torch.isinf(-torch.log(torch.sigmoid(logits.detach()) + 1e-8)).any()  # what the formula gives in fp16


@pytest.mark.parametrize('value', [-30.0, -100.0])
def test_saturated_logits_keep_the_softplus_slope(value):
    # one logit upsampled to 4x4; error one grey level (err = 1). Per pixel the value is c*err - log(c + 1e-8); the
    # gradient is that of c*err - log(c) = c*err + softplus(-logit): c(1-c)*err - (1-c), about -1, where the formula
    # with its 1e-8 is flat (slope -(1-c) * c/(c + 1e-8): 9e-6 at -30, 0 at -100) and the estimator could not recover
    logit = torch.full((1, 1, 1, 1), value, requires_grad=True)
    hr, sr = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 1 / 255)
    c = 1 / (1 + math.exp(-value))
    loss = UncertaintyLoss()(logit, sr, hr)
    assert loss.item() == pytest.approx(c - math.log(c + 1e-8), rel=1e-6)
    loss.backward()
    assert logit.grad.item() == pytest.approx(c * (1 - c) - (1 - c), rel=1e-6)


def test_gradient_equals_the_formula_where_confidence_is_not_saturated():
    """Away from saturation the gradient is the formula's own (they differ by the factor 1 + 1e-8 / C_up)."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    logits = [torch.randn(2, 1, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    sr, hr = torch.rand(2, 3, 12, 20, dtype=torch.float64), torch.rand(2, 3, 12, 20, dtype=torch.float64)
    err = (hr - sr).abs().mean(1, keepdim=True) * 255
    ref = sum(c * err - torch.log(c + 1e-8) for c in
              (F.interpolate(torch.sigmoid(x), size=(12, 20), mode='bilinear', align_corners=True) for x in logits))
    ref_grads = torch.autograd.grad(ref.mean(), logits)
    ours = [x.detach().float().requires_grad_() for x in logits]
    loss = UncertaintyLoss()(ours, sr.float(), hr.float())
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-6)
    for g_ref, g in zip(ref_grads, torch.autograd.grad(loss, ours)):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-9)


def test_nan_logits_stay_nan():
    """A NaN confidence logit is not hidden: the loss is NaN, for the training loop's non-finite check to see."""
    logits = torch.tensor([[[[0.0, float('nan')]]]])
    assert torch.isnan(UncertaintyLoss()(logits, torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)))
