"""What an operator sees: Prometheus metrics, curves as a PNG, status as JSON."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from psgrid.examples import spec_path
from psgrid.spec import JobSpec

from helpers.wait import wait_until

pytestmark = pytest.mark.slow


def scrape(cluster) -> dict[str, float]:
    port = int((cluster.run_dir / "metrics.port").read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):  # raises on malformed text
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            samples[key] = s.value
    return samples


def test_metrics_endpoint_counts_pushes_during_training(cluster, client):
    job = client.submit(JobSpec.from_toml(spec_path("digits")).replace(epochs=30))
    key = f"psgrid_pushes_total{{job={job.job_id}}}"
    wait_until(lambda: scrape(cluster).get(key, 0) > 0, 60, message="a first push")
    first = scrape(cluster)[key]
    wait_until(lambda: scrape(cluster)[key] > first + 20, 60, message="more pushes")
    job.cancel()
    after = scrape(cluster)
    assert after["psgrid_bytes_received_total"] > 0 and after["psgrid_pulls_total{job=" + job.job_id + "}"] > 0
    assert after["psgrid_apply_seconds_count"] >= after[key]
    assert "psgrid_update_staleness_steps_bucket{le=0.0}" in after


def test_plot_command_writes_a_png_of_the_expected_size(cluster, client, tmp_path):
    from PIL import Image

    job = client.submit(JobSpec.from_toml(spec_path("linear")).replace(epochs=2, eval_every=40))
    job.wait(timeout=120, progress=False)
    out = tmp_path / "curve.png"
    done = subprocess.run([sys.executable, "-m", "psgrid", "plot", job.job_id, "-o", str(out), "--width", "800",
                           "--height", "300", "--server", cluster.address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 300)
