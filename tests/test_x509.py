"""Keys as `cryptography` private keys, and certificates made and kept with them (issue 17).

The proof is code nobody here wrote: cryptography's X.509 builders sign CSRs and
certificates with keys in the vault, SoftHSM2 (PKCS#11) and swtpm (TPM); the `openssl`
binary checks them (`req -verify`, `verify -CAfile`); PyJWT signs tokens and verifies them
with the public key. PIV is in tests/backends/test_piv_x509.py (it needs the machine's
one pcscd); the service in tests/service/test_server.py.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, openssl, run_cli, write_vault_config
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, pkcs11_tool, softhsm
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, swtpm

import strongroom
from strongroom import pkey
from strongroom.audit import read_records
from strongroom.catalog import SCHEMA_VERSION, Catalog
from strongroom.errors import (
    CertificateMismatch,
    InvalidArgument,
    KeyDisabled,
    PolicyViolation,
    UnsupportedOperation,
)
from strongroom.keystore import Keystore
from strongroom.types import KeyInfo, KeyType

__all__ = ["softhsm", "swtpm"]  # the session fixtures, imported so pytest finds them


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


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Keystore]:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    with strongroom.open(write_vault_config(tmp_path)) as keystore:
        yield keystore


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _hash(key_type: KeyType) -> Any:
    if key_type is KeyType.ED25519:
        return None
    return hashes.SHA384() if key_type is KeyType.ECDSA_P384 else hashes.SHA256()


def _csr(ks: Keystore, name: str) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(name))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(f"{name}.example")]), critical=False
    )
    return builder.sign(ks.private_key(name), _hash(ks.info(name).type))


def _certificate(
    ks: Keystore,
    name: str,
    issuer: str | None = None,
    issuer_cert: x509.Certificate | None = None,
    ca: bool = False,
) -> x509.Certificate:
    """cryptography's CertificateBuilder, signed by `issuer` (default: `name` itself)."""
    now = datetime.datetime.now(datetime.UTC)
    signer = issuer or name
    issuer_name = _name(name) if issuer_cert is None else issuer_cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer_name)
        .public_key(ks.private_key(name).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
    return builder.sign(ks.private_key(signer), _hash(ks.info(signer).type))


def _pem(
    tmp_path: Path, filename: str, obj: x509.Certificate | x509.CertificateSigningRequest
) -> str:
    (tmp_path / filename).write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return filename


# -- 1. the private key object ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key_type", "abc", "size"),
    [
        ("ecdsa-p256", ec.EllipticCurvePrivateKey, 256),
        ("ecdsa-p384", ec.EllipticCurvePrivateKey, 384),
        ("secp256k1", ec.EllipticCurvePrivateKey, 256),
        ("rsa-2048", rsa.RSAPrivateKey, 2048),
        ("ed25519", ed25519.Ed25519PrivateKey, None),
    ],
)
def test_private_key_is_the_cryptography_type(
    vault: Keystore, key_type: str, abc: type, size: int | None
) -> None:
    vault.generate("k", key_type)
    key = vault.private_key("k")
    assert isinstance(key, abc)
    others = {ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey} - {abc}
    assert not any(isinstance(key, o) for o in others)
    if size is not None:
        assert key.key_size == size  # type: ignore[union-attr]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == vault.public_key("k").public_bytes(der, spki)
    assert "k" in repr(key) and key_type in repr(key)
    with pytest.raises(UnsupportedOperation, match="stays in its backend"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_what_cannot_be_a_private_key_is_refused(vault: Keystore) -> None:
    vault.generate("aes", "aes-256")
    vault.generate("x", "x25519")
    with pytest.raises(InvalidArgument, match="no private key half"):
        vault.private_key("aes")
    with pytest.raises(UnsupportedOperation, match="X25519 key only agrees"):
        vault.private_key("x")


class _FidoOnly:
    """The one call `pkey.private_key` makes before it picks a class: `info` (a unit test
    of that function; the FIDO backend itself is tested in tests/backends/test_fido.py)."""

    def info(self, name: str) -> KeyInfo:
        return KeyInfo(name=name, type=KeyType.FIDO_ES256, backend="fido", usage=frozenset())


def test_a_fido_credential_is_refused() -> None:
    with pytest.raises(UnsupportedOperation, match="WebAuthn assertions") as e:
        pkey.private_key(_FidoOnly(), "cred")  # type: ignore[arg-type]
    assert e.value.backend == "fido" and e.value.operation == "private_key"


def test_the_rest_of_the_private_half_stays_inside(vault: Keystore) -> None:
    vault.generate("ec", "ecdsa-p256")
    vault.generate("ed", "ed25519")
    vault.generate("rsa", "rsa-2048")
    ec_key = vault.private_key("ec")
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    with pytest.raises(UnsupportedOperation, match="stays in its backend"):
        ec_key.private_numbers()
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(PolicyViolation):  # a sign-only key does not agree
        ec_key.exchange(ec.ECDH(), peer)
    ed_key = vault.private_key("ed")
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    with pytest.raises(UnsupportedOperation, match="stays in its backend"):
        ed_key.private_bytes_raw()
    rsa_key = vault.private_key("rsa")
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    with pytest.raises(UnsupportedOperation, match="stays in its backend"):
        rsa_key.private_numbers()


def test_ecdsa_signatures_are_der_and_refuse_what_the_keystore_does_not_do(
    vault: Keystore,
) -> None:
    vault.generate("p256", "ecdsa-p256")
    key = vault.private_key("p256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = key.public_key()
    sig = key.sign(b"message", ec.ECDSA(hashes.SHA256()))
    public.verify(sig, b"message", ec.ECDSA(hashes.SHA256()))  # DER, as cryptography's own
    with pytest.raises(InvalidSignature):
        public.verify(sig, b"other message", ec.ECDSA(hashes.SHA256()))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"message")
    d = digest.finalize()
    sig = key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256())))
    public.verify(sig, b"message", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(UnsupportedOperation, match="sign with sha256, not sha384"):
        key.sign(b"message", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(UnsupportedOperation, match="RFC 6979"):
        key.sign(b"message", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def test_rsa_padding_maps_to_the_keystore_algorithms(vault: Keystore) -> None:
    vault.generate("rsa", "rsa-2048", usage="sign,verify,encrypt,decrypt")
    key = vault.private_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey)
    public = key.public_key()
    sha = hashes.SHA256()
    pss = padding.PSS(mgf=padding.MGF1(sha), salt_length=padding.PSS.DIGEST_LENGTH)
    public.verify(key.sign(b"m", padding.PKCS1v15(), sha), b"m", padding.PKCS1v15(), sha)
    public.verify(key.sign(b"m", pss, sha), b"m", pss, sha)
    salt_32 = padding.PSS(mgf=padding.MGF1(sha), salt_length=32)
    public.verify(key.sign(b"m", salt_32, sha), b"m", pss, sha)
    sha512 = hashes.SHA512()  # PKCS#1 v1.5 with SHA-512 is the keystore's pkcs1v15-sha512
    public.verify(key.sign(b"m", padding.PKCS1v15(), sha512), b"m", padding.PKCS1v15(), sha512)
    with pytest.raises(UnsupportedOperation, match="PSS is supported"):
        key.sign(b"m", padding.PSS(mgf=padding.MGF1(sha512), salt_length=64), sha512)
    with pytest.raises(UnsupportedOperation, match="sign with sha256, not sha384"):
        key.sign(b"m", padding.PKCS1v15(), hashes.SHA384())
    with pytest.raises(UnsupportedOperation, match="PSS is supported"):
        key.sign(b"m", padding.PSS(mgf=padding.MGF1(sha), salt_length=padding.PSS.MAX_LENGTH), sha)
    with pytest.raises(UnsupportedOperation, match="PSS is supported"):
        key.sign(b"m", padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=32), sha)
    for variant in (sha, hashes.SHA1()):
        oaep = padding.OAEP(mgf=padding.MGF1(variant), algorithm=variant, label=None)
        assert key.decrypt(public.encrypt(b"secret", oaep), oaep) == b"secret"
    with pytest.raises(UnsupportedOperation, match="OAEP"):
        key.decrypt(public.encrypt(b"secret", padding.PKCS1v15()), padding.PKCS1v15())
    labelled = padding.OAEP(mgf=padding.MGF1(sha), algorithm=sha, label=b"label")
    with pytest.raises(UnsupportedOperation, match="no label"):
        key.decrypt(public.encrypt(b"secret", labelled), labelled)


def test_calls_go_through_the_keystore_usage_state_and_audit(vault: Keystore) -> None:
    vault.generate("verify-only", "ecdsa-p256", usage="verify")
    with pytest.raises(PolicyViolation, match="may not be used to sign"):
        _csr(vault, "verify-only")
    vault.generate("signer", "ed25519")
    key = vault.private_key("signer")
    key.sign(b"recorded")
    vault.disable("signer")
    with pytest.raises(KeyDisabled):
        key.sign(b"refused")
    records = read_records(vault.config.data_dir / "audit.jsonl", limit=1000)
    signs = [r for r in records if r["op"] == "sign" and r.get("key") == "signer"]
    assert [r["result"] for r in signs] == ["ok", "KeyDisabled"], signs


def test_after_a_rotation_the_key_signs_and_shows_the_new_version(vault: Keystore) -> None:
    vault.generate("rot", "ecdsa-p256")
    key = vault.private_key("rot")
    before = key.public_key().public_numbers()
    vault.rotate("rot")
    assert key.public_key().public_numbers() != before
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("rot"))
        .sign(key, hashes.SHA256())
    )
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == vault.public_key("rot").public_numbers()  # type: ignore[union-attr]


