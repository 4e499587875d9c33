"""psgrid: a supervised, crash-tolerant parameter-server training cluster over gRPC.

The SDK lives in :mod:`psgrid.client`; job specs in :mod:`psgrid.spec`; errors
in :mod:`psgrid.errors`. ``psgrid.Client`` and ``psgrid.JobSpec`` are shortcuts.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `psgrid --help` does not pay for importing torch and gRPC.
    if name in ("Client", "Job"):
        from psgrid import client

        return getattr(client, name)
    if name in ("JobSpec", "OptimizerSpec", "JobState", "JobInfo"):
        from psgrid import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'psgrid' has no attribute {name!r}")
