"""CPU scheduling of the inference attention: a process-wide pool of worker threads that run whole tiles.

Many small operations, each parallelised by OpenMP, spend their time forking and joining (and stall when the machine
is busy: every operation waits for its second thread to be scheduled); tiles run whole on separate threads with
single-threaded operations do not (docs/pft.md has the measurements). :func:`parallel_for` runs independent tiles
on the pool; :func:`parallel_map` splits one NumPy call over it.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import torch

from adasr.ops.config import worker_threads

T = TypeVar('T')
R = TypeVar('R')

_pools: Dict[Tuple[int, int], ThreadPoolExecutor] = {}  # (process id, threads) -> pool
_local = threading.local()
_pool_lock = threading.Lock()


def _init_worker() -> None:
    torch.set_num_threads(1)  # this thread's torch operations stay single-threaded
    # Flush denormals (|x| < 1.2e-38) to zero on this thread only: x86 CPUs take 10-100x longer on them, and the
    # -100 shift mask makes every masked softmax entry one (exp(-100) ~ 4e-44). In results of order 1e-7 or larger
    # they are invisible; after focusing every kept weight is >= 1e-20 anyway.
    torch.set_flush_denormal(True)


def _worker_pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` workers of this process: one per thread count ever asked for (a caller may still be
    submitting to one while another asks for a new count, so none is shut down); a forked child drops its parent's."""
    pid = os.getpid()
    with _pool_lock:
        for key in [key for key in _pools if key[0] != pid]:
            del _pools[key]  # the parent's: their threads do not exist in this process
        pool = _pools.get((pid, threads))
        if pool is None:
            pool = _pools[(pid, threads)] = ThreadPoolExecutor(threads, thread_name_prefix='adasr-attn',
                                                               initializer=_init_worker)
        return pool

def in_worker() -> bool:
    """True on a pool worker thread (nested parallel calls run sequentially there)."""
    return getattr(_local, 'in_worker', False)


def _run_items(fn: Callable, items: Sequence, inference: bool) -> None:
    _local.in_worker = True
    try:
        # grad and inference modes are thread-local: tiles never record autograd, and write into the caller's
        # tensors, which are inference tensors when the caller is in inference mode
        with torch.inference_mode(inference), torch.no_grad():
            for item in items:
                fn(item)
    finally:
        _local.in_worker = False


def parallel_for(fn: Callable[[T], None], items: Sequence[T]) -> None:
    """Call ``fn(item)`` for every item (independent tiles writing disjoint outputs) on a pool of
    :func:`adasr.ops.config.worker_threads` threads, each running single-threaded torch / numpy operations with
    denormals flushed to zero.

    While the tiles run, PyTorch's intra-op thread count is 1 (restored afterwards; OpenMP's count is the calling
    thread's, MKL's process-wide, so calls from several threads at once may see each other's). Without
    autograd only. Nested calls run sequentially in the calling worker; option ``threads=0``
    (``ADASR_ATTN_THREADS=0``) runs everything sequentially in the calling thread (denormals as the caller has them).
    """
    if not items:
        return
    threads = worker_threads()
    if in_worker() or threads == 0:
        for item in items:
            fn(item)
        return
    pool = _worker_pool(threads)
    per_task = max(1, len(items) // (4 * threads))  # a few tasks per thread: balance with little overhead
    tasks = [items[i:i + per_task] for i in range(0, len(items), per_task)]
    inference = torch.is_inference_mode_enabled()
    intra = torch.get_num_threads()
    if intra > 1:
        torch.set_num_threads(1)
    try:
        for future in [pool.submit(_run_items, fn, task, inference) for task in tasks]:
            future.result()
    finally:
        if intra > 1:
            torch.set_num_threads(intra)


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> List[R]:
    """``[fn(item) for item in items]`` on the worker pool (for calls that release the GIL, such as NumPy's);
    sequential on a worker thread or with option ``threads`` at 0 or 1."""
    threads = worker_threads()
    if in_worker() or threads <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    return list(_worker_pool(threads).map(fn, items))


__all__ = ['parallel_for', 'parallel_map', 'in_worker']
