"""Drive every method of a psgrid service with random and mutated raw requests.

Used by ``tests/service/test_fuzz.py`` (a bounded, seeded run) and by
``scripts/fuzz_rpc.py`` (a long one). Requests are raw bytes sent with
``channel.unary_unary(path)`` and friends, no serializers, so nothing on the
client side decodes or validates them. Mutations:

* random bytes;
* a valid message of the method's request type with random field values (from the
  descriptor: huge and negative ints, long and unicode strings, NaN and inf floats,
  unknown enum values, ids the server actually holds);
* a valid encoding truncated or bit-flipped;
* a valid message of another method's request type.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory

FD = d.FieldDescriptor
INTS = [0, 1, -1, 2, 7, 255, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e38, 3e38, -3e38, 1e308, float("nan"), float("inf"), float("-inf")]
STRINGS = ["", "a", "x" * 300, "x" * 20_000, "ü😀漢字", "..", "../../etc", "-rf", "a/b", "job\n", "\x00",
           "psgrid.examples.models:mlp", "psgrid.examples.datasets:digits", "{}", "[" * 2000, "9" * 5000]
_I32, _I64, _U32, _U64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1), (0, 2**32 - 1), (0, 2**64 - 1)
RANGES = {  # (min, max) of each integer field type; enums are open, any int32 goes
    FD.TYPE_INT32: _I32, FD.TYPE_SINT32: _I32, FD.TYPE_SFIXED32: _I32, FD.TYPE_ENUM: _I32,
    FD.TYPE_INT64: _I64, FD.TYPE_SINT64: _I64, FD.TYPE_SFIXED64: _I64,
    FD.TYPE_UINT32: _U32, FD.TYPE_FIXED32: _U32, FD.TYPE_UINT64: _U64, FD.TYPE_FIXED64: _U64,
}


def _cls(descriptor: d.Descriptor) -> type:
    return message_factory.GetMessageClass(descriptor)


@dataclasses.dataclass(frozen=True)
class Method:
    path: str
    request_cls: type
    client_streaming: bool
    server_streaming: bool


def methods_of(module, service: str) -> list[Method]:
    """Every method ``service`` declares in the generated ``module``."""
    desc = module.DESCRIPTOR.services_by_name[service]
    return [Method(f"/{desc.full_name}/{m.name}", _cls(m.input_type),
                   m.client_streaming, m.server_streaming) for m in desc.methods]


class Mutator:
    """Seeded source of hostile request bytes; ``known`` strings (real ids) are mixed in."""

    def __init__(self, seed: int, known: Sequence[str] = ()):
        self.rng = random.Random(seed)
        self.strings = [*STRINGS, *known]

    def message(self, cls, depth: int = 0):
        msg = cls()
        for field in cls.DESCRIPTOR.fields:
            if self.rng.random() < 0.3:
                continue
            if field.is_repeated:
                self._repeated(msg, field, depth)
            elif field.type == FD.TYPE_MESSAGE:
                if depth < 3:
                    getattr(msg, field.name).CopyFrom(self.message(_cls(field.message_type), depth + 1))
            else:
                setattr(msg, field.name, self.scalar(field, depth))
        return msg

    def _repeated(self, msg, field, depth: int) -> None:
        n = self.rng.choice([0, 1, 2, 5, 50] if depth == 0 else [0, 1, 2])
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(n):
                key = self.scalar(key_f)
                if value_f.type == FD.TYPE_MESSAGE:
                    if depth < 3:
                        target[key].CopyFrom(self.message(_cls(value_f.message_type), depth + 1))
                else:
                    target[key] = self.scalar(value_f)
        elif field.type == FD.TYPE_MESSAGE:
            for _ in range(n if depth < 3 else 0):
                target.add().CopyFrom(self.message(_cls(field.message_type), depth + 1))
        else:
            target.extend(self.scalar(field, depth) for _ in range(n))

    def scalar(self, field, depth: int = 1):
        r, t = self.rng, field.type
        if t == FD.TYPE_BOOL:
            return r.random() < 0.5
        if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            value = r.choice(FLOATS) if r.random() < 0.6 else r.uniform(-1e6, 1e6)
            fits = t == FD.TYPE_DOUBLE or abs(value) < 3.4e38 or not math.isfinite(value)
            return value if fits else float("inf")
        if t == FD.TYPE_STRING:
            return r.choice(self.strings) if r.random() < 0.7 else "".join(
                chr(r.randrange(0x20, 0x2FFF)) for _ in range(r.randrange(40)))
        if t == FD.TYPE_BYTES:
            return r.randbytes(r.choice([0, 1, 16, 1000, 70_000] if depth == 0 else [0, 1, 16]))
        lo, hi = RANGES[t]
        if r.random() < 0.6:
            return min(hi, max(lo, r.choice(INTS)))
        return r.randint(lo, hi)

    def frame(self, method: Method, others: Sequence[Method]) -> bytes:
        """One hostile request frame for ``method``."""
        r = self.rng
        kind = r.randrange(5)
        if kind == 0:
            return r.randbytes(r.choice([1, 2, 8, 64, 1000, 10_000]))
        if kind == 1:
            return self.message(method.request_cls).SerializeToString()
        valid = self.message(method.request_cls).SerializeToString() or b"\x08\x01"
        if kind == 2:
            return valid[: r.randrange(len(valid))] + (b"\xff" if r.random() < 0.5 else b"")
        if kind == 3:
            flipped = bytearray(valid)
            for _ in range(r.randint(1, 3)):
                flipped[r.randrange(len(flipped))] ^= 1 << r.randrange(8)
            return bytes(flipped)
        return self.message(r.choice(others).request_cls).SerializeToString()


@dataclasses.dataclass
class Figures:
    """What a fuzz run saw: messages sent and the status codes they got, by token or not."""

    messages: int = 0
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokenless: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    details: dict = dataclasses.field(default_factory=dict)  # first detail seen per (method, code)


def _call(channel: grpc.Channel, method: Method, frames: list[bytes], metadata,
          timeout: float) -> tuple[grpc.StatusCode, str]:
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    fn = kind[(method.client_streaming, method.server_streaming)](method.path)
    request = iter(frames) if method.client_streaming else frames[0]
    try:
        result = fn(request, timeout=timeout, metadata=metadata)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def fuzz(address: str, methods: Sequence[Method], count: int, seed: int, token: str | None,
         known: Sequence[str] = (), figures: Figures | None = None, timeout: float = 1.0) -> Figures:
    """Send ``count`` hostile requests spread over ``methods``; every other one without ``token``.

    With no token, all go without one. Server-streaming calls get ``timeout``
    (a watch on a real job streams until its deadline); unary ones twice that.
    """
    figures = figures or Figures()
    mutator = Mutator(seed, known)
    with_token = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        for i in range(count):
            method = mutator.rng.choice(methods)
            n = mutator.rng.choice([1, 1, 2, 3]) if method.client_streaming else 1
            frames = [mutator.frame(method, methods) for _ in range(n)]
            tokenless = not token or i % 2 == 1
            code, detail = _call(channel, method, frames, () if tokenless else with_token,
                                 timeout if method.server_streaming else 2 * timeout)
            figures.messages += 1
            (figures.tokenless if tokenless else figures.codes)[code.name] += 1
            figures.details.setdefault((method.path, code.name), re.sub(r"\s+", " ", detail or "")[:200])
    return figures


def rss_mb() -> float:
    """This process's resident set size, in MB (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- targets: in-process, token-protected servers of each service --------------------------------


