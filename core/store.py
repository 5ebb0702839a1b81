"""The keystore's transactional store: one database that holds the catalog and the vault's
rows (docs/storage.md), on SQLite in the data_dir (the default) or on PostgreSQL
(`[store] url`, docs/cluster.md).

`Store` is what the catalog and the vault's rows (core/vaultstore.py) write through. Every
difference between the two databases lives in its two implementations, core/store_sqlite.py
and core/store_pg.py: the engine writes its SQL once, with `?` placeholders, no literal `?`
or `%`, `ON CONFLICT` for upserts (both databases take it), and the column type `{blob}`
in its DDL. What a store must do:

- `begin()` opens the outermost write transaction and makes every other writer of the
  store, in this process or any other, on this machine or another, wait until it ends
  (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock). So what a
  transaction reads after `begin()` is the newest committed state, and stays so until it
  ends: the vault checks its manifest and the catalog its versions inside it.
- `for_update` is what a read inside a transaction appends to lock the rows it reads for the
  rest of it (PostgreSQL's `FOR UPDATE`; nothing on SQLite, whose write lock covers all).
- `stamp` is a change stamp that every writer changes after a commit, so that a reader may
  cache rows while it is unchanged; None when the store has none (PostgreSQL, where other
  machines write: the catalog caches nothing there and reads each row when asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol


class Cursor(Protocol):
    """What a statement returns: its rows and how many rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Sequence[object] | None: ...

    def fetchall(self) -> Sequence[Sequence[object]]: ...


class ChangeStamp(Protocol):
    def read(self) -> bytes: ...

    def bump(self) -> None: ...

    def close(self) -> None: ...


class Store(Protocol):
    @property
    def location(self) -> str:
        """Where the store is, for messages: a path, or a URL without its password."""
        ...

    @property
    def path(self) -> Path | None:
        """The database file, for an embedded store; None for a server."""
        ...

    @property
    def blob(self) -> str:
        """The column type of byte strings in DDL (BLOB, BYTEA)."""
        ...

    @property
    def for_update(self) -> str:
        """Appended to a SELECT inside a transaction to lock what it reads (may be empty)."""
        ...

    @property
    def integrity_errors(self) -> tuple[type[BaseException], ...]:
        """What a statement breaking a constraint (a taken primary key) raises."""
        ...

    @property
    def stamp(self) -> ChangeStamp | None: ...

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        """Run one statement (`?` placeholders) in the transaction in progress, or on its own."""
        ...

    def begin(self, lock: int | None = None) -> None:
        """Start the outermost write transaction; other writers wait until it ends. `lock`
        names another lock than the store's write lock, for a table whose writers queue
        apart from the rest (the audit chain, core/store_chain.py; PostgreSQL only: SQLite
        has one write lock a file)."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Roll back the transaction in progress; never raises (the connection may be gone)."""
        ...

    def errors(self, doing: str) -> AbstractContextManager[None]:
        """Database trouble (a full disk, a server gone) inside as a StorageError."""
        ...

    @property
    def changes(self) -> int:
        """Rows inserted, updated or deleted through this connection so far (for tests and
        measurements: a key change writes a constant number of rows)."""
        ...

    def close(self) -> None: ...


def open_store(url: str | None, data_dir: Path) -> Store:
    """The store a config names: PostgreSQL at `url`, else SQLite in `data_dir`."""
    if url is None:
        from .store_sqlite import SqliteStore

        return SqliteStore(data_dir / "catalog.sqlite")
    from .store_pg import PostgresStore

    return PostgresStore(url)
