"""Inference throughput and latency: dynamic batching against max_batch_size=1.

Starts two ``psgrid serve`` processes on the same checkpoint of the same
model, one batching dynamically (``--max-batch-size``, ``--batch-timeout-ms``)
and one with max_batch_size=1, then drives each in turn with the same
closed-loop load (``--procs`` client processes x ``--callers`` callers, each
sending one example and waiting for its answer). Rounds alternate between
the two servers so that load drift on a shared machine hits both alike.
Prints requests/s, p50 and p99 latency, mean batch size, and the ratio.

    python scripts/bench_inference.py [--seconds 5] [--rounds 3] [--procs 2] [--callers 32]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def save_model(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """A checkpoint of an MLP in the layout ``psgrid server --checkpoint-dir`` writes."""
    from google.protobuf import json_format

    from psgrid import codec
    from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
    from psgrid.spec import JobSpec
    from psgrid.worker.loader import build_model

    spec = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits",
                   model_kwargs={"in_features": args.features, "hidden": args.hidden,
                                 "classes": 10, "layers": args.layers}, steps=1)
    params = {n: p.detach().clone() for n, p in build_model(spec).named_parameters()}
    meta = {"spec": json_format.MessageToJson(codec.spec_to_proto(spec)), "version": 1}
    CheckpointStore(directory).save(JobCheckpoint("job-bench", 0, params, meta=meta))


def batch_compute_s(args: argparse.Namespace) -> float:
    """Median time of one forward pass over a full batch, with the servers' torch threads."""
    from psgrid.examples.models import mlp

    torch.set_num_threads(args.server_threads)
    model = mlp(args.features, args.hidden, 10, args.layers).eval()
    x = torch.randn(args.max_batch_size, args.features)
    times = []
    with torch.inference_mode():
        for _ in range(12):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def start_server(directory: pathlib.Path, max_batch: int, args: argparse.Namespace,
                 log: pathlib.Path) -> tuple[subprocess.Popen, str]:
    port_file = directory / f"port-{max_batch}"
    cmd = [sys.executable, "-m", "psgrid.inference.cli", "--log-level", "WARNING", "serve",
           "--checkpoint-dir", str(directory / "job-bench"), "--port", "0", "--port-file", str(port_file),
           "--max-batch-size", str(max_batch), "--batch-timeout-ms", str(args.batch_timeout_ms),
           "--queue-capacity", "1024", "--device", "cpu", "--threads", str(args.server_threads),
           "--batch-concurrency", str(args.batch_concurrency)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server failed to start; see {log}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def _client_proc(address: str, callers: int, features: int, ready, go, results) -> None:
    """One load process: ``callers`` closed-loop callers (each sends its next request
    when its answer arrives), kept in flight with gRPC futures rather than one
    thread each, so the load generator itself costs little CPU."""
    import threading

    from psgrid.inference import wire
    from psgrid.inference.client import InferenceClient
    from psgrid.v1 import inference_pb2 as pb

    torch.set_num_threads(1)
    client = InferenceClient(address, timeout_s=60, retry_for_s=60)
    client.predict(torch.randn(1, features))  # connected, and a model is loaded
    predict = client.channel.unary_unary(
        "/psgrid.v1.Inference/Predict", request_serializer=pb.PredictRequest.SerializeToString,
        response_deserializer=pb.PredictResponse.FromString)
    request = wire.encode_request(torch.randn(1, features))
    latencies: list[float] = []
    lock, finished, active = threading.Lock(), threading.Event(), [callers]
    ready.put(True)
    measure_from, stop_at = go.get()

    def issue() -> None:
        started = time.perf_counter()
        if started >= stop_at:
            with lock:
                active[0] -= 1
                if not active[0]:
                    finished.set()
            return
        future = predict.future(request, timeout=60)
        future.add_done_callback(lambda f: answered(f, started))

    def answered(future, started: float) -> None:
        future.result()  # raises if the call failed: the benchmark counts no failures
        if started >= measure_from:  # calls started in the warm-up do not count
            latencies.append(time.perf_counter() - started)
        issue()

    for _ in range(callers):
        issue()
    finished.wait()
    results.put(latencies)
    client.close()


def drive(address: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Run the load for ``args.seconds`` (after a warm-up); return (requests/s, latencies)."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_client_proc, args=(address, args.callers, args.features, ready, go, results),
                         daemon=True) for _ in range(args.procs)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    measure_from = time.perf_counter() + args.warmup
    for _ in procs:
        go.put((measure_from, measure_from + args.seconds))
    latencies = [v for _ in procs for v in results.get(timeout=args.seconds + 120)]
    for p in procs:
        p.join()
    return len(latencies) / args.seconds, latencies


def status_counts(address: str) -> tuple[int, int]:
    from psgrid.inference.client import InferenceClient

    with InferenceClient(address) as client:
        s = client.status()
    return s.batches, s.examples


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--callers", type=int, default=32, help="closed-loop callers per client process")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=100)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--batch-concurrency", type=int, default=1, help="batches each server runs at once")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server (the rest of the cores run gRPC and the clients)")
    args = parser.parse_args()

    compute_s = batch_compute_s(args)
    with tempfile.TemporaryDirectory(prefix="psgrid-bench-") as tmp:
        directory = pathlib.Path(tmp)
        save_model(directory, args)
        servers = {
            "dynamic": start_server(directory, args.max_batch_size, args, directory / "dynamic.log"),
            "unbatched": start_server(directory, 1, args, directory / "unbatched.log"),
        }
        try:
            results = run_rounds(servers, args)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    report(results, args, compute_s)


