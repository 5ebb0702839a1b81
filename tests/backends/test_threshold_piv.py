"""A PIV card as one member of a threshold vault slot, through the real PC/SC stack
(pyscard → pcscd → vpcd → tests/emulators/piv_card.py), with a passphrase and the SoftHSM token.

The card seals its SLIP-39 share to its 9D key (ECDH + HKDF, backends/piv/sealer.py); it
fails the way a card fails: a wrong PIN (the card counts it), the card pulled out of the
reader, another card in its place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pcsc_support
import pytest
from conftest import store_sql, store_state
from piv_card import DEFAULT_PIN, PivCard
from piv_support import (
    PIV_PIN_ENV,
    PIV_VAULT_PASS,
    PIV_VAULT_PASS_ENV,
    PivReader,
    piv_reader,
    reader,
    write_piv_config,
)
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm

import strongroom
from strongroom.cli import exit_code_of
from strongroom.errors import AuthenticationFailed, ThresholdNotMet
from strongroom.keystore import Keystore
from strongroom.threshold import Member, Policy

__all__ = ["piv_reader", "reader", "softhsm"]  # fixtures, imported so pytest finds them

_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

DATA = b"opened with a smart card in the quorum"
WRONG_PIN = "918273"


@pytest.fixture
def config(
    tmp_path: Path, reader: PivReader, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The vault (its passphrase is the passphrase member), the card, and the HSM."""
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, PIV_VAULT_PASS)
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    monkeypatch.setenv(HSM_PIN_ENV, softhsm.pin)
    hsm = (
        "\n[backends.hsm]\n"
        'type = "pkcs11"\n'
        f'module = "{softhsm.module}"\n'
        f'token = "{softhsm.label}"\n'
        f'pin = "env:{HSM_PIN_ENV}"\n'
    )
    return write_piv_config(tmp_path / "ks", reader.name, piv_extra=hsm, order='["vault"]')


def slots_in_store(config: Path) -> list[dict[str, Any]]:
    ((slots,),) = store_sql(config, "SELECT slots FROM vault_headers")
    return list(json.loads(str(slots)))


def unlock(config: Path) -> tuple[Keystore, str]:
    ks = strongroom.open(config)
    try:
        return ks, ks.vault_control().unlock()
    except BaseException:
        ks.close()
        raise


def refused(config: Path) -> ThresholdNotMet:
    before = store_state(config)
    with strongroom.open(config) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert store_state(config) == before  # failing to open never writes
    message = str(err.value)
    assert "\n" not in message and "2 of (passphrase, piv, hsm)" in message
    assert DEFAULT_PIN not in message and WRONG_PIN not in message
    return err.value


def test_piv_card_as_a_threshold_member(
    config: Path, reader: PivReader, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 of (passphrase, PIV card, HSM): opens with the card and the passphrase; a wrong PIN
    or a missing card counts as that member failing, and the error names it."""
    with strongroom.open(config) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("quorum-key", "ed25519", backend="vault")
        slot = vault.enroll_threshold(
            Policy.of(
                2,
                [
                    Member("passphrase", options={"passphrase": PIV_VAULT_PASS}),
                    Member("piv", options={"pin": True}),
                    "hsm",
                ],
            ),
            exclusive=True,
        )
        assert slot["policy"] == "2 of (passphrase, piv, hsm)"
        assert [s["method"] for s in vault.vault_status()["slots"]] == ["threshold"]
        public = ks.public_key("quorum-key")
    assert 0x9D in reader.card.state.keys  # the card's share is sealed to its 9D key
    (piv_member,) = [
        m for m in slots_in_store(config)[0]["groups"][0]["members"] if m["method"] == "piv"
    ]
    assert piv_member["params"]["slot"] == "9d", piv_member

    def signs(ks: Keystore) -> None:
        public.verify(ks.sign("quorum-key", DATA), DATA)  # type: ignore[union-attr]

    # card + passphrase: the HSM is not asked
    ks, used = unlock(config)
    with ks:
        assert used == "threshold (passphrase, piv)"
        signs(ks)
    assert reader.card.pin_tries == 3

    # a wrong PIN: the card refuses (and counts it); passphrase + HSM still open it
    monkeypatch.setenv(PIV_PIN_ENV, WRONG_PIN)
    ks, used = unlock(config)
    with ks:
        assert used == "threshold (passphrase, hsm)"
        signs(ks)
    assert reader.card.pin_tries == 2

    # a wrong PIN and a wrong passphrase: refused, naming both; the HSM alone cannot help
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, "not the passphrase")
    err = refused(config)
    assert isinstance(err, AuthenticationFailed) and exit_code_of(type(err)) == 4
    assert sorted(err.failed) == ["passphrase", "piv"] and err.opened == []
    assert err.failed["piv"] == "the PIV card refused the PIN (1 tries left)"
    assert "piv (" in str(err) and "not tried: hsm" in str(err)
    assert reader.card.pin_tries == 1
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, PIV_VAULT_PASS)
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    ks, used = unlock(config)  # the right PIN again: the card's counter is reset
    ks.close()
    assert used == "threshold (passphrase, piv)" and reader.card.pin_tries == 3

    # the card is pulled out and the HSM's PIN is wrong: refused, naming the card
    card = reader.card
    reader.remove()
    monkeypatch.setenv(HSM_PIN_ENV, "wrong-pin-3333")
    err = refused(config)
    assert sorted(err.failed) == ["hsm", "piv"] and err.opened == ["passphrase"]
    assert err.needed == 1 and "1 more needed" in str(err) and "piv (" in str(err)
    assert "unavailable: no PIV card" in err.failed["piv"], err.failed

    # another card in the reader is not the member either
    reader.insert(PivCard())
    err = refused(config)
    assert "not the card" in err.failed["piv"], err.failed
    reader.remove()

    # the card back in: card + passphrase open the vault again
    reader.insert(card)
    ks, used = unlock(config)
    with ks:
        assert used == "threshold (passphrase, piv)"
        signs(ks)
