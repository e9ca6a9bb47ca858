"""The BLAS behind PyTorch's CPU matrix products, callable from compiled (numba) kernels.

PyTorch's x86 builds link Intel MKL into ``libtorch_cpu`` and export its Fortran ``sgemm_``, which ``torch.bmm``
of float32 CPU tensors reaches (the Winograd products gave the same numbers bit for bit through both). A numba
kernel that calls the routine on the same operands gets those numbers without returning to Python between the
products of a loop (the Winograd convolution's per-block products: :mod:`adasr.ops.winograd`).

:func:`sgemm_symbol` registers the routine with LLVM under :data:`SGEMM_SYMBOL` and returns that name (None where
this PyTorch exports no ``sgemm_``: another BLAS, another platform). Generated kernels declare it with
:func:`sgemm_declaration` and call it with pointer arguments (:func:`sgemm_params` holds the scalar ones); numba's
on-disk cache keeps the call by name, resolved again in each process once the symbol is registered. Callers check
the numbers against ``torch.bmm`` before relying on them (a PyTorch whose ``bmm`` takes another route gives other
rounding).
"""
import ctypes
import os
import threading
from typing import Optional

import numpy as np

#: the name under which LLVM resolves MKL's ``sgemm_`` in compiled kernels
SGEMM_SYMBOL = 'adasr_mkl_sgemm'

_lock = threading.Lock()
_state = {}


def sgemm_symbol() -> Optional[str]:
    """:data:`SGEMM_SYMBOL` once MKL's ``sgemm_`` (exported by ``libtorch_cpu``) is registered with LLVM, else None."""
    with _lock:
        if 'symbol' not in _state:
            _state['symbol'] = _register()
        return _state['symbol']


def _register() -> Optional[str]:
    try:
        import torch
        from llvmlite import binding
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))
        address = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except Exception:  # noqa: BLE001 - no such library or symbol (another BLAS or platform), no llvmlite
        return None
    if not address:
        return None
    binding.add_symbol(SGEMM_SYMBOL, address)
    return SGEMM_SYMBOL


def sgemm_declaration() -> str:
    """Python source declaring :data:`SGEMM_SYMBOL` for numba as ``SGEMM`` (13 pointer-sized arguments: Fortran's
    ``sgemm_(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``, all by address)."""
    return (f"SGEMM = numba.types.ExternalFunction('{SGEMM_SYMBOL}', "
            'numba.types.void(*([numba.types.intp] * 13)))')


def sgemm_params(m: int, n: int, k: int, lda: int, ldb: int, ldc: int) -> np.ndarray:
    """The scalar arguments of a column-major ``C (m x n) = A (m x k) @ B (k x n)`` (no transposes, alpha 1, beta
    0) as one int32 array whose element addresses are passed: [0] 'N', [1] m, [2] n, [3] k, [4] lda, [5] ldb,
    [6] ldc, [7] alpha (float32 1), [8] beta (float32 0). A kernel may rewrite [2] (n) between calls."""
    p = np.zeros(9, np.int32)
    p[:7] = ord('N'), m, n, k, lda, ldb, ldc
    p[7:].view(np.float32)[:] = 1.0, 0.0
    return p


__all__ = ['SGEMM_SYMBOL', 'sgemm_symbol', 'sgemm_declaration', 'sgemm_params']
