"""One SQLite file, one connection, one lock: the transaction helper every store shares.

Why SQLite in WAL mode with ``synchronous=FULL``: one file, no server, readers (``hyperct jobs``,
the health endpoint) never block the writer, and with FULL every commit is on disk when ``COMMIT``
returns — the receiver acknowledges an instance only after that. Every state change is one
transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), so a crash leaves either the old or the new state,
never half of one. A store method that is called inside another store's transaction joins it
(:meth:`Database.transaction` is re-entrant), so a change that spans stores (a finished job and
its outbox rows) is still one transaction.

**Group commit** (:meth:`Database.group`): concurrent callers — the C-STORE handlers of several
associations — share one transaction and so one flush of the WAL. Nobody waits for a timer: the
first caller commits at once; callers arriving while that commit is in flight are committed
together by the next one. Each caller's change runs in its own ``SAVEPOINT``, so an error in one
rolls back only that one; a failed ``COMMIT`` fails them all (nothing of any of them is kept). A
caller returns only after the ``COMMIT`` that holds its change, exactly as with a transaction of
its own.

The schema of a file is versioned with ``PRAGMA user_version`` (migrations run in order at open)
and its kind with ``PRAGMA application_id``, so a node database and a batch outbox file are never
mistaken for one another.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StateError(RuntimeError):
    """A state change that the current state does not allow, or a database of another kind."""


@dataclass(frozen=True)
class Schema:
    """What a database file holds: its kind (``application_id``) and ordered migrations (append only;
    index + 1 is the ``user_version`` each produces). ``legacy_ids`` are older kinds accepted as this one."""

    name: str
    application_id: int
    migrations: tuple[str, ...]
    legacy_ids: tuple[int, ...] = ()

    @property
    def version(self) -> int:
        return len(self.migrations)


class _Pending(Generic[T]):
    __slots__ = ("change", "done", "result", "error")

    def __init__(self, change: Callable[[sqlite3.Connection], T]) -> None:
        self.change = change
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class Database:
    """One connection to one SQLite file (thread-safe: one lock), used by the stores."""

    def __init__(self, path: Path, schema: Schema, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._group = threading.Condition(threading.Lock())
        self._waiting: list[_Pending[Any]] = []
        self._committing = False
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions ----------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state change: BEGIN IMMEDIATE … COMMIT (rolled back on any exception). Inside an open
        transaction of the same thread it joins that one (the outer one commits)."""
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self.commit()
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def commit(self) -> None:
        """COMMIT (a method of its own so tests can spy on it or make it fail)."""
        self._conn.execute("COMMIT")

    def group(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``change(conn)`` in a transaction shared with concurrent callers; return its result
        (or raise its error) once that transaction is committed. See the module docstring."""
        me: _Pending[T] = _Pending(change)
        with self._group:
            self._waiting.append(me)
            while self._committing and not me.done:
                self._group.wait()
            leader = not me.done
            if leader:
                self._committing = True
                batch, self._waiting = self._waiting, []
        if leader:
            try:
                self._commit_batch(batch)
            finally:
                with self._group:
                    self._committing = False
                    self._group.notify_all()
        if me.error is not None:
            raise me.error
        return me.result

    def _commit_batch(self, batch: list[_Pending[Any]]) -> None:
        try:
            with self.transaction() as db:
                for item in batch:
                    db.execute("SAVEPOINT change")
                    try:
                        item.result = item.change(db)
                    except BaseException as exc:  # noqa: BLE001 - this caller's error, re-raised in its thread
                        db.execute("ROLLBACK TO change")
                        item.error = exc
                    db.execute("RELEASE change")
        except BaseException as exc:  # noqa: BLE001 - BEGIN or COMMIT failed: nothing of the batch is kept
            for item in batch:
                if item.error is None:
                    item.error, item.result = exc, None
        finally:
            for item in batch:
                item.done = True

    # -- reading ---------------------------------------------------------------------------------
    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """Rows of one statement (stores read through this; tests use it to look inside)."""
        with self._lock:
            return list(self._conn.execute(sql, params))

    def ping(self) -> None:
        """Raises when the database cannot answer (readiness)."""
        self.query("SELECT 1")

    # -- schema ----------------------------------------------------------------------------------
    def _migrate(self) -> None:
        schema = self.schema
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            if version and app_id not in (schema.application_id, *schema.legacy_ids):
                raise StateError(f"{self.path} is not a {schema.name} database (application_id {app_id:#x})")
            if version > schema.version:
                raise StateError(
                    f"{self.path}: {schema.name} schema version {version} is newer than this node ({schema.version})"
                )
            for n in range(version, schema.version):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(schema.migrations[n]):
                        self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version={n + 1}")
                    self._conn.execute(f"PRAGMA application_id={schema.application_id}")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                logger.info("%s database migrated to schema version %d", schema.name, n + 1)
            if app_id != schema.application_id and version == schema.version and version:
                with self.transaction() as db:  # a legacy file: mark its kind
                    db.execute(f"PRAGMA application_id={schema.application_id}")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
