"""Show a job's progress: a bar in a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from psgrid.spec import JobInfo


def describe(info: JobInfo) -> str:
    """One line: state, step, loss, throughput."""
    parts = [info.state.value.lower()]
    if info.waiting:  # why a PENDING job has not started
        parts.append(f"waiting: {info.waiting}")
    if info.total_steps:
        parts.append(f"step {info.step}/{info.total_steps}")
    if not math.isnan(info.loss):
        parts.append(f"loss {info.loss:.4f}")
    if info.samples_per_sec:
        parts.append(f"{info.samples_per_sec:,.0f} samples/s")
    parts += [f"{k} {v:.4f}" for k, v in sorted(info.metrics.items())]
    return ", ".join(parts)


class Progress:
    """Feeds job snapshots to a tqdm bar (terminal) or to lines every ``every_s``."""

    def __init__(self, job_id: str, stream: TextIO | None = None, every_s: float = 5.0):
        self.job_id = job_id
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._bar = None
        self._last_line = 0.0
        self._waiting = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, info: JobInfo) -> None:
        if self._tty:
            if info.waiting and info.waiting != self._waiting:  # no bar yet: say why
                print(f"[{self.job_id}] {describe(info)}", file=self.stream, flush=True)
            self._waiting = info.waiting
            self._update_bar(info)
        elif info.state.terminal or time.monotonic() - self._last_line >= self.every_s:
            print(f"[{self.job_id}] {describe(info)}", file=self.stream, flush=True)
            self._last_line = time.monotonic()

    def _update_bar(self, info: JobInfo) -> None:
        from tqdm import tqdm

        if self._bar is None and info.total_steps:
            self._bar = tqdm(total=info.total_steps, desc=self.job_id, unit="step", file=self.stream)
        if self._bar is not None:
            self._bar.n = min(info.step, info.total_steps)
            postfix = {}
            if not math.isnan(info.loss):
                postfix["loss"] = f"{info.loss:.4f}"
            if info.samples_per_sec:
                postfix["samples/s"] = f"{info.samples_per_sec:,.0f}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def close(self, info: JobInfo | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if info is not None and self._tty:
            print(f"[{self.job_id}] {describe(info)}", file=self.stream, flush=True)
