"""Checkpoints round-trip bit-exactly, prune, and survive damage and crashes."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

from psgrid.codec import Layout
from psgrid.server import checkpoint as ckpt_module
from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
from psgrid.server.store import ParameterStore
from psgrid.spec import JobState, OptimizerSpec

JOB = "job-0123456789"
LOGGER = "psgrid.checkpoints"


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaN payloads and -0.0 compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        assert torch.equal(raw(g), raw(w)), name


def flat_params(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Views into one uint8 buffer, as ParameterStore holds them, in unsorted order."""
    layout = Layout.of([
        ("z.weight", torch.float32, (3, 4)),
        ("a.bias", torch.bfloat16, (5,)),
        ("m.half", torch.float16, (2, 3)),
        ("k.double", torch.float64, (4,)),
        ("empty", torch.float32, (0, 3)),
        ("scalar", torch.float64, ()),
    ])
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    views = layout.views(flat)
    g = torch.Generator().manual_seed(seed)
    for t in views.values():
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    views["z.weight"][0] = torch.tensor([math.nan, -0.0, math.inf, -math.inf])
    # A signalling NaN with a payload: only a byte-exact store keeps it.
    flat[4:8] = torch.tensor(list(struct.pack("<I", 0x7FA00001)), dtype=torch.uint8)
    views["a.bias"][0] = 1e-40  # subnormal in bfloat16
    return flat, views


def optimizer_state() -> dict[str, torch.Tensor]:
    big = torch.arange(24, dtype=torch.float32)
    return {
        "exp_avg.transposed": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        "exp_avg.strided": big[::3],  # a strided view into a larger tensor
        "steps": torch.tensor([7, -(2**62)], dtype=torch.int64),
        "i32": torch.tensor([-5, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "zero": torch.zeros(0, dtype=torch.int64),
    }


def meta() -> dict:
    return {
        "spec": {"model": "m:f", "optimizer": {"name": "adam", "betas": [0.9, 0.999], "lr": 0.001}},
        "state": "RUNNING", "version": 12, "global_step": 11, "total_steps": 2**63 - 1,
        "clocks": {"w-a": 11, "w-b": 12}, "metrics": {"acc": 0.1 + 0.2, "tiny": 5e-324},
        "workers": ["w-a", "w-b"], "error": "", "note": "unicode é ✓", "none": None, "flag": False,
    }


def make(seq: int, value: float = 1.0, job_id: str = JOB) -> JobCheckpoint:
    return JobCheckpoint(job_id, seq, {"w": torch.full((256,), value), "b": torch.full((3,), -value)},
                         {"momentum_buffer.w": torch.full((256,), value / 2)}, {"value": value})


def files(store: CheckpointStore, job_id: str = JOB) -> set[str]:
    return set(os.listdir(store.directory / job_id))


# --- round trip ---------------------------------------------------------------


def test_round_trip_is_bit_exact_and_keeps_parameter_order(tmp_path):
    _, params = flat_params()
    state = optimizer_state()
    store = CheckpointStore(tmp_path)
    path = store.save(JobCheckpoint(JOB, 0, params, state, meta()))
    assert path == tmp_path / JOB / "ckpt-00000000.json"
    got = store.load_latest(JOB)
    assert (got.job_id, got.seq) == (JOB, 0)
    assert_bit_exact(got.params, params)
    assert_bit_exact(got.optimizer_state, state)
    assert got.meta == meta()


def test_loaded_tensors_are_independent_and_contiguous(tmp_path):
    flat, params = flat_params()
    before = flat.clone()
    store = CheckpointStore(tmp_path)
    store.save(JobCheckpoint(JOB, 0, params, optimizer_state()))
    got = store.load_latest(JOB)
    tensors = list(got.params.values()) + list(got.optimizer_state.values())
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
    pointers = [t.untyped_storage().data_ptr() for t in tensors if t.numel()]
    assert len(pointers) == len(set(pointers))
    got.params["z.weight"].fill_(3.0)
    got.params["k.double"].fill_(4.0)
    assert torch.equal(flat, before)
    assert torch.all(got.params["z.weight"] == 3.0) and torch.all(got.params["k.double"] == 4.0)


def test_empty_params_and_state_round_trip(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(JobCheckpoint(JOB, 0, {}, {}, {}))
    got = store.load_latest(JOB)
    assert (got.params, got.optimizer_state, got.meta) == ({}, {}, {})


def test_meta_keeps_non_finite_floats(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(JobCheckpoint(JOB, 0, {}, meta={"loss": math.nan, "best": -math.inf}))
    got = store.load_latest(JOB).meta
    assert math.isnan(got["loss"]) and got["best"] == -math.inf


def test_restored_optimizer_continues_bit_exactly(tmp_path):
    spec = OptimizerSpec("adam", lr=0.01, weight_decay=0.01)
    layout = Layout.of([("w", torch.float32, (4, 3)), ("b", torch.bfloat16, (3,))])
    g = torch.Generator().manual_seed(1)
    grads = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    live = ParameterStore(layout, layout.pack({"w": torch.randn(4, 3, generator=g), "b": torch.ones(3)}), spec)
    live.apply(grads[0])
    live.apply(grads[1])
    store = CheckpointStore(tmp_path)
    store.save(JobCheckpoint(JOB, 0, live.params, live.optimizer.state_tensors(),
                             {"version": live.version, "optimizer_steps": live.optimizer.steps}))

    got = store.load_latest(JOB)
    restored = ParameterStore(layout, layout.pack(got.params), spec)
    for name, t in restored.optimizer.state_tensors().items():
        t.copy_(got.optimizer_state[name])
    restored.optimizer.steps, restored.version = got.meta["optimizer_steps"], got.meta["version"]
    live.apply(grads[2])
    restored.apply(grads[2])
    assert torch.equal(restored.flat, live.flat) and restored.version == live.version == 3


def test_detached_copy_does_not_follow_the_live_buffer(tmp_path):
    flat, params = flat_params()
    snap = JobCheckpoint(JOB, 0, params, optimizer_state(), meta()).detached()
    want = {n: t.clone() for n, t in params.items()}
    flat.fill_(0)
    assert_bit_exact(snap.params, want)
    assert all(t.is_contiguous() for t in snap.optimizer_state.values())
    store = CheckpointStore(tmp_path)
    store.save(snap)
    assert_bit_exact(store.load_latest(JOB).params, want)


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    (1, 2), {1: "int key"}, JobState.RUNNING, {"nested": [{1, 2}]}, object(), b"bytes",
], ids=["tuple", "int-key", "str-enum", "set", "object", "bytes"])
def test_meta_that_json_would_change_is_rejected(bad):
    with pytest.raises(ValueError, match="meta"):
        JobCheckpoint(JOB, 0, {}, meta={"x": bad})


@pytest.mark.parametrize("kwargs", [
    {"seq": -1}, {"seq": 1.0}, {"seq": True},
    {"params": {"w": [1.0]}}, {"params": {"w": torch.zeros(2, dtype=torch.complex64)}},
    {"params": {3: torch.zeros(1)}}, {"optimizer_state": None}, {"meta": []},
], ids=["negative-seq", "float-seq", "bool-seq", "list-value", "complex", "int-name", "none-state", "list-meta"])
def test_invalid_checkpoint_fields_are_rejected(kwargs):
    fields = {"job_id": JOB, "seq": 0, "params": {}, **kwargs}
    with pytest.raises(ValueError):
        JobCheckpoint(**fields)


@pytest.mark.parametrize("job_id", ["", ".", "..", "a/b", "../x", "a\\b", "x\x00", ".hidden", "-flag", "a b", "job\n", "x" * 129])
def test_bad_job_ids_are_rejected(tmp_path, job_id):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="job id"):
        JobCheckpoint(job_id, 0, {})
    for call in (store.load_latest, store.next_seq):
        with pytest.raises(ValueError, match="job id"):
            call(job_id)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0, -1, 1.5])
