"""Two `strongroom serve` nodes on one PostgreSQL store (docs/cluster.md): a key created,
rotated or deleted through one node is what the other serves on its next request.

Tenants, tokens and policies live in the database too: a token issued through one node's
config works on the other, and a token revoked there stops working on every node."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from server_support import ALL_KEY_PERMISSIONS, Service, start_service

import strongroom
from strongroom.errors import AuthenticationFailed, KeyNotFound
from strongroom.service.tenants import open_tenants

DATA = b"two nodes, one store"


def node_config(directory: Path, url: str) -> Path:
    directory.mkdir()
    cfg = write_vault_config(directory, store_url=url)
    with cfg.open("a", encoding="utf-8") as f:
        f.write(f'\n[server]\nsocket = "{directory / "serve.sock"}"\nrate_limit = 0\n')
    return cfg


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
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(n.socket)),
                base_url="http://strongroom",
                headers={"authorization": f"Bearer {admin}"},
                timeout=60,
            ) as c:
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
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(node.socket)),
            base_url="http://strongroom",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        ) as c:
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
