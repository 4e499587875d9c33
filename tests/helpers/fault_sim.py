"""Seeded fault sequences against real parameter-server shards and workers, on virtual time.

A sharded synchronous (BSP) job runs on S :class:`ParameterServerCore` shards
(shard 0 coordinates) with W workers, while a *fault plan* kills, freezes and
restarts workers and shards. :func:`run_sequence` replays one plan and returns
an :class:`Outcome`, whose :meth:`Outcome.problems` lists the invariants broken:

* **I1** at every compute, every shard served the same ``(step, lineage)`` and
  the worker's clock equals the step (its data is the step of its weights);
* **I2** every accepted push has ``seq == base_step`` (from the update logs);
* **audit** every round the final weights are made of holds each rank's batch
  exactly once, for its own step, and there are ``steps`` rounds;
* **I3** the final weights equal the fault-free run's within ``ATOL`` (with
  ``SimConfig(tables=True)``, every row of the model's embedding tables too);
* **I4** the job SUCCEEDED (not FAILED, not still running when the budget ran out).

What is real: every shard (``ParameterServerCore`` on its own
``CheckpointStore``; killed by dropping it, restarted with ``restore()``) and its
reaper (``reap()`` every tick, as the app's timer calls it); every worker's
``psgrid.worker.runner.Worker`` running its own ``_run_job`` (``_prepare``,
``_train``, ``_finish``, realignment, failure reports) with its ``ShardLinks``
and ``GradientStep``; its heartbeat (``_heartbeat_once``).

What is simulated:

* gRPC: :class:`CoreClient` calls a shard's *current* core in-process (the
  pulled bytes are copied, as the wire does). A pull that must wait is asked
  again later, and raises NotReady once ``wait_s`` of virtual time has passed,
  as ``ParameterServerClient.pull`` does. A killed shard is back at once.
* threads: each worker process is one thread, but only one thread runs at a
  time. The scheduler (the caller's thread) hands the baton to a worker, which
  hands it back at its next call to a shard (:meth:`SimWorker.pause`), so each
  seed gives one interleaving. Progress reports are not such points (the
  runner sends them on wall-clock time). The heartbeat thread is a call to
  ``_heartbeat_once`` every virtual second between turns; ``ShardLinks``' pool
  runs the shards one after the other (:class:`SerialPool`); the snapshot writer
  is a queue flushed every tick and lost by a kill -9 when the plan says so.
* time: one virtual clock for every core and for the worker's ``_job_ended``
  waits; a tick is ``TICK_S``.
* the process: a thread that registers, waits for an assignment and calls
  ``_run_job`` (``Worker.run``'s loop); kill -9 ends it at its next call
  (:class:`Died`); SIGSTOP leaves it and its heartbeat unscheduled.

The simulator also runs on trees from before pushes carried their ranks, so
that it can be shown to catch what the later fixes fixed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import random
import tempfile
import threading
import traceback
from collections.abc import Callable

import torch

from psgrid import codec
from psgrid.codec import Pulled
from psgrid.errors import NotReady, PsgridError
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.core import ParameterServerCore
from psgrid.server.steps import PushHeader
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.worker.runner import Worker

HEARTBEAT_TIMEOUT_S = 10.0
TICK_S = 0.5
#: Chance that the scheduler lets virtual time pass instead of running a worker.
TICK_CHANCE = 0.25
#: Largest difference from the fault-free weights allowed (union batches reassociate sums).
ATOL = 1e-5
#: Real seconds a worker thread may hold the baton before the simulation is declared stuck.
BATON_TIMEOUT_S = 60.0
_HEADER_HAS_RANKS = "ranks" in {f.name for f in dataclasses.fields(PushHeader)}
_HEADER_HAS_TABLES = "row_tables" in {f.name for f in dataclasses.fields(PushHeader)}
#: Rows of the user and item tables of SimConfig(tables=True): every row is compared (I3).
TABLE_ROWS = (40, 16)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """The job and the budget of one simulated cluster."""

    workers: int = 2
    shards: int = 2
    steps: int = 12
    #: checkpoint_every_steps: the step-aligned snapshots (restore points).
    every: int = 2
    #: Scheduler turns before an unfinished job counts as hung.
    max_turns: int = 6000
    #: Train a model with embedding tables on the servers (psgrid.sparse) instead of a linear one.
    tables: bool = False

    def __post_init__(self) -> None:
        for field in ("workers", "steps", "every", "max_turns"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.shards < 2:
            raise ValueError(f"shards must be >= 2 (a sharded job), got {self.shards}")

    def spec(self) -> JobSpec:
        if self.tables:
            return JobSpec(model="psgrid.examples.recsys:two_tower",
                           model_kwargs={"num_users": TABLE_ROWS[0], "num_items": TABLE_ROWS[1], "dim": 4,
                                         "hidden": 8, "optimizer": "sparse_adam", "lr": 0.05},
                           dataset="psgrid.examples.recsys:planted_ratings",
                           dataset_kwargs={"num_users": TABLE_ROWS[0], "num_items": TABLE_ROWS[1], "n": 256,
                                           "test_n": 32},
                           batch_size=8, steps=self.steps, num_workers=self.workers, staleness=0, seed=3,
                           optimizer=OptimizerSpec("adam", lr=0.05))
        return JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
                       dataset_kwargs={"n": 256}, batch_size=8, steps=self.steps, num_workers=self.workers,
                       staleness=0, seed=3, optimizer=OptimizerSpec("adam", lr=0.05))


class FaultKind(str, enum.Enum):
    #: kill -9 a worker; its supervisor starts it again after ``seconds``.
    KILL_WORKER = "kill-worker"
    #: SIGSTOP a worker for ``seconds``; then SIGCONT, or (``restart``) kill -9 and start again.
    STOP_WORKER = "stop-worker"
    #: The worker dies in its next push, after reaching ``after_shards`` shards; back after ``seconds``.
    DIE_MID_PUSH = "die-mid-push"
    #: kill -9 a shard (0: the coordinator), restarted from its checkpoints at once;
    #: ``lose_write``: the snapshot still waiting for the disk is lost.
    KILL_SHARD = "kill-shard"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault, injected at the first scheduler turn >= ``at_turn`` at which the
    coordinator's step is >= ``at_step``."""

    kind: FaultKind
    at_turn: int = 0
    at_step: int = 0
    worker: int = 0
    shard: int = 0
    seconds: float = 0.0
    restart: bool = False
    after_shards: int = 0
    lose_write: bool = False

    def __str__(self) -> str:
        when = f"@{self.at_turn}" + (f"/step>={self.at_step}" if self.at_step else "")
        what = {
            FaultKind.KILL_WORKER: f"w{self.worker} back in {self.seconds:g}s",
            FaultKind.STOP_WORKER: f"w{self.worker} for {self.seconds:g}s" + (", restarted" if self.restart else ""),
            FaultKind.DIE_MID_PUSH: f"w{self.worker} after {self.after_shards} shard(s), back in {self.seconds:g}s",
            FaultKind.KILL_SHARD: f"shard-{self.shard}" + (", losing its unsaved snapshot" if self.lose_write else ""),
        }[self.kind]
        return f"{self.kind.value} {what} {when}"


