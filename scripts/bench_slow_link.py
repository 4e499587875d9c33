"""Training over slow links: time to a target loss and bytes moved, per knob, on shaped links.

Three hosts on one machine, as in tests/integration/test_multihost.py (Linux
network namespaces on a private bridge): the parameter server on `ps`, one
worker on each of `w1` and `w2`, each host under its own `psgrid up FILE
--host NAME`. Every host's link sends at most RATE (`tc qdisc ... tbf` on its
eth0: a token bucket, as a 1 Gbit/s or 100 Mbit/s NIC would), so a pull of
both workers shares the server's RATE and each push its worker's.

The model is large enough that communication dominates: an MLP
1024-4096-4096-1024 (25.2M parameters, 100 MB in float32) on
``synthetic_regression``, BSP, SGD lr 2 on the server (local SGD: SGD lr 2 on
the workers, outer SGD lr 1, plain averaging), batch 64 per worker. Each
setting trains until rank 0's evaluation (every ``--eval-every`` local steps,
on the global weights) says test MSE <= ``--target`` (0.413 at the start),
then the job is cancelled. Time to target counts from submit (building the
model and the first pull of the weights included); bytes are the payload
bytes the server received and sent for the job until then (its ``psgrid job``
figures).

Settings: none; fp16, int8 and top-k 1 % pushes with error feedback (pulls in
fp16 for all three: the pull is half of every step's traffic); local SGD with
H = 4 and H = 16 (full-precision pushes and pulls).

    sudo .venv/bin/python scripts/bench_slow_link.py [--rates 1gbit 100mbit] [--settings ...] [--hidden 4096]

Needs root, iproute2 and tc. The last line is one JSON object: every setting's
time to target and bytes at each rate, their ratios to "none", and
``best_speedup_100mbit`` / ``best_setting_100mbit``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.netns import Network, unavailable_reason  # noqa: E402

from psgrid.client import Client  # noqa: E402
from psgrid.spec import JobSpec, OptimizerSpec  # noqa: E402

HOSTS = ["ps", "w1", "w2"]
PORT = 7070
SETTINGS = {
    "none": {},
    "fp16": {"compression": "fp16", "pull_dtype": "fp16"},
    "int8": {"compression": "int8", "pull_dtype": "fp16"},
    "topk1%": {"compression": "topk:0.01", "pull_dtype": "fp16"},
    "local4": {"sync_every": 4},
    "local16": {"sync_every": 16},
}


def cluster_file(net: Network, threads: int) -> str:
    a = net.addresses
    return f"""
[server]
checkpoint_dir = ""
args = ["--heartbeat-timeout", "120"]
[workers]
liveness_timeout_s = 600
args = ["--threads", "{threads}"]
[hosts.ps]
address = "{a['ps']}"
servers = 1
server_port = {PORT}
[hosts.w1]
address = "{a['w1']}"
workers = 1
[hosts.w2]
address = "{a['w2']}"
workers = 1
"""


def bits_per_s(rate: str) -> float:
    """A tc rate ("100mbit", "1gbit", "10mbit") in bits per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    unit = next(u for u in units if rate.lower().endswith(u))
    return float(rate[: -len(unit)]) * units[unit]


def shape(net: Network, rate: str) -> None:
    """Every host sends at most ``rate`` (tbf on its eth0; replaced when it is set again). The
    bucket holds 4 ms of the rate, and at least 256 kB: a veth hands tbf segmentation-offloaded
    packets of up to 64 kB, and one larger than the bucket would stall the link for good."""
    burst = max(256_000, int(bits_per_s(rate) / 8 * 0.004))
    for host in HOSTS:
        net.run(host, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                       "burst", f"{burst}b", "latency", "200ms"], check=True, capture_output=True)


