"""The restart policy of an OTP-style supervisor: pure decisions, no processes.

Given which child exited, why, and when, :class:`RestartPolicy` decides what the
supervisor does next: nothing, restart some children after a back-off, or give
up. Time is passed in as ``now`` (float seconds on any monotonic clock) and
jitter comes from an injectable :class:`random.Random`, so a test can script
both. :mod:`psgrid.supervisor.base` carries the decisions out.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import math
import random
import signal as signal_module

from psgrid.backoff import Backoff

logger = logging.getLogger(__name__)


class RestartType(str, enum.Enum):
    """When a child is restarted after it exits (OTP's ``restart`` flag)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit (see ExitReason.normal)
    TEMPORARY = "temporary"  # never, not even when a sibling's crash stops it


class Strategy(str, enum.Enum):
    """Which children restart when one of them crashes (OTP's strategies).

    ONE_FOR_ONE restarts the crashed child alone; ONE_FOR_ALL stops and restarts
    every child; REST_FOR_ONE the crashed child and those started after it.
    """

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """One supervised child: its name, restart type, back-off and timeouts.

    Back-off delays are ``backoff_initial_s * backoff_multiplier**n`` capped at
    ``backoff_max_s``, each drawn from ``[d*(1-jitter), d]``. A child that ran
    ``healthy_after_s`` since its last start has its back-off reset when it
    exits. ``liveness_timeout_s`` (None: no health checks) is how long a child
    may fail its health check, or take to answer the first one after a start,
    before it is killed. ``shutdown_s`` is the grace between SIGTERM and SIGKILL.
    """

    name: str
    restart: RestartType = RestartType.PERMANENT
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.5
    healthy_after_s: float = 60.0
    liveness_timeout_s: float | None = None
    shutdown_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"child name must be a non-empty string, got {self.name!r}")
        # Accept "transient" from a config file; RestartType() names a bad value.
        object.__setattr__(self, "restart", RestartType(self.restart))
        for field in ("backoff_initial_s", "backoff_max_s", "shutdown_s"):
            _positive(f"{self.name}: {field}", getattr(self, field))
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(f"{self.name}: backoff_initial_s {self.backoff_initial_s} "
                             f"exceeds backoff_max_s {self.backoff_max_s}")
        if not self.backoff_multiplier >= 1:
            raise ValueError(f"{self.name}: backoff_multiplier must be >= 1, got {self.backoff_multiplier!r}")
        if not 0 <= self.backoff_jitter <= 1:
            raise ValueError(f"{self.name}: backoff_jitter must lie in [0, 1], got {self.backoff_jitter!r}")
        if not self.healthy_after_s >= 0:
            raise ValueError(f"{self.name}: healthy_after_s must be >= 0, got {self.healthy_after_s!r}")
        if self.liveness_timeout_s is not None:
            _positive(f"{self.name}: liveness_timeout_s", self.liveness_timeout_s)

    def new_backoff(self, rng: random.Random) -> Backoff:
        """A fresh :class:`Backoff` with this child's settings, drawing jitter from ``rng``."""
        return Backoff(initial=self.backoff_initial_s, maximum=self.backoff_max_s,
                       multiplier=self.backoff_multiplier, jitter=self.backoff_jitter, rng=rng)