def random_plan(cfg: SimConfig, seed: int) -> tuple[Fault, ...]:
    """One to five faults at random turns while the job runs (the plan of ``seed``).

    Not in the first turns: a coordinator killed before the job's first step-aligned
    snapshot reaches its disk loses the job (a running sharded BSP job is checkpointed
    by step only), a known limit and not what this explores.
    """
    rng = random.Random(seed)
    window = 6 * cfg.steps * cfg.workers + 40
    turns = sorted(rng.randrange(40, window) for _ in range(rng.randint(1, 5)))
    return tuple(_random_fault(cfg, rng, turn) for turn in turns)


def _random_fault(cfg: SimConfig, rng: random.Random, turn: int) -> Fault:
    r, worker = rng.random(), rng.randrange(cfg.workers)
    if r < 0.2:  # fast restart, back-off, or past the heartbeat timeout (dropped)
        return Fault(FaultKind.KILL_WORKER, turn, worker=worker, seconds=rng.choice([0, 2, HEARTBEAT_TIMEOUT_S + 5]))
    if r < 0.4:
        return Fault(FaultKind.STOP_WORKER, turn, worker=worker, restart=rng.random() < 0.5,
                     seconds=rng.choice([2, HEARTBEAT_TIMEOUT_S + 3, 2 * HEARTBEAT_TIMEOUT_S]))
    if r < 0.5:
        return Fault(FaultKind.DIE_MID_PUSH, turn, worker=worker, after_shards=rng.randrange(cfg.shards),
                     seconds=rng.choice([0, HEARTBEAT_TIMEOUT_S + 5]))
    return Fault(FaultKind.KILL_SHARD, turn, shard=rng.randrange(cfg.shards), lose_write=rng.random() < 0.5)


