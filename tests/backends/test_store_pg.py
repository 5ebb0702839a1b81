"""The PostgreSQL store (core/store_pg.py, docs/cluster.md) against the session's private
cluster: two keystores on one database are two nodes; what one commits, the other sees on
its next call; writers from several processes queue; a transaction a failed statement
broke never passes for a commit; schema migration on a new database happens once however
many open it at once; a server restart is survived; no password reaches a message.

The store's other behaviours (one transaction per key change, a rolled-back batch, every
kind of tampering) run on both stores in test_store.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CATALOG_V1_SCHEMA, VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config

import strongroom
from strongroom.catalog import SCHEMA_VERSION, Catalog, CatalogError
from strongroom.errors import KeyDisabled, KeyNotFound, StorageError
from strongroom.keystore import Keystore
from strongroom.store_pg import PostgresStore

DATA = b"cluster test data"


@pytest.fixture
def url(pg_cluster: Any) -> str:
    return str(pg_cluster.new_database())


@pytest.fixture
def node(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], Keystore]]:
    """`node("a")`: a keystore with its own data dir on the shared database."""
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    opened: list[Keystore] = []

    def make(name: str) -> Keystore:
        (tmp_path / name).mkdir()
        ks = strongroom.open(write_vault_config(tmp_path / name, store_url=url))
        opened.append(ks)
        return ks

    yield make
    for ks in opened:
        ks.close()


def test_the_store_is_the_database_not_the_data_dir(
    node: Callable[[str], Keystore], tmp_path: Path
) -> None:
    a = node("a")
    a.generate("k", "ed25519")
    assert a.catalog.path is None and "host=" in a.catalog.location
    assert not (tmp_path / "a" / "data" / "catalog.sqlite").exists()
    assert a.catalog.schema_version == SCHEMA_VERSION


def test_what_one_node_commits_the_other_sees_on_its_next_call(
    node: Callable[[str], Keystore],
) -> None:
    a, b = node("a"), node("b")
    assert a.catalog.store_id == b.catalog.store_id  # one store, one id
    a.generate("k", "ed25519")
    sig = b.sign("k", DATA)  # created on a, used on b
    a.verify("k", DATA, sig)
    assert b.rotate("k").version == 2
    assert a.info("k").version == 2  # rotated on b, seen on a
    a.public_key("k", version=2).verify(a.sign("k", DATA), DATA)  # type: ignore[union-attr,call-arg]
    a.disable("k")
    with pytest.raises(KeyDisabled):
        b.sign("k", DATA)
    b.enable("k")
    a.sign("k", DATA)
    b.delete("k")
    with pytest.raises(KeyNotFound):
        a.info("k")
    with pytest.raises(KeyNotFound):
        a.sign("k", DATA)
    a.generate("k", "ed25519")  # the name is free again, for either node
    assert [v.version for v in b.versions("k")] == [1]
    b.vault.verify_store()  # type: ignore[attr-defined]
    a.vault.verify_store()  # type: ignore[attr-defined]


def test_a_batch_on_one_node_is_seen_whole_or_not_at_all_by_the_other(
    node: Callable[[str], Keystore],
) -> None:
    a, b = node("a"), node("b")
    a.generate("taken", "ed25519")
    with pytest.raises(strongroom.KeyExists), b.batch():
        b.generate("x1", "ed25519")
        b.generate("taken", "ed25519")
    assert [i.name for i in a.keys()] == ["taken"]
    with b.batch():
        b.generate("y1", "ed25519")
        b.generate("y2", "ed25519")
    assert [i.name for i in a.keys()] == ["taken", "y1", "y2"]
    a.sign("y2", DATA)


# -- writers from several processes queue ----------------------------------------------------
ROTATOR = """
import json, os, sys, time
import strongroom
cfg, go, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with strongroom.open(cfg) as ks:
    ks.info("k")  # unlocked and ready before the start
    open(go + "." + str(os.getpid()), "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)
    print(json.dumps([ks.rotate("k").version for _ in range(rounds)]))
"""


@pytest.mark.parametrize("shared", ["sqlite", "postgresql"])
def test_concurrent_rotations_from_two_processes_take_turns_and_lose_nothing(
    shared: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes rotate one key in a loop: on SQLite two processes on one data dir, on
    PostgreSQL two nodes. Every rotation succeeds, each makes the next version, none is
    made twice and none is lost."""
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    rounds = 12
    if shared == "sqlite":
        configs = [write_vault_config(tmp_path)] * 2
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        configs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            configs.append(write_vault_config(tmp_path / name, store_url=url))
    with strongroom.open(configs[0]) as ks:
        ks.generate("k", "ed25519")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ROTATOR, str(cfg), str(go), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, VAULT_PASS_ENV: VAULT_PASSPHRASE},
        )
        for cfg in configs
    ]
    try:
        # Both are unlocked before either starts, so that they rotate at the same time.
        while len(list(tmp_path.glob("go.*"))) < 2 and all(p.poll() is None for p in procs):
            threading.Event().wait(0.01)
        go.touch()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    made = [json.loads(out) for out, _ in outputs]
    for versions in made:
        assert versions == sorted(versions)  # each process sees its versions increase
    every = sorted(made[0] + made[1])
    assert every == list(range(2, 2 + 2 * rounds))  # each version made once, none lost
    with strongroom.open(configs[1]) as ks:
        assert [v.version for v in ks.versions("k")] == list(range(1, 2 + 2 * rounds))
        ks.vault.verify_store()  # type: ignore[attr-defined]
        ks.verify("k", DATA, ks.sign("k", DATA))


