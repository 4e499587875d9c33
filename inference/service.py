"""gRPC adapter of the inference server: decode, hand to the pipeline, encode.

Every method receives raw bytes and decodes them with :func:`psgrid.rpc.decode`
(the stream frame by frame), so an undecodable request is INVALID_ARGUMENT and
never gRPC's own error. A unary ``Predict`` waits in its handler thread for its
ticket; a ``PredictStream`` reads requests on a thread of its own and answers
each as its ticket completes. A call that ends early (cancelled, deadline) drops its
tickets at once, freeing their places in the pipeline.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from psgrid.errors import MalformedRequest, PsgridError, Unavailable
from psgrid.inference import wire
from psgrid.inference.batcher import Ticket, TicketState
from psgrid.inference.models import ModelRegistry
from psgrid.inference.pipeline import Pipeline
from psgrid.rpc import decode, stream_handler, translate_errors, unary_handler
from psgrid.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "psgrid.v1.Inference"
_END = object()


def _deadline(context: grpc.ServicerContext) -> tuple[float | None, float | None]:
    """(seconds left, monotonic deadline) of a call; (None, None) without a deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None, None
    return remaining, time.monotonic() + remaining


class InferenceService:
    """psgrid.v1.Inference over a :class:`Pipeline` and a :class:`ModelRegistry`."""

    def __init__(self, pipeline: Pipeline, registry: ModelRegistry, max_request_bytes: int):
        self.pipeline, self.registry = pipeline, registry
        self.max_request_bytes = max_request_bytes

    def admit(self, request: pb.PredictRequest, deadline: float | None, on_done=None) -> Ticket:
        """A validated ticket for ``request`` (not yet submitted)."""
        if not self.registry.loaded:
            raise Unavailable("no model version is loaded yet")
        examples = wire.array_from_proto(request.inputs, request.data, self.max_request_bytes)
        wire.check_examples(examples, self.registry.input_spec)
        return Ticket(examples, examples.shape[0], deadline, on_done, tag=request.id)

    @translate_errors
    def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        remaining, deadline = _deadline(context)
        ticket = self.admit(request, deadline)
        self.pipeline.submit(ticket)
        if not context.add_callback(lambda: self.pipeline.cancel(ticket)):
            self.pipeline.cancel(ticket)  # the call already ended
        try:
            outputs, version = ticket.wait(remaining)
        finally:
            self.pipeline.cancel(ticket)  # a no-op once answered; frees the place otherwise
        return wire.encode_response(request.id, outputs, version)

    @translate_errors
    def PredictStream(self, request_iterator: Iterator[bytes], context) -> Iterator[pb.PredictResponse]:
        stream = _Stream(self, _deadline(context)[1])
        if not context.add_callback(stream.cancel):
            return
        threading.Thread(target=stream.read, args=(request_iterator,), name="serve-stream", daemon=True).start()
        yield from stream.responses()

    @translate_errors
    def GetServingStatus(self, request: pb.GetServingStatusRequest, context) -> pb.GetServingStatusResponse:
        policy = self.pipeline.batcher.policy
        return wire.status_to_proto(self.registry.status(), self.pipeline.stats(),
                                    policy.max_batch_size, policy.batch_timeout_s)


class _Stream:
    """One PredictStream call: its open tickets and the answers ready to send.

    The stream's responses end once the requests have ended and every ticket
    is answered, or at once when the call is cancelled.
    """

    def __init__(self, service: InferenceService, deadline: float | None):
        self._service, self._deadline = service, deadline
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open: set[Ticket] = set()
        self._reading = True

    def read(self, frames: Iterator[bytes]) -> None:
        """Decode and submit each raw request frame; an undecodable one ends the call."""
        try:
            for frame in frames:
                self._submit(decode(pb.PredictRequest, frame))
        except grpc.RpcError:
            pass  # the call ended (cancelled or past its deadline): cancel() cleans up
        except MalformedRequest as exc:
            logger.info("[serve] prediction stream refused: %s", exc)
            self._out.put(exc)  # responses() raises it: the call ends INVALID_ARGUMENT
        except Exception:  # noqa: BLE001 - a reader thread must not die silently
            logger.exception("[serve] reading a prediction stream failed")
        finally:
            with self._lock:
                self._reading = False
                finished = not self._open
            if finished:
                self._out.put(_END)

    def _submit(self, request: pb.PredictRequest) -> None:
        ticket = None
        try:
            ticket = self._service.admit(request, self._deadline, on_done=self._done)
            with self._lock:
                self._open.add(ticket)
            self._service.pipeline.submit(ticket)
        except PsgridError as exc:
            if ticket is not None:
                with self._lock:
                    self._open.discard(ticket)
            self._out.put(wire.encode_error(request.id, exc))

    def _done(self, ticket: Ticket) -> None:
        """Runs in the thread that resolved the ticket: hand it to the sender."""
        if ticket.state is TicketState.DONE:
            self._out.put(ticket)
        with self._lock:
            self._open.discard(ticket)
            finished = not self._reading and not self._open
        if finished:
            self._out.put(_END)

    def responses(self) -> Iterator[pb.PredictResponse]:
        while (item := self._out.get()) is not _END:
            if isinstance(item, MalformedRequest):
                raise item
            if not isinstance(item, Ticket):
                yield item
            elif item.error is not None:
                yield wire.encode_error(item.tag, item.error)
            else:
                yield wire.encode_response(item.tag, item.result, item.version)

    def cancel(self) -> None:
        """The call is over: drop every open ticket and end the responses."""
        with self._lock:
            doomed = list(self._open)
        for ticket in doomed:
            self._service.pipeline.cancel(ticket)
        self._out.put(_END)


def handlers(service: InferenceService) -> list[grpc.GenericRpcHandler]:
    """The generic handler of psgrid.v1.Inference, for ``server.add_generic_rpc_handlers``."""
    return [grpc.method_handlers_generic_handler(SERVICE, {
        "Predict": unary_handler(service.Predict, pb.PredictRequest, pb.PredictResponse),
        "PredictStream": stream_handler(service.PredictStream, True, pb.PredictResponse.SerializeToString),
        "GetServingStatus": unary_handler(service.GetServingStatus, pb.GetServingStatusRequest,
                                   pb.GetServingStatusResponse),
    })]

