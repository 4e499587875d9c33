"""Parameter-server configuration: defaults < TOML file < command-line flags."""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any

from psgrid.guard import Admission

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _check_address(name: str, value: object) -> None:
    """ValueError naming ``value`` unless it is HOST:PORT with a port in 1..65535."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{name} must be HOST:PORT with a port in 1..65535, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything a parameter-server process is started with."""

    host: str = "127.0.0.1"
    port: int = 0
    #: Largest parameter set one job may declare; larger is RESOURCE_EXHAUSTED.
    max_payload_bytes: int = 4 << 30
    heartbeat_interval_s: float = 1.0
    #: A worker silent this long is not given new jobs.
    heartbeat_timeout_s: float = 10.0
    #: Longest a pull waits for the consistency model before answering ABORTED.
    pull_wait_s: float = 30.0
    #: Calls of one service (the workers' ParameterServer, the clients' JobService)
    #: served at once; every worker's step stream, idle worker's heartbeat (a long poll)
    #: and client's watch holds one. Past it: RESOURCE_EXHAUSTED.
    max_rpc_threads: int = 256
    #: Seconds a request (or a stream's first frame) may take to arrive whole, and
    #: between two frames of a push; a connection without calls this long is closed
    #: (psgrid.guard, docs/security.md "Slow and idle clients").
    request_arrive_s: float = 10.0
    frame_idle_s: float = 60.0
    connection_idle_s: float = 300.0
    #: Write the bound port here once serving (atomically).
    port_file: str | None = None
    #: Also serve grpc.health.v1 alone, in plaintext, on this port (0: any free), from
    #: before restoring checkpoints: Kubernetes' native gRPC probes (psgrid.guard.HealthPort).
    health_port: int | None = None
    #: Append one JSON line per accepted gradient push here (docs/operations.md, "The update log").
    update_log: str | None = None
    #: Offer workers on this host the shared-memory path of the step stream (psgrid.shm).
    shared_memory: bool = True
    #: Offer workers a direct step channel (psgrid.channel: the step stream on a plain
    #: socket beside gRPC, entered with a one-use ticket). Never under TLS.
    step_channel: bool = True
    #: This server's name in its cluster, on every update-log line: ``psgrid up``
    #: names the coordinator ``server`` and the other shards ``shard-1``, ``shard-2``, ...
    shard_name: str = "server"
    #: Checkpoint every job here, and restore from here at start (None: no checkpoints).
    checkpoint_dir: str | None = None
    checkpoint_interval_s: float = 5.0
    #: Sharded synchronous jobs are checkpointed every this many steps instead,
    #: the same steps on every shard, so that shards can be put back in step.
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    #: Addresses (as workers dial them) of the other parameter-server shards; jobs
    #: submitted here spread their parameters over this server and those.
    shards: tuple[str, ...] = ()
    #: Module prefixes jobs may name for their model and dataset ("*": any).
    allowed_modules: tuple[str, ...] = ("psgrid.examples",)
    #: HOST:PORT other machines should dial to reach this server (informative:
    #: logged and reported); None means the bound address.
    advertise: str | None = None
    #: A pending job that waited this long, and that the live workers could hold,
    #: reserves the next free workers: younger jobs no longer start before it
    #: (before that, they backfill the idle workers it cannot use yet).
    reserve_after_s: float = 60.0
    #: Finished jobs kept in memory (parameters, history, events), the newest first;
    #: older ones are released (docs/operations.md, "Finished jobs").
    keep_finished_jobs: int = 20
    #: Seconds a finished job is kept in memory at most (None: no limit).
    finished_job_ttl_s: float | None = None

    def admission(self) -> Admission:
        return Admission(calls_per_service=self.max_rpc_threads, arrive_s=self.request_arrive_s,
                         frame_idle_s=self.frame_idle_s, connection_idle_s=self.connection_idle_s)

    def __post_init__(self) -> None:
        self.admission()  # checks its limits
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in 0..65535, got {self.health_port}")
        if self.max_payload_bytes <= 0:
            raise ValueError(f"max_payload_bytes must be > 0, got {self.max_payload_bytes}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_timeout_s")
        if self.checkpoint_interval_s <= 0 or self.keep_checkpoints < 1 or self.checkpoint_every_steps < 1:
            raise ValueError("checkpoint_interval_s must be > 0, keep_checkpoints >= 1 "
                             "and checkpoint_every_steps >= 1")
        if self.pull_wait_s <= 0 or self.max_rpc_threads < 4:
            raise ValueError("pull_wait_s must be > 0 and max_rpc_threads >= 4")
        if self.advertise is not None:
            _check_address("advertise", self.advertise)
        if not isinstance(self.shard_name, str) or not self.shard_name.strip():
            raise ValueError(f"shard_name must be a non-empty string, got {self.shard_name!r}")
        if isinstance(self.keep_finished_jobs, bool) or not isinstance(self.keep_finished_jobs, int) \
                or self.keep_finished_jobs < 0:
            raise ValueError(f"keep_finished_jobs must be an int >= 0, got {self.keep_finished_jobs!r}")
        if isinstance(self.reserve_after_s, bool) or not isinstance(self.reserve_after_s, (int, float)) \
                or not 0 <= self.reserve_after_s < math.inf:
            raise ValueError(f"reserve_after_s must be a finite number >= 0, got {self.reserve_after_s!r}")
        ttl = self.finished_job_ttl_s
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                                or not 0 <= ttl < math.inf):
            raise ValueError(f"finished_job_ttl_s must be a finite number >= 0 or None, got {ttl!r}")

    @classmethod
    def load(cls, path: str | pathlib.Path | None = None, **overrides: Any) -> "ServerConfig":
        """Defaults, then the ``[server]`` table of a TOML file, then non-None overrides."""
        values: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                values.update(tomllib.load(f).get("server", {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("allowed_modules", "shards"):
            items = values.get(key)
            if isinstance(items, (list, str)):
                items = items.split(",") if isinstance(items, str) else items
                values[key] = tuple(i.strip() for i in items if i.strip())
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown server config keys: {sorted(unknown)}")
        return cls(**values)
