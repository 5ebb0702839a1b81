"""The PKCS#11 backend checked with tools nobody here wrote: OpenSC's pkcs11-tool on the same
SoftHSM2 token, and openssl on Strongroom's signatures. Plus the CLI: `key adopt`,
`vault enroll <hsm>`, and errors for a missing mechanism or module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, CliResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11_support import (
    PIN_ENV,
    SoftHsm,
    cli,
    config,
    ks,
    list_objects,
    pkcs11_tool,
    softhsm,
    write_config,
)

import strongroom
from strongroom.keystore import Keystore

__all__ = ["config", "ks", "softhsm"]

pytestmark = pytest.mark.skipif(
    shutil.which("pkcs11-tool") is None or shutil.which("openssl") is None,
    reason="needs pkcs11-tool (opensc) and openssl",
)

DATA = b"verified by tools that Strongroom did not write\n"


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


def assert_ok(r: CliResult) -> CliResult:
    assert r.returncode == 0, f"rc={r.returncode} stderr={r.stderr!r}"
    return r


def assert_one_line_error(r: CliResult, code: int, *contains: str) -> str:
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}: {r.stderr!r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strongroom: "), r.stderr
    for text in contains:
        assert text in lines[0], r.stderr
    return lines[0]


def objects_labelled(hsm: SoftHsm, label: str) -> dict[str, dict[str, str]]:
    """pkcs11-tool's view of the objects with this label, by kind (Private/Public/Secret)."""
    return {o["kind"].split()[0]: o for o in list_objects(hsm) if o.get("label") == label}


# -- pkcs11-tool -----------------------------------------------------------------------------------
def test_pkcs11_tool_sees_sensitive_unextractable_keys(ks: Keystore, softhsm: SoftHsm) -> None:
    ks.generate("tool-listed", "ecdsa-p256", backend="hsm")
    ks.generate("tool-exportable", "ecdsa-p256", backend="hsm", exportable=True)
    listed = objects_labelled(softhsm, "tool-listed")
    assert set(listed) == {"Private", "Public"}
    private = listed["Private"]
    assert private["kind"].startswith("Private Key Object; EC")
    access = [a.strip() for a in private["Access"].split(",")]
    assert "sensitive" in access and "never extractable" in access, access
    assert "extractable" not in access  # pkcs11-tool prints "extractable" only when it is
    assert private["ID"] == ks.info("tool-listed").handle.removeprefix("id:")
    assert "sign" in private["Usage"]
    assert listed["Public"]["EC_PARAMS"] == "06082a8648ce3d030107"  # P-256
    exportable = objects_labelled(softhsm, "tool-exportable")["Private"]["Access"]
    assert "extractable" in exportable and "never extractable" not in exportable


@pytest.mark.parametrize("signature_format", ["raw", "openssl"])
def test_pkcs11_tool_signature_verifies_in_strongroom(
    ks: Keystore, softhsm: SoftHsm, tmp_path: Path, signature_format: str
) -> None:
    name = f"tool-signer-{signature_format}"
    ks.generate(name, "ecdsa-p256", backend="hsm")
    key_id = ks.info(name).handle.removeprefix("id:")
    (tmp_path / "digest").write_bytes(hashlib.sha256(DATA).digest())
    args = ["--sign", "--mechanism", "ECDSA", "--id", key_id]
    args += ["--input-file", str(tmp_path / "digest"), "--output-file", str(tmp_path / "sig")]
    if signature_format == "openssl":
        args += ["--signature-format", "openssl"]
    out = pkcs11_tool(softhsm, *args)
    assert out.returncode == 0, out.stderr
    sig = (tmp_path / "sig").read_bytes()
    if signature_format == "raw":  # pkcs11-tool's default: r‖s, as CKM_ECDSA returns it
        assert len(sig) == 64
        sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    else:
        assert sig[0] == 0x30  # DER
    ks.verify(name, DATA, sig)


# -- openssl ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key_type", "algorithm", "command"),
    [
        ("ecdsa-p256", None, ["dgst", "-sha256"]),
        ("ecdsa-p384", None, ["dgst", "-sha384"]),
        ("rsa-2048", None, ["dgst", "-sha256"]),
        (
            "rsa-2048",
            "pss",
            ["dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"],
        ),
        ("ed25519", None, ["pkeyutl", "-rawin"]),
    ],
    ids=["p256", "p384", "rsa-pkcs1v15", "rsa-pss", "ed25519"],
)
def test_openssl_verifies_hsm_signatures(
    ks: Keystore, tmp_path: Path, key_type: str, algorithm: str | None, command: list[str]
) -> None:
    name = f"ossl-{key_type}-{algorithm}"
    ks.generate(name, key_type, backend="hsm")
    (tmp_path / "msg").write_bytes(DATA)
    (tmp_path / "sig").write_bytes(ks.sign(name, DATA, algorithm))
    (tmp_path / "pub.pem").write_bytes(
        strongroom.algorithms.encode_public(ks.public_key(name), "pem")
    )
    if command[0] == "pkeyutl":
        args = [
            *command,
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-in",
            "msg",
            "-sigfile",
            "sig",
        ]
    else:
        args = [*command, "-verify", "pub.pem", "-signature", "sig", "msg"]
    out = openssl(*args, cwd=tmp_path)
    assert out.returncode == 0 and "Verified" in out.stdout + out.stderr, out
    (tmp_path / "msg").write_bytes(DATA + b"tampered")
    assert openssl(*args, cwd=tmp_path).returncode != 0


