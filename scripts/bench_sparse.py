"""Embedding tables (issue 14): psgrid against torch DDP (table replicated) and one torch process.

One workload (``psgrid.examples.sparse_bench``): bags of 30 item ids drawn with
power-law popularity (Zipf 1.05) from a table of 1e5, 1e6 or 1e7 rows of width
64, mean-pooled, then a dense head 64-64-2; batch 512 per worker, two workers,
SGD on table and head alike (table lr 20, head lr 0.5). Three systems, each
size in turn:

- psgrid: a ``psgrid up`` cluster, one parameter server (one shard) and two
  one-thread workers, BSP; the table lives on the server
  (``psgrid.sparse.EmbeddingBag``): each step a worker pulls the rows its batch
  touches and pushes their gradients;
- torch DDP: two gloo processes on loopback, ``nn.EmbeddingBag`` replicated in
  each, dense gradients all-reduced (table and head). Skipped when its memory
  estimate does not fit (printed), stopped when a size takes over ``--timeout``;
- one torch process: ``nn.EmbeddingBag(sparse=True)``, the global batch (1024).

How it times: step k ends when its last gradient is in (psgrid: the server's
update log, the later worker's push; DDP: after ``optimizer.step()`` on the
later rank; one process: after its step). Samples/s = timed samples / (end of
the last step - end of the last warm-up step). Bytes per step: what crosses a
link in one step, both workers together, each byte once: psgrid's from its
counters (dense push + pull bytes, and every row pulled or pushed at 8 + 4 * 64
bytes: its id and its values; the evaluator's final reads are taken out); DDP's
computed, not measured: a ring all-reduce of the dense gradient G has each of
the two ranks send G/2 twice, 2 G in all; one process: none.

    python scripts/bench_sparse.py [--sizes 1e5,1e6,1e7] [--steps 30] [--warmup 20] [--quick]

The last line of output is one JSON object: ``step_time_ratio_1e7_vs_1e5``
(psgrid), and per system and size samples/s, step time and bytes per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import queue
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see docs/benchmarks.md (transport)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from psgrid.build import build_dataset  # noqa: E402
from psgrid.dataset import ShardSampler  # noqa: E402
from psgrid.device import set_threads  # noqa: E402
from psgrid.errors import PsgridError  # noqa: E402
from psgrid.examples.sparse_bench import torch_bag_model  # noqa: E402
from psgrid.spec import JobSpec, JobState, OptimizerSpec  # noqa: E402

WORKERS, DIM, HIDDEN, BATCH, BAG = 2, 64, 64, 512, 30
TABLE_LR, HEAD_LR = 20.0, 0.5
#: Bytes of one row on the wire: its int64 id and its float32 values (pulled or pushed).
ROW_WIRE_BYTES = 8 + 4 * DIM
SYSTEMS = ("psgrid", "ddp", "single")
LABELS = {"psgrid": "psgrid BSP, 1 server", "ddp": "torch DDP (gloo), replicated", "single": "one process, sparse=True"}
GiB = 1 << 30
#: Memory a torch process needs besides its tensors (the runtime, the data, the head).
PROCESS_OVERHEAD = int(0.4 * GiB)
#: The most memory the torch baselines may plan to use (this machine: 24 GiB, shared).
MEMORY_CAP = 12 * GiB


def size_label(rows: int) -> str:
    exp = round(math.log10(rows))
    return f"1e{exp}" if 10 ** exp == rows else str(rows)


def job_spec(rows: int, steps: int, n_samples: int) -> JobSpec:
    return JobSpec(
        model="psgrid.examples.sparse_bench:bag_model",
        model_kwargs={"num_rows": rows, "dim": DIM, "hidden": HIDDEN, "optimizer": "sgd", "lr": TABLE_LR},
        dataset="psgrid.examples.sparse_bench:click_bags",
        dataset_kwargs={"num_rows": rows, "n": n_samples, "bag": BAG},
        optimizer=OptimizerSpec("sgd", lr=HEAD_LR), batch_size=BATCH, steps=steps, staleness=0,
        num_workers=WORKERS, seed=0, device="cpu", name=f"bench-sparse-{size_label(rows)}")


@dataclasses.dataclass
class Result:
    """One system at one size: when each step ended (unix seconds), or why there is no figure."""

    step_ends: list[float] = dataclasses.field(default_factory=list)
    bytes_per_step: float | None = None
    rows_per_step: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    note: str = ""

    def step_time(self, warmup: int) -> float | None:
        timed = len(self.step_ends) - warmup
        if timed < 1:
            return None
        return (self.step_ends[-1] - self.step_ends[warmup - 1]) / timed


# --- torch baselines, in fresh processes ---------------------------------------------------


def _torch_run(rank: int, world: int, store_port: int, spec: JobSpec, out) -> None:
    """Train as rank ``rank`` of ``world`` DDP processes (world 1: one process, sparse
    gradients, every rank's batch each step); put each step's end time on ``out``."""
    set_threads(1)
    if world > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    data = build_dataset(spec)
    torch.manual_seed(spec.seed)
    model = torch_bag_model(spec.model_kwargs["num_rows"], DIM, HIDDEN, sparse=world == 1)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD([{"params": model.bag.parameters(), "lr": TABLE_LR},
                           {"params": model.head.parameters(), "lr": HEAD_LR}])
    ranks = [rank] if world > 1 else range(WORKERS)
    samplers = [ShardSampler(len(data.train_x), r, WORKERS, spec.batch_size, spec.seed) for r in ranks]
    if world > 1:
        dist.barrier()
    for step in range(spec.steps):
        idx = torch.cat([s.indices(step) for s in samplers])
        opt.zero_grad(set_to_none=True)
        data.loss_fn(net(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        out.put(("step", rank, step, time.time()))
    out.put(("done", rank, data.metrics(model) if rank == 0 else {}))
    if world > 1:
        dist.destroy_process_group()


def run_torch(spec: JobSpec, world: int, timeout: float) -> Result:
    """DDP over ``world`` processes (rendezvous on a TCPStore bound here on port 0), or one
    process with ``world`` 1; stopped after ``timeout`` seconds with the steps it finished."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if world > 1 else None
    procs = [ctx.Process(target=_torch_run, args=(r, world, store.port if store else 0, spec, out))
             for r in range(world)]
    ends: dict[int, list[float]] = {}
    result, done, deadline = Result(), 0, time.monotonic() + timeout
    for p in procs:
        p.start()
    try:
        while done < world:
            try:
                msg = out.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    result.note = f"failed: exit codes {[p.exitcode for p in procs]}"
                    break
                if time.monotonic() > deadline:
                    result.note = f"timed out after {timeout:.0f} s"
                    break
                continue
            if msg[0] == "step":
                ends.setdefault(msg[2], []).append(msg[3])
            else:
                done += 1
                result.metrics.update(msg[2])
    finally:
        for p in procs:
            p.join(10 if done == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    result.step_ends = [max(t) for _, t in sorted(ends.items()) if len(t) == world]
    if result.note:
        result.note += f" ({len(result.step_ends)} of {spec.steps} steps)"
    return result


def mem_available() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return MEMORY_CAP


def torch_memory(rows: int, world: int) -> int:
    """Bytes the torch run is estimated to need: DDP per rank the weights, their dense
    gradient and DDP's bucket copy of it (SGD keeps no state); one process the weights."""
    table = rows * DIM * 4
    return world * ((3 if world > 1 else 1) * table + PROCESS_OVERHEAD)


def run_baseline(system: str, spec: JobSpec, timeout: float) -> Result:
    world = WORKERS if system == "ddp" else 1
    need, cap = torch_memory(spec.model_kwargs["num_rows"], world), min(MEMORY_CAP, int(0.8 * mem_available()))
    if need > cap:
        return Result(note=f"skipped: needs ~{need / GiB:.1f} GiB (cap {cap / GiB:.1f} GiB)")
    result = run_torch(spec, world, timeout)
    if system == "ddp":
        grad = spec.model_kwargs["num_rows"] * DIM * 4 + 4 * (DIM * HIDDEN + HIDDEN + HIDDEN * 2 + 2)
        result.bytes_per_step = 2 * (WORKERS - 1) * grad  # ring all-reduce: each rank sends 2 (p-1)/p G
    else:
        result.bytes_per_step = 0.0
    return result


# --- psgrid: a `psgrid up` cluster ----------------------------------------------------------


class Cluster:
    """`psgrid up` with one parameter server (writing its update log) and two one-thread workers."""

    def __init__(self, root: pathlib.Path):
        from psgrid.client import Client
        from psgrid.supervisor.launch import UpProcess

        self.logs = root / "updates.jsonl"
        self.up = UpProcess(root, log_level="WARNING", cluster=(
            f'[server]\ncheckpoint_dir = ""\nargs = ["--update-log", "{self.logs}"]\n'
            f'[workers]\ncount = {WORKERS}\ndevice = "cpu"\nargs = ["--threads", "1"]\n'))
        try:
            self.client = Client(self.up.server_addresses()[0])
            self.wait_idle()
        except BaseException:
            self.up.stop()
            raise

    def wait_idle(self) -> None:
        from psgrid.supervisor.launch import wait_for

        def idle():
            return sum(1 for w in self.client.workers() if not w.job_id and not w.lost) >= WORKERS
        wait_for(idle, 120, "idle workers", self.up.alive, interval=0.05)

    def run(self, spec: JobSpec, timeout: float) -> Result:
        self.wait_idle()
        job = self.client.submit(spec)
        try:
            info = job.wait(timeout=timeout, progress=False)
        except PsgridError as exc:
            info = job.status()
            if not info.state.terminal:
                job.cancel()
                return Result(self.step_ends(job.job_id), note=f"timed out after {timeout:.0f} s")
            return Result(note=f"failed: {type(exc).__name__}: {exc}")
        if info.state is not JobState.SUCCEEDED:
            return Result(note=f"{info.state.value}: {info.error}")
        steps = spec.steps
        eval_rows = torch.unique(build_dataset(spec).test_x).numel()  # the evaluator's one forward pass
        rows = info.rows_pulled - eval_rows + info.rows_pushed
        return Result(self.step_ends(job.job_id),
                      bytes_per_step=(info.bytes_pushed + info.bytes_pulled + rows * ROW_WIRE_BYTES) / steps,
                      rows_per_step=rows / steps, metrics=dict(info.metrics))

    def step_ends(self, job_id: str) -> list[float]:
        """When each step's last gradient was accepted, from the update log."""
        times: dict[int, list[float]] = {}
        lines = self.logs.read_text().splitlines() if self.logs.exists() else []
        for entry in map(json.loads, lines):
            if entry.get("job_id") != job_id:
                continue
            if entry["event"] != "update":
                raise RuntimeError(f"job {job_id}: a restore ({entry}); not timed")
            times.setdefault(entry["seq"], []).append(entry["time_unix"])
        return [max(t) for _, t in sorted(times.items()) if len(t) == WORKERS]

    def close(self) -> None:
        self.client.close()
        self.up.stop()


# --- the benchmark ------------------------------------------------------------------------


def expected_rows(spec: JobSpec) -> float:
    """Rows a psgrid step should move: each worker pulls and pushes its batch's unique ids."""
    data = build_dataset(spec)
    samplers = [ShardSampler(len(data.train_x), r, WORKERS, BATCH, spec.seed) for r in range(WORKERS)]
    total = sum(torch.unique(data.train_x[s.indices(k)]).numel() for s in samplers for k in range(spec.steps))
    return 2 * total / spec.steps


def bench(sizes: list[int], steps: int, warmup: int, timeout: float, n_samples: int,
          tmp: pathlib.Path) -> dict[str, dict[int, Result]]:
    results: dict[str, dict[int, Result]] = {s: {} for s in SYSTEMS}
    cluster = Cluster(tmp / "cluster")
    try:
        for rows in sizes:
            spec = job_spec(rows, warmup + steps, n_samples)
            for system in SYSTEMS:
                started = time.monotonic()
                if system == "psgrid":
                    result = cluster.run(spec, timeout=max(timeout, 300.0))
                    if result.rows_per_step is not None:
                        want = expected_rows(spec)
                        if abs(result.rows_per_step - want) > 0.5:
                            result.note = f"rows counted {result.rows_per_step:.0f}/step, expected {want:.0f}"
                else:
                    result = run_baseline(system, spec, timeout)
                results[system][rows] = result
                t = result.step_time(warmup)
                print(f"[bench] {size_label(rows)} {system:>6}: "
                      + (f"{t * 1e3:8.1f} ms/step" if t else "     no figure")
                      + f", {len(result.step_ends)} steps, {time.monotonic() - started:.1f} s in all"
                      + (f"; {result.note}" if result.note else ""), file=sys.stderr, flush=True)
    finally:
        cluster.close()
    return results


def summarise(results: dict[str, dict[int, Result]], sizes: list[int], steps: int, warmup: int) -> dict:
    """Print the table and the ratios; return the JSON summary."""
    def figures(system: str, rows: int) -> tuple[float | None, float | None]:
        t = results[system][rows].step_time(warmup)
        return (t, WORKERS * BATCH / t) if t else (None, None)

    print(f"\nbags of {BAG} ids (Zipf 1.05) over tables of width {DIM}, head {DIM}-{HIDDEN}-2, batch {BATCH} "
          f"per worker, {WORKERS} workers, 1 torch thread each; {steps} timed steps after {warmup}")
    print(f"{'rows':>5} {'system':<30} {'ms/step':>9} {'samples/s':>10} {'MB/step':>10} {'rows/step':>10} "
          f"{'test acc':>8}  note")
    for rows in sizes:
        for system in SYSTEMS:
            r = results[system][rows]
            t, sps = figures(system, rows)
            cells = [f"{t * 1e3:9.1f}" if t else f"{'-':>9}", f"{sps:10,.0f}" if sps else f"{'-':>10}",
                     f"{r.bytes_per_step / 1e6:10.2f}" if r.bytes_per_step is not None else f"{'-':>10}",
                     f"{r.rows_per_step:10,.0f}" if r.rows_per_step is not None else f"{'-':>10}",
                     f"{r.metrics['test_accuracy']:8.4f}" if "test_accuracy" in r.metrics else f"{'-':>8}"]
            print(f"{size_label(rows):>5} {LABELS[system]:<30} {' '.join(cells)}  {r.note}")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a and b else None

    first = sizes[0]
    flat = {size_label(n): ratio(figures("psgrid", n)[0], figures("psgrid", first)[0]) for n in sizes[1:]}
    by_size = {size_label(n): n for n in sizes}
    headline = ratio(figures("psgrid", by_size["1e7"])[0], figures("psgrid", by_size["1e5"])[0]) \
        if {"1e5", "1e7"} <= by_size.keys() else None
    vs = {b: {size_label(n): ratio(figures("psgrid", n)[1], figures(b, n)[1]) for n in sizes}
          for b in ("ddp", "single")}
    print("\npsgrid step time vs " + size_label(first) + ": "
          + (", ".join(f"{k} {v:.2f}x" if v else f"{k} -" for k, v in flat.items()) or "-")
          + " (issue 14: within 1.5x from 1e5 to 1e7)")
    for b, label in (("ddp", "DDP"), ("single", "one process")):
        print(f"psgrid samples/s / {label}: " + ", ".join(f"{k} {v:.2f}" if v else f"{k} -" for k, v in vs[b].items()))
    print("bytes per step: what crosses a link in one step, both workers, each byte once "
          "(psgrid: counted; DDP: computed, 2 x the dense gradient; one process: none)")
    return {
        "step_time_ratio_1e7_vs_1e5": headline,
        "flat_within_1_5x": None if headline is None else headline <= 1.5,
        "psgrid_step_time_vs_smallest": flat,
        "psgrid_vs_ddp_samples_per_s": vs["ddp"], "psgrid_vs_single_samples_per_s": vs["single"],
        "samples_per_s": {s: {size_label(n): round(figures(s, n)[1], 1) if figures(s, n)[1] else None
                              for n in sizes} for s in SYSTEMS},
        "step_time_ms": {s: {size_label(n): round(figures(s, n)[0] * 1e3, 2) if figures(s, n)[0] else None
                             for n in sizes} for s in SYSTEMS},
        "bytes_per_step": {s: {size_label(n): None if results[s][n].bytes_per_step is None
                               else round(results[s][n].bytes_per_step) for n in sizes} for s in SYSTEMS},
        "psgrid_rows_per_step": {size_label(n): results["psgrid"][n].rows_per_step for n in sizes},
        "test_accuracy": {s: {size_label(n): results[s][n].metrics.get("test_accuracy") for n in sizes}
                          for s in SYSTEMS},
        "notes": {s: {size_label(n): results[s][n].note for n in sizes if results[s][n].note} for s in SYSTEMS},
        "config": {"workers": WORKERS, "servers": 1, "batch_per_worker": BATCH, "dim": DIM, "ids_per_example": BAG,
                   "zipf": 1.05, "optimizer": f"sgd (table lr {TABLE_LR}, head lr {HEAD_LR})",
                   "steps": steps, "warmup": warmup},
    }


def parse_sizes(text: str) -> list[int]:
    sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be row counts >= 1, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, help="table rows, comma-separated (default 1e5,1e6,1e7)")
    parser.add_argument("--steps", type=int, help="timed steps per system and size (default 30; --quick 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 20; --quick 5)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a torch run of one size may take (psgrid: at least 300)")
    parser.add_argument("--samples", type=int, default=50_000, help="training examples (default 50000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: sizes 1e4,1e5, 5 + 10 steps")
    args = parser.parse_args()
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    steps = args.steps or (10 if args.quick else 30)
    warmup = args.warmup or (5 if args.quick else 20)
    if steps < 1 or warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    set_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="psgrid-bench-sparse-") as tmp:
        results = bench(sizes, steps, warmup, args.timeout, args.samples, pathlib.Path(tmp))
    summary = summarise(results, sizes, steps, warmup)
    print(f"whole run: {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
