"""A status's details are cut to what a client accepts, however long the error (issue 12).

gRPC sends the details percent-encoded in a trailer, and a client drops a call
whose trailers pass 8 KiB: the caller would get RESOURCE_EXHAUSTED ("metadata
size exceeds hard limit") instead of the error, with a huge message echoed
towards it. So every abort cuts its details to MAX_ERROR_CHARS bytes on the wire.
"""
from __future__ import annotations

import grpc
import pytest

from psgrid import rpc
from psgrid.errors import InvalidArgument
from psgrid.limits import MAX_ERROR_CHARS


class Aborted(Exception):
    pass


class FakeContext:
    """The part of a ServicerContext that an abort uses; records the status."""

    def set_trailing_metadata(self, metadata) -> None:
        self.metadata = metadata

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        raise Aborted


def wire_bytes(text: str) -> int:
    """Bytes of ``text`` percent-encoded as gRPC sends a status message."""
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


HUGE = {"ascii": "x" * 1_000_000, "euro signs": "\u20ac" * 4000, "NULs": "\0" * 3000, "percents": "%" * 5000,
        "emoji": "\U0001f600" * 2000}


def raising(message: str):
    @rpc.translate_errors
    def method(self, request, context):
        raise InvalidArgument(f"bad value {message}")
    return method


@pytest.mark.parametrize("kind", HUGE)
def test_a_huge_error_message_is_cut_to_what_a_client_accepts(kind):
    context = FakeContext()
    with pytest.raises(Aborted):
        raising(HUGE[kind])(None, b"", context)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert wire_bytes(context.details) <= MAX_ERROR_CHARS
    assert context.details.startswith("bad value ") and context.details.endswith(
        f"... ({len(HUGE[kind]) + 10} characters)")


def test_an_unexpected_error_is_cut_too():
    @rpc.translate_errors
    def method(self, request, context):
        raise RuntimeError("y" * 100_000)

    context = FakeContext()
    with pytest.raises(Aborted):
        method(None, b"", context)
    assert context.code is grpc.StatusCode.INTERNAL and wire_bytes(context.details) <= MAX_ERROR_CHARS


def test_a_message_within_the_limit_is_sent_whole():
    for message in ("no job 'x'", "y" * MAX_ERROR_CHARS, "\u20ac" * (MAX_ERROR_CHARS // 9)):
        assert rpc.status_details(message) == message
