"""Push/pull throughput through a running psgrid server vs a plain TCP socket.

Both sides run in separate processes on loopback and do the same work per
step: the server receives a gradient into a reused buffer and applies an
in-place SGD update (push), or sends the parameters back (pull). Prints the
median time and GB/s of each, and the ratio psgrid / socket.

    python scripts/bench_transport.py [--sizes-mib 1 16 128] [--reps 8]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import torch

MiB = 1 << 20


# --- baseline: a minimal parameter server on a plain socket ----------------------------


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    while len(view):
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def socket_server(port_file: str) -> None:
    """Serve one client: 'P'+len: receive a gradient and apply SGD; 'L'+len: send params."""
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


def psgrid_rig(address: str, nbytes: int):
    """A one-worker async job on a running cluster, driven through the worker's own shard links."""
    from psgrid.client.job_client import JobServiceClient
    from psgrid.codec import Layout
    from psgrid.partition import partition
    from psgrid.spec import JobSpec, OptimizerSpec
    from psgrid.worker.ps_client import ParameterServerClient
    from psgrid.worker.shards import ShardLinks

    ps = ParameterServerClient(address)
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
        links.pull(job_id, state["seq"], lambda shard: lambda n: receive[shard])

    return push, pull, full.total_bytes


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4],
                        help="shard counts to compare at the largest size")
    parser.add_argument("--socket-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.socket_server:
        socket_server(args.socket_server)
        return

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="psgrid-bench-"))
    port_file = tmp / "socket.port"
    baseline = subprocess.Popen([sys.executable, __file__, "--socket-server", str(port_file)])
    cluster = None
    rows = []
    try:
        sock = SocketClient(_wait_port(port_file, baseline))
        cluster, address = start_cluster(tmp / "cluster", 1)
        for mib in args.sizes_mib:
            reps = max(args.reps, int(64 / mib))
            push, pull, nbytes = psgrid_rig(address, mib * MiB)
            payload = torch.full((nbytes // 4,), 1e-3).view(torch.uint8)
            into = torch.empty(nbytes, dtype=torch.uint8)
            result = timed_interleaved({
                "psgrid push": push, "socket push": lambda: sock.push(payload),
                "psgrid pull": pull, "socket pull": lambda: sock.pull(into),
            }, reps)
            rows.append((mib, nbytes, result))
        cluster.stop()
        shard_rows = []
        mib = max(args.sizes_mib)
        for shards in args.shards:
            sharded, address = start_cluster(tmp / f"shards{shards}", shards)
            try:
                push, pull, nbytes = psgrid_rig(address, mib * MiB)
                payload = torch.full((nbytes // 4,), 1e-3).view(torch.uint8)
                into = torch.empty(nbytes, dtype=torch.uint8)
                shard_rows.append((shards, nbytes, timed_interleaved({
                    "psgrid push": push, "socket push": lambda: sock.push(payload),
                    "psgrid pull": pull, "socket pull": lambda: sock.pull(into),
                }, max(4, args.reps // 2))))
            finally:
                sharded.stop()
    finally:
        if cluster is not None:
            cluster.stop()
        baseline.kill()
        baseline.wait()

    print(f"\n{'size':>8} {'op':>5} {'psgrid ms':>10} {'GB/s':>6} {'socket ms':>10} {'GB/s':>6} {'ratio':>6}")
    for mib, nbytes, r in rows:
        for op in ("push", "pull"):
            ours, theirs = r[f"psgrid {op}"], r[f"socket {op}"]
            print(f"{mib:>5}MiB {op:>5} {ours * 1e3:>10.1f} {nbytes / ours / 1e9:>6.2f} "
                  f"{theirs * 1e3:>10.1f} {nbytes / theirs / 1e9:>6.2f} {theirs / ours:>6.2f}")
        both_ours = r["psgrid push"] + r["psgrid pull"]
        both_theirs = r["socket push"] + r["socket pull"]
        print(f"{mib:>5}MiB  both {both_ours * 1e3:>10.1f} {2 * nbytes / both_ours / 1e9:>6.2f} "
              f"{both_theirs * 1e3:>10.1f} {2 * nbytes / both_theirs / 1e9:>6.2f} {both_theirs / both_ours:>6.2f}")
    print(f"\n{max(args.sizes_mib)} MiB over several parameter-server shards (one process each):")
    print(f"{'shards':>6} {'push GB/s':>10} {'pull GB/s':>10} {'socket push':>12} {'socket pull':>12} "
          f"{'push ratio':>10} {'pull ratio':>10}")
    for shards, nbytes, r in shard_rows:
        gbs = {k: nbytes / v / 1e9 for k, v in r.items()}
        print(f"{shards:>6} {gbs['psgrid push']:>10.2f} {gbs['psgrid pull']:>10.2f} {gbs['socket push']:>12.2f} "
              f"{gbs['socket pull']:>12.2f} {gbs['psgrid push'] / gbs['socket push']:>10.2f} "
              f"{gbs['psgrid pull'] / gbs['socket pull']:>10.2f}")
    print("\nratio = psgrid throughput / plain-socket throughput (1.0 = as fast as the socket)")


if __name__ == "__main__":
    main()
