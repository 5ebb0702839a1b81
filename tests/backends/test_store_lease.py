"""Leases in the store's database on its clock (core/store_lease.py, docs/cluster.md
"Singleton jobs"): one holder at a time, renewal by the holder, takeover only after
expiry, release at once. On the private PostgreSQL cluster (tests/emulators/pg_support.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from strongroom.errors import StorageError
from strongroom.store_lease import Lease, open_lease
from strongroom.store_pg import PostgresStore


def test_one_holder_at_a_time_and_takeover_only_after_expiry(pg_cluster: Any) -> None:
    url = pg_cluster.new_database()
    a, b = open_lease(url, "jobs", 1.0), open_lease(url, "jobs", 1.0)
    other = open_lease(url, "other", 1.0)  # another name is another lease
    try:
        assert a.holder != b.holder
        assert a.acquire()
        assert not b.acquire()
        assert other.acquire()
        first = a.state()
        assert first is not None and first.holder == a.holder
        assert a.acquire()  # a renewal moves the expiry, keeps the holder and when it took it
        renewed = a.state()
        assert renewed is not None
        assert renewed.acquired == first.acquired and renewed.expires >= first.expires
        assert not b.acquire()
        # a stops renewing: b gets it once the database's clock passes a's expiry, not before
        end = time.monotonic() + 60
        while not b.acquire():
            assert time.monotonic() < end, "b never took the expired lease"
            time.sleep(0.05)
        taken = b.state()
        assert taken is not None and taken.holder == b.holder
        assert taken.acquired >= renewed.expires
        assert not a.acquire()  # the old holder learns it lost the lease
        a.release()  # not a's: changes nothing
        assert b.state() == taken
        b.release()
        assert b.state() is None
        assert a.acquire()  # free again at once
    finally:
        for lease in (a, b, other):
            lease.close()


def test_the_holder_keeps_its_lease_across_a_postgres_restart(pg_cluster: Any) -> None:
    url = pg_cluster.new_database()
    leases = [Lease(PostgresStore(url), "jobs", 5.0, holder=f"node-{i}") for i in range(2)]
    try:
        assert [lease.acquire() for lease in leases] == [True, False]
        pg_cluster.stop("fast")
        try:
            with pytest.raises(StorageError):
                leases[0].acquire()
        finally:
            pg_cluster.start()
        assert leases[0].acquire()  # reconnected, still the holder
        assert not leases[1].acquire()
    finally:
        for lease in leases:
            lease.close()