# -- 2. code nobody here wrote: cryptography's builders, openssl, PyJWT ----------------------------
CSR_CASES = [
    ("vault", "ecdsa-p256"),
    ("vault", "ecdsa-p384"),
    ("vault", "ed25519"),
    ("vault", "rsa-2048"),
    ("hsm", "ecdsa-p256"),
    ("hsm", "rsa-2048"),
    ("tpm", "ecdsa-p256"),
]


@pytest.mark.parametrize(("backend", "key_type"), CSR_CASES)
def test_openssl_accepts_csrs_signed_in_each_backend(
    ks: Keystore, tmp_path: Path, backend: str, key_type: str
) -> None:
    ks.generate("csr-key", key_type, backend=backend)
    csr = _csr(ks, "csr-key")
    assert csr.is_signature_valid
    path = _pem(tmp_path, "req.pem", csr)
    # openssl 3 exits 0 either way after -noout; its verdict is the message
    p = openssl("req", "-in", path, "-verify", "-noout", cwd=tmp_path)
    assert p.returncode == 0 and "self-signature verify OK" in p.stderr, p.stdout + p.stderr
    # the same CSR with one byte of its signature changed is refused
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    bad = x509.load_der_x509_csr(bytes(der))
    (tmp_path / "bad.pem").write_bytes(bad.public_bytes(serialization.Encoding.PEM))
    p = openssl("req", "-in", "bad.pem", "-verify", "-noout", cwd=tmp_path)
    assert "verify failure" in p.stderr and "verify OK" not in p.stderr, p.stderr


