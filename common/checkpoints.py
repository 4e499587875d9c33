"""The checkpoint file format, and reading checkpoints: every reader goes through here.

A checkpoint is two files in ``<directory>/<job_id>/``::

    ckpt-00000007.safetensors   every tensor, keys "param/<name>" and "optim/<name>"
    ckpt-00000007.json          the manifest: sha256 and size of the tensor file,
                                names/dtypes/shapes in order, the caller's meta,
                                a format version and a sha256 of itself

The parameter server writes them (:mod:`psgrid.server.checkpoint`: temporary
file, fsync, rename, the manifest last, so a checkpoint exists exactly when its
manifest does); the server's restore, ``psgrid serve --checkpoint-dir`` and
tools read them with :class:`CheckpointReader`, which returns only checkpoints
that verify end to end and ignores stray temporary or manifest-less files.

Nothing here unpickles: tensors go through safetensors, metadata through JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import safetensors.torch
import torch

from psgrid.limits import check_id, is_id

logger = logging.getLogger(__name__)

#: Written into every manifest; a reader refuses any other value.
FORMAT = "psgrid-checkpoint"
FORMAT_VERSION = 1
#: dtypes safetensors stores bit-exactly on every torch psgrid supports.
SUPPORTED_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_PARAM, _OPTIM = "param/", "optim/"
_FINAL = re.compile(r"ckpt-(\d{8,})\.(json|safetensors)")
_TEMP = re.compile(r"\.ckpt-(\d{8,})\..*\.tmp")
_JSON_SCALARS = (str, int, float, bool, type(None))


def _check_json(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` comes back from a JSON round trip as itself.

    Exact types only: a tuple would come back a list, a str enum a plain str,
    an int key a str key, so each is refused here rather than silently changed.
    """
    kind = type(value)
    if kind in _JSON_SCALARS:
        return
    if kind is list:
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where} has non-str key {key!r}; JSON keys are strings")
            _check_json(item, f"{where}[{key!r}]")
    else:
        raise ValueError(f"{where} is a {kind.__name__} ({value!r}), which does not round-trip through JSON")


def _check_tensors(tensors: Any, what: str) -> None:
    if type(tensors) is not dict:
        raise ValueError(f"{what} must be a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} has non-str name {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{what}[{name!r}] must be a dense torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{what}[{name!r}] has unsupported dtype {t.dtype}")


@dataclasses.dataclass(frozen=True)
class JobCheckpoint:
    """One job's server-side state at one moment.

    ``params`` keeps parameter order (dict insertion order) through a save and
    load. ``meta`` is the caller's: any value made of dict (str keys), list,
    str, int, float, bool and None, returned by a load equal to what was saved.
    """

    job_id: str
    seq: int
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.job_id)
        if type(self.seq) is not int or self.seq < 0:
            raise ValueError(f"seq must be an int >= 0, got {self.seq!r}")
        _check_tensors(self.params, "params")
        _check_tensors(self.optimizer_state, "optimizer_state")
        if type(self.meta) is not dict:
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        _check_json(self.meta, "meta")

    def detached(self) -> "JobCheckpoint":
        """A copy whose tensors are independent, contiguous CPU clones.

        Take it while holding the job's lock, then save it without the lock:
        the copy costs a memcpy, the save costs a disk write and an fsync.
        """
        def copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                    for n, t in tensors.items()}

        return dataclasses.replace(
            self, params=copy(self.params), optimizer_state=copy(self.optimizer_state),
            meta=json.loads(json.dumps(self.meta)),
        )


