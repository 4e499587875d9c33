"""rpc.call gives up once its caller is stopping: before a try, in a back-off sleep, after a cancelled call."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from psgrid import rpc
from psgrid.backoff import Backoff
from psgrid.errors import Stopping, Unavailable


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name

    def trailing_metadata(self):
        return ()


def failing(code: grpc.StatusCode, calls: list):
    def fn(request, timeout):
        calls.append(request)
        raise FakeRpcError(code)
    return fn


def test_a_stop_wakes_the_back_off_sleep():
    stop, calls = threading.Event(), []
    slow = Backoff(initial=5.0, maximum=5.0, jitter=0.0)
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopping):
        rpc.call(failing(grpc.StatusCode.UNAVAILABLE, calls), "req", timeout=1.0, retry_for=60.0,
                 backoff=slow, stop=stop)
    assert time.monotonic() - started < 1.0 and calls == ["req"]


def test_nothing_is_tried_once_stopping():
    stop, calls = threading.Event(), []
    stop.set()
    with pytest.raises(Stopping):
        rpc.call(failing(grpc.StatusCode.UNAVAILABLE, calls), "req", timeout=1.0, stop=stop)
    assert calls == []


def test_a_call_cancelled_by_the_stop_is_stopping_not_a_failure():
    stop, calls = threading.Event(), []

    def cancelled(request, timeout):  # the channel was closed under the call
        calls.append(request)
        stop.set()
        raise FakeRpcError(grpc.StatusCode.CANCELLED)

    with pytest.raises(Stopping):
        rpc.call(cancelled, "req", timeout=1.0, stop=stop)

    def closed(request, timeout):
        raise ValueError("Cannot invoke RPC on closed channel!")

    with pytest.raises(Stopping):
        rpc.call(closed, "req", timeout=1.0, stop=stop)
    with pytest.raises(ValueError):  # not stopping: a ValueError is a bug, and stays one
        rpc.call(closed, "req", timeout=1.0, stop=threading.Event())


def test_without_a_stop_failures_are_what_they_were():
    calls = []
    with pytest.raises(Unavailable):
        rpc.call(failing(grpc.StatusCode.UNAVAILABLE, calls), "req", timeout=1.0, retry_for=0.0)
    assert calls == ["req"]
