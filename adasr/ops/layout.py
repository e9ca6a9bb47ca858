"""Token sequences (B, N, C) to NCHW feature maps (B, C, H, W), done fast.

A transformer between convolutions keeps its tokens channels-last, the convolutions want NCHW. PyTorch's copy of a
permuted 4-D view walks the destination with large strides (``t.transpose(1, 2).reshape(b, c, h, w).contiguous()``
of a 1 x 130560 x 64 token map takes ~45 ms on one AVX-512 core, ``to_mkldnn`` of the permuted view as long);
transposing it as 2-D blocks of a few thousand tokens that stay in cache takes ~12 ms. The values are copied, never
computed: the result is the same tensor bit for bit, so the network's numbers do not change. (The other way, NCHW to
tokens, PyTorch's own copy is as fast as the blocks.)

Without autograd only (the blocks are written into a fresh tensor in place); with autograd the plain PyTorch
reshape is used, so gradients flow as before.
"""
import torch

#: tokens per 2-D block: 4096 x 64 floats = 1 MiB, read and written while in L2
BLOCK_TOKENS = 4096


def tokens_to_nchw(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) tokens in raster order -> a (B, C, H, W) map with the same values: contiguous without autograd,
    else the channels-last view ``t.transpose(1, 2).reshape(b, c, h, w)``."""
    b, n, c = t.shape
    if n != h * w:
        raise ValueError(f'tokens_to_nchw: {n} tokens do not make a {h}x{w} map')
    if (torch.is_grad_enabled() and t.requires_grad) or torch.compiler.is_compiling():
        return t.transpose(1, 2).reshape(b, c, h, w)
    out = t.new_empty(b, c, n)
    for i in range(b):
        for s in range(0, n, BLOCK_TOKENS):
            out[i, :, s:s + BLOCK_TOKENS].copy_(t[i, s:s + BLOCK_TOKENS].t())
    return out.view(b, c, h, w)
