"""Server memory soak: the parameter server's RSS over one long job, and over many short ones.

Starts a real cluster the way a user does (``psgrid up``, through
:class:`psgrid.supervisor.launch.UpProcess`: one server with a checkpoint
directory and an update log, ``--workers`` workers) for each of two soaks,
and samples the server process's resident set size from ``/proc/PID/status``:

1. **One long job.** The digits example for ``--steps`` steps per worker. The
   RSS once ``--warmup`` of the steps are done is the baseline; the figure is
   the growth from there to the end (acceptance: < 2 %), and the slope of a
   least-squares line through the samples after warm-up, in bytes per
   accepted push.
2. **Many short jobs.** ``--jobs`` digits jobs of ``--job-steps`` steps, one
   after another; the RSS once each has ended (and its end is checkpointed).
   The figure is each job's RSS against the first job's (acceptance: the last
   within 5 %), with the server keeping ``--keep-finished-jobs`` of them.

Prints a table per soak and ends with one JSON line of the figures.

    python scripts/soak_server.py [--steps 30000] [--jobs 50] [--job-steps 50] [--workers 2]
                                  [--warmup 0.1] [--keep-finished-jobs 20] [--run-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import threading
import time
import urllib.request

from psgrid.client import Client
from psgrid.examples import spec_path
from psgrid.spec import JobSpec, JobState, tomllib
from psgrid.supervisor.launch import UpProcess


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (``VmRSS`` in /proc/PID/status)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def jobs_in_memory(root: pathlib.Path) -> int:
    """The jobs the server holds in memory: its ``psgrid_jobs{state="ALL"}`` gauge."""
    port = int((root / "metrics.port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('psgrid_jobs{state="ALL"}'):
                return int(float(line.split()[-1]))
    raise RuntimeError("the server exports no psgrid_jobs gauge")


def digits(steps: int, seed: int = 0) -> JobSpec:
    """The digits example, ``steps`` pushes per worker."""
    with open(spec_path("digits"), "rb") as f:
        data = tomllib.load(f)
    data.pop("epochs", None)
    return JobSpec.from_dict({**data, "steps": steps, "seed": seed, "name": f"soak-{steps}"})


def start(root: pathlib.Path, args: argparse.Namespace) -> tuple[UpProcess, int]:
    """A fresh ``psgrid up`` under ``root``; the server's pid, once every node runs."""
    server_args = ["--update-log", str(root / "updates.jsonl"),
                   "--keep-finished-jobs", str(args.keep_finished_jobs),
                   "--metrics-port", "0", "--metrics-port-file", str(root / "metrics.port")]
    cluster = (f'[server]\ncheckpoint_dir = "{root / "checkpoints"}"\nargs = {json.dumps(server_args)}\n'
               f'[workers]\ncount = {args.workers}\ndevice = "cpu"\nargs = ["--threads", "1"]\n')
    up = UpProcess(root, cluster=cluster, log_level="WARNING")
    try:
        nodes = up.wait_running(120)
    except BaseException:
        up.stop()
        raise
    return up, nodes["server"].pid


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def sample_job(job, pid: int, every_s: float) -> tuple[list[tuple[int, int, float]], object]:
    """(global step, server RSS, seconds) every ``every_s`` until ``job`` ends; and its final info."""
    samples, began, done = [], time.monotonic(), threading.Event()

    def wait() -> None:
        try:
            job.wait(progress=False)
        except Exception:  # noqa: BLE001 - the caller checks the job's final state
            pass
        finally:
            done.set()

    threading.Thread(target=wait, daemon=True).start()
    while not done.wait(every_s):
        samples.append((job.status().step, rss_bytes(pid), time.monotonic() - began))
    info = job.status()
    samples.append((info.step, rss_bytes(pid), time.monotonic() - began))
    return samples, info


