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