# -- key adopt -------------------------------------------------------------------------------------
def test_adopt_a_key_made_by_pkcs11_tool(config: Path, softhsm: SoftHsm, tmp_path: Path) -> None:
    made = pkcs11_tool(
        softhsm,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "made-by-opensc",
        "--id",
        "a1b2c3",
        "--usage-sign",
    )
    assert made.returncode == 0, made.stderr
    before = objects_labelled(softhsm, "made-by-opensc")
    r = assert_ok(
        cli(
            config,
            softhsm,
            "--json",
            "key",
            "adopt",
            "opensc-key",
            "--backend",
            "hsm",
            "--label",
            "made-by-opensc",
        )
    )
    info = json.loads(r.stdout)
    assert info["type"] == "ecdsa-p256" and info["backend"] == "hsm"
    assert set(info["usage"]) == {"sign", "verify"}
    assert info["attributes"]["adopted"] == "true" and info["attributes"]["id"] == "a1b2c3"
    sig = assert_ok(cli(config, softhsm, "key", "sign", "opensc-key", input=DATA)).stdout
    pub = assert_ok(cli(config, softhsm, "key", "public", "opensc-key")).stdout
    (tmp_path / "sig").write_bytes(sig)
    (tmp_path / "pub.pem").write_bytes(pub)
    (tmp_path / "msg").write_bytes(DATA)
    out = openssl("dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", "msg", cwd=tmp_path)
    assert out.returncode == 0, out
    # The same key cannot be registered twice, by label or by id.
    again = cli(config, softhsm, "key", "adopt", "twice", "--backend", "hsm", "--id", "a1b2c3")
    assert_one_line_error(again, 2, "already registered as 'opensc-key'")
    # Usage can narrow what the token allows, never widen it; the type is checked.
    wrong = cli(
        config,
        softhsm,
        "key",
        "adopt",
        "x",
        "--backend",
        "hsm",
        "--id",
        "a1b2c3",
        "--type",
        "ecdsa-p384",
    )
    assert_one_line_error(wrong, 2, "is a ecdsa-p256 key")
    # Deleting an adopted key forgets it; the token keeps it.
    assert_ok(cli(config, softhsm, "key", "delete", "opensc-key"))
    assert objects_labelled(softhsm, "made-by-opensc") == before
    missing = cli(config, softhsm, "key", "adopt", "x", "--backend", "hsm", "--label", "no-such")
    assert_one_line_error(missing, 2, "no private or secret key with label 'no-such'")
    usage = cli(config, softhsm, "key", "adopt", "x", "--backend", "hsm")
    assert_one_line_error(usage, 2, "--label")


