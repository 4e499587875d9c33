"""Noticing that this process was frozen (SIGSTOP) and thawed (SIGCONT).

A supervisor that finds a worker hung stops it with SIGTERM sent together with
SIGCONT. Meanwhile the server has dropped the frozen worker from its barrier. On
the thaw, every thread runs again at once: a heartbeat, or a push of the step the
worker was computing, could reach the server before the main thread has handled
the SIGTERM, and the server would take the worker back into the barrier it is
about to leave. So after a thaw, the worker holds its next call back for a moment
(:data:`HOLD_S`) in which the SIGTERM, if one came, is seen.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: How often the watching thread ticks.
TICK_S = 0.1
#: A tick this late means the process stood still (a loaded machine delays a tick by
#: milliseconds; a frozen process by as long as it stays frozen).
GAP_S = 1.0
#: How long a call after a thaw is held back for a SIGTERM that came with the SIGCONT.
HOLD_S = 0.5


class FreezeWatch:
    """Ticks on its own thread; :meth:`frozen_since` says whether it stood still."""

    def __init__(self, tick_s: float = TICK_S, gap_s: float = GAP_S,
                 clock: Callable[[], float] = time.monotonic):
        self.tick_s, self.gap_s, self._clock = tick_s, gap_s, clock
        self._lock = threading.Lock()
        self._last_tick = clock()
        self._last_thaw = float("-inf")
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> "FreezeWatch":
        """Tick until ``stop`` is set."""
        def run() -> None:
            while not stop.wait(self.tick_s):
                self.tick()
        self._thread = threading.Thread(target=run, name="freeze-watch", daemon=True)
        self._thread.start()
        return self

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._last_tick > self.gap_s:
                self._last_thaw = now
            self._last_tick = now

    def frozen_since(self, since: float) -> bool:
        """Whether the process stood still after ``since`` (this clock's time): a late
        tick seen since then, or a tick overdue now (the thaw is this very moment)."""
        now = self._clock()
        with self._lock:
            return self._last_thaw >= since or now - self._last_tick > self.gap_s

    def hold_after_thaw(self, since: float, stop: threading.Event) -> bool:
        """After a freeze since ``since``, wait up to HOLD_S for ``stop``; whether it is set."""
        if not self.frozen_since(since):
            return stop.is_set()
        return stop.wait(HOLD_S)
