"""Pure parts of the first hour's answers: when a waiting process speaks, what a job
shows people, why a pending job waits, and the one-line errors (no sockets here;
tests/integration/test_cli_mistakes.py runs the mistakes themselves)."""
from __future__ import annotations

import pytest

from psgrid.client.progress import describe
from psgrid.client.status import job_lines, job_rows, render
from psgrid.diagnose import REMIND_EVERY_S, Reminder, split_address
from psgrid.errors import ConnectionMistake, DeviceUnavailable, ERRORS_BY_NAME, TlsMismatch, Unavailable
from psgrid.spec import JobInfo, JobSpec, JobState

SPEC = JobSpec(model="psgrid.examples.models:linear", dataset="psgrid.examples.datasets:linear_regression",
               steps=10, num_workers=5, name="lin")


def test_a_waiting_process_speaks_at_once_then_every_interval():
    reminder = Reminder(every_s=30.0)
    said = [t for t in (0.0, 1.0, 29.9, 30.0, 31.0, 59.9, 60.0, 95.0) if reminder.due(t)]
    assert said == [0.0, 30.0, 60.0, 95.0]
    reminder.reset()  # the wait ended; a new one is announced at once
    assert reminder.due(96.0)
    assert REMIND_EVERY_S == 30.0


def test_a_mistake_is_one_line_of_cause_and_fix_and_still_unavailable():
    mistake = TlsMismatch("the server at h:1 speaks TLS", "pass --tls-ca")
    assert str(mistake) == "the server at h:1 speaks TLS: pass --tls-ca"
    assert isinstance(mistake, Unavailable) and mistake.code == "UNAVAILABLE"
    # a name arriving from the wire builds with one argument, as every psgrid error does
    assert str(ERRORS_BY_NAME["TlsMismatch"]("details")) == "details"
    assert issubclass(ERRORS_BY_NAME["CertificateProblem"], ConnectionMistake)


def test_addresses_split_into_host_and_port():
    assert split_address("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert split_address("[::1]:7070") == ("::1", 7070)
    with pytest.raises(ValueError):
        split_address("localhost")


def test_a_pending_job_says_why_it_waits_everywhere_it_is_shown():
    info = JobInfo("job-1", SPEC, JobState.PENDING, total_steps=10, waiting="needs 5 workers, 2 are alive")
    assert "waiting: needs 5 workers, 2 are alive" in describe(info)
    lines = job_lines(info)
    assert lines[0] == "job-1 (lin)" and "  state:     PENDING" in lines
    assert "  waiting:   needs 5 workers, 2 are alive" in lines
    table = render([], job_rows([info], {}))
    assert "waiting: needs 5 workers, 2 are alive" in table.splitlines()[-1]


def test_a_running_job_shows_progress_and_no_empty_lines():
    info = JobInfo("job-2", SPEC, JobState.RUNNING, step=5, total_steps=10, loss=0.25, metrics={"acc": 0.5},
                   worker_ids=("w-1", "w-2"))
    lines = job_lines(info)
    assert "  progress:  step 5/10 (50%)" in lines and "  loss:      0.2500" in lines
    assert "  metrics:   acc 0.5000" in lines and "  workers:   w-1, w-2" in lines
    assert not any(line.startswith(("  waiting", "  error", "  shards")) for line in lines)
    assert "waiting" not in render([], job_rows([info], {}))


def test_a_cuda_device_without_cuda_names_the_fix():
    import torch

    from psgrid.device import pick_device

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(DeviceUnavailable, match="--device cpu"):
        pick_device("cuda:0")
    with pytest.raises(DeviceUnavailable, match="unknown device 'gpu'"):
        pick_device("gpu")
    assert pick_device("cpu").type == "cpu"