def test_openssl_verifies_a_chain_from_a_tpm_root_to_vault_and_hsm_leaves(
    ks: Keystore, tmp_path: Path
) -> None:
    ks.generate("root", "ecdsa-p256", backend="tpm")
    ks.generate("leaf", "ed25519", backend="vault")
    ks.generate("server", "rsa-2048", backend="hsm")
    ks.generate("stranger", "ecdsa-p256", backend="vault")
    root = _certificate(ks, "root", ca=True)
    leaf = _certificate(ks, "leaf", issuer="root", issuer_cert=root)
    server = _certificate(ks, "server", issuer="root", issuer_cert=root)
    forged = _certificate(ks, "leaf", issuer="stranger", issuer_cert=root)  # wrong signer
    for filename, cert in (("root.pem", root), ("leaf.pem", leaf), ("server.pem", server)):
        _pem(tmp_path, filename, cert)
    _pem(tmp_path, "forged.pem", forged)
    for leaf_file in ("leaf.pem", "server.pem"):
        p = openssl("verify", "-CAfile", "root.pem", leaf_file, cwd=tmp_path)
        assert p.returncode == 0 and f"{leaf_file}: OK" in p.stdout, p.stdout + p.stderr
    p = openssl("verify", "-CAfile", "root.pem", "forged.pem", cwd=tmp_path)
    assert p.returncode != 0, p.stdout


