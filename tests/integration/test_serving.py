"""`psgrid serve` as a real process: 10 s of steady load while three new versions roll in."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from google.protobuf import json_format

from psgrid import messages
from psgrid.inference.client import InferenceClient
from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
from psgrid.spec import JobSpec
from psgrid.build import build_model

from helpers.wait import wait_until

pytestmark = pytest.mark.slow

SPEC = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits",
               model_kwargs={"in_features": 8, "hidden": 64, "classes": 4}, steps=1)
JOB = "job-rollout"
LOAD_S = 10.0
ROLLOUTS = (2.5, 5.0, 7.5)  # seconds into the load when versions 2, 3, 4 appear


def publish(store: CheckpointStore, version: int) -> dict[str, torch.Tensor]:
    params = {n: p.detach().clone() for n, p in build_model(SPEC.replace(seed=version)).named_parameters()}
    meta = {"spec": json_format.MessageToJson(messages.spec_to_proto(SPEC)), "version": version}
    store.save(JobCheckpoint(JOB, store.next_seq(JOB), params, meta=meta))
    return params


class Caller(threading.Thread):
    """Sends requests back to back until told to stop; keeps every (x, outputs, version)."""

    def __init__(self, address: str, seed: int, stop: threading.Event, stream: bool = False):
        super().__init__(name=f"caller-{seed}")
        self.address, self.stop, self.stream = address, stop, stream
        self.gen = torch.Generator().manual_seed(seed)
        self.answers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.errors: list[BaseException] = []

    def example(self) -> torch.Tensor:
        return torch.randn(int(torch.randint(1, 4, (1,), generator=self.gen)), 8, generator=self.gen)

    def run(self) -> None:
        client = InferenceClient(self.address, timeout_s=10, retry_for_s=0)
        try:
            if self.stream:
                sent: list[torch.Tensor] = []

                def examples():
                    while not self.stop.is_set():
                        sent.append(self.example())
                        yield sent[-1]

                for i, pred in enumerate(client.predict_stream(examples(), window=4)):
                    self.answers.append((sent[i], pred.outputs, pred.version))
            else:
                while not self.stop.is_set():
                    x = self.example()
                    pred = client.predict(x)
                    self.answers.append((x, pred.outputs, pred.version))
        except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
            self.errors.append(exc)
        finally:
            client.close()


@pytest.fixture
def served(tmp_path):
    """A `psgrid serve` process following a checkpoint directory; SIGTERM at the end."""
    store = CheckpointStore(tmp_path / "checkpoints", keep=10)
    params = {1: publish(store, 1)}
    port_file, log = tmp_path / "serve.port", open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "psgrid.inference.cli", "serve", "--checkpoint-dir", str(store.directory),
         "--port", "0", "--port-file", str(port_file), "--poll-interval", "0.1", "--device", "cpu",
         "--threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, timeout=60, message="the port file")
        assert proc.poll() is None, pathlib.Path(log.name).read_text()
        yield proc, f"127.0.0.1:{int(port_file.read_text())}", store, params
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()


def test_steady_load_rides_through_three_rollouts(served):
    proc, address, store, params = served
    with InferenceClient(address, timeout_s=10, retry_for_s=30) as admin:
        wait_until(lambda: admin.status().version == 1, timeout=60, message="version 1 served")
        stop = threading.Event()
        callers = [Caller(address, seed, stop) for seed in range(6)] + [Caller(address, 99, stop, stream=True)]
        start = time.monotonic()
        for caller in callers:
            caller.start()
        for version, at in zip((2, 3, 4), ROLLOUTS):
            wait_until(lambda: time.monotonic() >= start + at, timeout=LOAD_S + 30, message=f"{at}s of load")
            params[version] = publish(store, version)
            wait_until(lambda: admin.status().version == version, timeout=30, message=f"version {version} served")
        wait_until(lambda: time.monotonic() >= start + LOAD_S, timeout=LOAD_S + 30, message="the end of the load")
        stop.set()
        for caller in callers:
            caller.join(timeout=30)
        status = admin.status()

    assert [c.errors for c in callers] == [[] for _ in callers], "zero failed requests"
    answers = [a for c in callers for a in c.answers]
    assert len(answers) > 500 and status.rejected == 0
    for caller in callers:  # versions never go backwards for a given client
        seen = [v for _, _, v in caller.answers]
        assert seen == sorted(seen), caller.name
    assert {v for _, _, v in answers} == {1, 2, 3, 4}
    assert status.version == 4 and status.resident_versions == (4,)
    for version, version_params in params.items():  # each response is exactly its version's forward pass
        mine = [(x, out) for x, out, v in answers if v == version]
        model = build_model(SPEC)
        model.load_state_dict(version_params, strict=False)
        with torch.inference_mode():
            expected = model.eval()(torch.cat([x for x, _ in mine]))
        torch.testing.assert_close(torch.cat([out for _, out in mine]), expected, atol=1e-6, rtol=0)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, "SIGTERM stops the server cleanly"
