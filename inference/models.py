"""Versioned models: load a new version beside the served one, check it, swap atomically.

A :class:`Candidate` (a job spec and its trained parameters, from a running
job or a checkpoint) becomes a :class:`ServedModel` only after it passes every
check, in this order:

1. its version is newer than the served one (an equal one is ignored);
2. the model builds from the job's import path (``build_model(spec)``);
3. its parameters are exactly the model's trainable ones: same names,
   shapes and dtypes, and, once a version is served, the same as that one's;
4. every parameter is finite;
5. a smoke batch (seeded random examples of the served input shape, through
   preprocessing and feature extraction) runs and gives finite outputs with
   one row per example and the served per-example output shape.

A candidate that fails is refused: logged, listed in :meth:`ModelRegistry.status`,
and the served version goes on answering. A batch *leases* the version that is
current when it starts and finishes on it; a replaced version's memory is
released when its last lease ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from psgrid.errors import Internal, Unavailable
from psgrid.inference import arrays
from psgrid.inference.arrays import Array
from psgrid.spec import JobSpec
from psgrid import sparse
from psgrid.build import build_dataset, build_model, trainable

logger = logging.getLogger(__name__)

#: Examples in the smoke batch every new version must run.
SMOKE_ROWS = 8
#: Refusals kept for status.
MAX_REFUSALS = 16


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A model version offered for serving. ``params`` are named as in ``model.named_parameters()``."""

    version: int
    spec: JobSpec
    params: dict[str, torch.Tensor]
    origin: str
    #: Where the model's embedding tables (psgrid.sparse) read their rows; None: it has none.
    rows: object | None = None


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A version that was not served, and why."""

    version: int
    origin: str
    reason: str
    time_unix: float


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What one example looks like on the wire: its shape (without the batch dimension) and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class RegistryStatus:
    """The served version (0: none yet), where it came from, refusals (oldest first),
    and the versions still in memory (the served one plus any still finishing batches)."""

    version: int
    origin: str
    loaded_unix: float
    refusals: tuple[Refusal, ...]
    resident: tuple[int, ...]
    input_spec: InputSpec | None


class _Refused(Exception):
    """A candidate failed a check; the message says which."""


class ServedModel:
    """One loaded version: its module in eval mode on its device, and its leases."""

    def __init__(self, version: int, origin: str, module: nn.Module, device: torch.device,
                 layout: tuple, output_shape: tuple[int, ...]):
        self.version, self.origin, self.device = version, origin, device
        self.module: nn.Module | None = module
        self.layout, self.output_shape = layout, output_shape
        self.loaded_unix = time.time()
        self.leases = 0
        self.retired = False

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """The module's output for a batch of examples, on the CPU."""
        with torch.inference_mode():
            out = self.module(examples.to(self.device, non_blocking=True))
        if not isinstance(out, torch.Tensor):
            raise Internal(f"the model returned {type(out).__name__}, not a tensor")
        return out.to("cpu")

    def release(self) -> None:
        """Drop the module, so its memory can be reclaimed."""
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def infer_input_spec(module: nn.Module) -> InputSpec | None:
    """The input of a model whose first layer is ``nn.Linear``; None when that cannot be told."""
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag, sparse.Embedding)):
            return None  # ids in, of a shape only the data tells
        if isinstance(sub, nn.Linear):
            return InputSpec((sub.in_features,), sub.weight.dtype)
        if len(list(sub.children())) == 0 and any(True for _ in sub.parameters(recurse=False)):
            return None  # the first layer with weights is something else
    return None


def smoke_examples(spec: InputSpec, rows: int = SMOKE_ROWS) -> torch.Tensor:
    """Seeded examples: standard normal for floating dtypes, zeros otherwise."""
    shape = (rows, *spec.shape)
    if spec.dtype.is_floating_point:
        g = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=g, dtype=torch.float32).to(spec.dtype)
    return torch.zeros(shape, dtype=spec.dtype)


