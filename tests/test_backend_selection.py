"""No silent downgrade to software (issue 13, point 4), against SoftHSM2 and swtpm.

A hardware backend in `order` that is unavailable stops `generate`/`import` with
BackendUnavailable naming it and its reason, unless it is `optional = true`, when it is
skipped with a warning and an audit record. A key type the hardware cannot hold (Ed25519
on a TPM) still goes to the vault, and the result says so. A vault key slot whose hardware
fails before another method opens the vault is named in a warning and in the audit log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm
from pkcs11_support import cli as hsm_cli
from pkcs11_support import write_config as hsm_config
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, swtpm
from tpm_support import VAULT_PASS as TPM_VAULT_PASS
from tpm_support import VAULT_PASS_ENV as TPM_VAULT_PASS_ENV
from tpm_support import write_config as tpm_config

import strongroom
from strongroom.errors import BackendUnavailable, ConfigError, KeyNotFound

__all__ = ["softhsm", "swtpm"]  # the session fixtures, imported so pytest finds them

UNAVAILABLE = 6  # docs/cli.md: backend unavailable
MISSING_MODULE = "/nonexistent/softhsm/libsofthsm2.so"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, softhsm: SoftHsm) -> None:
    monkeypatch.setenv(HSM_PIN_ENV, softhsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    monkeypatch.setenv(TPM_PIN_ENV, TEST_PIN)
    monkeypatch.setenv(TPM_VAULT_PASS_ENV, TPM_VAULT_PASS)


@pytest.fixture
def own_swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A swtpm of this test's own, so the test can stop it (the session's one stays up)."""
    tpm = Swtpm(tmp_path / "own-tpm")
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


def audit_records(config: Path) -> list[dict[str, object]]:
    lines = (config.parent / "data" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_no_key_made(config: Path, name: str) -> None:
    with strongroom.open(config) as ks:
        with pytest.raises(KeyNotFound):
            ks.info(name)
        assert ks.keys() == []


# -- an unavailable backend stops generate ---------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "token", "says"),
    [
        (MISSING_MODULE, None, f"libsofthsm2.so not found at {MISSING_MODULE}"),
        (None, "no-such-token", "no token labelled 'no-such-token'"),
    ],
    ids=["wrong-module-path", "missing-token-label"],
)
def test_unavailable_hsm_stops_generate_and_import(
    tmp_path: Path, softhsm: SoftHsm, module: str | None, token: str | None, says: str
) -> None:
    cfg = hsm_config(tmp_path, softhsm, module=module, token=token)
    with strongroom.open(cfg) as ks:
        with pytest.raises(BackendUnavailable) as err:
            ks.generate("k", "ecdsa-p256")
        assert err.value.backend == "hsm"
        assert says in err.value.reason
        assert "optional = true" in str(err.value)  # and how to let `order` skip it
        with pytest.raises(BackendUnavailable) as err:
            ks.import_key("imported", "aes-256", bytearray(32))
        assert err.value.backend == "hsm"
    assert_no_key_made(cfg, "k")
    records = [r for r in audit_records(cfg) if r["op"] == "generate"]
    assert records[-1]["result"] == "BackendUnavailable"
    assert softhsm.pin not in (tmp_path / "data" / "audit.jsonl").read_text()


