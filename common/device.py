"""Where a worker computes, and how many threads it takes."""
from __future__ import annotations

import os
import threading

import torch

from psgrid.errors import DeviceUnavailable


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when available, else CPU; ``preference`` ("cpu", "cuda:1", ...) overrides.

    Raises DeviceUnavailable for a device this host lacks or a name torch does not know.
    """
    if preference in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "it sees no GPU"
        raise DeviceUnavailable(
            f"device {preference!r} was asked for but CUDA is not available here (torch {torch.__version__}: "
            f"{why}): use --device cpu (or auto), or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {preference!r} was asked for but this host has "
                                f"{torch.cuda.device_count()} GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def default_threads(local_workers: int = 1) -> int:
    """A fair share of this machine's cores for one of ``local_workers`` workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


#: Tensors smaller than this are worked on by one thread. torch splits any op of
#: 32k elements or more across its threads, and below about 2 MiB the hand-off
#: to a sleeping OpenMP thread (OMP_WAIT_POLICY=PASSIVE) costs more than the half
#: of the op it takes over: a W1 round (docs/benchmarks.md) took 1.7 ms on two
#: threads against 0.94 ms on one, a W2 round 150 ms against 190 ms.
PARALLEL_MIN_BYTES = 2 << 20

_op_threads = threading.local()
#: torch's thread count before use_threads first changed it (what 0 stands for).
_started_with: list[int] = []


def threads_for(largest_bytes: int) -> int:
    """Threads worth using on tensors of at most ``largest_bytes`` each (0: torch's own count)."""
    return 1 if largest_bytes < PARALLEL_MIN_BYTES else 0


def use_threads(threads: int) -> None:
    """Run this thread's next torch ops on ``threads`` threads (0: as many as torch was
    started with). Per thread: OpenMP keeps the count of each calling thread apart, so
    handlers of a small and of a large job each get their own."""
    if getattr(_op_threads, "count", None) == threads:
        return
    if not _started_with:
        _started_with.append(torch.get_num_threads())
    torch.set_num_threads(threads or _started_with[0])
    _op_threads.count = threads
