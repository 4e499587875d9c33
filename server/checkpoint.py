"""Writing durable checkpoints of one job's server-side state (the format: :mod:`psgrid.checkpoints`).

Both files of a checkpoint are written to a temporary file in the same
directory, fsynced, renamed into place and the directory fsynced; the manifest
goes last, so a checkpoint exists exactly when its manifest does. A crash at any
point leaves at most a stray ``.ckpt-*.tmp`` file or a tensor file with no
manifest, both of which readers ignore and the next save removes.
One writer per job at a time; readers may run alongside it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time
from typing import Any

import safetensors.torch
import torch

from psgrid.checkpoints import (_OPTIM, _PARAM, FORMAT, FORMAT_VERSION, SUPPORTED_DTYPES, CheckpointReader,
                                JobCheckpoint, _describe, _manifest_checksum)

logger = logging.getLogger(__name__)

__all__ = ["CheckpointStore", "JobCheckpoint", "SUPPORTED_DTYPES"]


def _standalone(tensors: dict[str, torch.Tensor], prefix: str, seen: set[int]) -> dict[str, torch.Tensor]:
    """Prefixed tensors that safetensors accepts: contiguous, on CPU, sharing no storage.

    A tensor that already owns its whole storage is passed through, so a
    :meth:`JobCheckpoint.detached` checkpoint is not copied a second time; views
    into the store's flat buffer are cloned, since older safetensors refuse
    tensors that share storage.
    """
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        storage = t.untyped_storage()
        owns_storage = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
                        and storage.nbytes() == t.nbytes and storage.data_ptr() not in seen)
        if not owns_storage:
            t = t.to("cpu", copy=True, memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[prefix + name] = t
    return out


def _fsync_dir(directory: pathlib.Path) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(directory: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``directory/name`` so that a reader sees all of it or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return directory / name


class CheckpointStore(CheckpointReader):
    """Checkpoints of many jobs under one directory, the newest ``keep`` of each, written durably.

    Contracts: :meth:`save` returns only once the checkpoint is durable; reading
    is :class:`~psgrid.checkpoints.CheckpointReader`'s.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        if type(keep) is not int or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        super().__init__(directory)
        self.keep = keep

    def next_seq(self, job_id: str) -> int:
        """A seq above every checkpoint file of ``job_id`` on disk, complete or not; 0 if none."""
        manifests, tensor_files, _ = self._scan(self._job_dir(job_id))
        return max(manifests | tensor_files, default=-1) + 1

    # --- saving -------------------------------------------------------------

    def save(self, ckpt: JobCheckpoint) -> pathlib.Path:
        """Write ``ckpt`` durably, prune older ones, and return the manifest's path.

        ``ckpt.seq`` MUST be at least :meth:`next_seq` (ValueError otherwise), so
        a new checkpoint is always the newest. The tensors are read during the
        call: pass a :meth:`JobCheckpoint.detached` copy if they may change.
        """
        job_dir = self._job_dir(ckpt.job_id)
        if ckpt.seq < (lowest := self.next_seq(ckpt.job_id)):
            raise ValueError(f"job {ckpt.job_id}: seq {ckpt.seq} is not newer than what is on disk (next is {lowest})")
        started = time.monotonic()
        self._make_dirs(job_dir)
        seen: set[int] = set()
        tensors = _standalone(ckpt.params, _PARAM, seen) | _standalone(ckpt.optimizer_state, _OPTIM, seen)
        data = safetensors.torch.save(tensors)
        del tensors  # the clones are in ``data`` now; free them before the write
        stem = f"ckpt-{ckpt.seq:08d}"
        _write_atomic(job_dir, f"{stem}.safetensors", data)
        manifest = self._manifest(ckpt, f"{stem}.safetensors", data)
        text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
        path = _write_atomic(job_dir, f"{stem}.json", text.encode("ascii"))
        logger.info("[ps] job %s checkpoint %d saved: %d bytes in %.2fs",
                    ckpt.job_id, ckpt.seq, len(data), time.monotonic() - started)
        self._prune(job_dir, ckpt.seq)
        return path

    def _make_dirs(self, job_dir: pathlib.Path) -> None:
        # A new directory's entry lives in its parent, which must be fsynced too.
        for directory in (self.directory, job_dir):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                _fsync_dir(directory.parent)

    @staticmethod
    def _manifest(ckpt: JobCheckpoint, tensor_file: str, data: bytes) -> dict[str, Any]:
        body = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "job_id": ckpt.job_id, "seq": ckpt.seq,
            "tensor_file": tensor_file, "tensor_bytes": len(data),
            "tensor_sha256": hashlib.sha256(data).hexdigest(),
            "params": _describe(ckpt.params),
            "optimizer_state": _describe(ckpt.optimizer_state),
            "meta": ckpt.meta,
        }
        return {**body, "checksum": _manifest_checksum(body)}

    def _prune(self, job_dir: pathlib.Path, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop leftovers older than ``newest``."""
        manifests, tensor_files, temps = self._scan(job_dir)
        doomed = sorted(manifests, reverse=True)[self.keep:]
        # The manifest goes first: once it is gone the checkpoint no longer
        # exists, so a crash mid-prune leaves only an orphan tensor file.
        paths = [job_dir / f"ckpt-{s:08d}.json" for s in doomed]
        paths += [job_dir / f"ckpt-{s:08d}.safetensors" for s in sorted(tensor_files)
                  if s < newest and (s in doomed or s not in manifests)]
        paths += [job_dir / name for name, s in temps.items() if s <= newest]
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("[ps] could not remove old checkpoint file %s: %s", path, exc)
        if paths:
            _fsync_dir(job_dir)

    def discard(self, job_id: str, seqs: list[int]) -> None:
        """Remove checkpoints ``seqs`` of ``job_id`` (manifest first, as in pruning)."""
        job_dir = self._job_dir(job_id)
        for seq in seqs:
            for suffix in ("json", "safetensors"):
                (job_dir / f"ckpt-{seq:08d}.{suffix}").unlink(missing_ok=True)
        if seqs:
            _fsync_dir(job_dir)