def test_cli_generate_with_unavailable_hsm_is_one_line_and_exit_6(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    cfg = hsm_config(tmp_path, softhsm, module=MISSING_MODULE)
    r = hsm_cli(cfg, softhsm, "key", "generate", "k", "--type", "ecdsa-p256")
    assert r.returncode == UNAVAILABLE, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strongroom: error: backend 'hsm'"), r.stderr
    assert "install softhsm2" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == b""
    assert softhsm.pin not in r.stderr
    assert_no_key_made(cfg, "k")


def test_stopped_swtpm_stops_generate(tmp_path: Path, own_swtpm: Swtpm) -> None:
    cfg = tpm_config(tmp_path, own_swtpm.tcti, persistent=False)
    with strongroom.open(cfg) as ks:
        assert ks.generate("while-up", "ecdsa-p256").backend == "tpm"
    port = own_swtpm.port
    own_swtpm.stop()
    with strongroom.open(cfg) as ks:
        with pytest.raises(BackendUnavailable) as err:
            ks.generate("while-down", "ecdsa-p256")
        assert err.value.backend == "tpm"
        assert "cannot reach the TPM" in err.value.reason and str(port) in err.value.reason
        # Ed25519 would not have gone to the TPM anyway, but a configured TPM that is down
        # is not passed over in silence for any type: the vault still takes it when named
        with pytest.raises(BackendUnavailable):
            ks.generate("ed-while-down", "ed25519")
        assert ks.generate("ed-named", "ed25519", backend="vault").backend == "vault"
        assert [k.name for k in ks.keys()] == ["ed-named", "while-up"]
    r = run_cli(
        cfg,
        "key",
        "generate",
        "x",
        "--type",
        "ecdsa-p256",
        env={TPM_VAULT_PASS_ENV: TPM_VAULT_PASS, TPM_PIN_ENV: TEST_PIN},
    )
    assert r.returncode == UNAVAILABLE, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "backend 'tpm' is unavailable" in r.stderr


# -- optional = true -------------------------------------------------------------------------------
def test_optional_hsm_is_skipped_with_a_warning_and_an_audit_record(
    tmp_path: Path, softhsm: SoftHsm, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = hsm_config(tmp_path, softhsm, module=MISSING_MODULE, hsm_extra="optional = true")
    with caplog.at_level(logging.WARNING, logger="strongroom"):
        with strongroom.open(cfg) as ks:
            assert ks.generate("k", "ecdsa-p256").backend == "vault"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "optional backend 'hsm' is unavailable and was skipped" in warnings[0]
    assert "'k'" in warnings[0] and "install softhsm2" in warnings[0]
    skipped = [r for r in audit_records(cfg) if r["op"] == "backend_skipped"]
    assert len(skipped) == 1
    rec = skipped[0]
    assert (rec["key"], rec["backend"], rec["result"]) == ("k", "hsm", "skipped")
    assert (rec["during"], rec["type"]) == ("generate", "ecdsa-p256")
    assert "libsofthsm2.so not found" in str(rec["reason"])
    assert softhsm.pin not in json.dumps(rec)
    # the CLI says it on stderr and still succeeds
    r = hsm_cli(cfg, softhsm, "key", "generate", "k2", "--type", "ecdsa-p256")
    assert r.returncode == 0, r.stderr
    assert b"in vault" in r.stdout
    assert "optional backend 'hsm' is unavailable and was skipped" in r.stderr
    assert softhsm.pin not in r.stderr


def test_optional_swtpm_stopped_is_skipped(
    tmp_path: Path, own_swtpm: Swtpm, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tpm_config(tmp_path, own_swtpm.tcti, persistent=False, tpm_extra="optional = true\n")
    own_swtpm.stop()
    with caplog.at_level(logging.WARNING, logger="strongroom"):
        with strongroom.open(cfg) as ks:
            assert ks.generate("k", "ecdsa-p256").backend == "vault"
    assert "optional backend 'tpm' is unavailable and was skipped" in caplog.text
    (rec,) = [r for r in audit_records(cfg) if r["op"] == "backend_skipped"]
    assert rec["backend"] == "tpm" and "cannot reach the TPM" in str(rec["reason"])


def test_an_available_optional_backend_is_used(tmp_path: Path, softhsm: SoftHsm) -> None:
    cfg = hsm_config(tmp_path, softhsm, hsm_extra="optional = true")
    with strongroom.open(cfg) as ks:
        info = ks.generate("on-token", "ecdsa-p256")
        assert info.backend == "hsm"
        ks.delete("on-token")
    assert not [r for r in audit_records(cfg) if r["op"] == "backend_skipped"]


def test_optional_must_be_a_boolean_and_not_on_the_vault(tmp_path: Path, softhsm: SoftHsm) -> None:
    cfg = hsm_config(tmp_path, softhsm, hsm_extra='optional = "yes"')
    with pytest.raises(ConfigError) as err:
        strongroom.open(cfg)
    assert "backends.hsm.optional" in str(err.value) and "true or false" in str(err.value)
    text = hsm_config(tmp_path, softhsm).read_text()
    bad = tmp_path / "vault-optional.toml"
    bad.write_text(text.replace('type = "vault"', 'type = "vault"\noptional = true'))
    with pytest.raises(ConfigError, match="cannot be optional"):
        strongroom.open(bad)


# -- a type the hardware cannot hold still goes to the vault ---------------------------------------
def test_ed25519_on_a_tpm_goes_to_the_vault_and_says_so(tmp_path: Path, swtpm: Swtpm) -> None:
    cfg = tpm_config(tmp_path, swtpm.tcti)
    with strongroom.open(cfg) as ks:
        assert ks.generate("ed", "ed25519").backend == "vault"
        assert ks.generate("ec", "ecdsa-p256").backend == "tpm"
        ks.delete("ec")
    r = run_cli(
        cfg,
        "key",
        "generate",
        "ed-cli",
        "--type",
        "ed25519",
        env={TPM_VAULT_PASS_ENV: TPM_VAULT_PASS, TPM_PIN_ENV: TEST_PIN},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "generated ed25519 key 'ed-cli' in vault"
    assert "warning" not in r.stderr  # not a downgrade: the TPM cannot hold Ed25519
    assert not [x for x in audit_records(cfg) if x["op"] == "backend_skipped"]


# -- an unlock whose hardware slot fails says so ---------------------------------------------------
def test_unlock_after_a_failed_tpm_slot_names_it(
    tmp_path: Path, own_swtpm: Swtpm, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tpm_config(tmp_path, own_swtpm.tcti, persistent=False, unlock=("tpm", "passphrase"))
    with strongroom.open(cfg) as ks:
        vault = ks.vault_control()
        vault.initialize()
        ks.generate("in-vault", "ed25519", backend="vault")
        slot_id = vault.enroll("tpm", {})["id"]
    own_swtpm.stop()
    with caplog.at_level(logging.WARNING, logger="strongroom"):
        with strongroom.open(cfg) as ks:
            ks.sign("in-vault", b"opened by the passphrase")  # first use: an implicit unlock
            vault = ks.vault_control()
            vault.lock()
            assert vault.unlock() == "passphrase"  # an explicit one
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    for w in warnings:
        assert f"vault key slot {slot_id} (tpm) failed" in w
        assert "cannot reach the TPM" in w and "opened with passphrase" in w
    unlocks = [r for r in audit_records(cfg) if r["op"] == "vault_unlock" and r["result"] == "ok"]
    assert len(unlocks) == 2  # the implicit unlock gets a record because a slot failed
    for rec in unlocks:
        failed = str(rec["failed_slots"])
        assert failed.startswith(f"tpm (slot {slot_id}): BackendUnavailable: ")
        assert "cannot reach the TPM" in failed
        assert TPM_VAULT_PASS not in json.dumps(rec)


def test_unlock_after_a_failed_hsm_slot_names_it(
    tmp_path: Path, softhsm: SoftHsm, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = hsm_config(tmp_path, softhsm, unlock='["hsm", "passphrase"]')
    with strongroom.open(cfg) as ks:
        ks.generate("in-vault", "ed25519", backend="vault")
        slot_id = ks.vault_control().enroll("hsm", {})["id"]
    with strongroom.open(cfg) as ks:  # the HSM slot opens it: nothing to report
        ks.sign("in-vault", b"by the token")
        assert ks.vault_control().vault_status()["unlock_failures"] == []
    gone = hsm_config(
        tmp_path, softhsm, token="token-gone", unlock='["hsm", "passphrase"]', name="gone.toml"
    )
    with caplog.at_level(logging.WARNING, logger="strongroom"):
        with strongroom.open(gone) as ks:
            ks.sign("in-vault", b"by the passphrase")
            (failure,) = ks.vault_control().vault_status()["unlock_failures"]
    assert failure["method"] == "hsm" and failure["slots"] == [slot_id]
    assert failure["error"] == "BackendUnavailable"
    assert "no token labelled 'token-gone'" in failure["reason"]
    assert f"vault key slot {slot_id} (hsm) failed" in caplog.text
    (rec,) = [r for r in audit_records(gone) if r.get("failed_slots")]
    assert rec["op"] == "vault_unlock" and "no token labelled 'token-gone'" in str(
        rec["failed_slots"]
    )
    # the CLI: the warning on stderr, the command's own output unchanged
    r = hsm_cli(gone, softhsm, "key", "sign", "in-vault", input=b"by the CLI")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 64  # the Ed25519 signature
    assert f"vault key slot {slot_id} (hsm) failed" in r.stderr
    assert softhsm.pin not in r.stderr and VAULT_PASSPHRASE not in r.stderr
