"""The SDK's side of the Inference service: the only gRPC on the client side of serving.

    with InferenceClient("127.0.0.1:7080") as client:
        pred = client.predict(x)          # x: [n, *example_shape]
        pred.outputs, pred.version
        for pred in client.predict_stream(many_xs):
            ...

Every failure raises a :mod:`psgrid.errors` exception (``Overloaded``,
``ShapeMismatch``, ``PayloadTooLarge``, ...); never ``grpc.RpcError``.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import torch

from psgrid.security import Security
from psgrid import rpc
from psgrid.inference import wire
from psgrid.inference.wire import Prediction, ServingStatus
from psgrid.v1 import inference_pb2 as pb

__all__ = ["InferenceClient", "Prediction", "ServingStatus"]

_SERVICE = "/psgrid.v1.Inference/"
#: Predictions can be larger than requests; let them through.
_MAX_RESPONSE_BYTES = 256 << 20


class InferenceClient:
    """Typed calls of psgrid.v1.Inference at ``address`` ("host:port").

    Calls are retried on UNAVAILABLE (the server starting, or no model version
    loaded yet) for ``retry_for_s``; never on RESOURCE_EXHAUSTED or bad input.
    ``security`` carries the cluster token and TLS files, as for the other services.
    """

    def __init__(self, address: str, timeout_s: float = 30.0, retry_for_s: float = 10.0,
                 security: Security | None = None):
        self.address, self.timeout_s, self.retry_for_s = address, timeout_s, retry_for_s
        options = [("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES)]
        self.channel = rpc.make_channel(address, options, security=security)
        self._predict = self.channel.unary_unary(
            _SERVICE + "Predict", request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString)
        self._stream = self.channel.stream_stream(
            _SERVICE + "PredictStream", request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString)
        self._status = self.channel.unary_unary(
            _SERVICE + "GetServingStatus", request_serializer=pb.GetServingStatusRequest.SerializeToString,
            response_deserializer=pb.GetServingStatusResponse.FromString)

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections; DeadlineExceeded when it does not."""
        rpc.wait_for_ready(self.channel, timeout)

    def predict(self, examples: Any, timeout: float | None = None) -> Prediction:
        """Outputs for ``examples`` (shape ``[n, *example_shape]``; one example is ``x[None]``)."""
        request = wire.encode_request(torch.as_tensor(examples))
        reply = rpc.call(self._predict, request, timeout=timeout or self.timeout_s,
                         retry_for=self.retry_for_s)
        return wire.decode_response(reply)

    def predict_stream(self, examples: Iterable[Any], window: int = 64,
                       timeout: float | None = None) -> Iterator[Prediction]:
        """Predictions for each item of ``examples``, in input order, over one stream.

        At most ``window`` requests are in flight at once. The first failed
        request raises its psgrid error and ends the stream.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        slots, done = threading.Semaphore(window), threading.Event()

        def requests() -> Iterator[pb.PredictRequest]:
            for i, item in enumerate(examples):
                slots.acquire()
                if done.is_set():
                    return
                yield wire.encode_request(torch.as_tensor(item), i)

        call = self._stream(requests(), timeout=timeout)
        try:
            yield from _in_order(call, slots)
        except grpc.RpcError as exc:
            raise rpc.to_psgrid_error(exc) from None
        finally:
            done.set()
            slots.release()  # wake the request generator if it waits for a slot
            call.cancel()

    def status(self) -> ServingStatus:
        """The served version, refusals, queue depths and counters."""
        reply = rpc.call(self._status, pb.GetServingStatusRequest(), timeout=self.timeout_s,
                         retry_for=self.retry_for_s)
        return wire.status_from_proto(reply)


def _in_order(responses: Iterable[pb.PredictResponse], slots: threading.Semaphore) -> Iterator[Prediction]:
    """Responses (which arrive as they complete) put back in request order."""
    ready: dict[int, Prediction] = {}
    next_id = 0
    for msg in responses:
        slots.release()
        ready[msg.id] = wire.decode_response(msg)
        while next_id in ready:
            yield ready.pop(next_id)
            next_id += 1