def _describe(named: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((n, t.dtype, tuple(t.shape)) for n, t in named)


def _kind(entry: tuple) -> str:
    """``float32[16, 8]`` for a (name, dtype, shape) entry."""
    return f"{str(entry[1]).removeprefix('torch.')}{list(entry[2])}"


class ModelRegistry:
    """Holds the served version; :meth:`offer` checks and swaps in new ones.

    ``transform`` is the pipeline's preprocessing and feature extraction, run
    on the smoke batch. ``input_spec`` fixes the accepted examples; when None
    it is inferred from the first version (see :func:`infer_input_spec`).
    """

    def __init__(self, device: torch.device | str = "cpu", input_spec: InputSpec | None = None,
                 transform: Callable[[Any], Any] | None = None, allowed_modules: tuple[str, ...] = ("*",)):
        self.device = torch.device(device)
        #: Module prefixes a version's model may be imported from.
        self.allowed_modules = allowed_modules
        self._input = input_spec
        self._transform = transform or (lambda x: x)
        self._current: ServedModel | None = None
        self._resident: list[ServedModel] = []
        self._refusals: deque[Refusal] = deque(maxlen=MAX_REFUSALS)
        self._lock = threading.Lock()
        self._offer_lock = threading.Lock()

    @property
    def input_spec(self) -> InputSpec | None:
        return self._input

    @property
    def version(self) -> int:
        """The served version; 0 while none is loaded (versions start at 1)."""
        current = self._current
        return current.version if current else 0

    @property
    def loaded(self) -> bool:
        return self._current is not None

    # --- loading -------------------------------------------------------------------

    def offer(self, candidate: Candidate) -> bool:
        """Load, check and swap in ``candidate``; True if it is now served.

        Never raises for a bad candidate: it is refused and the served version stays.
        """
        with self._offer_lock:
            current = self._current
            if current is not None and candidate.version == current.version:
                logger.debug("[serve] version %d is already served", candidate.version)
                return False
            try:
                served = self._load(candidate, current)
            except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the old version serves on
                reason = str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
                self.refuse(candidate.version, candidate.origin, reason)
                return False
            self._swap(served)
            logger.info("[serve] now serving version %d from %s", served.version, served.origin)
            return True

    def refuse(self, version: int, origin: str, reason: str) -> None:
        """Record (and log, once) a version that will not be served."""
        logger.warning("[serve] refused version %d from %s: %s", version, origin, reason)
        with self._lock:
            self._refusals.append(Refusal(version, origin, reason, time.time()))

    def _load(self, candidate: Candidate, current: ServedModel | None) -> ServedModel:
        if candidate.version < 1:
            raise _Refused(f"version {candidate.version}: served versions start at 1")
        if current is not None and candidate.version < current.version:
            raise _Refused(f"version {candidate.version} is older than the served {current.version}")
        try:
            module = build_model(candidate.spec, self.allowed_modules)
        except Exception as exc:  # noqa: BLE001 - any failure to build refuses the version
            raise _Refused(f"the model does not build: {type(exc).__name__}: {exc}") from None
        layout = self._check_params(module, candidate.params, current)
        module.load_state_dict(candidate.params, strict=False)
        tables = [m for m in module.modules() if isinstance(m, sparse.Embedding)]
        if tables and candidate.rows is None:
            raise _Refused(f"the model has embedding tables ({', '.join(sorted(sparse.tables(module)))}) and "
                           f"{candidate.origin} brings no rows for them")
        for table in tables:
            table.bind(candidate.rows)
        module.eval().to(self.device)
        input_spec = self._input or infer_input_spec(module) or self._input_from_dataset(candidate.spec)
        if input_spec is None:
            raise _Refused("cannot tell the model's input shape (its first layer is not nn.Linear and the "
                           "job names no dataset this process can build): pass --input-shape D1,D2,... "
                           "(one example's shape, e.g. 1,28,28) to psgrid serve")
        served = ServedModel(candidate.version, candidate.origin, module, self.device, layout, ())
        served.output_shape = self._smoke(served, input_spec, current)
        self._input = input_spec
        return served

    def _input_from_dataset(self, spec: JobSpec) -> InputSpec | None:
        """One training example's shape and dtype, from the dataset the job trained on."""
        if not spec.dataset:
            return None
        try:
            data = build_dataset(spec, self.allowed_modules)
        except Exception as exc:  # noqa: BLE001 - no dataset here: the caller says which flag to set
            logger.warning("[serve] cannot build the job's dataset %s to learn the input shape: %s",
                           spec.dataset, exc)
            return None
        example = data.train_x[0]
        logger.info("[serve] input shape %s (%s) taken from the job's dataset %s",
                    list(example.shape), str(example.dtype).removeprefix("torch."), spec.dataset)
        return InputSpec(tuple(example.shape), example.dtype)

    @staticmethod
    def _check_params(module: nn.Module, params: dict[str, torch.Tensor],
                      current: ServedModel | None) -> tuple:
        expected = _describe(trainable(module))
        names = {n for n, _, _ in expected}
        if extra := sorted(set(params) - names):
            raise _Refused(f"parameters the model does not have: {extra[:5]}")
        if missing := [n for n in names if n not in params]:
            raise _Refused(f"parameters missing: {sorted(missing)[:5]}")
        got = _describe([(n, params[n]) for n, _, _ in expected])
        for want, have in zip(expected, got):
            if want != have:
                raise _Refused(f"parameter {want[0]} is {_kind(have)}, the model has {_kind(want)}")
        if current is not None and got != current.layout:
            raise _Refused("its parameters do not match the served version's names, shapes and dtypes")
        for name, tensor in params.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise _Refused(f"parameter {name} holds NaN or Inf")
        return got

    def _smoke(self, served: ServedModel, spec: InputSpec, current: ServedModel | None) -> tuple[int, ...]:
        """Run the smoke batch; return the per-example output shape."""
        try:
            out = served.forward(arrays.to_torch(self._transform(smoke_examples(spec))))
        except Exception as exc:  # noqa: BLE001 - a version that cannot run is refused
            raise _Refused(f"the smoke batch failed: {type(exc).__name__}: {exc}") from None
        if out.dim() == 0 or out.shape[0] != SMOKE_ROWS:
            raise _Refused(f"the smoke batch gave shape {list(out.shape)} for {SMOKE_ROWS} examples")
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise _Refused("the smoke batch gave NaN or Inf")
        shape = tuple(out.shape[1:])
        if current is not None and shape != current.output_shape:
            raise _Refused(f"outputs of shape {list(shape)} per example, the served version gives "
                           f"{list(current.output_shape)}")
        return shape

    def _swap(self, served: ServedModel) -> None:
        with self._lock:
            old, self._current = self._current, served
            self._resident.append(served)
            free = old is not None and old.leases == 0
            if old is not None:
                old.retired = True
                if free:
                    self._resident.remove(old)
        if free:
            old.release()

    # --- serving -------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """The current version, held for the duration of the block. Unavailable if none."""
        with self._lock:
            served = self._current
            if served is None:
                raise Unavailable("no model version is loaded yet")
            served.leases += 1
        try:
            yield served
        finally:
            with self._lock:
                served.leases -= 1
                free = served.retired and served.leases == 0 and served in self._resident
                if free:
                    self._resident.remove(served)
            if free:
                served.release()
                logger.debug("[serve] version %d released", served.version)

    def run_batch(self, inputs: list[Array]) -> tuple[list[Array], int]:
        """One forward pass over the concatenated inputs on the current version, split back
        per input (numpy views where numpy has the dtype; see :mod:`psgrid.inference.arrays`)."""
        with self.lease() as served:
            examples = arrays.concat(inputs)
            out = served.forward(examples)
            if out.dim() == 0 or out.shape[0] != examples.shape[0]:
                raise Internal(f"the model gave {list(out.shape)} for {examples.shape[0]} examples")
            return arrays.split(out, [x.shape[0] for x in inputs]), served.version

    def status(self) -> RegistryStatus:
        with self._lock:
            current = self._current
            return RegistryStatus(
                version=current.version if current else 0,
                origin=current.origin if current else "",
                loaded_unix=current.loaded_unix if current else 0.0,
                refusals=tuple(self._refusals),
                resident=tuple(s.version for s in self._resident),
                input_spec=self._input,
            )
