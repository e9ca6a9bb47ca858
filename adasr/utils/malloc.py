"""glibc malloc settings for CPU inference: freed memory is kept for the next tensor instead of being handed back.

With glibc's defaults every allocation above its mmap threshold (at most 32 MB) is a fresh ``mmap`` and every free
gives the pages back, so each forward of a large image page-faults (and zeroes) its feature maps again: a 270x480
AdaFormer forward took 73,000-300,000 page faults a call and 7-14% more time than with the pages kept (one and two
threads; its first calls 15-30% more), an 8K output by ``adasr-upscale`` 1.35x the time (docs/upscale.md).
:func:`tune` raises the thresholds from inside the process (``mallopt``), so that later calls reuse the pages of
earlier ones; the benchmarks measure with the same settings, given as glibc's environment variables
(``benchmarks.profiling.MALLOC_ENV``), and so did the memory figures of docs/upscale.md. The process then holds its
peak memory until it exits, with the fragments of its heap: its peak is higher (the 8K output: 4.7-5.0 GB against
2.8 GB).

``ADASR_MALLOC`` (read by :func:`tune`): ``auto`` (the default: tune where glibc's ``mallopt`` exists and none of
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` is set, which would be the user's own
choice) or ``default`` (leave glibc's behaviour alone). ``adasr-upscale`` and ``adasr-test`` call :func:`tune`;
training does not.
"""
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Optional

ENV = 'ADASR_MALLOC'
CHOICES = ('auto', 'default')
#: glibc's own variables for the same settings: where one is set, the user has chosen and :func:`tune` stays out
GLIBC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
_INT_MAX = 2 ** 31 - 1  # mallopt takes an int
#: (parameter, value): blocks up to 2 GiB from the heap, free memory at its top kept up to 2 GiB, the heap grown in
#: steps of 1 GiB of address space (pages are only resident once written)
SETTINGS = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, 2 ** 30))

_lock = threading.Lock()
_state: Optional[str] = None


def _choice() -> str:
    raw = os.environ.get(ENV, 'auto').strip().lower() or 'auto'
    if raw not in CHOICES:
        raise ValueError(f'{ENV} must be one of {", ".join(CHOICES)}, got {os.environ[ENV]!r}')
    return raw


def _mallopt():
    """glibc's ``mallopt``, or None (another C library, or not Linux)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        if not os.confstr('CS_GNU_LIBC_VERSION'):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        fn = libc.mallopt
    except (AttributeError, OSError, ValueError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def tune() -> str:
    """Apply :data:`SETTINGS` once per process (see the module docstring); returns what was done: ``'tuned'``,
    ``'left alone: <why>'`` or ``'partly tuned: ...'``. Raises ``ValueError`` naming ``ADASR_MALLOC`` for a value
    it does not know."""
    global _state
    choice = _choice()
    with _lock:
        if _state is not None:
            return _state
        own = [name for name in GLIBC_ENV if name in os.environ]
        mallopt = None if choice == 'default' or own else _mallopt()
        if choice == 'default':
            _state = f'left alone: {ENV}=default'
        elif own:
            _state = f'left alone: {", ".join(own)} set'
        elif mallopt is None:
            _state = 'left alone: no glibc mallopt'
        else:
            refused = [param for param, value in SETTINGS if mallopt(param, value) != 1]
            _state = 'tuned' if not refused else f'partly tuned: mallopt refused parameters {refused}'
        return _state


__all__ = ['ENV', 'CHOICES', 'GLIBC_ENV', 'SETTINGS', 'tune']
