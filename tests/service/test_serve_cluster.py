"""Two `strongroom serve` nodes on one PostgreSQL store (docs/cluster.md): a key created,
rotated or deleted through one node is what the other serves on its next request.

Tenants, tokens and policies live in the database too: a token issued through one node's
config works on the other, and a token revoked there stops working on every node."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from pg_support import verify_store_chain
from server_support import ALL_KEY_PERMISSIONS, Service, start_service, unix_client

import strongroom
from strongroom.errors import AuthenticationFailed, KeyNotFound
from strongroom.service.tenants import open_tenants

DATA = b"two nodes, one store"


def node_config(directory: Path, url: str, server: str = "") -> Path:
    directory.mkdir()
    cfg = write_vault_config(directory, store_url=url)
    with cfg.open("a", encoding="utf-8") as f:
        f.write(f'\n[server]\nsocket = "{directory / "serve.sock"}"\nrate_limit = 0\n{server}')
    return cfg


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    """Poll until `check()` holds; the bound only keeps a broken build from hanging."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not seen within {timeout} s: {what}")
        time.sleep(0.05)


def sql(url: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(statement.replace("?", "%s"), args)  # type: ignore[arg-type]
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def lease(url: str) -> tuple[str, float, float] | None:
    """(holder, acquired, expires) of the jobs lease, on the database's clock."""
    rows = sql(
        url,
        "SELECT holder, extract(epoch FROM acquired)::float8, extract(epoch FROM expires)::float8"
        " FROM leases WHERE name = 'jobs'",
    )
    return None if not rows else (str(rows[0][0]), float(rows[0][1]), float(rows[0][2]))


def held_by(url: str, node: Service) -> bool:
    row = lease(url)
    return row is not None and f":{node.process.pid}:" in row[0]


def key_gone(url: str, name: str) -> bool:
    return not sql(url, "SELECT 1 FROM keys WHERE namespace = 'acme' AND name = ?", name)


def tenant_token(cfg: Path) -> str:
    store = open_tenants(strongroom.config.load(cfg))
    try:
        store.create_tenant("acme")
        token = store.issue_token("acme", "app")
        store.grant("acme", "app", "*", ALL_KEY_PERMISSIONS)
        return token
    finally:
        store.close()


def test_two_serve_nodes_on_one_database_serve_the_same_keys(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    configs = [node_config(tmp_path / name, url) for name in ("a", "b")]
    with strongroom.open(configs[0]) as ks:
        ks.vault_control().initialize()  # one vault, in the database, for both nodes
    token = tenant_token(configs[0])  # made through node a's config: both nodes know it
    tenants = open_tenants(strongroom.config.load(configs[1]))
    try:
        admin = tenants.issue_token(None, "root", admin=True)
    finally:
        tenants.close()
    nodes: list[Service] = []
    try:
        nodes = [start_service(cfg) for cfg in configs]
        with (
            strongroom.connect(nodes[0].unix, token=token) as a,
            strongroom.connect(nodes[1].unix, token=token) as b,
        ):
            a.generate("k", "ed25519")
            a.verify("k", DATA, b.sign("k", DATA))  # made on a, served by b
            assert b.rotate("k").version == 2
            assert a.info("k").version == 2
            assert [v.version for v in a.versions("k")] == [1, 2]
            a.delete("k")
            with pytest.raises(KeyNotFound):
                b.sign("k", DATA)
            # revoked through node b's config (the CLI on b's host): a refuses it at once
            tenants = open_tenants(strongroom.config.load(configs[1]))
            try:
                tenants.revoke("acme", "app")
            finally:
                tenants.close()
            with pytest.raises(AuthenticationFailed):
                a.keys()
            with pytest.raises(AuthenticationFailed):
                b.keys()
        # one audit chain in the database, written by both nodes, verified through either
        for n in nodes:
            with unix_client(n, admin) as c:
                report = c.get("/v1/audit/verify").json()
                assert report["ok"] and "audit_chain in" in report["path"], report
                records = c.get("/v1/audit/records", params={"since": 0, "limit": 10_000})
                ops = [(r["op"], r["result"]) for r in records.json()["records"]]
                assert ("rotate", "ok") in ops and ("delete", "ok") in ops
                assert len(ops) == report["records"]
                newest = c.get("/v1/audit/records", params={"last": 1}).json()["records"]
                assert [r["seq"] for r in newest] == [report["last_seq"]]
    finally:
        for node in nodes:
            node.stop()
    assert all(node.process.returncode == 0 for node in nodes)


def test_a_node_answers_503_with_retry_after_while_postgres_is_down_then_recovers(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    cfg = node_config(tmp_path / "a", pg_cluster.new_database())
    with strongroom.open(cfg) as ks:
        ks.vault_control().initialize()
    token = tenant_token(cfg)
    node = start_service(cfg)
    try:
        with unix_client(node, token) as c:
            sign = {"data": base64.b64encode(DATA).decode()}
            assert c.post("/v1/keys", json={"name": "k", "type": "ed25519"}).status_code == 201
            assert c.post("/v1/keys/k/sign", json=sign).status_code == 200
            pg_cluster.stop("fast")
            try:
                for _ in range(2):  # the dropped connection, then no server at all
                    r = c.post("/v1/keys/k/sign", json=sign)
                    assert r.status_code == 503, r.text
                    assert r.headers["retry-after"] == "1"
                    assert "host=" not in r.text  # the store's address is the operator's
            finally:
                pg_cluster.start()
            assert c.post("/v1/keys/k/sign", json=sign).status_code == 200
            r = c.post("/v1/keys", json={"name": "k2", "type": "ed25519"})
            assert r.status_code == 201, r.text
    finally:
        node.stop()
    assert node.process.returncode == 0


def test_singleton_jobs_move_to_another_node_when_the_holder_is_killed(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs lease (docs/cluster.md, "Singleton jobs"): one node carries out scheduled
    deletions and signs checkpoints; SIGKILLed, it stops renewing, and the other node takes
    the lease once it has run out on the database's clock, never before."""
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    server = "lease_seconds = 2\naudit_checkpoint_seconds = 1\n"
    configs = [node_config(tmp_path / name, url, server) for name in ("a", "b")]
    with strongroom.open(configs[0]) as ks:
        ks.vault_control().initialize()
    token = tenant_token(configs[0])
    nodes: list[Service] = []
    try:
        a = start_service(configs[0])
        nodes.append(a)
        wait_for("node a holds the lease", lambda: held_by(url, a))
        b = start_service(configs[1])
        nodes.append(b)
        with strongroom.connect(b.unix, token=token) as client:
            client.generate("doomed", "ed25519")
            client.schedule_deletion("doomed", timedelta(seconds=1))
            wait_for("the holder carries out the due deletion", lambda: key_gone(url, "doomed"))
            assert held_by(url, a)  # b asked every 2/3 s all along, and never took it
            row = lease(url)
            assert row is not None
            a_expires = row[2]
            a.process.kill()  # SIGKILL: no release, no last words
            a.process.wait()
            client.generate("doomed-too", "ed25519")
            client.schedule_deletion("doomed-too", timedelta(seconds=1))
            wait_for("node b takes the lease over", lambda: held_by(url, b))
            row = lease(url)
            assert row is not None
            assert row[1] >= a_expires  # taken only once a's lease had run out
            wait_for("the new holder deletes", lambda: key_gone(url, "doomed-too"))
            client.generate("after", "ed25519")
        b.stop()
        assert b.process.returncode == 0
        assert lease(url) is None  # a clean shutdown hands the lease back at once
    finally:
        for n in nodes:
            n.stop()
    records = [json.loads(r[0]) for r in sql(url, "SELECT line FROM audit_chain ORDER BY seq")]
    taken = [r["holder"] for r in records if r["op"] == "lease_acquired"]
    assert len(taken) == 2
    assert f":{a.process.pid}:" in taken[0] and f":{b.process.pid}:" in taken[1]
    deletes = [
        r
        for r in records
        if r["op"] == "delete" and r.get("scheduled") == "yes" and r["result"] != "started"
    ]
    assert sorted((str(r["key"]).split("/")[-1], r["result"]) for r in deletes) == [
        ("doomed", "ok"),
        ("doomed-too", "ok"),
    ]
    b_took = next(
        i
        for i, r in enumerate(records)
        if r["op"] == "lease_acquired" and f":{b.process.pid}:" in r["holder"]
    )
    assert any(r["op"] == "checkpoint" for r in records[b_took:])  # b signs them now
    with strongroom.open(configs[1]) as ks:
        public = ks.audit_public_key()
    report = verify_store_chain(url, public)
    assert report.ok, report.first_bad