@pytest.mark.parametrize(
    ("backend", "key_type", "alg"),
    [
        ("tpm", "ecdsa-p256", "ES256"),
        ("hsm", "ecdsa-p256", "ES256"),
        ("vault", "ecdsa-p384", "ES384"),
        ("vault", "ed25519", "EdDSA"),
        ("hsm", "rsa-2048", "RS256"),
        ("vault", "rsa-2048", "PS256"),
    ],
)
def test_pyjwt_signs_tokens_that_verify_with_the_public_key(
    ks: Keystore, backend: str, key_type: str, alg: str
) -> None:
    ks.generate("jwt", key_type, backend=backend)
    key = ks.private_key("jwt")
    claims = {"sub": "alice", "aud": "strongroom-tests"}
    token = jwt.encode(claims, key, algorithm=alg)
    public = ks.public_key("jwt")
    assert jwt.decode(token, public, algorithms=[alg], audience="strongroom-tests") == claims
    head, _, sig = token.split(".")
    other = jwt.encode({"sub": "mallory", "aud": "strongroom-tests"}, key, algorithm=alg)
    forged = ".".join([head, other.split(".")[1], sig])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, public, algorithms=[alg], audience="strongroom-tests")


# -- 3. certificates kept with keys ---------------------------------------------------------------
def test_a_vault_key_keeps_its_certificate_in_the_catalog(vault: Keystore) -> None:
    vault.generate("ca", "ecdsa-p256")
    vault.generate("leaf", "ed25519")
    vault.generate("other", "ed25519")
    root = _certificate(vault, "ca", ca=True)
    leaf = _certificate(vault, "leaf", issuer="ca", issuer_cert=root)
    assert vault.certificate("leaf") == []
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, root))
    assert vault.set_certificate("leaf", pem) == [leaf, root]
    assert vault.certificate("leaf") == [leaf, root]
    assert vault.catalog.certificate(vault.namespace, "leaf") == pem.decode()
    with pytest.raises(CertificateMismatch, match="not the public key of key 'other'"):
        vault.set_certificate("other", pem)
    backwards = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root, leaf))
    with pytest.raises(CertificateMismatch):
        vault.set_certificate("ca", backwards)  # the root first: not issued by the leaf
    with pytest.raises(InvalidArgument, match="not a PEM or DER"):
        vault.set_certificate("leaf", b"not a certificate")
    assert vault.certificate("other") == [] and vault.certificate("ca") == []
    records = read_records(vault.config.data_dir / "audit.jsonl", limit=1000)
    sets = [(r["key"], r["result"]) for r in records if r["op"] == "certificate_set"]
    assert sets == [
        ("leaf", "started"),
        ("leaf", "ok"),
        ("other", "started"),
        ("other", "CertificateMismatch"),
        ("ca", "started"),
        ("ca", "CertificateMismatch"),
    ], sets
    vault.delete("leaf")
    assert vault.catalog.certificate(vault.namespace, "leaf") is None
    # a rotation forgets the certificate of the old version's public key
    vault.set_certificate("ca", root.public_bytes(serialization.Encoding.PEM))
    assert vault.certificate("ca") == [root]
    vault.rotate("ca")
    assert vault.certificate("ca") == []


