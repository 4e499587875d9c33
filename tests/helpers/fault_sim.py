"""Seeded fault sequences against real parameter-server shards: one thread, virtual time.

A sharded synchronous (BSP) job runs on S :class:`ParameterServerCore` shards
(shard 0 coordinates) with W workers, while a *fault plan* kills, freezes and
restarts workers and shards. :func:`run_sequence` replays one plan and returns
an :class:`Outcome`, whose :meth:`Outcome.problems` lists the invariants broken:

* **I1** at every compute, every shard served the same ``(step, lineage)`` and
  the worker's clock equals the step (its data is the step of its weights);
* **I2** every accepted push has ``seq == base_step`` (from the update logs);
* **audit** every round the final weights are made of holds each rank's batch
  exactly once, for its own step, and there are ``steps`` rounds;
* **I3** the final weights equal the fault-free run's within ``ATOL``;
* **I4** the job SUCCEEDED (not FAILED, not still running when the budget ran out).

What is real: every shard (``ParameterServerCore`` on its own
``CheckpointStore``, killed by dropping it and restarted with ``restore()``),
its reaper (``reap()`` every tick, as the app's timer calls it), and every
worker's ``psgrid.worker.runner.Worker`` with its ``ShardLinks`` (pull, push,
realign, close) and ``GradientStep``; the simulation calls the worker's own
``_register``, ``_heartbeat_once``, ``_prepare``, ``_pull_into``,
``_check_running``, ``_report_failure`` and ``_close_partitions``.

What is simulated:

* gRPC: :class:`CoreClient` calls a shard's current core in-process (the pulled
  bytes are copied, as the wire does). A pull that would wait raises NotReady at
  once and the worker asks again on a later action.
* threads: ``ShardLinks``' pool runs the shards one after the other
  (:class:`SerialPool`); the snapshot writer is a queue flushed every tick and
  lost by a kill -9 when the plan says so (:class:`ManualSaver`).
* time: one virtual clock for every core; a tick is ``TICK_S``; a worker beats
  every second.
* the job loop: ``Worker._run_job``/``_train``/``_finish`` block, so
  :class:`SimWorker` replays them one action at a time (pull and compute, push,
  final pull), making the same calls in the same order. Left out: progress
  reports (only FINISHED and EVALUATED are sent) and the evaluation itself.
* F7, not yet in the runner: a pull still waiting after ``STUCK_PULL_S`` while
  the shards disagree on this worker's ``(step, lineage, clock)`` puts them back
  in step (``SimConfig.emulate_f7``; see :meth:`SimWorker._unstick`).

The simulator also runs on trees from before pushes carried their ranks and
restore points their clock, so that it can be shown to catch what those fixed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
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
from psgrid.errors import JobNotRunning, NotAssigned, NotReady, PsgridError, PushAhead, UnknownWorker
from psgrid.server.checkpoint import CheckpointStore
from psgrid.server.config import ServerConfig
from psgrid.server.core import ParameterServerCore
from psgrid.server.steps import PushHeader
from psgrid.spec import JobSpec, JobState, OptimizerSpec
from psgrid.worker.runner import FINAL_WAIT_S, JobStopped, TrainAgain, Worker
from psgrid.worker.shards import ShardLinks, diverged

HEARTBEAT_TIMEOUT_S = 10.0
TICK_S = 0.5
#: F7 emulation: how long a pull waits before the worker looks for split shards.
STUCK_PULL_S = 30.0
#: Largest difference from the fault-free weights allowed (union batches reassociate sums).
ATOL = 1e-5
_HEADER_HAS_RANKS = "ranks" in {f.name for f in dataclasses.fields(PushHeader)}
_PUSH_TAKES_RANKS = "ranks" in inspect.signature(ShardLinks.push).parameters


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """The job and the budget of one simulated cluster."""

    workers: int = 2
    shards: int = 2
    steps: int = 16
    #: checkpoint_every_steps: the step-aligned snapshots (restore points).
    every: int = 2
    #: Scheduler iterations before an unfinished job counts as hung.
    max_actions: int = 2500
    emulate_f7: bool = True

    def __post_init__(self) -> None:
        for field in ("workers", "steps", "every", "max_actions"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.shards < 2:
            raise ValueError(f"shards must be >= 2 (a sharded job), got {self.shards}")

    def spec(self) -> JobSpec:
        return JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:linear_regression",
                       model_kwargs={"in_features": 8, "hidden": 6, "classes": 1, "layers": 2},
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
    """One fault, injected at the first scheduler iteration >= ``at_action`` at
    which the coordinator's step is >= ``at_step``."""

    kind: FaultKind
    at_action: int = 0
    at_step: int = 0
    worker: int = 0
    shard: int = 0
    seconds: float = 0.0
    restart: bool = False
    after_shards: int = 0
    lose_write: bool = False

    def __str__(self) -> str:
        when = f"@{self.at_action}" + (f"/step>={self.at_step}" if self.at_step else "")
        what = {
            FaultKind.KILL_WORKER: f"w{self.worker} back in {self.seconds:g}s",
            FaultKind.STOP_WORKER: f"w{self.worker} for {self.seconds:g}s" + (", then restarted" if self.restart else ""),
            FaultKind.DIE_MID_PUSH: f"w{self.worker} after {self.after_shards} shard(s), back in {self.seconds:g}s",
            FaultKind.KILL_SHARD: f"shard-{self.shard}" + (", losing its unsaved snapshot" if self.lose_write else ""),
        }[self.kind]
        return f"{self.kind.value} {what} {when}"


