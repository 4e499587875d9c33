"""Inference throughput and latency: dynamic batching against max_batch_size=1.

Starts two ``psgrid serve`` processes on the same checkpoint of the same
model, one batching dynamically (``--max-batch-size``, ``--batch-timeout-ms``)
and one with max_batch_size=1, and drives them from the same client
processes (``--procs``; started once and reused by every phase) in two
phases, in the same run:

1. **Closed loop: saturation throughput.** ``--procs`` x ``--callers``
   callers, each sending one example and sending its next one as soon as the
   answer arrives. This keeps a server saturated, so it measures capacity
   (requests/s) and the throughput ratio dynamic / unbatched; its latencies
   are mostly queueing and are printed for completeness only. Rounds
   alternate between the two servers so that load drift on a shared machine
   hits both alike.
2. **Open loop: latency below capacity.** Requests are sent on a fixed
   schedule (Poisson arrivals by default, ``--arrival constant`` for evenly
   spaced ones), at ``--open-rate`` req/s, or by default ``--open-fraction``
   (0.5) of the dynamic server's closed-loop throughput just measured, split
   over the client processes, whatever the answers do. Each request's latency
   runs from its *scheduled* send time, not from when it was actually sent,
   so a server (or a load generator) that falls behind is charged for it: no
   coordinated omission. The send lag (actual - scheduled) is reported so a
   lagging load generator shows. The unbatched server is driven open-loop at
   the same rate only when its closed-loop capacity can sustain it (else
   the run says so; ``--open-unbatched always`` runs it anyway).

The latency bound is ``batch_timeout`` + one full batch's compute time: the
median forward pass of the same model over ``--max-batch-size`` examples on
the same device, with the servers' torch thread count, measured in this run
(in the benchmark process, before the servers start). It is measured again
after the servers stop and printed beside it, to show how far the machine's
speed drifted during the run; the bound stays the first measurement. Full
garbage collections in the client processes inside a measured window (they
would stall the load generator's sends and its answer stamps alike) are
counted and printed with the send lag.

    python scripts/bench_inference.py [--seconds 5] [--rounds 3] [--procs 2] [--callers 64]
                                      [--open-fraction 0.5 | --open-rate RPS] [--open-seconds 6]
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def save_model(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """A checkpoint of an MLP in the layout ``psgrid server --checkpoint-dir`` writes."""
    from google.protobuf import json_format

    from psgrid import messages
    from psgrid.server.checkpoint import CheckpointStore, JobCheckpoint
    from psgrid.spec import JobSpec
    from psgrid.build import build_model

    spec = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits",
                   model_kwargs={"in_features": args.features, "hidden": args.hidden,
                                 "classes": 10, "layers": args.layers}, steps=1)
    params = {n: p.detach().clone() for n, p in build_model(spec).named_parameters()}
    meta = {"spec": json_format.MessageToJson(messages.spec_to_proto(spec)), "version": 1}
    CheckpointStore(directory).save(JobCheckpoint("job-bench", 0, params, meta=meta))


def compute_s(args: argparse.Namespace, batch: int, repeats: int = 15) -> float:
    """Median time of one forward pass over ``batch`` examples, with the servers' torch threads
    (the same model and device, ``--device cpu``, as the servers)."""
    from psgrid.examples.models import mlp

    torch.set_num_threads(args.server_threads)
    model = mlp(args.features, args.hidden, 10, args.layers).eval()
    x = torch.randn(batch, args.features)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 3):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


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


# --- the load generator (runs in each client process) ------------------------------------

def _closed_loop(predict, request, callers: int, start: float, measure_from: float,
                 stop_at: float, **_) -> dict:
    """``callers`` closed-loop callers (each sends its next request when its answer
    arrives), kept in flight with gRPC futures rather than one thread each, so the
    load generator itself costs little CPU. Latency runs from each send."""
    import threading

    latencies: list[float] = []
    errors = [0]
    lock, finished, active = threading.Lock(), threading.Event(), [callers]

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
        failed = future.cancelled() or future.exception() is not None
        if started >= measure_from:  # calls started in the warm-up do not count
            if failed:
                errors[0] += 1
            else:
                latencies.append(time.perf_counter() - started)
        issue()

    _sleep_until(start)
    for _ in range(callers):
        issue()
    finished.wait(stop_at - time.perf_counter() + 120)
    return {"lat": latencies, "lag": [], "errors": errors[0], "sent": 0}


def _open_loop(predict, request, rate: float, arrival: str, seed: int, offset: float,
               start: float, measure_from: float, stop_at: float, **_) -> dict:
    """Send on a schedule fixed in advance (``rate`` req/s from this process, Poisson
    or evenly spaced), independent of the answers; each latency runs from the
    request's scheduled send time (no coordinated omission)."""
    import threading

    rng = random.Random(seed)
    gap = (lambda: 1.0 / rate) if arrival == "constant" else (lambda: rng.expovariate(rate))
    schedule, t = [], start + (offset if arrival == "constant" else gap())
    while t < stop_at:
        schedule.append(t)
        t += gap()
    latencies: list[float] = []
    lags: list[float] = []
    errors, outstanding = [0], [len(schedule)]
    lock, finished = threading.Lock(), threading.Event()

    def answered(future, scheduled: float) -> None:
        now = time.perf_counter()
        failed = future.cancelled() or future.exception() is not None
        with lock:
            if scheduled >= measure_from:  # requests scheduled in the warm-up do not count
                if failed:
                    errors[0] += 1
                else:
                    latencies.append(now - scheduled)
            outstanding[0] -= 1
            if not outstanding[0]:
                finished.set()

    if not schedule:
        finished.set()
    for scheduled in schedule:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if scheduled >= measure_from:
            lags.append(time.perf_counter() - scheduled)
        future = predict.future(request, timeout=30)
        future.add_done_callback(functools.partial(answered, scheduled=scheduled))
    if not finished.wait(60):  # answers still missing after a minute count as failures
        with lock:
            errors[0] = sum(1 for s in schedule if s >= measure_from) - len(latencies)
    return {"lat": latencies, "lag": lags, "errors": errors[0],
            "sent": sum(1 for s in schedule if measure_from <= s)}


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _watch_full_collections() -> list[tuple[float, float]]:
    """(start, seconds) of each full (generation 2) collection in this process from now on."""
    import gc

    pauses: list[tuple[float, float]] = []
    began = [0.0]

    def callback(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses.append((began[0], time.perf_counter() - began[0]))

    gc.callbacks.append(callback)
    return pauses


def _client_proc(addresses: dict[str, str], features: int, ready, commands, results) -> None:
    """One load process, reused by every phase: connects to each server once, then
    runs the phases it is sent (``(kind, server, params)``) until it gets None."""
    from psgrid.inference import wire
    from psgrid.inference.client import InferenceClient
    from psgrid.v1 import inference_pb2 as pb

    torch.set_num_threads(1)
    clients, predicts = [], {}
    for name, address in addresses.items():
        client = InferenceClient(address, timeout_s=60, retry_for_s=60)
        client.predict(torch.randn(1, features))  # connected, and a model is loaded
        clients.append(client)
        predicts[name] = client.channel.unary_unary(
            "/psgrid.v1.Inference/Predict", request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString)
    request = wire.encode_request(torch.randn(1, features))
    pauses = _watch_full_collections()
    ready.put(True)
    loops = {"closed": _closed_loop, "open": _open_loop}
    while (command := commands.get()) is not None:
        kind, name, params = command
        out = loops[kind](predicts[name], request, **params)
        # The generator's own full collections stop its sender and its answer callbacks
        # alike, so they would count against the server; they are shown, not hidden.
        out["gc"] = [d for t, d in pauses if params["measure_from"] <= t < params["stop_at"]]
        pauses.clear()
        results.put(out)
    for client in clients:
        client.close()


class Load:
    """The client processes, started once (torch imports take seconds here)."""

    def __init__(self, addresses: dict[str, str], args: argparse.Namespace):
        ctx = mp.get_context("spawn")
        self.args = args
        ready, self.results = ctx.Queue(), ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(args.procs)]
        self.procs = [ctx.Process(target=_client_proc, args=(addresses, args.features, ready, q, self.results),
                                  daemon=True) for q in self.commands]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            ready.get(timeout=180)

    def run(self, kind: str, server: str, seconds: float, rate: float = 0.0) -> dict:
        """One phase on every client process: a warm-up, then ``seconds`` measured."""
        args = self.args
        start = time.perf_counter() + 0.3
        measure_from = start + args.warmup
        stop_at = measure_from + seconds
        per_proc = rate / args.procs
        for i, q in enumerate(self.commands):
            params = {"callers": args.callers, "start": start, "measure_from": measure_from,
                      "stop_at": stop_at, "rate": per_proc, "arrival": args.arrival,
                      "seed": random.randrange(1 << 30),
                      # evenly spaced arrivals: the processes interleave rather than coincide
                      "offset": (i / args.procs) / rate if rate else 0.0}
            q.put((kind, server, params))
        outs = [self.results.get(timeout=seconds + args.warmup + 240) for _ in self.commands]
        lat = [v for o in outs for v in o["lat"]]
        return {"rps": len(lat) / seconds, "lat": lat, "lag": [v for o in outs for v in o["lag"]],
                "errors": sum(o["errors"] for o in outs), "sent": sum(o["sent"] for o in outs),
                "gc": [v for o in outs for v in o["gc"]]}

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(30)


