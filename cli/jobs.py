"""``psgrid`` subcommands that talk to a job service: submit, jobs, job, cancel, status, plot.

Each command imports the SDK it needs when it runs, so ``psgrid --help``
stays fast; :mod:`psgrid.cli` wires them into the parser.
"""
from __future__ import annotations

import argparse
import json
import os

from psgrid.cli.flags import SUPERVISOR_FLAG, _security, _server_address, _supervisor_address

# --- psgrid submit / jobs / job / cancel ----------------------------------------------


def _spec_from_args(args: argparse.Namespace):
    from psgrid.spec import JobSpec

    if args.example:
        from psgrid.examples import spec_path

        data = _toml(spec_path(args.example))
    elif args.spec:
        data = _toml(args.spec)
    else:
        data = {}
    flags = {
        "name": args.name, "model": args.model, "dataset": args.dataset,
        "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
        "num_workers": args.workers, "seed": args.seed, "device": args.device,
        "eval_every": args.eval_every,
    }
    if args.epochs is not None and args.steps is None:
        flags["steps"] = 0
    if args.steps is not None and args.epochs is None:
        flags["epochs"] = 0
    data.update({k: v for k, v in flags.items() if v is not None})
    for key in ("model_kwargs", "dataset_kwargs"):
        value = getattr(args, key)
        if value is not None:
            data[key] = json.loads(value)
    if args.staleness is not None:
        data["staleness"] = args.staleness if args.staleness in ("inf", "async") else int(args.staleness)
    opt = dict(data.get("optimizer", {}))
    for key in ("lr", "momentum", "weight_decay"):
        if getattr(args, key) is not None:
            opt[key] = getattr(args, key)
    if args.optimizer:
        opt["name"] = args.optimizer
    data["optimizer"] = opt
    _slow_link_flags(args, data)
    return JobSpec.from_dict(data)


def _slow_link_flags(args: argparse.Namespace, data: dict) -> None:
    """--sync-every, --local-optimizer/--local-lr, --compression, --no-error-feedback,
    --pull-dtype and --scale-stale over the spec file's values."""
    for key in ("sync_every", "compression", "pull_dtype"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.no_error_feedback:
        data["error_feedback"] = False
    if args.scale_stale:
        data["scale_stale"] = True
    if args.local_optimizer or args.local_lr is not None:
        local = data.get("local_optimizer") or {}
        local = {"name": local} if isinstance(local, str) else dict(local)
        if args.local_optimizer:
            local["name"] = args.local_optimizer
        if args.local_lr is not None:
            local["lr"] = args.local_lr
        data["local_optimizer"] = local


def _toml(path) -> dict:
    from psgrid.spec import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def _print_result(info) -> None:
    from psgrid.client.progress import describe

    print(f"{info.job_id}: {describe(info)}")


def cmd_submit(args: argparse.Namespace) -> int:
    from psgrid.client import Client

    spec = _spec_from_args(args)
    with Client(_server_address(args), security=_security(args)) as client:
        job = client.submit(spec)
        print(job.job_id)
        _warn_if_too_big(client, job.job_id, spec.num_workers)
        if args.wait:
            info = job.wait()
            if args.tensorboard:
                print(f"{job.write_tensorboard(args.tensorboard)} points written to {args.tensorboard}")
            _print_result(info)
    return 0


def _warn_if_too_big(client, job_id: str, need: int, grace_s: float = 3.0) -> None:
    """Say at once when the cluster has fewer live workers than the job asks for (after
    ``grace_s`` for the job to start: workers starting beside the server may register late)."""
    import sys
    import time

    from psgrid.spec import JobState

    deadline = time.monotonic() + grace_s
    while True:
        alive = sum(1 for w in client.workers() if not w.lost)
        if need <= alive or client.job(job_id).status().state is not JobState.PENDING:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # polling the server: nothing here to wait on
    print(f"psgrid: warning: {job_id} needs {need} workers and {alive} "
          f"{'is' if alive == 1 else 'are'} alive: it waits (PENDING) until more join "
          f"(start workers, or raise [workers] count), or `psgrid cancel {job_id}`", file=sys.stderr)


def cmd_jobs(args: argparse.Namespace) -> int:
    from psgrid.client import Client
    from psgrid.client.progress import describe

    with Client(_server_address(args), security=_security(args)) as client:
        jobs = client.list_jobs()
    if args.json:
        print(json.dumps([_info_json(j) for j in jobs], indent=2))
        return 0
    print(f"{'JOB':<16} {'NAME':<20} {'STATE':<11} PROGRESS")
    for j in jobs:
        print(f"{j.job_id:<16} {j.spec.name[:20]:<20} {j.state.value:<11} {describe(j)}")
    return 0


def _info_json(info) -> dict:
    import dataclasses

    out = dataclasses.asdict(info)
    out["state"] = info.state.value
    return out


def cmd_job(args: argparse.Namespace) -> int:
    from psgrid.client import Client
    from psgrid.client.status import job_lines

    with Client(_server_address(args), security=_security(args)) as client:
        job = client.job(args.job_id)
        info = job.status()
        shards = job.shard_infos()[1:] if info.shards and (info.rows_held or info.rows_pulled) else []
    if args.json:
        print(json.dumps(_info_json(info), indent=2, default=str))
    else:
        print("\n".join(job_lines(info, shards)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from psgrid.client import Client

    with Client(_server_address(args), security=_security(args)) as client:
        job = client.job(args.job_id)
        before = job.status()
        if before.state.terminal:  # nothing to cancel; not an error (cancel is idempotent)
            print(f"{before.job_id}: had already finished ({before.state.value.lower()}); nothing to cancel")
            return 0
        _print_result(job.cancel())
    return 0


# --- psgrid status / plot ---------------------------------------------------------------


def _status(args: argparse.Namespace, client) -> dict:
    from psgrid.client.status import job_rows, node_rows

    nodes = None
    if args.supervisor or os.environ.get("PSGRID_SUPERVISOR"):
        from psgrid.supervisor.supervisor_client import SupervisorClient

        with SupervisorClient(_supervisor_address(args), security=_security(args)) as sup:
            sup.check_connection(flag=SUPERVISOR_FLAG)
            nodes = sup.nodes()
    jobs = client.list_jobs()
    histories = {j.job_id: client.job(j.job_id).history() for j in jobs if not j.state.terminal}
    shards = {j.job_id: client.job(j.job_id).shard_infos()[1:] for j in jobs
              if j.shards and not j.state.terminal and (j.rows_held or j.rows_pulled)}
    return {"nodes": node_rows(client.workers(), nodes, _server_address(args)),
            "jobs": job_rows(jobs, histories, shards)}


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from psgrid.client import Client
    from psgrid.client.status import render

    with Client(_server_address(args), security=_security(args)) as client:
        while True:
            status = _status(args, client)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render(status["nodes"], status["jobs"]), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)


def cmd_plot(args: argparse.Namespace) -> int:
    from psgrid.client import Client
    from psgrid.client.curves import plot_history

    with Client(_server_address(args), security=_security(args)) as client:
        rows = client.job(args.job_id).history()
    path = plot_history(rows, args.output, title=args.job_id, width_px=args.width, height_px=args.height)
    print(f"{path}: {len(rows)} points")
    return 0
