"""Training throughput: psgrid (BSP, async, 2 shards) against torch DDP (gloo) and one process.

Two workloads, every system on the same model, initial weights (the job's
seed), data order (psgrid's ``ShardSampler``, rank by rank) and optimizer; two
workers with one torch thread each, on loopback:

- w1: scikit-learn digits, MLP 64-256-256-10, SGD lr 0.05 momentum 0.9,
  batch 32 per worker, 10 epochs (220 steps), the first 5 steps warm-up;
- w2: synthetic regression, MLP 1024-4096-4096-1024 (25.2M parameters, ~100 MB),
  SGD lr 0.01, batch 64 per worker, 3 warm-up then 30 timed steps.

How it times (every system alike): step k ends when the last gradient of step
k is in: for psgrid, the time the server accepted the step's last push (every
worker, every shard), from the servers' update logs (``--update-log``); for
DDP, the wall clock after ``optimizer.step()`` on the later rank; for one
process, after its step. Samples/s = samples of the timed steps / (end of the
last step - end of the last warm-up step): building the model and data, the
first pulls and DDP's set-up are outside the window. psgrid also reports the
time from submit to the end of step 0 on warm workers (running, registered,
idle, and done with one untimed job, so imports are behind them).

    python scripts/bench_training.py [--workloads w1 w2] [--repeats 3] [--systems ...] [--quick]

The last line of output is one JSON object (ratios, samples/s, accuracy / MSE).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import queue
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from psgrid.build import build_dataset, build_model
from psgrid.dataset import ShardSampler
from psgrid.device import set_threads
from psgrid.spec import JobSpec, OptimizerSpec

WORKERS = 2
SYSTEMS = ("single", "ddp", "bsp", "async", "shards2")
LABELS = {"single": "one process, global batch", "ddp": "torch DDP (gloo)", "bsp": "psgrid BSP",
          "async": "psgrid async", "shards2": "psgrid BSP, 2 shards"}
#: Seconds any one run (a job, a DDP run) may take before the benchmark gives up.
RUN_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class Workload:
    title: str
    spec: JobSpec
    warmup: int
    metric: str
    quick: dict


WORKLOADS = {
    "w1": Workload(
        "digits, MLP 64-256-256-10, SGD lr 0.05 momentum 0.9, batch 32/worker",
        JobSpec(model="psgrid.examples.models:mlp",
                model_kwargs={"in_features": 64, "hidden": 256, "classes": 10, "layers": 3},
                dataset="psgrid.examples.datasets:digits", optimizer=OptimizerSpec("sgd", lr=0.05, momentum=0.9),
                batch_size=32, epochs=10, num_workers=WORKERS, seed=0, device="cpu"),
        warmup=5, metric="test_accuracy", quick={"epochs": 2}),
    "w2": Workload(
        "synthetic regression, MLP 1024-4096-4096-1024 (25.2M parameters), SGD lr 0.01, batch 64/worker",
        JobSpec(model="psgrid.examples.models:mlp",
                model_kwargs={"in_features": 1024, "hidden": 4096, "classes": 1024, "layers": 3},
                dataset="psgrid.examples.datasets:synthetic_regression", optimizer=OptimizerSpec("sgd", lr=0.01),
                batch_size=64, steps=33, num_workers=WORKERS, seed=0, device="cpu"),
        warmup=3, metric="test_mse", quick={"steps": 8}),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One system's run of one workload: when each step ended (unix seconds), the final metrics."""

    step_ends: list[float]
    metrics: dict[str, float]
    #: psgrid only: seconds from submit to the end of step 0.
    first_step_s: float | None = None

    def samples_per_s(self, warmup: int, global_batch: int) -> float:
        timed = len(self.step_ends) - warmup
        return timed * global_batch / (self.step_ends[-1] - self.step_ends[warmup - 1])


# --- torch baselines: DDP and one process, in fresh processes --------------------------


