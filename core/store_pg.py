"""The shared store (core/store.py) on PostgreSQL, through psycopg 3: several keystores, on
several machines, on one database (docs/cluster.md).

The SQLite store's promises, kept on a server that many connections write:

- Writers queue: `begin()` takes a transaction-scoped advisory lock, one for the whole
  store, as SQLite's `BEGIN IMMEDIATE` takes its one write lock. Everything a writer reads
  after it is the newest committed state (READ COMMITTED reads each statement's newest
  snapshot), so the vault's manifest check and the catalog's version check hold across
  nodes, and two writers never deadlock on row locks taken in different orders.
- A lock waited for longer than 10 s is a StorageError, as SQLite's busy timeout is; a
  session idle inside a transaction for 60 s is ended by the server, so a frozen node
  cannot hold the write lock for longer.
- No change stamp: another machine's commit cannot touch a file here, so the catalog caches
  nothing and every read is a query (read-after-write across nodes).
- A connection the server dropped (a restart) is opened again at the next statement that
  is not inside a transaction, and that statement runs on the new one; a transaction the
  drop broke fails and rolls back, and is not retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import StorageError

# The advisory lock writers take ("SRSTORE1" as a 64-bit integer): one for the whole store.
WRITE_LOCK = 0x5352_5354_4F52_4531
LOCK_TIMEOUT = "10s"
# A node that stops mid-transaction (frozen, or its host gone without closing the socket)
# would hold the write lock for every node: the server ends a session idle inside a
# transaction this long, rolling it back. The engine's transactions never wait on a person
# or a device, so a legitimate one is never this idle.
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
CONNECT_TIMEOUT = 10
_CHANGING = ("INSERT", "UPDATE", "DELETE")


def without_password(url: str) -> str:
    """The connection string for messages: no password, whatever form it was given in."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<an unparsable PostgreSQL URL>"
    params.pop("password", None)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


class PostgresStore:
    blob = "BYTEA"
    for_update = " FOR UPDATE"
    integrity_errors: tuple[type[BaseException], ...] = (psycopg.IntegrityError,)
    stamp = None

    def __init__(self, url: str) -> None:
        self._url = url
        self._location = without_password(url)
        self._changes = 0
        self._in_transaction = False
        with self.errors("open"):
            self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")
        return conn

    @property
    def location(self) -> str:
        return self._location

    @property
    def path(self) -> Path | None:
        return None

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """The server gone, a lock not granted in time, a transaction the server broke off:
        a StorageError with the server's first line (libpq's messages hold no password)."""
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StorageError(f"cannot {doing} the store {self._location}: {first}") from None

    def _ready(self) -> None:
        """Outside a transaction, a connection the server dropped is opened again."""
        if not self._in_transaction and (self._conn.closed or self._conn.broken):
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = self._connect()

    def execute(self, sql: str, args: Sequence[object] = ()) -> psycopg.Cursor[tuple[object, ...]]:
        self._ready()
        # The engine's SQL has no literal `?` or `%` (core/store.py): a plain replace is exact.
        query = sql.replace("?", "%s")
        try:
            cur = self._conn.execute(query, tuple(args))
        except psycopg.OperationalError:
            # A connection the server dropped while it sat idle (a restart) is found only
            # when used. Outside a transaction the statement runs once more on a new one:
            # the engine's statements outside a transaction are reads and idempotent
            # updates. Inside one, the transaction is lost and the error stands.
            if self._in_transaction or not self._conn.broken:
                raise
            self._ready()
            cur = self._conn.execute(query, tuple(args))
        if cur.rowcount > 0 and sql.lstrip()[:6].upper() in _CHANGING:
            self._changes += cur.rowcount
        return cur

    def begin(self, lock: int | None = None) -> None:
        self._ready()
        try:
            self._conn.execute("BEGIN")
        except psycopg.OperationalError:
            if not self._conn.broken:  # a dropped connection: nothing was begun on it
                raise
            self._ready()
            self._conn.execute("BEGIN")
        self._in_transaction = True
        self._conn.execute(
            "SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK if lock is None else lock,)
        )

    def commit(self) -> None:
        try:
            # COMMIT of a transaction a failed statement broke rolls back without an error:
            # that must not pass for a commit.
            if self._conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                self._conn.execute("ROLLBACK")
                raise StorageError(
                    f"cannot write the store {self._location}: a statement of the "
                    "transaction failed, so nothing of it was committed"
                )
            self._conn.execute("COMMIT")
        finally:
            self._in_transaction = False

    def rollback(self) -> None:
        self._in_transaction = False
        with contextlib.suppress(psycopg.Error):
            self._conn.execute("ROLLBACK")

    @property
    def changes(self) -> int:
        return self._changes

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
