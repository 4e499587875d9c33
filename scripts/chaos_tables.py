"""Embedding tables through faults, and a table far larger than any worker (issue 14).

Starts `psgrid up` (2 parameter-server shards, 2 workers), trains the recommendation
example (examples/recsys.toml: user and item tables on the servers, a dense head)
once without faults, then the same job again while it kill -9s a worker and a
shard (the supervisor restarts them; the job rolls back to the shards' last
common checkpoint, tables included). BSP promises the fault-free run's weights:
the run compares the dense weights and every row of both tables, and the metric.

Meanwhile it samples every node's resident memory (VmRSS) and reports the largest.
With ``--users 50000000 --dim 64`` the user table is 50M x 64 float32 (12.8 GB if
it were dense): each worker must stay under 1 GB and each server hold only the
rows touched (``--no-faults`` runs that once, without the second job).

    .venv/bin/python scripts/chaos_tables.py                                   # faults, the example
    .venv/bin/python scripts/chaos_tables.py --users 50000000 --dim 64 --no-faults --epochs 1

The last line is one JSON object with the figures; exit status 0 when the faulty
run matched (weights within 1e-5, metric within 0.01) or, with --no-faults, when
the memory bounds held.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time

import torch

from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, JobState
from psgrid.supervisor.launch import UpProcess, consecutive_free_ports, wait_for

CLUSTER = """
[supervisor]
max_restarts = 100
period_s = 60
check_interval_s = 0.1
[server]
checkpoint_dir = "checkpoints"
liveness_timeout_s = 10
backoff_initial_s = 0.1
backoff_max_s = 1.0
args = ["--checkpoint-every-steps", "{every}", "--heartbeat-timeout", "3"]
[workers]
liveness_timeout_s = 10
backoff_initial_s = 0.1
backoff_max_s = 1.0
args = ["--threads", "1"]
[hosts.local]
address = "127.0.0.1"
servers = 2
server_port = {port}
workers = 2
"""

#: A worker's resident memory must stay under this with the 50M-row table.
WORKER_RSS_BOUND = 1 << 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=None, help="rows of the user table (default: the example's)")
    p.add_argument("--dim", type=int, default=None, help="width of both tables (default: the example's)")
    p.add_argument("--samples", type=int, default=None, help="training ratings (default: the example's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the example's)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every this many steps (sharded BSP)")
    p.add_argument("--no-faults", action="store_true", help="one fault-free run only (the memory check)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a job may take")
    p.add_argument("--run-dir", default=None, help="where the cluster runs (default: a new temp folder)")
    return p.parse_args(argv)


def the_spec(args: argparse.Namespace) -> JobSpec:
    spec = JobSpec.from_toml(spec_path("recsys"))
    model, data = dict(spec.model_kwargs), dict(spec.dataset_kwargs)
    if args.users:
        model["num_users"] = data["num_users"] = args.users
    if args.dim:
        model["dim"] = args.dim
    if args.samples:
        data["n"] = args.samples
    return spec.replace(model_kwargs=model, dataset_kwargs=data, epochs=args.epochs or spec.epochs)


class MemoryWatch:
    """Samples every node's VmRSS (bytes) every 0.5 s; keeps the largest per node role and name."""

    def __init__(self, up: UpProcess):
        self.up, self.peak = up, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss(pid: int) -> int:
        try:
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                nodes = self.up.nodes()
            except Exception:  # noqa: BLE001 - the supervisor restarting a node: next sample
                continue
            for name, node in nodes.items():
                if node.pid:
                    self.peak[name] = max(self.peak.get(name, 0), self.rss(node.pid))

    def close(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        return dict(self.peak)


def kill_at(up: UpProcess, job, fraction: float, node: str, timeout: float) -> dict:
    """Once the job reaches ``fraction`` of its steps, kill -9 ``node``; wait until it is back."""
    def reached():
        info = job.status()
        if info.state.terminal:
            raise RuntimeError(f"the job ended ({info.state.value}) before the kill at {fraction:.0%}")
        return info.total_steps and info.step >= fraction * info.total_steps
    wait_for(reached, timeout, f"{fraction:.0%} of the job", up.alive, interval=0.05)
    old = up.nodes()[node]
    os.kill(old.pid, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: (n := up.nodes()[node]).pid and n.pid != old.pid and n.state.value == "RUNNING",
             120, f"{node} back after kill -9", up.alive, interval=0.05)
    back = time.monotonic() - started
    print(f"  {fraction:>4.0%}  kill -9 {node:<10} back in {back:5.1f} s", flush=True)
    return {"fraction": fraction, "node": node, "back_s": round(back, 2)}


def weights(job, spec: JobSpec) -> dict[str, torch.Tensor]:
    """The dense weights and every row of both tables (they have num_rows)."""
    out = dict(job.state_dict())
    for name, key in (("users", "num_users"), ("items", "num_items")):
        rows = spec.model_kwargs[key]
        if rows <= 1_000_000:  # the 50M-row table is compared on the rows the job touched only
            out[f"table:{name}"] = job.embedding(name).lookup(torch.arange(rows))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = the_spec(args)
    root = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-tables-")).resolve()
    cluster = CLUSTER.format(every=args.every, port=consecutive_free_ports(2))
    print(f"tables run in {root}: users {spec.model_kwargs['num_users']:,} x dim {spec.model_kwargs['dim']}, "
          f"{spec.dataset_kwargs['n']:,} ratings, {spec.epochs} epochs, faults: {not args.no_faults}", flush=True)
    events, faulty = [], None
    with UpProcess(root, "--host", "local", cluster=cluster) as up:
        up.wait_running(120)
        memory = MemoryWatch(up)
        with Client(up.server_addresses()[0]) as client:
            started = time.monotonic()
            reference = client.submit(spec)
            expected = reference.wait(timeout=args.timeout, progress=False)
            fault_free_s = time.monotonic() - started
            infos = reference.shard_infos()
            held = [i.rows_held for i in infos]
            theirs = weights(reference, spec) if expected.state is JobState.SUCCEEDED else {}
            if not args.no_faults:
                job = client.submit(spec)
                started = time.monotonic()
                for fraction, node in ((0.3, "local-worker-1"), (0.6, "shard-1")):
                    events.append(kill_at(up, job, fraction, node, args.timeout))
                faulty = job.wait(timeout=args.timeout, progress=False)
                faulty_s = time.monotonic() - started
                ours = weights(job, spec) if faulty.state is JobState.SUCCEEDED else {}
        peak = memory.close()
        exit_code = up.stop()
    summary = {
        "users": spec.model_kwargs["num_users"], "dim": spec.model_kwargs["dim"],
        "dense_table_bytes": spec.model_kwargs["num_users"] * spec.model_kwargs["dim"] * 4,
        "fault_free_state": expected.state.value, "fault_free_metrics": expected.metrics,
        "fault_free_s": round(fault_free_s, 1), "rows_held_per_server": held,
        "rss_peak_bytes": peak, "worker_rss_max": max((v for k, v in peak.items() if "worker" in k),
                                                      default=0),
        "server_rss_max": max((v for k, v in peak.items() if "worker" not in k), default=0),
        "up_exit": exit_code, "run_dir": str(root),
    }
    ok = expected.state is JobState.SUCCEEDED and exit_code == 0
    if args.no_faults:
        ok = ok and summary["worker_rss_max"] < WORKER_RSS_BOUND
    else:
        diff = (max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) if ours and set(ours) == set(theirs)
                else float("inf"))
        metric = faulty.metrics.get("test_rmse", float("inf"))
        summary.update(state=faulty.state.value, metrics=faulty.metrics, faulty_s=round(faulty_s, 1),
                       events=events, max_abs_diff=diff,
                       metric_diff=abs(metric - expected.metrics.get("test_rmse", float("nan"))))
        ok = ok and faulty.state is JobState.SUCCEEDED and diff <= 1e-5 and summary["metric_diff"] <= 0.01
    print(f"fault-free {expected.state.value} {expected.metrics} in {fault_free_s:.0f} s; rows held per server "
          f"{held}; peak RSS worker {summary['worker_rss_max'] / 2**20:.0f} MiB, server "
          f"{summary['server_rss_max'] / 2**20:.0f} MiB")
    if faulty is not None:
        print(f"with faults {faulty.state.value} {faulty.metrics}; max |w - w_fault_free| = "
              f"{summary['max_abs_diff']:.2e} (dense weights and every table row)")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
