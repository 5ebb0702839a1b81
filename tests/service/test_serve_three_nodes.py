"""Three `strongroom serve` nodes on loopback (TLS on 127.0.0.1) against one PostgreSQL
(docs/cluster.md), as issue 21 point 7 has them: each node has its own swtpm and opens the
shared vault through that TPM's key slot (`vault enroll tpm`; no passphrase in the node's
environment), and all three share one SoftHSM2 token as a backend. Under a client load
that mixes generate, sign, rotate (of vault keys and of keys in the shared HSM) and policy
changes, each client thread on its own node, every acknowledged operation is then checked
on every node, a token revoked through one node is refused by the others, and the audit
chain all three wrote verifies.

No timing is asserted: the load is a fixed number of operations, and every wait is for an
event, bounded only so that a broken build cannot hang the suite."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm
from server_support import ALL_KEY_PERMISSIONS, Pki, Service, make_pki, start_service
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, swtpms

import strongroom
from strongroom.errors import (
    AuditUnavailable,
    AuthenticationFailed,
    BackendUnavailable,
    NotPermitted,
    StorageError,
)
from strongroom.service.tenants import Permission, open_tenants

__all__ = ["softhsm"]  # the session fixture, imported so pytest finds it

NODES = 3
ROUNDS = 24  # per client thread


def hsm_key(name: str) -> bool:
    """Which of the load's keys live in the shared HSM: every other key thread 0 makes.

    Every node signs with them, but only thread 0 (on node 0, which stays up in the fault
    test) makes and rotates them: SoftHSM2's file store, written by several processes at
    once, can hide one process's new objects from another that writes too (docs/cluster.md,
    "SoftHSM2 as the shared HSM"); a network HSM has no such limit."""
    return name.startswith("w0-") and int(name.rsplit("-", 1)[1]) % 2 == 1


@pytest.fixture(scope="module")
def tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Swtpm]]:
    """A swtpm of its own for each node, shared by this module's tests (each test enrolls
    them in its own database's vault). Stopped with TPM2_Shutdown: no lockout count."""
    with swtpms(tmp_path_factory.mktemp("tpms"), NODES) as started:
        yield started