def test_adopt_by_id_an_rsa_key_and_narrow_its_usage(
    config: Path, softhsm: SoftHsm, tmp_path: Path
) -> None:
    made = pkcs11_tool(
        softhsm,
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "opensc-rsa",
        "--id",
        "0badc0de",
    )
    assert made.returncode == 0, made.stderr
    with strongroom.open(config) as ks:
        info = ks.adopt("rsa-adopted", "hsm", {"id": "0BADC0DE"}, usage="sign")
        assert info.type.value == "rsa-2048" and {u.value for u in info.usage} == {"sign"}
        sig = ks.sign("rsa-adopted", DATA, algorithm="pss")
        public = ks.public_key("rsa-adopted")
    (tmp_path / "sig").write_bytes(sig)
    (tmp_path / "pub.pem").write_bytes(strongroom.algorithms.encode_public(public, "pem"))
    (tmp_path / "msg").write_bytes(DATA)
    out = openssl(
        "dgst",
        "-sha256",
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:32",
        "-verify",
        "pub.pem",
        "-signature",
        "sig",
        "msg",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out


# -- the vault key slot, through the CLI -----------------------------------------------------------
def test_vault_enroll_hsm_and_open_with_it_alone(tmp_path: Path, softhsm: SoftHsm) -> None:
    cfg = write_config(tmp_path, softhsm, unlock='["hsm", "passphrase"]')
    assert_ok(cli(cfg, softhsm, "key", "generate", "vk", "--type", "ed25519", "--backend", "vault"))
    slot = json.loads(assert_ok(cli(cfg, softhsm, "--json", "vault", "enroll", "hsm")).stdout)
    assert slot["method"] == "hsm"
    status = json.loads(assert_ok(cli(cfg, softhsm, "--json", "vault", "status")).stdout)
    assert status["exists"]
    # The sealing key on the token: AES, sensitive, never extractable.
    seal_keys = [
        o for o in list_objects(softhsm) if o.get("label", "").startswith("strongroom-seal")
    ]
    assert seal_keys and all("never extractable" in o["Access"] for o in seal_keys)
    # With the passphrase gone, only the HSM (and its PIN) opens the vault.
    no_pass = {VAULT_PASS_ENV: None}
    sig = assert_ok(cli(cfg, softhsm, "key", "sign", "vk", input=DATA, env=no_pass)).stdout
    assert len(sig) == 64
    unlocked = assert_ok(cli(cfg, softhsm, "vault", "unlock", "--method", "hsm", env=no_pass))
    assert "vault unlocked with hsm" in unlocked.stdout.decode()
    # A wrong HSM PIN fails cleanly: one line, exit 4, no PIN in it.
    bad = {VAULT_PASS_ENV: None, PIN_ENV: "31337-wrong"}
    line = assert_one_line_error(
        cli(cfg, softhsm, "vault", "unlock", "--method", "hsm", env=bad), 4, "wrong PIN"
    )
    assert "31337-wrong" not in line and softhsm.pin not in line
    r = cli(cfg, softhsm, "key", "sign", "vk", input=DATA, env=bad)
    line = assert_one_line_error(r, 4)
    assert "31337-wrong" not in line and r.stdout == b""


# -- errors through the CLI ------------------------------------------------------------------------
def test_missing_mechanism_is_unsupported_by_name(
    config: Path, softhsm: SoftHsm, tmp_path: Path
) -> None:
    assert_ok(
        cli(config, softhsm, "key", "generate", "rsa-k", "--type", "rsa-2048", "--backend", "hsm")
    )
    # The same token, with SoftHSM told to hide mechanisms. (SoftHSM 2.6.1 skips the first
    # name after "-", hence the repeat.)
    restricted = tmp_path / "restricted.conf"
    restricted.write_text(
        softhsm.conf.read_text().replace(
            "slots.mechanisms = ALL",
            "slots.mechanisms = -CKM_RSA_PKCS_PSS,CKM_RSA_PKCS_PSS,CKM_EC_EDWARDS_KEY_PAIR_GEN",
        )
    )
    env = {"SOFTHSM2_CONF": str(restricted)}
    r = cli(config, softhsm, "key", "sign", "rsa-k", "--algorithm", "pss", input=DATA, env=env)
    assert_one_line_error(r, 5, "'hsm'", "sign with rsa-2048", "CKM_RSA_PKCS_PSS")
    r = cli(
        config, softhsm, "key", "generate", "e", "--type", "ed25519", "--backend", "hsm", env=env
    )
    assert_one_line_error(r, 5, "'hsm'", "generate with ed25519", "CKM_EC_EDWARDS_KEY_PAIR_GEN")
    assert_ok(cli(config, softhsm, "key", "sign", "rsa-k", input=DATA, env=env))  # v1.5 still works


def test_missing_module_through_the_cli(tmp_path: Path, softhsm: SoftHsm) -> None:
    cfg = write_config(tmp_path, softhsm, module="/opt/none/libsofthsm2.so")
    r = cli(cfg, softhsm, "key", "generate", "k", "--type", "ecdsa-p256", "--backend", "hsm")
    assert_one_line_error(
        r, 6, "libsofthsm2.so not found at /opt/none/libsofthsm2.so", "install softhsm2"
    )
    table = assert_ok(cli(cfg, softhsm, "backends")).stdout.decode()
    assert "unavailable" in table and "install softhsm2" in table


def test_openssl_encrypts_and_the_token_decrypts_rsa_oaep(ks: Keystore, tmp_path: Path) -> None:
    # openssl's OAEP default is SHA-1 with MGF1-SHA-1: what SoftHSM2's CKM_RSA_PKCS_OAEP takes.
    ks.generate("oaep-tool", "rsa-2048", backend="hsm", usage="encrypt,decrypt")
    pem = tmp_path / "oaep.pem"
    pem.write_bytes(
        ks.public_key("oaep-tool").public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "plain").write_bytes(b"sealed by openssl")
    r = openssl(
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "oaep.pem", "-in", "plain", "-out", "ct",
        "-pkeyopt", "rsa_padding_mode:oaep", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ct = (tmp_path / "ct").read_bytes()
    assert ks.decrypt("oaep-tool", ct, algorithm="oaep-sha1") == b"sealed by openssl"
