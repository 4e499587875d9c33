"""Slow and silent callers against a running cluster: is an authenticated client still served?

Starts ``psgrid up`` with a cluster token, one server and two workers, then:

* baseline: an authenticated client calls ListJobs ``--calls`` times back to back (latency
  p50/p99/max, failures) and trains the 2-worker digits job (BSP) to the end;
* hostile: opens ``--hostile`` raw HTTP/2 connections to the server without the token, half
  of them a unary ListJobs whose HEADERS are followed by 10 of a declared 100 bytes, half a
  Push stream that sends its HEADERS and never a frame (``tests/helpers/h2raw.py``); while
  they are held open (their PINGs answered, each call the server ends opened again after
  ``--reopen-s``, as a persistent attacker would) it repeats the ListJobs series and the job;
* hostile with the token (``--token-phase``, on by default): the same with authenticated
  slow callers, ``--hostile``/4 of each kind.

Every call has a deadline (``--call-timeout`` per ListJobs, UNAVAILABLE retried within it; a
``--series-budget`` for a whole series, calls not made by then are reported as skipped;
``--job-timeout`` for a job), so a vulnerable server gives failure figures, not a hang. A
failed call counts in the latency percentiles as at least its deadline. For each hostile
phase it reports how the server ended the hostile calls: grpc-status in trailers,
RST_STREAM, GOAWAY or a closed connection, and after how long. Ends with one JSON line;
exits 1 when a hostile phase had a failed ListJobs or its job did not reach 0.95 accuracy.

    python scripts/slow_clients.py [--hostile 256] [--calls 300] [--no-token-phase]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from helpers.h2raw import Horde, Outcome  # noqa: E402
from helpers.up import Up  # noqa: E402
from psgrid.client import Client  # noqa: E402
from psgrid.client.job_client import JobServiceClient  # noqa: E402
from psgrid.errors import PsgridError  # noqa: E402
from psgrid.examples import spec_path  # noqa: E402
from psgrid.security import Security  # noqa: E402
from psgrid.spec import JobSpec, JobState  # noqa: E402
from psgrid.supervisor.launch import wait_for  # noqa: E402

TOKEN = "slow-clients-token"
UNARY = "/psgrid.v1.JobService/ListJobs"
PUSH = "/psgrid.v1.ParameterServer/Push"
CLUSTER = "[workers]\ncount = 2\n"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
             7: "REFUSED_STREAM", 8: "CANCEL", 11: "ENHANCE_YOUR_CALM"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=256, help="hostile connections in the tokenless phase")
    parser.add_argument("--calls", type=int, default=300, help="ListJobs calls per series")
    parser.add_argument("--token-phase", action=argparse.BooleanOptionalAction, default=True,
                        help="also a phase of authenticated slow callers (--hostile/4 of each kind)")
    parser.add_argument("--call-timeout", type=float, default=5.0, help="deadline of one ListJobs (s)")
    parser.add_argument("--series-budget", type=float, default=60.0, help="time allowed for a series (s)")
    parser.add_argument("--job-timeout", type=float, default=180.0, help="time allowed for a job (s)")
    parser.add_argument("--reopen-s", type=float, default=1.0,
                        help="reopen a hostile call this long after the server ended it (< 0: never)")
    parser.add_argument("--run-dir", help="where the cluster runs (default: a new temporary directory)")
    return parser.parse_args(argv)


def percentile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else None


def list_jobs_series(client: JobServiceClient, calls: int, budget_s: float) -> dict:
    """``calls`` ListJobs back to back (stopping at ``budget_s``): latency in ms and failures.

    The client retries UNAVAILABLE for up to its deadline, as the SDK does (so a server
    restart costs a call its wait, not an instant failure). In ``p50_ms``/``p99_ms``/``max_ms``
    a failed call counts as at least its deadline (it was not served, however soon it
    failed); ``served_p99_ms`` is over the calls that succeeded.
    """
    counted, served, failures = [], [], collections.Counter()
    give_up = time.monotonic() + budget_s
    for _ in range(calls):
        if time.monotonic() > give_up:
            break
        start = time.perf_counter()
        try:
            client.list()
            served.append((time.perf_counter() - start) * 1000)
            counted.append(served[-1])
        except PsgridError as exc:
            failures[type(exc).__name__] += 1
            counted.append(max(client.timeout_s * 1000, (time.perf_counter() - start) * 1000))
    counted.sort()
    served.sort()
    return {"calls": len(counted), "skipped": calls - len(counted), "failures": sum(failures.values()),
            "failed_with": dict(failures), "p50_ms": percentile(counted, 0.5), "p99_ms": percentile(counted, 0.99),
            "max_ms": percentile(counted, 1.0), "served_p99_ms": percentile(served, 0.99)}


def run_job(address: str, security: Security, call_timeout: float, timeout: float) -> dict:
    """Train the digits example (2 workers, BSP) to the end or ``timeout``; cancel it if it is still running."""
    spec = JobSpec.from_toml(spec_path("digits"))
    started = time.monotonic()
    result = {"state": "NOT_SUBMITTED", "accuracy": None, "wall_s": None, "error": ""}
    with Client(address, timeout=max(call_timeout, 30.0), security=security) as client:
        job = None
        try:
            job = client.submit(spec)
            info = job.wait(timeout=timeout, progress=False)
            result.update(state=info.state.value, accuracy=info.metrics.get("test_accuracy"))
        except PsgridError as exc:
            result.update(state="UNFINISHED" if job else "NOT_SUBMITTED", error=f"{type(exc).__name__}: {exc}")
        result["wall_s"] = round(time.monotonic() - started, 1)
        if job is not None and result["state"] not in (s.value for s in JobState if s.terminal):
            try:
                job.cancel()
            except PsgridError as exc:
                result["error"] += f"; cancel failed: {type(exc).__name__}"
    return result


def label(outcome: Outcome | None) -> str:
    """How the server ended one hostile call, in words."""
    if outcome is None:
        return "still open"
    if outcome.how == "status":
        text = f"status {STATUS_NAMES.get(outcome.code, outcome.code)}"
    elif outcome.how == "rst":
        text = f"RST_STREAM {H2_ERRORS.get(outcome.code, outcome.code)}"
    else:
        text = "connection closed"
    if outcome.goaway is not None:
        text = f"GOAWAY {H2_ERRORS.get(outcome.goaway, outcome.goaway)}, then {text}"
    return text


def describe(kinds: list[tuple[str, Outcome | None]]) -> dict:
    """Counts of each (kind, ending), with the median and max time from the open to the end."""
    groups: dict[str, list[Outcome | None]] = collections.defaultdict(list)
    for kind, outcome in kinds:
        groups[f"{kind}: {label(outcome)}"].append(outcome)
    described = {}
    for key, outcomes in sorted(groups.items()):
        described[key] = {"count": len(outcomes)}
        if times := [o.after_s for o in outcomes if o is not None]:
            described[key].update(median_s=round(statistics.median(times), 2), max_s=round(max(times), 2))
    return described


class Attack:
    """Hostile calls kept open: each one the server ends is opened again after ``reopen_s`` (None: not).

    A persistent attacker reconnects; without that, one server restart (its liveness probe
    failing, say) would end the attack and what follows would be measured in peace.
    """

    def __init__(self, address: str, per_kind: int, metadata: list, reopen_s: float | None):
        self.address, self.metadata, self.reopen_s = address, metadata, reopen_s
        self.horde = Horde()
        self.kinds: dict[int, str] = {}  # id(call) -> kind
        self.refused: collections.Counter = collections.Counter()
        self.slots = [kind for kind in ("unary", "push") for _ in range(per_kind)]
        self.current = [self._open(kind) for kind in self.slots]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_open, name="reopen", daemon=True)
        if reopen_s is not None:
            self._thread.start()

    def _open(self, kind: str):
        path, sent = (UNARY, 10) if kind == "unary" else (PUSH, None)
        try:
            call = self.horde.open(self.address, path, 1, declared=100, sent=sent, metadata=self.metadata)[0]
        except OSError as exc:  # refused, reset: the server is down or turning connections away
            self.refused[f"{kind}: {type(exc).__name__}"] += 1
            return None
        self.kinds[id(call)] = kind
        return call

    def _keep_open(self) -> None:
        retry_at, ended = [0.0] * len(self.slots), 0
        while not self._stop.is_set():
            ended = self.horde.wait_ended(0.2, count=ended + 1)  # a call ended, or a pause is over
            now = time.monotonic()
            for i, call in enumerate(self.current):
                if self._stop.is_set():
                    return
                ended_at = None if call is None or call.outcome is None else call.opened + call.outcome.after_s
                if (call is None or ended_at is not None) and now >= max(retry_at[i], (ended_at or 0) + self.reopen_s):
                    self.current[i] = self._open(self.slots[i])
                    retry_at[i] = now + self.reopen_s

    def open_count(self) -> int:
        return sum(call is not None and call.outcome is None for call in self.current)

    def stop(self) -> dict:
        """Stop reopening, close every hostile call; how the server ended each one, and how many were
        (re)opened, still open at the end, or refused at the open."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        report = {"opened": len(self.horde.calls), "open_now": self.open_count(),
                  "refused_at_open": dict(self.refused),
                  "ended": describe([(self.kinds[id(c)], c.outcome) for c in self.horde.calls])}
        self.horde.close()
        return report