class Died(BaseException):
    """kill -9 of a simulated worker: unwinds its thread through every ``except Exception``."""


class SerialPool:
    """ShardLinks' pool, one shard after the other: like ``list(pool.map(...))``, every
    shard's call runs even when an earlier one failed, and the first failure is raised after."""

    def map(self, fn, items):
        out, first = [], None
        for item in items:
            try:
                out.append(fn(item))
            except Exception as exc:  # noqa: BLE001 - re-raised below, as the pool's map does
                first = first or exc
                out.append(None)
        if first is not None:
            raise first
        return out

    def shutdown(self, wait: bool = True) -> None:
        pass


class ManualSaver:
    """Stands in for the snapshot writer thread: writes run when flushed, or never (kill -9)."""

    def __init__(self):
        self.queue = []

    def submit(self, fn, *args) -> None:
        self.queue.append((fn, args))

    def flush(self) -> None:
        while self.queue:
            fn, args = self.queue.pop(0)
            fn(*args)

    def shutdown(self, wait: bool = True) -> None:
        pass


class UpdateAudit:
    """Follows one shard's update log as it grows: checks I2 on every accepted push,
    and keeps which ranks' data each round still in the weights was made of."""

    def __init__(self, path: str, note: Callable[[str], None]):
        self.path, self.note, self.file = path, note, None
        #: (worker name, seq) -> ranks of the last push of it the shard accepted.
        self.ranks: dict[tuple[str, int], tuple[int, ...]] = {}
        self.rounds: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        self.violations: list[str] = []

    def accepted(self, name: str, seq: int, ranks: tuple[int, ...]) -> None:
        self.ranks[(name, seq)] = ranks

    def scan(self) -> None:
        """Read the lines written since the last scan (call it before and after every push)."""
        if self.file is None:
            if not os.path.exists(self.path):
                return
            self.file = open(self.path, "rb")  # noqa: SIM115 - kept open: it is read as it grows
        data = self.file.read()
        end = data.rfind(b"\n") + 1
        self.file.seek(end - len(data), os.SEEK_CUR)  # a partly written line is read again next time
        for line in data[:end].splitlines():
            self._read(json.loads(line))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _read(self, e: dict) -> None:
        if e["event"] == "restore":  # a restart or a roll-back: the rounds from its version on are undone
            self.note(f"{os.path.basename(self.path)}: back to version {e['version']}")
            self.rounds = {r: c for r, c in self.rounds.items() if r < e["version"]}
        elif e["event"] == "update":
            if e["seq"] != e["base_step"]:
                self.violations.append(f"I2: {os.path.basename(self.path)} accepted {e['worker_name']} "
                                       f"seq {e['seq']} computed on the weights of step {e['base_step']}")
            ranks = self.ranks.get((e["worker_name"], e["seq"]), ())
            self.rounds.setdefault(e["version"] - 1, []).append((e["seq"], ranks))

    def round_problems(self, workers: int, steps: int) -> list[str]:
        name, problems = os.path.basename(self.path), []
        for r, content in sorted(self.rounds.items()):
            seqs = sorted({seq for seq, _ in content})
            ranks = sorted(x for _, rs in content for x in rs)
            if seqs != [r] or ranks != list(range(workers)):
                problems.append(f"audit: {name} round {r} holds steps {seqs} of ranks {ranks}")
        if len(self.rounds) != steps:
            problems.append(f"audit: {name} final weights hold {len(self.rounds)} rounds, not {steps}")
        return problems


