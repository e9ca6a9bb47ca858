"""Measurement helpers shared by the benchmark scripts: stable CPU timing, latency statistics, and peak memory
measured in a fresh process so that one configuration's allocations do not hide another's.

CPU timing is only stable with glibc's malloc told to keep memory: by default PyTorch spends a large share of its
time in page faults returning and re-faulting big buffers (we measured SwinIR-light x4 on 256x256 at 3.8 s with the
settings below and 6.6-8.5 s without). :func:`ensure_malloc_env` re-executes the calling script with them set.
"""
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

MALLOC_ENV = {
    'MALLOC_MMAP_THRESHOLD_': '4294967296',
    'MALLOC_TRIM_THRESHOLD_': '17179869184',
    'MALLOC_TOP_PAD_': '1073741824',
}


def ensure_malloc_env(disable: bool = False) -> Dict[str, str]:
    """Re-exec the current script once with :data:`MALLOC_ENV` set (glibc reads it at start-up only).

    Returns the settings in force, for the report. Pass ``disable=True`` (e.g. from a ``--no-malloc-env`` flag) to
    measure with the defaults.
    """
    if disable:
        return {}
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return dict(MALLOC_ENV)
    env = dict(os.environ, **MALLOC_ENV)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
    return dict(MALLOC_ENV)  # not reached


@dataclass
class Timing:
    """Wall-clock latencies of repeated calls, in seconds, and the process CPU time of each call (all threads;
    steadier than wall time on a shared machine)."""

    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def spread(self) -> float:
        """Half the distance between the fastest and the slowest run, relative to the median."""
        return (max(self.times) - min(self.times)) / 2 / self.median if self.times else float('nan')

    def as_dict(self) -> Dict[str, Any]:
        return {'median_s': self.median, 'min_s': min(self.times), 'max_s': max(self.times), 'runs': len(self.times)}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: Optional[torch.device] = None) -> Timing:
    """Call ``fn`` ``warmup`` times, then time ``repeats`` calls (wall and process CPU time; synchronising CUDA
    around each)."""
    device = torch.device(device or 'cpu')
    for _ in range(warmup):
        fn()
    _sync(device)
    out = Timing()
    for _ in range(repeats):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        out.times.append(time.perf_counter() - t)
        out.cpu_times.append(time.process_time() - c)
    return out


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _child(target: Callable[..., Dict[str, Any]], kwargs: Dict[str, Any], queue) -> None:
    try:
        result = target(**kwargs)
        queue.put(('ok', result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put(('error', traceback.format_exc()))


def run_isolated(target: Callable[..., Dict[str, Any]], timeout: Optional[float] = None, **kwargs) -> Dict[str, Any]:
    """Run ``target(**kwargs)`` in a fresh spawned process and return its dict.

    ``target`` must be a module-level function. Inside it, measure memory as ``rss_peak_bytes()`` minus the RSS taken
    just before the workload (``current_rss_bytes()``), so the interpreter and torch import are not counted. Raises
    ``RuntimeError`` with the child's traceback on failure.
    """
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(target, kwargs, queue))
    proc.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            status, payload = queue.get(timeout=0.5)
            break
        except queue_module.Empty:
            if not proc.is_alive():  # died without reporting (killed, out of memory, unpicklable target)
                raise RuntimeError(f'{getattr(target, "__name__", target)} ended without a result '
                                   f'(exit code {proc.exitcode})') from None
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f'{getattr(target, "__name__", target)} timed out after {timeout} s') from None
    proc.join()
    if status != 'ok':
        raise RuntimeError(f'{target.__name__} failed in its subprocess:\n{payload}')
    return payload


def memory_mark(device: torch.device) -> int:
    """Start of a peak-memory measurement: on CUDA, synchronise, reset the peak statistics and return the bytes
    allocated; on the CPU, return the current RSS. Pass the result to :func:`memory_growth`."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes()


def memory_growth(device: torch.device, mark: int) -> int:
    """Peak memory since :func:`memory_mark` above what was in use then: ``torch.cuda.max_memory_allocated`` on
    CUDA, the process's peak RSS on the CPU (measure in a fresh process: the RSS peak never goes down)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - mark, 0)
    return max(rss_peak_bytes() - mark, 0)


def timed_no_grad(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> Tuple['Timing', int]:
    """Time ``fn`` under ``torch.no_grad()`` (:func:`time_fn`) and measure the peak memory its calls add
    (:func:`memory_mark` / :func:`memory_growth`): (timing, peak bytes)."""

    def call():
        with torch.no_grad():
            return fn()

    mark = memory_mark(device)
    timing = time_fn(call, repeats=repeats, warmup=warmup, device=device)
    return timing, memory_growth(device, mark)


#: ``/proc/cpuinfo`` flags that decide CPU speed and precision support, reported when present.
ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_bf16')


def cpu_model(path: str = '/proc/cpuinfo') -> Optional[str]:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        return None


def environment_summary() -> Dict[str, Any]:
    """What a benchmark table must say about where it was measured: torch, threads, CPUs, the CPU model, the vector
    ISA PyTorch dispatches to and the relevant cpuinfo flags, the malloc settings, the GPU, the load average."""
    from adasr.inference.precision import cpu_flags
    from adasr.ops.codegen import configure_numba

    flags = cpu_flags()
    info = {
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(),
        'cpu_model': cpu_model(),
        'isa': torch.backends.cpu.get_cpu_capability(),
        'cpu_flags': [f for f in ISA_FLAGS if f in flags],
        'malloc_env': {k: os.environ.get(k) for k in MALLOC_ENV if os.environ.get(k)},
        'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'numba_target': configure_numba(),
    }
    try:
        load = os.getloadavg()
        info['loadavg_1m'] = round(load[0], 2)
        info['loadavg'] = [round(v, 2) for v in load]
    except OSError:
        pass
    return info


def environment_line(threads: Optional[int] = None) -> str:
    """:func:`environment_summary` as the one line printed with a benchmark figure: the CPU model and count, the ISA
    PyTorch dispatches to (with the cpuinfo flags that matter), torch, the threads (``threads`` or PyTorch's), the
    load average and whether the malloc settings are on."""
    env = environment_summary()
    flags = f" ({', '.join(env['cpu_flags'])})" if env['cpu_flags'] else ''
    return (f"{env.get('cpu_model') or 'CPU'}, {env['cpu_count']} CPUs, PyTorch ISA {env['isa']}{flags}, "
            f"torch {env['torch']}, {threads or env['threads']} threads, load {env.get('loadavg_1m', '?')}, "
            f"malloc env {'on' if env['malloc_env'] else 'off'}, numba compiles for {env['numba_target']}")


__all__ = ['MALLOC_ENV', 'Timing', 'ensure_malloc_env', 'time_fn', 'rss_peak_bytes', 'current_rss_bytes',
           'run_isolated', 'memory_mark', 'memory_growth', 'cpu_model', 'environment_summary',
           'environment_line']