def test_keep_must_be_positive(tmp_path, keep):
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=keep)


# --- sequence, listing, pruning -------------------------------------------------


def test_empty_or_missing_directory_has_nothing(tmp_path):
    for store in (CheckpointStore(tmp_path), CheckpointStore(tmp_path / "missing")):
        assert store.load_latest(JOB) is None
        assert store.job_ids() == []
        assert store.next_seq(JOB) == 0


def test_next_seq_increases_and_older_seqs_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.next_seq(JOB) == 0
    store.save(make(0))
    assert store.next_seq(JOB) == 1
    store.save(make(5))
    assert store.next_seq(JOB) == 6
    for seq in (5, 3):
        with pytest.raises(ValueError, match="seq"):
            store.save(make(seq))
    assert store.load_latest(JOB).seq == 5


def test_keep_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for seq in range(5):
        store.save(make(seq, value=float(seq)))
    assert files(store) == {f"ckpt-0000000{s}.{ext}" for s in (3, 4) for ext in ("json", "safetensors")}
    got = store.load_latest(JOB)
    assert got.seq == 4 and torch.all(got.params["w"] == 4.0)


def test_job_ids_lists_only_jobs_with_a_complete_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make(0, job_id="job-b"))
    store.save(make(0, job_id="job-a"))
    (tmp_path / "job-c").mkdir()
    (tmp_path / "job-c" / "ckpt-00000000.safetensors").write_bytes(
        (tmp_path / "job-a" / "ckpt-00000000.safetensors").read_bytes())
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "stray-file").write_text("not a job")
    assert store.job_ids() == ["job-a", "job-b"]
    assert store.load_latest("job-c") is None


def test_tensor_file_without_manifest_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make(0, value=1.0))
    orphan = tmp_path / JOB / "ckpt-00000001.safetensors"
    orphan.write_bytes((tmp_path / JOB / "ckpt-00000000.safetensors").read_bytes())
    assert store.load_latest(JOB).seq == 0
    assert store.next_seq(JOB) == 2  # never reuse a seq that has a file on disk
    store.save(make(2))
    assert not orphan.exists()


