"""Threshold (k-of-n) vault unlock against the real emulators, in-process.

The members are a passphrase, the TPM (swtpm via tpm2-pytss), the HSM (SoftHSM2 via
python-pkcs11) and a FIDO2 key (the software CTAP2 authenticator); each seals its SLIP-39
share itself. A method is made to fail the way it fails for real: the TPM's TCTI points at
a port where nothing listens, the HSM gets a wrong PIN, the passphrase is wrong, the
security key refuses the touch.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import store_sql, store_state
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fido_authenticator import Presence, SoftAuthenticator, open_with_authenticator
from pkcs11_support import SoftHsm, list_objects, softhsm
from shamir_mnemonic.share import Share
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, _free_port_pair, swtpm

import strongroom
from strongroom.cli import exit_code_of
from strongroom.errors import (
    AuthenticationFailed,
    InvalidArgument,
    PolicyViolation,
    SnapshotTampered,
    ThresholdNotMet,
)
from strongroom.keystore import Keystore, vault_restore
from strongroom.threshold import Group, Member, Policy

__all__ = ["softhsm", "swtpm"]  # session fixtures, imported so pytest finds them

PASS_ENV = "SR_THR_PASS"
PASS = "threshold vault passphrase"
HSM_PIN_ENV = "SR_THR_HSM_PIN"
FIDO_PIN_ENV = "SR_THR_FIDO_PIN"
ALICE_ENV = "STRONGROOM_PASSPHRASE_ALICE"
DATA = b"opened by a quorum"
VECTORS = Path(__file__).parent / "vectors"


def write_config(
    directory: Path, tpm: Swtpm, hsm: SoftHsm, *, tcti: str | None = None, fido: str = ""
) -> Path:
    """Vault + tpm + hsm (+ fido); `tcti` overrides the TPM's (a dead port: the TPM is gone)."""
    path = directory / "strongroom.toml"
    fido_table = (
        f'\n[backends.fido]\ntype = "fido"\ndevice = "{fido}"\npin = "env:{FIDO_PIN_ENV}"\n'
        "touch_timeout = 2\n"
        if fido
        else ""
    )
    path.write_text(
        f"""
[keystore]
data_dir = "{directory / "data"}"
order = ["vault"]

[backends.vault]
type = "vault"
passphrase = "env:{PASS_ENV}"
kdf_memory_kib = 8192
kdf_iterations = 1

[backends.tpm]
type = "tpm"
tcti = "{tcti or tpm.tcti}"
pin = "env:{TPM_PIN_ENV}"

[backends.hsm]
type = "pkcs11"
module = "{hsm.module}"
token = "{hsm.label}"
pin = "env:{HSM_PIN_ENV}"
{fido_table}""",
        encoding="utf-8",
    )
    return path


def dead_tcti() -> str:
    return f"swtpm:host=127.0.0.1,port={_free_port_pair()}"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, softhsm: SoftHsm) -> None:
    monkeypatch.setenv(PASS_ENV, PASS)
    monkeypatch.setenv(HSM_PIN_ENV, softhsm.pin)
    monkeypatch.setenv(TPM_PIN_ENV, TEST_PIN)
    monkeypatch.setenv(FIDO_PIN_ENV, "2468")


@pytest.fixture(autouse=True)
def _no_tpm_leftovers(swtpm: Swtpm) -> Iterator[None]:
    yield
    assert swtpm.transient_handles() == [], "a transient handle was not flushed"
    assert swtpm.lockout_counter() == 0, "a test left a dictionary-attack failure behind"


@pytest.fixture
def config(tmp_path: Path, swtpm: Swtpm, softhsm: SoftHsm) -> Path:
    return write_config(tmp_path, swtpm, softhsm)


def header(config: Path) -> dict[str, Any]:
    """The vault id and key slots, from the store's header row."""
    ((vault_id, slots),) = store_sql(config, "SELECT vault_id, slots FROM vault_headers")
    return {"vault_id": vault_id, "slots": json.loads(str(slots))}


def set_slots(config: Path, slots: list[dict[str, Any]]) -> None:
    """What an attacker with write access to the store does to the key slots."""
    text = json.dumps(slots, sort_keys=True, separators=(",", ":"))  # as the vault writes
    store_sql(config, "UPDATE vault_headers SET slots=?", text)


