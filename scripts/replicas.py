#!/usr/bin/env python3
"""N MONAI Label replicas of the segvol app behind HAProxy, on one archive and one versions store.

  python scripts/replicas.py --replicas 2 --studies http://127.0.0.1:8042/dicom-web \\
      [--host 127.0.0.1] [--port 8000] [--work build/replicas] [-- --conf weights seeded ...]

Routing: a request naming an image (``?image=``: inference, label saves, label history) goes to
the replica that consistent hashing assigns that image, so its encodings are computed once and
reused by every further prompt; other requests are spread round-robin. HAProxy checks each
replica's /segvol/health every second: a replica that stops answering is taken out after two
failed checks, its images move to the others (consistent hashing moves only those), and a request
that found it dead is sent again to another replica (``retry-on``, ``redispatch``) where HAProxy
still holds it (a request of up to 64 kB: prompts, not label uploads); anything else is answered
503 with a message, never dropped silently. A replica that exits is started again after
``--restart-after`` seconds; its images move back to it once it is healthy.

What the replicas must agree on is shared: the team store (SQLite beside the datastore cache:
leases, served results, saves), the versions folder (one round at a time through its lock file;
each replica serves the ACTIVE version at its next request) and the archive itself. With
``--conf team_db postgresql://...`` the team store, the versions and the round lock are in
PostgreSQL instead, and several hosts, each running this, are one team (docs/scaling.md).

With GPUs, replica n sees GPU n % count alone (CUDA_VISIBLE_DEVICES). HAProxy is Debian's
``haproxy`` package (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "apps" / "segvol"

# HAProxy's own failures (502 replica died mid-request, 503 none up, 504 timeout), each answered as
# a 503 with a message a client can show; a 503 means "send it again", and a client retries it.
ERRORS = {
    502: (
        "The segvol-label replica serving this request stopped before it answered. Send it again: "
        "another replica takes over this image. (A label save may or may not have been stored; saving "
        "again is safe, the newest label of an image is its final one.)",
    ),
    503: (
        "No segvol-label replica can answer right now (all are starting, loading the model or down). "
        "Try again in a moment.",
    ),
    504: ("The segvol-label replica serving this request did not answer in time. Send it again.",),
}


def haproxy_config(host: str, port: int, backends: list[tuple[str, int]], errors: Path) -> str:
    """HAProxy's configuration: image affinity by consistent hashing, health checks, retries."""
    servers = "\n".join(f"    server {name} 127.0.0.1:{p} check" for name, p in backends)
    error_files = "\n".join(f"    errorfile {code} {errors / f'{code}.http'}" for code in ERRORS)
    return f"""global
    log stdout format raw local0 info
    maxconn 1024
    tune.bufsize 65536

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 15m
    timeout server 15m
    timeout http-request 60s
    timeout queue 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    option http-buffer-request
{error_files}

frontend segvol
    bind {host}:{port}
    default_backend replicas

backend replicas
    balance url_param image
    hash-type consistent
    option httpchk GET /segvol/health
    http-check expect status 200
    default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 2
{servers}
"""


def write_error_files(folder: Path) -> Path:
    """The answers HAProxy gives itself, as JSON with a ``detail`` like the server's own errors."""
    folder.mkdir(parents=True, exist_ok=True)
    for code, message in ERRORS.items():
        body = json.dumps({"detail": message}) + "\n"
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n"
            f"Connection: close\r\nContent-Length: {len(body.encode())}\r\n\r\n"
        )
        (folder / f"{code}.http").write_text(head + body)
    return folder


