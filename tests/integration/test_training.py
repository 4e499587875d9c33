"""Real processes: one server and two workers on loopback train real models."""
from __future__ import annotations

import json

import pytest
import torch

from psgrid.errors import JobCancelled
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.examples import spec_path
from psgrid.dataset import ShardSampler
from psgrid.build import build_dataset, build_model

from helpers.wait import wait_until

pytestmark = pytest.mark.slow


def updates(cluster, job_id: str) -> list[dict]:
    lines = (cluster.run_dir / "updates.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["job_id"] == job_id]


@pytest.mark.parametrize("staleness", [0, "inf"])
def test_digits_reaches_95_percent(client, cluster, staleness):
    spec = JobSpec.from_toml(spec_path("digits")).replace(
        staleness=None if staleness == "inf" else staleness)
    job = client.submit(spec)
    info = job.wait(timeout=240, progress=False)
    assert info.state is JobState.SUCCEEDED
    assert info.metrics["test_accuracy"] >= 0.95, info.metrics
    applied = updates(cluster, job.job_id)
    assert len(applied) == 2 * info.total_steps
    assert len({(r["worker_id"], r["seq"]) for r in applied}) == len(applied), "an update was applied twice"
    # the trained model comes back through the SDK and scores the same
    model = job.model()
    assert build_dataset(spec).metrics(model)["test_accuracy"] == pytest.approx(info.metrics["test_accuracy"])


def test_synchronous_mode_is_exact(client):
    steps, batch = 25, 16
    spec = JobSpec(model="psgrid.examples.models:mlp", model_kwargs={"hidden": 32},
                   dataset="psgrid.examples.datasets:digits", steps=steps, batch_size=batch,
                   staleness=0, num_workers=2, seed=3,
                   optimizer=OptimizerSpec("adam", lr=0.01, weight_decay=0.001))
    job = client.submit(spec)
    job.wait(timeout=120, progress=False)
    trained = job.state_dict()

    model, data = build_model(spec), build_dataset(spec)
    samplers = [ShardSampler(len(data.train_x), r, 2, batch, spec.seed) for r in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.001)
    for t in range(steps):
        idx = torch.cat([s.indices(t) for s in samplers])  # the union of both workers' batches
        opt.zero_grad()
        data.loss_fn(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(trained[name], p.detach(), rtol=0, atol=1e-5)
        assert not torch.equal(trained[name], build_model(spec).state_dict()[name])  # it trained


def slow_spec(staleness) -> JobSpec:
    return JobSpec(model="helpers.models:slow_mlp", model_kwargs={"delay_s": 0.02, "hidden": 32},
                   dataset="psgrid.examples.datasets:digits", steps=40, batch_size=16,
                   staleness=staleness, num_workers=2, seed=5, optimizer=OptimizerSpec("sgd", lr=0.05))


def test_ssp_never_applies_a_gradient_beyond_the_bound(client, cluster):
    job = client.submit(slow_spec(2))
    job.wait(timeout=120, progress=False)
    staleness = [r["staleness"] for r in updates(cluster, job.job_id)]
    assert len(staleness) == 80
    assert max(staleness) == 2, "the fast worker should run into the bound, and never past it"
    # control: the same lag without a bound goes far past 2 steps
    free = client.submit(slow_spec(None))
    free.wait(timeout=120, progress=False)
    assert max(r["staleness"] for r in updates(cluster, free.job_id)) > 5


def test_cancel_stops_the_workers_and_frees_them(client):
    job = client.submit(JobSpec.from_toml(spec_path("digits")).replace(epochs=500))
    wait_until(lambda: job.status().step > 5, timeout=60, message="training to start")
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(timeout=30, progress=False)
    # both workers came back: a new two-worker job runs to the end
    after = client.submit(JobSpec.from_toml(spec_path("linear")).replace(epochs=1))
    info = after.wait(timeout=120, progress=False)
    assert info.metrics["weight_error"] < 0.5


def test_bad_model_path_fails_the_job_with_the_reason(client):
    spec = JobSpec.from_toml(spec_path("linear")).replace(model="psgrid.examples.models:no_such_model")
    job = client.submit(spec)
    with pytest.raises(Exception) as info:
        job.wait(timeout=60, progress=False)
    assert "no_such_model" in str(info.value)
    assert job.status().state is JobState.FAILED


def test_history_curves_plot_and_tensorboard(client, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from psgrid.client.curves import plot_history

    spec = JobSpec.from_toml(spec_path("digits")).replace(epochs=4, eval_every=20)
    job = client.submit(spec)
    info = job.wait(timeout=120, progress=False)
    rows = job.history()
    assert rows and rows[-1].metrics["test_accuracy"] == info.metrics["test_accuracy"]
    evaluated = [r for r in rows if "test_accuracy" in r.metrics]
    assert len(evaluated) >= info.total_steps // 20  # periodic evaluations plus the final one
    assert all(a.step <= b.step for a, b in zip(rows, rows[1:]))
    losses = [r.loss for r in rows if r.loss == r.loss]
    assert losses[-1] < losses[0]  # it learned

    png = plot_history(rows, tmp_path / "curve.png", width_px=1000, height_px=400)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1000, 400)

    assert job.write_tensorboard(str(tmp_path / "tb")) == len(rows)
    runs = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(runs[0].parent)).Reload()
    assert {"train/loss", "eval/test_accuracy"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("eval/test_accuracy")[-1].value == pytest.approx(info.metrics["test_accuracy"], abs=1e-6)
