"""A PIV key as a `cryptography` private key, and a certificate kept in its slot (issue 17),
through the real PC/SC stack (pyscard → pcscd → vpcd → tests/emulators/piv_card.py).

Needs the machine's one pcscd: run it alone, like tests/backends/test_piv.py.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import jwt
import pcsc_support
import pytest
from conftest import openssl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from piv_card import DEFAULT_PIN
from piv_support import (
    PIV_PIN_ENV,
    PIV_VAULT_PASS,
    PIV_VAULT_PASS_ENV,
    PivReader,
    piv_reader,
    reader,
    write_piv_config,
)

import strongroom
from strongroom.backends.piv.certs import CERT_KEY_ATTRIBUTE
from strongroom.errors import BackendUnavailable, CertificateMismatch
from strongroom.keystore import Keystore

__all__ = ["piv_reader", "reader"]  # fixtures, imported so pytest finds them

_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


@pytest.fixture
def config(tmp_path: Path, reader: PivReader, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, PIV_VAULT_PASS)
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    return write_piv_config(tmp_path / "ks", reader.name)


@pytest.fixture
def ks(config: Path) -> Iterator[Keystore]:
    with strongroom.open(config) as keystore:
        yield keystore


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(ks: Keystore, subject: str, key: str, issuer: str, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name("Vault Root") if not ca else _name(subject))
        .public_key(ks.private_key(key).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(ks.private_key(issuer), hashes.SHA256())
    )


def test_a_piv_key_signs_csrs_and_tokens(ks: Keystore, tmp_path: Path) -> None:
    ks.generate("badge", "ecdsa-p256", backend="piv")
    key = ks.private_key("badge")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("badge"))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    p = openssl("req", "-in", "req.pem", "-verify", "-noout", cwd=tmp_path)
    assert "self-signature verify OK" in p.stderr, p.stderr
    token = jwt.encode({"sub": "badge"}, key, algorithm="ES256")
    assert jwt.decode(token, ks.public_key("badge"), algorithms=["ES256"]) == {"sub": "badge"}


def test_a_certificate_set_on_a_piv_key_goes_into_its_slot(config: Path, tmp_path: Path) -> None:
    with strongroom.open(config) as ks:
        ks.generate("root", "ecdsa-p256", backend="vault")
        ks.generate("badge", "ecdsa-p256", backend="piv")
        ks.generate("other", "ecdsa-p256", backend="piv")
        root = _issue(ks, "Vault Root", "root", "root", ca=True)
        leaf = _issue(ks, "Alice", "badge", "root", ca=False)
        with pytest.raises(CertificateMismatch):
            ks.set_certificate("other", leaf.public_bytes(serialization.Encoding.PEM))
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, root))
        ks.set_certificate("badge", chain)
        assert CERT_KEY_ATTRIBUTE in ks.info("badge").attributes
    for filename, cert in (("root.pem", root), ("leaf.pem", leaf)):
        (tmp_path / filename).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    p = openssl("verify", "-CAfile", "root.pem", "leaf.pem", cwd=tmp_path)
    assert p.returncode == 0 and "leaf.pem: OK" in p.stdout, p.stdout + p.stderr
    # a new session reads the slot again: the card holds the new certificate, and the key
    # is still known by the public key recorded with it, though the certificate names Alice
    with strongroom.open(config) as ks:
        info = ks.info("badge")
        assert ks.backend("piv").stored_certificate(info) == leaf  # type: ignore[attr-defined]
        assert ks.certificate("badge") == [leaf, root]
        ks.catalog.remove_certificate(ks.namespace, "badge")
        assert ks.certificate("badge") == [leaf]  # from the card
        x509.CertificateSigningRequestBuilder().subject_name(_name("again")).sign(
            ks.private_key("badge"), hashes.SHA256()
        )
        # without the recorded public key, the slot's certificate names no key of ours
        ks.catalog.add_attributes(ks.namespace, "badge", info.version, {CERT_KEY_ATTRIBUTE: "0"})
    with strongroom.open(config) as ks:
        with pytest.raises(BackendUnavailable, match="not key 'badge'"):
            ks.sign("badge", b"data")
        ks.catalog.add_attributes(
            ks.namespace,
            "badge",
            info.version,
            {CERT_KEY_ATTRIBUTE: info.attributes[CERT_KEY_ATTRIBUTE]},
        )
        ks.delete("badge")  # the slot is ours again, so it may be emptied
        assert ks.generate("next", "ecdsa-p256", backend="piv").handle == info.handle
