"""Push/pull throughput through a running psgrid server vs a plain TCP socket.

Both sides run in separate processes on loopback and do the same work per
step: the server receives a gradient into a reused buffer and applies an
in-place SGD update (push), or sends the parameters back (pull). psgrid is
driven through the worker's own path (``ShardLinks`` over the public
``ParameterServerClient.push``/``pull``, i.e. the step stream) three ways:
over TCP on the direct step channel (psgrid.channel, the default), over TCP
on gRPC (``grpc`` rows: a client with ``direct_channel=False``), and on the
shared-memory path (``shm`` rows). Prints the median time and GB/s of each,
and the ratio psgrid / socket; the last line is one JSON object of the figures
(issue 11):

- ``tcp_both_ratio_128MiB``: psgrid push+pull throughput at 128 MiB / the socket's
  (1 shard, TCP, the direct channel); ``grpc_both_ratio_128MiB`` the same on gRPC;
- ``shm_time_vs_socket_128MiB``: psgrid push+pull time at 128 MiB on the shared-memory path
  (worker and server on this host, psgrid.shm) / the socket's (< 1: faster);
- ``pull_1MiB_vs_socket``: psgrid's 1 MiB pull time / the socket's (> 1: slower), on
  the direct channel; ``grpc_pull_1MiB_vs_socket`` on gRPC.

    python scripts/bench_transport.py [--sizes-mib 1 16 128] [--reps 15] [--shards 1 2 4]
                                      [--omp-wait-policy passive|active|default]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch  # imported by each function that uses it, after main() set OMP_WAIT_POLICY

MiB = 1 << 20
#: How long the server may hold a pull sent ahead with a push (async: it answers at once).
PULL_AHEAD_S = 2.0
#: torch's OpenMP threads spin a while after every parallel op by default (libgomp), and
#: on two shared cores one process's spinning slows the next call of another: measured
#: here (2026-12-01), a 1 MiB psgrid pull took 15.6 ms instead of 3.3 and a 1 MiB socket
#: push 7.2 ms instead of 0.9, whichever process ran a torch op last. So every process of
#: the benchmark (this one, the socket server, the psgrid cluster) sleeps instead, unless
#: told otherwise.
OMP_WAIT_POLICIES = ("passive", "active", "default")


# --- baseline: a minimal parameter server on a plain socket ----------------------------


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    while len(view):
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def socket_server(port_file: str) -> None:
    """Serve one client: 'P'+len: receive a gradient and apply SGD; 'L'+len: send params."""
    import torch

    listener = socket.create_server(("127.0.0.1", 0))
    pathlib.Path(port_file + ".tmp").write_text(str(listener.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    params = grads = None
    head = bytearray(9)
    while True:
        try:
            _recv_exact(conn, memoryview(head))
        except ConnectionError:
            return
        op, n = head[:1], struct.unpack("<Q", head[1:])[0]
        if params is None or params.numel() * 4 != n:
            params, grads = torch.zeros(n // 4), torch.empty(n // 4)
        if op == b"P":
            _recv_exact(conn, memoryview(grads.numpy()).cast("B"))
            params.add_(grads, alpha=-0.01)
            conn.sendall(b"k")
        else:
            conn.sendall(memoryview(params.numpy()).cast("B"))


class SocketClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def push(self, payload: torch.Tensor) -> None:
        self.sock.sendall(b"P" + struct.pack("<Q", payload.numel()))
        self.sock.sendall(memoryview(payload.numpy()))
        _recv_exact(self.sock, memoryview(bytearray(1)))

    def pull(self, into: torch.Tensor) -> None:
        self.sock.sendall(b"L" + struct.pack("<Q", into.numel()))
        _recv_exact(self.sock, memoryview(into.numpy()))


def _wait_port(path: pathlib.Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("baseline server did not start")
        time.sleep(0.02)
    return int(path.read_text())


# --- psgrid ---------------------------------------------------------------------------


def psgrid_rig(address: str, nbytes: int, shared_memory: bool = False, direct_channel: bool = True):
    """A one-worker async job on a running cluster, driven through the worker's own shard links,
    over TCP (on the direct step channel, or on gRPC) or (``shared_memory``) the shared-memory
    path of the step stream."""
    from psgrid.client.job_client import JobServiceClient
    from psgrid.codec import Layout
    from psgrid.partition import partition
    from psgrid.spec import JobSpec, OptimizerSpec
    from psgrid.worker.ps_client import ParameterServerClient
    from psgrid.worker.shards import ShardLinks
    import torch

    ps = ParameterServerClient(address, shared_memory=shared_memory, direct_channel=direct_channel)
    jobs = JobServiceClient(address)
    name = f"bench-{nbytes}-{time.monotonic_ns()}"
    worker, _ = ps.register(name, "localhost", os.getpid(), "cpu")
    spec = JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
                   steps=10**6, num_workers=1, staleness=None, optimizer=OptimizerSpec("sgd", lr=0.01))
    job_id = jobs.submit(spec).job_id
    deadline = time.monotonic() + 30
    while (assignment := ps.heartbeat(worker, "")[0]) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the job was not assigned")
        time.sleep(0.05)
    links = ShardLinks(ps, lambda: worker, name, ("localhost", os.getpid(), "cpu"), None)
    links.open(assignment)
    numel = nbytes // 4
    # four tensors, as a model has several: 1/2, 1/4, 1/8, the rest
    sizes = [numel // 2, numel // 4, numel // 8]
    sizes.append(numel - sum(sizes))
    full = Layout.of([(f"layer{i}.weight", torch.float32, (n,)) for i, n in enumerate(sizes)])
    layouts = partition(full, links.count).layouts
    links.push(job_id, 0, [], layouts, [torch.zeros(l.total_bytes, dtype=torch.uint8) for l in layouts], init=True)
    grads = [l.pack({m.name: torch.full(m.shape, 1e-3) for m in l.tensors}) for l in layouts]
    receive = [torch.empty(l.total_bytes, dtype=torch.uint8) for l in layouts]
    state = {"seq": 0}

    def push():
        links.push(job_id, state["seq"], [], layouts, grads)
        state["seq"] += 1

    def pull():
        for pulled, into in zip(links.pull(job_id, state["seq"], lambda shard: lambda n: receive[shard]), receive):
            if pulled.buffer.data_ptr() != into.data_ptr():
                # In shared memory (a segment, or the server's parameters read in place): the
                # worker copies its weights out, as it loads them; the socket's bytes land in
                # its buffer too.
                into.copy_(pulled.buffer[: into.numel()])
            if pulled.intact is not None and not pulled.intact():
                raise RuntimeError("the weights changed while they were read, in a one-worker job")

    def step():
        """A worker's step on the step stream: the push, with the next pull sent right behind it."""
        links.push(job_id, state["seq"], [], layouts, grads, then_pull_s=PULL_AHEAD_S)
        state["seq"] += 1
        pull()

    pull()
    pull()  # the shared-memory path, when asked for, opens after the first pull
    _check_path(links, shared_memory, direct_channel)
    for shard, layout in enumerate(layouts):
        # As a worker computes its gradient: in its push segment when it has one (the runner's
        # GradientStep.gradients_into), so that a push copies nothing on this side.
        if (buffer := links.push_buffer(job_id, shard, layout.total_bytes)) is not None:
            grads[shard] = buffer.copy_(grads[shard])
    return push, pull, step, full.total_bytes


