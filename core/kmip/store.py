"""What KMIP knows about an object that the keystore does not: its object type, state and
dates, its names and the attributes a client set (docs/kmip.md).

One row per object, keyed by tenant and Unique Identifier: in the database `[store] url`
names (table `kmip_objects`, shared by every node, as the keys and tenants are), else in one
SQLite file (`kmip.sqlite` in the data dir, table `objects`). The Unique Identifier is the
key's name in the tenant's namespace, so the key itself, its material and every use of it
stay with the keystore (and its audit log). Why not in the catalog's attributes:
docs/decisions.md, "KMIP: our own TTLV codec".
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..store import Store
from ..store_sqlite import SqliteStore
from .tags import State

_COLUMNS = "uid, object_type, state, dates, attributes, extra"


def _schema(table: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    tenant TEXT NOT NULL,
    uid TEXT NOT NULL,
    object_type INTEGER NOT NULL,
    state INTEGER NOT NULL,
    dates TEXT NOT NULL,
    attributes TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{{}}',
    made BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, uid)
)"""


@dataclass
class KmipObject:
    """An object's KMIP facts. `dates` maps an attribute name ("Initial Date", "Activation
    Date", ...) to seconds since the epoch; `attributes` maps an attribute name to its
    values, each the hex of its encoded TTLV Attribute Value (Name, Object Group, Link,
    x-...). `extra` holds what the server itself keeps: the Cryptographic Algorithm and
    Length (`algorithm`, `length`), the Key Format Type and DER flavour a key was registered
    in (`format`, `flavour`), and for a public key or certificate, which is not secret and
    not in the keystore, its DER (`der`, hex) and usage mask (`mask`)."""

    uid: str
    object_type: int
    state: State = State.PRE_ACTIVE
    dates: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def date(self, name: str) -> datetime | None:
        found = self.dates.get(name)
        return None if found is None else datetime.fromtimestamp(found, UTC)


class ObjectStore:
    """The KMIP objects of every tenant. Thread-safe (one lock around one connection).

    `store` is the database (core/store.py): a path opens an SQLite file there (the embedded
    default, `kmip.sqlite`); a PostgreSQL store is the one every node shares. `made` orders
    the objects as they were made (Locate answers newest first)."""

    def __init__(self, store: Store | Path) -> None:
        self._lock = threading.Lock()
        if isinstance(store, Path):
            store = SqliteStore(store, what="KMIP object store", stamp=False)
            self._table = "objects"
        else:
            self._table = "kmip_objects"
        self._db: Store = store
        self.location = store.location
        try:
            with store.errors("open"):
                self._migrate()
        except BaseException:
            store.close()
            raise

    def _migrate(self) -> None:
        db, table = self._db, self._table
        db.begin()  # two nodes opening a new database at once create the table once
        try:
            db.execute(_schema(table))
            if db.path is not None:  # a kmip.sqlite of an earlier slice
                columns = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
                if "extra" not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN extra TEXT NOT NULL DEFAULT '{{}}'")
                if "made" not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN made BIGINT NOT NULL DEFAULT 0")
                    # the order they were made
                    db.execute(f"UPDATE {table} SET made=rowid")  # noqa: S608
        except BaseException:
            db.rollback()
            raise
        db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, tenant: str, uid: str) -> KmipObject | None:
        with self._lock, self._db.errors("read"):
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM {self._table} WHERE tenant=? AND uid=?",  # noqa: S608
                (tenant, uid),
            ).fetchone()
        return None if row is None else _object(tuple(row))

    def put(self, tenant: str, obj: KmipObject) -> None:
        with self._lock, self._db.errors("write"):
            self._db.execute(
                f"INSERT INTO {self._table} (tenant, {_COLUMNS}, made) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, uid) DO UPDATE SET "
                "object_type=excluded.object_type, state=excluded.state, dates=excluded.dates, "
                "attributes=excluded.attributes, extra=excluded.extra",
                (
                    tenant,
                    obj.uid,
                    obj.object_type,
                    int(obj.state),
                    json.dumps(obj.dates, sort_keys=True),
                    json.dumps(obj.attributes, sort_keys=True),
                    json.dumps(obj.extra, sort_keys=True),
                    time.time_ns(),
                ),
            )

    def move_state(self, tenant: str, uid: str, was: int, now: int) -> bool:
        """Set the object's state to `now` if it is `was` still (one statement: an object
        destroyed meanwhile stays gone); whether it moved."""
        with self._lock, self._db.errors("write"):
            cur = self._db.execute(
                f"UPDATE {self._table} SET state=? WHERE tenant=? AND uid=? AND state=?",  # noqa: S608
                (now, tenant, uid, was),
            )
            return cur.rowcount == 1

    def delete(self, tenant: str, uid: str) -> None:
        with self._lock, self._db.errors("write"):
            self._db.execute(f"DELETE FROM {self._table} WHERE tenant=? AND uid=?", (tenant, uid))  # noqa: S608

    def all(self, tenant: str) -> list[KmipObject]:
        with self._lock, self._db.errors("read"):
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM {self._table} WHERE tenant=? ORDER BY made, uid",  # noqa: S608
                (tenant,),
            ).fetchall()
        return [_object(tuple(r)) for r in rows]

    def import_file(self, path: Path) -> int:
        """Copy the objects of the embedded store at `path` (a node's `kmip.sqlite`) into
        this one, in one transaction, then rename the file `<name>.moved` (kept, not
        deleted). An object already here (same tenant and Unique Identifier) stays as it is.
        Returns how many objects were copied."""
        old = ObjectStore(path)  # migrates the file first: the rows read have one shape
        try:
            with old._lock, old._db.errors("read"):
                rows = [
                    tuple(r)
                    for r in old._db.execute(
                        f"SELECT tenant, {_COLUMNS}, made FROM {old._table} ORDER BY made"  # noqa: S608
                    ).fetchall()
                ]
        finally:
            old.close()
        copied = 0
        with self._lock, self._db.errors("write"):
            self._db.begin()
            try:
                for row in rows:
                    cur = self._db.execute(
                        f"INSERT INTO {self._table} (tenant, {_COLUMNS}, made) "  # noqa: S608
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, uid) DO NOTHING",
                        row,
                    )
                    copied += max(cur.rowcount, 0)
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()
        path.rename(path.with_name(path.name + ".moved"))
        for suffix in ("-wal", "-shm"):  # SQLite's side files, empty once it closed
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return copied


def _object(row: tuple[Any, ...]) -> KmipObject:
    uid, object_type, state, dates, attributes, extra = row
    return KmipObject(
        uid, object_type, State(state), json.loads(dates), json.loads(attributes), json.loads(extra)
    )


__all__ = ["KmipObject", "ObjectStore"]