# -- the store itself --------------------------------------------------------------------------
def test_a_transaction_a_failed_statement_broke_is_not_committed(url: str) -> None:
    catalog = Catalog(PostgresStore(url))
    try:
        with pytest.raises(StorageError, match="nothing of it was committed"):
            with catalog.transaction():
                catalog.write("INSERT INTO meta VALUES ('probe', '1')", ())
                with pytest.raises(Exception, match="no_such_table"):
                    catalog.store.execute("SELECT * FROM no_such_table")
                # the caller swallowed the error: COMMIT would roll back without a word
        assert catalog.query_one("SELECT value FROM meta WHERE key='probe'", ()) is None
        with catalog.transaction():  # the connection is usable again
            catalog.write("INSERT INTO meta VALUES ('probe', '2')", ())
        assert catalog.query_one("SELECT value FROM meta WHERE key='probe'", ()) == ("2",)
    finally:
        catalog.close()


def test_a_savepoint_rolls_back_alone(url: str) -> None:
    catalog = Catalog(PostgresStore(url))
    try:
        with catalog.transaction():
            catalog.write("INSERT INTO meta VALUES ('outer', '1')", ())
            with pytest.raises(ValueError), catalog.transaction():
                catalog.write("INSERT INTO meta VALUES ('inner', '1')", ())
                raise ValueError("undo the inner scope")
        keys = {r[0] for r in catalog.query_all("SELECT key FROM meta", ())}
        assert "outer" in keys and "inner" not in keys
    finally:
        catalog.close()


def test_a_new_database_opened_by_many_at_once_is_made_once(url: str) -> None:
    opened: list[Catalog] = []
    failed: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(Catalog(PostgresStore(url)))
        except BaseException as e:  # reported below
            failed.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not failed, repr(failed[0])
        assert {c.schema_version for c in opened} == {SCHEMA_VERSION}
        assert len({c.store_id for c in opened}) == 1
    finally:
        for c in opened:
            c.close()


def test_a_session_bounds_its_lock_waits_and_idle_transactions(url: str) -> None:
    """A writer queued behind a frozen node gives up after 10 s; the frozen node's
    transaction is ended by the server after 60 s (the values are the documented ones)."""
    store = PostgresStore(url)
    try:
        settings = {
            name: store.execute(f"SHOW {name}").fetchone()
            for name in ("lock_timeout", "idle_in_transaction_session_timeout")
        }
        assert settings == {
            "lock_timeout": ("10s",),
            "idle_in_transaction_session_timeout": ("1min",),
        }
    finally:
        store.close()


