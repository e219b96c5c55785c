"""The team's shared state, in one database every process of the team reaches.

Several processes serve one team: the server, its training subprocess, a restarted server, a
second replica, a second host. What they must agree on lives here, never in one process's
memory: which annotator holds which image (``leases``), what SegVol served (``results`` and
their ``masks``, to tell AUTOMATIC from SEMIAUTOMATIC from MANUAL when a label is saved) and
every label saved (``saves``, the history; ``save_claims`` while one is being stored) and each
annotator's unsaved work (``autosaves``), and the review of every final label (``reviews`` with
their ``review_events``; a double reading's voxels in ``readings``, the pair's ``agreements``),
and each image's uncertainty ``scores`` per model version (lib/activelearning/scorer.py).

Two engines, one schema and one SQL (the subset both speak: ``?`` parameters, ``ON CONFLICT``
upserts, ``RETURNING``): an SQLite file (one host, the default; WAL mode lets readers go on while
one writer commits) or PostgreSQL (``--conf team_db postgresql://...``, several hosts; see
lib/team/postgres.py). Every write is one short transaction that takes the write lock first, so
a read-then-write is never interleaved with another writer and a killed process leaves the
database whole. The schema grows by numbered ``MIGRATIONS``, each applied once, in order.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from segvol.postgres import is_url

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS leases (
    image TEXT NOT NULL, client TEXT NOT NULL, granted {real} NOT NULL, until {real} NOT NULL,
    PRIMARY KEY (image, client));
CREATE TABLE IF NOT EXISTS results (
    id {serial}, image TEXT NOT NULL, client TEXT NOT NULL, time {real} NOT NULL,
    model_version TEXT NOT NULL, task TEXT NOT NULL, prompts TEXT NOT NULL, seconds {real} NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_image ON results (image, id);
CREATE INDEX IF NOT EXISTS results_by_client ON results (client, id);
CREATE TABLE IF NOT EXISTS masks (
    result INTEGER NOT NULL REFERENCES results (id) ON DELETE CASCADE, value INTEGER NOT NULL,
    name TEXT NOT NULL, digest TEXT NOT NULL, voxels INTEGER NOT NULL, bits {blob} NOT NULL,
    PRIMARY KEY (result, value));
CREATE TABLE IF NOT EXISTS saves (
    id {serial}, image TEXT NOT NULL, client TEXT NOT NULL, time {real} NOT NULL,
    tag TEXT NOT NULL, model_version TEXT NOT NULL, segments TEXT NOT NULL, seg_series TEXT);
CREATE INDEX IF NOT EXISTS saves_by_image ON saves (image, id);
CREATE TABLE IF NOT EXISTS save_claims (
    image TEXT PRIMARY KEY, token TEXT NOT NULL, since {real} NOT NULL);
CREATE TABLE IF NOT EXISTS autosaves (
    image TEXT NOT NULL, client TEXT NOT NULL, time {real} NOT NULL, based_on INTEGER, shape TEXT NOT NULL,
    names TEXT NOT NULL, voxels {blob} NOT NULL, PRIMARY KEY (image, client));
CREATE TABLE IF NOT EXISTS reviews (
    save INTEGER PRIMARY KEY, image TEXT NOT NULL, annotator TEXT NOT NULL, submitted {real} NOT NULL,
    leased {real}, state TEXT NOT NULL, reading INTEGER NOT NULL, pair INTEGER, resubmits INTEGER,
    reviewer TEXT, reviewed {real}, comment TEXT, segment_comments TEXT, by_save INTEGER, changes TEXT);
CREATE INDEX IF NOT EXISTS reviews_by_state ON reviews (state, submitted);
CREATE INDEX IF NOT EXISTS reviews_by_image ON reviews (image, save);
CREATE TABLE IF NOT EXISTS review_events (
    id {serial}, save INTEGER NOT NULL, image TEXT NOT NULL, action TEXT NOT NULL,
    actor TEXT NOT NULL, time {real} NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS review_events_by_image ON review_events (image, id);
CREATE TABLE IF NOT EXISTS readings (
    save INTEGER PRIMARY KEY, image TEXT NOT NULL, client TEXT NOT NULL, shape TEXT NOT NULL,
    spacing TEXT NOT NULL, names TEXT NOT NULL, voxels {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    image TEXT NOT NULL, categories TEXT NOT NULL, model_version TEXT NOT NULL, score {real} NOT NULL,
    time {real} NOT NULL, seconds {real} NOT NULL, PRIMARY KEY (image, categories, model_version));
CREATE TABLE IF NOT EXISTS agreements (
    a INTEGER NOT NULL, b INTEGER NOT NULL, image TEXT NOT NULL, time {real} NOT NULL, figures TEXT NOT NULL,
    PRIMARY KEY (a, b));
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, SCHEMA_V1),
    # a counter that grows with every write of a table (scores are upserted: no new row tells)
    (2, "CREATE TABLE IF NOT EXISTS generations (name TEXT PRIMARY KEY, n INTEGER NOT NULL)"),
]
SQLITE_TYPES = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "blob": "BLOB"}


def statements(sql: str, types: dict[str, str]) -> list[str]:
    """A migration's statements in one engine's column types."""
    return [part.strip() for part in sql.format(**types).split(";") if part.strip()]


def upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """INSERT of a whole row that replaces the row with the same ``key`` (SQLite and PostgreSQL)."""
    marks = ", ".join("?" for _ in columns)
    update = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {update}"
    )


BUMP = "INSERT INTO generations (name, n) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET n = generations.n + 1"


class Lock(Protocol):
    """A lock every process on the store shares (a file beside SQLite, an advisory lock in PostgreSQL)."""

    def acquire(self, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...

    def held(self) -> bool:
        """Whether a lock taken is still this process's (a database session may end under it)."""
        ...


