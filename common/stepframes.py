"""The frames of a step stream (``ParameterServer.Step``), both directions.

A worker keeps one step stream per server for a whole job, on gRPC or on a
direct channel (psgrid.channel). On it each request is a pull (one
``StepRequest.pull`` frame), ``shm_open``, ``channel_open``, or a push (its
header frame, then exactly the header's ``total_bytes`` in chunk frames: the
bytes :func:`psgrid.codec.encode_push` makes). The server answers every request, in
order: a pull with its header and exactly its payload's chunks (the bytes
:func:`psgrid.codec.encode_pull` makes), a push with a ``pushed`` frame, and a
request that failed with an ``error`` frame naming the psgrid error, after
which the stream goes on. A frame out of this order ends the stream
(MalformedPayload): its two ends no longer agree where a request starts.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import grpc
import torch
from google.protobuf.message import DecodeError

from psgrid.codec import Head, PayloadAssembler, Pulled, chunk_payload, layout_from_proto, split_header
from psgrid.errors import ERROR_BY_CODE, ERRORS_BY_NAME, MalformedPayload, MalformedRequest, PsgridError
from psgrid.messages import state_from_proto
from psgrid.shm import SharedStore
from psgrid.spec import JobState
from psgrid.v1 import parameter_server_pb2 as ps


def pull_request(job_id: str, worker_id: str, clock: int, final: bool, max_wait_s: float,
                 shm: bool = False, copy: bool = False) -> bytes:
    return ps.StepRequest(pull=ps.PullRequest(job_id=job_id, worker_id=worker_id, clock=clock, final=final,
                                              max_wait_s=max_wait_s, shm=shm, copy=copy)).SerializeToString()


def shm_open(job_id: str, worker_id: str, decline: bool = False) -> bytes:
    return ps.StepRequest(shm_open=ps.ShmOpen(job_id=job_id, worker_id=worker_id, decline=decline,
                                              store=not decline)).SerializeToString()


def channel_open(worker_id: str) -> bytes:
    return ps.StepRequest(channel_open=ps.ChannelOpen(worker_id=worker_id)).SerializeToString()


def channel_offer(port: int, ticket: bytes) -> bytes:
    """The answer to ``channel_open``: where the stream goes on (psgrid.channel)."""
    return ps.StepResponse(channel_offer=ps.ChannelOffer(port=port, ticket=ticket)).SerializeToString()


def pushed(version: int, duplicate: bool) -> bytes:
    return ps.StepResponse(pushed=ps.PushResponse(version=version, duplicate=duplicate)).SerializeToString()


def offer(push, pull, nbytes: int, store=None) -> bytes:
    """The answer to ``shm_open``: the stream's two segments (psgrid.shm.Segment), and the
    name of the job's parameters in shared memory (``store``, when offered)."""
    return ps.StepResponse(shm_offer=ps.ShmOffer(
        push_path=str(push.path), push_nonce=push.nonce, pull_path=str(pull.path), pull_nonce=pull.nonce,
        nbytes=nbytes, store_path=str(store.path) if store else "",
        store_nonce=store.nonce if store else b"")).SerializeToString()


def error(exc: PsgridError) -> bytes:
    return ps.StepResponse(error=ps.StepError(code=exc.code, error=type(exc).__name__,
                                              message=str(exc)[:4000])).SerializeToString()


def error_of(code: str, name: str, message: str) -> PsgridError:
    """The psgrid exception a status code and error-class name stand for (the precise
    class when named and consistent with the code)."""
    cls = ERRORS_BY_NAME.get(name)
    if cls is None or cls.code != code:
        cls = ERROR_BY_CODE.get(code, PsgridError)
    exc = cls(message or code)
    exc.grpc_code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)  # as psgrid.rpc.to_psgrid_error
    return exc


def read_request(frame: bytes) -> tuple[ps.StepRequest, memoryview | None]:
    """A request's first frame: a pull, shm_open or a push header, with a push's inline
    payload as a view into ``frame`` (MalformedRequest otherwise)."""
    split = split_header(frame)
    try:
        if split is not None:  # a push header: parsed without its payload (codec.split_header)
            return ps.StepRequest(push=ps.PushHeader.FromString(split[0])), split[1]
        msg = ps.StepRequest.FromString(frame)
    except DecodeError as exc:
        raise MalformedRequest(f"undecodable step frame ({len(frame)} bytes): {exc}") from None
    if msg.WhichOneof("frame") not in ("pull", "push", "shm_open", "channel_open"):
        raise MalformedRequest("a step request starts with a pull, a push header, shm_open or channel_open, "
                               "not a payload chunk")
    return msg, None