def test_a_schema_1_database_is_migrated_in_place(url: str) -> None:
    """The upgrade path on PostgreSQL, with a row to carry: schema 1's one table of keys
    gains the lifecycle columns, the versions table, the vault's tables and certificates."""
    store = PostgresStore(url)
    for stmt in CATALOG_V1_SCHEMA.strip().split(";"):
        if stmt.strip():
            store.execute(stmt)
    store.execute(
        "INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,?)",
        ("default", "old", "vault", "h1", "ed25519", "sign,verify", 0, 1,
         "2024-01-02T03:04:05+00:00", "{}"),
    )  # fmt: skip
    store.close()
    catalog = Catalog(PostgresStore(url))
    try:
        assert catalog.schema_version == SCHEMA_VERSION
        info = catalog.get("default", "old")
        assert (info.handle, info.version, info.min_decryption_version) == ("h1", 1, 1)
        assert not info.disabled and info.delete_after is None
        assert [(v.version, v.handle) for v in catalog.versions("default", "old")] == [(1, "h1")]
        assert catalog.query_one("SELECT COUNT(*) FROM vault_records", ()) == (0,)
    finally:
        catalog.close()


def test_a_newer_schema_is_refused(url: str) -> None:
    Catalog(PostgresStore(url)).close()
    store = PostgresStore(url)
    store.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    store.close()
    with pytest.raises(CatalogError, match="schema version 99"):
        Catalog(PostgresStore(url))


def test_no_password_reaches_a_message(url: str) -> None:
    """The config refuses a password in the URL; code may still pass one to the store."""
    secret = "hunter2-not-a-real-password"
    with pytest.raises(StorageError) as caught:
        PostgresStore(f"postgresql://someone:{secret}@/nodb?host=/nonexistent-strongroom-dir")
    assert secret not in str(caught.value)
    assert "nonexistent-strongroom-dir" in str(caught.value)
    # the test cluster trusts its one role, so a password given is accepted and ignored
    store = PostgresStore(url.replace("strongroom@", f"strongroom:{secret}@"))
    try:
        assert secret not in store.location and "dbname=" in store.location
        assert secret not in repr(Catalog(store).location)
    finally:
        store.close()


def test_a_server_restart_fails_fast_then_recovers(
    node: Callable[[str], Keystore], pg_cluster: Any
) -> None:
    a = node("a")
    a.generate("k", "ed25519")
    a.sign("k", DATA)
    pg_cluster.stop("fast")
    try:
        with pytest.raises(StorageError, match="cannot read the store"):
            a.sign("k", DATA)
        with pytest.raises(StorageError):
            a.generate("j", "ed25519")
        # every read of the catalog, not only the lookup by name
        for call in (a.keys, lambda: a.versions("k"), lambda: a.catalog.handles("vault")):
            with pytest.raises(StorageError, match="cannot read the store"):
                call()
    finally:
        pg_cluster.start()
    a.verify("k", DATA, a.sign("k", DATA))  # connected again, no restart of the keystore
    a.generate("j", "ed25519")
    assert [i.name for i in a.keys()] == ["j", "k"]


def test_a_restart_while_a_node_is_idle_goes_unnoticed(
    node: Callable[[str], Keystore], pg_cluster: Any
) -> None:
    """The server drops every connection when it stops; a node that made no call meanwhile
    finds out at its next statement, which it runs again on a new connection."""
    a, b = node("a"), node("b")
    a.generate("k", "ed25519")
    b.sign("k", DATA)
    pg_cluster.stop("fast")
    pg_cluster.start()
    a.rotate("k")  # a write transaction first
    assert b.info("k").version == 2  # a read first
    b.verify("k", DATA, a.sign("k", DATA))
