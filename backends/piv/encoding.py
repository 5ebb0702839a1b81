"""Host-side encodings for a PIV card: RSA padding, DER helpers, self-signed certificates.

A PIV card does the raw private-key operation only. Hashing, PKCS#1 v1.5 and PSS padding
(RFC 8017, EMSA-PKCS1-v1_5 with SHA-256/384/512 and EMSA-PSS with MGF1-SHA-256) happen
here, on the host.
The certificate Strongroom writes into a slot's object is built by `cryptography`; its
to-be-signed part is then signed by the card and the signature put in by hand, because
`cryptography` signs only with its own private key objects.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_SHA384_DIGEST_INFO = bytes.fromhex("3041300d060960864801650304020205000430")
_SHA512_DIGEST_INFO = bytes.fromhex("3051300d060960864801650304020305000440")
_DIGEST_INFOS = {32: _SHA256_DIGEST_INFO, 48: _SHA384_DIGEST_INFO, 64: _SHA512_DIGEST_INFO}
CERT_ORGANIZATION = "Strongroom"


def pkcs1v15_block(digest: bytes, size: int) -> bytes:
    """EMSA-PKCS1-v1_5 of a SHA-256, SHA-384 or SHA-512 digest (told apart by its length),
    `size` bytes long."""
    prefix = _DIGEST_INFOS.get(len(digest))
    if prefix is None:
        raise ValueError("PKCS#1 v1.5 here takes a SHA-256, SHA-384 or SHA-512 digest")
    return pkcs1v15_pad(prefix + digest, size)


def pkcs1v15_pad(t: bytes, size: int) -> bytes:
    """EMSA-PKCS1-v1_5's block type 1 padding of `t` (a DigestInfo), `size` bytes long."""
    if size < len(t) + 11:
        raise ValueError("the RSA key is too small for this digest")
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def _mgf1(seed: bytes, length: int, hash_name: str = "sha256") -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def pss_block(digest: bytes, modulus_bits: int) -> bytes:
    """EMSA-PSS of a SHA-256 digest, MGF1-SHA-256, salt as long as the digest (RFC 8017 9.1.1),
    left-padded to the modulus length for the raw RSA operation."""
    em_bits = modulus_bits - 1
    em_len = (em_bits + 7) // 8
    h_len = s_len = len(digest)
    if em_len < h_len + s_len + 2:
        raise ValueError("the RSA key is too small for PSS with this digest")
    salt = os.urandom(s_len)
    h = hashlib.sha256(b"\x00" * 8 + digest + salt).digest()
    db = b"\x00" * (em_len - s_len - h_len - 2) + b"\x01" + salt
    masked = bytes(a ^ b for a, b in zip(db, _mgf1(h, len(db)), strict=True))
    masked = bytes([masked[0] & (0xFF >> (8 * em_len - em_bits))]) + masked[1:]
    em = masked + h + b"\xbc"
    return em.rjust((modulus_bits + 7) // 8, b"\x00")


def oaep_decode(em: bytes, hash_name: str) -> bytes | None:
    """EME-OAEP decoding (RFC 8017 7.1.2, empty label, MGF1 with the same hash) of the
    card's raw RSA output; None when it is not a valid encoding. Every check runs before
    the one answer, so the failure does not say which check failed."""
    h_len = hashlib.new(hash_name).digest_size
    k = len(em)
    if k < 2 * h_len + 2:
        return None
    masked_seed, masked_db = em[1 : 1 + h_len], em[1 + h_len :]
    seed = bytes(
        a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, h_len, hash_name), strict=True)
    )
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1(seed, k - h_len - 1, hash_name), strict=True))
    good = em[0] == 0
    good &= hmac.compare_digest(db[:h_len], hashlib.new(hash_name, b"").digest())
    rest = db[h_len:]
    index = -1
    bad_padding = False
    for i, byte in enumerate(rest):
        if index < 0:
            if byte == 1:
                index = i
            elif byte != 0:
                bad_padding = True
    good &= index >= 0 and not bad_padding
    return rest[index + 1 :] if good else None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_elements(seq: bytes) -> list[bytes]:
    """The DER elements inside a SEQUENCE (each with its tag and length)."""
    if seq[0] != 0x30:
        raise ValueError("not a SEQUENCE")

    def length_at(i: int) -> tuple[int, int]:
        first = seq[i]
        if first < 0x80:
            return first, i + 1
        k = first & 0x7F
        return int.from_bytes(seq[i + 1 : i + 1 + k], "big"), i + 1 + k

    n, i = length_at(1)
    end = i + n
    out = []
    while i < end:
        start = i
        n, j = length_at(i + 1)
        i = j + n
        out.append(seq[start:i])
    return out


_DUMMY_KEYS: dict[str, object] = {}


def _dummy_signer(public: PublicKeyTypes) -> object:
    """A throwaway key of the same algorithm: it fixes the signature algorithm of the TBS."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        name = public.curve.name
        if name not in _DUMMY_KEYS:
            _DUMMY_KEYS[name] = ec.generate_private_key(public.curve)
        return _DUMMY_KEYS[name]
    if isinstance(public, rsa.RSAPublicKey):
        if "rsa" not in _DUMMY_KEYS:
            _DUMMY_KEYS["rsa"] = rsa.generate_private_key(65537, 2048)
        return _DUMMY_KEYS["rsa"]
    raise ValueError("PIV certificates are for RSA and EC keys")


OWNER_PREFIX = "strongroom-store:"


def self_signed_certificate(
    public: PublicKeyTypes,
    common_name: str,
    key_usage: frozenset[str],
    sign_tbs: Callable[[bytes, hashes.HashAlgorithm], bytes],
    owner: str = "",
) -> x509.Certificate:
    """A self-signed X.509 certificate for a card key; `sign_tbs(tbs, hash)` asks the card.

    key_usage holds "sign" (digitalSignature), "agree" (keyAgreement) and/or "decrypt"
    (keyEncipherment); empty means "sign". `owner`, the keystore's store id in hex, goes in
    the subject as OU = `strongroom-store:<owner>`: how `doctor` knows the slot's key is
    this keystore's.
    """
    digest: hashes.HashAlgorithm = (
        hashes.SHA384()
        if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.key_size == 384
        else hashes.SHA256()
    )
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, CERT_ORGANIZATION),
    ]
    if owner:
        attributes.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OWNER_PREFIX + owner)
        )
    name = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    agree = "agree" in key_usage
    decrypt = "decrypt" in key_usage
    sign = "sign" in key_usage or not (agree or decrypt)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=sign,
                content_commitment=False,
                key_encipherment=decrypt,
                data_encipherment=False,
                key_agreement=agree,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    dummy = builder.sign(_dummy_signer(public), digest)  # type: ignore[arg-type]
    tbs = dummy.tbs_certificate_bytes
    algorithm_id = _der_elements(dummy.public_bytes(Encoding.DER))[1]
    signature = sign_tbs(tbs, digest)
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm_id + bit_string
    der = b"\x30" + _der_length(len(body)) + body
    return x509.load_der_x509_certificate(der)


__all__ = ["oaep_decode", "pkcs1v15_block", "pss_block", "self_signed_certificate"]