def test_a_pkcs11_key_gets_a_certificate_object_tools_see(ks: Keystore, softhsm: SoftHsm) -> None:
    info = ks.generate("hsm-cert", "ecdsa-p256", backend="hsm")
    cert = _certificate(ks, "hsm-cert")
    ks.set_certificate("hsm-cert", cert.public_bytes(serialization.Encoding.DER))
    key_id = info.handle.removeprefix("id:")

    def certs_on_token() -> list[str]:
        out = pkcs11_tool(softhsm, "--list-objects", "--type", "cert")
        assert out.returncode == 0, out.stderr
        return [block for block in out.stdout.split("Certificate Object")[1:] if key_id in block]

    found = certs_on_token()
    assert len(found) == 1 and "hsm-cert" in found[0], found
    assert ks.backend("hsm").stored_certificate(info) == cert  # type: ignore[attr-defined]
    # replaced, not added to
    second = _certificate(ks, "hsm-cert")
    ks.set_certificate("hsm-cert", second.public_bytes(serialization.Encoding.PEM))
    assert len(certs_on_token()) == 1
    assert ks.backend("hsm").stored_certificate(info) == second  # type: ignore[attr-defined]
    # without the catalog's copy, `certificate` reads the token's
    ks.catalog.remove_certificate(ks.namespace, "hsm-cert")
    assert ks.certificate("hsm-cert") == [second]
    ks.delete("hsm-cert")
    assert certs_on_token() == []


def test_catalog_schema_3_gains_the_certificates_table(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE certificates")
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.commit()
    db.close()
    catalog = Catalog(path)
    try:
        assert catalog.schema_version == SCHEMA_VERSION == 4
        assert catalog.certificate("default", "k") is None
        assert not catalog.remove_certificate("default", "k")
    finally:
        catalog.close()


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_makes_a_small_ca(tmp_path: Path) -> None:
    config = write_vault_config(tmp_path)

    def ok(*args: str) -> bytes:
        r = run_cli(config, *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ok("key", "generate", "root", "--type", "ecdsa-p384")
    ok("key", "generate", "web", "--type", "ecdsa-p256")
    ok(
        "key",
        "certificate",
        "root",
        "--subject",
        "CN=Root,O=Example",
        "--days",
        "30",
        "--ca",
        "--out",
        "root.pem",
    )
    ok("key", "cert", "set", "root", "root.pem")
    ok(
        "key",
        "csr",
        "web",
        "--subject",
        "CN=web",
        "--san",
        "DNS:web.example,IP:10.0.0.1",
        "--out",
        "web.csr",
    )
    p = openssl("req", "-in", "web.csr", "-verify", "-noout", "-text", cwd=tmp_path)
    assert "self-signature verify OK" in p.stderr, p.stderr
    assert "DNS:web.example, IP Address:10.0.0.1" in p.stdout, p.stdout
    ok(
        "key",
        "certificate",
        "web",
        "--subject",
        "CN=web",
        "--days",
        "7",
        "--issuer",
        "root",
        "--san",
        "DNS:web.example",
        "--out",
        "web.pem",
    )
    p = openssl("verify", "-CAfile", "root.pem", "web.pem", cwd=tmp_path)
    assert p.returncode == 0 and "web.pem: OK" in p.stdout, p.stdout + p.stderr
    web = x509.load_pem_x509_certificate((tmp_path / "web.pem").read_bytes())
    assert web.issuer.rfc4514_string() == "CN=Root,O=Example"
    assert not web.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ok("key", "cert", "set", "web", "web.pem")
    assert ok("key", "cert", "show", "web", "--format", "der") == web.public_bytes(
        serialization.Encoding.DER
    )
    # refused: a certificate for another key (exit 2, one line), an unknown SAN kind
    r = run_cli(config, "key", "cert", "set", "web", "root.pem", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "not the public key of key 'web'" in r.stderr
    r = run_cli(config, "key", "csr", "web", "--subject", "CN=x", "--san", "RID:1.2", cwd=tmp_path)
    assert r.returncode == 2 and "not DNS, IP, email or URI" in r.stderr, r.stderr