@dataclasses.dataclass(frozen=True)
class SupervisorSpec:
    """A supervisor: strategy, restart intensity and children in start order.

    More than ``max_restarts`` restarts within ``period_s`` seconds and the
    supervisor gives up (OTP's intensity and period). ``max_restarts=0`` means
    the first crash that would need a restart ends the supervisor.
    """

    children: tuple[ChildSpec, ...]
    strategy: Strategy = Strategy.ONE_FOR_ONE
    max_restarts: int = 3
    period_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "children", tuple(self.children))
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) \
                or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")
        _positive("period_s", self.period_s)
        seen: set[str] = set()
        for child in self.children:
            if not isinstance(child, ChildSpec):
                raise ValueError(f"children must be ChildSpec, got {child!r}")
            if child.name in seen:
                raise ValueError(f"duplicate child name {child.name!r}")
            seen.add(child.name)

    @property
    def names(self) -> tuple[str, ...]:
        """Child names in start order."""
        return tuple(child.name for child in self.children)

    def child(self, name: str) -> ChildSpec:
        """The spec of child ``name``; KeyError when there is none."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no child named {name!r}")


class ExitKind(str, enum.Enum):
    """How a child ended."""

    EXITED = "exited"              # returned an exit code
    SIGNALED = "signaled"          # killed by a signal it did not expect
    LIVENESS = "liveness"          # killed by the supervisor for failing health checks
    START_FAILED = "start_failed"  # start_child raised: the child never ran
    SHUTDOWN = "shutdown"          # stopped by the supervisor on purpose


@dataclasses.dataclass(frozen=True)
class ExitReason:
    """Why a child is no longer running. Build one with the class methods."""

    kind: ExitKind
    code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ExitKind(self.kind))
        if (self.kind is ExitKind.EXITED) != isinstance(self.code, int):
            raise ValueError(f"an exit code goes with kind EXITED only, got {self.kind.value} and {self.code!r}")
        if (self.kind is ExitKind.SIGNALED) != (isinstance(self.signal, int) and self.signal > 0):
            raise ValueError(f"a signal > 0 goes with kind SIGNALED only, got {self.kind.value} and {self.signal!r}")

    @classmethod
    def exited(cls, code: int) -> ExitReason:
        return cls(ExitKind.EXITED, code=code)

    @classmethod
    def signaled(cls, signum: int) -> ExitReason:
        return cls(ExitKind.SIGNALED, signal=signum)

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitReason:
        """From ``Popen.returncode``, where ``-n`` means killed by signal ``n``."""
        return cls.signaled(-returncode) if returncode < 0 else cls.exited(returncode)

    @classmethod
    def liveness(cls) -> ExitReason:
        return cls(ExitKind.LIVENESS)

    @classmethod
    def start_failed(cls) -> ExitReason:
        return cls(ExitKind.START_FAILED)

    @classmethod
    def shutdown(cls) -> ExitReason:
        return cls(ExitKind.SHUTDOWN)

    @property
    def normal(self) -> bool:
        """Exit code 0, or a deliberate stop. A transient child restarts only when False."""
        return self.code == 0 or self.kind is ExitKind.SHUTDOWN

    def __str__(self) -> str:
        if self.kind is ExitKind.EXITED:
            return f"exit code {self.code}"
        if self.kind is ExitKind.SIGNALED:
            try:
                return f"signal {signal_module.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return self.kind.value


class RestartIntensity:
    """A sliding window of restart times: at most ``max_restarts`` in ``period_s``.

    A restart ``period_s`` ago or less still counts (OTP keeps restarts with
    ``T >= now - period``). Times passed in must not go backwards.
    """

    def __init__(self, max_restarts: int, period_s: float) -> None:
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        _positive("period_s", period_s)
        self.max_restarts = max_restarts
        self.period_s = period_s
        self._times: collections.deque[float] = collections.deque()

    def count(self, now: float) -> int:
        """Restarts within the window that ends at ``now``."""
        while self._times and self._times[0] < now - self.period_s:
            self._times.popleft()
        return len(self._times)

    def allow(self, now: float) -> bool:
        """Whether one more restart at ``now`` stays within the intensity."""
        return self.count(now) < self.max_restarts

    def record(self, now: float) -> None:
        """Count a restart at ``now``."""
        self._times.append(now)


class Action(str, enum.Enum):
    """What the supervisor does about an exit."""

    NONE = "none"        # leave the child down
    RESTART = "restart"  # stop ``Decision.stop``, wait ``delay_s``, start ``Decision.restart``
    GIVE_UP = "give_up"  # intensity exceeded: stop ``Decision.stop`` and exit non-zero


@dataclasses.dataclass(frozen=True)
class Decision:
    """The policy's answer to one exit.

    ``stop`` lists children to stop, in reverse start order, before anything
    else; it never holds the child that exited (it is already down) and may name
    children that are not running, which the supervisor skips. ``restart`` lists
    the children to start, in start order, ``delay_s`` seconds from now.
    """

    action: Action
    stop: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        if not self.delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s!r}")
        if (self.action is Action.RESTART) != bool(self.restart):
            raise ValueError(f"restart names go with action RESTART only, got {self.action.value} "
                             f"and {self.restart!r}")


class RestartPolicy:
    """Decides, child exit by child exit, what an OTP-style supervisor does.

    Stateful but pure: it holds the restart intensity, one :class:`Backoff` per
    child and each child's last start time. The caller MUST report every start
    with :meth:`started` and every unplanned exit with :meth:`on_exit`, and
    MUST NOT report children it stopped itself.
    """

    def __init__(self, spec: SupervisorSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.intensity = RestartIntensity(spec.max_restarts, spec.period_s)
        rng = rng if rng is not None else random.Random()
        self._backoffs = {child.name: child.new_backoff(rng) for child in spec.children}
        self._started_at: dict[str, float] = {}

    def started(self, name: str, now: float) -> None:
        """Note that child ``name`` (re)started at ``now``; KeyError for an unknown child."""
        self.spec.child(name)
        self._started_at[name] = now

    def backoff(self, name: str) -> Backoff:
        """The back-off of child ``name`` (for inspection)."""
        return self._backoffs[name]

    def on_exit(self, name: str, reason: ExitReason, now: float) -> Decision:
        """Decide what to do now that child ``name`` exited for ``reason`` at ``now``.

        Returns NONE for a temporary child, and for a transient one whose exit is
        normal; GIVE_UP when the restart would exceed the intensity; otherwise
        RESTART with the strategy's children and the exited child's back-off
        delay (reset first if the child ran ``healthy_after_s``). A RESTART
        counts once against the intensity, however many children it restarts.
        KeyError for an unknown child.
        """
        child = self.spec.child(name)
        if not self._wants_restart(child, reason):
            return Decision(Action.NONE)
        names = self.spec.names
        if not self.intensity.allow(now):
            others = tuple(n for n in reversed(names) if n != name)
            return Decision(Action.GIVE_UP, stop=others)
        self.intensity.record(now)
        group = self._affected(name)
        # A temporary sibling is stopped with the group but, as in OTP, never restarted.
        restart = tuple(n for n in group if n == name or self.spec.child(n).restart is not RestartType.TEMPORARY)
        stop = tuple(n for n in reversed(group) if n != name)
        return Decision(Action.RESTART, stop=stop, restart=restart, delay_s=self._delay(child, now))

    @staticmethod
    def _wants_restart(child: ChildSpec, reason: ExitReason) -> bool:
        if child.restart is RestartType.PERMANENT:
            return True
        return child.restart is RestartType.TRANSIENT and not reason.normal

    def _affected(self, name: str) -> tuple[str, ...]:
        names = self.spec.names
        if self.spec.strategy is Strategy.ONE_FOR_ALL:
            return names
        if self.spec.strategy is Strategy.REST_FOR_ONE:
            return names[names.index(name):]
        return (name,)

    def _delay(self, child: ChildSpec, now: float) -> float:
        backoff = self._backoffs[child.name]
        started = self._started_at.get(child.name)
        if started is not None and now - started >= child.healthy_after_s:
            backoff.reset()
        return backoff.next_delay()
