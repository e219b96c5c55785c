"""The team's shared state, in one SQLite file beside the datastore.

Several processes serve one team: the server, its training subprocess, a restarted server, a
second replica on the same host. What they must agree on lives here, never in one process's
memory: which annotator holds which image (``leases``), what SegVol served (``results`` and
their ``masks``, to tell AUTOMATIC from SEMIAUTOMATIC from MANUAL when a label is saved) and
every label saved (``saves``, the history; ``save_claims`` while one is being stored) and each
annotator's unsaved work (``autosaves``), and the review of every final label (``reviews`` with
their ``review_events``; a double reading's voxels in ``readings``, the pair's ``agreements``),
and each image's uncertainty ``scores`` per model version (lib/activelearning/scorer.py).
SQLite in WAL mode lets readers go on while one writer commits; every write is one short
transaction, so a killed process leaves the file whole.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    image TEXT NOT NULL, client TEXT NOT NULL, granted REAL NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (image, client));
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, image TEXT NOT NULL, client TEXT NOT NULL, time REAL NOT NULL,
    model_version TEXT NOT NULL, task TEXT NOT NULL, prompts TEXT NOT NULL, seconds REAL NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_image ON results (image, id);
CREATE INDEX IF NOT EXISTS results_by_client ON results (client, id);
CREATE TABLE IF NOT EXISTS masks (
    result INTEGER NOT NULL REFERENCES results (id) ON DELETE CASCADE, value INTEGER NOT NULL,
    name TEXT NOT NULL, digest TEXT NOT NULL, voxels INTEGER NOT NULL, bits BLOB NOT NULL,
    PRIMARY KEY (result, value));
CREATE TABLE IF NOT EXISTS saves (
    id INTEGER PRIMARY KEY AUTOINCREMENT, image TEXT NOT NULL, client TEXT NOT NULL, time REAL NOT NULL,
    tag TEXT NOT NULL, model_version TEXT NOT NULL, segments TEXT NOT NULL, seg_series TEXT);
CREATE INDEX IF NOT EXISTS saves_by_image ON saves (image, id);
CREATE TABLE IF NOT EXISTS save_claims (
    image TEXT PRIMARY KEY, token TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS autosaves (
    image TEXT NOT NULL, client TEXT NOT NULL, time REAL NOT NULL, based_on INTEGER, shape TEXT NOT NULL,
    names TEXT NOT NULL, voxels BLOB NOT NULL, PRIMARY KEY (image, client));
CREATE TABLE IF NOT EXISTS reviews (
    save INTEGER PRIMARY KEY, image TEXT NOT NULL, annotator TEXT NOT NULL, submitted REAL NOT NULL,
    leased REAL, state TEXT NOT NULL, reading INTEGER NOT NULL, pair INTEGER, resubmits INTEGER,
    reviewer TEXT, reviewed REAL, comment TEXT, segment_comments TEXT, by_save INTEGER, changes TEXT);
CREATE INDEX IF NOT EXISTS reviews_by_state ON reviews (state, submitted);
CREATE INDEX IF NOT EXISTS reviews_by_image ON reviews (image, save);
CREATE TABLE IF NOT EXISTS review_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, save INTEGER NOT NULL, image TEXT NOT NULL, action TEXT NOT NULL,
    actor TEXT NOT NULL, time REAL NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS review_events_by_image ON review_events (image, id);
CREATE TABLE IF NOT EXISTS readings (
    save INTEGER PRIMARY KEY, image TEXT NOT NULL, client TEXT NOT NULL, shape TEXT NOT NULL,
    spacing TEXT NOT NULL, names TEXT NOT NULL, voxels BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    image TEXT NOT NULL, categories TEXT NOT NULL, model_version TEXT NOT NULL, score REAL NOT NULL,
    time REAL NOT NULL, seconds REAL NOT NULL, PRIMARY KEY (image, categories, model_version));
CREATE TABLE IF NOT EXISTS agreements (
    a INTEGER NOT NULL, b INTEGER NOT NULL, image TEXT NOT NULL, time REAL NOT NULL, figures TEXT NOT NULL,
    PRIMARY KEY (a, b));
"""


class TeamStore:
    """One SQLite file that any thread or process may use. Each thread keeps its connection: opening
    one per call, with the last one closing checkpointing and deleting the WAL each time, was most
    of what a Next image cost under load (measured with py-spy, docs/scaling.md)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # this thread's connection, and whether it is in use
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

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