def open_vault(
    config: Path, opener: Callable[[Path], Keystore] = strongroom.open
) -> tuple[Keystore, str]:
    ks = opener(config)
    try:
        return ks, ks.vault_control().unlock()
    except BaseException:
        ks.close()
        raise


@pytest.fixture
def two_of_three(config: Path) -> tuple[Path, bytes]:
    """A vault that only passphrase + TPM + HSM, any 2 of 3, opens; and a signature in it."""
    with strongroom.open(config) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("quorum-key", "ed25519")
        slot = vault.enroll_threshold(
            Policy.of(2, [Member("passphrase", options={"passphrase": PASS}), "tpm", "hsm"]),
            exclusive=True,
        )
        assert slot["policy"] == "2 of (passphrase, tpm, hsm)"
        assert [s["method"] for s in vault.vault_status()["slots"]] == ["threshold"]
        public = ks.public_key("quorum-key")
    assert isinstance(public, Ed25519PublicKey)
    return config, public.public_bytes_raw()


def signs(ks: Keystore, public: bytes) -> None:
    Ed25519PublicKey.from_public_bytes(public).verify(ks.sign("quorum-key", DATA), DATA)


def test_two_of_three_opens_with_any_two(
    two_of_three: tuple[Path, bytes],
    swtpm: Swtpm,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, public = two_of_three
    # OpenSC's pkcs11-tool sees the HSM's share key: a secret key labelled for this slot
    slot = header(config)["slots"][0]  # type: ignore[index]
    vault_id = header(config)["vault_id"]
    label = f"strongroom-seal/strongroom-vault:{vault_id}:{slot['id']}:hsm"
    found = [o for o in list_objects(softhsm) if o.get("label") == label]
    assert len(found) == 1 and found[0]["kind"].startswith("Secret Key Object"), found
    # passphrase + TPM: the HSM is not even asked
    ks, used = open_vault(config)
    with ks:
        assert used == "threshold (passphrase, tpm)"
        signs(ks, public)
    # passphrase + HSM: the TPM is gone
    gone = write_config(config.parent, swtpm, softhsm, tcti=dead_tcti())
    ks, used = open_vault(gone)
    with ks:
        assert used == "threshold (passphrase, hsm)"
        signs(ks, public)
    # TPM + HSM: a wrong passphrase
    write_config(config.parent, swtpm, softhsm)
    monkeypatch.setenv(PASS_ENV, "not the passphrase")
    ks, used = open_vault(config)
    with ks:
        assert used == "threshold (tpm, hsm)"
        signs(ks, public)


@pytest.mark.parametrize(
    ("works", "broken"),
    [
        ("passphrase", ("tpm", "hsm")),
        ("tpm", ("passphrase", "hsm")),
        ("hsm", ("passphrase", "tpm")),
    ],
)
def test_two_of_three_fails_with_one_naming_the_failed(
    two_of_three: tuple[Path, bytes],
    swtpm: Swtpm,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
    works: str,
    broken: tuple[str, ...],
) -> None:
    config, _ = two_of_three
    before = store_state(config)
    if "passphrase" in broken:
        monkeypatch.setenv(PASS_ENV, "not the passphrase")
    if "hsm" in broken:
        monkeypatch.setenv(HSM_PIN_ENV, "wrong-pin-0000")
    tcti = dead_tcti() if "tpm" in broken else None
    cfg = write_config(config.parent, swtpm, softhsm, tcti=tcti)
    with strongroom.open(cfg) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    e = err.value
    assert isinstance(e, AuthenticationFailed) and exit_code_of(type(e)) == 4
    assert sorted(e.failed) == sorted(broken)
    message = str(e)
    if works == "hsm":  # tried last: once two have failed, it is not asked at all
        assert e.opened == [] and e.needed == 2 and "not tried: hsm" in message
    else:
        assert e.opened == [works] and e.needed == 1 and f"opened: {works}" in message
    assert "\n" not in message and f"{e.needed} more needed" in message and "2 of (" in message
    for name in broken:
        assert f"{name} (" in message
    assert "wrong passphrase" in message if "passphrase" in broken else True
    assert "unavailable" in message if "tpm" in broken else True
    assert "not the passphrase" not in message and "wrong-pin-0000" not in message
    assert store_state(config) == before  # failing to open never writes


def test_threshold_slot_is_bound_to_its_vault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot (or one share of it) moved into another vault does not open that vault."""
    from conftest import write_vault_config

    monkeypatch.setenv("SR_TEST_VAULT_PASS", PASS)
    monkeypatch.setenv(ALICE_ENV, "alice's passphrase")
    monkeypatch.setenv("STRONGROOM_PASSPHRASE_BOB", "bob's passphrase")
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = write_vault_config(tmp_path / name)
        configs.append(cfg)
        with strongroom.open(cfg) as ks:
            ks.vault_control().initialize()
            ks.vault_control().enroll_threshold(
                Policy.of(
                    2,
                    [
                        Member("passphrase", "alice", {"passphrase": "alice's passphrase"}),
                        Member("passphrase", "bob", {"passphrase": "bob's passphrase"}),
                    ],
                ),
                exclusive=True,
            )
    slot_a = header(configs[0])["slots"][0]
    slot_b = header(configs[1])["slots"][0]

    def rewrite(slots: list[dict[str, Any]]) -> None:
        set_slots(configs[1], slots)

    rewrite([slot_a])  # A's whole slot in B: each share's AAD names vault A
    with strongroom.open(configs[1]) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert "alice (wrong passphrase)" in str(err.value)
    moved = json.loads(json.dumps(slot_b))
    moved["groups"][0]["members"][1] = slot_a["groups"][0]["members"][1]  # bob's share of A
    rewrite([moved])
    with strongroom.open(configs[1]) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert err.value.opened == ["alice"] and list(err.value.failed) == ["bob"]
    changed = dict(slot_b, policy="1 of (alice, bob)")  # the slot's own AAD covers every field
    rewrite([changed])
    with strongroom.open(configs[1]) as ks, pytest.raises(SnapshotTampered, match="modified"):
        ks.vault_control().unlock()
    broken = json.loads(json.dumps(slot_b))
    del broken["groups"][0]["members"][0]["index"]
    rewrite([broken])
    with strongroom.open(configs[1]) as ks, pytest.raises(SnapshotTampered, match="malformed"):
        ks.vault_control().unlock()
    rewrite([slot_b])
    with strongroom.open(configs[1]) as ks:
        assert ks.vault_control().unlock() == "threshold (alice, bob)"


def test_one_of_two_opens_with_either(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threshold 1 everywhere: SLIP-39 passes the share itself through as the secret."""
    from conftest import write_vault_config

    monkeypatch.setenv("SR_TEST_VAULT_PASS", PASS)
    cfg = write_vault_config(tmp_path)
    with strongroom.open(cfg) as ks:
        ks.vault_control().initialize()
        ks.generate("k", "ed25519")
        ks.vault_control().enroll_threshold(
            Policy.of(
                1,
                [
                    Member("passphrase", "alice", {"passphrase": "pa"}),
                    Member("passphrase", "bob", {"passphrase": "pb"}),
                ],
            ),
            exclusive=True,
        )
    for env, used in (({ALICE_ENV: "pa"}, "alice"), ({"STRONGROOM_PASSPHRASE_BOB": "pb"}, "bob")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            ks, how = open_vault(cfg)
            with ks:
                assert how == f"threshold ({used})"
                ks.sign("k", DATA)


def test_enrollment_is_atomic_when_a_method_fails(
    config: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    with strongroom.open(config) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("k", "ed25519")
        slots = vault.vault_status()["slots"]
    before = store_state(config)
    monkeypatch.setenv(HSM_PIN_ENV, "wrong-pin-1111")  # the HSM refuses, after the TPM sealed
    with strongroom.open(config) as ks:
        vault = ks.vault_control()
        vault.unlock()
        with pytest.raises(AuthenticationFailed):
            vault.enroll_threshold(
                Policy.of(2, [Member("passphrase", options={"passphrase": "x"}), "tpm", "hsm"]),
                exclusive=True,
            )
        assert vault.vault_status()["slots"] == slots
        with pytest.raises(InvalidArgument, match="no backend named 'nosuch'"):
            vault.enroll_threshold(Policy.of(1, ["tpm", "nosuch"]))
        with pytest.raises(InvalidArgument, match="appears twice"):
            vault.enroll_threshold(Policy.of(1, ["tpm", "tpm"]))
        with pytest.raises(InvalidArgument, match="from 1 to 2"):
            vault.enroll_threshold(Policy.of(3, ["tpm", "hsm"]))
        ks.sign("k", DATA)
    assert store_state(config) == before  # nothing written: the same slots
    with strongroom.open(config) as ks:
        assert ks.vault_control().unlock() == "passphrase"


def test_refuses_to_remove_the_last_way_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import write_vault_config

    monkeypatch.setenv("SR_TEST_VAULT_PASS", PASS)
    cfg = write_vault_config(tmp_path)
    with strongroom.open(cfg) as ks:
        vault = ks.vault_control()
        vault.initialize()
        (first,) = [s["id"] for s in vault.vault_status()["slots"]]
        pol = Policy.of(1, [Member("passphrase", "alice", {"passphrase": "alice"})])
        thr = vault.enroll_threshold(pol)["id"]
        vault.recovery_shares(2, 3)
        vault.unenroll(first)  # the threshold slot is still a way in
        before = store_state(cfg)
        with pytest.raises(PolicyViolation, match="last way into the vault") as err:
            vault.unenroll(thr)
        assert "besides recovery shares" in str(err.value) and thr in str(err.value)
        assert store_state(cfg) == before
        assert [s["method"] for s in vault.vault_status()["slots"]] == ["threshold", "recovery"]
        vault.enroll("passphrase", {"passphrase": "new"})
        vault.unenroll(thr)  # now allowed: the new passphrase slot is a way in


def test_groups_the_tpm_and_two_of_three_officers(
    tmp_path: Path,
    swtpm: Swtpm,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "The TPM AND any 2 of 3 officers" (alice's passphrase, the HSM, a FIDO2 key)."""
    auth = SoftAuthenticator(tmp_path / "fido.json")

    def with_officer(config: Path) -> Keystore:
        return open_with_authenticator(auth, config)

    cfg = write_config(tmp_path, swtpm, softhsm, fido="auto")
    policy = Policy(
        2,
        (
            Group(1, (Member("tpm"),)),
            Group(
                2,
                (
                    Member("passphrase", "alice", {"passphrase": "alice pass"}),
                    Member("hsm"),
                    Member("fido"),
                ),
            ),
        ),
    )
    with with_officer(cfg) as ks:
        ks.vault_control().initialize()
        ks.generate("k", "ed25519")
        slot = ks.vault_control().enroll_threshold(policy, exclusive=True)
    assert slot["policy"] == "[tpm] AND [2 of (alice, hsm, fido)]"
    monkeypatch.setenv(ALICE_ENV, "alice pass")
    monkeypatch.setenv(HSM_PIN_ENV, "wrong-pin-2222")  # one officer away: still 2 of 3
    ks, used = open_vault(cfg, with_officer)
    with ks:
        assert used == "threshold (tpm, alice, fido)"
        ks.sign("k", DATA)
    # every officer present but no TPM: refused, and it says the TPM group is missing
    monkeypatch.setenv(HSM_PIN_ENV, softhsm.pin)
    no_tpm = write_config(tmp_path, swtpm, softhsm, tcti=dead_tcti(), fido="auto")
    touches = auth.touch_requests
    with with_officer(no_tpm) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert list(err.value.failed) == ["tpm"] and err.value.needed == 3  # the TPM + 2 officers
    assert "not tried: alice, hsm, fido" in str(err.value)  # no touch for nothing
    assert auth.touch_requests == touches
    # the officers' quorum fails: alice wrong and the key refuses the touch
    write_config(tmp_path, swtpm, softhsm, fido="auto")
    monkeypatch.setenv(ALICE_ENV, "wrong")
    auth.presence = lambda command: Presence.REFUSE
    with with_officer(cfg) as ks, pytest.raises(ThresholdNotMet) as err:
        ks.vault_control().unlock()
    assert err.value.opened == ["tpm", "hsm"] and err.value.needed == 1
    assert sorted(err.value.failed) == ["alice", "fido"]


def test_recovery_shares_open_the_vault_and_replace_the_old_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import write_vault_config

    monkeypatch.setenv("SR_TEST_VAULT_PASS", PASS)
    cfg = write_vault_config(tmp_path)
    with strongroom.open(cfg) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("k", "ed25519")
        public = ks.public_key("k")
        (old,) = vault.recovery_shares(2, 3, passphrase="share pass")
        (new,) = vault.recovery_shares(3, 5, passphrase="share pass")
        assert len(new) == 5 and all(len(m.split()) == 33 for m in new)
        slots = [s for s in vault.vault_status()["slots"] if s["method"] == "recovery"]
        assert len(slots) == 1 and slots[0]["policy"] == "recovery shares: 3 of 5"
    # A single SLIP-39 word can be a header field name ("method", "salt"); what must not be on
    # disk is a share: a run of its words, or its value in hex or base64.
    on_disk = json.dumps(header(cfg))
    for mnemonic in new:
        words = mnemonic.split()
        value = Share.from_mnemonic(mnemonic).value
        assert not any(" ".join(words[i : i + 3]) in on_disk for i in range(len(words) - 2))
        assert value.hex() not in on_disk
        assert base64.b64encode(value).decode().rstrip("=") not in on_disk
    monkeypatch.setenv("SR_TEST_VAULT_PASS", "forgotten")
    with strongroom.open(cfg) as ks:
        vault = ks.vault_control()
        with pytest.raises(AuthenticationFailed, match="replaced by a newer set"):
            vault.recover(old[:2], "share pass")
        with pytest.raises(InvalidArgument, match="too few recovery shares"):
            vault.recover(new[:2], "share pass")
        with pytest.raises(AuthenticationFailed, match="wrong recovery passphrase"):
            vault.recover(new[1:4], "other pass")
        assert vault.recover([new[4], new[0], new[2]], "share pass") == slots[0]["id"]
        public.verify(ks.sign("k", DATA), DATA)  # type: ignore[union-attr]
        # groups of shares (Python API): 2 of 3 family members AND the 1 lawyer
        family, lawyer = vault.recovery_shares(0, 0, groups=[(2, 3), (1, 1)], group_threshold=2)
        assert len(family) == 3 and len(lawyer) == 1
        (slot,) = [s for s in vault.vault_status()["slots"] if s["method"] == "recovery"]
        assert slot["policy"] == "recovery shares: 2 of 2 groups"
        vault.lock()
        with pytest.raises(InvalidArgument, match=r"2 complete group\(s\) needed, 1 given"):
            vault.recover(family[:2])
        assert vault.recover([family[2], lawyer[0], family[0]]) == slot["id"]
        ks.sign("k", DATA)


def test_a_format_1_backup_still_restores_and_takes_a_threshold_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/vectors/vault-v1.snapshot was written by Strongroom before this change
    (commit 2d00b6d); it holds an Ed25519 key imported from the bytes 0..31."""
    from conftest import write_vault_config

    monkeypatch.setenv("SR_TEST_VAULT_PASS", "an old vault, made by Strongroom before format 2")
    cfg = write_vault_config(tmp_path)
    backup = tmp_path / "old.snapshot"
    shutil.copy(VECTORS / "vault-v1.snapshot", backup)
    assert backup.read_bytes()[8:10] == b"\x00\x01"
    with strongroom.open(cfg) as ks:
        report = vault_restore(ks, backup)
        assert report["added"] == ["old-signer"]
        sig = ks.sign("old-signer", b"made before threshold slots")
        assert sig.hex().startswith("4b1939cbcb773b91")  # Ed25519 is deterministic
        vault = ks.vault_control()
        thr = vault.enroll_threshold(
            Policy.of(1, [Member("passphrase", "alice", {"passphrase": "a"})])
        )["id"]
        vault.unenroll(thr)
        vault.backup(tmp_path / "new.snapshot")  # a backup is written in format 3
        assert (tmp_path / "new.snapshot").read_bytes()[8:10] == b"\x00\x03"
    # the key material is known, so the public key is too
    Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().verify(
        sig, b"made before threshold slots"
    )
