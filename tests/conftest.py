"""Shared fixtures: a real MLflow tracking server on 127.0.0.1 for the tracking tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URL of a fresh ``mlflow server`` subprocess, stopped (by its own process group) at the end."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    exe = shutil.which("mlflow")
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd += [
        "server",
        "--backend-store-uri", f"sqlite:///{tmp / 'm.db'}",
        "--default-artifact-root", str(tmp / "art"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group created for this server only
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()

    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (tmp / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not come up (rc={proc.poll()}):\n{text}")
            time.sleep(0.5)
        yield url
    finally:
        stop()

