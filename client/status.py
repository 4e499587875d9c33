"""`psgrid status`: one view of the whole cluster, as rows or a table.

Pure: it takes what the server (jobs, workers, history) and, when there is
one, the supervisor (nodes) said, and merges it by node name.
"""
from __future__ import annotations

import math
import socket
from collections.abc import Iterable

from psgrid.spec import HistoryRow, JobInfo, WorkerStatus


def eta_seconds(info: JobInfo, history: list[HistoryRow], window: int = 20) -> float | None:
    """Seconds left at the recent step rate, or None when it cannot be told.

    The rate counts only forward progress over the window's time: a roll-back
    (the step going down after a fault) or a stall slows the estimate instead
    of hiding it."""
    if info.state.terminal or not info.total_steps:
        return None
    rows = [r for r in history if r.step > 0][-window:]
    gained = sum(max(0, b.step - a.step) for a, b in zip(rows, rows[1:]))
    if len(rows) >= 2 and rows[-1].time_unix > rows[0].time_unix and gained > 0:
        rate = gained / (rows[-1].time_unix - rows[0].time_unix)
    elif info.samples_per_sec > 0:  # too little history (a restart): the workers' reported rate
        rate = info.samples_per_sec / (info.spec.batch_size * max(1, info.spec.num_workers))
    else:
        return None
    return max(0.0, (info.total_steps - info.step) / rate)


def node_rows(workers: Iterable[WorkerStatus], nodes: Iterable | None, server_address: str) -> list[dict]:
    """Every node: from the supervisor when known, with each worker's job, step and rate."""
    by_name = {w.name: w for w in workers}
    rows = []
    if nodes is None:  # no supervisor: the server and the workers it knows
        rows.append({"name": "server", "role": "server", "host": server_address.rsplit(":", 1)[0],
                     "address": server_address, "pid": None, "state": "RUNNING", "restarts": None,
                     "uptime_s": None})
        for w in by_name.values():
            rows.append({"name": w.name, "role": "worker", "host": w.host, "address": "", "pid": w.pid,
                         "state": "LOST" if w.lost else ("RUNNING" if w.job_id else "IDLE"),
                         "restarts": None, "uptime_s": None})
    else:
        for n in nodes:
            w = by_name.get(n.name)
            host = w.host if w else (n.address.rsplit(":", 1)[0] if n.address else socket.gethostname())
            rows.append({"name": n.name, "role": n.role.value, "host": host, "address": n.address,
                         "pid": n.pid, "state": n.state.value, "restarts": n.restarts,
                         "uptime_s": round(n.uptime_s, 1), "last_exit": n.last_exit})
    for row in rows:
        w = by_name.get(row["name"])
        row.update(worker_id=w.worker_id if w else "", job_id=w.job_id if w else "", step=w.step if w else None,
                   samples_per_sec=round(w.samples_per_sec, 1) if w else None)
    return rows


def table_traffic(info: JobInfo, shards: Iterable[JobInfo] = ()) -> tuple[int, float] | None:
    """Embedding tables: (rows held over every server, rows touched per second), from the
    coordinator's ``info`` and the other shards' infos of the job; None without tables.

    A server's rows per step are its rows pulled over its pulls (one pull per worker and
    step); steps per second are the workers' samples/s over the batch size."""
    infos = [info, *shards]
    if not any(i.rows_held or i.rows_pulled for i in infos):
        return None
    steps_per_s = info.samples_per_sec / max(1, info.spec.batch_size)
    rate = sum(i.rows_pulled / i.pulls for i in infos if i.pulls) * steps_per_s
    return sum(i.rows_held for i in infos), rate


def job_rows(jobs: Iterable[JobInfo], histories: dict[str, list[HistoryRow]],
             shards: dict[str, list[JobInfo]] | None = None) -> list[dict]:
    rows = []
    for j in jobs:
        eta = eta_seconds(j, histories.get(j.job_id, []))
        tables = table_traffic(j, (shards or {}).get(j.job_id, ()))
        rows.append({
            "job_id": j.job_id, "name": j.spec.name, "state": j.state.value, "step": j.step,
            "total_steps": j.total_steps, "progress": round(j.progress, 4),
            "loss": None if math.isnan(j.loss) else j.loss, "samples_per_sec": round(j.samples_per_sec, 1),
            "eta_s": None if eta is None else round(eta, 1), "metrics": j.metrics, "workers": len(j.worker_ids),
            "waiting": j.waiting, "push_bytes_per_step": round(j.push_bytes_per_step),
            "pull_bytes_per_step": round(j.pull_bytes_per_step), "bytes_pushed": j.bytes_pushed,
            "bytes_pulled": j.bytes_pulled, "compression_ratio": round(j.compression_ratio, 2),
            "rows_held": tables[0] if tables else None, "rows_per_sec": round(tables[1], 1) if tables else None,
        })
    return rows