def gpu_count() -> int:
    """GPUs on this host (nvidia-smi), without importing torch in the launcher."""
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def server_command(studies: str, port: int, args: list[str] = ()) -> list[str]:
    """MONAI Label's server with the segvol app on 127.0.0.1:``port``, as scripts/serve.sh starts it
    (apps/segvol and the repository on PYTHONPATH)."""
    app = ["--app", str(APP), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "monailabel.main", "start_server", *app, "--uvicorn_app", "server:app", *args]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    """Until ``url``/segvol/health answers 200 (a replica, or HAProxy routing to one); an exit of
    ``proc`` or the timeout is an error naming ``what`` and its log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        try:
            if requests.get(f"{url}/segvol/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f} s; see {log}")


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, studies: str, args: list[str], env: dict[str, str]) -> None:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                server_command(studies, self.port, args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "SEGVOL_REPLICA": self.name},
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float) -> None:
        wait_healthy(self.url, self.proc, f"replica {self.name}", self.log, timeout)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Cluster:
    """The replicas and HAProxy in front of them; a context manager (stops everything on exit).
    The first replica starts alone (it downloads the weights on a first start), the others after."""

    def __init__(
        self,
        studies: str,
        replicas: int,
        work: Path,
        host: str = "127.0.0.1",
        port: int = 8000,
        replica_ports: list[int] | None = None,
        args: list[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError("--replicas must be 1 or more")
        if not shutil.which("haproxy"):
            raise SystemExit("HAProxy is not installed (apt-get install haproxy; scripts/setup.sh does)")
        self.studies, self.work, self.host, self.port = studies, Path(work), host, port
        self.work.mkdir(parents=True, exist_ok=True)
        ports = replica_ports or [port + 1 + n for n in range(replicas)]
        self.replicas = [Replica(f"r{n}", ports[n], self.work / f"r{n}.log") for n in range(replicas)]
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP), str(ROOT), self.env.get("PYTHONPATH")]))
        self.haproxy: subprocess.Popen | None = None
        self.gpus = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def _env(self, n: int) -> dict[str, str]:
        """Replica n's environment: GPU n % count alone where there are GPUs."""
        return dict(self.env, CUDA_VISIBLE_DEVICES=str(n % self.gpus)) if self.gpus else self.env

    def revive(self) -> list[str]:
        """Start again every replica whose process has exited (HAProxy routes to it, and its images
        move back to it, once it answers its health checks again); returns their names."""
        dead = [n for n, r in enumerate(self.replicas) if r.proc is not None and r.proc.poll() is not None]
        for n in dead:
            self.replicas[n].start(self.studies, self.args, self._env(n))
        return [self.replicas[n].name for n in dead]

    def start(self, timeout: float = 600) -> Cluster:
        self.gpus = gpu_count()
        for n, r in enumerate(self.replicas):
            r.start(self.studies, self.args, self._env(n))
            if n == 0:
                r.wait_healthy(timeout)
        for r in self.replicas[1:]:
            r.wait_healthy(timeout)
        cfg = self.work / "haproxy.cfg"
        backends = [(r.name, r.port) for r in self.replicas]
        cfg.write_text(haproxy_config(self.host, self.port, backends, write_error_files(self.work / "errors")))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"HAProxy refused {cfg}:\n{check.stderr}")
        with open(self.work / "haproxy.log", "w") as log:
            self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.haproxy, "HAProxy", self.work / "haproxy.log", timeout=30)
        return self

    def stop(self) -> None:
        if self.haproxy and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(10)
        for r in self.replicas:
            r.kill()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, server_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage="%(prog)s [options] [-- ...]"
    )
    p.add_argument("--replicas", type=int, default=2, help="MONAI Label processes (one per GPU where there are GPUs)")
    p.add_argument("--studies", required=True, help="the DICOMweb URL every replica serves")
    p.add_argument("--host", default="127.0.0.1", help="where HAProxy listens (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HAProxy's port (8000); replicas on the ports after it")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "replicas", help="logs and HAProxy's configuration")
    p.add_argument(
        "--restart-after",
        type=float,
        default=10,
        help="seconds after a replica exits before it is started again (10; -1: never)",
    )
    a = p.parse_args(ours)
    if not a.studies.startswith(("http://", "https://")):
        p.error(
            "replicas serve a DICOMweb archive (--studies http://...): a local folder's label index "
            "belongs to one process; run one server on a folder (bash scripts/serve.sh --local)"
        )
    cluster = Cluster(a.studies, a.replicas, a.work, a.host, a.port, args=server_args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cluster:
        names = ", ".join(f"{r.name} :{r.port}" for r in cluster.replicas)
        print(f"segvol-label: {a.replicas} replicas ({names}) behind HAProxy on {cluster.url}", flush=True)
        print(f"  OHIF:  {cluster.url}/ohif/   logs: {a.work}", flush=True)
        died: dict[str, float] = {}
        try:
            while True:
                for r in cluster.replicas:
                    if r.proc.poll() is not None and r.name not in died:
                        died[r.name] = time.monotonic()
                        restart = f"; starting it again in {a.restart_after:g} s" if a.restart_after >= 0 else ""
                        what = f"replica {r.name} exited ({r.proc.returncode}): its images go to the others"
                        print(what + restart, flush=True)
                due = [name for name, t in died.items() if 0 <= a.restart_after <= time.monotonic() - t]
                if due:
                    for name in cluster.revive():
                        died.pop(name, None)
                        print(f"replica {name} started again (log: {cluster.replica(name).log})", flush=True)
                if cluster.haproxy.poll() is not None:
                    print("HAProxy exited; stopping", file=sys.stderr)
                    return 1
                time.sleep(1)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
