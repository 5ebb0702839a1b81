"""Leases in the store's database on its clock (core/store_lease.py, docs/cluster.md
"Singleton jobs"): one holder at a time, renewal by the holder, takeover only after
expiry, release at once; a holder that lost its lease in the middle of a job (expired, or
taken over) makes no further fenced write, and no node takes the lease over while a
fenced write is open. On the private PostgreSQL cluster (tests/emulators/pg_support.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config

import strongroom
from strongroom.catalog import now
from strongroom.errors import StorageError
from strongroom.keystore import Keystore
from strongroom.store_lease import Lease, LeaseLost, open_lease
from strongroom.store_pg import PostgresStore


def test_one_holder_at_a_time_and_takeover_only_after_expiry(pg_cluster: Any) -> None:
    url = pg_cluster.new_database()
    a, b = open_lease(url, "jobs", 1.0), open_lease(url, "jobs", 1.0)
    other = open_lease(url, "other", 1.0)  # another name is another lease
    try:
        assert a.holder != b.holder
        grant = a.acquire()
        assert grant is not None
        assert b.acquire() is None
        held = a.state()
        assert held is not None and grant.expires == held.expires  # the database's clock
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
        assert [lease.acquire() is not None for lease in leases] == [True, False]
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


def wait_until(what: str, done: Callable[[], bool]) -> None:
    end = time.monotonic() + 60
    while not done():
        assert time.monotonic() < end, f"{what}: not after 60 s"
        time.sleep(0.05)


def expired(url: str) -> bool:
    """Whether the jobs lease has run out on the database's clock."""
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute(
            "SELECT expires < clock_timestamp() FROM leases WHERE name = 'jobs'"
        ).fetchone()
    return row is not None and bool(row[0])


@pytest.fixture
def due_keys(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Keystore]]:
    """A keystore on a fresh database with three keys whose deletion is due."""
    url = str(pg_cluster.new_database())
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    ks = strongroom.open(write_vault_config(tmp_path, store_url=url))
    try:
        for name in ("k1", "k2", "k3"):
            ks.generate(name, "ed25519")
            ks.schedule_deletion(name, timedelta(seconds=1))
        wait_until("the deletions are due", lambda: len(ks.catalog.due_for_deletion(now())) == 3)
        yield url, ks
    finally:
        ks.close()


@pytest.mark.parametrize("lost", ["taken_over", "expired"])
def test_a_holder_that_lost_its_lease_mid_job_deletes_nothing_more(
    due_keys: tuple[str, Keystore], lost: str
) -> None:
    """Holder a is frozen after its first deletion (its own clock says go on, as a paused
    machine's would) while its lease runs out, and b takes it over (or nobody does): a's
    next deletion is refused by the fence and not made; b then carries the rest out."""
    url, ks = due_keys
    a, b = open_lease(url, "jobs", 1.0), open_lease(url, "jobs", 1.0)
    try:
        assert a.acquire() is not None
        asked = 0

        def stop() -> bool:
            nonlocal asked
            asked += 1
            if asked == 2:  # one deletion done: a "freezes" until its lease is gone
                if lost == "taken_over":
                    wait_until("b takes the lease over", lambda: b.acquire() is not None)
                else:
                    wait_until("a's lease runs out", lambda: expired(url))
            return False

        with pytest.raises(LeaseLost):
            ks.purge_due(fence=a.fence, stop=stop)
        left = {k.name for k in ks.catalog.due_for_deletion(now())}
        assert len(left) == 2  # the first deletion only
        if lost == "expired":
            assert b.acquire() is not None
        done = ks.purge_due(fence=b.fence)
        assert {k.name for k in done} == left
        assert ks.catalog.due_for_deletion(now()) == []
    finally:
        a.close()
        b.close()


def test_a_round_of_jobs_stops_when_asked(due_keys: tuple[str, Keystore]) -> None:
    url, ks = due_keys
    lease = open_lease(url, "jobs", 30.0)
    try:
        assert lease.acquire() is not None
        assert ks.purge_due(fence=lease.fence, stop=lambda: True) == []
        assert len(ks.catalog.due_for_deletion(now())) == 3
    finally:
        lease.close()


def test_no_takeover_while_the_holders_fenced_write_is_open(
    due_keys: tuple[str, Keystore],
) -> None:
    """The fence locks the lease row: even once a's lease has run out on the database's
    clock, b's acquire() waits for a's fenced transaction to end, so a's write commits while
    a holds the lease; b gets it just after."""
    url, ks = due_keys
    a, b = open_lease(url, "jobs", 1.0), open_lease(url, "jobs", 1.0)
    try:
        assert a.acquire() is not None
        got: list[object] = []
        taker = threading.Thread(target=lambda: got.append(b.acquire()))
        with ks.catalog.fenced(a.fence):
            wait_until("a's lease runs out", lambda: expired(url))
            taker.start()
            taker.join(1.0)
            assert taker.is_alive() and got == []  # waiting on the lease row's lock
            ks.catalog.remove("default", "k1")
        taker.join(60)
        assert not taker.is_alive() and got[0] is not None  # b took it after a's commit
        assert {k.name for k in ks.catalog.due_for_deletion(now())} == {"k2", "k3"}
    finally:
        a.close()
        b.close()
