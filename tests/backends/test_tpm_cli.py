"""The TPM backend through the `strongroom` command, checked with tools nobody here wrote:
openssl verifies its signatures, tpm2-tools sees its storage key. Also the swtpm scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliResult, run_cli
from tpm_support import (
    PIN_ENV,
    SRK_HANDLE,
    TEST_PIN,
    VAULT_PASS,
    VAULT_PASS_ENV,
    Swtpm,
    swtpm,
    write_config,
)

import strongroom

REPO = Path(__file__).resolve().parents[2]
ENV = {PIN_ENV: TEST_PIN, VAULT_PASS_ENV: VAULT_PASS}


__all__ = ["swtpm"]  # the session fixture, imported so pytest finds it


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(autouse=True)
def _no_leftovers(swtpm: Swtpm) -> Iterator[None]:
    """Every CLI process flushed its handles, and no test left a DA failure behind."""
    yield
    assert swtpm.transient_handles() == []
    assert swtpm.lockout_counter() == 0


@pytest.fixture
def config(tmp_path: Path, swtpm: Swtpm) -> Path:
    return write_config(tmp_path, swtpm.tcti, unlock=("tpm", "passphrase"))


def cli(config: Path | None, *args: str, **kwargs: object) -> CliResult:
    return run_cli(config, *args, env=ENV, **kwargs)  # type: ignore[arg-type]


def ok(result: CliResult) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


def openssl_verify(public: Path, data: Path, signature: Path, *options: str) -> None:
    digest = "-sha384" if "p384" in public.name else "-sha256"
    proc = subprocess.run(
        ["openssl", "dgst", digest, *options, "-verify", str(public), "-signature",
         str(signature), str(data)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "Verified OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_verifies_tpm_signatures(config: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"verified by openssl, signed by the TPM" * 50)
    ok(cli(config, "key", "generate", "p256", "--type", "ecdsa-p256", "--backend", "tpm"))
    ok(cli(config, "key", "sign", "p256", "--in", str(data), "--out", str(tmp_path / "p256.sig")))
    with strongroom.open(config) as ks:
        ks.generate("p384", "ecdsa-p384", backend="tpm")
        ks.generate("rsa", "rsa-2048", backend="tpm")
        payload = data.read_bytes()
        (tmp_path / "p384.sig").write_bytes(ks.sign("p384", payload))
        (tmp_path / "rsa.sig").write_bytes(ks.sign("rsa", payload))
        (tmp_path / "rsa-pss.sig").write_bytes(ks.sign("rsa", payload, "pss"))
        assert {k.backend for k in ks.keys()} == {"tpm"}
    for name in ("p256", "p384", "rsa"):
        pem = tmp_path / f"{name}.pem"
        ok(cli(config, "key", "public", name, "--format", "pem", "--out", str(pem)))
        openssl_verify(pem, data, tmp_path / f"{name}.sig")
    openssl_verify(
        tmp_path / "rsa.pem", data, tmp_path / "rsa-pss.sig",
        "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest",
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("tpm2_getcap") is None, reason="tpm2-tools is not installed")
def test_tpm2_tools_see_the_persistent_storage_key(config: Path, swtpm: Swtpm) -> None:
    backends = json.loads(ok(cli(config, "--json", "backends")))
    tpm = next(b for b in backends if b["name"] == "tpm")
    assert tpm["available"] and "ecdsa-p256" in tpm["capabilities"]
    name = tpm["details"]["storage_key_name"]
    env = swtpm.tools_env()
    handles = subprocess.run(
        ["tpm2_getcap", "handles-persistent"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"0x{SRK_HANDLE:x}" in handles.lower()
    public = subprocess.run(
        ["tpm2_readpublic", "-c", f"0x{SRK_HANDLE:x}"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert re.search(rf"^name: {name}$", public, re.M), public
    assert "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt" in public
    assert re.search(r"curve-id:\s+value: NIST p256", public), public
    text = ok(cli(config, "backends")).decode()
    assert re.search(r"^tpm\s+tpm\s+available\s+.*ecdsa-p256", text, re.M), text


def test_attest_and_verify_on_the_command_line(config: Path, tmp_path: Path) -> None:
    ok(cli(config, "key", "generate", "device-id", "--type", "ecdsa-p256", "--backend", "tpm"))
    nonce = os.urandom(16).hex()
    statement = tmp_path / "statement.json"
    ok(cli(config, "key", "attest", "device-id", "--nonce", nonce, "--out", str(statement)))
    body = json.loads(statement.read_text())
    ak = tmp_path / "ak.pem"
    ak.write_text(body["attestation_key"]["public_key"])
    public = tmp_path / "device-id.pem"
    ok(cli(config, "key", "public", "device-id", "--out", str(public)))
    # The relying party needs no config and no TPM.
    verify = ("attest", "verify", "--in", str(statement), "--nonce", nonce)
    out = ok(cli(None, *verify, "--ak", str(ak), "--public", str(public))).decode()
    assert "attestation valid" in out and "NOT" not in out
    facts = json.loads(ok(cli(None, "--json", *verify)))
    assert facts["valid"] and not facts["attestation_key_trusted"]

    body["key"]["name"] = "renamed is fine"  # not covered by the signature, and not trusted
    body["nonce"] = os.urandom(16).hex()
    statement.write_text(json.dumps(body))
    bad = cli(None, *verify)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "nonce" in bad.stderr, bad.stderr


def test_vault_enroll_tpm_with_pcrs(config: Path, swtpm: Swtpm) -> None:
    swtpm.pcr_reset(16)
    ok(cli(config, "init"))
    enrolled = json.loads(ok(cli(config, "--json", "vault", "enroll", "tpm", "--pcrs", "16")))
    assert enrolled["method"] == "tpm"
    assert b"with tpm" in ok(cli(config, "vault", "unlock"))
    usage = cli(config, "vault", "enroll", "passphrase", "--pcrs", "16")
    assert usage.returncode == 2 and "for sealing backends" in usage.stderr
    swtpm.pcr_extend(16)
    try:
        refused = cli(config, "vault", "unlock", "--method", "tpm")
        assert refused.returncode == 4, refused.stderr
        assert "PCR 16" in refused.stderr and refused.stderr.count("\n") == 1
        assert b"with passphrase" in ok(cli(config, "vault", "unlock"))
    finally:
        swtpm.pcr_reset(16)
    assert b"with tpm" in ok(cli(config, "vault", "unlock"))


def test_swtpm_scripts(tmp_path: Path) -> None:
    """swtpm/start.sh and stop.sh: a free port, the state dir, TPM2_Shutdown before stop."""
    state = tmp_path / "state"
    started = subprocess.run(
        ["bash", str(REPO / "swtpm" / "start.sh"), str(state)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    tcti = (state / "tcti").read_text().strip()
    assert f"export TPM2TOOLS_TCTI={tcti}" in started.stdout
    pid = int((state / "swtpm.pid").read_text())
    try:
        env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+none"}
        fixed = subprocess.run(
            ["tpm2_getcap", "properties-fixed"], env=env, capture_output=True, text=True
        )
        assert fixed.returncode == 0 and "TPM2_PT_MANUFACTURER" in fixed.stdout
    finally:
        stopped = subprocess.run(
            ["bash", str(REPO / "swtpm" / "stop.sh"), str(state)],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
    assert "shutdown: tpm2_shutdown" in stopped.stderr
    assert not (state / "swtpm.pid").exists()
    assert (
        not Path(f"/proc/{pid}/cmdline").exists()
        or b"swtpm" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
