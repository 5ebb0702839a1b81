"""What KMIP knows about an object that the keystore does not: its object type, state and
dates, its names and the attributes a client set (docs/kmip.md).

One SQLite file (`kmip.sqlite` in the data dir), one row per object, keyed by tenant and
Unique Identifier; the Unique Identifier is the key's name in the tenant's namespace, so the
key itself, its material and every use of it stay with the keystore (and its audit log).
Why not in the catalog's attributes: docs/decisions.md, "KMIP: our own TTLV codec".
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .tags import State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    tenant TEXT NOT NULL,
    uid TEXT NOT NULL,
    object_type INTEGER NOT NULL,
    state INTEGER NOT NULL,
    dates TEXT NOT NULL,
    attributes TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, uid)
);
"""


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
    """The KMIP objects of every tenant. Thread-safe (one lock around one connection)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(objects)")}
        if "extra" not in columns:  # a kmip.sqlite of the first slice
            self._db.execute("ALTER TABLE objects ADD COLUMN extra TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, tenant: str, uid: str) -> KmipObject | None:
        with self._lock:
            row = self._db.execute(
                "SELECT uid, object_type, state, dates, attributes, extra FROM objects "
                "WHERE tenant=? AND uid=?",
                (tenant, uid),
            ).fetchone()
        return None if row is None else _object(row)

    def put(self, tenant: str, obj: KmipObject) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO objects (tenant, uid, object_type, state, dates, "
                "attributes, extra) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    obj.uid,
                    obj.object_type,
                    int(obj.state),
                    json.dumps(obj.dates, sort_keys=True),
                    json.dumps(obj.attributes, sort_keys=True),
                    json.dumps(obj.extra, sort_keys=True),
                ),
            )

    def move_state(self, tenant: str, uid: str, was: int, now: int) -> bool:
        """Set the object's state to `now` if it is `was` still (one statement: an object
        destroyed meanwhile stays gone); whether it moved."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE objects SET state=? WHERE tenant=? AND uid=? AND state=?",
                (now, tenant, uid, was),
            )
            return cur.rowcount == 1

    def delete(self, tenant: str, uid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE tenant=? AND uid=?", (tenant, uid))

    def all(self, tenant: str) -> list[KmipObject]:
        with self._lock:
            rows = self._db.execute(
                "SELECT uid, object_type, state, dates, attributes, extra FROM objects "
                "WHERE tenant=? ORDER BY rowid",
                (tenant,),
            ).fetchall()
        return [_object(r) for r in rows]


def _object(row: tuple[Any, ...]) -> KmipObject:
    uid, object_type, state, dates, attributes, extra = row
    return KmipObject(
        uid, object_type, State(state), json.loads(dates), json.loads(attributes), json.loads(extra)
    )


__all__ = ["KmipObject", "ObjectStore"]
