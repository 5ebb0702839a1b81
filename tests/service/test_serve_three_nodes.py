"""Three `strongroom serve` nodes on loopback (TLS on 127.0.0.1) against one PostgreSQL
(docs/cluster.md), under a client load that mixes generate, sign, rotate and policy
changes, each client thread on its own node; then every acknowledged operation is checked
on every node, a token revoked through one node is refused by the others, and the audit
chain all three wrote verifies.

No timing is asserted: the load is a fixed number of operations, and every wait is for an
event, bounded only so that a broken build cannot hang the suite."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from server_support import ALL_KEY_PERMISSIONS, Pki, Service, make_pki, start_service

import strongroom
from strongroom.errors import AuthenticationFailed, NotPermitted
from strongroom.service.tenants import Permission, open_tenants

NODES = 3
ROUNDS = 24  # per client thread


def node_config(directory: Path, url: str, pki: Pki) -> Path:
    directory.mkdir()
    cfg = write_vault_config(directory, store_url=url)
    with cfg.open("a", encoding="utf-8") as f:
        f.write(
            "\n[server]\n"
            f'socket = "{directory / "serve.sock"}"\n'
            'listen = "127.0.0.1:0"\n'
            f'tls_cert = "{pki.server_cert}"\n'
            f'tls_key = "{pki.server_key}"\n'
            f'tls_client_ca = "{pki.ca}"\n'
            "rate_limit = 0\n"
            "lease_seconds = 2\n"
        )
    return cfg


@dataclass
class Acked:
    """What the service acknowledged to one client thread."""

    created: list[str] = field(default_factory=list)
    rotations: dict[str, list[int]] = field(default_factory=dict)  # key -> versions returned
    signatures: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    policy_checks: int = 0


def test_three_nodes_under_a_mixed_load_agree_on_everything_acknowledged(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    pki = make_pki(tmp_path / "pki")
    configs = [node_config(tmp_path / f"n{i}", url, pki) for i in range(NODES)]
    with strongroom.open(configs[0]) as ks:
        ks.vault_control().initialize()
    tenants = open_tenants(strongroom.config.load(configs[0]))
    try:
        tenants.create_tenant("acme")
        app = tenants.issue_token("acme", "app")
        tenants.grant("acme", "app", "*", ALL_KEY_PERMISSIONS)
        flipper = tenants.issue_token("acme", "flipper")
        tenants.grant("acme", "flipper", "*", [Permission.READ])
        victim = tenants.issue_token("acme", "victim")
        tenants.grant("acme", "victim", "*", [Permission.READ, Permission.SIGN])
        admin = tenants.issue_token(None, "root", admin=True)
    finally:
        tenants.close()
    nodes: list[Service] = []
    try:
        nodes = [start_service(cfg) for cfg in configs]
        assert all(n.https.startswith("https://127.0.0.1:") for n in nodes)

        def connect(i: int, token: str) -> Any:
            return strongroom.connect(nodes[i % NODES].https, token=token, ca=pki.ca)

        with connect(0, app) as c:
            c.generate("shared", "ed25519")  # every thread rotates and signs with it
        acked = [Acked() for _ in range(NODES)]
        failures: list[BaseException] = []

        def load(i: int) -> None:
            rng = random.Random(i)
            mine = acked[i]
            try:
                with connect(i, app) as c:
                    for r in range(ROUNDS):
                        name = f"w{i}-{r}"
                        c.generate(name, "ed25519")
                        mine.created.append(name)
                        # a key another node made a moment ago (read-after-write)
                        others = [n for a in acked for n in list(a.created)] + ["shared"]
                        target = rng.choice(others)
                        data = f"{i}:{r}:{target}".encode()
                        mine.signatures.append((target, data, c.sign(target, data)))
                        what = rng.choice(["shared", name])
                        version = c.rotate(what).version
                        mine.rotations.setdefault(what, []).append(version)
            except BaseException as e:  # reported by the main thread
                failures.append(e)

        def policies() -> None:
            """Grant and take back `sign` on one node; the next request on another node
            must already see the change (acknowledged = in force everywhere)."""
            try:
                with connect(0, admin) as ad, connect(1, flipper) as f1, connect(2, flipper) as f2:
                    for r in range(ROUNDS // 2):
                        ad.grant("acme", "flipper", "shared", ["sign"])
                        f1.sign("shared", b"granted %d" % r)
                        ad.revoke_policy("acme", "flipper", "shared", ["sign"])
                        with pytest.raises(NotPermitted):  # it may read the key, not sign
                            f2.sign("shared", b"revoked %d" % r)
                        acked[0].policy_checks += 1
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(NODES)]
        threads.append(threading.Thread(target=policies))
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures

        # -- everything acknowledged, on every node -------------------------------------------
        created = [n for a in acked for n in a.created]
        rotations: dict[str, list[int]] = {}
        for a in acked:
            for k, vs in a.rotations.items():
                rotations.setdefault(k, []).extend(vs)
        assert len(created) == NODES * ROUNDS and acked[0].policy_checks == ROUNDS // 2
        shared = sorted(rotations["shared"])
        assert shared == list(range(2, 2 + len(shared)))  # strictly increasing, none lost
        for i in range(NODES):
            with connect(i, app) as c:
                names = {k.name for k in c.keys()}
                assert set(created) | {"shared"} <= names
                for name in [*created, "shared"]:
                    got = [v.version for v in c.versions(name)]
                    assert got == list(range(1, 2 + len(rotations.get(name, [])))), name
                publics: dict[str, list[ed25519.Ed25519PublicKey]] = {}
                for a in acked:
                    for key, data, sig in a.signatures:
                        if key not in publics:
                            found = [c.public_key(key, v.version) for v in c.versions(key)]
                            assert all(isinstance(p, ed25519.Ed25519PublicKey) for p in found)
                            publics[key] = cast(list[ed25519.Ed25519PublicKey], found)
                        assert _verifies_under_one(publics[key], data, sig), key

        # -- a revoked token, used on another node --------------------------------------------
        with connect(0, victim) as v0, connect(2, victim) as v2:
            v2.sign("shared", b"before")
            with connect(1, admin) as ad:
                ad.revoke_identity("acme", "victim")
            with pytest.raises(AuthenticationFailed):
                v2.sign("shared", b"after")
            with pytest.raises(AuthenticationFailed):
                v0.keys()

        # -- one audit chain, written by all three, verifies from any node ------------------
        for i in range(NODES):
            with connect(i, admin) as ad:
                report = ad.audit_verify()
                assert report["ok"], report
                assert report["checkpoints_verified"] == report["checkpoints"]
        records: list[dict[str, Any]] = []
        with connect(2, admin) as ad:
            since = 0
            while True:
                page = ad.audit_records(since=since, limit=10_000)
                if not page:
                    break
                records.extend(page)
                since = page[-1]["seq"]
        signs = [r for r in records if r["op"] == "sign" and r["result"] == "ok"]
        assert len(signs) >= NODES * ROUNDS + ROUNDS // 2 + 1
        # one linear chain: seq 1..N with no gap (the lease holder may have signed a
        # checkpoint since the verify above)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        assert len(records) >= report["records"]
    finally:
        for n in nodes:
            n.stop()
    assert all(n.process.returncode == 0 for n in nodes)


def _verifies_under_one(publics: list[ed25519.Ed25519PublicKey], data: bytes, sig: bytes) -> bool:
    for public in publics:
        try:
            public.verify(sig, data)
            return True
        except InvalidSignature:
            continue
    return False
