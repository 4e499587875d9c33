"""The one converter, tensor half: tensor sets and the pull and push stream frames.

Job specs, states and info cross in :mod:`psgrid.messages`.

Tensor sets travel as a header (:class:`Layout`: names, dtypes, shapes, byte
offsets) followed by the raw little-endian payload, sliced into stream frames
of at most ``CHUNK_BYTES``. Each chunk frame is a valid protobuf message
(``PushRequest``/``PullResponse`` with the ``chunk`` field set), but psgrid
encodes and decodes it by hand: one copy of the payload on send (a
``bytes.join``), none on receive (a memoryview into the received message).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from google.protobuf.message import DecodeError

from psgrid.errors import (
    DtypeMismatch,
    InvalidArgument,
    MalformedPayload,
    PayloadCutShort,
    PayloadTooLarge,
    ShapeMismatch,
)
from psgrid.limits import quote
from psgrid.messages import state_from_proto, state_to_proto
from psgrid.spec import Encoding, JobState
from psgrid.v1 import parameter_server_pb2, tensor_pb2

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("psgrid's wire format is little-endian; this host is big-endian")

#: Payload bytes per stream frame; stays under gRPC's 4 MiB default message limit.
CHUNK_BYTES = 2 << 20
#: Every tensor's payload offset is a multiple of this (so views of any dtype align).
ALIGN = 64
#: Most tensors one set may declare.
MAX_TENSORS = 100_000
#: Longest tensor name.
MAX_TENSOR_NAME_CHARS = 512

_DTYPES: list[tuple[int, torch.dtype]] = [
    (tensor_pb2.DTYPE_FLOAT32, torch.float32),
    (tensor_pb2.DTYPE_FLOAT64, torch.float64),
    (tensor_pb2.DTYPE_FLOAT16, torch.float16),
    (tensor_pb2.DTYPE_BFLOAT16, torch.bfloat16),
    (tensor_pb2.DTYPE_INT8, torch.int8),
    (tensor_pb2.DTYPE_INT16, torch.int16),
    (tensor_pb2.DTYPE_INT32, torch.int32),
    (tensor_pb2.DTYPE_INT64, torch.int64),
    (tensor_pb2.DTYPE_UINT8, torch.uint8),
    (tensor_pb2.DTYPE_BOOL, torch.bool),
]
TORCH_BY_PROTO = dict(_DTYPES)
PROTO_BY_TORCH = {t: p for p, t in _DTYPES}
SUPPORTED_DTYPES = tuple(t for _, t in _DTYPES)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """Where one named tensor lives inside a payload."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """An ordered set of named tensors packed into one byte payload."""

    tensors: tuple[TensorMeta, ...]
    total_bytes: int

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.dtype, Iterable[int]]]) -> "Layout":
        """Lay out (name, dtype, shape) triples densely, each at an aligned offset."""
        metas, offset = [], 0
        for name, dtype, shape in named:
            if dtype not in PROTO_BY_TORCH:
                raise DtypeMismatch(f"tensor {name!r}: dtype {dtype} is not supported")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            metas.append(TensorMeta(name, dtype, shape, offset, nbytes))
            offset = _aligned(offset + nbytes)
        return cls(tuple(metas), offset)

    @classmethod
    def of_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> "Layout":
        return cls.of((n, t.dtype, t.shape) for n, t in named)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.tensors]

    @functools.cached_property
    def flat_dtype(self) -> torch.dtype | None:
        """The dtype of every tensor when they all share it and lie end to end from the
        payload's start (so one flat tensor covers them, and an elementwise op over all
        of them is one call, not one per tensor); else None."""
        if not self.tensors:
            return None
        dtype, offset = self.tensors[0].dtype, 0
        for m in self.tensors:
            if m.dtype != dtype or m.offset != offset:
                return None
            offset += m.nbytes
        return dtype

    def lazy_views(self, buffer: torch.Tensor) -> "LazyViews":
        """:meth:`views`, made when first looked into: a caller on the :meth:`flat` path
        may never need them (making them costs two ``view`` calls a tensor)."""
        return LazyViews(self, buffer)

    def flat(self, buffer: torch.Tensor) -> torch.Tensor | None:
        """Every tensor of uint8 ``buffer`` as one flat tensor (see :attr:`flat_dtype`); None
        when they are not laid out as one."""
        dtype = self.flat_dtype
        if dtype is None:
            return None
        last = self.tensors[-1]
        return buffer[: last.offset + last.nbytes].view(dtype)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed, shaped views into a uint8 buffer of at least ``total_bytes``."""
        out = {}
        for m in self.tensors:
            raw = flat[m.offset : m.offset + m.nbytes]
            out[m.name] = raw.view(m.dtype).view(m.shape)
        return out

    def pack(self, named: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy tensors into a (new or given) uint8 CPU buffer laid out as self."""
        if out is None:
            out = torch.zeros(self.total_bytes, dtype=torch.uint8)
        for name, view in self.views(out).items():
            view.copy_(named[name])
        return out

    def check_matches(self, other: "Layout", cast: bool = False) -> None:
        """Raise unless ``other`` names the same tensors, dtypes and shapes in order
        (``cast``: a floating dtype may be another floating one, as a 16-bit pull's)."""
        if len(other.tensors) != len(self.tensors):
            raise ShapeMismatch(
                f"expected {len(self.tensors)} tensors, got {len(other.tensors)}"
            )
        for mine, theirs in zip(self.tensors, other.tensors):
            if mine.name != theirs.name:
                raise ShapeMismatch(f"expected tensor {mine.name!r}, got {quote(theirs.name)}")
            if mine.dtype != theirs.dtype and not (
                    cast and mine.dtype.is_floating_point and theirs.dtype.is_floating_point):
                raise DtypeMismatch(
                    f"tensor {mine.name!r}: expected {mine.dtype}, got {theirs.dtype}"
                )
            if mine.shape != theirs.shape:
                raise ShapeMismatch(
                    f"tensor {mine.name!r}: expected shape {list(mine.shape)}, got {quote(list(theirs.shape))}"
                )

    def check_identical(self, other: "Layout") -> None:
        """Raise unless ``other`` is exactly this layout: :meth:`check_matches`, then
        the same offsets and total size (MalformedPayload), so that a payload sized by
        ``other`` is never larger than this layout's."""
        self.check_matches(other)
        if other.total_bytes != self.total_bytes or any(
                mine.offset != theirs.offset for mine, theirs in zip(self.tensors, other.tensors)):
            raise MalformedPayload(f"the payload is laid out in {other.total_bytes} bytes, the job's in "
                                   f"{self.total_bytes}: offsets and total_bytes must be the job's exactly")

    def dense(self) -> "Layout":
        """The same tensors laid out as :meth:`of` lays them out (no gaps, no padding)."""
        return Layout.of((m.name, m.dtype, m.shape) for m in self.tensors)


class LazyViews(Mapping):
    """A layout's typed views of a buffer (Layout.views), made on first access."""

    def __init__(self, layout: Layout, buffer: torch.Tensor):
        self._layout, self._buffer = layout, buffer
        self._views: dict[str, torch.Tensor] | None = None

    def _made(self) -> dict[str, torch.Tensor]:
        if self._views is None:
            self._views = self._layout.views(self._buffer)
        return self._views

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._made()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._layout.tensors)


# --- tensor sets <-> protobuf -------------------------------------------------


@functools.lru_cache(maxsize=256)
def layout_to_proto(layout: Layout) -> tensor_pb2.TensorSetHeader:
    """``layout`` as a header message, made once per layout (a worker sends the same one
    every step): the caller copies it into its own message and never changes it."""
    return tensor_pb2.TensorSetHeader(
        tensors=[
            tensor_pb2.TensorSpec(
                name=m.name, dtype=PROTO_BY_TORCH[m.dtype], shape=m.shape,
                offset=m.offset, nbytes=m.nbytes,
            )
            for m in layout.tensors
        ],
        total_bytes=layout.total_bytes,
    )


#: Valid layouts by the bytes of their header: a worker sends the same one every step.
_LAYOUTS: dict[tuple[bytes, int], Layout] = {}
_LAYOUTS_LOCK = threading.Lock()
LAYOUT_CACHE_ENTRIES = 64
#: Headers longer than this are checked every time instead (not kept): at most
#: LAYOUT_CACHE_ENTRIES x this many bytes are held, whatever callers send.
LAYOUT_CACHE_MAX_BYTES = 64 << 10


def layout_from_proto(msg: tensor_pb2.TensorSetHeader, max_bytes: int) -> Layout:
    """Validate a declared tensor set before a byte of its payload is allocated.

    Raises MalformedPayload/DtypeMismatch for an inconsistent header and
    PayloadTooLarge when it declares more than ``max_bytes``. A header seen
    before (the same bytes, the same limit) is not checked again.
    """
    if msg.ByteSize() > LAYOUT_CACHE_MAX_BYTES:
        return _layout_from_proto(msg, max_bytes)
    key = (msg.SerializeToString(deterministic=True), max_bytes)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _layout_from_proto(msg, max_bytes)
        with _LAYOUTS_LOCK:
            while len(_LAYOUTS) >= LAYOUT_CACHE_ENTRIES:
                del _LAYOUTS[next(iter(_LAYOUTS))]
            _LAYOUTS[key] = layout
    return layout


def _layout_from_proto(msg: tensor_pb2.TensorSetHeader, max_bytes: int) -> Layout:
    if len(msg.tensors) > MAX_TENSORS:
        raise PayloadTooLarge(f"{len(msg.tensors)} tensors declared, limit {MAX_TENSORS}")
    if msg.total_bytes > max_bytes:
        raise PayloadTooLarge(f"payload of {msg.total_bytes} bytes declared, limit {max_bytes}")
    metas, end, names = [], 0, set()
    for spec in msg.tensors:
        if len(spec.name) > MAX_TENSOR_NAME_CHARS:
            raise MalformedPayload(f"tensor name of {len(spec.name)} characters, limit {MAX_TENSOR_NAME_CHARS}: "
                                   f"{quote(spec.name)}")
        dtype = TORCH_BY_PROTO.get(spec.dtype)
        if dtype is None:
            raise DtypeMismatch(f"tensor {quote(spec.name)}: unknown dtype {spec.dtype}")
        if not spec.name or spec.name in names:
            raise MalformedPayload(f"tensor names must be unique and non-empty: {quote(spec.name)}")
        names.add(spec.name)
        if any(d < 0 for d in spec.shape):
            raise MalformedPayload(f"tensor {quote(spec.name)}: negative dimension in {quote(list(spec.shape))}")
        numel = math.prod(spec.shape)
        if numel * dtype.itemsize > max_bytes:
            raise PayloadTooLarge(f"tensor {quote(spec.name)} of shape {quote(list(spec.shape))} is over the limit")
        if spec.nbytes != numel * dtype.itemsize:
            raise MalformedPayload(
                f"tensor {quote(spec.name)}: {spec.nbytes} bytes declared for shape "
                f"{quote(list(spec.shape))} of {dtype} ({numel * dtype.itemsize} expected)"
            )
        if spec.offset % ALIGN or spec.offset < end:
            raise MalformedPayload(f"tensor {quote(spec.name)}: bad offset {spec.offset}")
        end = spec.offset + spec.nbytes
        metas.append(TensorMeta(spec.name, dtype, tuple(spec.shape), spec.offset, spec.nbytes))
    if msg.total_bytes < end:
        raise MalformedPayload(f"total_bytes {msg.total_bytes} is shorter than the tensors ({end})")
    return Layout(tuple(metas), msg.total_bytes)


_ENCODINGS = {"none": parameter_server_pb2.ENCODING_NONE, "fp16": parameter_server_pb2.ENCODING_FP16,
              "bf16": parameter_server_pb2.ENCODING_BF16, "int8": parameter_server_pb2.ENCODING_INT8,
              "topk": parameter_server_pb2.ENCODING_TOPK}
_ENCODING_KINDS = {v: k for k, v in _ENCODINGS.items()}


def encoding_to_proto(encoding: Encoding, header: parameter_server_pb2.PushHeader) -> None:
    """Say in ``header`` how its payload is encoded."""
    header.encoding = _ENCODINGS[encoding.kind]
    header.topk_ratio = encoding.ratio


def encoding_from_proto(header: parameter_server_pb2.PushHeader) -> Encoding:
    """How a push header says its payload is encoded; InvalidArgument for an encoding
    psgrid does not know or a top-k ratio out of range."""
    kind = _ENCODING_KINDS.get(header.encoding)
    if kind is None:
        raise InvalidArgument(f"unknown payload encoding {header.encoding}")
    return Encoding(kind, header.topk_ratio)


# --- stream frames --------------------------------------------------------------

_CHUNK_TAG = 0x12  # field 2 (chunk), wire type 2 (length-delimited)
_HEADER_TAG = 0x0A  # field 1 (header)
_PAYLOAD_TAG = 0x52  # field 10 (the header's inline payload)
#: A payload up to this size rides inside its header's frame (``payload``), no chunk frames.
INLINE_BYTES = CHUNK_BYTES


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Pieces(tuple):
    """A frame as its pieces (bytes, then a view of a payload), for a sender that writes
    them one after the other (psgrid.channel) instead of copying them into one."""

    @property
    def nbytes(self) -> int:
        return sum(len(piece) for piece in self)


def _frame(pieces: tuple, as_pieces: bool) -> bytes | Pieces:
    return Pieces((b"".join(pieces[:-1]), pieces[-1])) if as_pieces else b"".join(pieces)


def chunk_frames(flat: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, pieces: bool = False) -> Iterator[bytes]:
    """Slice a contiguous uint8 CPU buffer into serialized ``chunk`` frames (``pieces``:
    each as :class:`Pieces`, its payload a view of ``flat``)."""
    view = memoryview(flat.numpy()) if flat.numel() else memoryview(b"")
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        yield _frame((bytes((_CHUNK_TAG,)), _varint(len(piece)), piece), pieces)


def header_frame(header_bytes: bytes, payload: torch.Tensor | None, pieces: bool = False) -> bytes:
    """A frame whose field 1 is the serialized header, with ``payload`` (a uint8 CPU
    tensor) appended as the header's ``payload`` field: protobuf merges appended
    fields, so this is the message a parser sees, built with one copy of the payload
    (``pieces``: none, a :class:`Pieces` whose last piece is a view of ``payload``)."""
    if payload is None or not payload.numel():
        return b"".join((bytes((_HEADER_TAG,)), _varint(len(header_bytes)), header_bytes))
    view = memoryview(payload.numpy())
    field = (bytes((_PAYLOAD_TAG,)), _varint(len(view)))
    inner = len(header_bytes) + sum(map(len, field)) + len(view)
    return _frame((bytes((_HEADER_TAG,)), _varint(inner), header_bytes, *field, view), pieces)


def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IndexError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _header_fields(buf: bytes | bytearray | memoryview, frame_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields inside a header frame (field 1) of ``frame_bytes`` bytes, of which ``buf``
    holds the first ones: (key, field start, value start, field end) each, as far as
    ``buf`` reaches (a field may end past it). IndexError when it is not such a frame."""
    if not buf or buf[0] != _HEADER_TAG:
        raise IndexError("not a header frame")
    length, pos = _varint_at(buf, 1)
    if pos + length != frame_bytes:
        raise IndexError("the header is not the whole frame")
    while pos < min(len(buf), frame_bytes):
        start = pos
        key, pos = _varint_at(buf, pos)
        wire, value = key & 7, pos
        if wire == 0:
            _, pos = _varint_at(buf, pos)
        elif wire == 2:
            n, value = _varint_at(buf, pos)
            pos = value + n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise IndexError(f"wire type {wire}")
        if pos > frame_bytes:
            raise IndexError("a field past the frame's end")
        yield key, start, value, pos


def split_header(frame: bytes) -> tuple[bytes, memoryview | None] | None:
    """For a frame whose one field is field 1 (a header), the header's bytes without its
    inline ``payload``, and the payload as a view into ``frame``; None for any other frame.

    Parsing a whole frame would copy an inline payload twice into fresh memory (the
    parse, then the field's access), and fresh memory costs page faults: a 1 MiB
    pull spent most of its client time there. The header, small, is parsed alone.
    """
    view, parts, payload = memoryview(frame) if frame else None, [], None
    try:
        for key, start, value, end in _header_fields(frame, len(frame) if frame else 0):
            if key == _PAYLOAD_TAG:
                payload = view[value:end]  # protobuf: the last one wins
            else:
                parts.append(view[start:end])
    except IndexError:
        return None
    return b"".join(parts), payload


def chunk_payload(frame: bytes) -> memoryview | None:
    """The payload slice of a serialized chunk frame, or None for any other frame.

    Recognises exactly ``tag(chunk) varint(len) bytes``, which is what every
    protobuf encoder emits for a message whose only field is ``chunk``.
    """
    if not frame or frame[0] != _CHUNK_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(frame) and pos <= 10:
        byte = frame[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    if pos + length != len(frame):
        return None
    return memoryview(frame)[pos:]


def split_head(prefix: bytes | bytearray | memoryview, frame_bytes: int) -> tuple[bytes, int] | None:
    """For a frame of ``frame_bytes`` whose first bytes are ``prefix``: when it is a
    header frame whose inline ``payload`` is its last field and starts within
    ``prefix``, the header's bytes without it and the offset where the payload starts
    (the rest of it can then be received where it belongs, not into the frame);
    else None."""
    parts = []
    try:
        for key, start, value, end in _header_fields(prefix, frame_bytes):
            if key == _PAYLOAD_TAG:
                return (b"".join(parts), value) if end == frame_bytes else None
            if end > len(prefix):
                return None  # the header goes on past what was read
            parts.append(bytes(prefix[start:end]))
    except IndexError:
        return None
    return None


@dataclasses.dataclass(frozen=True)
class Head:
    """A header frame read up to its inline payload (psgrid.channel.Connection.next_head):
    the header's bytes, the payload's length, the part of it already read; the rest
    is still to be received (``receive_into``) where it belongs."""

    header: bytes
    payload_bytes: int
    got: memoryview
    receive_into: Callable[[memoryview], None]


def _as_tensor(payload: memoryview | bytes) -> torch.Tensor:
    """A zero-copy uint8 view of received bytes (read-only: never written to)."""
    view = memoryview(payload)
    if not view.readonly and view.nbytes:  # a channel's frame: no warning to silence (catching one costs ~30 us a call)
        return torch.frombuffer(view, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        return torch.frombuffer(payload, dtype=torch.uint8)


class PayloadAssembler:
    """Copies arriving chunks into a buffer; checks the byte count against the layout."""

    def __init__(self, layout: Layout, buffer: torch.Tensor):
        if buffer.numel() < layout.total_bytes:
            raise ValueError("buffer is smaller than the layout")
        self.layout = layout
        self._dst = buffer
        self.received = 0

    def feed(self, payload: memoryview | bytes) -> None:
        end = self.received + len(payload)
        if end > self.layout.total_bytes:
            raise MalformedPayload(
                f"payload longer than the {self.layout.total_bytes} bytes its header declared"
            )
        if len(payload):
            # torch's copy releases the GIL, so gRPC's threads keep receiving.
            self._dst[self.received : end].copy_(_as_tensor(payload))
        self.received = end

    def finish(self) -> None:
        if self.received != self.layout.total_bytes:
            raise PayloadCutShort(
                f"payload ended after {self.received} of {self.layout.total_bytes} declared bytes"
            )


# --- pull and push streams ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pulled:
    """A decoded pull: the weights of ``version`` in ``buffer`` (None once the job is over)."""

    state: JobState
    version: int
    step: int
    layout: Layout | None
    buffer: torch.Tensor | None
    clock: int = 0
    #: Data shards (ranks) to compute this step on; empty: the worker's own.
    ranks: tuple[int, ...] = ()
    #: BSP: digest of who contributed to each round so far (equal on every shard).
    lineage: str = ""
    #: ``buffer`` is the server's own parameters (psgrid.shm.SharedStore): whether nothing
    #: wrote them since this answer, to ask once they are copied out (None: a copy, always intact).
    intact: Callable[[], bool] | None = dataclasses.field(default=None, compare=False)


def encode_pull(state: JobState, version: int, step: int, layout: Layout | None,
                payload: torch.Tensor | None, clock: int = 0,
                ranks: tuple[int, ...] = (), lineage: str = "", shm: bool = False,
                pieces: bool = False, store_seq: int | None = None) -> Iterator[bytes]:
    """Frames of a pull stream: the header, then the payload (if any) inline or in chunks;
    ``shm``: the payload is in the stream's shared-memory segment instead; ``store_seq``:
    it is the job's parameters in shared memory, at that write sequence number
    (psgrid.shm.SharedStore); ``pieces``: frames that carry payload as :class:`Pieces`
    (views of ``payload``, sent as they are)."""
    header = parameter_server_pb2.PullHeader(
        job_state=state_to_proto(state), version=version, step=step, clock=clock, ranks=ranks,
        lineage=lineage, shm=shm, shm_store=store_seq is not None, store_seq=store_seq or 0)
    if layout is not None:
        header.tensors.CopyFrom(layout_to_proto(layout))
    sent = payload[: layout.total_bytes] if layout is not None and payload is not None else None
    inline = sent is not None and sent.numel() <= INLINE_BYTES
    yield header_frame(header.SerializeToString(), sent if inline else None, pieces)
    if sent is not None and not inline:
        yield from chunk_frames(sent, pieces=pieces)


def decode_pull(frames: Iterable[bytes], buffer_for: Callable[[int], torch.Tensor],
                max_bytes: int = 1 << 62) -> Pulled:
    """Read a pull stream; the payload lands in ``buffer_for(total_bytes)``."""
    frames = iter(frames)
    first = next(frames, None)
    split = split_header(first) if first is not None else None
    if split is None:
        raise MalformedPayload("a pull stream starts with its header frame")
    h = _parse(parameter_server_pb2.PullHeader, split[0])
    state = state_from_proto(h.job_state) or JobState.RUNNING
    if not h.HasField("tensors"):
        return Pulled(state, h.version, h.step, None, None, h.clock, tuple(h.ranks), h.lineage)
    layout = layout_from_proto(h.tensors, max_bytes)
    buffer = buffer_for(layout.total_bytes)
    assembler = PayloadAssembler(layout, buffer)
    for piece in header_payload(split[1], frames, parameter_server_pb2.PullResponse):
        assembler.feed(piece)
    assembler.finish()
    return Pulled(state, h.version, h.step, layout, buffer, h.clock, tuple(h.ranks), h.lineage)


def encode_push(header: parameter_server_pb2.PushHeader, payload: torch.Tensor,
                chunk_bytes: int = CHUNK_BYTES, pieces: bool = False) -> Iterator[bytes]:
    """Frames of a push stream: ``header`` (with its tensors set) and the payload: inside
    the header's frame when it fits in one (INLINE_BYTES), else in chunk frames after it
    (``pieces``: as :class:`Pieces`, views of ``payload``)."""
    sent = payload[: header.payload_bytes or header.tensors.total_bytes]
    inline = sent.numel() <= min(chunk_bytes, INLINE_BYTES)
    yield header_frame(header.SerializeToString(), sent if inline else None, pieces)
    if not inline:
        yield from chunk_frames(sent, chunk_bytes, pieces)


def _parse(message_cls, frame: bytes):
    try:
        return message_cls.FromString(frame)
    except DecodeError as exc:
        raise MalformedPayload(f"undecodable frame: {exc}") from None


def decode_push_header(first: bytes | None) -> tuple[parameter_server_pb2.PushHeader, memoryview | None]:
    """A push's header frame: the header and its inline payload (a view), if any."""
    split = split_header(first) if first is not None else None
    if split is None:
        raise MalformedPayload("a push starts with its header frame")
    return _parse(parameter_server_pb2.PushHeader, split[0]), split[1]


def header_payload(inline: memoryview | None, frames: Iterable[bytes], message_cls) -> Iterator[memoryview]:
    """The payload a stream's header brings: its ``inline`` payload (then the stream must
    end there), else the chunk frames that follow it."""
    if inline is None:
        yield from payload_pieces(frames, message_cls)
        return
    yield inline
    if next(iter(frames), None) is not None:
        raise MalformedPayload("a payload sent inline and in chunk frames as well")


def payload_pieces(frames: Iterable[bytes], message_cls) -> Iterator[memoryview]:
    """The payload slices of the chunk frames after a stream's header."""
    for frame in frames:
        piece = chunk_payload(frame)
        if piece is None:  # encoded by some other protobuf library: parse it fully
            msg = _parse(message_cls, frame)
            if msg.WhichOneof("frame") != "chunk":
                raise MalformedPayload("a stream carries one header, in its first frame")
            piece = memoryview(msg.chunk)
        yield piece
