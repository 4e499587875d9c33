"""The client SDK: submit jobs, follow them, fetch the trained model.

    from psgrid.client import Client
    from psgrid.spec import JobSpec

    client = Client("127.0.0.1:7070")
    job = client.submit(JobSpec.from_toml("job.toml"))
    info = job.wait()
    model = job.model()
"""
from psgrid.client.api import Client, Job


def __getattr__(name: str):
    # The serving SDK: psgrid.client.InferenceClient(address).predict(x).
    if name == "InferenceClient":
        from psgrid.inference.client import InferenceClient

        return InferenceClient
    raise AttributeError(name)


__all__ = ["Client", "Job", "InferenceClient"]