def address(shard: int) -> str:
    return f"shard-{shard}:{7000 + shard}"


class CoreClient:
    """The ParameterServerClient surface Worker and ShardLinks use, on a core in-process,
    for one worker process. Every call goes to the shard's *current* core (restarts
    show through) and, made from the worker's thread, is a point where it hands over."""

    def __init__(self, sim: SimWorker, shard: int):
        self.sim, self.cluster, self.shard = sim, sim.cluster, shard
        self.address = address(shard)
        self.stop = threading.Event()

    @property
    def core(self) -> ParameterServerCore:
        return self.cluster.cores[self.shard]

    def register(self, name, host, pid, device):
        self.sim.pause()
        return self.core.register_worker(name, host, pid, device).worker_id, self.core.config.heartbeat_interval_s

    def heartbeat(self, worker_id, job_id, wait_s=0.0):
        # An idle worker's long poll: here the scheduler's next turn is the wait.
        self.sim.pause()
        return self.core.heartbeat(worker_id, job_id)

    def push_segment(self, job_id, worker_id):
        return None  # calls into the core: no step stream, no shared memory

    def pull(self, job_id, worker_id, clock, final, buffer_for, wait_s=None):
        started = self.cluster.t
        self.sim.pause()
        while True:
            try:
                r = self.core.pull(job_id, worker_id, clock, final, 0.0)
                break
            except NotReady:
                if wait_s is not None and self.cluster.t - started >= wait_s:
                    raise
                self.sim.pause(until=self.cluster.changed_since(self.cluster.changes))
        buf = None
        if r.payload is not None:
            n = r.layout.total_bytes
            buf = buffer_for(n)
            buf[:n].copy_(r.payload[:n])
        pulled = Pulled(r.state, r.version, r.step, r.layout, buf, r.clock, tuple(r.ranks), r.lineage)
        if not final and buf is not None:
            self.sim.last_pulled[self.shard] = pulled
        return pulled

    def push(self, header, payload, then_pull_s=None):
        # A pull sent ahead on the step stream is served by the next pull() here: the
        # core answers a pull with where the worker is when it is served, either way.
        self.sim.pause()
        if not header.init:
            self.sim.reach_shard(self.shard)  # checks I1; raises Died where the plan kills it
        fields = dict(job_id=header.job_id, worker_id=header.worker_id, seq=header.seq,
                      base_version=header.base_version, base_step=header.base_step, init=header.init,
                      samples=header.samples,
                      layout=codec.layout_from_proto(header.tensors, self.core.config.max_payload_bytes))
        if _HEADER_HAS_RANKS:
            fields["ranks"] = tuple(header.ranks)
        if _HEADER_HAS_TABLES:
            from psgrid import messages

            fields["tables"] = tuple(messages.table_from_proto(t) for t in header.tables)
            fields["row_tables"] = header.row_tables
        h = PushHeader(**fields)
        audit = self.cluster.audits[self.shard]
        audit.scan()
        try:
            version, duplicate = self.core.push(h, [memoryview(payload[: h.layout.total_bytes].numpy())])
            if not (h.init or duplicate):
                audit.accepted(self.sim.name, h.seq, self.sim.computed_ranks)
        finally:
            audit.scan()
        return version, duplicate

    def pull_rows(self, job_id, worker_id, table, ids):
        self.sim.pause()
        rows, _ = self.core.pull_rows(job_id, worker_id, table.name, ids)
        return rows.clone()

    def push_rows(self, job_id, worker_id, seq, rows):
        self.sim.pause()
        self.core.push_rows(job_id, worker_id, seq, {n: (i.clone(), g.clone()) for n, (i, g) in rows.items()})

    def open_partition(self, job_id, spec, worker_names, index, count):
        self.sim.pause()
        self.core.open_partition(job_id, spec, list(worker_names))

    def close_partition(self, job_id, worker_id, state):
        self.sim.pause()
        self.core.close_partition(job_id, worker_id, state)

    def restore_points(self, job_id, worker_id):
        self.sim.pause()
        return self.core.restore_points(job_id, worker_id)

    def roll_back(self, job_id, worker_id, point, expect_timeline):
        self.sim.pause()
        return self.core.roll_back(job_id, worker_id, point[0], point[1], expect_timeline)

    def report(self, worker_id, job_id, phase, step=0, total_steps=0, loss=float("nan"), samples=0,
               seconds=0.0, metrics=None, error=""):
        return self.core.report(worker_id, job_id, phase, step, total_steps, loss, samples, seconds,
                                dict(metrics or {}), error)

    def close(self) -> None:
        pass

    def close_streams(self) -> None:
        pass


