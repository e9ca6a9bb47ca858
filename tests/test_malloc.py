"""adasr.utils.malloc: glibc keeps freed memory for the next tensor in the CLIs (no page faults on every forward)."""
import os
import subprocess
import sys

import pytest

from adasr.utils import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_glibc = pytest.mark.skipif(malloc._mallopt() is None, reason="not glibc: nothing to tune")

# a process that fills a 64 MB array, frees it and prints how much its resident memory fell (MB)
_RETAINED = """
import numpy as np
from adasr.utils import malloc
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2 ** 20
print(malloc.tune())
a = np.ones(16 * 2 ** 20, np.float32)
before = rss()
del a
print(before - rss())
"""


def _run(code: str, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in malloc.GLIBC_ENV + (malloc.ENV,)}
    env.update(env_changes, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split('\n')


@needs_glibc
def test_tuned_process_keeps_freed_memory():
    """With the tuning a freed 64 MB block stays in the process for the next tensor (its pages are not faulted in
    again); with glibc's defaults (ADASR_MALLOC=default, or the user's own MALLOC_* variables) it is a mapping of its
    own, handed back when freed."""
    state, fell = _run(_RETAINED)[:2]
    assert state == 'tuned' and float(fell) < 8
    state, fell = _run(_RETAINED, ADASR_MALLOC='default')[:2]
    assert state == 'left alone: ADASR_MALLOC=default' and float(fell) > 56
    state, fell = _run(_RETAINED, MALLOC_TOP_PAD_='0')[:2]
    assert state == 'left alone: MALLOC_TOP_PAD_ set' and float(fell) > 56


@pytest.fixture
def fresh(monkeypatch):
    """:func:`malloc.tune` as in a new process, with ``mallopt`` recorded instead of called."""
    monkeypatch.setattr(malloc, '_state', None)
    for name in malloc.GLIBC_ENV + (malloc.ENV,):
        monkeypatch.delenv(name, raising=False)
    calls, answers = [], {}
    monkeypatch.setattr(malloc, '_mallopt', lambda: lambda p, v: calls.append((p, v)) or answers.get(p, 1))
    return calls, answers


def test_tune_sets_the_thresholds_once(fresh):
    calls, _ = fresh
    assert malloc.tune() == 'tuned' and calls == list(malloc.SETTINGS)
    assert malloc.tune() == 'tuned' and len(calls) == 3  # once per process
    assert dict(calls)[-3] == 2 ** 31 - 1 and dict(calls)[-2] == 2 ** 30  # mmap threshold, top pad


def test_tune_stays_out_where_told_or_where_the_user_chose(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setenv('ADASR_MALLOC', ' Default ')
    assert malloc.tune() == 'left alone: ADASR_MALLOC=default' and calls == []
    monkeypatch.setattr(malloc, '_state', None)
    monkeypatch.setenv('ADASR_MALLOC', 'auto')
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '65536')
    assert malloc.tune() == 'left alone: MALLOC_MMAP_THRESHOLD_ set' and calls == []
    monkeypatch.setattr(malloc, '_state', None)
    monkeypatch.delenv('MALLOC_MMAP_THRESHOLD_')
    monkeypatch.setattr(malloc, '_mallopt', lambda: None)
    assert malloc.tune() == 'left alone: no glibc mallopt'


def test_tune_reports_a_refused_setting(fresh):
    calls, answers = fresh
    answers[-1] = 0  # M_TRIM_THRESHOLD refused
    assert malloc.tune() == 'partly tuned: mallopt refused parameters [-1]' and len(calls) == 3


def test_unknown_value_names_the_variable(fresh, monkeypatch):
    monkeypatch.setenv('ADASR_MALLOC', 'fast')
    with pytest.raises(ValueError, match="ADASR_MALLOC must be one of auto, default, got 'fast'"):
        malloc.tune()


@pytest.mark.parametrize('command', [['-m', 'adasr.cli.upscale', '-i', 'nothing.png', '-o', 'out'],
                                     ['adasr/test.py', '-opt', 'options/test/test_AdaFormer_x4.yml']])
def test_clis_refuse_an_unknown_value_before_any_work(command, tmp_path):
    """adasr-upscale and adasr-test tune malloc before anything is read: a bad ADASR_MALLOC stops them with its
    name."""
    env = dict(os.environ, ADASR_MALLOC='fast', PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, *[os.path.join(REPO, c) if c.endswith(('.py', '.yml')) else c
                                            for c in command]],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and 'ADASR_MALLOC must be one of auto, default' in out.stderr
    assert 'nothing.png' not in out.stderr
