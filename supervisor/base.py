"""The supervisor loop as a template method, after torch.distributed.elastic's agent.

:class:`Supervisor` owns the loop, the restart budget, the back-off, liveness
and shutdown; a subclass says how to start, stop and poll one child (real
processes, threads, or a fake table in tests). Nothing here sleeps except
:meth:`Supervisor.run`, and every step takes ``now`` from the caller, so a test
drives it with a scripted clock.
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import random
import threading
import time
from typing import Callable

from psgrid.supervisor.policy import (Action, ChildSpec, Decision, ExitReason, RestartPolicy,
                                      SupervisorSpec)

logger = logging.getLogger(__name__)


class ChildState(str, enum.Enum):
    """Where one child is in its life.

    ::

        STOPPED  --start-->                      STARTING
        STARTING --first health check passes-->  RUNNING   (at once without liveness)
        STARTING/RUNNING --exit, policy restarts--> BACKOFF --restart time reached--> STARTING
        STARTING/RUNNING --normal exit, no restart--> STOPPED
        STARTING/RUNNING --abnormal exit, no restart, or gave up--> FAILED
        STARTING/RUNNING --stopped by the supervisor (sibling, operator, shutdown)-->
                         BACKOFF when it is to restart, else STOPPED
        BACKOFF  --shutdown or give up--> STOPPED
        any --request_restart--> (stopped if alive) BACKOFF due now --same tick--> STARTING
    """

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def alive(self) -> bool:
        """Whether a process may exist for the child (it must be stopped to go away)."""
        return self in (ChildState.STARTING, ChildState.RUNNING)


@dataclasses.dataclass(frozen=True)
class ChildStatus:
    """A snapshot of one child, for display. ``restarts`` counts starts after the first."""

    name: str
    state: ChildState = ChildState.STOPPED
    pid: int | None = None
    restarts: int = 0
    last_start: float | None = None
    last_exit: ExitReason | None = None
    restart_at: float | None = None  # set while BACKOFF


class Supervisor(abc.ABC):
    """Starts children, watches them, and restarts them by an OTP-style policy.

    Subclasses implement :meth:`start_child`, :meth:`stop_child`,
    :meth:`poll_child` and :meth:`is_live`; the base class calls them from one
    thread (the one that calls :meth:`tick`, :meth:`start_all` and
    :meth:`shutdown`). :meth:`request_restart` and :meth:`statuses` are safe
    from any thread.
    """

    def __init__(self, spec: SupervisorSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.policy = RestartPolicy(spec, rng)
        self._lock = threading.Lock()  # guards _status and _requests for other threads
        self._status = {name: ChildStatus(name) for name in spec.names}
        self._requests: list[str] = []
        self._unlive_since: dict[str, float] = {}
        self._started = False
        self._closed = False
        self.gave_up = False

    # ---- what a subclass implements -------------------------------------------------

    @abc.abstractmethod
    def start_child(self, spec: ChildSpec) -> int | None:
        """Start child ``spec.name`` and return its pid, or None when it has none.

        MUST return once the child is launched, not wait for it to be ready.
        Raising means the child could not start: :meth:`start_all` stops the
        children it already started and re-raises; a restart in :meth:`tick`
        treats it as an abnormal exit (``ExitReason.start_failed()``).
        """

    @abc.abstractmethod
    def stop_child(self, name: str, grace_s: float) -> None:
        """Stop child ``name``: SIGTERM, then SIGKILL after ``grace_s`` seconds.

        MUST return only once the child is gone, and MUST succeed when the child
        has already exited. The base class does not poll a child it stopped.
        """

    @abc.abstractmethod
    def poll_child(self, name: str) -> ExitReason | None:
        """None while child ``name`` runs; why it ended once it has. MUST NOT block."""

    @abc.abstractmethod
    def is_live(self, name: str, now: float) -> bool:
        """Whether child ``name`` answered its health check or heartbeat recently.

        Called only for children whose spec sets ``liveness_timeout_s``, once
        per tick while they run. MUST NOT block for long.
        """

    # ---- the loop -------------------------------------------------------------------

    def start_all(self, now: float) -> None:
        """Start every child in start order.

        When one fails to start, stops those already started (reverse order) and
        re-raises, as an OTP supervisor fails its init. RuntimeError if called twice.
        """
        if self._started:
            raise RuntimeError("start_all() was already called")
        self._started = True
        for name in self.spec.names:
            try:
                self._start(name, now)
            except Exception:
                logger.error("[supervisor] %s failed to start; stopping the others", name)
                self.shutdown()
                raise

    def tick(self, now: float) -> None:
        """One step: poll children, kill the unresponsive, apply the policy, start due restarts.

        Never sleeps: a delayed restart is recorded as ``restart_at`` and
        carried out by the first tick with ``now >= restart_at``. Does nothing
        once the supervisor gave up or was shut down.
        """
        for name in self.spec.names:
            # Re-read each time: handling one exit may stop or reschedule later siblings.
            if self.state(name).alive:
                self._check(name, now)
        self._serve_requests(now)
        self._start_due(now)

    def run(self, stop_event: threading.Event, clock: Callable[[], float] = time.monotonic,
            interval_s: float = 0.5) -> int:
        """Start all children, tick every ``interval_s`` until ``stop_event`` is set
        or the supervisor gives up, then shut down. Returns 1 if it gave up, else 0.
        """
        try:
            self.start_all(clock())
            while True:
                self.tick(clock())
                if self.gave_up or stop_event.wait(interval_s):
                    break
        finally:
            self.shutdown()
        return 1 if self.gave_up else 0

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop every running child in reverse start order; cancel pending restarts.

        ``grace_s`` overrides each child's ``shutdown_s``. Idempotent; after it,
        :meth:`tick` does nothing.
        """
        self._closed = True
        for name in reversed(self.spec.names):
            self._stop(name, grace_s)
            if self.state(name) is ChildState.BACKOFF:
                self._set(name, state=ChildState.STOPPED, restart_at=None)

    def request_restart(self, name: str) -> None:
        """Ask for child ``name`` to be stopped (if running) and started again, at once.

        Carried out by the next :meth:`tick`; safe from any thread. It restarts
        this child alone, skips the back-off and, like OTP's ``restart_child``,
        does not count against the restart intensity (only crashes do). Ignored
        once the supervisor gave up or shut down. KeyError for an unknown child.
        """
        self.spec.child(name)
        with self._lock:
            self._requests.append(name)

    # ---- status ---------------------------------------------------------------------

    def status(self, name: str) -> ChildStatus:
        """A snapshot of child ``name``; KeyError for an unknown child."""
        with self._lock:
            return self._status[name]

    def statuses(self) -> tuple[ChildStatus, ...]:
        """Snapshots of all children, in start order."""
        with self._lock:
            return tuple(self._status[name] for name in self.spec.names)

    def state(self, name: str) -> ChildState:
        return self.status(name).state

    def _set(self, name: str, **changes) -> None:
        with self._lock:
            self._status[name] = dataclasses.replace(self._status[name], **changes)

    # ---- the steps ------------------------------------------------------------------

    def _start(self, name: str, now: float) -> None:
        spec = self.spec.child(name)
        pid = self.start_child(spec)
        self.policy.started(name, now)
        previous = self.status(name)
        if spec.liveness_timeout_s is not None:
            # Counted from the start, so a child that never answers is killed too.
            self._unlive_since[name] = now
        state = ChildState.RUNNING if spec.liveness_timeout_s is None else ChildState.STARTING
        restarts = previous.restarts + (1 if previous.last_start is not None else 0)
        self._set(name, state=state, pid=pid, last_start=now, restart_at=None, restarts=restarts)
        logger.info("[supervisor] started %s (pid %s)", name, pid)

    def _stop(self, name: str, grace_s: float | None = None) -> None:
        """Stop child ``name`` if it is alive; it ends STOPPED with reason shutdown."""
        if not self.state(name).alive:
            return
        self.stop_child(name, self.spec.child(name).shutdown_s if grace_s is None else grace_s)
        self._unlive_since.pop(name, None)
        self._set(name, state=ChildState.STOPPED, pid=None, last_exit=ExitReason.shutdown())
        logger.info("[supervisor] stopped %s", name)

    def _check(self, name: str, now: float) -> None:
        reason = self.poll_child(name)
        if reason is None and self._failed_liveness(name, now):
            logger.warning("[supervisor] %s failed its health checks for over %gs: killing it",
                           name, self.spec.child(name).liveness_timeout_s)
            self.stop_child(name, self.spec.child(name).shutdown_s)
            reason = ExitReason.liveness()
        if reason is not None:
            self._on_exit(name, reason, now)

    def _failed_liveness(self, name: str, now: float) -> bool:
        timeout = self.spec.child(name).liveness_timeout_s
        if timeout is None:
            return False
        if self.is_live(name, now):
            self._unlive_since.pop(name, None)
            if self.state(name) is ChildState.STARTING:
                self._set(name, state=ChildState.RUNNING)
            return False
        return now - self._unlive_since.setdefault(name, now) > timeout

    def _on_exit(self, name: str, reason: ExitReason, now: float) -> None:
        """Record an unplanned exit of child ``name`` and carry out the policy's decision."""
        self._unlive_since.pop(name, None)
        self._set(name, pid=None, last_exit=reason)
        decision = self.policy.on_exit(name, reason, now)
        if decision.action is Action.GIVE_UP:
            self._give_up(name, decision)
        elif decision.action is Action.RESTART:
            self._restart(name, reason, decision, now)
        else:
            logger.info("[supervisor] %s exited (%s); not restarted", name, reason)
            self._set(name, state=ChildState.STOPPED if reason.normal else ChildState.FAILED)

    def _restart(self, name: str, reason: ExitReason, decision: Decision, now: float) -> None:
        logger.warning("[supervisor] %s exited (%s); restarting %s in %.2fs",
                       name, reason, ", ".join(decision.restart), decision.delay_s)
        for other in decision.stop:
            self._stop(other)
        for other in decision.restart:
            self._set(other, state=ChildState.BACKOFF, restart_at=now + decision.delay_s)

    def _give_up(self, name: str, decision: Decision) -> None:
        logger.error("[supervisor] %s exited (%s): more than %d restarts in %gs, giving up",
                     name, self.status(name).last_exit, self.spec.max_restarts, self.spec.period_s)
        self.gave_up = True
        self._closed = True
        self._set(name, state=ChildState.FAILED)
        for other in decision.stop:
            self._stop(other)
            if self.state(other) is ChildState.BACKOFF:
                self._set(other, state=ChildState.STOPPED, restart_at=None)

    def _serve_requests(self, now: float) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for name in requests:
            if self._closed:
                return
            logger.info("[supervisor] restart of %s requested", name)
            self._stop(name)
            # Due at once: _start_due starts it in this same tick, with no back-off.
            self._set(name, state=ChildState.BACKOFF, restart_at=now)

    def _start_due(self, now: float) -> None:
        due = [s.name for s in self.statuses() if s.state is ChildState.BACKOFF and s.restart_at <= now]
        for name in due:
            status = self.status(name)
            # A failed start earlier in this loop may have rescheduled it, or given up.
            if status.state is not ChildState.BACKOFF or status.restart_at > now:
                continue
            try:
                self._start(name, now)
            except Exception:
                # A supervisor must survive its children: a failed start is a crash.
                logger.exception("[supervisor] %s failed to start", name)
                self._on_exit(name, ExitReason.start_failed(), now)