def _torch_run(rank: int, world: int, store_port: int, spec: JobSpec, out) -> None:
    """Train ``spec`` as rank ``rank`` of ``world`` DDP processes (world 1: one process taking
    every psgrid rank's batch each step); put (rank, step end times, metrics) on ``out``."""
    set_threads(1)
    if world > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    model, data = build_model(spec), build_dataset(spec)
    ranks = [rank] if world > 1 else range(spec.num_workers)
    samplers = [ShardSampler(len(data.train_x), r, spec.num_workers, spec.batch_size, spec.seed) for r in ranks]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    o = spec.optimizer
    opt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    total = samplers[0].total_steps(spec.epochs, spec.steps)
    if world > 1:
        dist.barrier()
    ends = []
    for step in range(total):
        idx = torch.cat([s.indices(step) for s in samplers])
        opt.zero_grad(set_to_none=True)
        data.loss_fn(net(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        ends.append(time.time())
    out.put((rank, ends, data.metrics(model) if rank == 0 else {}))
    if world > 1:
        dist.destroy_process_group()


def _collect(out, procs: list) -> list:
    """One result per process; RuntimeError as soon as one of them fails, or after RUN_TIMEOUT_S."""
    deadline, results = time.monotonic() + RUN_TIMEOUT_S, []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"torch run failed: exit codes {[p.exitcode for p in procs]}") from None
    return results


def run_torch(spec: JobSpec, world: int) -> Run:
    """DDP over ``world`` processes (rendezvous on a TCPStore this process binds on port 0),
    or with ``world`` 1 one process with the global batch."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if world > 1 else None
    procs = [ctx.Process(target=_torch_run, args=(r, world, store.port if store else 0, spec, out))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = _collect(out, procs)
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"a torch process exited with {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    ends = [max(step) for step in zip(*(r[1] for r in results))]
    return Run(ends, next(r[2] for r in results if r[0] == 0))


# --- psgrid: a `psgrid up` cluster with warm workers --------------------------------------


class Cluster:
    """`psgrid up` with ``shards`` parameter servers and two one-thread workers, each server
    writing its update log; checkpoints off (the baselines write none either)."""

    def __init__(self, root: pathlib.Path, shards: int):
        from psgrid.client import Client
        from psgrid.supervisor.launch import UpProcess, consecutive_free_ports

        self.logs = root / "updates.jsonl"
        tables = (f'[server]\ncheckpoint_dir = ""\nargs = ["--update-log", "{self.logs}"]\n'
                  '[workers]\ndevice = "cpu"\nargs = ["--threads", "1"]\n')
        if shards == 1:
            self.up = UpProcess(root, log_level="WARNING", cluster=tables + f"count = {WORKERS}\n")
        else:  # shards are named to the coordinator by fixed ports, as bench_transport.py does
            self.up = UpProcess(root, "--host", "local", log_level="WARNING", cluster=tables + (
                f'[hosts.local]\naddress = "127.0.0.1"\nservers = {shards}\n'
                f'server_port = {consecutive_free_ports(shards)}\nworkers = {WORKERS}\n'))
        try:
            self.client = Client(self.up.server_addresses()[0])
            self.wait_idle()
        except BaseException:
            self.up.stop()
            raise

    def wait_idle(self) -> None:
        """Until every worker is registered, alive and holds no job (and, first, until the
        coordinator answers: in the fixed-port form its address is known before it serves)."""
        from psgrid.errors import ServerNotRunning, Unavailable
        from psgrid.supervisor.launch import wait_for

        def idle():
            try:
                return sum(1 for w in self.client.workers() if not w.job_id and not w.lost) >= WORKERS
            except (ServerNotRunning, Unavailable):
                return False
        wait_for(idle, 120, "idle workers", self.up.alive, interval=0.05)

    def run(self, spec: JobSpec) -> Run:
        self.wait_idle()
        submitted = time.time()
        job = self.client.submit(spec)
        info = job.wait(timeout=RUN_TIMEOUT_S, progress=False)
        ends = self.step_ends(job.job_id)
        return Run(ends, dict(info.metrics), ends[0] - submitted)

    def step_ends(self, job_id: str) -> list[float]:
        """When each step's last gradient (every worker, every shard) was accepted, from the update logs."""
        times: dict[int, list[float]] = {}
        seen: set[tuple[str, str, int]] = set()
        for path in sorted(self.logs.parent.glob("updates*.jsonl")):
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("job_id") != job_id:
                    continue
                key = (entry["shard"], entry["worker_name"], entry["seq"])
                if entry["event"] != "update" or key in seen:
                    raise RuntimeError(f"job {job_id}: a restore or a repeated update ({entry}); not timed")
                seen.add(key)
                times.setdefault(entry["seq"], []).append(entry["time_unix"])
        counts = {len(t) for t in times.values()}
        if sorted(times) != list(range(len(times))) or len(counts) != 1:
            raise RuntimeError(f"job {job_id}: steps missing from the update logs")
        return [max(times[seq]) for seq in range(len(times))]

    def close(self) -> None:
        self.client.close()
        self.up.stop()


# --- the benchmark ----------------------------------------------------------------------


def run_system(system: str, spec: JobSpec, clusters: dict[str, Cluster]) -> Run:
    if system == "single":
        return run_torch(spec, 1)
    if system == "ddp":
        return run_torch(spec, WORKERS)
    if system == "async":
        return clusters["one shard"].run(spec.replace(staleness=None, name=f"bench-{system}"))
    cluster = clusters["one shard" if system == "bsp" else "two shards"]
    return cluster.run(spec.replace(staleness=0, name=f"bench-{system}"))


def bench(workloads: list[str], systems: list[str], repeats: int, quick: bool, tmp: pathlib.Path) -> dict:
    """Every workload, ``repeats`` rounds of every system (the order rotated each round).

    Returns {"runs": {workload: {system: [(samples/s, metric, first step s), ...]}},
    "steps": {workload: steps per worker}, "fresh": {cluster: submit->step 0 of its first job}}.
    Each cluster first runs an untimed job of each workload: every timed job then finds its
    workers warm (imports done), whichever system comes first in a round.
    """
    clusters: dict[str, Cluster] = {}
    out: dict = {"runs": {w: {s: [] for s in systems} for w in workloads}, "steps": {}, "fresh": {}}
    try:
        if {"bsp", "async"} & set(systems):
            clusters["one shard"] = Cluster(tmp / "one-shard", 1)
        if "shards2" in systems:
            clusters["two shards"] = Cluster(tmp / "two-shards", 2)
        for w in workloads:
            load = WORKLOADS[w]
            spec = load.spec.replace(**load.quick) if quick else load.spec
            for name, cluster in clusters.items():
                warm = cluster.run(spec.replace(epochs=0, steps=load.warmup + 2, name="bench-warm-up"))
                out["fresh"].setdefault(name, warm.first_step_s)
            for r in range(repeats):
                for system in systems[r % len(systems):] + systems[:r % len(systems)]:
                    started = time.monotonic()
                    run = run_system(system, spec, clusters)
                    sps = run.samples_per_s(load.warmup, spec.batch_size * WORKERS)
                    metric = run.metrics.get(load.metric, float("nan"))
                    out["runs"][w][system].append((sps, metric, run.first_step_s))
                    out["steps"][w] = len(run.step_ends)
                    print(f"[bench] {w} repeat {r + 1}/{repeats} {system:>7}: {sps:9.1f} samples/s, "
                          f"{load.metric} {metric:.4f}, {len(run.step_ends)} steps, "
                          f"{time.monotonic() - started:.1f} s in all", file=sys.stderr, flush=True)
    finally:
        for cluster in clusters.values():
            cluster.close()
    return out


def summarise(out: dict, repeats: int) -> dict:
    """Print the table of medians per workload and system; return the JSON summary."""
    runs = out["runs"]
    med = {w: {s: tuple(statistics.median(x) if None not in x else None for x in zip(*rows))
               for s, rows in by.items() if rows} for w, by in runs.items()}
    for w, by in med.items():
        load = WORKLOADS[w]
        print(f"\n{w}: {load.title}; {out['steps'][w]} steps per worker, the first {load.warmup} "
              f"untimed; {WORKERS} workers, 1 torch thread each; medians of {repeats}")
        print(f"{'system':<27} {'samples/s':>10} {'(min-max)':>17} {load.metric:>14} {'/ DDP':>6} "
              f"{'submit->step 0':>15}")
        ddp = by.get("ddp", (None,))[0]
        for s, (sps, metric, first) in by.items():
            spread = f"({min(r[0] for r in runs[w][s]):,.0f}-{max(r[0] for r in runs[w][s]):,.0f})"
            ratio = f"{sps / ddp:6.2f}" if ddp else f"{'-':>6}"
            first_s = f"{first:13.2f} s" if first is not None else f"{'-':>15}"
            print(f"{LABELS[s]:<27} {sps:>10,.1f} {spread:>17} {metric:>14.4f} {ratio} {first_s}")
    print("\nsamples/s: steady state, from the end of the last warm-up step to the end of the last step "
          "(psgrid: the update log's time of each step's last push); / DDP: samples/s over DDP's;")
    print("submit->step 0: warm workers (registered and idle, one job already run); their very first job: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in out["fresh"].items()))

    def ratio(w: str, a: str, b: str) -> float | None:
        x, y = med.get(w, {}).get(a), med.get(w, {}).get(b)
        return round(x[0] / y[0], 4) if x and y else None

    return {
        "ratios": {f"{w}_{a}_vs_{b}": ratio(w, a, b) for a, b in (("bsp", "ddp"), ("async", "bsp"))
                   for w in ("w1", "w2")},
        "samples_per_s": {w: {s: round(v[0], 1) for s, v in by.items()} for w, by in med.items()},
        "accuracy": {w: {s: round(v[1], 5) for s, v in by.items()} for w, by in med.items()},
        "submit_to_first_step_s": {w: {s: round(v[2], 3) for s, v in by.items() if v[2] is not None}
                                   for w, by in med.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["w1", "w2"])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs/steps, 1 repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    systems = list(dict.fromkeys(args.systems))
    with tempfile.TemporaryDirectory(prefix="psgrid-bench-training-") as tmp:
        results = bench(args.workloads, systems, repeats, args.quick, pathlib.Path(tmp))
    print(json.dumps(summarise(results, repeats)))


if __name__ == "__main__":
    main()