def test_leftover_temp_file_is_ignored_and_cleaned_up(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make(0, value=1.0))
    stale = tmp_path / JOB / ".ckpt-00000001.safetensors.k3j4h5.tmp"
    stale.write_bytes(b"half a tensor file")
    future = tmp_path / JOB / ".ckpt-00000009.json.abcdef.tmp"  # another writer's, perhaps
    future.write_bytes(b"{")
    assert store.job_ids() == [JOB]
    assert store.load_latest(JOB).seq == 0
    assert store.next_seq(JOB) == 1
    store.save(make(1, value=2.0))
    assert not stale.exists() and future.exists()
    assert torch.all(store.load_latest(JOB).params["w"] == 2.0)


# --- damage -------------------------------------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def _edit_manifest(path):
    manifest = json.loads(path.read_text())
    manifest["meta"]["value"] = 99.0
    path.write_text(json.dumps(manifest))


DAMAGE = {
    "tensor-truncated": ("safetensors", _truncate),
    "tensor-bit-flipped": ("safetensors", _flip_bit),
    "tensor-missing": ("safetensors", lambda p: p.unlink()),
    "manifest-truncated": ("json", _truncate),
    "manifest-edited": ("json", _edit_manifest),
    "manifest-not-json": ("json", lambda p: p.write_bytes(b"\xff\x00garbage")),
    "manifest-a-list": ("json", lambda p: p.write_text("[1, 2]")),
    "manifest-empty": ("json", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    ext, corrupt = DAMAGE[damage]
    store = CheckpointStore(tmp_path)
    store.save(make(0, value=1.0))
    store.save(make(1, value=2.0))
    corrupt(tmp_path / JOB / f"ckpt-00000001.{ext}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.load_latest(JOB)
    assert got.seq == 0 and got.meta == {"value": 1.0} and torch.all(got.params["w"] == 1.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint 1 skipped" in warnings[0].getMessage()


def _rewrite_manifest(path, edit):
    """Change a manifest and re-sign it, as a bug (not bit rot) would."""
    manifest = json.loads(path.read_text())
    edit(manifest)
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    path.write_text(json.dumps({**body, "checksum": ckpt_module._manifest_checksum(body)}))


@pytest.mark.parametrize("edit", [
    lambda m: m["params"][0].update(shape=[255]),
    lambda m: m["params"][0].update(dtype="float64"),
    lambda m: m["params"].pop(),
    lambda m: m["params"].append({"name": "ghost", "dtype": "float32", "shape": [1]}),
    lambda m: m.update(seq=0),
    lambda m: m.update(format_version=2),
    lambda m: m.update(tensor_file="../../elsewhere.safetensors"),
], ids=["shape", "dtype", "unlisted-tensor", "missing-tensor", "wrong-seq", "future-format", "escaping-path"])
def test_manifest_that_disagrees_with_its_tensors_is_skipped(tmp_path, caplog, edit):
    store = CheckpointStore(tmp_path)
    store.save(make(0, value=1.0))
    store.save(make(1, value=2.0))
    _rewrite_manifest(tmp_path / JOB / "ckpt-00000001.json", edit)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_latest(JOB).seq == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_all_checkpoints_damaged_gives_none(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    for seq in range(3):
        store.save(make(seq))
        _flip_bit(tmp_path / JOB / f"ckpt-{seq:08d}.safetensors")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load_latest(JOB) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


# --- a real crash -------------------------------------------------------------------

CRASH = r"""
import os, signal, sys
import torch
from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint

directory, job_id, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_replace, calls = os.replace, []

def replace_or_die(src, dst):
    calls.append(dst)
    if len(calls) == crash_at:  # the file is written and fsynced, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace_or_die
w = torch.full((1 << 16,), 2.0)
CheckpointStore(directory).save(JobCheckpoint(job_id, 1, {"w": w, "b": -w[:3]}, meta={"value": 2.0}))
"""


@pytest.mark.parametrize("crash_at, leftover", [
    (1, ".ckpt-00000001.safetensors."),  # before the tensor file's rename
    (2, ".ckpt-00000001.json."),  # tensor file in place, before the manifest's rename
])
def test_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, crash_at, leftover):
    store = CheckpointStore(tmp_path)
    store.save(make(0, value=1.0))
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), JOB, str(crash_at)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = files(store)
    assert "ckpt-00000001.json" not in left
    assert any(name.startswith(leftover) and name.endswith(".tmp") for name in left)

    assert store.job_ids() == [JOB]
    got = store.load_latest(JOB)
    assert got.seq == 0 and torch.all(got.params["w"] == 1.0)
    seq = store.next_seq(JOB)
    assert seq == crash_at  # an orphan tensor file (crash_at=2) still claims seq 1
    store.save(make(seq, value=3.0))
    assert files(store) == {f"ckpt-{s:08d}.{ext}" for s in (0, seq) for ext in ("json", "safetensors")}
    assert torch.all(store.load_latest(JOB).params["w"] == 3.0)
