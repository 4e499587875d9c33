"""How many threads a server puts on a job's tensors (psgrid.device.use_threads)."""
from __future__ import annotations

import threading

import torch

from psgrid import device
from psgrid.codec import Layout
from psgrid.device import PARALLEL_MIN_BYTES, threads_for, use_threads
from psgrid.server.store import ParameterStore
from psgrid.spec import OptimizerSpec


def test_small_tensors_get_one_thread_large_ones_torchs_own():
    assert threads_for(PARALLEL_MIN_BYTES - 1) == 1
    assert threads_for(PARALLEL_MIN_BYTES) == 0


def test_a_store_of_small_tensors_is_worked_on_by_one_thread():
    small = Layout.of([("w", torch.float32, (256, 256)), ("b", torch.float32, (256,))])
    large = Layout.of([("w", torch.float32, (1024, 1024)), ("b", torch.float32, (1024,))])
    for layout, threads in ((small, 1), (large, 0)):
        store = ParameterStore(layout, torch.zeros(layout.total_bytes, dtype=torch.uint8), OptimizerSpec("sgd"))
        assert store.threads == threads


def test_the_count_is_each_threads_own():
    """One handler thread on a small job's tensors leaves another's count as it was."""
    before = torch.get_num_threads()
    seen = {}

    def handler(name: str, threads: int) -> None:
        use_threads(threads)
        seen[name] = torch.get_num_threads()

    small = threading.Thread(target=handler, args=("small", 1))
    small.start()
    small.join()
    large = threading.Thread(target=handler, args=("large", 0))
    large.start()
    large.join()
    assert seen["small"] == 1
    assert seen["large"] == device._started_with[0]  # what torch had before use_threads first changed it
    assert torch.get_num_threads() == before  # this thread's own: untouched by the handlers
