"""No encryption that cannot be decrypted (issue 13, point 5): the capability-driven matrix
of tests/encrypt_matrix.py against the vault, SoftHSM2, swtpm and the software FIDO2
authenticator; and the CLI on SoftHSM2's RSA keys, whose OAEP takes SHA-1 only.

PIV is in test_encrypt_matrix_piv.py (it needs the machine's one pcscd).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE
from encrypt_matrix import MatrixResult, encrypting_types, run_matrix
from fido_authenticator import (
    FIDO_PIN_ENV,
    FIDO_VAULT_PASS_ENV,
    SoftAuthenticator,
    open_with_authenticator,
    write_fido_config,
)
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm
from pkcs11_support import cli as hsm_cli
from pkcs11_support import write_config as hsm_config
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, swtpm

import strongroom
from strongroom import algorithms
from strongroom.errors import UnsupportedOperation
from strongroom.keystore import Keystore

__all__ = ["softhsm", "swtpm"]  # the session fixtures, imported so pytest finds them

UNSUPPORTED = 5  # docs/cli.md exit codes


def _config(directory: Path, hsm: SoftHsm, tcti: str) -> Path:
    """The vault, the session's SoftHSM2 token and the session's swtpm in one keystore."""
    path = directory / "strongroom.toml"
    path.write_text(
        f"""
[keystore]
data_dir = "{directory / "data"}"
order = ["hsm", "tpm", "vault"]

[backends.vault]
type = "vault"
passphrase = "env:{VAULT_PASS_ENV}"
kdf_memory_kib = 8192
kdf_iterations = 1

[backends.hsm]
type = "pkcs11"
module = "{hsm.module}"
token = "{hsm.label}"
pin = "env:{HSM_PIN_ENV}"

[backends.tpm]
type = "tpm"
tcti = "{tcti}"
pin = "env:{TPM_PIN_ENV}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def ks(
    tmp_path: Path, softhsm: SoftHsm, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Keystore]:
    monkeypatch.setenv(HSM_PIN_ENV, softhsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    monkeypatch.setenv(TPM_PIN_ENV, TEST_PIN)
    with strongroom.open(_config(tmp_path, softhsm, swtpm.tcti)) as keystore:
        yield keystore


def _assert_clean(result: MatrixResult) -> None:
    assert not result.failures, "\n".join(result.failures)


# The types the issue names; the matrix itself comes from the capabilities, these only make
# sure it is not empty because a capability went missing.
EXPECTED = {
    "vault": {"aes-256", "chacha20-poly1305", "rsa-2048", "rsa-3072", "rsa-4096"},
    "hsm": {"aes-256", "rsa-2048", "rsa-3072", "rsa-4096"},
    "tpm": {"rsa-2048"},
}


@pytest.mark.parametrize("backend", ["vault", "hsm", "tpm"])
def test_every_listed_encryption_decrypts(ks: Keystore, backend: str) -> None:
    listed = {t.value for t in encrypting_types(ks, backend)}
    assert EXPECTED[backend] <= listed, f"{backend} lists {sorted(listed)}"
    result = run_matrix(ks, backend)
    _assert_clean(result)
    assert result.types_passed(backend) == listed  # every listed type round-tripped
    for t in listed:  # and every type worked as an envelope KEK with its default
        assert f"{backend} {t} envelope default" in result.passed
    if backend in ("vault", "hsm"):  # AES-CBC-PAD (KMIP's MongoDB delegated mode)
        assert f"{backend} aes-256 key aes-cbc-pad" in result.passed
    if backend == "hsm":  # SoftHSM2: OAEP decrypts with SHA-1 only, so SHA-256 is refused
        assert "hsm rsa-2048 key oaep-sha1" in result.passed
        assert "hsm rsa-2048 key oaep-sha256" in result.refused
    if backend == "tpm":  # TPM2_RSA_Decrypt is called with SHA-256 only
        assert "tpm rsa-2048 key oaep-sha256" in result.passed
        assert "tpm rsa-2048 key oaep-sha1" in result.refused
    if backend == "vault":
        assert "vault rsa-2048 key oaep-sha1" in result.passed
        assert "vault rsa-2048 key oaep-sha256" in result.passed


def test_fido_derived_keys_decrypt_what_they_encrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, "fido matrix vault passphrase")
    monkeypatch.setenv(FIDO_PIN_ENV, "unused-no-pin-set")
    authenticator = SoftAuthenticator(tmp_path / "soft.json")
    with open_with_authenticator(authenticator, write_fido_config(tmp_path / "ks")) as ks:
        listed = {t.value for t in encrypting_types(ks, "fido")}
        assert "aes-256" in listed
        result = run_matrix(ks, "fido")
        _assert_clean(result)
        assert result.types_passed("fido") == listed