class _Invalid(Exception):
    """A checkpoint on disk failed verification; the message says why."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in tensors.items()]


def _manifest_checksum(body: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``checksum`` field, in canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class CheckpointReader:
    """Checkpoints of many jobs under one directory, read and verified.

    Contracts: :meth:`load_latest` and :meth:`verified` return only checkpoints
    that verify end to end, and never raise for a damaged one, however it is
    damaged (they log it and fall back to an older one); :meth:`load` raises
    ValueError for one. Job ids that are unsafe as directory names raise
    InvalidId (a ValueError) everywhere.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = pathlib.Path(directory)

    def _job_dir(self, job_id: str) -> pathlib.Path:
        return self.directory / check_id(job_id)

    @staticmethod
    def _scan(job_dir: pathlib.Path) -> tuple[set[int], set[int], dict[str, int]]:
        """(seqs with a manifest, seqs with a tensor file, temp file name -> seq)."""
        manifests: set[int] = set()
        tensor_files: set[int] = set()
        temps: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(job_dir):
                if m := _FINAL.fullmatch(entry.name):
                    (manifests if m[2] == "json" else tensor_files).add(int(m[1]))
                elif m := _TEMP.fullmatch(entry.name):
                    temps[entry.name] = int(m[1])
        return manifests, tensor_files, temps

    def job_ids(self) -> list[str]:
        """Sorted ids of the jobs with at least one complete (manifest present) checkpoint."""
        try:
            entries = sorted(e.name for e in os.scandir(self.directory) if e.is_dir())
        except FileNotFoundError:
            return []
        return [name for name in entries
                if is_id(name) and self._scan(self.directory / name)[0]]

    def load_latest(self, job_id: str) -> JobCheckpoint | None:
        """The newest checkpoint of ``job_id`` that verifies, or None if there is none.

        Each one that fails verification is logged once at WARNING and skipped.
        """
        return next(self.verified(job_id), None)

    def verified(self, job_id: str) -> Iterator[JobCheckpoint]:
        """The checkpoints of ``job_id`` that verify, newest first, each read when asked for.

        Any failure to read one (a torn file, a bad checksum, a manifest too
        deeply nested to parse, ...) means that checkpoint is bad: it is logged
        once at WARNING and skipped.
        """
        job_dir = self._job_dir(job_id)
        manifests, _, _ = self._scan(job_dir)
        for seq in sorted(manifests, reverse=True):
            try:
                ckpt = self._load(job_dir, job_id, seq)
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is unusable
                logger.warning("[ps] job %s checkpoint %d skipped: %s", job_id, seq, _reason(exc))
                continue
            yield ckpt

    def manifests(self, job_id: str) -> list[tuple[int, dict[str, Any]]]:
        """(seq, meta) of each checkpoint of ``job_id`` whose manifest verifies, oldest
        first. Cheap: the tensor files are checked when one is loaded."""
        job_dir = self._job_dir(job_id)
        found = []
        for seq in sorted(self._scan(job_dir)[0]):
            try:
                found.append((seq, _read_manifest(job_dir / f"ckpt-{seq:08d}.json", job_id, seq)["meta"]))
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is unusable
                logger.warning("[ps] job %s checkpoint %d skipped: %s", job_id, seq, _reason(exc))
        return found

    def load(self, job_id: str, seq: int) -> JobCheckpoint:
        """Checkpoint ``seq`` of ``job_id``, verified end to end; ValueError if it does not verify."""
        job_dir = self._job_dir(job_id)
        try:
            return self._load(job_dir, job_id, seq)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is unusable
            raise ValueError(f"job {job_id} checkpoint {seq} is unusable: {_reason(exc)}") from None

    def _load(self, job_dir: pathlib.Path, job_id: str, seq: int) -> JobCheckpoint:
        manifest = _read_manifest(job_dir / f"ckpt-{seq:08d}.json", job_id, seq)
        tensor_path = job_dir / manifest["tensor_file"]
        with open(tensor_path, "rb") as f:
            # Checking the size first spares reading a file that is truncated.
            size = os.fstat(f.fileno()).st_size
            if size != manifest["tensor_bytes"]:
                raise _Invalid(f"{tensor_path.name} is {size} bytes, manifest says {manifest['tensor_bytes']}")
            data = f.read()
        if len(data) != size or hashlib.sha256(data).hexdigest() != manifest["tensor_sha256"]:
            raise _Invalid(f"{tensor_path.name} does not match its sha256")
        loaded = safetensors.torch.load(data)
        del data
        params = _take(loaded, _PARAM, manifest["params"])
        optimizer_state = _take(loaded, _OPTIM, manifest["optimizer_state"])
        if loaded:
            raise _Invalid(f"{tensor_path.name} holds tensors the manifest does not list: {sorted(loaded)[:5]}")
        return JobCheckpoint(job_id, seq, params, optimizer_state, manifest["meta"])


def _reason(exc: Exception) -> str:
    """Why a checkpoint is unusable, in one line of bounded length."""
    text = str(exc) if isinstance(exc, (_Invalid, OSError)) else f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else f"{text[:500]}..."


def _read_manifest(path: pathlib.Path, job_id: str, seq: int) -> dict[str, Any]:
    """The parsed manifest at ``path`` if it is intact and belongs here; else raise _Invalid."""
    try:
        manifest = json.loads(path.read_bytes().decode("ascii"))
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        if manifest.get("checksum") != _manifest_checksum(body):
            raise _Invalid(f"{path.name} does not match its own checksum")
        expected = {"format": FORMAT, "format_version": FORMAT_VERSION, "job_id": job_id, "seq": seq,
                    "tensor_file": f"ckpt-{seq:08d}.safetensors"}
        for key, want in expected.items():
            if manifest.get(key) != want:
                raise _Invalid(f"{path.name} has {key} {manifest.get(key)!r}, expected {want!r}")
        for key in ("params", "optimizer_state"):
            if type(manifest[key]) is not list:
                raise _Invalid(f"{path.name}: {key} is not a list")
        if type(manifest["meta"]) is not dict or type(manifest["tensor_bytes"]) is not int:
            raise _Invalid(f"{path.name}: meta or tensor_bytes has the wrong type")
        return manifest
    except (AttributeError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"{path.name} is not a valid manifest: {type(exc).__name__}: {exc}") from None


def _take(loaded: dict[str, torch.Tensor], prefix: str, described: list[Any]) -> dict[str, torch.Tensor]:
    """Pop the tensors ``described`` lists from ``loaded``, in its order, checking each."""
    out = {}
    for entry in described:
        try:
            name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        except (KeyError, TypeError):
            raise _Invalid(f"malformed tensor entry {entry!r}") from None
        t = loaded.pop(prefix + name, None) if isinstance(name, str) else None
        if t is None:
            raise _Invalid(f"tensor {prefix}{name} is missing from the tensor file")
        if _dtype_name(t.dtype) != dtype or list(t.shape) != shape:
            raise _Invalid(f"tensor {prefix}{name} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                           f"manifest says {dtype}{shape}")
        out[name] = t
    return out
