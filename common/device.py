"""Where a worker computes, and how many threads it takes."""
from __future__ import annotations

import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when available, else CPU; ``preference`` ("cpu", "cuda:1", ...) overrides."""
    if preference in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} was asked for but CUDA is not available")
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
