"""Start and stop a real MONAI Label server process for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
from replicas import server_command  # noqa: E402


def until(check, timeout: float = 5) -> None:
    """Poll ``check`` until it holds (no fixed sleep); fail when it has not after ``timeout`` s."""
    deadline = time.time() + timeout
    while not check() and time.time() < deadline:
        time.sleep(0.01)
    assert check()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m monailabel.main start_server`` with the segvol app, as scripts/serve.sh runs it.
    A context manager: ``with Server(...) as srv`` waits until it is ready (``srv.info``) and stops
    it at the end, also when the test fails."""

    def __init__(
        self,
        studies: Path | str,
        conf: dict[str, str],
        log: Path,
        extra_env: dict | None = None,
        headers: dict | None = None,
    ) -> None:
        self.headers = headers or {}  # sent with the readiness checks (a bearer token when auth is on)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = {"versions_dir": str(log.parent / "versions"), **conf}  # never the repo's own folder
        args = server_command(studies, self.port, [x for k, v in conf.items() for x in ("--conf", k, v)])
        env = dict(
            os.environ,
            PYTHONPATH=f"{ROOT / 'apps' / 'segvol'}{os.pathsep}{ROOT}",
            MONAI_LABEL_TRACKING_ENABLED="false",
            HF_HUB_OFFLINE="1",
            **(extra_env or {}),
        )
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180) -> dict:
        """Until /info answers and the model has finished loading (or failed to)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                info = requests.get(f"{self.url}/info/", headers=self.headers, timeout=5).json()
                if info.get("error"):
                    return info
                # the version is named before the predictor is built: health says when it is
                if requests.get(f"{self.url}/segvol/health", timeout=5).status_code == 200:
                    return info
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> Server:
        try:
            self.info = self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


def run_round(srv: Server, timeout: float = 600) -> dict:
    """Start a fine-tune round on ``srv`` and wait for it to end: the server's status then."""
    r = requests.post(f"{srv.url}/train/segvol", json={}, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + timeout
    time.sleep(2)
    while time.time() < deadline:
        status = requests.get(f"{srv.url}/segvol/status", timeout=30).json()
        if status["round"] and status["round"]["state"] in ("done", "failed", "interrupted"):
            return status
        time.sleep(1)
    raise TimeoutError(srv.log.read_text()[-3000:])
