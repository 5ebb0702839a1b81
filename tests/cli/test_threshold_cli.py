"""The threshold commands through the real `strongroom` CLI, and recovery after every
hardware method is gone: this test's own swtpm is stopped and its state wiped, and its own
SoftHSM token directory is deleted, before K printed mnemonic shares open the vault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CliResult, run_cli, store_state
from pkcs11_support import ROOT
from tpm_support import Swtpm

HSM_PIN = "7531-thr-pin"
VAULT_PASS = "first vault passphrase"
NEW_PASS = "passphrase set after recovery"
SHARE_PASS = "shares passphrase"
DATA = b"signed before and after the hardware was lost"
POLICY, USAGE, AUTH = 8, 2, 4


def one_line_error(r: CliResult, code: int, *contains: str) -> str:
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}: {r.stderr!r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strongroom: "), r.stderr
    assert "Traceback" not in r.stderr
    for text in contains:
        assert text in lines[0], r.stderr
    return lines[0]


def ok(r: CliResult) -> CliResult:
    assert r.returncode == 0, r.stderr
    return r


def own_token(directory: Path) -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "softhsm-config" / "init-token.sh"), str(directory), "thr-cli"],
        env={**os.environ, "SOFTHSM_PIN": HSM_PIN, "SOFTHSM_SO_PIN": "so-pin-87654321"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.startswith("export SOFTHSM2_CONF=")
    return directory / "softhsm2.conf"


@pytest.fixture
def tpm(tmp_path: Path) -> Swtpm:
    t = Swtpm(tmp_path / "swtpm-state")
    t.start()
    yield t  # type: ignore[misc]
    t.stop()


def write_config(directory: Path, tpm: Swtpm) -> Path:
    """The vault (passphrase from $SR_THR_VP), this test's swtpm, and its own token."""
    config = directory / "strongroom.toml"
    config.write_text(
        f"""
[keystore]
data_dir = "{directory / "data"}"
order = ["vault"]

[backends.vault]
type = "vault"
passphrase = "env:SR_THR_VP"
kdf_memory_kib = 8192
kdf_iterations = 1

[backends.tpm]
type = "tpm"
tcti = "{tpm.tcti}"

[backends.hsm]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token = "thr-cli"
pin = "env:SR_THR_HSM_PIN"
""",
        encoding="utf-8",
    )
    return config


