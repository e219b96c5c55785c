#!/usr/bin/env python3
"""A private PostgreSQL server for segvol-label's tests: its own cluster in a folder, on loopback.

  python scripts/postgres.py start   --folder F --port P   initdb F/data (first time), start it, print its URL
  python scripts/postgres.py restart --folder F            fast stop, then start again on the same port
  python scripts/postgres.py stop    --folder F
  python scripts/postgres.py status  --folder F            exit 0 when it runs, 3 when not
The server listens on 127.0.0.1:P only (its unix socket in F); the role segvol (LOGIN, no superuser)
connects without a password (trust) and owns the database segvol: postgresql://segvol@127.0.0.1:P/segvol.
The binaries come from PATH, else the newest /usr/lib/postgresql/*/bin (apt-get install postgresql;
scripts/setup.sh does). initdb, pg_ctl and postgres refuse to run as root: as root they run as the
postgres system user (the Debian package creates it), so F and its parents must be reachable by it
(a tempfile.mkdtemp folder under /tmp is; pytest's tmp_path is not).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLE = DATABASE = "segvol"
SYSTEM_USER = "postgres"  # who runs the server when we are root
BINARIES = ("initdb", "pg_ctl", "postgres")


def binaries() -> dict[str, str]:
    """initdb, pg_ctl and postgres: from PATH, else the newest /usr/lib/postgresql/*/bin (where Debian
    puts them, off PATH)."""
    found = {name: shutil.which(name) for name in BINARIES}
    if all(found.values()):
        return found  # type: ignore[return-value]
    dirs = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if all((d / n).is_file() for n in BINARIES)]
    if not dirs:
        raise FileNotFoundError(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) are neither on PATH nor in "
            "/usr/lib/postgresql/*/bin: apt-get install postgresql (scripts/setup.sh does)"
        )
    newest = max(dirs, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)] or [0])
    return {name: str(newest / name) for name in BINARIES}


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the server's owner: nothing, or runuser when we are root."""
    return ["runuser", "-u", SYSTEM_USER, "--"] if os.geteuid() == 0 else []


def _run(cmd: list[str], folder: Path, **kw) -> subprocess.CompletedProcess:
    # cwd=folder: the server user may not be allowed into our working directory
    return subprocess.run([*_as_server_user(), *cmd], cwd=folder, capture_output=True, text=True, **kw)


