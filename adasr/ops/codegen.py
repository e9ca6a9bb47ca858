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

_lock = threading.Lock()
_modules: Dict[Tuple[str, Hashable], types.ModuleType] = {}


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
        src = source()
        digest = hashlib.sha1(src.encode()).hexdigest()[:12]
        full = f'adasr_{name}_{digest}'
        try:
            folder = cache_dir(kind)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, full + '.py')
            if not os.path.exists(path):
                tmp = f'{path}.{os.getpid()}.tmp'
                with open(tmp, 'w') as f:
                    f.write(src)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module  # numba's cache finds the module of its functions by name
            spec.loader.exec_module(module)
        except OSError:
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
    try:
        return numba.njit(nogil=True, cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location (read-only install, no user cache dir)
        return numba.njit(nogil=True, cache=False, **options)(fn)