def human_bytes(n: float) -> str:
    """``n`` bytes in B, kB, MB or GB (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if n < 999.5:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def traffic_line(info: JobInfo) -> str:
    """What one worker's push and pull cost per step (per round under local SGD), and the
    compression ratio its pushes achieved; "" before any traffic."""
    if not info.pushes and not info.pulls:
        return ""
    spec = info.spec
    per = "round" if spec.sync_every > 1 else "step"
    push = f"push {human_bytes(info.push_bytes_per_step)}/{per}/worker"
    if spec.compression != "none":
        feedback = "" if spec.error_feedback else ", no error feedback"
        push += f" ({spec.compression}{feedback}, compression ratio {info.compression_ratio:.1f}x)"
    pull = f"pull {human_bytes(info.pull_bytes_per_step)}/{per}/worker"
    if spec.pull_dtype != "full":
        pull += f" ({spec.pull_dtype})"
    return f"{push}, {pull}"


def job_lines(info: JobInfo, shards: Iterable[JobInfo] = ()) -> list[str]:
    """One job for people (`psgrid job`): a heading, then a line per thing known
    (``shards``: the other shards' infos of the job, for its tables' totals)."""
    import datetime

    def when(unix: float) -> str:
        return datetime.datetime.fromtimestamp(unix).isoformat(sep=" ", timespec="seconds") if unix else ""

    spec = info.spec
    progress = f"step {info.step}/{info.total_steps} ({info.progress:.0%})" if info.total_steps else f"step {info.step}"
    fields = [
        ("state", info.state.value), ("waiting", info.waiting), ("error", info.error), ("progress", progress),
        ("loss", "" if math.isnan(info.loss) else f"{info.loss:.4f}"),
        ("samples/s", f"{info.samples_per_sec:,.0f}" if info.samples_per_sec else ""),
        ("metrics", ", ".join(f"{k} {v:.4f}" for k, v in sorted(info.metrics.items()))),
        ("model", spec.model), ("dataset", spec.dataset),
        ("training", f"{spec.num_workers} workers, batch {spec.batch_size}, {spec.optimizer.name} "
                     f"lr {spec.optimizer.lr:g}, " + ("async" if spec.staleness is None else
                                                        f"staleness {spec.staleness}")),
        ("local SGD", f"{spec.local_optimizer.name} lr {spec.local_optimizer.lr:g} on the workers, a push every "
                      f"{spec.sync_every} local steps" if spec.local_optimizer else ""),
        ("traffic", traffic_line(info)),
        ("tables", "" if (tables := table_traffic(info, shards)) is None else
                   f"{tables[0]:,} rows held on the servers, {tables[1]:,.0f} rows/s touched"),
        ("workers", ", ".join(info.worker_ids)), ("shards", ", ".join(info.shards)),
        ("created", when(info.created_unix)), ("updated", when(info.updated_unix)),
    ]
    heading = f"{info.job_id} ({spec.name})" if spec.name else info.job_id
    return [heading, *(f"  {name + ':':<10} {value}" for name, value in fields if value)]


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None or value == "" else fmt.format(value)


def render(nodes: list[dict], jobs: list[dict]) -> str:
    """The status as two plain-text tables."""
    lines = [f"{'NODE':<16} {'ROLE':<7} {'HOST':<15} {'PID':>7} {'STATE':<9} {'RESTARTS':>8} "
             f"{'UPTIME':>8}  {'JOB':<16} {'STEP':>6} {'SAMPLES/S':>10}"]
    for n in nodes:
        lines.append(f"{n['name']:<16} {n['role']:<7} {n['host'][:15]:<15} {_cell(n['pid']):>7} "
                     f"{n['state']:<9} {_cell(n['restarts']):>8} {_cell(n['uptime_s'], '{:.0f}s'):>8}  "
                     f"{_cell(n['job_id']):<16} {_cell(n['step']):>6} {_cell(n['samples_per_sec'], '{:,.0f}'):>10}")
    lines += ["", f"{'JOB':<16} {'NAME':<18} {'STATE':<11} {'PROGRESS':>15} {'LOSS':>8} "
                  f"{'SAMPLES/S':>10} {'ETA':>7} {'NET/STEP':>9}  METRICS"]
    for j in jobs:
        progress = f"{j['step']}/{j['total_steps']} {j['progress']:.0%}" if j["total_steps"] else "-"
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(j["metrics"].items()))
        if j.get("waiting"):  # a PENDING job: why it has not started says more than empty columns
            metrics = f"waiting: {j['waiting']}"
        # one worker's push and pull, per step
        per_step = j.get("push_bytes_per_step", 0) + j.get("pull_bytes_per_step", 0)
        net = human_bytes(per_step) if per_step else "-"
        lines.append(f"{j['job_id']:<16} {j['name'][:18]:<18} {j['state']:<11} {progress:>15} "
                     f"{_cell(j['loss'], '{:.4f}'):>8} {_cell(j['samples_per_sec'], '{:,.0f}'):>10} "
                     f"{_cell(j['eta_s'], '{:.0f}s'):>7} {net:>9}  {metrics or '-'}")
    return "\n".join(lines)
