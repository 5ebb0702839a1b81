"""Tenants, tokens and policies in the keystore's store (issue 21, docs/cluster.md): on
PostgreSQL every node reads them from the one database, so a token issued on one node works
on another and a revocation or policy change is seen by every node at its next request. The
embedded `tenants.sqlite` keeps working, is migrated in place from schema 1, and is moved
into the database when a node gets `[store] url`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config

import strongroom
from strongroom.errors import (
    AuthenticationFailed,
    InvalidArgument,
    KeyExists,
    StorageError,
    TenantNotFound,
)
from strongroom.service.tenants import (
    SCHEMA_VERSION,
    Identity,
    Permission,
    TenantStore,
    open_tenants,
)
from strongroom.store_pg import PostgresStore

# `tenants.sqlite` as Strongroom wrote it with tenants schema 1 (its DDL, word for word).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    name TEXT NOT NULL,
    admin INTEGER NOT NULL,
    token_hash TEXT,
    cert_sha256 TEXT UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS policies (
    tenant TEXT NOT NULL,
    identity TEXT NOT NULL,
    keys TEXT NOT NULL,
    permissions TEXT NOT NULL,
    PRIMARY KEY (tenant, identity, keys)
);
INSERT INTO meta VALUES ('schema', '1');
"""

# A schema 1 store holding one tenant, a token identity with a policy, a revoked identity
# and an admin. The token secret below hashes (SHA-256) to the stored token_hash.
V1_SECRET = "secret-of-app"
V1_TOKEN = "srt_00112233445566aa_" + V1_SECRET
V1_ROWS = """
INSERT INTO tenants VALUES ('acme', 1700000000.5);
INSERT INTO identities VALUES ('00112233445566aa', 'acme', 'app', 0,
    '{hash}', NULL, 1700000001.0, NULL);
INSERT INTO identities VALUES ('99112233445566bb', 'acme', 'gone', 0,
    '{hash}', NULL, 1700000002.0, 1700000003.0);
INSERT INTO identities VALUES ('77112233445566cc', NULL, 'root', 1,
    '{hash}', NULL, 1700000004.0, NULL);
INSERT INTO policies VALUES ('acme', 'app', 'app-*', 'read,sign');
"""


def make_v1(path: Path) -> None:
    import hashlib

    digest = hashlib.sha256(V1_SECRET.encode()).hexdigest()
    db = sqlite3.connect(path)
    try:
        db.executescript(V1_SCHEMA + V1_ROWS.format(hash=digest))
        db.commit()
    finally:
        db.close()


def pg_config(tmp_path: Path, name: str, url: str) -> strongroom.config.Config:
    (tmp_path / name).mkdir()
    return strongroom.config.load(write_vault_config(tmp_path / name, store_url=url))


@pytest.fixture(params=["sqlite", "postgresql"])
def two_nodes(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[TenantStore, TenantStore]]:
    """Two tenant stores on one database, as two nodes (or two processes) hold them."""
    if request.param == "sqlite":
        path = tmp_path / "tenants.sqlite"
        a, b = TenantStore(path), TenantStore(path)
    else:
        url = request.getfixturevalue("pg_cluster").new_database()
        a, b = TenantStore(PostgresStore(url)), TenantStore(PostgresStore(url))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_token_issued_on_one_node_works_on_the_other_and_a_revocation_everywhere(
    two_nodes: tuple[TenantStore, TenantStore],
) -> None:
    a, b = two_nodes
    a.create_tenant("acme")
    token = a.issue_token("acme", "app")
    a.grant("acme", "app", "app-*", [Permission.SIGN, Permission.READ])
    who = b.authenticate_token(token)
    assert who == Identity(who.id, "acme", "app", False)
    assert b.permissions_on(who, "app-1") == {Permission.SIGN, Permission.READ}  # now cached
    assert b.authenticate_token(token) == who
    a.revoke_policy("acme", "app", "app-*", [Permission.SIGN])
    b.authenticate_token(token)  # the next request on b
    assert b.permissions_on(who, "app-1") == {Permission.READ}
    a.grant("acme", "*", "shared-*", [Permission.VERIFY])  # a wildcard identity's policy
    b.authenticate_token(token)
    assert b.may(who, Permission.VERIFY)
    a.revoke("acme", "app")
    with pytest.raises(AuthenticationFailed):
        b.authenticate_token(token)  # b had it cached: the stamp said it changed
    with pytest.raises(AuthenticationFailed):
        a.authenticate_token(token)
    # a new token for the name: a new identity, the old token stays dead on both
    fresh = b.issue_token("acme", "app")
    assert a.authenticate_token(fresh).name == "app"
    with pytest.raises(AuthenticationFailed):
        a.authenticate_token(token)


