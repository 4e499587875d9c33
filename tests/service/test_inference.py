"""The Inference service over real gRPC on 127.0.0.1:0: correctness, batching,
overload, cancellation, bad input and hot reload."""
from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
import weakref

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgrid import messages, rpc
from psgrid.errors import (
    DeadlineExceeded,
    DtypeMismatch,
    InvalidArgument,
    MalformedPayload,
    Overloaded,
    PayloadTooLarge,
    ResourceExhausted,
    ShapeMismatch,
    Unavailable,
)
from psgrid.inference import wire
from psgrid.inference.app import InferenceApp
from psgrid.inference.client import InferenceClient
from psgrid.inference.config import ServeConfig
from psgrid.inference.models import Candidate, ModelRegistry
from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
from psgrid.spec import JobSpec
from psgrid.build import build_model

from helpers.inproc import make_rig, spec as ps_spec
from helpers.wait import wait_until

SPEC = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits",
               model_kwargs={"in_features": 8, "hidden": 16, "classes": 3}, steps=1)
JOB = "job-serve"
ATOL = 1e-6


def make_params(seed: int, spec: JobSpec = SPEC) -> dict[str, torch.Tensor]:
    model = build_model(spec.replace(seed=seed))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def forward(params: dict[str, torch.Tensor], x: torch.Tensor, spec: JobSpec = SPEC) -> torch.Tensor:
    model = build_model(spec)
    model.load_state_dict(params, strict=False)
    with torch.inference_mode():
        return model.eval()(x)


class Versions:
    """Publishes model versions as checkpoints, the way ``psgrid server --checkpoint-dir`` does."""

    def __init__(self, root):
        self.root, self.store = root, CheckpointStore(root, keep=10)
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def publish(self, version: int, params=None, spec: JobSpec = SPEC):
        params = make_params(version, spec) if params is None else params
        self.params[version] = params
        meta = {"spec": json_format.MessageToJson(messages.spec_to_proto(spec)), "version": version}
        return self.store.save(JobCheckpoint(JOB, self.store.next_seq(JOB), params, meta=meta))

    def expected(self, version: int, x: torch.Tensor) -> torch.Tensor:
        return forward(self.params[version], x)


