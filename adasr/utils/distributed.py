"""Process groups for runs started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``).

One rule for every entry point: CUDA tensors go through NCCL and CPU tensors through gloo. On a machine with CUDA
the group is created with the combined backend ``cpu:gloo,cuda:nccl`` and each process takes the GPU
``LOCAL_RANK % device_count``; without CUDA it is plain gloo. So the same command runs on GPUs and on CPUs.
"""
import datetime
import os
from typing import Any, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar('T')


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` sets ``RANK`` and ``WORLD_SIZE``)."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA is available (NCCL for GPU tensors), else ``gloo``."""
    return 'cpu:gloo,cuda:nccl' if torch.cuda.is_available() else 'gloo'


def init_from_env(timeout: Optional[datetime.timedelta] = None) -> Tuple[int, int]:
    """Join the process group described by the environment; returns ``(rank, world_size)``.

    On CUDA machines the current device becomes ``LOCAL_RANK % device_count`` first, so ``torch.device('cuda')``
    means this process's GPU.

    Args:
        timeout: how long collectives wait for the slowest process (torch's default when None).
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count())
    kwargs = {} if timeout is None else {'timeout': timeout}
    dist.init_process_group(backend=default_backend(), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the current group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world_size: int) -> List[T]:
    """This process's share of ``items``: every ``world_size``-th item from ``rank`` (balanced to within one)."""
    return list(items[rank::world_size])


def gather_to_all(obj: Any) -> List[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` outside a process group). Objects travel by pickle
    between the processes of one run only."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Leave the process group (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the group (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
