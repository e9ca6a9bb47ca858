"""Comparing the fast CPU engines with the plain computation: bit for bit where PyTorch's BLAS gives a product the
same numbers whatever the rows and batch around it (``adasr.ops.cpu_inference.blas_batch_invariant``), else within
float32 rounding (Intel's MKL in its AVX2 code)."""
import torch

from adasr.ops import cpu_inference


def assert_same_numbers(a: torch.Tensor, b: torch.Tensor, what: str = '') -> None:
    """``a`` and ``b`` bit for bit on a batch-invariant BLAS (at the current thread count), else within float32
    rounding of a few products (relative 1e-5 of the larger magnitude); boolean and integer tensors always equal."""
    if cpu_inference.blas_batch_invariant() or not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    assert a.shape == b.shape and a.dtype == b.dtype, what
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)) and torch.equal(a[~finite], b[~finite]), what
    scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-5 * max(scale, 1e-30), msg=what or None)
