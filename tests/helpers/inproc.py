"""Drive an in-process parameter server through its real gRPC clients."""
from __future__ import annotations

import dataclasses
import uuid

import torch

from psgrid.client.job_client import JobServiceClient
from psgrid.codec import Layout
from psgrid.spec import JobSpec, OptimizerSpec
from psgrid.worker.ps_client import ParameterServerClient, push_header

from helpers.wait import wait_until


def small_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def spec(**changes) -> JobSpec:
    base = JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
                   steps=100, num_workers=1, staleness=None, optimizer=OptimizerSpec("sgd", lr=0.5))
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class Rig:
    """A job with registered, assigned workers and initialised parameters."""

    ps: ParameterServerClient
    jobs: JobServiceClient
    job_id: str
    workers: list[str]
    layout: Layout
    names: list[str]

    def params(self) -> dict[str, torch.Tensor]:
        pulled = self.jobs.fetch(self.job_id)
        return {k: v.clone() for k, v in pulled.layout.views(pulled.buffer).items()}

    def version(self) -> int:
        return self.jobs.get(self.job_id).version

    def push(self, worker: int, seq: int, grads: dict[str, torch.Tensor], base_step: int | None = None,
             ranks: tuple[int, ...] = ()):
        """Push step ``seq``'s gradient, computed (by default) on step ``seq``'s weights."""
        header = push_header(self.job_id, self.workers[worker], seq, 0, seq if base_step is None else base_step,
                             self.layout, ranks=ranks)
        return self.ps.push(header, self.layout.pack(grads))

    def pull(self, worker: int, clock: int):
        return self.ps.pull(self.job_id, self.workers[worker], clock, False,
                            lambda n: torch.empty(n, dtype=torch.uint8))


def make_rig(port: int, job_spec: JobSpec | None = None, params=None, security=None, tables=()) -> Rig:
    address = f"127.0.0.1:{port}"
    ps = ParameterServerClient(address, timeout_s=10, retry_for_s=0, security=security)
    jobs = JobServiceClient(address, timeout_s=10, retry_for_s=0, security=security)
    job_spec = job_spec or spec()
    prefix = uuid.uuid4().hex[:6]
    names = [f"{prefix}-{i}" for i in range(job_spec.num_workers)]
    workers = [ps.register(name, "localhost", 1, "cpu")[0] for name in names]
    job_id = jobs.submit(job_spec).job_id
    ranked = {}
    for w in workers:
        a = wait_until(lambda: ps.heartbeat(w, "")[0], timeout=10, message="an assignment")
        assert a.job_id == job_id
        ranked[a.rank] = w
    names = [names[workers.index(ranked[r])] for r in range(len(workers))]
    workers = [ranked[r] for r in range(len(workers))]
    params = params if params is not None else small_params()
    layout = Layout.of_tensors(params.items())
    ps.push(push_header(job_id, workers[0], 0, 0, 0, layout, init=True, tables=tables), layout.pack(params))
    return Rig(ps, jobs, job_id, workers, layout, names)
