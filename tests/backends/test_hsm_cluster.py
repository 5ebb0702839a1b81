"""One vault in a shared PostgreSQL store opened through one HSM that every node reaches
(issue 21 point 2, docs/cluster.md): a key slot sealed by the shared SoftHSM2 token,
enrolled once, opens the vault on every node, with no passphrase on the others; and a
threshold slot (a passphrase and the shared HSM) does the same on two nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE
from pkcs11_support import PIN_ENV, SoftHsm, softhsm, write_config

import strongroom
from strongroom.errors import ThresholdNotMet
from strongroom.threshold import Member, Policy

__all__ = ["softhsm"]  # the session fixture, imported so pytest finds it

ALICE = "alice's officer passphrase"  # a test value, not a secret
ALICE_ENV = "STRONGROOM_PASSPHRASE_ALICE"  # where the vault looks for member alice's


def node(directory: Path, hsm: SoftHsm, url: str, unlock: str) -> Path:
    directory.mkdir()
    cfg = write_config(directory, hsm, unlock=unlock)
    text = cfg.read_text().replace(
        "\n[backends.vault]", f'\n[store]\nurl = "{url}"\n\n[backends.vault]'
    )
    cfg.write_text(text)
    return cfg


def test_a_slot_of_the_shared_hsm_opens_the_vault_on_every_node(
    pg_cluster: Any, tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    first = node(tmp_path / "a", softhsm, url, '["passphrase"]')
    others = [node(tmp_path / n, softhsm, url, '["hsm"]') for n in ("b", "c")]
    with strongroom.open(first) as ks:
        ks.vault_control().initialize()
        ks.generate("k", "ed25519", backend="vault")
        slot = ks.vault_control().enroll("hsm", {})["id"]
    monkeypatch.delenv(VAULT_PASS_ENV)  # the other nodes have the HSM only
    for cfg in others:
        with strongroom.open(cfg) as ks:
            vault = ks.vault_control()
            assert vault.unlock() == "hsm"
            status = vault.vault_status()
            assert status["unlock_failures"] == [] and status["keys"] == 1
            assert slot in {s["id"] for s in status["slots"]}
            ks.verify("k", b"shared", ks.sign("k", b"shared"))


def test_a_threshold_slot_in_the_shared_store_opens_the_vault_on_two_nodes(
    pg_cluster: Any, tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21 point 2, "or a threshold": a threshold slot in the database, enrolled on one
    node (alice's passphrase and the shared HSM, both needed; the only slot), opens the
    vault on either node; a node short of its quorum is refused, says which member failed
    and writes nothing."""
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    a, b = (node(tmp_path / n, softhsm, url, '["passphrase"]') for n in ("a", "b"))
    with strongroom.open(a) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("k", "ed25519", backend="vault")
        policy = Policy.of(2, [Member("passphrase", "alice", {"passphrase": ALICE}), "hsm"])
        slot = vault.enroll_threshold(policy, exclusive=True)
        assert slot["policy"] == "2 of (alice, hsm)"
        assert [s["method"] for s in vault.vault_status()["slots"]] == ["threshold"]
    monkeypatch.delenv(VAULT_PASS_ENV)  # no node has the (now slotless) passphrase
    monkeypatch.setenv(ALICE_ENV, ALICE)
    with strongroom.open(b) as ks:  # the other node: the quorum, present there
        assert ks.vault_control().unlock() == "threshold (alice, hsm)"
        ks.verify("k", b"node b", ks.sign("k", b"node b"))
        ks.generate("k2", "ed25519", backend="vault")
    with strongroom.open(a) as ks:  # and the first node, which sees what b made
        assert ks.vault_control().unlock() == "threshold (alice, hsm)"
        ks.verify("k2", b"node a", ks.sign("k2", b"node a"))
    with psycopg.connect(url, autocommit=True) as pg:
        before = pg.execute("SELECT vault_id, slots FROM vault_headers").fetchall()
    monkeypatch.setenv(ALICE_ENV, "not alice's passphrase")
    with strongroom.open(b) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert list(err.value.failed) == ["alice"] and err.value.opened == [], err.value
    assert err.value.needed == 2 and "not tried: hsm" in str(err.value)  # 2 of 2: no use
    assert "not alice's passphrase" not in str(err.value)
    with psycopg.connect(url, autocommit=True) as pg:
        assert pg.execute("SELECT vault_id, slots FROM vault_headers").fetchall() == before