def test_changes_on_two_nodes_keep_their_rules(
    two_nodes: tuple[TenantStore, TenantStore],
) -> None:
    a, b = two_nodes
    a.create_tenant("acme")
    with pytest.raises(KeyExists):
        b.create_tenant("acme")
    b.issue_token("acme", "app")
    with pytest.raises(KeyExists):
        a.issue_token("acme", "app")  # one live identity per name, across nodes
    with pytest.raises(TenantNotFound):
        b.issue_token("nope", "app")
    admin = b.issue_token(None, "root", admin=True)
    assert a.authenticate_token(admin).admin
    with pytest.raises(KeyExists):
        a.issue_token(None, "root", admin=True)
    a.add_certificate("acme", "cert-app", b"a certificate's DER")
    with pytest.raises(KeyExists):
        b.add_certificate("acme", "other", b"a certificate's DER")
    assert b.authenticate_certificate(b"a certificate's DER").name == "cert-app"
    b.revoke("acme", "cert-app")
    with pytest.raises(AuthenticationFailed):
        a.authenticate_certificate(b"a certificate's DER")
    assert not a.certificate_enrolled(b"a certificate's DER")
    with pytest.raises(TenantNotFound):
        a.revoke(None, "nobody")
    b.grant("acme", "app", "k*", [Permission.SIGN])
    a.grant("acme", "app", "k*", [Permission.VERIFY])  # adds to what b granted
    assert [p.to_dict() for p in b.policies("acme")] == [
        {"tenant": "acme", "identity": "app", "keys": "k*", "permissions": ["sign", "verify"]}
    ]
    assert a.tenants() == [{"name": "acme", "created": a.tenants()[0]["created"], "identities": 1}]
    assert {i["name"] for i in b.identities("acme")} == {"app", "cert-app"}
    assert {i["name"] for i in b.identities()} == {"app", "cert-app", "root"}
    a.revoke_policy("acme", "app", "k*", None)
    assert b.policies() == []