class VirtualEvent(threading.Event):
    """The worker's ``_job_ended``: its timed waits pass on virtual time."""

    def __init__(self, sim: SimWorker):
        super().__init__()
        self.sim = sim

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else self.sim.cluster.t + timeout
        self.sim.pause(until=lambda: self.is_set() or (end is not None and self.sim.cluster.t >= end))
        return self.is_set()


class SimWorker:
    """One worker process: a real Worker in a thread that runs only while it holds the baton.

    Worker ``w{index}`` registers ``index``-th, so it holds rank ``index`` of the job.
    """

    def __init__(self, cluster: Cluster, index: int, start_at: float | None = None):
        self.cluster, self.index, self.name = cluster, index, f"w{index}"
        self.worker = Worker(CoreClient(self, 0), device="cpu", name=self.name)
        self.worker._job_ended = VirtualEvent(self)
        links = self.worker.shards
        links._clients = {address(k): CoreClient(self, k) for k in range(1, cluster.cfg.shards)}
        links._pool = SerialPool()
        #: SIGSTOPped (or not started yet) until then.
        self.asleep_until = start_at
        self.restart_on_wake = False
        #: DIE_MID_PUSH: shards its next push reaches before it dies, and its restart delay.
        self.pushes_left: int | None = None
        self.back_after = 0.0
        self.next_beat = 0.0
        #: The weights of each shard it last pulled to compute on, and the ranks of that compute.
        self.last_pulled: dict[int, Pulled] = {}
        self.computed_ranks: tuple[int, ...] = ()
        self.waits_for: Callable[[], bool] | None = None
        self.killed = self.ended = False
        self.crash: BaseException | None = None
        self._go = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=f"fault-sim-{self.name}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        self._go.acquire()
        try:
            w = self.worker
            if not self.killed:
                if not w.worker_id:
                    w._register()
                while True:  # Worker.run's loop, less its threads
                    self.pause(until=lambda: bool(w._assignments))
                    w._run_job(w._assignments.pop(0))
        except Died:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which raises it
            self.crash = exc
        finally:
            self.ended = True
            self.cluster.baton.release()

    # --- the baton ------------------------------------------------------------------

    def pause(self, until: Callable[[], bool] | None = None) -> None:
        """Hand the baton back to the scheduler, and wait for it (runnable again once
        ``until`` holds). A no-op outside the worker's thread (its heartbeat)."""
        if threading.current_thread() is not self._thread:
            return
        if self.killed:
            raise Died()
        self.waits_for = until
        self.cluster.baton.release()
        self._go.acquire()
        self.waits_for = None
        if self.killed:
            raise Died()

    def resume(self) -> None:
        """Run the worker's thread until it hands the baton back (scheduler side)."""
        self._go.release()
        if not self.cluster.baton.acquire(timeout=BATON_TIMEOUT_S):
            raise RuntimeError(f"{self.name} kept the baton for {BATON_TIMEOUT_S}s")
        if self.crash is not None:
            raise RuntimeError(f"{self.name}'s thread crashed") from self.crash

    def kill(self) -> None:
        """kill -9: the thread unwinds from where it waits."""
        self.killed = True
        if not self.ended:
            self.resume()
        self._thread.join(BATON_TIMEOUT_S)

    def runnable(self) -> bool:
        return not self.ended and self.asleep_until is None and (self.waits_for is None or self.waits_for())

    def reach_shard(self, shard: int) -> None:
        """Before a gradient push to ``shard``: check I1 once per push, and die where the plan says."""
        if shard == 0:
            pulled = [self.last_pulled.get(k) for k in range(self.cluster.cfg.shards)]
            self.cluster.check_compute(self, pulled)
            self.computed_ranks = (pulled[0] and tuple(pulled[0].ranks)) or (self.index,)
        if self.pushes_left is not None:
            if self.pushes_left == 0:
                self.killed = True
                raise Died()
            self.pushes_left -= 1

    def beat(self) -> None:
        """The heartbeat thread's beat (other shards first, then the coordinator)."""
        if not self.ended and self.asleep_until is None and self.worker.worker_id:
            with contextlib.suppress(PsgridError):  # the loop logs it and beats again
                self.worker._heartbeat_once()