def _hand_over(folder: Path) -> None:
    """As root: give ``folder`` to the postgres user, after checking that it can get there at all."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise RuntimeError(f"running as root, and there is no {SYSTEM_USER} user to run PostgreSQL as") from None
    for parent in folder.parents:
        st = parent.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == user.pw_uid and st.st_mode & 0o100)):
            raise PermissionError(
                f"{parent} is closed to the {SYSTEM_USER} user, who runs the server: "
                "use a folder under /tmp (tempfile.mkdtemp), not pytest's tmp_path"
            )
    os.chown(folder, user.pw_uid, user.pw_gid)
    folder.chmod(0o700)


def _config(port: int, folder: Path) -> str:
    return (
        f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
        "shared_buffers = 32MB\nmax_connections = 200\n"
    )


HBA = f"""# segvol-label's test server: the role {ROLE} without a password, on the socket and on loopback
local all {ROLE} trust
host  all {ROLE} 127.0.0.1/32 trust
local all {SYSTEM_USER} trust
"""


def _initdb(folder: Path, data: Path) -> None:
    """A new cluster in ``data`` with the role and database segvol (made in single-user mode, before
    the server listens, so no client program is needed)."""
    bins = binaries()
    # --no-sync: a throwaway cluster need not wait for the disk (the server itself keeps fsync on)
    args = [bins["initdb"], "-D", str(data), "-U", SYSTEM_USER, "--auth=trust", "-E", "UTF8", "--locale=C"]
    proc = _run([*args, "--no-sync"], folder)
    if proc.returncode != 0:
        raise RuntimeError(f"initdb failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    (data / "pg_hba.conf").write_text(HBA)
    sql = f"CREATE ROLE {ROLE} LOGIN;\nCREATE DATABASE {DATABASE} OWNER {ROLE};\n"
    single = [bins["postgres"], "--single", "-D", str(data), "-c", "exit_on_error=true", SYSTEM_USER]
    proc = _run(single, folder, input=sql)
    if proc.returncode != 0 or "ERROR" in proc.stdout + proc.stderr:
        shutil.rmtree(data, ignore_errors=True)  # so that the next start() begins anew
        raise RuntimeError(f"creating the {ROLE} role and database failed:\n{proc.stdout}{proc.stderr}")


def start(folder: Path, port: int, timeout: int = 60) -> str:
    """Start the cluster in ``folder`` (made first if it is not there yet) on 127.0.0.1:``port``, and
    wait until it accepts connections; returns the URL to connect to."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _hand_over(folder)
    data = folder / "data"
    if not (data / "PG_VERSION").is_file():
        _initdb(folder, data)
    # the port and socket may change from start to start: a file of their own, included last
    (data / "segvol.conf").write_text(_config(port, folder))
    conf = data / "postgresql.conf"
    if "include 'segvol.conf'" not in conf.read_text():
        with conf.open("a") as f:
            f.write("\ninclude 'segvol.conf'\n")
    if os.geteuid() == 0:
        shutil.chown(data / "segvol.conf", SYSTEM_USER, SYSTEM_USER)
    log = folder / "postgres.log"
    proc = _run([binaries()["pg_ctl"], "start", "-w", "-t", str(timeout), "-D", str(data), "-l", str(log)], folder)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log.is_file() else ""
        raise RuntimeError(f"PostgreSQL did not start on port {port} ({proc.returncode}):\n{proc.stderr}{tail}")
    return url(port)


def url(port: int) -> str:
    return f"postgresql://{ROLE}@127.0.0.1:{port}/{DATABASE}"


def stop(folder: Path, timeout: int = 60) -> None:
    """Stop the server (fast: open transactions are rolled back); nothing when it is not running."""
    folder = Path(folder).resolve()
    if not running(folder):
        return
    cmd = [binaries()["pg_ctl"], "stop", "-w", "-m", "fast", "-t", str(timeout), "-D", str(folder / "data")]
    proc = _run(cmd, folder)
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl stop failed ({proc.returncode}):\n{proc.stderr}")


def restart(folder: Path, timeout: int = 60) -> None:
    """Fast stop (connections are cut, open transactions rolled back), then start again on the same
    port: a database restart, as a client sees one."""
    folder = Path(folder).resolve()
    data, log = folder / "data", folder / "postgres.log"
    cmd = [binaries()["pg_ctl"], "restart", "-w", "-m", "fast", "-t", str(timeout), "-D", str(data), "-l", str(log)]
    proc = _run(cmd, folder)
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed ({proc.returncode}):\n{proc.stderr}{log.read_text()[-3000:]}")


def running(folder: Path) -> bool:
    """Whether the server of ``folder`` runs (pg_ctl status)."""
    folder = Path(folder).resolve()
    if not (folder / "data" / "PG_VERSION").is_file():
        return False
    return _run([binaries()["pg_ctl"], "status", "-D", str(folder / "data")], folder).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "restart", "stop", "status"))
    p.add_argument(
        "--folder",
        type=Path,
        default=Path(os.environ.get("SEGVOL_PG_DIR", ROOT / "build" / "postgres")),
        help="the cluster (F/data), its log (F/postgres.log) and socket (default build/postgres or $SEGVOL_PG_DIR)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SEGVOL_PG_PORT", 55432)),
        help="loopback port, for start (default 55432 or $SEGVOL_PG_PORT)",
    )
    a = p.parse_args(argv)
    if a.action == "start":
        print(start(a.folder, a.port))
    elif a.action == "restart":
        restart(a.folder)
    elif a.action == "stop":
        stop(a.folder)
    else:
        up = running(a.folder)
        print("running" if up else "not running")
        return 0 if up else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
