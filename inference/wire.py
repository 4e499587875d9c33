"""The inference service's converter: examples, predictions and status <-> protobuf.

Built on :mod:`psgrid.codec`'s dtype tables. A tensor crosses as a
``TensorSpec`` (dtype, shape, nbytes) and its raw little-endian bytes in a
``bytes`` field: requests are small, so one message each is the fast path.
Decoding validates everything before a byte is copied. On the server a
request's examples are a numpy array (see :mod:`psgrid.inference.arrays`);
the SDK hands users torch tensors.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from psgrid.codec import PROTO_BY_TORCH, TORCH_BY_PROTO
from psgrid.errors import (
    ERRORS_BY_NAME,
    DtypeMismatch,
    InvalidArgument,
    MalformedPayload,
    PayloadTooLarge,
    PsgridError,
    ShapeMismatch,
)
from psgrid.inference import arrays
from psgrid.inference.arrays import Array
from psgrid.inference.models import InputSpec, RegistryStatus, Refusal
from psgrid.inference.pipeline import PipelineStats
from psgrid.v1 import inference_pb2 as pb
from psgrid.v1 import tensor_pb2


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The outputs for one request (one row per example) and the version that computed them."""

    outputs: torch.Tensor
    version: int


@dataclasses.dataclass(frozen=True)
class ServingStatus:
    """What an inference server is doing: see ``GetServingStatusResponse`` in inference.proto."""

    version: int
    origin: str
    loaded_unix: float
    refusals: tuple[Refusal, ...]
    resident_versions: tuple[int, ...]
    input: InputSpec | None
    waiting: dict[str, int]
    requests: int
    rejected: int
    dropped: int
    batches: int
    examples: int
    max_batch_size: int
    batch_timeout_s: float

    @property
    def queued(self) -> int:
        return sum(self.waiting.values())


# --- tensors -------------------------------------------------------------------------


def tensor_to_proto(x: Array) -> tuple[tensor_pb2.TensorSpec, bytes]:
    """A CPU tensor's or array's spec and its raw little-endian bytes."""
    dtype = arrays.torch_dtype(x)
    if dtype not in PROTO_BY_TORCH:
        raise DtypeMismatch(f"dtype {x.dtype} cannot cross the wire")
    data = arrays.to_bytes(x)
    return tensor_pb2.TensorSpec(dtype=PROTO_BY_TORCH[dtype], shape=x.shape, nbytes=len(data)), data