def wait_ready(net: Network, address: str, timeout: float = 180) -> None:
    """Until the server answers from the ps host and both workers are registered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = net.run("ps", [sys.executable, "-m", "psgrid", "status", "--json", "--server", address],
                      capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            nodes = json.loads(out.stdout).get("nodes", [])
            if sum(n.get("role") == "worker" for n in nodes) >= 2:
                return
        time.sleep(1.0)
    raise TimeoutError(f"the cluster at {address} did not come up with two workers in {timeout:.0f}s")


def spec(args: argparse.Namespace, setting: str) -> JobSpec:
    knobs = dict(SETTINGS[setting])
    local = knobs.get("sync_every", 1) > 1
    return JobSpec(
        name=f"slow-link-{setting}", model="psgrid.examples.models:mlp",
        model_kwargs={"in_features": 1024, "hidden": args.hidden, "classes": 1024, "layers": 3},
        dataset="psgrid.examples.datasets:synthetic_regression", dataset_kwargs={"test_n": 256},
        batch_size=64, steps=args.max_steps,
        num_workers=2, seed=0, device="cpu", eval_every=args.eval_every,
        optimizer=OptimizerSpec("sgd", lr=1.0) if local else OptimizerSpec("sgd", lr=args.lr),
        local_optimizer=OptimizerSpec("sgd", lr=args.lr) if local else None, **knobs)


def run_one(client: Client, job_spec: JobSpec, target: float, timeout: float) -> dict:
    """Train until rank 0's test MSE reaches ``target``; the time and the bytes until then."""
    started = time.time()
    job = client.submit(job_spec)
    reached = None
    while time.time() - started < timeout:
        info = job.status()
        rows = [r for r in job.history() if r.metrics.get("test_mse", float("inf")) <= target]
        if rows:
            reached = rows[0]
            break
        if info.state.terminal:
            break
        time.sleep(0.5)
    info = job.status()
    if not info.state.terminal:
        job.cancel()
    result = {"state": info.state.value, "reached": reached is not None,
              "time_to_target_s": round(reached.time_unix - started, 2) if reached else None,
              "rounds": reached.step if reached else info.step,
              "bytes_pushed": reached.bytes_pushed if reached else info.bytes_pushed,
              "bytes_pulled": reached.bytes_pulled if reached else info.bytes_pulled,
              "compression_ratio": round(info.compression_ratio, 2)}
    result["bytes"] = result["bytes_pushed"] + result["bytes_pulled"]
    return result


def ratios(results: dict) -> None:
    base = results.get("none", {})
    for r in results.values():
        if base.get("time_to_target_s") and r.get("time_to_target_s"):
            r["speedup"] = round(base["time_to_target_s"] / r["time_to_target_s"], 2)
        if base.get("bytes") and r.get("bytes"):
            r["bytes_ratio"] = round(r["bytes"] / base["bytes"], 4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"], help="tc rates, each a run of every setting")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--hidden", type=int, default=4096, help="MLP width (4096: 25.2M parameters)")
    p.add_argument("--lr", type=float, default=2.0, help="SGD (local SGD: local) learning rate")
    p.add_argument("--target", type=float, default=0.406, help="test MSE to reach (0.413 at the start)")
    p.add_argument("--eval-every", type=int, default=2, help="rank 0 evaluates every N local steps")
    p.add_argument("--max-steps", type=int, default=400, help="local steps a job may take at most")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=1800, help="longest one setting may take (s)")
    p.add_argument("--run-dir", help="default: a new temporary directory (kept, for the logs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason is not None or subprocess.run(["which", "tc"], capture_output=True).returncode:
        print(f"cannot shape links here: {reason or 'no tc'}", file=sys.stderr)
        return 2
    root = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-slow-link-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict] = {}
    with Network(HOSTS) as net:
        (root / "cluster.toml").write_text(cluster_file(net, args.threads))
        ups = []
        try:
            for host in HOSTS:
                with open(root / f"{host}.up.log", "ab") as log:
                    ups.append(net.popen(host, [sys.executable, "-m", "psgrid", "up", str(root / "cluster.toml"),
                                                "--host", host, "--run-dir", str(root / host)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root))
            address = f"{net.addresses['ps']}:{PORT}"
            wait_ready(net, address)
            for rate in args.rates:
                shape(net, rate)
                results = figures[rate] = {}
                # the client dials from the ps namespace's side of the bridge: run it there
                for setting in args.settings:
                    out = net.run("ps", [sys.executable, __file__, "--one", setting, "--address", address,
                                         *_forward(args)], capture_output=True, text=True,
                                  timeout=args.timeout + 120)
                    line = (out.stdout.strip().splitlines() or [""])[-1]
                    results[setting] = json.loads(line) if line.startswith("{") else {"error": out.stderr[-800:]}
                    print(f"{rate:>8} {setting:<8} {json.dumps(results[setting])}", flush=True)
                ratios(results)
        finally:
            for proc in ups:
                proc.terminate()
            for proc in ups:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    summary = {"figures": figures, "target_test_mse": args.target, "hidden": args.hidden, "run_dir": str(root)}
    slow = figures.get("100mbit", {})
    best = max((s for s in slow if s != "none" and slow[s].get("speedup")), key=lambda s: slow[s]["speedup"],
               default=None)
    summary["best_setting_100mbit"] = best
    summary["best_speedup_100mbit"] = slow[best]["speedup"] if best else None
    print(json.dumps(summary))
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--hidden", str(args.hidden), "--lr", str(args.lr), "--target", str(args.target),
            "--eval-every", str(args.eval_every), "--max-steps", str(args.max_steps),
            "--timeout", str(args.timeout)]


def one(argv) -> int:
    """``--one SETTING --address A``: run one setting against the cluster (inside the ps namespace)."""
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    p.add_argument("--address")
    known, rest = p.parse_known_args(argv)
    args = parse_args(rest)
    with Client(known.address) as client:
        print(json.dumps(run_one(client, spec(args, known.one), args.target, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(one(sys.argv[1:]) if "--one" in sys.argv else main())
