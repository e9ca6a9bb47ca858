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
    pytest.importorskip('numba')
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
    pytest.importorskip('numba')
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    _fresh(monkeypatch, blocker)  # makedirs fails under a regular file
    module = codegen.load_module('test_kernels', ('twice', 2), 'test_twice', lambda: SOURCE)
    assert module.twice(5) == 10
    assert not hasattr(module, '__file__') or not str(getattr(module, '__file__', '')).startswith(str(blocker))


def _fma_row(a, x, y):  # y[j] = a * x[j] + y[j] (compiled with FP contraction: one fused multiply-add each)
    for j in range(y.shape[0]):
        y[j] = a * x[j] + y[j]


def test_compile_function_compiles_and_falls_back(monkeypatch):
    """A module function compiled with the options given (here FP contraction: a*x + y rounded once, which an
    unfused product and sum get wrong by one ulp at these values); None where numba does not import."""
    import sys

    import numpy as np

    pytest.importorskip('numba')
    fn = codegen.compile_function(_fma_row, fastmath={'contract'})
    a, x = np.float32(1 + 2 ** -12), np.array([1 + 2 ** -12], np.float32)
    y = np.array([-(1 + 2 ** -11)], np.float32)  # a * x = 1 + 2^-11 + 2^-24: only the fused sum keeps 2^-24
    fn(a, x, y)
    assert y[0] == np.float32(2 ** -24)
    monkeypatch.setitem(sys.modules, 'numba', None)  # "import numba" now raises ImportError
    assert codegen.compile_function(_fma_row) is None