def array_from_proto(spec: tensor_pb2.TensorSpec, data: bytes, max_bytes: int) -> Array:
    """A fresh array (a tensor for bfloat16) from a spec and its bytes; raises before copying anything bad.

    PayloadTooLarge over ``max_bytes``; DtypeMismatch for an unknown dtype;
    MalformedPayload when the shape and bytes disagree.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"request of {len(data)} bytes, limit {max_bytes}")
    dtype = TORCH_BY_PROTO.get(spec.dtype)
    if dtype is None:
        raise DtypeMismatch(f"unknown dtype {spec.dtype}")
    shape = tuple(spec.shape)
    if not shape or any(d < 0 for d in shape):
        raise MalformedPayload(f"shape {list(shape)}: needs a first (examples) dimension and no negative ones")
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise PayloadTooLarge(f"shape {list(shape)} of {dtype} is {expected} bytes, limit {max_bytes}")
    if spec.nbytes != expected or len(data) != expected:
        raise MalformedPayload(f"shape {list(shape)} of {dtype} is {expected} bytes; "
                               f"nbytes says {spec.nbytes} and {len(data)} came")
    return arrays.from_bytes(data, dtype, shape)


def check_examples(examples: Array, spec: InputSpec | None) -> None:
    """Raise unless ``examples`` are n >= 1 finite examples of the served shape and dtype."""
    if examples.shape[0] < 1:
        raise InvalidArgument("a request carries at least one example")
    if spec is not None:
        dtype = arrays.torch_dtype(examples)
        if dtype != spec.dtype:
            raise DtypeMismatch(f"examples are {dtype}, the model takes {spec.dtype}")
        if tuple(examples.shape[1:]) != spec.shape:
            raise ShapeMismatch(f"each example has shape {list(examples.shape[1:])}, "
                                f"the model takes {list(spec.shape)}")
    if not arrays.all_finite(examples):
        raise InvalidArgument("the examples hold NaN or Inf")


# --- requests and responses -------------------------------------------------------------


def encode_request(examples: Array, request_id: int = 0) -> pb.PredictRequest:
    spec, data = tensor_to_proto(examples)
    return pb.PredictRequest(inputs=spec, data=data, id=request_id)


def encode_response(request_id: int, outputs: Array, version: int) -> pb.PredictResponse:
    spec, data = tensor_to_proto(outputs)
    return pb.PredictResponse(outputs=spec, data=data, model_version=version, id=request_id)


def encode_error(request_id: int, error: PsgridError) -> pb.PredictResponse:
    return pb.PredictResponse(id=request_id, error=pb.PredictError(
        code=error.code, error=type(error).__name__, message=str(error)))


def decode_response(msg: pb.PredictResponse) -> Prediction:
    """The prediction in a response; raises the psgrid error a stream response carries."""
    if msg.HasField("error"):
        raise error_from_proto(msg.error)
    outputs = array_from_proto(msg.outputs, msg.data, max_bytes=max(len(msg.data), 1))
    return Prediction(arrays.to_torch(outputs), msg.model_version)


def error_from_proto(msg: pb.PredictError) -> PsgridError:
    cls = ERRORS_BY_NAME.get(msg.error)
    if cls is None or cls.code != msg.code:
        cls = next((c for c in ERRORS_BY_NAME.values() if c.code == msg.code), PsgridError)
    return cls(msg.message or msg.code)


# --- status ------------------------------------------------------------------------------


def status_to_proto(registry: RegistryStatus, stats: PipelineStats, max_batch_size: int,
                    batch_timeout_s: float) -> pb.GetServingStatusResponse:
    batches = stats.batches
    msg = pb.GetServingStatusResponse(
        model_version=registry.version, origin=registry.origin, loaded_unix=registry.loaded_unix,
        refusals=[pb.ModelRefusal(version=r.version, origin=r.origin, reason=r.reason,
                                  time_unix=r.time_unix) for r in registry.refusals],
        resident_versions=registry.resident, waiting=stats.waiting, requests=batches.requests,
        rejected=stats.rejected, dropped=stats.dropped, batches=batches.batches,
        examples=batches.examples, max_batch_size=max_batch_size, batch_timeout_s=batch_timeout_s,
    )
    if registry.input_spec is not None:
        spec = registry.input_spec
        msg.input.CopyFrom(tensor_pb2.TensorSpec(dtype=PROTO_BY_TORCH[spec.dtype], shape=spec.shape))
    return msg


def status_from_proto(msg: pb.GetServingStatusResponse) -> ServingStatus:
    input_spec = None
    if msg.HasField("input") and msg.input.dtype in TORCH_BY_PROTO:
        input_spec = InputSpec(tuple(msg.input.shape), TORCH_BY_PROTO[msg.input.dtype])
    return ServingStatus(
        version=msg.model_version, origin=msg.origin, loaded_unix=msg.loaded_unix,
        refusals=tuple(Refusal(r.version, r.origin, r.reason, r.time_unix) for r in msg.refusals),
        resident_versions=tuple(msg.resident_versions), input=input_spec, waiting=dict(msg.waiting),
        requests=msg.requests, rejected=msg.rejected, dropped=msg.dropped, batches=msg.batches,
        examples=msg.examples, max_batch_size=msg.max_batch_size, batch_timeout_s=msg.batch_timeout_s,
    )
