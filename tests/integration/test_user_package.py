"""README, "Your own model and data", followed as written: the package files are taken
from the README's code blocks, the processes get the README's flags and PYTHONPATH, the
job trains on two workers and `psgrid serve` serves it (input shape from the dataset)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

README = pathlib.Path(__file__).parents[2] / "README.md"
ALLOW = "psgrid.examples,mylab"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def write_files(text: str, root: pathlib.Path) -> list[str]:
    """Write each block whose first line is ``# PATH`` to root/PATH."""
    written = []
    for lang, body in blocks(text):
        first = body.splitlines()[0]
        if lang in ("python", "toml") and re.fullmatch(r"# [\w./-]+\.(py|toml)", first):
            path = root / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written.append(first[2:])
    return written


def port(path: pathlib.Path) -> int:
    return int(wait_until(lambda: path.exists() and path.read_text().strip(), 60,
                          message=f"{path.name} written"))


def test_the_readme_user_package_trains_and_serves(tmp_path):
    text = section("Your own model and data")
    assert write_files(text, tmp_path) == ["mylab/__init__.py", "mylab/models.py", "mylab/data.py",
                                           "mylab-job.toml"]
    shell = next(body for lang, body in blocks(text) if lang == "sh")
    assert "export PYTHONPATH=$PWD" in shell and shell.count(f"--allow-modules {ALLOW}") == 3
    assert "--allow-modules mylab" in shell and "psgrid submit mylab-job.toml" in shell
    snippet = re.search(r'python3 -c "\n(.*?)"\n', shell, flags=re.S).group(1)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    psgrid = [sys.executable, "-m", "psgrid"]
    procs = []

    def start(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{args[0]}-{len(procs)}.log", "w")
        procs.append(subprocess.Popen([*psgrid, *args], cwd=tmp_path, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return procs[-1]

    try:
        start("server", "--port", "0", "--port-file", str(tmp_path / "ps.port"), "--allow-modules", ALLOW)
        server = f"127.0.0.1:{port(tmp_path / 'ps.port')}"
        for name in ("w0", "w1"):
            start("worker", "--server", server, "--name", name, "--allow-modules", ALLOW, "--threads", "1")
        out = subprocess.run([*psgrid, "submit", "mylab-job.toml", "--server", server, "--wait"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.splitlines()[0]
        accuracy = float(re.search(r"test_accuracy[=: ]+([0-9.]+)", out.stdout).group(1))
        assert accuracy >= 0.9, out.stdout

        serve = start("serve", "--follow-job", job_id, "--server", server, "--port", "0",
                      "--port-file", str(tmp_path / "serve.port"), "--allow-modules", "mylab")
        served = port(tmp_path / "serve.port")
        predicted = subprocess.run([sys.executable, "-c", snippet.replace("7072", str(served))], cwd=tmp_path,
                                   env=env, capture_output=True, text=True, timeout=90)
        assert predicted.returncode == 0, predicted.stderr
        assert float(predicted.stdout.split()[-1]) >= 0.9, predicted.stdout
        assert serve.poll() is None
        assert "taken from the job's dataset mylab.data:digit_images" in (tmp_path / "serve-3.log").read_text()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