@dataclasses.dataclass
class Outcome:
    """What one sequence did, and the invariants it broke during the run."""

    cfg: SimConfig
    seed: int
    plan: tuple[Fault, ...]
    state: JobState | None
    error: str
    weights: list[dict[str, torch.Tensor] | None]
    violations: list[str]
    events: list[str]
    dropped: bool

    def problems(self, reference: list[dict[str, torch.Tensor]]) -> list[str]:
        """Every invariant broken, I3 and I4 included (``reference``: the fault-free weights)."""
        found = list(self.violations)
        diff = max(_max_diff(w, r) for w, r in zip(self.weights, reference))
        if diff > ATOL:
            found.append(f"I3: final weights differ from the fault-free run's by {diff:.2e}")
        if self.state is not JobState.SUCCEEDED:
            how = "hung" if self.state in (JobState.RUNNING, JobState.EVALUATING) else "ended"
            found.append(f"I4: job {how} {self.state and self.state.value}: {self.error!r}")
        return found

    def describe(self, problems: list[str]) -> str:
        """A failure report: seed, broken invariants, plan and timeline, and how to replay it."""
        shown = problems[:6] + ([f"... {len(problems) - 6} more"] if len(problems) > 6 else [])
        return "\n".join([
            f"seed {self.seed} ({self.cfg}): {len(problems)} violation(s)",
            *(f"  - {p}" for p in shown),
            f"  plan: {[str(f) for f in self.plan]}",
            "  timeline (last 40 events):", *(f"    {e}" for e in self.events[-40:]),
            f"  replay: fault_sim.run_sequence(fault_sim.{self.cfg!r}, seed={self.seed})",
        ])


def _max_diff(a: dict | None, b: dict | None) -> float:
    if a is None or b is None:
        return float("inf")
    return max([(a[k] - b[k]).abs().max().item() for k in b], default=0.0)