def test_softhsm_rsa_key_records_the_oaep_its_token_decrypts(ks: Keystore) -> None:
    info = ks.generate("box", "rsa-2048", backend="hsm", usage="encrypt,decrypt")
    assert info.attributes[algorithms.RSA_ENCRYPT_ATTRIBUTE] == "oaep-sha1"
    assert ks.info("box").attributes[algorithms.RSA_ENCRYPT_ATTRIBUTE] == "oaep-sha1"
    vault = ks.generate("vbox", "rsa-2048", backend="vault", usage="encrypt,decrypt")
    assert vault.attributes[algorithms.RSA_ENCRYPT_ATTRIBUTE] == "oaep-sha256"
    signer = ks.generate("signer", "rsa-2048", backend="hsm")  # no encrypt usage: nothing
    assert algorithms.RSA_ENCRYPT_ATTRIBUTE not in signer.attributes
    # a rotation to another backend records that backend's variant for the new version
    rotated = ks.rotate("box", backend="vault")
    assert rotated.attributes[algorithms.RSA_ENCRYPT_ATTRIBUTE] == "oaep-sha256"
    old = ks.encrypt("vbox", b"x")  # (a vault key: any variant decrypts)
    assert ks.decrypt("vbox", old) == b"x"
    for name in ("box", "vbox", "signer"):
        ks.delete(name)


def test_tpm_rsa_key_refuses_oaep_sha1_at_encrypt(ks: Keystore) -> None:
    ks.generate("tbox", "rsa-2048", backend="tpm", usage="encrypt,decrypt")
    with pytest.raises(UnsupportedOperation) as err:
        ks.encrypt("tbox", b"to the TPM", algorithm="oaep-sha1")
    assert (err.value.backend, err.value.operation) == ("tpm", "encrypt")
    assert "decrypts only oaep-sha256" in str(err.value)
    assert ks.decrypt("tbox", ks.encrypt("tbox", b"to the TPM")) == b"to the TPM"
    ks.delete("tbox")


def test_cli_encrypt_to_a_softhsm_rsa_key_decrypts(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = hsm_config(tmp_path, softhsm)
    name = f"cli-box-{os.getpid()}"
    r = hsm_cli(
        cfg, softhsm, "key", "generate", name, "--type", "rsa-2048", "--usage", "encrypt,decrypt"
    )
    assert r.returncode == 0, r.stderr
    try:
        data = os.urandom(5000)
        (tmp_path / "plain").write_bytes(data)
        sealed = tmp_path / "sealed"
        r = hsm_cli(
            cfg, softhsm, "--json", "encrypt", "--key", name, "--in", str(tmp_path / "plain"),
            "--out", str(sealed),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert b'"algorithm": "oaep-sha1"' in r.stdout  # recorded in the header
        r = hsm_cli(cfg, softhsm, "decrypt", "--in", str(sealed))
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        r = hsm_cli(cfg, softhsm, "key", "encrypt", name, input=b"short secret")
        assert r.returncode == 0, r.stderr
        r = hsm_cli(cfg, softhsm, "key", "decrypt", name, input=r.stdout)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"short secret"
        # what the token could not decrypt is refused before anything is written
        r = hsm_cli(cfg, softhsm, "key", "encrypt", name, "--algorithm", "oaep-sha256", input=b"x")
        assert r.returncode == UNSUPPORTED, r.stderr
        assert r.stdout == b"" and len(r.stderr.splitlines()) == 1
        assert "decrypts only oaep-sha1" in r.stderr
        r = hsm_cli(
            cfg, softhsm, "encrypt", "--key", name, "--algorithm", "oaep-sha256",
            "--out", str(tmp_path / "never"), input=b"x",
        )  # fmt: skip
        assert r.returncode == UNSUPPORTED, r.stderr
        assert not (tmp_path / "never").exists()
    finally:
        hsm_cli(cfg, softhsm, "key", "delete", name)


def test_cli_encrypt_algorithm_choices_are_one_list() -> None:
    from click.testing import CliRunner

    from strongroom.cli import cli

    out = CliRunner().invoke(cli, ["encrypt", "--help"]).output
    assert "[" + "|".join(algorithms.KEK_ALGORITHMS) + "]" in out
    root = Path(__file__).resolve().parent.parent
    expected = "--algorithm " + "|".join(algorithms.KEK_ALGORITHMS) + "]"
    for doc in ("docs/cli.md", "docs/envelope.md"):
        text = (root / doc).read_text(encoding="utf-8")
        lines = [
            line
            for line in text.splitlines()
            if "strongroom encrypt --key" in line and "[--algorithm" in line
        ]
        assert lines and all(expected in line for line in lines), (doc, lines)