def random_plan(cfg: SimConfig, seed: int) -> tuple[Fault, ...]:
    """One to five faults at random points of the job's first actions (the plan of ``seed``)."""
    rng = random.Random(seed)
    window = 2 * cfg.steps * cfg.workers + 20
    ats = sorted(rng.randrange(30, window) for _ in range(rng.randint(1, 5)))
    return tuple(_random_fault(cfg, rng, at) for at in ats)


def _random_fault(cfg: SimConfig, rng: random.Random, at: int) -> Fault:
    r, worker = rng.random(), rng.randrange(cfg.workers)
    if r < 0.2:  # fast restart, back-off, or past the heartbeat timeout (dropped)
        return Fault(FaultKind.KILL_WORKER, at, worker=worker, seconds=rng.choice([0, 2, HEARTBEAT_TIMEOUT_S + 5]))
    if r < 0.4:
        return Fault(FaultKind.STOP_WORKER, at, worker=worker, restart=rng.random() < 0.5,
                     seconds=rng.choice([2, HEARTBEAT_TIMEOUT_S + 3, 2 * HEARTBEAT_TIMEOUT_S]))
    if r < 0.5:
        return Fault(FaultKind.DIE_MID_PUSH, at, worker=worker, after_shards=rng.randrange(cfg.shards),
                     seconds=rng.choice([0, HEARTBEAT_TIMEOUT_S + 5]))
    return Fault(FaultKind.KILL_SHARD, at, shard=rng.randrange(cfg.shards), lose_write=rng.random() < 0.5)


class Died(Exception):
    """The simulated worker process is killed in the middle of an action."""


class SerialPool:
    """ShardLinks' pool, one shard after the other: like ``list(pool.map(...))``, every
    shard's call runs even when an earlier one failed, and the first failure is raised
    after. A killed worker (Died) stops at once."""

    def map(self, fn, items):
        out, first = [], None
        for item in items:
            try:
                out.append(fn(item))
            except Died:
                raise
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
            self.note(f"{os.path.basename(self.path)}: restore to version {e['version']}")
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


class CoreClient:
    """The ParameterServerClient surface Worker and ShardLinks use, on a core in-process.
    Every call goes to the shard's *current* core, so restarts show through."""

    def __init__(self, cluster: Cluster, shard: int):
        self.cluster, self.shard = cluster, shard
        self.address = address(shard)
        self.stop = threading.Event()

    @property
    def core(self) -> ParameterServerCore:
        return self.cluster.cores[self.shard]

    def register(self, name, host, pid, device):
        return self.core.register_worker(name, host, pid, device).worker_id, self.core.config.heartbeat_interval_s

    def heartbeat(self, worker_id, job_id):
        return self.core.heartbeat(worker_id, job_id)

    def pull(self, job_id, worker_id, clock, final, buffer_for, wait_s=None):
        r = self.core.pull(job_id, worker_id, clock, final, 0.0)  # NotReady at once: asked again later
        buf = None
        if r.payload is not None:
            n = r.layout.total_bytes
            buf = buffer_for(n)
            buf[:n].copy_(r.payload[:n])
        return Pulled(r.state, r.version, r.step, r.layout, buf, r.clock, tuple(r.ranks), r.lineage)

    def push(self, header, payload):
        sim = self.cluster.acting
        if not header.init:
            sim.reach_shard()  # raises Died where the plan kills it
        fields = dict(job_id=header.job_id, worker_id=header.worker_id, seq=header.seq,
                      base_version=header.base_version, base_step=header.base_step, init=header.init,
                      samples=header.samples,
                      layout=codec.layout_from_proto(header.tensors, self.core.config.max_payload_bytes))
        if _HEADER_HAS_RANKS:
            fields["ranks"] = tuple(header.ranks)
        h = PushHeader(**fields)
        audit = self.cluster.audits[self.shard]
        audit.scan()
        try:
            version, duplicate = self.core.push(h, [memoryview(payload[: h.layout.total_bytes].numpy())])
            if not (h.init or duplicate):
                audit.accepted(sim.name, h.seq, sim.computed_ranks)
        finally:
            audit.scan()
        return version, duplicate

    def open_partition(self, job_id, spec, worker_names, index, count):
        self.core.open_partition(job_id, spec, list(worker_names))

    def close_partition(self, job_id, worker_id, state):
        self.core.close_partition(job_id, worker_id, state)

    def restore_points(self, job_id, worker_id):
        return self.core.restore_points(job_id, worker_id)

    def roll_back(self, job_id, worker_id, point, expect_timeline):
        return self.core.roll_back(job_id, worker_id, point[0], point[1], expect_timeline)

    def report(self, worker_id, job_id, phase, step=0, total_steps=0, loss=float("nan"), samples=0,
               seconds=0.0, metrics=None, error=""):
        return self.core.report(worker_id, job_id, phase, step, total_steps, loss, samples, seconds,
                                dict(metrics or {}), error)

    def close(self) -> None:
        pass


