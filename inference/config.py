"""Inference-server configuration: defaults < the ``[serve]`` table of a TOML file < flags."""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

from psgrid.codec import SUPPORTED_DTYPES
from psgrid.inference.models import InputSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything an inference server is started with.

    Exactly one source: ``follow_job`` (with ``server``, the parameter
    server's address) or ``checkpoint_dir`` (with ``job_id`` when the
    directory holds several jobs).
    """

    host: str = "127.0.0.1"
    port: int = 0
    #: Write the bound port here once serving (atomically).
    port_file: str | None = None
    follow_job: str | None = None
    server: str | None = None
    checkpoint_dir: str | None = None
    job_id: str | None = None
    #: Seconds between polls of the source for a new version.
    poll_interval_s: float = 2.0
    #: auto (CUDA when available), cpu, cuda, cuda:N.
    device: str = "auto"
    #: torch threads for the model; 0: this machine's cores.
    threads: int = 0
    #: ``package.module:function`` applied to each request's examples; "" = identity.
    preprocess: str = ""
    features: str = ""
    preprocess_concurrency: int = 2
    features_concurrency: int = 2
    #: Most examples in one batch, and the longest the oldest request waits for a fuller one.
    max_batch_size: int = 100
    batch_timeout_s: float = 0.005
    #: Threads running batches (one batch at a time each).
    batch_concurrency: int = 1
    #: Requests each stage's buffer holds; beyond that new requests get RESOURCE_EXHAUSTED.
    queue_capacity: int = 256
    #: Largest request payload; larger is RESOURCE_EXHAUSTED (PayloadTooLarge).
    max_request_bytes: int = 4 << 20
    #: One example's shape (and its dtype); None = both inferred from the model's first Linear layer.
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    #: Also serve grpc.health.v1 alone, in plaintext, on this port (0: any free):
    #: Kubernetes' native gRPC probes (psgrid.guard.HealthPort).
    health_port: int | None = None
    #: gRPC handler threads; every waiting unary call and every stream holds one.
    max_rpc_threads: int = 256
    #: Seconds in-flight calls get to finish at shutdown.
    grace_s: float = 5.0
    #: Module prefixes a served job's model may be imported from ("*": any).
    allowed_modules: tuple[str, ...] = ("psgrid.examples",)

    def __post_init__(self) -> None:
        if (self.follow_job is None) == (self.checkpoint_dir is None):
            raise ValueError("give exactly one source: follow_job or checkpoint_dir")
        if self.follow_job is not None and not self.server:
            raise ValueError("follow_job needs server, the parameter server's HOST:PORT")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in 0..65535, got {self.health_port}")
        for name in ("preprocess", "features"):
            value = getattr(self, name)
            if value and not _IMPORT_PATH.fullmatch(value):
                raise ValueError(f"{name} must be package.module:function, got {value!r}")
        self._check_positive()
        if self.input_dtype not in _DTYPE_NAMES:
            raise ValueError(f"input_dtype {self.input_dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
        if self.input_shape is not None and any(type(d) is not int or d < 0 for d in self.input_shape):
            raise ValueError(f"input_shape must be non-negative ints, got {self.input_shape}")

    def _check_positive(self) -> None:
        for name in ("poll_interval_s", "max_request_bytes", "max_batch_size", "queue_capacity",
                     "preprocess_concurrency", "features_concurrency", "batch_concurrency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.batch_timeout_s <= 60:
            raise ValueError(f"batch_timeout_s must be in [0, 60], got {self.batch_timeout_s}")
        if self.max_rpc_threads < 4 or self.threads < 0 or self.grace_s < 0:
            raise ValueError("need max_rpc_threads >= 4, threads >= 0 and grace_s >= 0")

    def input_spec(self) -> InputSpec | None:
        """The configured examples' shape and dtype; None when they are to be inferred."""
        if self.input_shape is None:
            return None
        return InputSpec(tuple(self.input_shape), _DTYPE_NAMES[self.input_dtype])

    @classmethod
    def load(cls, path: str | pathlib.Path | None = None, **overrides: Any) -> "ServeConfig":
        """Defaults, then the ``[serve]`` table of a TOML file, then non-None overrides."""
        values: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                values.update(tomllib.load(f).get("serve", {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve config keys: {sorted(unknown)}")
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(values["input_shape"])
        if isinstance(values.get("allowed_modules"), (list, str)):
            items = values["allowed_modules"]
            items = items.split(",") if isinstance(items, str) else items
            values["allowed_modules"] = tuple(i.strip() for i in items if i.strip())
        return cls(**values)


def resolve(path: str) -> Callable[[Any], Any] | None:
    """The function named by ``package.module:function`` (None for ""); ValueError if missing.

    These paths come from the operator's own command line or config, not
    from a request, so any importable module is allowed.
    """
    if not path:
        return None
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{path!r} does not name a callable")
    return fn