class Cluster:
    """S shards and W workers on one virtual clock, running one job through a fault plan."""

    def __init__(self, cfg: SimConfig, seed: int, plan: tuple[Fault, ...], root: str):
        self.cfg, self.seed, self.root = cfg, seed, root
        self.plan, self.pending = plan, list(plan)
        self.rng = random.Random(f"schedule-{seed}")
        self.t = 1000.0
        #: Counts turns, ticks and faults: a waiting pull is asked again once something happened.
        self.changes = 0
        self.baton = threading.Semaphore(0)
        self.cores = [self._start_core(k) for k in range(cfg.shards)]
        self.audits = [UpdateAudit(self._log(k), self.note) for k in range(cfg.shards)]
        self.violations: list[str] = []
        self.events: list[str] = []
        self.dropped = False
        self.job_id = ""
        self.workers = [SimWorker(self, i) for i in range(cfg.workers)]
        for sim in self.workers:
            sim.worker._register()  # from here: the job starts on these workers, in this order
        self.job_id = self.cores[0].submit(cfg.spec()).job_id

    def _log(self, k: int) -> str:
        return os.path.join(self.root, f"updates-{k}.jsonl")

    def _start_core(self, k: int, restore: bool = False) -> ParameterServerCore:
        directory = os.path.join(self.root, f"shard-{k}")
        others = tuple(address(j) for j in range(1, self.cfg.shards)) if k == 0 else ()
        config = ServerConfig(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, checkpoint_dir=directory,
                              checkpoint_every_steps=self.cfg.every, shards=others, update_log=self._log(k))
        core = ParameterServerCore(config, clock=lambda: self.t,
                                   checkpoints=CheckpointStore(directory, keep=config.keep_checkpoints))
        core.snapshots._saver = ManualSaver()
        if restore:
            core.restore()
        return core

    def note(self, event: str) -> None:
        self.events.append(f"t={self.t - 1000:.1f} step={self.coordinator_step()} {event}")

    def changed_since(self, seen: int) -> Callable[[], bool]:
        return lambda: self.changes != seen

    def job(self, k: int):
        """The job on shard k, or None (a shard restarted before its first checkpoint)."""
        try:
            return self.cores[k].job(self.job_id)
        except PsgridError:
            return None

    def coordinator_step(self) -> int:
        job = self.job(0) if self.job_id else None
        return job.steps.global_step if job is not None and job.steps is not None else 0

    def check_compute(self, sim: SimWorker, pulled: list[Pulled | None]) -> None:
        """I1: before a compute, every shard is at one (step, lineage), and clock == step."""
        seen = sorted({(p.step, p.lineage, p.clock) for p in pulled if p is not None})
        if None in pulled or len({(s, lin) for s, lin, _ in seen}) > 1:
            self.violations.append(f"I1: {sim.name} computes on shards at (step, lineage, clock) {seen}")
        elif any(p.clock != p.step for p in pulled):
            self.violations.append(f"I1: {sim.name} computes the data of step {pulled[0].clock} on the "
                                   f"weights of step {pulled[0].step}")

    # --- the schedule --------------------------------------------------------------

    def run(self) -> Outcome:
        """Interleave ticks, worker turns and the plan's faults until the job ends or the budget does."""
        for turn in range(self.cfg.max_turns):
            while self.pending and turn >= self.pending[0].at_turn \
                    and self.coordinator_step() >= self.pending[0].at_step:
                self._inject(self.pending.pop(0))
            ready = [sim for sim in self.workers if sim.runnable()]
            if not ready or self.rng.random() < TICK_CHANCE:
                self.tick()
                continue
            self._turn(self.rng.choice(ready))
            job = self.job(0)
            if job is not None and job.state.terminal:
                break
        return self._outcome()

    def _turn(self, sim: SimWorker) -> None:
        self.changes += 1
        sim.resume()
        if sim.ended and not sim.crash and sim in self.workers:  # died mid-push
            self.note(f"{sim.name} died in a push")
            self._restart_worker(sim, sim.back_after)

    def tick(self) -> None:
        """TICK_S of virtual time: wake-ups, heartbeats, the reapers, the snapshot writers."""
        self.t += TICK_S
        self.changes += 1
        for sim in list(self.workers):
            if sim.asleep_until is not None and self.t >= sim.asleep_until:
                sim.asleep_until = None
                if sim.restart_on_wake:  # the supervisor found it hung: kill -9, start again
                    self.note(f"{sim.name} hung: killed and started again")
                    self._restart_worker(sim, 0.0)
                else:
                    self.note(f"{sim.name} runs again")
        for sim in self.workers:
            if self.t >= sim.next_beat:
                sim.beat()
                sim.next_beat = self.t + 1.0
        for k, core in enumerate(self.cores):
            if core.reap():
                self.dropped = True
                self.note(f"shard-{k} drops a worker from the barrier")
        for core in self.cores:
            core.snapshots._saver.flush()

    # --- faults --------------------------------------------------------------------

    def _inject(self, fault: Fault) -> None:
        self.note(f"FAULT {fault}")
        self.changes += 1
        sim = self.workers[fault.worker]
        if fault.kind is FaultKind.KILL_WORKER:
            self._restart_worker(sim, fault.seconds)
        elif fault.kind is FaultKind.STOP_WORKER and sim.asleep_until is None:
            sim.asleep_until, sim.restart_on_wake = self.t + fault.seconds, fault.restart
        elif fault.kind is FaultKind.DIE_MID_PUSH:
            sim.pushes_left, sim.back_after = fault.after_shards, fault.seconds
        elif fault.kind is FaultKind.KILL_SHARD:
            self._restart_shard(fault.shard, fault.lose_write)

    def _restart_worker(self, sim: SimWorker, after: float) -> None:
        sim.kill()
        self.workers[sim.index] = SimWorker(self, sim.index, start_at=self.t + after if after else None)

    def _restart_shard(self, k: int, lose_write: bool) -> None:
        saver = self.cores[k].snapshots._saver
        if not lose_write:
            saver.flush()
        saver.queue.clear()
        self.cores[k].close()
        self.cores[k] = self._start_core(k, restore=True)

    # --- the end ---------------------------------------------------------------------

    def _outcome(self) -> Outcome:
        job = self.job(0)
        violations = list(self.violations)
        for audit in self.audits:
            audit.scan()
            violations += audit.violations + audit.round_problems(self.cfg.workers, self.cfg.steps)
        weights = []
        for core in self.cores:
            try:
                r = core.fetch(self.job_id)
                found = {k: v.clone() for k, v in r.layout.views(r.payload).items()}
                tables = core.job(self.job_id).tables
                for name, rows in zip(("users", "items"), TABLE_ROWS if tables is not None else ()):
                    # every row, held here or not: the rows of the other shard are their initial values
                    found[f"table:{name}"] = tables.table(name).lookup(torch.arange(rows))
                weights.append(found)
            except PsgridError:
                weights.append(None)
        return Outcome(self.cfg, self.seed, self.plan, job.state if job else None,
                       job.error if job else "no job on the coordinator", weights, violations,
                       self.events, self.dropped)

    def close(self) -> None:
        """End every worker thread, then the cores."""
        for sim in self.workers:
            sim.kill()
        for core in self.cores:
            core.close()
        for audit in self.audits:
            audit.close()