def status_counts(address: str) -> tuple[int, int]:
    from psgrid.inference.client import InferenceClient

    with InferenceClient(address) as client:
        s = client.status()
    return s.batches, s.examples


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per closed-loop phase")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each phase")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--callers", type=int, default=64, help="closed-loop callers per client process")
    parser.add_argument("--open-fraction", type=float, default=0.5,
                        help="open-loop rate as a fraction of the dynamic server's closed-loop req/s")
    parser.add_argument("--open-rate", type=float, default=None, help="open-loop req/s (overrides the fraction)")
    parser.add_argument("--open-seconds", type=float, default=6.0, help="measured seconds per open-loop phase")
    parser.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    parser.add_argument("--open-unbatched", choices=("auto", "always", "never"), default="auto",
                        help="drive the unbatched server open-loop too: auto = only if its closed-loop "
                             "capacity is at least 1.1x the rate")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=100)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--batch-concurrency", type=int, default=1, help="batches each server runs at once")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server (the rest of the cores run gRPC and the clients)")
    args = parser.parse_args()

    began = time.monotonic()
    compute = {"full": compute_s(args, args.max_batch_size), "one": compute_s(args, 1)}
    with tempfile.TemporaryDirectory(prefix="psgrid-bench-") as tmp:
        directory = pathlib.Path(tmp)
        save_model(directory, args)
        servers = {
            "dynamic": start_server(directory, args.max_batch_size, args, directory / "dynamic.log"),
            "unbatched": start_server(directory, 1, args, directory / "unbatched.log"),
        }
        load = None
        try:
            load = Load({name: address for name, (_, address) in servers.items()}, args)
            closed = run_rounds(load, servers, "closed", list(servers), args.seconds, 0.0, args)
            capacity = {name: statistics.median(r["rps"]) for name, r in closed.items()}
            rate = args.open_rate or args.open_fraction * capacity["dynamic"]
            unbatched_ok = capacity["unbatched"] >= 1.1 * rate
            names = ["dynamic"]
            if args.open_unbatched == "always" or (args.open_unbatched == "auto" and unbatched_ok):
                names.append("unbatched")
            print(f"open loop at {rate:.0f} req/s ({args.arrival}); unbatched server: "
                  + ("driven too" if "unbatched" in names else
                     f"not driven, its closed-loop capacity {capacity['unbatched']:.0f} req/s "
                     f"{'is below' if not unbatched_ok else 'covers'} that rate"), flush=True)
            opened = run_rounds(load, servers, "open", names, args.open_seconds, rate, args)
        finally:
            if load is not None:
                load.close()
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    # The bound stays the one measured before the run; measuring again shows how far the
    # machine's speed drifted while the servers ran (on a shared host, it does).
    compute["full_after"] = compute_s(args, args.max_batch_size)
    report(closed, opened, rate, capacity, args, compute, time.monotonic() - began)