class FileStoreLock:
    """A lock file beside the SQLite file: ``acquire(0)`` tries once, ``acquire()`` waits."""

    def __init__(self, path: Path) -> None:
        self._lock = FileLock(str(path))

    def acquire(self, timeout: float | None = None) -> bool:
        try:
            self._lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        self._lock.release()

    def held(self) -> bool:
        return self._lock.is_locked


@contextmanager
def held(lock: Lock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class TeamStore:
    """One SQLite file that any thread or process may use. Each thread keeps its connection: opening
    one per call, with the last one closing checkpointing and deleting the WAL each time, was most
    of what a Next image cost under load (measured with py-spy, docs/scaling.md)."""

    engine = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # this thread's connection, and whether it is in use
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
        migrate(self.connect, SQLITE_TYPES)

    def __str__(self) -> str:
        return str(self.path)

    def lock(self, name: str) -> Lock:
        return FileStoreLock(Path(f"{self.path}.{name}.lock"))

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection; with ``write``, one transaction that takes the write lock at once
        (BEGIN IMMEDIATE), so a read-then-write is never interleaved with another writer. A call
        made while this thread's connection is in use (nested) gets a connection of its own, as
        every call used to."""
        local = self._local
        kept = getattr(local, "db", None) if getattr(local, "pid", None) == os.getpid() else None
        nested = getattr(local, "busy", False) and kept is not None
        db = self._open() if nested or kept is None else kept
        if not nested:
            local.db, local.pid, local.busy = db, os.getpid(), True
        try:
            if write:
                db.execute("BEGIN IMMEDIATE")
            yield db
            if write:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            if nested:
                db.close()
            else:
                local.busy = False


def migrate(connect, types: dict[str, str]) -> None:
    """Apply the migrations a store lacks (``connect``: its connections), in order, in the write
    transaction that records them."""
    with connect(write=True) as db:
        db.execute(f"CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied {types['real']})")
        done = {row[0] for row in db.execute("SELECT version FROM migrations").fetchall()}
        for version, sql in MIGRATIONS:
            if version not in done:
                for statement in statements(sql, types):
                    db.execute(statement)
                db.execute("INSERT INTO migrations (version, applied) VALUES (?, ?)", (version, time.time()))


def open_store(where: str | Path) -> TeamStore:
    """The team store at ``where``: a postgresql:// URL, else an SQLite file."""
    if is_url(where):
        from lib.team.postgres import PostgresStore  # psycopg only where PostgreSQL is used

        return PostgresStore(str(where))
    return TeamStore(where)