def hostile_phase(name: str, up: Up, address: str, args, per_kind: int, metadata: list) -> dict:
    """Hold ``per_kind`` slow unary calls and ``per_kind`` silent Push streams open while measuring."""
    print(f"\n== {name}: {per_kind} slow ListJobs + {per_kind} silent Push "
          f"({'with' if metadata else 'without'} the token) ==", flush=True)
    restarts = up.nodes()["server"].restarts
    attack = Attack(address, per_kind, metadata, None if args.reopen_s < 0 else args.reopen_s)
    try:
        print(f"  opened {len(attack.slots)} hostile calls, {attack.open_count()} still open", flush=True)
        result = measure(address, args)
    finally:
        report = attack.stop()
    result["attack"] = report
    result["server_restarts"] = up.nodes()["server"].restarts - restarts
    print(f"  hostile calls: {report['opened']} opened, {report['open_now']} open at the end, "
          f"refused at open: {report['refused_at_open']}")
    for key, value in report["ended"].items():
        print(f"    {key}: {value}")
    print(f"  server restarts: {result['server_restarts']}", flush=True)
    return result


def measure(address: str, args) -> dict:
    """A ListJobs series, then the digits job, both as an authenticated client."""
    security, started = Security(token=TOKEN), time.monotonic()
    with JobServiceClient(address, timeout_s=args.call_timeout, retry_for_s=args.call_timeout,
                          security=security) as client:
        series = list_jobs_series(client, args.calls, args.series_budget)
    print(f"  ListJobs: {series}", flush=True)
    job = run_job(address, security, args.call_timeout, args.job_timeout)
    print(f"  job: {job}", flush=True)
    return {"listjobs": series, "job": job, "phase_s": round(time.monotonic() - started, 1)}


