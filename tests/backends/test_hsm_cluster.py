"""One vault in a shared PostgreSQL store opened through one HSM that every node reaches
(issue 21 point 2, docs/cluster.md): a key slot sealed by the shared SoftHSM2 token,
enrolled once, opens the vault on every node, with no passphrase on the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE
from pkcs11_support import PIN_ENV, SoftHsm, softhsm, write_config

import strongroom

__all__ = ["softhsm"]  # the session fixture, imported so pytest finds it


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
