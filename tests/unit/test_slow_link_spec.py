"""The slow-link knobs of a job: checked, carried through protobuf, TOML and `psgrid submit`
flags, and what they cost shown on `psgrid job` and `psgrid status`."""
from __future__ import annotations

import pytest

from psgrid import messages
from psgrid.cli import build_parser
from psgrid.cli.jobs import _spec_from_args
from psgrid.client.status import job_lines, job_rows, render
from psgrid.errors import InvalidSpec
from psgrid.spec import JobInfo, JobSpec, JobState, OptimizerSpec

BASE = JobSpec(model="psgrid.examples.models:mlp", dataset="psgrid.examples.datasets:digits", steps=10,
               num_workers=2, name="slow")
LOCAL = BASE.replace(sync_every=8, local_optimizer=OptimizerSpec("adamw", lr=0.001), compression="TopK:0.01",
                     pull_dtype="fp16", error_feedback=False,
                     optimizer=OptimizerSpec("sgd", lr=0.7, momentum=0.9, nesterov=True))


def test_the_knobs_are_checked():
    assert LOCAL.compression == "topk:0.01" and LOCAL.encoding.ratio == 0.01
    for bad in ({"sync_every": 4}, {"local_optimizer": OptimizerSpec("sgd")}, {"sync_every": 0},
                {"compression": "zip"}, {"compression": "topk:0.9"}, {"pull_dtype": "int8"},
                {"scale_stale": True}, {"error_feedback": "yes"}):
        with pytest.raises(InvalidSpec):
            BASE.replace(**bad)
    assert BASE.replace(staleness=None, scale_stale=True).scale_stale


@pytest.mark.parametrize("spec", [BASE, LOCAL, BASE.replace(staleness=3, scale_stale=True, compression="int8")])
def test_protobuf_round_trip(spec):
    assert messages.spec_from_proto(messages.spec_to_proto(spec)) == spec


def test_toml_and_flags(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('model = "psgrid.examples.models:mlp"\ndataset = "psgrid.examples.datasets:digits"\n'
                    'steps = 10\nsync_every = 4\ncompression = "int8"\n[local_optimizer]\nname = "sgd"\nlr = 0.1\n')
    spec = JobSpec.from_toml(path)
    assert (spec.sync_every, spec.local_optimizer.lr, spec.compression) == (4, 0.1, "int8")
    args = build_parser().parse_args(["submit", str(path), "--sync-every", "16", "--local-optimizer", "adam",
                                      "--local-lr", "0.002", "--compression", "topk:0.05", "--no-error-feedback",
                                      "--pull-dtype", "bf16"])
    flagged = _spec_from_args(args)
    assert flagged.sync_every == 16 and flagged.local_optimizer == OptimizerSpec("adam", lr=0.002)
    assert (flagged.compression, flagged.error_feedback, flagged.pull_dtype) == ("topk:0.05", False, "bf16")


def test_psgrid_job_and_status_show_the_traffic_and_the_ratio():
    info = JobInfo("job-3", LOCAL, JobState.RUNNING, step=5, total_steps=10, pushes=10, bytes_pushed=20_000,
                   dense_bytes_pushed=1_000_000, pulls=10, bytes_pulled=500_000)
    lines = job_lines(info)
    assert ("  traffic:   push 2.0 kB/round/worker (topk:0.01, no error feedback, compression ratio 50.0x), "
            "pull 50.0 kB/round/worker (fp16)") in lines
    assert "  local SGD: adamw lr 0.001 on the workers, a push every 8 local steps" in lines
    rows = job_rows([info], {})
    assert rows[0]["compression_ratio"] == 50.0 and rows[0]["push_bytes_per_step"] == 2000
    assert "52.0 kB" in render([], rows).splitlines()[-1]
    assert not any(line.startswith("  traffic") for line in job_lines(JobInfo("job-4", BASE, JobState.PENDING)))
