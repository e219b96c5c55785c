"""A real PostgreSQL server for tests (scripts/postgres.py): its own cluster, port and folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import postgres as cluster  # noqa: E402 - scripts/postgres.py
from server import free_port


class Postgres:
    """``with Postgres() as pg:`` a started server at ``pg.url`` (role and database segvol), stopped and
    its folder removed at the end, also when the test fails; ``pg.restart()`` (fast: connections are cut),
    ``pg.stop()`` and ``pg.start()`` in between. The folder is a mkdtemp under /tmp, not pytest's
    tmp_path: as root the server runs as the postgres user, who cannot get into tmp_path."""

    def __init__(self, port: int | None = None) -> None:
        try:
            cluster.binaries()
        except FileNotFoundError as e:
            pytest.fail(f"PostgreSQL is not installed: {e}")
        self.folder = Path(tempfile.mkdtemp(prefix="segvol-pg-", dir="/tmp"))
        self.port = port or free_port()
        self.url = cluster.url(self.port)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        cluster.start(self.folder, self.port)

    def stop(self) -> None:
        cluster.stop(self.folder)

    def restart(self) -> None:
        cluster.restart(self.folder)

    @property
    def running(self) -> bool:
        return cluster.running(self.folder)

    @property
    def log(self) -> str:
        """The server's log, for an assertion's message."""
        path = self.folder / "postgres.log"
        return path.read_text() if path.is_file() else ""

    def close(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
