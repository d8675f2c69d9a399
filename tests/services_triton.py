"""A real Triton Inference Server for tests: ``anoclip serve`` on free loopback ports.

The server runs in the environment of ``anoclip.benchmarks.serve_environment`` (this checkout with the
``serve`` extra; PyTriton needs numpy < 2 while the tests run with numpy 2), built on first use and
reused. Use the fixtures by importing them into a test module::

    from services_triton import serve_python, start_server  # noqa: F401 (fixtures)

- ``serve_python``: the server environment's python (the tests skip, saying why, where it cannot
  be built);
- ``start_server(artifacts, *options)``: starts a :class:`ServeProcess` (``anoclip.benchmarks.serve_process``)
  on the CPU backend with one onnxruntime thread, waits until its models answer, and stops whatever
  is still running at the end of the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anoclip.benchmarks.serve_process import ServeProcess
from services import free_port

TEST_OPTIONS = ("--backend", "cpu", "--threads", "1")


def serve_process(python: Path, artifacts: Path, folder: Path, *options: str) -> ServeProcess:
    """Without LD_LIBRARY_PATH: the server must find its own libpython (``server.use_own_libpython``)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    return ServeProcess(python, artifacts, folder, (*TEST_OPTIONS, *options), ports=(free_port(), free_port(), free_port()),
                        env=env)


@pytest.fixture(scope="session")
def serve_python() -> Path:
    from anoclip.runtime.errors import AnoclipError
    from anoclip.benchmarks.serve_environment import server_python

    try:
        return server_python()
    except AnoclipError as exc:
        pytest.skip(f"no environment for `anoclip serve`: {exc}")


@pytest.fixture
def start_server(serve_python, tmp_path):
    """``start_server(artifacts, *options) -> ServeProcess``, stopped at the end of the test."""
    started: list[ServeProcess] = []

    def start(artifacts: Path, *options: str) -> ServeProcess:
        server = serve_process(serve_python, artifacts, tmp_path, *options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
