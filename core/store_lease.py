"""Leases held in the store's database, on the database's clock: one node at a time runs a
singleton job (docs/cluster.md, "Singleton jobs"), and when it dies another takes over
once its lease has run out. The pattern of OpenBao's HA lock table.

A lease is a row `(name, holder, acquired, expires)`. `acquire()` is one statement: insert
the row, or take it over when it is ours (a renewal) or has expired, setting `expires` to
the database's `clock_timestamp()` plus the lease time; it holds the lease when the row
comes back as ours, and returns its expiry (`Grant`). Only the database's clock is read, so
the nodes' clocks may disagree.

Holding the lease when `acquire()` returned is not enough to keep two nodes from working
at once: a holder that is slow (a long job) or frozen and resumed (SIGSTOP, a paused VM)
goes on working while its lease runs out and another node takes it. So a holder must
(1) stop starting work once past a safe part of the lease time (`Grant.deadline`, on this
process's monotonic clock, measured from before the statement was sent), and (2) fence
each write of its job: `fence(store)`, called in the write's own transaction on the same
database, locks the lease row (`FOR SHARE`) only if it is still this holder's and not
expired on the database's clock, else raises `LeaseLost`, and the transaction rolls back.
While that transaction is open, no other node can take the row over (its `acquire()`
waits for the lock, then sees the renewed or unexpired row), so a fenced write commits
only while its node holds the lease. A write outside the database (a key destroyed in a
device) can be fenced only at its start.

PostgreSQL only (`clock_timestamp`, `RETURNING`): on the embedded SQLite store, one machine
has no other node to hand jobs to.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from .errors import StrongroomError
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


class LeaseLost(StrongroomError):
    """This node no longer holds the lease its job runs under (expired or taken over by
    another node): the job's write was not made."""


@dataclass(frozen=True)
class Grant:
    """The lease held: `expires` on the database's clock (seconds since the epoch), and
    `deadline`, the same instant on this process's `time.monotonic()` clock, early by the
    statement's round trip (measured from before it was sent)."""

    expires: float
    deadline: float

    def stop_at(self, fraction: float) -> float:
        """The monotonic time by which the holder has used `fraction` of what was left."""
        left = self.deadline - time.monotonic()
        return time.monotonic() + max(0.0, left) * fraction


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

    def acquire(self) -> Grant | None:
        """Take the lease, or renew it if it is ours: a `Grant` (its expiry, `seconds` from
        now on the database's clock) when we hold it now, else None."""
        with self._lock, self._store.errors("write"):
            sent = time.monotonic()
            row = self._store.execute(
                "INSERT INTO leases AS l (name, holder, acquired, expires) "
                "VALUES (?, ?, clock_timestamp(), clock_timestamp() + make_interval(secs => ?)) "
                "ON CONFLICT (name) DO UPDATE SET "
                " holder = excluded.holder,"
                " acquired = CASE WHEN l.holder = excluded.holder THEN l.acquired"
                "  ELSE excluded.acquired END,"
                " expires = excluded.expires "
                "WHERE l.holder = excluded.holder OR l.expires < clock_timestamp() "
                "RETURNING holder, extract(epoch FROM expires),"
                " extract(epoch FROM clock_timestamp())",
                (self.name, self.holder, self.seconds),
            ).fetchone()
        if row is None or row[0] != self.holder:
            return None
        expires, db_now = float(str(row[1])), float(str(row[2]))
        return Grant(expires, sent + max(0.0, expires - db_now))

    def fence(self, store: Store) -> None:
        """Inside a write transaction of `store` (on this lease's database): lock the lease
        row for the rest of the transaction if it is still ours and unexpired on the
        database's clock, else raise LeaseLost (the caller's transaction then rolls back)."""
        with store.errors("write"):
            row = store.execute(
                "SELECT 1 FROM leases WHERE name = ? AND holder = ? "
                "AND expires > clock_timestamp() FOR SHARE",
                (self.name, self.holder),
            ).fetchone()
        if row is None:
            raise LeaseLost(f"this node no longer holds the lease {self.name!r}")

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