def test_lose_every_device_and_recover_with_printed_shares(tmp_path: Path, tpm: Swtpm) -> None:
    conf = own_token(tmp_path / "hsm")
    config = write_config(tmp_path, tpm)
    env: dict[str, str | None] = {
        "SOFTHSM2_CONF": str(conf),
        "SR_THR_HSM_PIN": HSM_PIN,
        "SR_THR_VP": VAULT_PASS,
        "SR_THR_SHARES": SHARE_PASS,
        "SR_THR_NEW": NEW_PASS,
    }

    def cli(*args: str, input: bytes = b"", **extra: str | None) -> CliResult:
        return run_cli(config, *args, input=input, env={**env, **extra})

    ok(cli("init"))
    ok(cli("key", "generate", "k", "--type", "ed25519"))
    ok(cli("key", "public", "k", "--out", str(tmp_path / "k.pem")))
    r = ok(
        cli(
            "vault", "enroll", "--threshold", "2", "passphrase", "tpm", "hsm",
            "--passphrase", "env:SR_THR_VP", "--exclusive",
        )
    )  # fmt: skip
    assert "enrolled threshold key slot" in r.stdout.decode()
    assert "2 of (passphrase, tpm, hsm)" in r.stdout.decode()
    shares_dir = tmp_path / "shares"
    r = ok(
        cli(
            "vault", "recovery-shares", "--threshold", "2", "--shares", "3",
            "--passphrase", "env:SR_THR_SHARES", "--out-dir", str(shares_dir),
        )
    )  # fmt: skip
    printed = r.stdout.decode().splitlines()
    assert len(printed) == 3 and all(len(m.split()) == 33 for m in printed)
    files = sorted(shares_dir.iterdir())
    assert [f.read_text().strip() for f in files] == printed
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert "any 2 open the vault" in r.stderr
    # everyday use: 2 of 3 (the passphrase and the TPM)
    r = ok(cli("--json", "vault", "unlock"))
    assert json.loads(r.stdout)["keys"] == 1
    assert "passphrase, tpm" in ok(cli("vault", "unlock")).stdout.decode()

    # one method alone does not open it; the error says which failed and how many more
    one_line_error(
        cli("key", "sign", "k", input=DATA, SR_THR_HSM_PIN="bad-pin", SR_THR_VP="wrong"),
        AUTH,
        "passphrase (wrong passphrase)",
        "hsm (",
        "opened: tpm",
        "1 more needed",
    )

    # every hardware method is lost: the TPM's state and the HSM token are gone
    tpm.stop()
    shutil.rmtree(tpm.state)
    shutil.rmtree(tmp_path / "hsm" / "tokens")
    (tmp_path / "hsm" / "tokens").mkdir()
    line = one_line_error(cli("key", "sign", "k", input=DATA), AUTH, "1 more needed")
    assert "tpm (" in line and "hsm (" in line and "opened: passphrase" in line
    assert VAULT_PASS not in line and HSM_PIN not in line

    # bad recoveries: one line each, and nothing changes
    cfg_path = tmp_path / "strongroom.toml"
    before = store_state(cfg_path)
    one_line_error(
        cli("vault", "recover", "--share-file", str(files[0]), "--passphrase", "env:SR_THR_SHARES"),
        USAGE,
        "too few recovery shares",
    )
    one_line_error(
        cli("vault", "recover", "--share-file", str(files[0]), "--share-file", str(files[2])),
        AUTH,
        "wrong recovery passphrase",
    )
    one_line_error(cli("vault", "recover", input=b"not a mnemonic at all\n"), USAGE)
    assert store_state(cfg_path) == before

    # two printed shares (typed back on stdin) open it, and a new passphrase is set
    typed = f"# share 3\n{printed[2]}\n\n{printed[0].upper()}\n".encode()
    r = ok(
        cli(
            "vault", "recover", "--passphrase", "env:SR_THR_SHARES",
            "--new-passphrase", "env:SR_THR_NEW", input=typed,
        )
    )  # fmt: skip
    out = r.stdout.decode()
    assert "vault opened with recovery shares" in out and "new vault passphrase enrolled" in out

    # the new passphrase opens the vault; the key still signs, and openssl agrees
    sig = ok(cli("key", "sign", "k", input=DATA, SR_THR_VP=NEW_PASS)).stdout
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "sig.bin").write_bytes(sig)
    v = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "k.pem", "-rawin",
         "-in", "data.bin", "-sigfile", "sig.bin"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert v.returncode == 0 and "Signature Verified Successfully" in v.stdout, v.stderr

    # the audit log records the commands, never a share
    audit = (tmp_path / "data" / "audit.jsonl").read_text()
    assert '"vault_recovery_shares"' in audit and '"vault_recover"' in audit
    assert not any(" ".join(m.split()[4:8]) in audit for m in printed)
    assert VAULT_PASS not in audit and NEW_PASS not in audit and SHARE_PASS not in audit

    # the dead threshold slot can go; the last way in (the new passphrase) cannot
    r = ok(cli("--json", "vault", "unlock", SR_THR_VP=NEW_PASS))
    slots = {s["method"]: s["id"] for s in json.loads(r.stdout)["slots"]}
    assert set(slots) == {"threshold", "recovery", "passphrase"}
    ok(cli("vault", "unenroll", slots["threshold"], SR_THR_VP=NEW_PASS))
    before = store_state(cfg_path)
    one_line_error(
        cli("vault", "unenroll", slots["passphrase"], SR_THR_VP=NEW_PASS),
        POLICY,
        "last way into the vault",
        "besides recovery shares",
    )
    assert store_state(cfg_path) == before


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    from conftest import write_vault_config

    config = write_vault_config(tmp_path)
    ok(run_cli(config, "init"))
    cfg_path = tmp_path / "strongroom.toml"
    before = store_state(cfg_path)
    for args, code, text in [
        (("vault", "enroll", "--threshold", "3", "passphrase:a", "passphrase:b"), USAGE, "1 to 2"),
        (("vault", "enroll", "--threshold", "1", "tpm"), USAGE, "no backend named 'tpm'"),
        (("vault", "enroll", "passphrase", "tpm"), USAGE, "give one METHOD"),
        (("vault", "enroll", "--exclusive", "passphrase"), USAGE, "threshold slots"),
        (("vault", "enroll", "--group", "tpm,hsm"), USAGE, "not a group"),
        (("vault", "enroll", "--threshold", "1", "a", "--pcrs", "7"), USAGE, "no backend named"),
        (
            ("vault", "enroll", "--threshold", "2", "passphrase:a", "passphrase:a"),
            USAGE,
            "appears twice",
        ),
        (("vault", "recovery-shares", "--threshold", "1", "--shares", "3"), USAGE, "threshold 1"),
        (("vault", "recovery-shares", "--threshold", "2", "--shares", "20"), USAGE, "1 to 16"),
        (("vault", "recover"), USAGE, "no recovery shares were given"),
        (("vault", "unlock", "--method", "recovery"), USAGE, "vault recover"),
    ]:
        one_line_error(run_cli(config, *args), code, text)
    # a vault without a recovery set says so
    one_line_error(
        run_cli(config, "vault", "recover", input=b"word " * 20),
        AUTH,
        "no recovery shares",
    )
    assert store_state(cfg_path) == before
    # without --exclusive the old passphrase slot still opens the vault alone: it says so
    r = ok(
        run_cli(
            config, "vault", "enroll", "--threshold", "1", "passphrase:dave",
            "--passphrase", "env:D", "--allow-weak", env={"D": "pd"},
        )
    )  # fmt: skip
    assert "(passphrase) still open the vault on their own" in r.stderr
    # a passphrase-only threshold slot, with named members and passphrases from the env
    r = ok(
        run_cli(
            config,
            "vault", "enroll", "--group", "2:passphrase:alice,passphrase:bob,passphrase:carol",
            "--passphrase", "env:A", "--passphrase", "env:B", "--passphrase", "env:C",
            "--exclusive", "--allow-weak",
            env={"A": "pa", "B": "pb", "C": "pc"},
        )
    )  # fmt: skip
    assert "2 of (alice, bob, carol)" in r.stdout.decode()
    members = {"STRONGROOM_PASSPHRASE_ALICE": "pa", "STRONGROOM_PASSPHRASE_CAROL": "pc"}
    assert (
        "threshold (alice, carol)"
        in ok(run_cli(config, "vault", "unlock", env=members)).stdout.decode()
    )
    one_line_error(
        run_cli(config, "vault", "unlock", env={"STRONGROOM_PASSPHRASE_ALICE": "pa"}),
        AUTH,
        "bob (",
        "1 more needed",
    )


