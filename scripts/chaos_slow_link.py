"""kill -9 a worker and the server during a local-SGD job with compressed pushes.

Starts `psgrid up` (one server with a checkpoint directory, two workers), trains
the digits MLP with ``sync_every = 8`` (local Adam, outer SGD lr 1: model
averaging) and int8 pushes with error feedback once without faults, then again
while it sends SIGKILL to ``local-worker-0`` and to ``server`` at evenly
spread points. Local optimizer state and error-feedback residuals die with a
worker, so the weights are not the fault-free ones; the job must still end
SUCCEEDED, within a point of the fault-free accuracy, and no round may be
applied twice (the update log, read as docs/operations.md says).

    .venv/bin/python scripts/chaos_slow_link.py [--epochs 24] [--compression int8] [--sync-every 8]

The last line is one JSON object with the figures; exit status 0 when all holds.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from chaos import CLUSTER, inject  # noqa: E402  (a script beside this one)

from psgrid.client import Client  # noqa: E402
from psgrid.examples import spec_path  # noqa: E402
from psgrid.spec import JobSpec, JobState, OptimizerSpec  # noqa: E402
from psgrid.supervisor.launch import UpProcess, consecutive_free_ports  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=24, help="length of the digits job, in local epochs")
    p.add_argument("--sync-every", type=int, default=8, help="local steps between pushes")
    p.add_argument("--compression", default="int8", help="none, fp16, bf16, int8, topk:RATIO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", help="default: a new temporary directory (kept, for the logs)")
    p.add_argument("--timeout", type=float, default=600, help="longest a job may take (s)")
    return p.parse_args(argv)


def effective_updates(path: pathlib.Path, job_id: str) -> list[dict]:
    """The updates still in the job's parameters: each restore drops those of later versions."""
    kept: list[dict] = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("job_id") != job_id:
            continue
        if entry["event"] == "restore":
            kept = [u for u in kept if u["version"] <= entry["version"]]
        else:
            kept.append(entry)
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-chaos-slow-")).resolve()
    log = root / "run" / "updates.jsonl"
    cluster = CLUSTER.format(every=10, heartbeat=3.0, log=log, liveness=6.0, shards=1, workers=2,
                             port=consecutive_free_ports(1))
    spec = JobSpec.from_toml(spec_path("digits")).replace(
        epochs=args.epochs, seed=args.seed, sync_every=args.sync_every, compression=args.compression,
        optimizer=OptimizerSpec("sgd", lr=1.0), local_optimizer=OptimizerSpec("adam", lr=0.002))
    print(f"run in {root}: sync_every {args.sync_every}, compression {args.compression}", flush=True)
    with UpProcess(root, "--host", "local", cluster=cluster) as up:
        up.wait_running(120)
        with Client(up.server_addresses()[0]) as client:
            expected = client.submit(spec).wait(timeout=args.timeout, progress=False)
            job = client.submit(spec)
            started = time.monotonic()
            events = [inject(up, job, fraction, "SIGKILL", node, args.timeout)
                      for fraction, node in ((0.3, "local-worker-0"), (0.6, "server"))]
            info = job.wait(timeout=args.timeout, progress=False)
            faulty_s = time.monotonic() - started
        exit_code = up.stop()
    kept = effective_updates(log, job.job_id)
    twice = [k for k, n in collections.Counter((u["worker_name"], u["seq"]) for u in kept).items() if n > 1]
    accuracy, fault_free = info.metrics.get("test_accuracy"), expected.metrics.get("test_accuracy")
    ok = (info.state is JobState.SUCCEEDED and accuracy is not None and fault_free is not None
          and abs(accuracy - fault_free) <= 0.01 and not twice and exit_code == 0)
    summary = {"state": info.state.value, "accuracy": accuracy, "fault_free_accuracy": fault_free,
               "rounds": info.total_steps, "updates_kept": len(kept), "applied_twice": len(twice),
               "events": events, "faulty_s": round(faulty_s, 1), "compression_ratio": info.compression_ratio,
               "up_exit": exit_code, "ok": ok, "run_dir": str(root)}
    print(f"state {summary['state']}, accuracy {accuracy} vs {fault_free} fault-free, "
          f"{len(twice)} rounds applied twice, psgrid up exit {exit_code}")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
