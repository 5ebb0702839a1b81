"""Leases held in the store's database, on the database's clock: at most one node runs a
singleton job at a time (docs/cluster.md, "Singleton jobs"), and when it dies another
takes over once its lease has run out. The pattern of OpenBao's HA lock table.

A lease is a row `(name, holder, acquired, expires)`. `acquire()` is one statement: insert
the row, or take it over when it is ours (a renewal) or has expired, setting `expires` to
the database's `clock_timestamp()` plus the lease time; it holds the lease when the row
comes back as ours. Only the database's clock is read, so the nodes' clocks may disagree:
two holders cannot overlap by more than the time one statement takes. A holder that stops
renewing (killed, frozen, cut off) loses the lease when it expires; a holder that is
merely slow learns it at its next `acquire()`, and must stop its jobs then.

PostgreSQL only (`clock_timestamp`, `RETURNING`): on the embedded SQLite store, one machine
has no other node to hand jobs to.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from .store import Store

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS leases ("
    " name TEXT PRIMARY KEY,"
    " holder TEXT NOT NULL,"
    " acquired TIMESTAMPTZ NOT NULL,"
    " expires TIMESTAMPTZ NOT NULL)"
)
# The lease table's lock while it is made ("SRLEASE1"): two nodes starting at once.
LEASE_LOCK = 0x5352_4C45_4153_4531


@dataclass(frozen=True)
class LeaseState:
    holder: str
    acquired: float  # the database's clock, seconds since the epoch
    expires: float


def holder_id() -> str:
    """This process among the nodes: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class Lease:
    """One named lease on a store's connection of its own. Thread-safe."""

    def __init__(self, store: Store, name: str, seconds: float, holder: str | None = None):
        self._store = store
        self.name = name
        self.seconds = float(seconds)
        self.holder = holder or holder_id()
        self._lock = threading.Lock()
        try:
            with store.errors("open"):
                store.begin(LEASE_LOCK)
                try:
                    store.execute(SCHEMA)
                except BaseException:
                    store.rollback()
                    raise
                store.commit()
        except BaseException:
            store.close()
            raise

    def acquire(self) -> bool:
        """Take the lease, or renew it if it is ours; whether we hold it now (until the
        database's clock passes `seconds` from now)."""
        with self._lock, self._store.errors("write"):
            row = self._store.execute(
                "INSERT INTO leases AS l (name, holder, acquired, expires) "
                "VALUES (?, ?, clock_timestamp(), clock_timestamp() + make_interval(secs => ?)) "
                "ON CONFLICT (name) DO UPDATE SET "
                " holder = excluded.holder,"
                " acquired = CASE WHEN l.holder = excluded.holder THEN l.acquired"
                "  ELSE excluded.acquired END,"
                " expires = excluded.expires "
                "WHERE l.holder = excluded.holder OR l.expires < clock_timestamp() "
                "RETURNING holder",
                (self.name, self.holder, self.seconds),
            ).fetchone()
        return row is not None and row[0] == self.holder

    def release(self) -> None:
        """Give the lease up at once (a clean shutdown), if it is ours."""
        with self._lock, self._store.errors("write"):
            self._store.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (self.name, self.holder)
            )

    def state(self) -> LeaseState | None:
        """Who holds the lease (or last held it, if it expired), on the database's clock."""
        with self._lock, self._store.errors("read"):
            row = self._store.execute(
                "SELECT holder, extract(epoch FROM acquired), extract(epoch FROM expires) "
                "FROM leases WHERE name = ?",
                (self.name,),
            ).fetchone()
        if row is None:
            return None
        return LeaseState(str(row[0]), float(str(row[1])), float(str(row[2])))

    def close(self) -> None:
        with self._lock:
            self._store.close()


def open_lease(url: str, name: str, seconds: float) -> Lease:
    """The lease `name` in the PostgreSQL store at `url`, on a connection of its own."""
    from .store_pg import PostgresStore

    return Lease(PostgresStore(url), name, seconds)
