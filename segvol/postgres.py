"""PostgreSQL, where one team spans several hosts (``--conf team_db postgresql://...``).

What every part that uses the database shares: the URL shown without its password, one
exception for a database that does not answer, connections that report that quickly, and
session advisory locks (one round at a time, one pick at a time, one scorer), which PostgreSQL
ends with the session: a host killed while holding one holds nothing. psycopg is imported only
where a database is used.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

CONNECT_TIMEOUT = 5  # seconds: a database that does not answer is reported, not waited on


class DatabaseUnavailable(ConnectionError):
    """The team database does not answer (down or unreachable); the message names it. Team routes
    answer 503 with it; nothing was written."""


def is_url(where: object) -> bool:
    return str(where).startswith(("postgresql://", "postgres://"))


def shown(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts._replace(query=re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)))


def lock_key(name: str) -> int:
    """A stable 64-bit advisory lock key for ``name`` (the same on every host)."""
    return int.from_bytes(hashlib.sha256(f"segvol-label:{name}".encode()).digest()[:8], "big", signed=True)


def unavailable(url: str, e: Exception) -> DatabaseUnavailable:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DatabaseUnavailable(f"the team database {shown(url)} does not answer ({first})")


def connect(url: str, **kwargs):
    """An autocommit psycopg connection, or DatabaseUnavailable within CONNECT_TIMEOUT."""
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **kwargs)
    except psycopg.OperationalError as e:
        raise unavailable(url, e) from e


class AdvisoryLock:
    """A session advisory lock on a connection of its own: ``acquire(0)`` tries once, ``acquire()``
    waits (``acquire(t)``: up to t seconds). Held until released or the connection ends."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.key = lock_key(name)
        self._db = None

    def acquire(self, timeout: float | None = None) -> bool:
        import psycopg

        fresh = self._db is None or self._db.closed
        if fresh:
            self._db = connect(self.url)
        try:
            if timeout == 0:
                return bool(self._db.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
            wait = 0 if timeout is None else max(1, int(timeout * 1000))  # 0: no limit
            self._db.execute(f"SET lock_timeout = {wait}")
            self._db.execute("SELECT pg_advisory_lock(%s)", (self.key,))
            return True
        except psycopg.errors.LockNotAvailable:
            return False
        except psycopg.OperationalError as e:
            self._db.close()
            if not fresh:  # the kept connection died with a restarted server: once more on a new one
                return self.acquire(timeout)
            raise unavailable(self.url, e) from e

    def held(self) -> bool:
        """Whether the session that took it still lives (a restarted server ends it, and the lock)."""
        try:
            return self._db is not None and not self._db.closed and self._db.execute("SELECT 1") is not None
        except Exception:
            self._db.close()
            return False

    def release(self) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except Exception:  # the connection is gone, and the lock with it
            self._db.close()
            self._db = None
