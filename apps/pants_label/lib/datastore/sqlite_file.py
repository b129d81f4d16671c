"""One SQLite file shared by threads and forked processes: per-thread connections, short transactions.

Both datastores keep their index in SQLite (WAL, so readers never block the writer). A connection
must not cross threads or a ``fork``, so each thread of each process opens its own.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path


class SQLiteFile:
    """Connections to and transactions on one SQLite file.

    Args:
        path: the database file.
        busy_timeout_s: how long a writer waits for another process's transaction.
        synchronous: SQLite's ``synchronous`` pragma; NORMAL is safe with WAL (no corruption; at
            worst the last commit is lost on a power cut), FULL also survives that.
    """

    def __init__(self, path: Path, busy_timeout_s: float = 60.0, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.synchronous = synchronous
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after ``fork``: SQLite handles must not cross it)."""
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "pid", None) != os.getpid():
            c = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            c.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            c.execute("PRAGMA journal_mode = WAL")
            c.execute(f"PRAGMA synchronous = {self.synchronous}")
            c.execute("PRAGMA foreign_keys = OFF")
            self._local.conn = c
            self._local.pid = os.getpid()
        return c

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        c = getattr(self._local, "conn", None)
        if c is not None and getattr(self._local, "pid", None) == os.getpid():
            c.close()
        self._local.conn = None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; ``IMMEDIATE`` takes the write lock up front (no upgrade deadlock).

        A failed COMMIT (full disk) is rolled back too, so the connection is never left inside a
        transaction.
        """
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one snapshot."""
        c = self.conn()
        c.execute("BEGIN")
        try:
            yield c
        finally:
            c.execute("COMMIT")


__all__ = ["SQLiteFile"]
