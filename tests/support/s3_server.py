"""A real S3 API on loopback for the tests: ``moto`` in server mode, in its own process.

s3fs talks HTTP to it exactly as it would to S3, MinIO or Ceph: the tests exercise the
wire protocol (multipart uploads, listings, conditional writes), not an in-process mock of
the client. Credentials and the endpoint reach every process the tests start (forked
scorers, Prefect workers) through the standard environment variables, never through
arguments.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from export.loader_workers import die_with_parent

#: What the server needs to be told once: fake keys (moto accepts any) and where it listens.
_ENV = {"AWS_ACCESS_KEY_ID": "lensflow-test", "AWS_SECRET_ACCESS_KEY": "lensflow-test",
        "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    """Start ``moto_server`` on a free loopback port; (process, endpoint URL) once it answers."""
    port = _free_port()
    server = Path(sys.executable).with_name("moto_server")
    starter = os.getpid()
    # Killed with its starter even when that is SIGKILLed (a timed-out CI job, a killed
    # benchmark): no server left listening after the tests.
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=lambda: die_with_parent(starter))
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """The loopback S3 server of this test session; the AWS variables point every process at it.

    s3fs is a dev dependency: without it these tests fail (ImportError), they never skip.
    """
    import s3fs  # noqa: F401
    proc, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV | {"AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def new_bucket() -> str:
    """``s3://<bucket>``: a fresh, empty bucket on the server the environment points at."""
    import fsspec

    name = f"lensflow-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket for one test."""
    return new_bucket()