def recovered(address: str, timeout: float) -> bool:
    """Whether an authenticated ListJobs succeeds again within ``timeout``."""
    with JobServiceClient(address, timeout_s=2.0, retry_for_s=0.0, security=Security(token=TOKEN)) as client:
        def answers() -> bool:
            try:
                return client.list() is not None
            except PsgridError:
                return False
        try:
            return wait_for(answers, timeout, "an answer to ListJobs", interval=0.2)
        except TimeoutError:
            return False


def main(argv=None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="psgrid-slow-clients-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "token").write_text(TOKEN + "\n")
    print(f"slow clients in {root}: {args.hostile} hostile connections, {args.calls} ListJobs per series",
          flush=True)
    phases = {}
    up = Up(root / "cluster", "--token-file", str(root / "token"), cluster=CLUSTER, security=Security(token=TOKEN))
    try:
        up.wait_running(120)
        address = up.server_addresses()[0]
        print(f"\n== baseline (server {address}) ==", flush=True)
        phases["baseline"] = measure(address, args)
        plan = [("hostile", args.hostile // 2, [])]
        if args.token_phase:
            plan.append(("hostile_token", args.hostile // 4, [("authorization", f"Bearer {TOKEN}")]))
        for name, per_kind, metadata in plan:
            phases[name] = hostile_phase(name, up, address, args, per_kind, metadata)
            phases[name]["recovered_after_close"] = recovered(address, 60)
    finally:
        up.close()
    summary = {"run_dir": str(root), "hostile": args.hostile, "calls": args.calls}
    for tag, phase in phases.items():
        series, job = phase["listjobs"], phase["job"]
        summary.update({f"listjobs_{key}_{tag}": series[key]
                        for key in ("p50_ms", "p99_ms", "max_ms", "served_p99_ms", "failures", "skipped")})
        summary.update({f"job_{key}_{tag}": job[key] for key in ("state", "accuracy", "wall_s")})
        summary[f"phase_s_{tag}"] = phase["phase_s"]
        if tag != "baseline":
            attack = phase["attack"]
            summary[f"hostile_opened_{tag}"] = attack["opened"]
            summary[f"hostile_open_at_end_{tag}"] = attack["open_now"]
            summary[f"hostile_ended_{tag}"] = {k: v["count"] for k, v in attack["ended"].items()}
            summary[f"server_restarts_{tag}"] = phase["server_restarts"]
            summary[f"recovered_after_close_{tag}"] = phase["recovered_after_close"]
    summary["job_accuracy"] = phases.get("hostile", {}).get("job", {}).get("accuracy")
    print("\n" + "\n".join(f"{key}: {value}" for key, value in summary.items()))
    print(json.dumps(summary))
    bad = [name for name, phase in phases.items() if name != "baseline" and (
        phase["listjobs"]["failures"] or (phase["job"]["accuracy"] or 0.0) < 0.95)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
