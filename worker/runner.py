"""The worker process's loop: register, wait for a job, train it, repeat."""
from __future__ import annotations

import logging
import os
import pathlib
import socket
import threading
import time

from prometheus_client import Counter

from psgrid.errors import (JobNotRunning, NotAssigned, NotReady, PsgridError, PushAhead, ShardsDiverged,
                           Stopping, Unavailable, UnknownWorker)
from psgrid.metrics import WorkerMetrics
from psgrid.security import Security
from psgrid.spec import DEFAULT_ALLOWED_MODULES, JobState
from psgrid.dataset import ShardSampler
from psgrid.device import pick_device
from psgrid.build import build_dataset, build_model
from psgrid.worker.freeze import FreezeWatch
from psgrid.worker.outbox import Outbox
from psgrid.worker.ps_client import PULL_SLICE_S, Assignment, ParameterServerClient
from psgrid.worker.shards import ShardLinks, diverged
from psgrid.worker.step import GradientStep

logger = logging.getLogger(__name__)

#: Seconds between training-progress reports.
REPORT_EVERY_S = 0.5
#: Seconds between touches of the liveness file.
LIVENESS_EVERY_S = 0.5
#: Seconds one final pull (waiting for the others to finish training) waits at most.
FINAL_WAIT_S = 2.0
#: Times a worker puts a BSP job's drifted shards back in step before giving up.
REALIGN_TRIES = 10
#: How long a pull of a sharded BSP job waits before the worker checks that the
#: shards have not split (longer than a server's heartbeat timeout, so that the
#: brief difference while shards restart a round one after the other passes).
SPLIT_CHECK_S = 30.0


class JobStopped(Exception):
    """The job ended (cancelled, failed elsewhere) while this worker ran it."""


class TrainAgain(Exception):
    """After this worker finished, the server went back to an earlier step (a
    restore or a roll-back): it computes again from ``clock``."""

    def __init__(self, clock: int):
        super().__init__(f"train again from step {clock}")
        self.clock = clock