class Payload:
    """The next ``total`` payload bytes of a stream, as the chunk frames bring them."""

    def __init__(self, frames: Iterator[bytes], total: int):
        self._frames = frames
        self.remaining = total

    def __iter__(self) -> Iterator[memoryview]:
        while self.remaining > 0:
            frame = next(self._frames, None)
            if frame is None:
                raise MalformedPayload(f"the stream ended with {self.remaining} payload bytes still to come")
            piece = chunk_payload(frame)
            if piece is None:
                try:
                    msg = ps.StepRequest.FromString(frame)
                except DecodeError:
                    msg = None
                if msg is None or msg.WhichOneof("frame") != "chunk":
                    raise MalformedPayload(f"a frame other than a payload chunk with {self.remaining} "
                                           "payload bytes still to come")
                piece = memoryview(msg.chunk)
            if len(piece) > self.remaining:
                raise MalformedPayload(f"a chunk of {len(piece)} bytes where {self.remaining} were left")
            self.remaining -= len(piece)
            yield piece

    def drain(self) -> None:
        """Read what is left (a request refused before its payload was read)."""
        for _ in self:
            pass


def read_reply(frames: Iterator[bytes], buffer_for: Callable[[int], torch.Tensor] | None,
               max_bytes: int = 1 << 62, shm: torch.Tensor | None = None, store: SharedStore | None = None
               ) -> Pulled | ps.PushResponse | ps.ShmOffer | ps.ChannelOffer | PsgridError:
    """The server's answer to the oldest request: a Pulled, a PushResponse, or the error
    the request failed with (returned: the stream is still in step). MalformedPayload
    (raised) when the frames break the protocol. ``shm``: the stream's pull segment;
    ``store``: the job's parameters mapped from the server (psgrid.shm.SharedStore)."""
    next_head = getattr(frames, "next_head", None)  # a direct channel: a payload lands where it belongs
    frame = next_head() if next_head is not None else next(frames, None)
    if frame is None:
        raise MalformedPayload("the step stream ended before its answer")
    if isinstance(frame, Head):
        return _pull_in_place(frame, buffer_for, max_bytes)
    split = split_header(frame)
    try:
        if split is not None:  # a pull's header: parsed without its payload (codec.split_header)
            msg, inline = ps.StepResponse(pull=ps.PullHeader.FromString(split[0])), split[1]
        else:
            msg, inline = ps.StepResponse.FromString(frame), None
    except DecodeError as exc:
        raise MalformedPayload(f"undecodable step reply: {exc}") from None
    kind = msg.WhichOneof("frame")
    if kind == "error":
        return error_of(msg.error.code, msg.error.error, msg.error.message)
    if kind == "pushed":
        return msg.pushed
    if kind == "shm_offer":
        return msg.shm_offer
    if kind == "channel_offer":
        return msg.channel_offer
    if kind != "pull":
        raise MalformedPayload(f"a step reply starts with a header, not a {kind}")
    h = msg.pull
    state = state_from_proto(h.job_state) or JobState.RUNNING
    if not h.HasField("tensors"):
        return Pulled(state, h.version, h.step, None, None, h.clock, tuple(h.ranks), h.lineage)
    layout = layout_from_proto(h.tensors, max_bytes)
    if h.shm_store:  # the weights are the server's parameters themselves
        if store is None or store.data.numel() != layout.total_bytes:
            raise MalformedPayload("weights in the server's shared parameters on a stream without them, "
                                   "or of another size")
        return Pulled(state, h.version, h.step, layout, store.data, h.clock, tuple(h.ranks), h.lineage,
                      functools.partial(store.unchanged, h.store_seq))
    if h.shm:  # the weights are in the stream's pull segment
        if shm is None or shm.numel() != layout.total_bytes:
            raise MalformedPayload("weights in shared memory on a stream without it, or of another size")
        return Pulled(state, h.version, h.step, layout, shm, h.clock, tuple(h.ranks), h.lineage)
    if buffer_for is None:
        raise MalformedPayload("weights where none were asked for")
    buffer = buffer_for(layout.total_bytes)
    assembler = PayloadAssembler(layout, buffer)
    for piece in [inline] if inline is not None else Payload(frames, layout.total_bytes):
        assembler.feed(piece)
    assembler.finish()
    return Pulled(state, h.version, h.step, layout, buffer, h.clock, tuple(h.ranks), h.lineage)


def _pull_in_place(head: Head, buffer_for: Callable[[int], torch.Tensor] | None, max_bytes: int) -> Pulled:
    """A pull's answer read up to its inline payload: the payload received straight into
    the buffer ``buffer_for`` gives (one copy fewer than through the frame)."""
    try:
        h = ps.PullHeader.FromString(head.header)
    except DecodeError as exc:
        raise MalformedPayload(f"undecodable step reply: {exc}") from None
    if not h.HasField("tensors") or h.shm or buffer_for is None:
        raise MalformedPayload("a payload where none was asked for")
    layout = layout_from_proto(h.tensors, max_bytes)
    if head.payload_bytes != layout.total_bytes:
        raise MalformedPayload(f"a payload of {head.payload_bytes} bytes for tensors of {layout.total_bytes}")
    buffer = buffer_for(layout.total_bytes)
    view = memoryview(buffer.numpy())[: layout.total_bytes]
    got = len(head.got)
    view[:got] = head.got
    head.receive_into(view[got:])
    state = state_from_proto(h.job_state) or JobState.RUNNING
    return Pulled(state, h.version, h.step, layout, buffer, h.clock, tuple(h.ranks), h.lineage)
