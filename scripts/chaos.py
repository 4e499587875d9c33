"""Chaos run: kill -9 and SIGSTOP random nodes of a sharded synchronous job, then compare its weights.

Starts `psgrid up` (2 parameter-server shards and 2 workers by default), trains
the digits MLP once without faults, then the same job again while it sends
``--kills`` SIGKILLs to random nodes (shards, the coordinator, workers) and
``--stops`` SIGSTOPs to random workers (the supervisor finds those on their
liveness file, SIGTERMs and restarts them; the servers drop them from the
barrier first) at evenly spread points of the job. BSP promises the very
weights of the fault-free run: the run reports the largest difference and
checks every shard's update log for a push applied on another step's weights.

    .venv/bin/python scripts/chaos.py --kills 20 --stops 2          # the long run
    .venv/bin/python scripts/chaos.py --kills 6 --stops 1 --epochs 50 --seed 3 --liveness 3   # what the test runs

The last line is one JSON object with the figures; exit status 0 when the
weights match (atol 1e-5) and nothing was applied twice or on the wrong step.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import sys
import tempfile
import time

import torch

from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, JobState
from psgrid.supervisor.launch import UpProcess, consecutive_free_ports, wait_for

CLUSTER = """
[supervisor]
max_restarts = 1000
period_s = 60
check_interval_s = 0.1
[server]
checkpoint_dir = "checkpoints"
liveness_timeout_s = 10
backoff_initial_s = 0.1
backoff_max_s = 1.0
args = ["--checkpoint-every-steps", "{every}", "--heartbeat-timeout", "{heartbeat}", "--update-log", "{log}"]
[workers]
liveness_timeout_s = {liveness}
backoff_initial_s = 0.1
backoff_max_s = 1.0
args = ["--threads", "1"]
[hosts.local]
address = "127.0.0.1"
servers = {shards}
server_port = {port}
workers = {workers}
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of random nodes")
    p.add_argument("--stops", type=int, default=2, help="SIGSTOPs of random workers")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=60, help="length of the digits job")
    p.add_argument("--every", type=int, default=10, help="--checkpoint-every-steps of every shard")
    p.add_argument("--heartbeat", type=float, default=2.0, help="servers' --heartbeat-timeout (s)")
    p.add_argument("--liveness", type=float, default=6.0, help="workers' liveness timeout under psgrid up (s)")
    p.add_argument("--seed", type=int, default=0, help="which nodes, which faults, in which order")
    p.add_argument("--run-dir", help="default: a new temporary directory (kept, for the logs)")
    p.add_argument("--timeout", type=float, default=900, help="longest a job may take (s)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, rng: random.Random) -> list[tuple[float, str, str]]:
    """(fraction of the job, signal name, node) for each fault, in order."""
    servers = ["server", *(f"shard-{i}" for i in range(1, args.shards))]
    workers = [f"local-worker-{i}" for i in range(args.workers)]
    faults = [("SIGKILL", rng.choice(servers + workers)) for _ in range(args.kills)]
    faults += [("SIGSTOP", rng.choice(workers)) for _ in range(args.stops)]
    rng.shuffle(faults)
    n = len(faults)
    # Spread over the first 60 %: the job goes on while each node comes back (a stopped
    # worker takes its liveness timeout and a restart), and every fault must land while
    # it still runs.
    return [(0.05 + 0.55 * i / max(1, n), sig, node) for i, (sig, node) in enumerate(faults)]


def progress(job) -> tuple[JobState, int, int]:
    info = job.status()
    return info.state, info.step, info.total_steps


def inject(up: UpProcess, job, fraction: float, sig: str, node: str, timeout: float) -> dict:
    """Wait until the job reaches ``fraction``, send ``sig`` to ``node``, wait until it is back."""
    def reached():
        state, step, total = progress(job)
        if state.terminal:
            raise RuntimeError(f"the job ended ({state.value}) before the fault at {fraction:.0%}")
        return total and step >= fraction * total
    wait_for(reached, timeout, f"{fraction:.0%} of the job", up.alive, interval=0.05)
    old = up.nodes()[node]
    os.kill(old.pid, getattr(signal, sig))
    started = time.monotonic()
    wait_for(lambda: (n := up.nodes()[node]).pid and n.pid != old.pid and n.state.value == "RUNNING",
             120, f"{node} back after {sig}", up.alive, interval=0.05)
    back = time.monotonic() - started
    print(f"  {fraction:>4.0%}  {sig:<7} {node:<16} back in {back:5.1f} s", flush=True)
    return {"fraction": round(fraction, 3), "signal": sig, "node": node, "back_s": round(back, 2)}


def wrong_step_pushes(run: pathlib.Path) -> tuple[int, int]:
    """(pushes applied, pushes applied with seq != base_step) over every shard's update log."""
    applied = wrong = 0
    for path in run.glob("updates*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "seq" in record and "base_step" in record:
                applied += 1
                wrong += record["seq"] != record["base_step"]
    return applied, wrong


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    return max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    root = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-chaos-")).resolve()
    log = root / "run" / "updates.jsonl"
    cluster = CLUSTER.format(every=args.every, heartbeat=args.heartbeat, log=log, liveness=args.liveness,
                             shards=args.shards, workers=args.workers, port=consecutive_free_ports(args.shards))
    spec = JobSpec.from_toml(spec_path("digits")).replace(epochs=args.epochs, seed=args.seed,
                                                          num_workers=args.workers)
    print(f"chaos run in {root}: {args.shards} shards, {args.workers} workers, "
          f"{args.kills} kills, {args.stops} stops, seed {args.seed}", flush=True)
    events = []
    with UpProcess(root, "--host", "local", cluster=cluster) as up:
        up.wait_running(120)
        with Client(up.server_addresses()[0]) as client:
            started = time.monotonic()
            reference = client.submit(spec)
            expected = reference.wait(timeout=args.timeout, progress=False)
            fault_free_s = time.monotonic() - started
            theirs = reference.state_dict()
            job = client.submit(spec)
            started = time.monotonic()
            for fraction, sig, node in plan(args, rng):
                events.append(inject(up, job, fraction, sig, node, args.timeout))
            info = job.wait(timeout=args.timeout, progress=False)
            chaos_s = time.monotonic() - started
            ours = job.state_dict() if info.state is JobState.SUCCEEDED else None
        exit_code = up.stop()
    diff = compare(ours, theirs) if ours is not None else float("inf")
    applied, wrong = wrong_step_pushes(root / "run")
    logs = "".join(p.read_text(errors="replace") for p in (root / "run").glob("*.log"))
    summary = {
        "state": info.state.value, "fault_free_state": expected.state.value,
        "max_abs_diff": diff, "exact": diff <= 1e-5,
        "accuracy": info.metrics.get("test_accuracy"), "fault_free_accuracy": expected.metrics.get("test_accuracy"),
        "kills": args.kills, "stops": args.stops, "events": len(events),
        "back_s_max": max((e["back_s"] for e in events), default=0.0),
        "realignments": logs.count("all put back to step"),
        "pushes_applied": applied, "pushes_on_another_step": wrong,
        "fault_free_s": round(fault_free_s, 1), "chaos_s": round(chaos_s, 1), "up_exit": exit_code,
        "seed": args.seed, "run_dir": str(root),
    }
    print(f"state {summary['state']}, max |w - w_fault_free| = {diff:.2e}, accuracy {summary['accuracy']} "
          f"vs {summary['fault_free_accuracy']}, {summary['realignments']} realignments, "
          f"{wrong} of {applied} pushes on another step's weights, psgrid up exit {exit_code}")
    print(json.dumps(summary))
    ok = summary["exact"] and wrong == 0 and info.state is JobState.SUCCEEDED and exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
