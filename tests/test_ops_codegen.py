"""Generated numba sources (adasr/ops/codegen.py): written once per digest into the cache directory, imported from
there (so numba's on-disk cache applies), compiled in memory when no directory is writable."""
import os

import pytest

from adasr.ops import codegen

SOURCE = '''import numba


@numba.njit(cache=True)
def twice(x):
    return 2 * x
'''


def _fresh(monkeypatch, folder):
    monkeypatch.setenv('NUMBA_CACHE_DIR', str(folder))
    monkeypatch.setattr(codegen, '_modules', {})


def test_source_is_written_once_and_imported_from_the_cache_dir(tmp_path, monkeypatch):
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    _fresh(monkeypatch, tmp_path)
    calls = []

    def source():
        calls.append(1)
        return SOURCE

    module = codegen.load_module('test_kernels', ('twice',), 'test_twice', source)
    assert module.twice(21) == 42
    files = [f for f in os.listdir(tmp_path / 'test_kernels') if f.endswith('.py')]
    assert len(files) == 1 and files[0].startswith('adasr_test_twice_')
    assert module.__file__ == str(tmp_path / 'test_kernels' / files[0])
    assert codegen.load_module('test_kernels', ('twice',), 'test_twice', source) is module  # per process: once
    assert calls == [1]
    monkeypatch.setattr(codegen, '_modules', {})  # a new process: the file is reused, not rewritten
    mtime = os.path.getmtime(module.__file__)
    assert codegen.load_module('test_kernels', ('twice',), 'test_twice', source).twice(2) == 4
    assert os.path.getmtime(module.__file__) == mtime


def test_unwritable_cache_dir_compiles_in_memory(tmp_path, monkeypatch):
    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    _fresh(monkeypatch, blocker)  # makedirs fails under a regular file
    module = codegen.load_module('test_kernels', ('twice', 2), 'test_twice', lambda: SOURCE)
    assert module.twice(5) == 10
    assert not hasattr(module, '__file__') or not str(getattr(module, '__file__', '')).startswith(str(blocker))


def test_a_cache_numba_refuses_compiles_in_memory_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """numba raises RuntimeError ('cannot cache function') where the cache folder exists but cannot be written: the
    source is then compiled in memory, no half-imported module stays in sys.modules and no temporary file in the
    folder."""
    import sys

    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    _fresh(monkeypatch, tmp_path)
    refusing = SOURCE.replace('import numba\n', "import numba\nif dict(cache=True)['cache']:\n"
                              "    raise RuntimeError('cannot cache function: no locator available')\n")
    module = codegen.load_module('test_kernels', ('twice', 3), 'test_refused', lambda: refusing)
    assert module.twice(4) == 8 and not getattr(module, '__file__', None)
    assert not [name for name in sys.modules if name.startswith('adasr_test_refused_')]
    assert [f for f in os.listdir(tmp_path / 'test_kernels') if not f.endswith('.py')] in ([], ['__pycache__'])


def _fma_row(a, x, y):  # y[j] = a * x[j] + y[j] (compiled with FP contraction: one fused multiply-add each)
    for j in range(y.shape[0]):
        y[j] = a * x[j] + y[j]


def test_compile_function_compiles_and_falls_back(monkeypatch):
    """A module function compiled with the options given (here FP contraction: a*x + y rounded once, which an
    unfused product and sum get wrong by one ulp at these values); None where numba does not import."""
    import sys

    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    import numpy as np
    fn = codegen.compile_function(_fma_row, fastmath={'contract'})
    a, x = np.float32(1 + 2 ** -12), np.array([1 + 2 ** -12], np.float32)
    y = np.array([-(1 + 2 ** -11)], np.float32)  # a * x = 1 + 2^-11 + 2^-24: only the fused sum keeps 2^-24
    fn(a, x, y)
    assert y[0] == np.float32(2 ** -24)
    monkeypatch.setitem(sys.modules, 'numba', None)  # "import numba" now raises ImportError
    assert codegen.compile_function(_fma_row) is None


_TARGET_PROBE = """
import sys
if sys.argv[1] == 'numba-first':  # another package compiles with numba before adasr does
    import numba
    numba.njit(lambda x: x + 1)(1)
from numba.core import config
from adasr.ops import codegen
print(repr(codegen.configure_numba()))
print(repr(config.CPU_FEATURES))
"""


@pytest.mark.parametrize('case', ['default', 'off', 'user-features', 'numba-first'])
def test_numba_compiles_with_wide_vectors_on_avx512_hosts_only_when_free_to(case):
    """:func:`codegen.configure_numba`: on an AVX-512 host numba's features become the host's with LLVM's 256-bit
    preference off; left as they are with ``ADASR_NUMBA_WIDE=0``, with ``NUMBA_CPU_FEATURES`` set by the user, on
    hosts without AVX-512, and when numba's CPU target was made before adasr's first kernel (each case in its own
    process: the setting is process-wide)."""
    import subprocess
    import sys

    import numba  # noqa: F401 - a declared dependency: a broken install fails here, never skips
    from llvmlite import binding

    host = binding.get_host_cpu_features()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('NUMBA_CPU', 'ADASR_NUMBA'))}
    env.update({'off': {'ADASR_NUMBA_WIDE': '0'}, 'user-features': {'NUMBA_CPU_FEATURES': '+avx,+avx2'}}.get(case, {}))
    proc = subprocess.run([sys.executable, '-c', _TARGET_PROBE, case], env=env, capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    note, features = (eval(line) for line in proc.stdout.split('\n')[-3:-1])  # noqa: S307 - our own repr output
    if case == 'user-features':
        assert features == '+avx,+avx2' and 'as set' in note
    elif case == 'off':
        assert features is None and 'ADASR_NUMBA_WIDE=0' in note
    elif not host.get('avx512f', False):
        assert features is None and 'no AVX-512' in note
    elif case == 'numba-first':
        assert features is None and 'before adasr' in note
    else:
        assert features == f'{host.flatten()},{codegen.WIDE_FEATURE}' and '512-bit vectors' in note


def test_compiled_is_compiled_once_per_process(monkeypatch):
    """``compiled(fn)``: one compilation per function and process (the same dispatcher every call), None where numba
    does not import."""
    calls = []
    real = codegen.compile_function
    monkeypatch.setattr(codegen, 'compile_function', lambda fn: calls.append(fn) or real(fn))
    codegen.compiled.cache_clear()
    try:
        first = codegen.compiled(_fma_row)
        assert codegen.compiled(_fma_row) is first and calls == [_fma_row]
        assert (first is None) == (not codegen.numba_available())
    finally:
        codegen.compiled.cache_clear()