def run_rounds(servers: dict, args: argparse.Namespace) -> dict[str, dict]:
    results = {name: {"rps": [], "lat": [], "batches": 0, "examples": 0} for name in servers}
    for rnd in range(args.rounds):
        for name, (_, address) in servers.items():
            b0, e0 = status_counts(address)
            rps, lat = drive(address, args)
            b1, e1 = status_counts(address)
            r = results[name]
            r["rps"].append(rps)
            r["lat"].extend(lat)
            r["batches"] += b1 - b0
            r["examples"] += e1 - e0
            print(f"round {rnd + 1} {name:>9}: {rps:8.0f} req/s  p50 {pct(lat, 50) * 1e3:7.2f} ms  "
                  f"p99 {pct(lat, 99) * 1e3:7.2f} ms", flush=True)
    return results


def report(results: dict[str, dict], args: argparse.Namespace, compute_s: float) -> None:
    print(f"\nmodel: mlp {args.features}->{args.hidden}x{args.layers - 1}->10; load: "
          f"{args.procs * args.callers} closed-loop callers, one example per request; "
          f"{args.rounds} rounds of {args.seconds:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'server':<32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}")
    for name, r in results.items():
        label = (f"dynamic (max {args.max_batch_size}, {args.batch_timeout_ms:g} ms)"
                 if name == "dynamic" else "unbatched (max_batch_size=1)")
        mean_batch = r["examples"] / max(1, r["batches"])
        print(f"{label:<32} {statistics.median(r['rps']):8.0f} {pct(r['lat'], 50) * 1e3:8.2f} "
              f"{pct(r['lat'], 99) * 1e3:8.2f} {mean_batch:11.1f}")
    ratio = statistics.median(results["dynamic"]["rps"]) / statistics.median(results["unbatched"]["rps"])
    print(f"throughput ratio dynamic / unbatched: {ratio:.1f}x")
    target = args.batch_timeout_ms / 1000 + compute_s
    p99 = pct(results["dynamic"]["lat"], 99)
    print(f"dynamic p99 {p99 * 1e3:.1f} ms against batch_timeout + one full batch's compute "
          f"({args.batch_timeout_ms:g} + {compute_s * 1e3:.1f} = {target * 1e3:.1f} ms): "
          f"{'under' if p99 <= target else 'over'}")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