def _check_path(links, shared_memory: bool, direct_channel: bool) -> None:
    """Refuse to go on unless every step stream moves the tensors the way asked: TCP for
    psgrid's rows and ``tcp_*`` figures (on the direct channel, or on gRPC for the ``grpc``
    ones), shared memory for the ``shm`` ones."""
    for shard in range(links.count):
        stream = links.client(shard).stream(links.worker_id(shard))
        if (stream.shm is not None) != shared_memory:
            raise RuntimeError(f"shard {shard}'s step stream {'does not use' if shared_memory else 'uses'} "
                               "shared memory (see the server's and this script's log lines)")
        if stream.on_channel != direct_channel:
            raise RuntimeError(f"shard {shard}'s step stream {'is not' if direct_channel else 'is'} on a direct "
                               "channel (see the server's and this script's log lines)")


def timed_interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run in turns so that load spikes hit all alike."""
    for fn in fns.values():
        fn()
        fn()  # warm-up: connections, page faults, buffers
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def start_cluster(root: pathlib.Path, shards: int):
    """`psgrid up` with ``shards`` parameter-server shards and no workers: (the cluster, the coordinator)."""
    from psgrid.supervisor.launch import UpProcess, consecutive_free_ports

    if shards == 1:  # the server binds port 0 and reports it
        cluster = UpProcess(root, log_level="WARNING", cluster="[workers]\ncount = 0\n")
    else:  # shards are named to the coordinator by fixed addresses
        cluster = UpProcess(root, "--host", "local", log_level="WARNING", cluster=(
            f'[hosts.local]\naddress = "127.0.0.1"\nservers = {shards}\n'
            f'server_port = {consecutive_free_ports(shards)}\nworkers = 0\n'))
    try:
        return cluster, cluster.server_addresses()[0]
    except BaseException:
        cluster.stop()
        raise


def socket_fns(sock: SocketClient, nbytes: int) -> dict:
    """The baseline's push and pull of ``nbytes``, with their own reused buffers."""
    import torch

    payload = torch.full((nbytes // 4,), 1e-3).view(torch.uint8)
    into = torch.empty(nbytes, dtype=torch.uint8)
    return {"socket push": lambda: sock.push(payload), "socket pull": lambda: sock.pull(into)}


def measure_sizes(sock: SocketClient, address: str, sizes_mib: list[int], reps: int) -> list[tuple]:
    """(MiB, bytes, medians) per size on one shard: push, pull and a worker's step, and the socket's."""
    rows = []
    for mib in sizes_mib:
        push, pull, step, nbytes = psgrid_rig(address, mib * MiB)
        grpc_push, grpc_pull, grpc_step, _ = psgrid_rig(address, mib * MiB, direct_channel=False)
        shm_push, shm_pull, shm_step, _ = psgrid_rig(address, mib * MiB, shared_memory=True)
        theirs = socket_fns(sock, nbytes)
        rows.append((mib, nbytes, timed_interleaved({
            "psgrid push": push, "socket push": theirs["socket push"],
            "psgrid pull": pull, "socket pull": theirs["socket pull"], "psgrid step": step,
            "grpc push": grpc_push, "grpc pull": grpc_pull, "grpc step": grpc_step,
            "shm push": shm_push, "shm pull": shm_pull, "shm step": shm_step,
        }, max(reps, int(64 / mib)))))
    return rows


def measure_shards(sock: SocketClient, root: pathlib.Path, mib: int, counts: list[int], reps: int) -> list[tuple]:
    """(shards, bytes, medians) of a ``mib`` push and pull over each number of shards."""
    rows = []
    for shards in counts:
        sharded, address = start_cluster(root / f"shards{shards}", shards)
        try:
            push, pull, _, nbytes = psgrid_rig(address, mib * MiB)
            rows.append((shards, nbytes, timed_interleaved(
                {"psgrid push": push, "psgrid pull": pull, **socket_fns(sock, nbytes)}, reps)))
        finally:
            sharded.stop()
    return rows


def print_sizes(rows: list[tuple]) -> None:
    print(f"\n{'size':>8} {'op':>8} {'psgrid ms':>10} {'GB/s':>6} {'socket ms':>10} {'GB/s':>6} {'ratio':>6}")
    for mib, nbytes, r in rows:
        both_theirs = r["socket push"] + r["socket pull"]
        lines = [(op, r[f"psgrid {op}"], r[f"socket {op}"], nbytes) for op in ("push", "pull")]
        lines += [("both", r["psgrid push"] + r["psgrid pull"], both_theirs, 2 * nbytes),
                  ("step", r["psgrid step"], both_theirs, 2 * nbytes),
                  ("grpc push", r["grpc push"], r["socket push"], nbytes),
                  ("grpc pull", r["grpc pull"], r["socket pull"], nbytes),
                  ("grpc both", r["grpc push"] + r["grpc pull"], both_theirs, 2 * nbytes),
                  ("grpc step", r["grpc step"], both_theirs, 2 * nbytes),
                  ("shm push", r["shm push"], r["socket push"], nbytes),
                  ("shm pull", r["shm pull"], r["socket pull"], nbytes),
                  ("shm both", r["shm push"] + r["shm pull"], both_theirs, 2 * nbytes),
                  ("shm step", r["shm step"], both_theirs, 2 * nbytes)]
        for op, ours, theirs, moved in lines:
            print(f"{mib:>5}MiB {op:>8} {ours * 1e3:>10.1f} {moved / ours / 1e9:>6.2f} "
                  f"{theirs * 1e3:>10.1f} {moved / theirs / 1e9:>6.2f} {theirs / ours:>6.2f}")
    print("push, pull: on the direct step channel (TCP, psgrid.channel); grpc = the same on gRPC")
    print("both = a push and a pull, each on its own; step = what a worker does each step: the push with "
          "the next pull sent right behind it on the step stream, then that pull read (socket: push + pull)")
    print("shm = the same on the shared-memory path (worker and server on this host): only the "
          "headers cross the socket")


def print_shards(mib: int, rows: list[tuple]) -> None:
    print(f"\n{mib} MiB over several parameter-server shards (one process each):")
    print(f"{'shards':>6} {'push GB/s':>10} {'pull GB/s':>10} {'socket push':>12} {'socket pull':>12} "
          f"{'push ratio':>10} {'pull ratio':>10}")
    for shards, nbytes, r in rows:
        gbs = {k: nbytes / v / 1e9 for k, v in r.items()}
        print(f"{shards:>6} {gbs['psgrid push']:>10.2f} {gbs['psgrid pull']:>10.2f} {gbs['socket push']:>12.2f} "
              f"{gbs['socket pull']:>12.2f} {gbs['psgrid push'] / gbs['socket push']:>10.2f} "
              f"{gbs['psgrid pull'] / gbs['socket pull']:>10.2f}")


def summary(rows: list[tuple], shard_rows: list[tuple], reps: int, omp_wait_policy: str) -> dict:
    """The JSON figures: issue 11's three first, then per size and per shard count.

    ``*_ratio``: psgrid throughput / the socket's, as in the tables (1.0 = as fast);
    ``pull_1MiB_vs_socket``: a time ratio, psgrid / socket (1.0 = as fast, higher = slower).
    """
    by_size = {mib: r for mib, _, r in rows}
    both = {mib: (r["socket push"] + r["socket pull"]) / (r["psgrid push"] + r["psgrid pull"])
            for mib, r in by_size.items()}
    grpc_both = {mib: (r["socket push"] + r["socket pull"]) / (r["grpc push"] + r["grpc pull"])
                 for mib, r in by_size.items()}
    sizes = {f"{mib}MiB": {
        "push_ratio": r["socket push"] / r["psgrid push"], "pull_ratio": r["socket pull"] / r["psgrid pull"],
        "both_ratio": both[mib], "step_ratio": (r["socket push"] + r["socket pull"]) / r["psgrid step"],
        "grpc_both_ratio": grpc_both[mib],
        "shm_both_time_vs_socket": (r["shm push"] + r["shm pull"]) / (r["socket push"] + r["socket pull"]),
        "ms": {k.replace(" ", "_"): v * 1e3 for k, v in r.items()},
    } for mib, r in by_size.items()}
    shards = {str(n): {"push_ratio": r["socket push"] / r["psgrid push"],
                       "pull_ratio": r["socket pull"] / r["psgrid pull"]} for n, _, r in shard_rows}
    return _rounded({
        "tcp_both_ratio_128MiB": both.get(128),
        "shm_time_vs_socket_128MiB": sizes["128MiB"]["shm_both_time_vs_socket"] if 128 in by_size else None,
        "pull_1MiB_vs_socket": by_size[1]["psgrid pull"] / by_size[1]["socket pull"] if 1 in by_size else None,
        "grpc_both_ratio_128MiB": grpc_both.get(128),
        "grpc_pull_1MiB_vs_socket": by_size[1]["grpc pull"] / by_size[1]["socket pull"] if 1 in by_size else None,
        "sizes": sizes, "shards_at_max_size": shards, "reps": reps, "omp_wait_policy": omp_wait_policy,
    })


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4],
                        help="shard counts to compare at the largest size")
    parser.add_argument("--omp-wait-policy", choices=OMP_WAIT_POLICIES, default="passive",
                        help="OMP_WAIT_POLICY of every process of the run ('default': libgomp's own, "
                             "spinning a while; the figures before 2026-12-01 were taken so)")
    parser.add_argument("--socket-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Before anything loads torch (libgomp reads it once); the children inherit it.
    if args.omp_wait_policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.socket_server:
        socket_server(args.socket_server)
        return

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="psgrid-bench-"))
    port_file = tmp / "socket.port"
    baseline = subprocess.Popen([sys.executable, __file__, "--socket-server", str(port_file),
                                 "--omp-wait-policy", args.omp_wait_policy])
    cluster = None
    try:
        sock = SocketClient(_wait_port(port_file, baseline))
        cluster, address = start_cluster(tmp / "cluster", 1)
        rows = measure_sizes(sock, address, args.sizes_mib, args.reps)
        cluster.stop()
        shard_rows = measure_shards(sock, tmp, max(args.sizes_mib), args.shards, max(4, args.reps // 2))
    except BaseException:
        print(f"the clusters' logs are under {tmp}", file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        baseline.kill()
        baseline.wait()
    shutil.rmtree(tmp, ignore_errors=True)  # each cluster checkpointed the weights: ~1.3 GB at the defaults

    print_sizes(rows)
    print_shards(max(args.sizes_mib), shard_rows)
    print("\nratio = psgrid throughput / plain-socket throughput (1.0 = as fast as the socket); "
          f"OMP_WAIT_POLICY {args.omp_wait_policy} in every process")
    print(json.dumps(summary(rows, shard_rows, args.reps, args.omp_wait_policy)))


if __name__ == "__main__":
    main()