def run_rounds(load: Load, servers: dict, kind: str, names: list[str], seconds: float,
               rate: float, args: argparse.Namespace) -> dict[str, dict]:
    results = {name: {"rps": [], "lat": [], "lag": [], "p99": [], "errors": 0, "sent": 0,
                      "batches": 0, "examples": 0, "gc": []} for name in names}
    for rnd in range(args.rounds):
        for name in names:
            address = servers[name][1]
            b0, e0 = status_counts(address)
            out = load.run(kind, name, seconds, rate)
            b1, e1 = status_counts(address)
            r = results[name]
            r["rps"].append(out["rps"])
            r["lat"].extend(out["lat"])
            r["lag"].extend(out["lag"])
            r["p99"].append(pct(out["lat"], 99))
            r["errors"] += out["errors"]
            r["gc"].extend(out["gc"])
            r["sent"] += out["sent"]
            r["batches"] += b1 - b0
            r["examples"] += e1 - e0
            print(f"{kind:>6} round {rnd + 1} {name:>9}: {out['rps']:8.0f} req/s  "
                  f"p50 {pct(out['lat'], 50) * 1e3:7.2f} ms  p99 {pct(out['lat'], 99) * 1e3:7.2f} ms"
                  + (f"  errors {out['errors']}" if out["errors"] else ""), flush=True)
    return results


