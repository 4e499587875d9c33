"""Publish a bound port to a file, so whoever started the process can dial it."""
from __future__ import annotations

import os


def write_port_file(path: str | os.PathLike, port: int) -> None:
    """Write ``port`` atomically: readers never see a partial file."""
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
