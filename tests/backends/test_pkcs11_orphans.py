"""A key left in a PKCS#11 token by a crash between making it and writing its catalog row
(docs/storage.md): `strongroom doctor` reports it, `doctor --repair` removes it after
confirmation, and keys another program or another keystore made on the same token are
never listed."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from pkcs11_support import PIN_ENV, SoftHsm, cli, list_objects, pkcs11_tool, softhsm, write_config

import strongroom
from strongroom.catalog import Catalog

__all__ = ["softhsm"]
DATA = b"orphan test"


def crash_after_the_key(config: Path, name: str) -> None:
    """Generate `name` in the HSM in a child that is killed when the catalog row is due."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ks = strongroom.open(config)

            def killed(*_: object) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            ks.catalog.add = killed  # type: ignore[method-assign]
            ks.generate(name, "ecdsa-p256", backend="hsm")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def labels(hsm: SoftHsm) -> list[str]:
    return sorted(o.get("label", "") for o in list_objects(hsm) if "Private Key" in o["kind"])


def test_doctor_finds_and_repairs_a_key_a_crash_left_in_the_token(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    mine = tmp_path / "mine"
    other = tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    config = write_config(mine, softhsm)
    other_config = write_config(other, softhsm)  # another keystore, the same token
    with strongroom.open(config) as ks:
        ks.generate("orph-kept", "ecdsa-p256", backend="hsm")
    with strongroom.open(other_config) as ks:
        ks.generate("orph-theirs", "ecdsa-p256", backend="hsm")
    foreign = pkcs11_tool(
        softhsm, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "0a0b", "--label",
        "orph-foreign",
    )  # fmt: skip
    assert foreign.returncode == 0, foreign.stderr
    crash_after_the_key(config, "orph-lost")
    assert {"orph-kept", "orph-theirs", "orph-foreign", "orph-lost"} <= set(labels(softhsm))

    with strongroom.open(config) as ks:
        orphans, unsearched = ks.orphans()
        assert unsearched == []
        assert [o.backend for o in orphans] == ["hsm"]
        assert "orph-lost" in orphans[0].description
        with pytest.raises(strongroom.KeyNotFound):
            ks.info("orph-lost")
    with strongroom.open(other_config) as ks:
        assert ks.orphans() == ([], [])  # the other keystore's keys are its own

    r = cli(config, softhsm, "--json", "doctor")
    assert r.returncode != 0
    found = [c for c in json.loads(r.stdout) if c["check"] == "orphan key"]
    assert len(found) == 1 and found[0]["status"] == "problem"
    assert "orph-lost" in found[0]["detail"] and "--repair" in found[0]["detail"]

    r = cli(config, softhsm, "doctor", "--repair", input=b"n\n")  # declined: nothing goes
    assert r.returncode != 0 and "orph-lost" in r.stderr
    assert "orph-lost" in labels(softhsm)
    r = cli(config, softhsm, "doctor", "--repair", input=b"y\n")
    assert b"removed" in r.stdout, r.stderr
    assert "orph-lost" not in labels(softhsm)
    assert {"orph-kept", "orph-theirs", "orph-foreign"} <= set(labels(softhsm))
    with strongroom.open(config) as ks:
        assert ks.orphans() == ([], [])
        ks.verify("orph-kept", DATA, ks.sign("orph-kept", DATA))
    r = cli(config, softhsm, "--json", "doctor")
    assert not [c for c in json.loads(r.stdout) if c["check"] == "orphan key"]


def test_repair_refuses_a_key_it_did_not_create(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    config = write_config(tmp_path, softhsm)
    with strongroom.open(config) as ks:
        ks.generate("orph-mine", "ecdsa-p256", backend="hsm")
        hsm = ks.backend("hsm")
        for handle in ("id:0a0b", "label:orph-foreign", "id:zz"):
            with pytest.raises(strongroom.InvalidArgument):
                hsm.remove_owned(handle)  # type: ignore[attr-defined]
        assert Catalog(tmp_path / "data" / "catalog.sqlite").store_id == ks.catalog.store_id
        assert ks.info("orph-mine").handle.startswith("id:" + b"srkey\x01".hex())


def test_a_delete_cut_short_is_never_served_half_deleted(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the adversarial run (issue 16, defect 4): a kill between destroying the
    token's key and removing its catalog rows left a key that was listed, answered "no key
    named" when used, and could be rotated back into service."""
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    config = write_config(tmp_path, softhsm)
    with strongroom.open(config) as ks:
        ks.generate("half", "ecdsa-p256", backend="hsm")
        ks.rotate("half")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ks = strongroom.open(config)

            def killed(*_: object) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            ks.catalog.remove = killed  # type: ignore[method-assign]
            ks.delete("half")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert "half" not in labels(softhsm)  # the token's keys went, both versions
    with strongroom.open(config) as ks:
        (info,) = [k for k in ks.keys() if k.name == "half"]
        assert info.delete_after is not None  # listed as due for deletion, not as usable
        with pytest.raises(strongroom.KeyNotFound):
            ks.rotate("half")  # finishes the deletion instead of a new version
        assert "half" not in {k.name for k in ks.keys()}
        assert ks.orphans() == ([], [])
