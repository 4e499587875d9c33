"""The digits example keeps its prepared split on disk: a fresh worker's first job skips scikit-learn."""
from __future__ import annotations

import subprocess
import sys

import torch

import psgrid.examples.datasets as datasets

FIELDS = ("train_x", "train_y", "test_x", "test_y")


def test_a_cached_split_is_the_prepared_one_and_a_damaged_file_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path)
    first = datasets.digits(split_seed=5)
    [path] = tmp_path.glob("digits-*-5-*.safetensors")
    again = datasets.digits(split_seed=5)
    fresh = datasets._prepare_digits(0.2, 5)
    for name in FIELDS:
        assert torch.equal(getattr(first, name), fresh[name]) and torch.equal(getattr(again, name), fresh[name])
    path.write_bytes(b"not a safetensors file")
    damaged = datasets.digits(split_seed=5)
    assert torch.equal(damaged.train_x, fresh["train_x"])
    assert datasets._read_cached(path) is not None  # written again, whole
    assert not list(tmp_path.glob("*.tmp"))
    uncached = datasets.digits(split_seed=6, cache=False)
    assert not list(tmp_path.glob("digits-*-6-*")) and uncached.train_x.shape[1] == 64


def test_a_cache_hit_imports_no_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path)
    datasets.digits(split_seed=7)  # prepared here, then read by a fresh process
    code = ("import sys, pathlib\n"
            "import psgrid.examples.datasets as d\n"
            f"d.CACHE_DIR = pathlib.Path({str(tmp_path)!r})\n"
            "d.digits(split_seed=7)\n"
            "print('sklearn' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]