class Worker:
    """One worker process: a heartbeat thread and a job loop.

    Setting ``stop`` (the client's: SIGTERM does) ends :meth:`run` promptly in
    any state: every wait wakes, every call in flight is cancelled, and nothing
    more is said to the servers, so a worker dropped from a barrier while it was
    frozen does not rejoin it on its way out.
    """

    def __init__(self, client: ParameterServerClient, device: str = "auto", name: str = "",
                 liveness_file: str | os.PathLike | None = None,
                 allowed_modules: tuple[str, ...] = DEFAULT_ALLOWED_MODULES,
                 security: Security | None = None):
        self.client = client
        #: Module prefixes this worker agrees to import for a job's model and dataset.
        self.allowed_modules = allowed_modules
        #: Touched every heartbeat interval, so a supervisor can tell a hung process.
        self.liveness_file = liveness_file
        self.device_pref = device
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = client.stop
        self.worker_id = ""
        self.heartbeat_interval = 1.0
        self._current_job = ""
        self._assignments: list[Assignment] = []
        self._job_ended = threading.Event()
        self._wake = threading.Event()
        #: Set to beat at once: a job ended (the idle long poll starts now) or stopping.
        self._beat = threading.Event()
        #: Whether the process was frozen (SIGSTOP): calls after a thaw wait for a SIGTERM.
        self.freeze = FreezeWatch()
        self.metrics = WorkerMetrics()
        self.bytes_sent = Counter("psgrid_worker_bytes_sent_total", "Payload bytes pushed, as sent (compressed)",
                                  registry=self.metrics.registry)
        self.bytes_received = Counter("psgrid_worker_bytes_received_total", "Payload bytes pulled for training",
                                      registry=self.metrics.registry)
        self.shards = ShardLinks(client, lambda: self.worker_id, self.name,
                                 (socket.gethostname(), os.getpid(), str(pick_device(device))), security)

    @property
    def tag(self) -> str:
        return f"[worker {self.worker_id or self.name}]"

    def _register(self) -> None:
        device = pick_device(self.device_pref)
        self.worker_id, self.heartbeat_interval = self.client.register(
            self.name, socket.gethostname(), os.getpid(), str(device))
        logger.info("%s registered with %s as %s on %s", self.tag, self.client.address, self.name, device)

    def run(self) -> None:
        """Serve jobs until ``stop`` is set."""
        threading.Thread(target=self._hang_up_when_stopped, name="stopper", daemon=True).start()
        self.freeze.start(self.stop)
        if self.liveness_file:
            # Its own thread: "alive" must not wait for the server (registration retries).
            threading.Thread(target=self._liveness_loop, name="liveness", daemon=True).start()
        try:
            self._register()
        except Stopping:
            return
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        while not self.stop.is_set():
            if not self._assignments:
                self._wake.wait(self.heartbeat_interval)
                self._wake.clear()
                continue
            assignment = self._assignments.pop(0)
            self._run_job(assignment)
        logger.info("%s stopped", self.tag)

    def _hang_up_when_stopped(self) -> None:
        """Once stopping, wake the job loop wherever it waits (for a job, for the job's
        end) and cancel the calls in flight: closing the channels ends them at once."""
        self.stop.wait()
        self._wake.set()
        self._beat.set()
        self._job_ended.set()
        self.shards.hang_up()
        self.client.close()

    def _touch_liveness(self) -> None:
        if not self.liveness_file:
            return
        try:
            pathlib.Path(self.liveness_file).touch()
        except OSError as exc:  # the heartbeat must go on; the supervisor will notice
            logger.warning("%s cannot touch %s: %s", self.tag, self.liveness_file, exc)

    def _liveness_loop(self) -> None:
        self._touch_liveness()
        while not self.stop.wait(LIVENESS_EVERY_S):
            self._touch_liveness()

    def _heartbeat_loop(self) -> None:
        rest = self.heartbeat_interval
        while True:
            slept_from = time.monotonic()
            self._beat.wait(rest)
            self._beat.clear()
            if self.stop.is_set():
                return
            if self.freeze.hold_after_thaw(slept_from, self.stop):
                # Frozen meanwhile, and stopping: the supervisor's SIGTERM came with
                # its SIGCONT. A beat now would rejoin the barrier on the way out.
                return
            beat_from, idle = time.monotonic(), self._idle()
            try:
                self._heartbeat_once()
            except Stopping:
                return
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one bad beat
                logger.exception("%s heartbeat failed", self.tag)
            # An idle beat waited on the server for a job (a long poll): the next one
            # follows when this one's interval is up, at once if it used all of it.
            rest = self.heartbeat_interval
            if idle:
                rest = max(0.0, rest - (time.monotonic() - beat_from))

    def _idle(self) -> bool:
        return not self._current_job and not self._assignments

    def _heartbeat_once(self) -> None:
        job_id = self._current_job
        if job_id:  # first, and whatever the coordinator answers: while it is down, the
            # other shards must not drop this worker from their barriers
            self.shards.heartbeat_others(job_id)
        try:
            assignment, state = self.client.heartbeat(self.worker_id, job_id,
                                                      wait_s=self.heartbeat_interval if self._idle() else 0.0)
        except UnknownWorker:
            # The server restarted (or a newer process took our name): register
            # again; a running job is given back with the step to resume at.
            logger.warning("%s unknown to the server; registering again", self.tag)
            self._job_ended.set()
            self._safe(self._register)
            return
        except Stopping:
            raise
        except PsgridError as exc:
            logger.warning("%s heartbeat failed: %s", self.tag, exc)
            return
        if state is not None and state.terminal and self._current_job:
            self._job_ended.set()
        if assignment and all(a.job_id != assignment.job_id for a in self._assignments):
            self._assignments.append(assignment)
            self._wake.set()

    def _safe(self, fn) -> None:
        try:
            fn()
        except PsgridError as exc:
            logger.warning("%s %s", self.tag, exc)

    def _run_job(self, a: Assignment) -> None:
        self._current_job = a.job_id
        self._job_ended.clear()
        tag = f"[worker {a.rank}/{a.world_size} {a.job_id}]"
        logger.info("%s starting", tag)
        try:
            box = self._prepare(a)
        except (JobNotRunning, NotAssigned, UnknownWorker) as exc:
            # The assignment went stale (a server restarted, or the job moved on while this
            # worker registered again): not the job's fault. The next assignment says where to go.
            logger.info("%s %s; back to idle", tag, exc)
            self._current_job = ""
            return
        except Exception as exc:  # noqa: BLE001 - any other failure to build the job fails it
            logger.error("%s cannot run the job: %s", tag, exc)
            self._report_failure(a, f"{type(exc).__name__}: {exc}")
            self._current_job = ""
            return
        try:
            clock = a.start_step
            while True:
                try:
                    self._train(a, box, tag, clock)
                    self._finish(a, box, tag)
                    break
                except TrainAgain as again:
                    logger.info("%s the server went back to step %d: training again from there", tag, again.clock)
                    clock = again.clock
        except JobStopped:
            if self.stop.is_set():
                logger.info("%s stopping: leaving the job", tag)
                return
            logger.info("%s job ended elsewhere; back to idle", tag)
            if self.shards.count > 1:
                self._close_partitions(a)
        except (JobNotRunning, NotAssigned, UnknownWorker) as exc:
            logger.info("%s %s; back to idle", tag, exc)
        except Exception as exc:  # noqa: BLE001
            if self.stop.is_set():  # a call cut short by the stop, not a failure of the job
                logger.info("%s stopping: leaving the job (%s)", tag, type(exc).__name__)
                return
            logger.exception("%s failed", tag)
            self._report_failure(a, f"{type(exc).__name__}: {exc}")
        finally:
            self._current_job = ""
            self.shards.close_streams()
            self._beat.set()  # idle now: wait on the server for the next job (long poll)

    def _close_partitions(self, a: Assignment) -> None:
        try:
            state = self.client.heartbeat(self.worker_id, a.job_id)[1]
        except PsgridError as exc:
            logger.warning("%s cannot learn how %s ended: %s", self.tag, a.job_id, exc)
            return
        if state is not None and state.terminal:
            self.shards.close(a.job_id, state)

    def _report_failure(self, a: Assignment, error: str) -> None:
        try:
            self.client.report(self.worker_id, a.job_id, "FAILED", error=error)
        except PsgridError as exc:
            logger.warning("could not report the failure: %s", exc)

    def _prepare(self, a: Assignment) -> Outbox:
        spec = a.spec
        device = pick_device(spec.device or self.device_pref)
        model = build_model(spec, self.allowed_modules)
        dataset = build_dataset(spec, self.allowed_modules)
        sampler = ShardSampler(len(dataset.train_x), a.rank, a.world_size, spec.batch_size, spec.seed)
        self.shards.open(a)
        step = GradientStep(model, dataset, sampler, device, shards=self.shards.count, world_size=a.world_size)
        if step.tables:
            if spec.sync_every > 1:
                raise ValueError(f"the model has embedding tables ({', '.join(step.tables)}): they need "
                                 f"sync_every = 1, not {spec.sync_every} (their rows are updated on the servers)")
            step.row_source = self.shards.row_source(a.job_id)
        if a.rank == 0:
            payloads = [step.initial_payload(k) for k in range(self.shards.count)]
            self.shards.push(a.job_id, 0, [], step.layouts, payloads, init=True, tables=tuple(step.tables.values()))
        return Outbox(step, spec)

    def _check_running(self) -> None:
        if self.stop.is_set() or self._job_ended.is_set():
            raise JobStopped()

    def _pull_into(self, step: GradientStep, a: Assignment, clock: int) -> list:
        """Pull every shard's weights into the model; raise JobStopped once the job is over.

        A BSP job whose shards serve different steps is put back in step first
        (every shard to a step all of them hold), then pulled again there.
        """
        while True:
            pulled = self._pull_watching(a, clock, step)
            for _ in range(REALIGN_TRIES):
                if any(p.layout is None for p in pulled):
                    raise JobStopped()
                if not diverged(pulled, a.spec.synchronous):
                    break
                clock = self.shards.realign(a.job_id)
                pulled = self._pull_watching(a, clock, step)
            else:
                raise ShardsDiverged(f"the shards of job {a.job_id} are still at steps "
                                     f"{sorted({p.step for p in pulled})} after {REALIGN_TRIES} realignments")
            for shard, p in enumerate(pulled):
                step.load(shard, p.layout, p.buffer)
            if all(p.intact is None or p.intact() for p in pulled):
                return pulled
            # Read where the server keeps them, and it wrote them meanwhile (another worker's
            # push in an async job; a round applied without this worker, dropped from the
            # barrier): what was copied may be torn. The next pull asks for a copy.
            logger.debug("job %s: the weights of step %d changed while they were read; pulling again",
                         a.job_id, clock)

    def _pull_watching(self, a: Assignment, clock: int, step: GradientStep, first: int = 0) -> list:
        """Pull every shard; a sharded BSP job's pull that waits past SPLIT_CHECK_S checks
        whether the shards split (then they are put back in step) and asks again."""
        if self.shards.count == 1 or not a.spec.synchronous:
            return self.shards.pull(a.job_id, clock, step.buffer_for, first)
        while True:
            try:
                return self.shards.pull(a.job_id, clock, step.buffer_for, first, wait_s=SPLIT_CHECK_S)
            except (NotReady, Unavailable):
                self._check_running()
                try:
                    split = self.shards.split(a.job_id)
                except Unavailable:  # a shard is down: it will be back, ask again
                    continue
                if split:
                    clock = self.shards.realign(a.job_id)
                    if first:  # the final wait: train again from there
                        raise TrainAgain(clock) from None

    def _train(self, a: Assignment, box: Outbox, tag: str, clock: int) -> None:
        """Push every step (every round of ``sync_every`` local steps) from ``clock`` on."""
        spec, step = a.spec, box.step
        total = box.rounds
        losses, samples, window_start = [], 0, time.monotonic()
        while clock < total:
            self._check_running()
            started, began = time.perf_counter(), time.monotonic()
            pulled = self._pull_into(step, a, clock)
            pulled_at = time.perf_counter()
            if pulled[0].clock != clock:
                # The server is the truth: ahead after we were dropped from the
                # barrier, behind after it restarted from a checkpoint.
                logger.info("%s resuming at step %d (was %d)", tag, pulled[0].clock, clock)
                clock = pulled[0].clock
                if clock >= total:
                    break
            if pulled[0].ranks and pulled[0].ranks != (a.rank,):
                logger.debug("%s step %d also covers ranks %s", tag, clock, pulled[0].ranks[1:])
            if box.encoder is None:  # the gradient is the push: computed where it is sent from
                for shard, layout in enumerate(step.layouts):
                    if (buffer := self.shards.push_buffer(a.job_id, shard, layout.total_bytes)) is not None:
                        step.gradients_into(shard, buffer)
            loss, rows, seen = box.compute(clock, pulled[0].ranks, pulled)
            payloads = box.payloads()
            evaluate = a.rank == 0 and box.evaluate_due(clock, spec.eval_every)
            if evaluate and box.local is not None:  # evaluate the round's global weights, not this worker's
                for shard, p in enumerate(pulled):
                    step.load(shard, p.layout, p.buffer)
            computed_at = time.perf_counter()
            # The next step's pull rides right behind the push: one exchange a step.
            ahead = None if clock + 1 >= total else (
                SPLIT_CHECK_S if self.shards.count > 1 and spec.synchronous else PULL_SLICE_S)
            if self.freeze.hold_after_thaw(began, self.stop):
                raise JobStopped()  # frozen since the pull, and told to stop: this push would rejoin
            try:
                row_tables = self.shards.push_rows(a.job_id, clock, pulled, step.tables, step.row_grads) \
                    if step.tables else None
                self.shards.push(a.job_id, clock, pulled, step.layouts, payloads, samples=rows,
                                 ranks=pulled[0].ranks, then_pull_s=ahead, encoding=box.encoding,
                                 row_tables=row_tables)
            except PushAhead as exc:
                # A shard went back after this pull (a restore, or put back in step):
                # pull again; the reply says where to go on from.
                logger.info("%s step %d not taken: %s", tag, clock, exc)
                continue
            self._count_step(seen, started, pulled_at, computed_at)
            self.bytes_sent.inc(sum(p.numel() for p in payloads))
            self.bytes_received.inc(sum(p.layout.total_bytes for p in pulled))
            losses.append(loss)
            samples += seen
            elapsed = time.monotonic() - window_start
            metrics = step.metrics() if evaluate else None  # on the weights of this step
            if elapsed >= REPORT_EVERY_S or clock == total - 1 or metrics:
                state = self.client.report(
                    self.worker_id, a.job_id, "TRAINING", step=clock + 1, total_steps=total,
                    loss=sum(losses) / len(losses), samples=samples, seconds=elapsed, metrics=metrics)
                if state is not None and state.terminal:
                    raise JobStopped()
                losses, samples, window_start = [], 0, time.monotonic()
            clock += 1
        self.client.report(self.worker_id, a.job_id, "FINISHED", step=total, total_steps=total)
        logger.info("%s pushed all %d steps", tag, total)

    def _count_step(self, rows: int, started: float, pulled_at: float, computed_at: float) -> None:
        m = self.metrics
        m.steps.inc()
        m.samples.inc(rows)
        m.seconds.labels("pull").observe(pulled_at - started)
        m.seconds.labels("compute").observe(computed_at - pulled_at)
        m.seconds.labels("push").observe(time.perf_counter() - computed_at)

    def _finish(self, a: Assignment, box: Outbox, tag: str) -> None:
        """After training: evaluate when the server designates this worker, else stay
        on the job (so it is not handed out again) until it ends, asking again in
        case the evaluator is lost."""
        step, total = box.step, box.rounds
        asked = time.monotonic()
        while not (self.stop.is_set() or self._job_ended.is_set()):
            if self.freeze.hold_after_thaw(asked, self.stop):
                return  # frozen since the last ask, and told to stop: asking again would rejoin
            asked = time.monotonic()
            try:  # in short waits: a worker told to stop must not sit in a long pull
                final = self.client.pull(a.job_id, self.worker_id, total, True, step.buffer_for(0),
                                         wait_s=FINAL_WAIT_S)
            except (NotReady, Unavailable):  # not yet, or the coordinator is down: ask again
                continue
            if final.state.terminal:
                return
            if final.layout is None and final.state is JobState.RUNNING:
                # Back to training (a restore or a roll-back): from where the server
                # says; at the end already, _train just reports this worker finished.
                raise TrainAgain(final.clock)
            if final.layout is None:  # another worker evaluates
                self._job_ended.wait(2.0)
                continue
            step.load(0, final.layout, final.buffer)
            # Every push precedes the end of training, on every shard.
            others = self._pull_watching(a, total, step, first=1)
            if diverged([final, *others], a.spec.synchronous):
                # A shard restarted from a checkpoint meanwhile: evaluating now would
                # mix two versions. Put the shards back in step and train again.
                raise TrainAgain(self.shards.realign(a.job_id))
            for shard, p in enumerate(others, start=1):
                step.load(shard, p.layout, p.buffer)
            metrics = step.metrics()
            self.client.report(self.worker_id, a.job_id, "EVALUATED", metrics=metrics)
            logger.info("%s evaluated version %d: %s", tag, final.version,
                        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.shards.close(a.job_id, JobState.SUCCEEDED)
            return
