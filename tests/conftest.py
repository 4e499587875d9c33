"""Shared fixtures: in-process servers on port 0 and local process clusters."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).parent
# Worker processes import the test-only model factories in tests/helpers.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(TESTS))


@pytest.fixture
def server_factory():
    """Start in-process parameter servers on 127.0.0.1:0; stop them at teardown."""
    from psgrid.server.app import ParameterServerApp
    from psgrid.server.config import ServerConfig

    apps = []

    def start(**config):
        app = ParameterServerApp(ServerConfig(host="127.0.0.1", port=0, **config)).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.5)


@pytest.fixture
def server(server_factory):
    return server_factory()
