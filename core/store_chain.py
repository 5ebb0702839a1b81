"""An append-only hash-chained log in the store's database: the audit chain of a keystore
whose store is shared by several nodes (docs/audit.md, "In the database";
docs/cluster.md).

One row per record, `(seq, line)`: `line` is the record's text as the audit package writes
it (`{"seq":N,...,"prev":"<hash of record N-1>"}`), so the chain is the audit file's chain,
one line a row. This module knows nothing of the lines' contents. It only appends them in
order, one at a time across every node:

`append_body(body)` is one statement (the common case): it reads the tail row, builds the
next line on it (seq + 1, the SHA-256 of the tail's line as `prev`) and inserts it; two nodes
racing for one seq are told apart by the primary key, and the loser runs again on the new
tail. `append(build)` (a checkpoint, which signs the tail) reads the tail in a transaction,
asks `build(seq, hash)` for the line and inserts it, again retried if it lost the race. A
record is reported written only once PostgreSQL has committed it. No lock is held across
nodes, so an append never waits behind a key change.

The chain uses a connection of its own, never the catalog's: an event recorded during a
key change (a write-ahead `started`) must stay when that change rolls back.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

from .errors import CatalogError, StorageError
from .store import Store

SCHEMA_VERSION = 1
# The chain's advisory lock ("SRAUDIT1" as a 64-bit integer), apart from the store's.
CHAIN_LOCK = 0x5352_4155_4449_5431

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS audit_chain (seq BIGINT PRIMARY KEY, line TEXT NOT NULL)",
)


# One statement per record: the tail's seq and hash (SHA-256 of its line, computed by the
# server) and the new line built on them, inserted at once. Two nodes appending at the same
# moment build the same seq; the primary key lets one in and the other, once the first has
# committed, fails and runs the statement again on the new tail. PostgreSQL only (sha256,
# encode, convert_to): the embedded store keeps the audit log in its file.
_APPEND = (
    "WITH t AS (SELECT seq, line FROM audit_chain ORDER BY seq DESC LIMIT 1) "
    "INSERT INTO audit_chain (seq, line) "
    "SELECT n.seq, '{\"seq\":' || n.seq || ',' || CAST(? AS TEXT) || ',\"prev\":\"' "
    "|| n.prev || '\"}' FROM (SELECT COALESCE((SELECT seq FROM t), 0) + 1 AS seq, "
    "COALESCE((SELECT encode(sha256(convert_to(line, 'UTF8')), 'hex') FROM t), "
    "repeat('0', 64)) AS prev) AS n "
    "RETURNING seq, line"
)
RACES = 1000
"""Appends lost to other nodes in a row before giving up (each loss means another record
was written: the chain moves)."""


class ChainTable:
    """The `audit_chain` table of a store (a connection of its own). Thread-safe: one
    statement or transaction at a time on the connection."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.RLock()
        self.location = store.location
        try:
            with store.errors("open"):
                self._migrate()
        except BaseException:
            store.close()
            raise

    def _migrate(self) -> None:
        db = self._store
        db.begin(CHAIN_LOCK)
        try:
            for stmt in _SCHEMA:
                db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key='audit_schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('audit_schema', ?)", (str(SCHEMA_VERSION),))
            elif int(str(row[0])) > SCHEMA_VERSION:
                raise CatalogError(
                    f"the audit chain in {self.location} has schema version {row[0]}, newer "
                    f"than this Strongroom understands ({SCHEMA_VERSION}); upgrade Strongroom"
                )
        except BaseException:
            db.rollback()
            raise
        db.commit()

    def append_body(self, body: str) -> tuple[int, str]:
        """Append the record whose fields between `seq` and `prev` are `body` (JSON members,
        no braces) as the next record: one statement, which reads the tail and inserts the
        line built on it (`{"seq":N,<body>,"prev":"<hash of N-1>"}`, exactly as `append`'s
        `build` would). Return (its seq, its hash)."""
        db = self._store
        with self._lock, db.errors("write"):
            for _ in range(RACES):
                try:
                    row = db.execute(_APPEND, (body,)).fetchone()
                except db.integrity_errors:  # another node took that seq: on the new tail
                    continue
                assert row is not None
                return int(str(row[0])), line_hash(str(row[1]))
        raise StorageError(f"cannot write the audit chain in {self.location}: always raced")

    def append(self, build: Callable[[int, str], str]) -> tuple[int, str]:
        """Append the line `build(tail_seq, tail_hash)` as record tail_seq + 1, in one
        transaction; return (its seq, its hash). For a record whose text depends on the
        tail (a checkpoint signs it): `build` runs between reading the tail and inserting,
        and may raise (nothing is written then); it runs again if another node appended
        in between."""
        db = self._store
        with self._lock, db.errors("write"):
            for _ in range(RACES):
                try:
                    db.begin(CHAIN_LOCK)  # such appenders take turns among themselves
                    seq, prev = self._tail()
                    line = build(seq, prev)
                    db.execute("INSERT INTO audit_chain VALUES (?, ?)", (seq + 1, line))
                    db.commit()
                except db.integrity_errors:  # an `append_body` took seq + 1 meanwhile
                    db.rollback()
                    continue
                except BaseException:
                    db.rollback()
                    raise
                return seq + 1, line_hash(line)
        raise StorageError(f"cannot write the audit chain in {self.location}: always raced")

    def _tail(self) -> tuple[int, str]:
        row = self._store.execute(
            "SELECT seq, line FROM audit_chain ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return 0, "0" * 64
        return int(str(row[0])), line_hash(str(row[1]))

    def tail(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (0, 64 zeros) for an empty chain."""
        with self._lock, self._store.errors("read"):
            return self._tail()

    def lines(self, since: int = 0, limit: int | None = None) -> list[bytes]:
        """The lines of the records with seq > `since`, in seq order (at most `limit`)."""
        sql = "SELECT line FROM audit_chain WHERE seq > ? ORDER BY seq"
        args: tuple[object, ...] = (since,)
        if limit is not None:
            sql, args = sql + " LIMIT ?", (since, limit)
        with self._lock, self._store.errors("read"):
            return [str(r[0]).encode() for r in self._store.execute(sql, args).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._store.close()


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def open_chain(url: str) -> ChainTable:
    """The audit chain of the PostgreSQL store at `url`, on a connection of its own."""
    from .store_pg import PostgresStore

    return ChainTable(PostgresStore(url))
