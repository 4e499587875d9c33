"""The client SDK: submit jobs, follow them, fetch the trained model.

    from psgrid.client import Client
    from psgrid.spec import JobSpec

    client = Client("127.0.0.1:7070")
    job = client.submit(JobSpec.from_toml("job.toml"))
    info = job.wait()
    model = job.model()
"""
from psgrid.client.api import Client, Job

__all__ = ["Client", "Job"]