class _EventLog(logging.Handler):
    """psgrid's warnings and errors (drops, realignments, failures) into the timeline."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.cluster: Cluster | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.cluster is not None:
            self.cluster.note(record.getMessage()[:300])


@contextlib.contextmanager
def _simulation_env():
    """One torch thread (tiny tensors; determinism); psgrid's warnings to the timeline only."""
    threads, logger, handler = torch.get_num_threads(), logging.getLogger("psgrid"), _EventLog()
    saved = logger.level, logger.propagate
    torch.set_num_threads(1)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        torch.set_num_threads(threads)


def run_sequence(cfg: SimConfig, seed: int, plan: tuple[Fault, ...] | None = None) -> Outcome:
    """Run ``plan`` (default: ``random_plan(cfg, seed)``), the schedule drawn from ``seed``.
    The same arguments replay the same sequence."""
    plan = random_plan(cfg, seed) if plan is None else tuple(plan)
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with _simulation_env() as log, tempfile.TemporaryDirectory(prefix="psgrid-faults-", dir=tmp) as root:
        cluster = Cluster(cfg, seed, plan, root)
        log.cluster = cluster
        try:
            return cluster.run()
        finally:
            log.cluster = None
            cluster.close()


def check_sequences(cfg: SimConfig, seeds: range, reference: list[dict[str, torch.Tensor]]) -> list[str]:
    """Run every seed; one report per sequence that broke an invariant (or crashed)."""
    reports = []
    for seed in seeds:
        try:
            outcome = run_sequence(cfg, seed)
        except Exception:  # noqa: BLE001 - one crash must not hide the other seeds' results
            reports.append(f"seed {seed} ({cfg}): crashed\n{traceback.format_exc(limit=-8)}")
            continue
        problems = outcome.problems(reference)
        if problems:
            reports.append(outcome.describe(problems))
    return reports
