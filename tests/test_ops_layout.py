"""ops.layout: the blocked token -> NCHW transpose copies values only (bit for bit PyTorch's reshape)."""
import pytest
import torch

from adasr.ops import layout
from adasr.ops.layout import tokens_to_nchw


@pytest.mark.parametrize('b, h, w', [(1, 5, 7), (2, 16, 24), (3, 1, 1)])
def test_tokens_to_nchw_equals_the_plain_reshape(monkeypatch, b, h, w):
    monkeypatch.setattr(layout, 'BLOCK_TOKENS', 16)  # several blocks, the last one partial
    t = torch.randn(b, h * w, 6)
    with torch.no_grad():
        got = tokens_to_nchw(t, h, w)
    assert got.is_contiguous() and got.shape == (b, 6, h, w)
    assert torch.equal(got, t.transpose(1, 2).reshape(b, 6, h, w))
    assert torch.equal(got[1 % b, :, h - 1, w - 1], t[1 % b, -1])  # hand-picked entry: the last token of a sample


def test_tokens_to_nchw_keeps_gradients_and_checks_the_size():
    t = torch.randn(2, 12, 3, requires_grad=True)
    y = tokens_to_nchw(t, 3, 4)
    (y * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert torch.equal(t.grad, torch.arange(3.0).expand(2, 12, 3))
    with pytest.raises(ValueError, match='12 tokens do not make a 5x2 map'):
        tokens_to_nchw(t.detach(), 5, 2)
