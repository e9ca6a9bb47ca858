"""Reduced-precision inference, one rule for every entry point: ``adasr-upscale --precision``, ``val.precision`` in
YAML testing (:class:`~adasr.models.adasr_model.AdaSRModel`) and the benchmark's precision column.

* ``fp32``: the network as it is (bit-identical to running it without this module).
* ``bf16`` / ``fp16``: the forward runs under :func:`torch.autocast`. Weights and input stay float32; autocast
  runs convolutions and matrix products in the half type (float32 accumulation inside the kernels) and keeps
  float32 where its op lists say so (on CUDA: softmax, LayerNorm, ``exp``, sums); other ops follow their inputs
  (PyTorch's CPU LayerNorm and softmax accumulate bf16 in float32). Every arch (AdaFormer's halting, PFT's sparse
  products, SwinIR/HAT/ATD) runs without arch-specific casts; the output is returned as float32. Casting the
  weights instead (``net.half()``) would put every op, the residual stream and the mean shifts in the half type.
* Where it runs: fp16 and bf16 on CUDA (bf16 where the GPU supports it: compute capability 8.0+); bf16 on CPUs with
  native BF16 arithmetic (``avx512_bf16`` or AMX); fp16 never on the CPU. Anything else is refused before work
  starts with a :class:`PrecisionError` that says why.
"""
import contextlib
import os.path as osp
from dataclasses import dataclass
from typing import Callable, ContextManager, FrozenSet, Optional, Tuple

import torch

#: The precisions every entry point accepts.
PRECISIONS = ('fp32', 'bf16', 'fp16')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
#: ``/proc/cpuinfo`` flags of x86 CPUs with native bfloat16 arithmetic (AVX512-BF16 dot products, AMX tiles).
CPU_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


class PrecisionError(ValueError):
    """A precision that is unknown or that this device cannot run."""


def cpu_flags(path: str = '/proc/cpuinfo') -> FrozenSet[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``)."""
    if not osp.isfile(path):
        return frozenset()
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            if line.startswith('flags') and ':' in line:
                return frozenset(line.split(':', 1)[1].split())
    return frozenset()


def cpu_isa() -> str:
    """The vector ISA PyTorch's CPU kernels were dispatched to, and the BF16 flags, e.g. ``AVX512 (avx512_bf16)``."""
    native = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    return f'{torch.backends.cpu.get_cpu_capability()} ({", ".join(native) if native else "no native BF16"})'


def cpu_bf16_support(flags: Optional[FrozenSet[str]] = None) -> Tuple[bool, str]:
    """(supported, reason): whether this CPU computes bfloat16 natively.

    Without AVX512-BF16 or AMX, PyTorch emulates bf16 by converting to float32 around every op: slower than fp32
    and less accurate, so it is refused rather than run.
    """
    flags = cpu_flags() if flags is None else flags
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f'CPU has {" and ".join(found)}'
    return False, (f'this CPU has no native bfloat16 arithmetic (no {" / ".join(CPU_BF16_FLAGS)} flag in '
                   f'/proc/cpuinfo; PyTorch dispatches to {torch.backends.cpu.get_cpu_capability()}): bf16 would be '
                   'emulated, slower than fp32 and less accurate; use fp32 on this CPU, or bf16/fp16 on a GPU')


def parse_precision(value) -> str:
    """Check a precision name (``fp32``, ``bf16`` or ``fp16``) and return it."""
    if value not in PRECISIONS:
        raise PrecisionError(f'precision must be one of {", ".join(PRECISIONS)}, got {value!r}')
    return value


@dataclass(frozen=True)
class Precision:
    """A checked precision on a device: run a forward with :meth:`context` or wrap it with :meth:`wrap`."""

    name: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def reduced(self) -> bool:
        return self.name != 'fp32'

    def context(self) -> ContextManager:
        """Autocast to the half type for ``bf16``/``fp16``; nothing for ``fp32``."""
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def wrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` itself for fp32; else ``fn`` run under autocast with its output returned as float32."""
        if not self.reduced:
            return fn

        def run(x: torch.Tensor) -> torch.Tensor:
            with self.context():
                y = fn(x)
            return y.float()

        return run


def auto_precision(device, preferred_half: Optional[torch.dtype] = None) -> str:
    """What ``auto`` means: on CUDA the arch's preferred half type (:attr:`ArchTraits.preferred_half`; fp16 when
    it declares none, or when it prefers bf16 and the GPU has none); fp32 elsewhere."""
    device = torch.device(device)
    if device.type != 'cuda':
        return 'fp32'
    if preferred_half == torch.bfloat16 and torch.cuda.is_bf16_supported():
        return 'bf16'
    return 'fp16'


def resolve_precision(value, device, preferred_half: Optional[torch.dtype] = None) -> Precision:
    """Check that ``device`` can run ``value`` and return the :class:`Precision`; a :class:`PrecisionError` that
    says why otherwise (fp16 on the CPU, bf16 on a CPU without native BF16 or an older GPU, an unknown device).

    ``value`` may also be ``'auto'`` (:func:`auto_precision`, with the arch's ``preferred_half``).
    """
    device = torch.device(device)
    name = auto_precision(device, preferred_half) if value == 'auto' else parse_precision(value)
    if name == 'fp32':
        return Precision(name, device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise PrecisionError(f'{name} on {device}: CUDA is not available')
        if name == 'bf16' and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f'bf16 on {device}: {torch.cuda.get_device_name(device)} has no bfloat16 support '
                                 '(needs compute capability 8.0+); use fp16')
        return Precision(name, device)
    if device.type != 'cpu':
        raise PrecisionError(f'{name} on {device.type}: reduced precision runs on cpu (bf16) and cuda only')
    if name == 'fp16':
        raise PrecisionError('fp16 on the CPU is not supported: x86 CPUs have no float16 arithmetic for PyTorch\'s '
                             'convolutions and matrix products (it would be emulated, slower than fp32); use bf16 on '
                             'a CPU with avx512_bf16/AMX, fp32, or fp16 on a GPU')
    ok, why = cpu_bf16_support()
    if not ok:
        raise PrecisionError(f'bf16 on the CPU: {why}')
    return Precision(name, device)


__all__ = ['PRECISIONS', 'DTYPES', 'CPU_BF16_FLAGS', 'PrecisionError', 'Precision', 'cpu_flags', 'cpu_isa',
           'cpu_bf16_support', 'parse_precision', 'auto_precision', 'resolve_precision']