def address(shard: int) -> str:
    return f"shard-{shard}:{7000 + shard}"


class Phase(str, enum.Enum):
    """Where a simulated worker process is: BOOT -> IDLE -> TRAIN <-> PUSH -> FINISH -> IDLE."""

    BOOT = "boot"
    IDLE = "idle"
    TRAIN = "train"
    PUSH = "push"
    FINISH = "finish"


class SimWorker:
    """One worker process: a real Worker, driven one action at a time (see the module doc)."""

    def __init__(self, cluster: Cluster, name: str, start_at: float | None = None):
        self.cluster, self.name = cluster, name
        self.worker = Worker(CoreClient(cluster, 0), device="cpu", name=name)
        links = self.worker.shards
        links._clients = {address(k): CoreClient(cluster, k) for k in range(1, cluster.cfg.shards)}
        links._pool = SerialPool()
        self.phase = Phase.BOOT
        self.a = self.step = self.pulled = None
        self.clock = self.rows = 0
        self.computed_ranks: tuple[int, ...] = ()
        #: SIGSTOPped (or not started yet) until then.
        self.asleep_until = start_at
        self.restart_on_wake = False
        #: DIE_MID_PUSH: shards its next push reaches before it dies, and its restart delay.
        self.pushes_left: int | None = None
        self.back_after = 0.0
        self.next_beat = 0.0
        self.waiting_since: float | None = None

    def runnable(self) -> bool:
        return self.asleep_until is None and (self.phase is not Phase.IDLE or bool(self.worker._assignments))

    def reach_shard(self) -> None:
        if self.pushes_left is not None:
            if self.pushes_left == 0:
                raise Died()
            self.pushes_left -= 1

    def beat(self) -> None:
        """The heartbeat thread's beat (other shards first, then the coordinator)."""
        if self.asleep_until is None and self.phase is not Phase.BOOT:
            with contextlib.suppress(PsgridError):  # the loop logs it and beats again
                self.worker._heartbeat_once()

    def act(self) -> None:
        """One action of Worker.run/_run_job: what it does next, up to where it would block."""
        if self.phase is Phase.BOOT:
            self.worker._register()
            self.phase = Phase.IDLE
        elif self.phase is Phase.IDLE:
            self._start_job()
        else:
            self._act_in_job()

    def _start_job(self) -> None:
        w = self.worker
        a = w._assignments.pop(0)
        w._current_job = a.job_id
        w._job_ended.clear()
        try:
            self.step = w._prepare(a)  # opens the other shards; rank 0 pushes the initial weights
        except Died:
            raise
        except Exception as exc:  # noqa: BLE001 - as _run_job: any failure to build the job fails it
            self.cluster.note(f"{self.name} cannot run the job: {type(exc).__name__}: {exc}")
            w._report_failure(a, f"{type(exc).__name__}: {exc}")
            w._current_job = ""
            return
        self.a, self.clock, self.phase = a, a.start_step, Phase.TRAIN

    def _act_in_job(self) -> None:
        w = self.worker
        try:
            {Phase.TRAIN: self._train_once, Phase.PUSH: self._push_once, Phase.FINISH: self._finish_once}[self.phase]()
        except TrainAgain as again:
            self.clock, self.phase = again.clock, Phase.TRAIN
        except JobStopped:
            if w.shards.count > 1:
                w._close_partitions(self.a)
            self._leave_job()
        except (JobNotRunning, NotAssigned, UnknownWorker):
            self._leave_job()
        except PsgridError as exc:  # what _run_job reports as FAILED (ShardsDiverged, ...)
            self.cluster.note(f"{self.name} fails the job: {type(exc).__name__}: {exc}")
            w._report_failure(self.a, f"{type(exc).__name__}: {exc}")
            self._leave_job()

    def _leave_job(self) -> None:
        self.worker._current_job = ""
        self.phase = Phase.IDLE

    @property
    def total(self) -> int:
        return self.step.sampler.total_steps(self.a.spec.epochs, self.a.spec.steps)

    def _train_once(self) -> None:
        """One turn of _train's loop up to the push: pull (realigning if need be), compute."""
        w, a = self.worker, self.a
        if self.clock >= self.total:
            w.client.report(w.worker_id, a.job_id, "FINISHED", step=self.total, total_steps=self.total)
            self.phase = Phase.FINISH
            return
        w._check_running()
        try:
            pulled = w._pull_into(self.step, a, self.clock)
        except NotReady:
            self._unstick()
            return
        self.waiting_since = None
        if pulled[0].clock != self.clock:  # the server is the truth
            self.clock = pulled[0].clock
            if self.clock >= self.total:
                return
        self.cluster.check_compute(self, pulled)
        self.computed_ranks = tuple(pulled[0].ranks) or (a.rank,)
        _, self.rows = self.step.run(self.clock, pulled[0].ranks)
        self.pulled, self.phase = pulled, Phase.PUSH

    def _push_once(self) -> None:
        """The rest of the turn: push to every shard; a refused step is pulled again."""
        extra = {"ranks": self.pulled[0].ranks} if _PUSH_TAKES_RANKS else {}
        self.phase = Phase.TRAIN
        try:
            self.worker.shards.push(self.a.job_id, self.clock, self.pulled, self.step.layouts,
                                    self.step.grad_buffers, samples=self.rows, **extra)
        except PushAhead:
            return
        self.clock += 1

    def _finish_once(self) -> None:
        """One turn of _finish's loop; the evaluator checks the shards agree, reports, closes them."""
        w, a = self.worker, self.a
        if w._job_ended.is_set():
            self._leave_job()
            return
        try:
            final = w.client.pull(a.job_id, w.worker_id, self.total, True, self.step.buffer_for(0),
                                  wait_s=FINAL_WAIT_S)
        except NotReady:
            return
        if final.state.terminal:
            self._leave_job()
        elif final.layout is None and final.state is JobState.RUNNING:
            raise TrainAgain(final.clock)
        elif final.layout is not None:
            try:
                others = w.shards.pull(a.job_id, self.total, self.step.buffer_for, first=1)
            except NotReady:
                if (step := self._unstick()) is not None:
                    raise TrainAgain(step) from None
                return
            self.waiting_since = None
            if diverged([final, *others], a.spec.synchronous):
                raise TrainAgain(w.shards.realign(a.job_id))
            w.client.report(w.worker_id, a.job_id, "EVALUATED", metrics={})
            w.shards.close(a.job_id, JobState.SUCCEEDED)
            self._leave_job()

    def _unstick(self) -> int | None:
        """A pull has to wait. F7 emulation: once it waited STUCK_PULL_S and the shards
        disagree on this worker's (step, lineage, clock) (a push reached some of them
        only), put them back in step; return the step they went back to."""
        now = self.cluster.t
        if not self.cluster.cfg.emulate_f7:
            return None
        if self.waiting_since is None or now - self.waiting_since < STUCK_PULL_S:
            self.waiting_since = self.waiting_since if self.waiting_since is not None else now
            return None
        self.waiting_since = None
        links, job_id = self.worker.shards, self.a.job_id
        at = links._each(lambda k: links.client(k).restore_points(job_id, links.worker_id(k)))
        if len({(p.step, p.lineage, getattr(p, "clock", None)) for p in at}) == 1:
            return None
        self.cluster.note(f"{self.name} stuck in a pull, shards at {[(p.step, getattr(p, 'clock', None)) for p in at]}:"
                          " realign (F7 emulated)")
        return links.realign(job_id)


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
            "  timeline:", *(f"    {e}" for e in self.events[-40:]),
            f"  replay: fault_sim.run_sequence({self.cfg!r}, seed={self.seed})",
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
        self.cores = [self._start_core(k) for k in range(cfg.shards)]
        self.audits = [UpdateAudit(self._log(k), self.note) for k in range(cfg.shards)]
        self.violations: list[str] = []
        self.events: list[str] = []
        self.dropped = False
        self.acting: SimWorker | None = None
        self.workers = [SimWorker(self, f"w{i}") for i in range(cfg.workers)]
        for sim in self.workers:
            sim.act()  # register, so that the job starts on these workers
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

    def job(self, k: int):
        """The job on shard k, or None (a shard restarted before its first checkpoint)."""
        try:
            return self.cores[k].job(self.job_id)
        except PsgridError:
            return None

    def coordinator_step(self) -> int:
        job = self.job(0)
        return job.steps.global_step if job is not None and job.steps is not None else 0

    def check_compute(self, sim: SimWorker, pulled: list[Pulled]) -> None:
        """I1: before a compute, every shard is at one (step, lineage), and clock == step."""
        seen = sorted({(p.step, p.lineage, p.clock) for p in pulled})
        if len({(s, lin) for s, lin, _ in seen}) > 1:
            self.violations.append(f"I1: {sim.name} computes on shards at (step, lineage, clock) {seen}")
        elif any(p.clock != p.step for p in pulled):
            self.violations.append(f"I1: {sim.name} computes the data of step {sim.clock} on the weights "
                                   f"of step {pulled[0].step}")

    # --- the schedule --------------------------------------------------------------

    def run(self) -> Outcome:
        """Interleave ticks, worker actions and the plan's faults until the job ends or the budget does."""
        for i in range(self.cfg.max_actions):
            while self.pending and i >= self.pending[0].at_action \
                    and self.coordinator_step() >= self.pending[0].at_step:
                self._inject(self.pending.pop(0))
            ready = [sim for sim in self.workers if sim.runnable()]
            if not ready or self.rng.random() < 0.25:
                self.tick()
                continue
            self._act(self.rng.choice(ready))
            job = self.job(0)
            if job is not None and job.state.terminal:
                break
        return self._outcome()

    def _act(self, sim: SimWorker) -> None:
        self.acting = sim
        try:
            sim.act()
        except Died:
            self.note(f"{sim.name} killed mid-push")
            self._restart_worker(sim, sim.back_after)
        finally:
            self.acting = None

    def tick(self) -> None:
        """TICK_S of virtual time: wake-ups, heartbeats, the reapers, the snapshot writers."""
        self.t += TICK_S
        for sim in list(self.workers):
            if sim.asleep_until is not None and self.t >= sim.asleep_until:
                sim.asleep_until = None
                if sim.restart_on_wake:  # the supervisor found it hung: kill -9, start again
                    self._restart_worker(sim, 0.0)
        for sim in self.workers:
            if self.t >= sim.next_beat:
                sim.beat()
                sim.next_beat = self.t + 1.0
        for k, core in enumerate(self.cores):
            lost = core.reap()
            if lost:
                self.dropped = True
                self.note(f"shard-{k} drops {len(lost)} worker(s) from the barrier")
        for core in self.cores:
            core.snapshots._saver.flush()

    # --- faults --------------------------------------------------------------------

    def _inject(self, fault: Fault) -> None:
        self.note(f"FAULT {fault}")
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
        new = SimWorker(self, sim.name, start_at=self.t + after if after else None)
        self.workers[self.workers.index(sim)] = new

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
                weights.append({k: v.clone() for k, v in r.layout.views(r.payload).items()})
            except PsgridError:
                weights.append(None)
        return Outcome(self.cfg, self.seed, self.plan, job.state if job else None,
                       job.error if job else "no job on the coordinator", weights, violations,
                       self.events, self.dropped)

    def close(self) -> None:
        for core in self.cores:
            core.close()
        for audit in self.audits:
            audit.close()


@contextlib.contextmanager
def _quiet_single_thread():
    """One torch thread (tiny tensors; determinism) and no per-fault log records."""
    threads, logger = torch.get_num_threads(), logging.getLogger("psgrid")
    level = logger.level
    torch.set_num_threads(1)
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)


def run_sequence(cfg: SimConfig, seed: int, plan: tuple[Fault, ...] | None = None) -> Outcome:
    """Run ``plan`` (default: ``random_plan(cfg, seed)``), the schedule drawn from ``seed``.
    The same arguments replay the same sequence."""
    plan = random_plan(cfg, seed) if plan is None else tuple(plan)
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with _quiet_single_thread(), tempfile.TemporaryDirectory(prefix="psgrid-faults-", dir=tmp) as root:
        cluster = Cluster(cfg, seed, plan, root)
        try:
            return cluster.run()
        finally:
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