def node_config(
    directory: Path, url: str, pki: Pki, tpm: Swtpm, hsm: SoftHsm, unlock: str, name: str
) -> Path:
    """A node's config: the shared store, its own TPM (`tpm`, the vault's key slot), the
    shared HSM (`hsm`), the vault first in order; TLS on 127.0.0.1 port 0."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(
        f'[keystore]\ndata_dir = "{directory / "data"}"\norder = ["vault"]\n\n'
        f'[store]\nurl = "{url}"\n\n'
        '[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{VAULT_PASS_ENV}"\nunlock = {unlock}\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n\n"
        f'[backends.tpm]\ntype = "tpm"\ntcti = "{tpm.tcti}"\npin = "env:{TPM_PIN_ENV}"\n\n'
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{hsm.module}"\n'
        f'token = "{hsm.label}"\npin = "env:{HSM_PIN_ENV}"\n\n'
        f'[server]\nsocket = "{directory / "serve.sock"}"\nlisten = "127.0.0.1:0"\n'
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        f'tls_client_ca = "{pki.ca}"\nrate_limit = 0\nlease_seconds = 2\n',
        encoding="utf-8",
    )
    return path


@dataclass
class Acked:
    """What the service acknowledged to one client thread."""

    created: list[str] = field(default_factory=list)
    rotations: dict[str, list[int]] = field(default_factory=dict)  # key -> versions returned
    signatures: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    policy_checks: int = 0


def one_round(c: Any, i: int, r: int, acked: list[Acked], rng: random.Random) -> None:
    """Client thread i's round r: make key w{i}-{r}, sign with a key any thread made (one
    another node made a moment ago: read-after-write) or `shared`, rotate `shared` or the
    new key; each acknowledged result noted in acked[i]."""
    mine = acked[i]
    name = f"w{i}-{r}"
    c.generate(name, "ed25519", backend="hsm" if hsm_key(name) else None)
    mine.created.append(name)
    others = [n for a in acked for n in list(a.created)] + ["shared"]
    target = rng.choice(others)
    data = f"{i}:{r}:{target}".encode()
    mine.signatures.append((target, data, c.sign(target, data)))
    # an HSM key is rotated by its maker, at once; a vault key, or the shared one, at random
    what = name if hsm_key(name) else rng.choice(["shared", name])
    version = c.rotate(what).version
    mine.rotations.setdefault(what, []).append(version)


def make_cluster(
    url: str,
    tmp_path: Path,
    tpms: list[Swtpm],
    hsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Pki, list[Path], dict[str, str]]:
    """The node configs, a vault in the database with a key slot for each node's TPM, and
    the tokens (tenant acme: app with every permission, flipper reads, victim reads and
    signs; root, an admin). The passphrase sets the vault up, then leaves the environment:
    the nodes open the vault through their TPMs only."""
    monkeypatch.setenv(TPM_PIN_ENV, TEST_PIN)
    monkeypatch.setenv(HSM_PIN_ENV, hsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    pki = make_pki(tmp_path / "pki")
    dirs = [tmp_path / f"n{i}" for i in range(NODES)]
    setup = [
        node_config(d, url, pki, tpm, hsm, '["passphrase"]', "setup.toml")
        for d, tpm in zip(dirs, tpms, strict=True)
    ]
    configs = [
        node_config(d, url, pki, tpm, hsm, '["tpm"]', "strongroom.toml")
        for d, tpm in zip(dirs, tpms, strict=True)
    ]
    with strongroom.open(setup[0]) as ks:
        ks.vault_control().initialize()
    for cfg in setup:  # `vault enroll tpm` on each node: a slot only its TPM opens
        with strongroom.open(cfg) as ks:
            vault = ks.vault_control()
            assert vault.unlock() == "passphrase"
            assert vault.enroll("tpm", {})["method"] == "tpm"
    monkeypatch.delenv(VAULT_PASS_ENV)
    with strongroom.open(configs[0]) as ks:
        assert ks.vault_control().unlock() == "tpm"
        status = ks.vault_control().vault_status()
    assert sorted(s["method"] for s in status["slots"]) == ["passphrase", *["tpm"] * NODES]
    tenants = open_tenants(strongroom.config.load(configs[0]))
    try:
        tenants.create_tenant("acme")
        tokens = {name: tenants.issue_token("acme", name) for name in ("app", "flipper", "victim")}
        tenants.grant("acme", "app", "*", ALL_KEY_PERMISSIONS)
        tenants.grant("acme", "flipper", "*", [Permission.READ])
        tenants.grant("acme", "victim", "*", [Permission.READ, Permission.SIGN])
        tokens["admin"] = tenants.issue_token(None, "root", admin=True)
    finally:
        tenants.close()
    return pki, configs, tokens


def start_node(config: Path) -> Service:
    """`strongroom serve` with no vault passphrase in its environment: its TPM opens it."""
    return start_service(config, vault_passphrase=False)


def test_three_nodes_under_a_mixed_load_agree_on_everything_acknowledged(
    pg_cluster: Any,
    tmp_path: Path,
    tpms: list[Swtpm],
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = pg_cluster.new_database()
    pki, configs, tokens = make_cluster(url, tmp_path, tpms, softhsm, monkeypatch)
    app, flipper, victim, admin = (tokens[k] for k in ("app", "flipper", "victim", "admin"))
    nodes: list[Service] = []
    try:
        nodes = [start_node(cfg) for cfg in configs]
        assert all(n.https.startswith("https://127.0.0.1:") for n in nodes)

        def connect(i: int, token: str) -> Any:
            return strongroom.connect(nodes[i % NODES].https, token=token, ca=pki.ca)

        with connect(0, app) as c:
            c.generate("shared", "ed25519")  # every thread rotates and signs with it
        for i in range(NODES):  # each opens the vault (on first use) through its TPM's slot
            with connect(i, app) as c:
                c.sign("shared", b"node %d" % i)
            with connect(i, admin) as ad:
                status = ad.vault_status()
            assert status["unlocked"] and status["unlock_methods"] == ["tpm"], status
            assert status["unlock_failures"] == [], status
        acked = [Acked() for _ in range(NODES)]
        failures: list[BaseException] = []

        def load(i: int) -> None:
            rng = random.Random(i)
            try:
                with connect(i, app) as c:
                    for r in range(ROUNDS):
                        one_round(c, i, r, acked, rng)
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
        assert acked[0].policy_checks == ROUNDS // 2
        for i in range(NODES):
            with connect(i, app) as c:
                check_acknowledged(c, acked, exact=True)

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
    assert_tpms_clean(tpms)


def check_acknowledged(c: Any, acked: list[Acked], *, exact: bool) -> None:
    """Every key, version and signature the service acknowledged is there, through the
    node `c` talks to. With `exact`, nothing else was made either (no request failed)."""
    created = [n for a in acked for n in a.created]
    rotations: dict[str, list[int]] = {}
    for a in acked:
        for k, vs in a.rotations.items():
            rotations.setdefault(k, []).extend(vs)
    for name, made in rotations.items():  # each version made once: told to one caller
        assert len(made) == len(set(made)), (name, sorted(made))
    if exact:
        assert len(created) == NODES * ROUNDS
        shared = sorted(rotations["shared"])
        assert shared == list(range(2, 2 + len(shared)))  # strictly increasing, none lost
    backends = {k.name: k.backend for k in c.keys()}
    assert set(created) | {"shared"} <= set(backends)
    in_hsm = [n for n in created if hsm_key(n)]
    assert in_hsm and all(backends[n] == "hsm" for n in in_hsm)  # in the shared token
    if exact:  # (with faults, a rotation's answer may have been lost)
        assert all(n in rotations for n in in_hsm)  # each rotated there too
    assert all(backends[n] == "vault" for n in set(created) - set(in_hsm))
    publics: dict[str, list[ed25519.Ed25519PublicKey]] = {}
    for name in [*created, "shared"]:
        got = [v.version for v in c.versions(name)]
        if exact:
            assert got == list(range(1, 2 + len(rotations.get(name, [])))), name
        else:  # a rotation whose answer was lost may have committed: more, never fewer
            assert got == list(range(1, 1 + len(got))), name
            assert set(rotations.get(name, [])) <= set(got), name
    for a in acked:
        for key, data, sig in a.signatures:
            if key not in publics:
                found = [c.public_key(key, v.version) for v in c.versions(key)]
                assert all(isinstance(p, ed25519.Ed25519PublicKey) for p in found)
                publics[key] = cast(list[ed25519.Ed25519PublicKey], found)
            assert _verifies_under_one(publics[key], data, sig), key


def test_a_node_killed_and_postgres_restarted_mid_load_lose_nothing_acknowledged(
    pg_cluster: Any,
    tmp_path: Path,
    tpms: list[Swtpm],
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21's faults under the same load: one node SIGKILLed mid-load, then PostgreSQL
    restarted mid-load. A client sees a connection error or a 503 (not acknowledged) and
    goes on, on the next node if its own is dead; every acknowledged operation is then
    durable and visible on every node, the killed one restarted, and the audit verifies."""
    url = pg_cluster.new_database()
    pki, configs, tokens = make_cluster(url, tmp_path, tpms, softhsm, monkeypatch)
    app, admin = tokens["app"], tokens["admin"]
    nodes: list[Service] = []
    try:
        nodes = [start_node(cfg) for cfg in configs]
        dead: set[int] = set()

        def connect(i: int, token: str) -> Any:
            return strongroom.connect(nodes[i].https, token=token, ca=pki.ca)

        with connect(0, app) as c:
            c.generate("shared", "ed25519")
        acked = [Acked() for _ in range(NODES)]
        failures: list[BaseException] = []
        refused = [0] * NODES
        progress = threading.Semaphore(0)  # one release per acknowledged round

        def load(i: int) -> None:
            rng = random.Random(i)
            mine = acked[i]
            attempt = 0
            at = i
            try:
                while len(mine.created) < ROUNDS and attempt < 50 * ROUNDS:
                    attempt += 1
                    while at in dead:
                        at = (at + 1) % NODES
                    try:
                        with connect(at, app) as c:
                            one_round(c, i, attempt, acked, rng)
                        progress.release()
                    except (BackendUnavailable, StorageError, AuditUnavailable):
                        refused[i] += 1  # not acknowledged: a connection error or a 503
                        threading.Event().wait(0.05)
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(NODES)]
        for t in threads:
            t.start()
        for _ in range(ROUNDS // 2):  # some progress first, whatever the machine's speed
            assert progress.acquire(timeout=300)
        dead.add(1)
        nodes[1].process.kill()  # SIGKILL, mid-request for whoever is on it
        nodes[1].process.wait()
        for _ in range(ROUNDS // 2):
            assert progress.acquire(timeout=300)
        pg_cluster.stop("fast")  # every node loses its connections mid-load
        pg_cluster.start()
        for t in threads:
            t.join(600)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures
        assert all(len(a.created) == ROUNDS for a in acked), [len(a.created) for a in acked]

        nodes[1] = start_node(configs[1])  # the killed node, back: it sees it all too
        for i in range(NODES):
            with connect(i, app) as c:
                check_acknowledged(c, acked, exact=False)
        with connect(1, admin) as ad:
            report = ad.audit_verify()
        assert report["ok"], report
    finally:
        for n in nodes:
            n.stop()
    assert_tpms_clean(tpms)


def assert_tpms_clean(tpms: list[Swtpm]) -> None:
    """No node left a transient object in its TPM (there are 3 slots) or a failed
    authorisation on its dictionary-attack counter."""
    for tpm in tpms:
        assert tpm.transient_handles() == []
        assert tpm.lockout_counter() == 0


def _verifies_under_one(publics: list[ed25519.Ed25519PublicKey], data: bytes, sig: bytes) -> bool:
    for public in publics:
        try:
            public.verify(sig, data)
            return True
        except InvalidSignature:
            continue
    return False