def test_grouped_policy_enrolls_and_opens(tmp_path: Path, tpm: Swtpm) -> None:
    """`--group` twice: the TPM AND any 2 of (alice, the HSM, bob), through the CLI."""
    conf = own_token(tmp_path / "hsm")
    config = write_config(tmp_path, tpm)
    env: dict[str, str | None] = {
        "SOFTHSM2_CONF": str(conf),
        "SR_THR_HSM_PIN": HSM_PIN,
        "SR_THR_VP": VAULT_PASS,
        "A": "alice pass",
        "B": "bob pass",
    }

    def cli(*args: str, input: bytes = b"", **extra: str | None) -> CliResult:
        return run_cli(config, *args, input=input, env={**env, **extra})

    ok(cli("init"))
    ok(cli("key", "generate", "k", "--type", "ed25519"))
    r = ok(
        cli(
            "vault", "enroll", "--group", "1:tpm",
            "--group", "2:passphrase:alice,hsm,passphrase:bob",
            "--passphrase", "env:A", "--passphrase", "env:B", "--exclusive", "--allow-weak",
        )
    )  # fmt: skip
    assert "[tpm] AND [2 of (alice, hsm, bob)]" in r.stdout.decode()
    # the TPM, alice and the HSM (bob is away; the old vault passphrase no longer opens it)
    alice = {"STRONGROOM_PASSPHRASE_ALICE": "alice pass"}
    slots = json.loads(ok(cli("--json", "vault", "unlock", **alice)).stdout)["slots"]
    assert [(s["method"], s["policy"]) for s in slots] == [
        ("threshold", "[tpm] AND [2 of (alice, hsm, bob)]")
    ]
    r = ok(cli("vault", "unlock", **alice))
    assert "threshold (tpm, alice, hsm)" in r.stdout.decode()
    (tmp_path / "sig").write_bytes(ok(cli("key", "sign", "k", input=DATA, **alice)).stdout)
    ok(cli("key", "verify", "k", "--signature", str(tmp_path / "sig"), input=DATA, **alice))
    # the TPM and alice and bob: the HSM's PIN is wrong, still 2 of the officers
    r = ok(
        cli(
            "vault", "unlock", SR_THR_HSM_PIN="wrong-pin-9999",
            STRONGROOM_PASSPHRASE_BOB="bob pass", **alice,
        )
    )  # fmt: skip
    assert "threshold (tpm, alice, bob)" in r.stdout.decode()
    # one officer is not a quorum, whatever else works
    one_line_error(cli("vault", "unlock", SR_THR_HSM_PIN="wrong-pin-9999", **alice), AUTH, "hsm (")
    # every officer, but no TPM: refused, and the TPM group is named
    tpm.stop()
    line = one_line_error(
        cli("vault", "unlock", STRONGROOM_PASSPHRASE_BOB="bob pass", **alice), AUTH, "tpm ("
    )
    assert "alice pass" not in line and "bob pass" not in line and HSM_PIN not in line