@dataclasses.dataclass
class Target:
    """A started server to fuzz: its address, methods, the ids it holds, and a check for after.

    ``intact()`` is true when the server still serves and its parameters are bit-identical.
    """

    address: str
    methods: list[Method]
    known: list[str]
    intact: Callable[[], bool]


@contextlib.contextmanager
def parameter_server(token: str) -> Iterator[Target]:
    """A parameter server with one job (its parameters fetched before and after)."""
    import torch

    from psgrid.security import Security
    from psgrid.server.app import ParameterServerApp
    from psgrid.server.config import ServerConfig
    from psgrid.v1 import job_service_pb2, parameter_server_pb2

    from helpers.inproc import make_rig

    app = ParameterServerApp(ServerConfig(host="127.0.0.1", port=0), Security(token=token)).start()
    try:
        rig = make_rig(app.port, security=Security(token=token))
        before = rig.params()

        def intact() -> bool:
            after = rig.params()  # a valid call: the server still serves
            return after.keys() == before.keys() and all(
                torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)

        yield Target(f"127.0.0.1:{app.port}",
                     methods_of(parameter_server_pb2, "ParameterServer") + methods_of(job_service_pb2, "JobService"),
                     [rig.job_id, *rig.workers, *rig.names], intact)
    finally:
        app.stop(grace=0.5)


