"""A worker's calls and a stop: a training pull waits in slices, and a stop ends it at once."""
from __future__ import annotations

import threading
import time

import torch

from psgrid.errors import Stopping
from psgrid.worker import ps_client

from helpers.inproc import make_rig, spec
from helpers.wait import wait_until


def ones(v: float):
    return {"w": torch.full((4, 3), v), "b": torch.full((4,), v)}


def pull_in_background(rig, worker: int, clock: int) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def pull():
        try:
            got["pulled"] = rig.pull(worker, clock)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            got["error"] = exc
        got["at"] = time.monotonic()

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    return thread, got


def test_a_training_pull_asks_again_after_each_slice_until_the_round_is_complete(server, monkeypatch):
    monkeypatch.setattr(ps_client, "PULL_SLICE_S", 0.2)
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    for worker in (0, 1):
        rig.pull(worker, 0)
    rig.push(0, 0, ones(1.0))
    puller, got = pull_in_background(rig, 0, 1)
    puller.join(1.0)  # five slices, each answered NotReady by the server
    assert puller.is_alive() and not got, got
    rig.push(1, 0, ones(1.0))
    puller.join(10)
    assert got["pulled"].step == 1, got


def test_a_stop_ends_a_waiting_pull_at_once(server):
    rig = make_rig(server.port, spec(num_workers=2, staleness=0))
    for worker in (0, 1):
        rig.pull(worker, 0)
    rig.push(0, 0, ones(1.0))
    puller, got = pull_in_background(rig, 0, 1)
    puller.join(0.5)
    assert puller.is_alive()
    stopped = time.monotonic()
    rig.ps.stop.set()
    rig.ps.close()  # as the worker does: cancels the call in flight
    wait_until(lambda: not puller.is_alive(), 5, message="the pull to end")
    assert isinstance(got.get("error"), Stopping), got
    assert got["at"] - stopped < 0.5