class Gate:
    """Preprocessing that, once closed, holds every request until opened; records each
    request's marker (its first value)."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self.seen: list[float] = []

    def close(self):
        self._open.clear()

    def open(self):
        self._open.set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(x[0, 0]))
        self._open.wait(30)
        return x


def marked(marker: float, rows: int = 1) -> torch.Tensor:
    x = torch.randn(rows, 8)
    x[0, 0] = marker
    return x


@pytest.fixture
def versions(tmp_path):
    return Versions(tmp_path / "checkpoints")


@pytest.fixture
def serve(versions):
    """Start in-process inference servers on 127.0.0.1:0 following ``versions``; stop them at teardown."""
    started = []

    def start(first_version: bool = True, preprocess_fn=None, retry_for_s: float = 10.0, **config):
        if first_version and 1 not in versions.params:
            versions.publish(1)
        cfg = ServeConfig(checkpoint_dir=str(versions.root), poll_interval_s=0.05, device="cpu", **config)
        app = InferenceApp(cfg, preprocess=preprocess_fn).start()
        client = InferenceClient(app.address, timeout_s=10, retry_for_s=retry_for_s)
        started.append((app, client))
        if first_version:
            wait_until(lambda: client.status().version >= 1, timeout=30, message="the first version")
        return app, client

    yield start
    for app, client in started:
        client.close()
        app.stop(grace=0.5)


# --- correctness ------------------------------------------------------------------------------


def test_predictions_equal_the_models_forward_pass(serve, versions):
    _, client = serve()
    for rows in (1, 5, 100, 150):
        x = torch.randn(rows, 8)
        pred = client.predict(x)
        assert pred.version == 1
        torch.testing.assert_close(pred.outputs, versions.expected(1, x), atol=ATOL, rtol=0)


def test_concurrent_requests_share_one_batch_and_rows_go_home(serve, versions):
    # The batch goes only when full (24 examples), so all 8 requests must share it.
    _, client = serve(max_batch_size=24, batch_timeout_s=30.0)
    before = client.status().batches
    inputs = [torch.randn(3, 8) + i for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        preds = list(pool.map(client.predict, inputs))
    for x, pred in zip(inputs, preds):
        torch.testing.assert_close(pred.outputs, versions.expected(1, x), atol=ATOL, rtol=0)
    status = client.status()
    assert status.batches == before + 1 and status.examples >= 24


def test_many_concurrent_callers_each_get_their_own_rows(serve, versions):
    _, client = serve(batch_timeout_s=0.01)
    before = client.status()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(int(torch.randint(1, 5, (1,), generator=g)), 8, generator=g) for _ in range(300)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        preds = list(pool.map(client.predict, inputs))
    for x, pred in zip(inputs, preds):
        assert pred.outputs.shape == (x.shape[0], 3)
        torch.testing.assert_close(pred.outputs, versions.expected(1, x), atol=ATOL, rtol=0)
    after = client.status()
    assert after.requests - before.requests == 300
    assert after.batches - before.batches < 300  # rows of different callers shared batches


def test_a_stream_answers_every_request_in_order(serve, versions):
    _, client = serve()
    inputs = [torch.randn(1 + i % 3, 8) for i in range(40)]
    preds = list(client.predict_stream(iter(inputs), window=8))
    assert len(preds) == 40
    for x, pred in zip(inputs, preds):
        assert pred.version == 1
        torch.testing.assert_close(pred.outputs, versions.expected(1, x), atol=ATOL, rtol=0)


def test_preprocessing_and_features_by_import_path_run_on_every_request(serve, versions):
    _, client = serve(preprocess="torch:neg", features="torch:abs")
    x = torch.randn(6, 8)
    pred = client.predict(x)
    torch.testing.assert_close(pred.outputs, versions.expected(1, x.neg().abs()), atol=ATOL, rtol=0)
    assert not torch.allclose(pred.outputs, versions.expected(1, x))


@pytest.mark.parametrize("config", [
    {},                                                        # no source
    {"checkpoint_dir": "d", "follow_job": "j", "server": "s"},  # two sources
    {"follow_job": "j"},                                       # a job but no server
    {"checkpoint_dir": "d", "preprocess": "not a path"},
    {"checkpoint_dir": "d", "max_batch_size": 0},
    {"checkpoint_dir": "d", "input_dtype": "complex64"},
])
def test_bad_serve_configs_are_refused(config):
    with pytest.raises(ValueError):
        ServeConfig(**config)


def test_health_and_predict_wait_for_the_first_version(serve, versions):
    app, client = serve(first_version=False, retry_for_s=0.0)
    health = health_pb2_grpc.HealthStub(client.channel)

    def health_status():
        return health.Check(health_pb2.HealthCheckRequest(service="psgrid.v1.Inference"), timeout=5).status

    assert health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(Unavailable):
        client.predict(torch.randn(1, 8))
    versions.publish(1)
    wait_until(lambda: health_status() == health_pb2.HealthCheckResponse.SERVING, timeout=30,
               message="SERVING once a version is loaded")
    assert client.predict(torch.randn(1, 8)).version == 1


# --- overload, deadlines and cancellation --------------------------------------------------------


def test_overload_is_refused_at_once_memory_stays_bounded_and_service_recovers(serve, versions):
    gate = Gate()
    _, client = serve(preprocess_fn=gate, preprocess_concurrency=1, queue_capacity=2)
    gate.close()
    pool = concurrent.futures.ThreadPoolExecutor(4)
    held = [pool.submit(client.predict, marked(1.0))]
    wait_until(lambda: 1.0 in gate.seen, timeout=10, message="the first request in preprocessing")
    held += [pool.submit(client.predict, marked(m)) for m in (2.0, 3.0)]
    wait_until(lambda: client.status().waiting.get("preprocess") == 2, timeout=10, message="a full buffer")
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            client.predict(torch.randn(1, 8))
        assert time.monotonic() - started < 1.0
        assert info.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(Overloaded):  # a stream's request is refused the same way
        next(client.predict_stream(iter([torch.randn(1, 8)])))
    status = client.status()
    assert status.queued == 2 and status.rejected == 21  # nothing beyond the bound was kept
    gate.open()
    for future in held:
        assert future.result(timeout=30).version == 1
    x = torch.randn(4, 8)
    torch.testing.assert_close(client.predict(x).outputs, versions.expected(1, x), atol=ATOL, rtol=0)
    pool.shutdown()


def test_callers_past_their_deadline_free_their_places_and_their_results_are_dropped(serve, versions):
    gate = Gate()
    _, client = serve(preprocess_fn=gate, preprocess_concurrency=1, queue_capacity=2)
    gate.close()
    pool = concurrent.futures.ThreadPoolExecutor(6)
    doomed = [pool.submit(client.predict, marked(1.0), timeout=0.5)]
    wait_until(lambda: 1.0 in gate.seen, timeout=10, message="the first request in preprocessing")
    doomed += [pool.submit(client.predict, marked(m), timeout=0.5) for m in (2.0, 3.0)]
    for future in doomed:
        with pytest.raises(DeadlineExceeded):
            future.result(timeout=30)
    wait_until(lambda: client.status().queued == 0, timeout=10, message="the expired requests to leave")
    inputs = [marked(4.0, 2), marked(5.0, 3)]
    fresh = [pool.submit(client.predict, x, timeout=30) for x in inputs]
    wait_until(lambda: client.status().waiting.get("preprocess") == 2, timeout=10,
               message="both new requests admitted into the freed places")
    gate.open()
    for x, future in zip(inputs, fresh):
        torch.testing.assert_close(future.result(timeout=30).outputs, versions.expected(1, x), atol=ATOL, rtol=0)
    assert 2.0 not in gate.seen and 3.0 not in gate.seen  # never processed
    assert client.status().dropped >= 3
    pool.shutdown()


def test_a_cancelled_call_frees_its_place(serve, versions):
    gate = Gate()
    _, client = serve(preprocess_fn=gate, preprocess_concurrency=1, queue_capacity=1)
    gate.close()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    first = pool.submit(client.predict, marked(1.0))
    wait_until(lambda: 1.0 in gate.seen, timeout=10, message="the first request in preprocessing")
    call = client._predict.future(wire.encode_request(marked(2.0)), timeout=30)
    wait_until(lambda: client.status().waiting.get("preprocess") == 1, timeout=10, message="the call queued")
    with pytest.raises(Overloaded):
        client.predict(torch.randn(1, 8))
    call.cancel()
    wait_until(lambda: client.status().queued == 0, timeout=10, message="the cancelled call to leave")
    x = marked(3.0)
    last = pool.submit(client.predict, x)
    gate.open()
    assert first.result(timeout=30).version == 1
    torch.testing.assert_close(last.result(timeout=30).outputs, versions.expected(1, x), atol=ATOL, rtol=0)
    assert 2.0 not in gate.seen
    pool.shutdown()


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("examples, error", [
    (torch.randn(2, 5), ShapeMismatch),
    (torch.randn(2, 8, 1), ShapeMismatch),
    (torch.randn(2, 8, dtype=torch.float64), DtypeMismatch),
    (torch.tensor([[float("nan")] * 8]), InvalidArgument),
    (torch.tensor([[float("inf")] * 8]), InvalidArgument),
    (torch.empty(0, 8), InvalidArgument),
    (torch.randn(200, 8), PayloadTooLarge),          # over max_request_bytes
    (torch.randn(40_000, 8), ResourceExhausted),     # over gRPC's message limit too
])
def test_bad_input_gets_the_matching_error_and_changes_nothing(serve, versions, examples, error):
    _, client = serve(max_request_bytes=4096)
    with pytest.raises(error) as info:
        client.predict(examples)
    code = (grpc.StatusCode.RESOURCE_EXHAUSTED if issubclass(error, ResourceExhausted)
            else grpc.StatusCode.INVALID_ARGUMENT)
    assert info.value.grpc_code == code
    x = torch.randn(3, 8)
    torch.testing.assert_close(client.predict(x).outputs, versions.expected(1, x), atol=ATOL, rtol=0)


def test_bytes_that_do_not_match_their_shape_are_malformed(serve):
    _, client = serve()
    request = wire.encode_request(torch.randn(2, 8))
    request.data = request.data[:-4]
    with pytest.raises(MalformedPayload):
        rpc.call(client._predict, request, timeout=10)


def test_a_bad_request_on_a_stream_raises_after_the_good_ones(serve, versions):
    _, client = serve()
    good = torch.randn(2, 8)
    stream = client.predict_stream(iter([good, torch.randn(1, 3)]), window=1)
    torch.testing.assert_close(next(stream).outputs, versions.expected(1, good), atol=ATOL, rtol=0)
    with pytest.raises(ShapeMismatch):
        next(stream)


# --- hot reload -----------------------------------------------------------------------------------


def test_a_new_version_is_swapped_in_and_the_old_one_released(serve, versions):
    app, client = serve()
    old_module = weakref.ref(app.registry._current.module)
    versions.publish(2)
    wait_until(lambda: client.status().version == 2, timeout=30, message="version 2")
    x = torch.randn(5, 8)
    pred = client.predict(x)
    assert pred.version == 2
    torch.testing.assert_close(pred.outputs, versions.expected(2, x), atol=ATOL, rtol=0)
    assert not torch.allclose(pred.outputs, versions.expected(1, x))
    assert client.status().resident_versions == (2,)
    gc.collect()
    assert old_module() is None


@pytest.mark.parametrize("damage, reason", [
    ("nan", "NaN or Inf"),
    ("shape", "is float32[32, 8], the model has float32[16, 8]"),
    ("architecture", "do not match the served version"),
    ("older", "older than the served"),
    ("corrupt file", "fails verification"),
])
def test_a_bad_new_version_is_refused_and_the_old_one_keeps_answering(serve, versions, damage, reason):
    _, client = serve()
    versions.publish(2)
    wait_until(lambda: client.status().version == 2, timeout=30, message="version 2")
    if damage == "nan":
        params = make_params(3)
        params["0.weight"][0, 0] = float("nan")
        versions.publish(3, params)
    elif damage == "shape":  # parameters that do not fit the job's model
        versions.publish(3, make_params(3, SPEC.replace(model_kwargs={**SPEC.model_kwargs, "hidden": 32})))
    elif damage == "architecture":  # a consistent model, but not the served one's shapes
        versions.publish(3, spec=SPEC.replace(model_kwargs={**SPEC.model_kwargs, "hidden": 32}))
    elif damage == "older":
        versions.publish(1)
    else:
        path = versions.publish(3)
        tensors = path.with_suffix(".safetensors")
        tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")
    status = wait_until(lambda: (s := client.status()).refusals and s, timeout=30, message="a refusal")
    assert reason in status.refusals[-1].reason
    assert status.version == 2
    x = torch.randn(4, 8)
    pred = client.predict(x)
    assert pred.version == 2
    torch.testing.assert_close(pred.outputs, versions.expected(2, x), atol=ATOL, rtol=0)


def test_a_batch_in_flight_finishes_on_its_version_and_then_frees_it(versions):
    registry = ModelRegistry("cpu")
    params = {v: make_params(v) for v in (1, 2)}
    assert registry.offer(Candidate(1, SPEC, params[1], "test"))
    x = torch.randn(6, 8)
    with registry.lease() as in_flight:  # a batch that started on version 1
        assert registry.offer(Candidate(2, SPEC, params[2], "test"))
        assert registry.version == 2 and in_flight.version == 1
        assert registry.status().resident == (1, 2)  # still in use: not released
        torch.testing.assert_close(in_flight.forward(x), forward(params[1], x), atol=ATOL, rtol=0)
        old = weakref.ref(in_flight.module)
    assert registry.status().resident == (2,)
    gc.collect()
    assert old() is None
    outputs, version = registry.run_batch([x[:2].numpy(), x[2:].numpy()])
    assert version == 2 and [o.shape for o in outputs] == [(2, 3), (4, 3)]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(outputs)), forward(params[2], x), atol=ATOL, rtol=0)


def test_follows_a_running_job_on_a_parameter_server(server):
    params = {"weight": torch.randn(1, 8), "bias": torch.randn(1)}
    rig = make_rig(server.port, ps_spec(), params=params)
    config = ServeConfig(follow_job=rig.job_id, server=f"127.0.0.1:{server.port}",
                         poll_interval_s=0.05, device="cpu")
    app = InferenceApp(config).start()
    client = InferenceClient(app.address, timeout_s=10)
    try:
        x = torch.randn(5, 8)
        for seq in range(2):
            rig.push(0, seq, {"weight": torch.full((1, 8), 0.1), "bias": torch.full((1,), 0.1)})
            version = rig.version()
            wait_until(lambda: client.status().version == version, timeout=30, message=f"version {version}")
            pred = client.predict(x)
            current = rig.params()
            expected = x @ current["weight"].T + current["bias"]
            assert pred.version == version
            torch.testing.assert_close(pred.outputs, expected, atol=ATOL, rtol=0)
    finally:
        client.close()
        app.stop(grace=0.5)


# --- security and the allow-list ----------------------------------------------------------------


def test_every_inference_rpc_needs_the_cluster_token(versions):
    from psgrid.errors import Unauthenticated
    from psgrid.security import Security

    versions.publish(1)
    cfg = ServeConfig(checkpoint_dir=str(versions.root), poll_interval_s=0.05, device="cpu")
    app = InferenceApp(cfg, security=Security(token="tok")).start()
    try:
        good = InferenceClient(app.address, timeout_s=10, security=Security(token="tok"))
        wait_until(lambda: good.status().version >= 1, timeout=30, message="the first version")
        x = torch.randn(3, 8)
        torch.testing.assert_close(good.predict(x).outputs, versions.expected(1, x), atol=ATOL, rtol=0)
        for token in (None, "wrong"):
            bad = InferenceClient(app.address, timeout_s=5, retry_for_s=0, security=Security(token=token))
            for call in (lambda: bad.predict(x), lambda: list(bad.predict_stream([x])), bad.status):
                with pytest.raises(Unauthenticated):
                    call()
            bad.close()
        good.close()
    finally:
        app.stop(grace=0.5)


def test_a_version_whose_model_is_outside_the_allow_list_is_refused(serve, versions):
    app, client = serve(allowed_modules=("psgrid.examples",))
    outsider = SPEC.replace(model="helpers.models:slow_mlp", model_kwargs={"in_features": 8, "hidden": 16})
    versions.publish(2, params=make_params(2), spec=outsider)
    wait_until(lambda: client.status().refusals, timeout=30, message="the refusal")
    reason = client.status().refusals[-1].reason
    assert "allow-list" in reason and "--allow-modules helpers" in reason  # names the flag that fixes it
    assert client.predict(torch.randn(2, 8)).version == 1


def test_the_serving_heap_is_frozen_out_of_full_collections():
    """``serve`` freezes what is alive once it serves: a full collection then walks only
    newer objects (not torch's and gRPC's ~180k), so it no longer stalls every thread."""
    from psgrid.inference.app import freeze_heap

    gc.unfreeze()
    alive = [object()]  # a container the collector tracks
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 1000
        gc.collect()
        assert not any(o is alive for o in gc.get_objects())  # no generation holds it any more
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())