def long_job(root: pathlib.Path, args: argparse.Namespace) -> dict:
    """Soak 1: one job of ``--steps`` steps; RSS against the step reached."""
    up, pid = start(root, args)
    try:
        with Client(up.server_addresses()[0]) as client:
            samples, info = sample_job(client.submit(digits(args.steps)), pid, args.sample_every)
    finally:
        up.stop()
    if info.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"the long job ended {info.state.value}: {info.error}")
    warm_step = int(args.warmup * args.steps)
    warm = [s for s in samples if s[0] >= warm_step]
    base, end = warm[0][1], samples[-1][1]
    per_step = slope([(step, rss) for step, rss, _ in warm])
    print(f"\nSoak 1: one digits job, {args.steps} steps x {args.workers} workers "
          f"({samples[-1][2]:.0f} s, {args.steps / samples[-1][2]:.0f} steps/s)")
    print(f"{'step':>8} {'seconds':>8} {'server RSS MB':>14}")
    stride = max(1, len(samples) // 20)
    for step, rss, seconds in samples[::stride] + ([samples[-1]] if (len(samples) - 1) % stride else []):
        print(f"{step:>8} {seconds:>8.0f} {rss / 2**20:>14.1f}")
    growth = 100.0 * (end - base) / base
    print(f"after warm-up (step {warm[0][0]}): {base / 2**20:.1f} MB -> {end / 2**20:.1f} MB, "
          f"{growth:+.2f} %; slope {per_step:.1f} bytes/step, {per_step / args.workers:.1f} bytes/push")
    return {"steps": args.steps, "workers": args.workers, "seconds": round(samples[-1][2], 1),
            "rss_warm_mb": round(base / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
            "growth_pct": round(growth, 2), "bytes_per_push": round(per_step / args.workers, 1),
            "pass": growth < 2.0}


def short_jobs(root: pathlib.Path, args: argparse.Namespace) -> dict:
    """Soak 2: ``--jobs`` short jobs one after another; RSS after each."""
    up, pid = start(root, args)
    rows: list[tuple[int, str, int, int]] = []
    try:
        with Client(up.server_addresses()[0]) as client:
            for i in range(args.jobs):
                info = client.submit(digits(args.job_steps, seed=i)).wait(progress=False)
                if info.state is not JobState.SUCCEEDED:
                    raise RuntimeError(f"job {i} ended {info.state.value}: {info.error}")
                time.sleep(args.settle)
                rows.append((i, info.job_id, rss_bytes(pid), jobs_in_memory(root)))
            held = len(client.list_jobs())
            oldest = client.job(rows[0][1])  # released by now: its summary and final checkpoint answer
            fetched = oldest.status().state is JobState.SUCCEEDED and bool(oldest.state_dict())
    finally:
        up.stop()
    first = rows[0][2]
    print(f"\nSoak 2: {args.jobs} digits jobs of {args.job_steps} steps, one after another "
          f"(--keep-finished-jobs {args.keep_finished_jobs})")
    print(f"{'job':>5} {'server RSS MB':>14} {'vs first':>9} {'jobs in memory':>15}")
    stride = max(1, len(rows) // 25)
    for i, _, rss, held_now in rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []):
        print(f"{i:>5} {rss / 2**20:>14.1f} {100.0 * (rss - first) / first:>+8.2f}% {held_now:>15}")
    last = 100.0 * (rows[-1][2] - first) / first
    worst = max(100.0 * (row[2] - first) / first for row in rows)
    print(f"last job vs first: {last:+.2f} % (worst {worst:+.2f} %); jobs listed: {held}; "
          f"first job's weights fetched: {fetched}")
    return {"jobs": args.jobs, "job_steps": args.job_steps, "keep_finished_jobs": args.keep_finished_jobs,
            "rss_first_job_mb": round(first / 2**20, 1), "rss_last_job_mb": round(rows[-1][2] / 2**20, 1),
            "last_vs_first_pct": round(last, 2), "worst_vs_first_pct": round(worst, 2),
            "jobs_listed": held, "jobs_in_memory": rows[-1][3], "first_job_fetched": fetched,
            "pass": abs(last) < 5.0 and fetched}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30_000, help="steps per worker of the long job (0: skip)")
    p.add_argument("--jobs", type=int, default=50, help="short jobs one after another (0: skip)")
    p.add_argument("--job-steps", type=int, default=50, help="steps per worker of each short job")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the long job before the baseline")
    p.add_argument("--keep-finished-jobs", type=int, default=20, help="the server flag")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--settle", type=float, default=0.5, help="seconds after a short job before sampling")
    p.add_argument("--run-dir", help="where the clusters run (default: a temporary directory)")
    args = p.parse_args(argv)
    run_dir = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-soak-"))
    print(f"runs under {run_dir}", file=sys.stderr)
    figures: dict = {}
    if args.steps:
        figures["long_job"] = long_job(run_dir / "long", args)
    if args.jobs:
        figures["short_jobs"] = short_jobs(run_dir / "short", args)
    print(json.dumps(figures))
    return 0 if all(f["pass"] for f in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
