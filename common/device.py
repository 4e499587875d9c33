"""Where a worker computes, and how many threads it takes."""
from __future__ import annotations

import os

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