def test_a_schema_1_tenants_sqlite_is_migrated_in_place_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tenants.sqlite"
    make_v1(path)
    store = TenantStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION == 2
        who = store.authenticate_token(V1_TOKEN)
        assert (who.tenant, who.name, who.admin) == ("acme", "app", False)
        assert store.permissions_on(who, "app-x") == {Permission.READ, Permission.SIGN}
        assert [i["name"] for i in store.identities("acme")] == ["app", "gone"]
        assert store.tenants()[0]["created"] == 1700000000.5
    finally:
        store.close()
    # an older Strongroom (schema 1 only) would change rows without the stamp: it is refused
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema'").fetchone()[
        0
    ] == str(SCHEMA_VERSION)


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "tenants.sqlite"
    TenantStore(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.close()
    with pytest.raises(InvalidArgument, match="tenants schema 99"):
        TenantStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "99"
    db.close()


def test_the_tenants_of_node_data_dirs_move_into_the_database(
    pg_cluster: Any, tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    one = pg_config(tmp_path, "one", url)
    two = pg_config(tmp_path, "two", url)
    # node one: a schema 1 file from before the database; node two: a schema 2 file of its
    # own with the same tenant, another identity and an overlapping policy
    one.data_dir.mkdir(mode=0o700)
    make_v1(one.data_dir / "tenants.sqlite")
    two.data_dir.mkdir(mode=0o700)
    local = TenantStore(two.data_dir / "tenants.sqlite")
    local.create_tenant("acme")
    token_two = local.issue_token("acme", "svc")
    local.grant("acme", "app", "app-*", [Permission.VERIFY])
    local.close()

    first = open_tenants(one)
    try:
        assert not (one.data_dir / "tenants.sqlite").exists()
        assert (one.data_dir / "tenants.sqlite.moved").exists()  # kept, renamed
        second = open_tenants(two)
        try:
            assert (two.data_dir / "tenants.sqlite.moved").exists()
            for node in (first, second):
                who = node.authenticate_token(V1_TOKEN)
                # node two's policy on the same pattern is a conflict: the database's row
                # (node one's) stays, no union
                assert node.permissions_on(who, "app-1") == {Permission.READ, Permission.SIGN}
                assert node.authenticate_token(token_two).name == "svc"
            assert [t["name"] for t in second.tenants()] == ["acme"]
            assert {i["name"]: i["revoked"] for i in first.identities("acme")} == {
                "app": None,
                "gone": 1700000003.0,
                "svc": None,
            }
        finally:
            second.close()
        # opening again imports nothing more; a node with no file just opens the database
        again = open_tenants(one)
        assert len(again.identities()) == 4
        again.close()
    finally:
        first.close()
    with psycopg.connect(url, autocommit=True) as pg:
        rows = pg.execute("SELECT value FROM meta WHERE key IN ('schema', 'schema_version')")
        assert sorted(str(r[0]) for r in rows.fetchall()) == [str(SCHEMA_VERSION)]


def test_moving_a_file_in_never_brings_back_a_revoked_token_or_permission(
    pg_cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes' copies of one tenants.sqlite (a cloned data dir): on node two, `app`'s
    token was revoked and its permissions cut to read. Whatever order they move in, the
    token stays revoked and no permission comes back; the policy conflict is reported."""
    for order in ("revoked_last", "revoked_first"):
        url = pg_cluster.new_database()
        (tmp_path / order).mkdir()
        one = pg_config(tmp_path / order, "one", url)
        two = pg_config(tmp_path / order, "two", url)
        for cfg in (one, two):
            cfg.data_dir.mkdir(mode=0o700)
            make_v1(cfg.data_dir / "tenants.sqlite")
        local = TenantStore(two.data_dir / "tenants.sqlite")
        local.revoke("acme", "app")
        local.revoke_policy("acme", "app", "app-*", [Permission.SIGN])
        local.close()
        nodes = (one, two) if order == "revoked_last" else (two, one)
        events: list[tuple[str, dict[str, object]]] = []

        def audit(operation: str, /, **facts: object) -> None:
            events.append((operation, facts))

        caplog.clear()
        first = open_tenants(nodes[0], audit)
        try:
            copied = len(events)
            second = open_tenants(nodes[1], audit)
            try:
                for node in (first, second):
                    with pytest.raises(AuthenticationFailed):
                        node.authenticate_token(V1_TOKEN)
                # the first file: one tenant, three identities, one policy, each audited
                assert copied == 5
                assert {op for op, _ in events[:copied]} == {"tenant_import"}
                revoked = {i["name"]: i["revoked"] for i in first.identities("acme")}
                assert revoked["gone"] == 1700000003.0 and revoked["app"] is not None
                policies = {(p.identity, p.keys): p.permissions for p in second.policies()}
                later = events[copied:]
                conflicts = [f for op, f in later if op == "tenant_import_conflict"]
                if order == "revoked_last":
                    # the database's row (read,sign) stays; the file's read is reported
                    assert policies == {("app", "app-*"): {Permission.READ, Permission.SIGN}}
                    assert [(c["kind"], c["kept"], c["dropped"]) for c in conflicts] == [
                        ("policy", "read,sign", "read")
                    ]
                    assert any("conflicting policy" in r.getMessage() for r in caplog.records)
                    # the revocation is the one row the second file changed
                    assert [f["id"] for op, f in later if op == "tenant_import"] == [
                        "00112233445566aa"
                    ]
                else:
                    assert policies == {("app", "app-*"): {Permission.READ}}
                    assert [c["kind"] for c in conflicts] == ["policy"]
                    assert [op for op, _ in later] == ["tenant_import_conflict"]
                for _, facts in events:  # no token hash in the audit
                    assert not any("hash" in k for k in facts)
            finally:
                second.close()
        finally:
            first.close()


def test_the_earliest_revocation_stays(pg_cluster: Any, tmp_path: Path) -> None:
    url = pg_cluster.new_database()
    one = pg_config(tmp_path, "one", url)
    two = pg_config(tmp_path, "two", url)
    for cfg, when in ((one, 1700000009.0), (two, 1700000005.0)):
        cfg.data_dir.mkdir(mode=0o700)
        make_v1(cfg.data_dir / "tenants.sqlite")
        db = sqlite3.connect(cfg.data_dir / "tenants.sqlite")
        db.execute("UPDATE identities SET revoked=? WHERE name='gone'", (when,))
        db.commit()
        db.close()
    open_tenants(one).close()
    store = open_tenants(two)
    try:
        assert {i["name"]: i["revoked"] for i in store.identities("acme")}["gone"] == 1700000005.0
    finally:
        store.close()


def test_the_embedded_default_stays_a_file_in_the_data_dir(tmp_path: Path) -> None:
    cfg = strongroom.config.load(write_vault_config(tmp_path))
    store = open_tenants(cfg)
    try:
        store.create_tenant("acme")
    finally:
        store.close()
    assert (cfg.data_dir / "tenants.sqlite").stat().st_mode & 0o777 == 0o600
    assert not (cfg.data_dir / "tenants.sqlite.stamp").exists()


def test_postgres_gone_is_a_storage_error_then_it_recovers(pg_cluster: Any) -> None:
    store = TenantStore(PostgresStore(pg_cluster.new_database()))
    try:
        store.create_tenant("acme")
        token = store.issue_token("acme", "app")
        pg_cluster.stop("fast")
        try:
            with pytest.raises(StorageError) as e:
                store.authenticate_token(token)
            assert "host=" in str(e.value)  # the operator's message names the store
            with pytest.raises(StorageError):
                store.grant("acme", "app", "*", [Permission.SIGN])
        finally:
            pg_cluster.start()
        assert store.authenticate_token(token).name == "app"
        assert store.policies() == []  # the failed grant left nothing
    finally:
        store.close()


def test_the_tenant_commands_on_a_node_host_change_the_database_and_audit_it(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_vault_config(tmp_path / "one", store_url=url)
    two = write_vault_config(tmp_path / "two", store_url=url)
    with strongroom.open(one) as ks:
        ks.vault_control().initialize()
    assert run_cli(one, "tenant", "create", "acme").returncode == 0
    issued = run_cli(one, "--json", "tenant", "token", "issue", "acme", "app", "--grant", "sign")
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)["token"]
    listed = run_cli(two, "--json", "policy", "list")  # through the other node's config
    assert json.loads(listed.stdout) == [
        {"tenant": "acme", "identity": "app", "keys": "*", "permissions": ["sign"]}
    ]
    assert run_cli(two, "tenant", "token", "revoke", "acme", "app").returncode == 0
    store = open_tenants(strongroom.config.load(one))
    try:
        with pytest.raises(AuthenticationFailed):
            store.authenticate_token(token)
    finally:
        store.close()
    assert not (tmp_path / "one" / "data" / "tenants.sqlite").exists()
    with psycopg.connect(url, autocommit=True) as pg:
        lines = [r[0] for r in pg.execute("SELECT line FROM audit_chain ORDER BY seq")]
    ops = [(json.loads(line)["op"], json.loads(line)["result"]) for line in lines]
    for op in ("tenant_create", "token_issue", "token_revoke"):
        assert (op, "ok") in ops, (op, ops)
