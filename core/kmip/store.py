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

from .tags import State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    tenant TEXT NOT NULL,
    uid TEXT NOT NULL,
    object_type INTEGER NOT NULL,
    state INTEGER NOT NULL,
    dates TEXT NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (tenant, uid)
);
"""


@dataclass
class KmipObject:
    """An object's KMIP facts. `dates` maps an attribute name ("Initial Date", "Activation
    Date", ...) to seconds since the epoch; `attributes` maps an attribute name to its
    values, each the hex of its encoded TTLV Attribute Value (Name, Object Group, x-...)."""

    uid: str
    object_type: int
    state: State = State.PRE_ACTIVE
    dates: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, tenant: str, uid: str) -> KmipObject | None:
        with self._lock:
            row = self._db.execute(
                "SELECT object_type, state, dates, attributes FROM objects "
                "WHERE tenant=? AND uid=?",
                (tenant, uid),
            ).fetchone()
        if row is None:
            return None
        return KmipObject(uid, row[0], State(row[1]), json.loads(row[2]), json.loads(row[3]))

    def put(self, tenant: str, obj: KmipObject) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    obj.uid,
                    obj.object_type,
                    int(obj.state),
                    json.dumps(obj.dates, sort_keys=True),
                    json.dumps(obj.attributes, sort_keys=True),
                ),
            )

    def delete(self, tenant: str, uid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE tenant=? AND uid=?", (tenant, uid))

    def all(self, tenant: str) -> list[KmipObject]:
        with self._lock:
            rows = self._db.execute(
                "SELECT uid, object_type, state, dates, attributes FROM objects "
                "WHERE tenant=? ORDER BY rowid",
                (tenant,),
            ).fetchall()
        return [
            KmipObject(r[0], r[1], State(r[2]), json.loads(r[3]), json.loads(r[4])) for r in rows
        ]


__all__ = ["KmipObject", "ObjectStore"]