class NoNodes:
    """A supervisor with no nodes: all the Supervisor adapter calls."""

    def nodes(self):
        return []

    def restart_node(self, name):
        from psgrid.errors import UnknownNode

        raise UnknownNode(name)


@contextlib.contextmanager
def supervisor(token: str) -> Iterator[Target]:
    """A Supervisor service over a supervisor with no nodes."""
    from psgrid.security import Security
    from psgrid.supervisor.service import SupervisorServer
    from psgrid.supervisor.supervisor_client import SupervisorClient
    from psgrid.v1 import supervisor_pb2

    server = SupervisorServer(NoNodes(), security=Security(token=token)).start()
    address = f"127.0.0.1:{server.port}"
    try:
        with SupervisorClient(address, security=Security(token=token)) as client:
            yield Target(address, methods_of(supervisor_pb2, "Supervisor"), ["ps", "worker-0"],
                         lambda: tuple(client.nodes()) == ())
    finally:
        server.stop(0.5)


@contextlib.contextmanager
def inference(token: str, root: str) -> Iterator[Target]:
    """An inference server serving one small MLP from a checkpoint under ``root``."""
    import torch
    from google.protobuf import json_format

    from psgrid import messages
    from psgrid.build import build_model
    from psgrid.inference.app import InferenceApp
    from psgrid.inference.client import InferenceClient
    from psgrid.inference.config import ServeConfig
    from psgrid.security import Security
    from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
    from psgrid.spec import JobSpec
    from psgrid.v1 import inference_pb2

    from helpers.wait import wait_until

    spec = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits",
                   model_kwargs={"in_features": 8, "hidden": 16, "classes": 3}, steps=1)
    params = {n: p.detach().clone() for n, p in build_model(spec).named_parameters()}
    meta = {"spec": json_format.MessageToJson(messages.spec_to_proto(spec)), "version": 1}
    store = CheckpointStore(root, keep=2)
    store.save(JobCheckpoint("job-serve", store.next_seq("job-serve"), params, meta=meta))
    cfg = ServeConfig(checkpoint_dir=str(root), poll_interval_s=0.05, device="cpu", max_request_bytes=1 << 16)
    app = InferenceApp(cfg, security=Security(token=token)).start()
    client = InferenceClient(app.address, timeout_s=10, security=Security(token=token))
    try:
        wait_until(lambda: client.status().version >= 1, timeout=30, message="the first version")
        x = torch.randn(3, 8)
        expected = client.predict(x).outputs
        yield Target(app.address, methods_of(inference_pb2, "Inference"), ["job-serve"],
                     lambda: torch.equal(client.predict(x).outputs, expected))
    finally:
        client.close()
        app.stop(grace=0.5)


def run(target: Target, count: int, seed: int, token: str, warm_up: int = 300) -> tuple[Figures, float, float]:
    """Warm up, then fuzz ``count`` messages: the figures and the RSS (MB) before and after."""
    fuzz(target.address, target.methods, warm_up, seed + 1, token, target.known)
    before = rss_mb()
    figures = fuzz(target.address, target.methods, count, seed, token, target.known)
    return figures, before, rss_mb()