def report(closed: dict, opened: dict, rate: float, capacity: dict, args: argparse.Namespace,
           compute: dict, elapsed: float) -> None:
    bound = args.batch_timeout_ms / 1000 + compute["full"]
    print(f"\nmodel: mlp {args.features}->{args.hidden}x{args.layers - 1}->10, cpu, {args.server_threads} "
          f"torch thread(s) per server; forward pass: 1 example {compute['one'] * 1e3:.1f} ms, "
          f"{args.max_batch_size} examples {compute['full'] * 1e3:.1f} ms")
    print(f"load: {args.procs} client processes; closed loop {args.procs * args.callers} callers, "
          f"{args.rounds} x {args.seconds:g} s; open loop {args.arrival} at {rate:.0f} req/s "
          f"({rate / capacity['dynamic']:.2f} of the dynamic closed-loop req/s), {args.rounds} x "
          f"{args.open_seconds:g} s; warm-up {args.warmup:g} s each; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    labels = {"dynamic": f"dynamic (max {args.max_batch_size}, {args.batch_timeout_ms:g} ms)",
              "unbatched": "unbatched (max_batch_size=1)"}
    print(f"{'load':<22} {'server':<30} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'round p99s ms':>20} {'mean batch':>10} {'errors':>6}")
    rows = [("closed loop", closed), (f"open loop {rate:.0f}/s", opened)]
    for load_label, results in rows:
        for name in ("dynamic", "unbatched"):
            if name not in results:
                why = (f"cannot sustain the rate: closed-loop capacity {capacity[name]:.0f} req/s"
                       f" < 1.1 x {rate:.0f} req/s" if capacity[name] < 1.1 * rate
                       else "not driven (--open-unbatched never)")
                print(f"{load_label:<22} {labels[name]:<30} {why}")
                continue
            r = results[name]
            rounds = "/".join(f"{v * 1e3:.0f}" for v in r["p99"])
            print(f"{load_label:<22} {labels[name]:<30} {statistics.median(r['rps']):7.0f} "
                  f"{pct(r['lat'], 50) * 1e3:8.2f} {pct(r['lat'], 99) * 1e3:8.2f} {rounds:>20} "
                  f"{r['examples'] / max(1, r['batches']):10.1f} {r['errors']:6d}")
    ratio = capacity["dynamic"] / capacity["unbatched"]
    print(f"closed-loop (saturation) throughput ratio dynamic / unbatched: {ratio:.1f}x")
    d = opened["dynamic"]
    p50, p99 = pct(d["lat"], 50), pct(d["lat"], 99)
    print(f"bound: batch_timeout + one full batch's compute = {args.batch_timeout_ms:g} + "
          f"{compute['full'] * 1e3:.1f} = {bound * 1e3:.1f} ms (the same full batch measured again after "
          f"the run: {compute['full_after'] * 1e3:.1f} ms)")
    print(f"open loop, dynamic, {rate:.0f} req/s offered, {statistics.median(d['rps']):.0f} answered: "
          f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms: p99 {'UNDER' if p99 <= bound else 'OVER'} "
          f"the bound; {d['errors']} errors; send lag p50 {pct(d['lag'], 50) * 1e3:.2f} ms, "
          f"p99 {pct(d['lag'], 99) * 1e3:.2f} ms; full GC pauses in the load generator while "
          f"measuring: {len(d['gc'])}" + (f" (longest {max(d['gc']) * 1e3:.0f} ms)" if d["gc"] else ""))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; run took {elapsed:.0f} s")


if __name__ == "__main__":
    main()
