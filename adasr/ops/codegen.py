"""Generated numba kernels: Python source written to a cache directory and imported from there, so that numba's
on-disk cache (``cache=True``) keeps their machine code between processes.

Some kernels are specialised to their sizes (Winograd's tile transforms per variant and channel counts, PFT's dense
rows per head dim): their source is generated with the sizes as constants, which lets LLVM unroll and vectorise what
a generic loop would not. numba caches compiled code per source *file*, so each generated source gets a file of its
own, named after a digest of its text: ``$NUMBA_CACHE_DIR/<kind>`` or ``~/.cache/adasr/<kind>``
(``XDG_CACHE_HOME``). Compiling takes some seconds the first time, loading from the cache a fraction of one. Without
a writable directory the source is compiled in memory for the process (``cache=True`` turned off).

Functions written in a module (not generated) are compiled by :func:`compile_function`, with the same fallbacks.
"""
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import types
from typing import Dict, Hashable, Tuple

from adasr.ops.config import get_option

_lock = threading.Lock()
_modules: Dict[Tuple[str, Hashable], types.ModuleType] = {}
_numba_lock = threading.Lock()
_numba_target: Dict[str, str] = {}
#: the LLVM subtarget feature turned off on AVX-512 CPUs (:func:`configure_numba`)
WIDE_FEATURE = '-prefer-256-bit'


def cache_dir(kind: str) -> str:
    """Folder of the generated sources of ``kind`` (and of numba's cache of them)."""
    base = os.environ.get('NUMBA_CACHE_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'adasr')
    return os.path.join(base, kind)


def load_module(kind: str, key: Hashable, name: str, source) -> types.ModuleType:
    """The module of the generated source ``source()`` (called once per ``(kind, key)`` and process), imported from
    ``cache_dir(kind)/<name>_<digest>.py`` (written atomically when absent)."""
    with _lock:
        module = _modules.get((kind, key))
        if module is not None:
            return module
        configure_numba()
        src = source()
        digest = hashlib.sha1(src.encode()).hexdigest()[:12]
        full = f'adasr_{name}_{digest}'
        try:
            folder = cache_dir(kind)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, full + '.py')
            if not os.path.exists(path):
                tmp = f'{path}.{os.getpid()}.tmp'
                try:
                    with open(tmp, 'w') as f:
                        f.write(src)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module  # numba's cache finds the module of its functions by name
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(full, None)
                raise
        except (OSError, RuntimeError):  # no writable folder; numba: "cannot cache function" in a read-only one
            module = types.ModuleType(full)
            exec(compile(src.replace('cache=True', 'cache=False'), full, 'exec'), module.__dict__)
        _modules[(kind, key)] = module
        return module


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """True when the optional dependency ``module`` imports (checked once per process); any import failure means
    not available."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


def numba_available() -> bool:
    """True when numba imports (checked once): the kernels of :mod:`adasr.ops` compile; else their PyTorch
    fallbacks run."""
    return importable('numba')


def compile_function(fn, **options):
    """``numba.njit(nogil=True, cache=True, **options)(fn)`` (compiled on its first call, machine code cached next to
    the function's source), or None where numba does not import; without a writable cache location the function is
    compiled per process (``cache=False``)."""
    try:
        import numba
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    configure_numba()
    try:
        return numba.njit(nogil=True, cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location (read-only install, no user cache dir)
        return numba.njit(nogil=True, cache=False, **options)(fn)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """:func:`compile_function` of ``fn`` (no options) once per process: the same dispatcher on every call, or None
    where numba does not import (the caller's PyTorch fallback)."""
    return compile_function(fn)


def configure_numba() -> str:
    """Once per process, before adasr's first numba function: on a CPU with AVX-512F, numba compiles for the host's
    features with LLVM's ``prefer-256-bit`` tuning turned off (:data:`WIDE_FEATURE`), so that the loops it vectorises
    use 512-bit registers. Returns what numba compiles for, in words (the benchmarks print it).

    LLVM tunes Intel's AVX-512 cores from Ice Lake on (Rocket Lake, Sapphire Rapids, ...) to prefer 256-bit vectors:
    numba's loop vectoriser then fills ymm registers, and adasr's kernels lose up to half their vector width. On an AMX
    Xeon (LLVM host ``rocketlake``) PFT-light's attention layers ran 9-16% faster with it, the network 8-15%
    (docs/pft.md, *On an Intel AMX Xeon*). No number changes: the kernels' sums run in an order fixed by their code
    (no fast-math reassociation), so the width of an element-wise loop changes no result.

    Numba is left as it is when the option ``numba_wide`` is off (``ADASR_NUMBA_WIDE=0``), when ``NUMBA_CPU_NAME`` or
    ``NUMBA_CPU_FEATURES`` is set, on CPUs without AVX-512F (or ``NUMBA_ENABLE_AVX=0``), and when numba's CPU target
    already exists in this process (something compiled with numba before adasr did: its features are fixed then).
    The setting is process-wide: numba functions of other packages compiled later in the process get it too."""
    with _numba_lock:
        note = _numba_target.get('note')
        if note is None:
            note = _numba_target['note'] = _configure_numba()
        return note


def _configure_numba() -> str:
    try:
        from llvmlite import binding
        from numba.core import config, registry
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return 'not available'
    if config.CPU_NAME or config.CPU_FEATURES:
        return 'NUMBA_CPU_NAME / NUMBA_CPU_FEATURES as set'
    if not get_option('numba_wide'):
        return "the host's defaults (ADASR_NUMBA_WIDE=0)"
    features = binding.get_host_cpu_features()
    if not config.ENABLE_AVX or not features.get('avx512f', False):
        return "the host's defaults (no AVX-512)"
    if '_toplevel_target_context' in vars(registry.cpu_target):
        return "the host's defaults (numba's CPU target was made before adasr's first kernel)"
    config.CPU_FEATURES = f'{features.flatten()},{WIDE_FEATURE}'
    return f'the host, 512-bit vectors ({WIDE_FEATURE})'
