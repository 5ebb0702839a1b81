"""Keystore keys as PKCS#11 objects: which objects a key gives, and their attributes
(PKCS #11 2.40, section 4). Everything is read through `KeyAPI`: the key's info, its public
key and its certificates; no private material is ever an attribute value.

A signing or decrypting key gives a private key object and a public key object, and one
certificate object per certificate kept with it; a symmetric key gives a secret key
object. CKA_ID and CKA_LABEL are the key's name (the ID as its UTF-8 bytes), so that
`pkcs11:object=NAME` and `pkcs11:id=...` URIs both find it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import algorithms
from ..api import KeyAPI
from ..types import KeyInfo, KeyType, Usage
from . import ck

SENSITIVE = object()
"""An attribute the object has but never reveals (CKR_ATTRIBUTE_SENSITIVE)."""

# DER of each curve's namedCurve OID (CKA_EC_PARAMS), and Ed25519's (RFC 8410 id-Ed25519).
EC_PARAMS = {
    KeyType.ECDSA_P256: bytes.fromhex("06082a8648ce3d030107"),
    KeyType.ECDSA_P384: bytes.fromhex("06052b81040022"),
    KeyType.SECP256K1: bytes.fromhex("06052b8104000a"),
    KeyType.ED25519: bytes.fromhex("06032b6570"),
}
GCM_BACKENDS = frozenset({"vault", "pkcs11"})
"""Backend types whose AES-256 ciphertext is AES-GCM, nonce(12) ‖ ct ‖ tag(16), so that
CKM_AES_GCM decrypts it with the nonce as the IV (a TPM's is CFB with an HMAC)."""
SECRET_TYPES = {KeyType.AES_256: (ck.CKK_AES, 32), KeyType.HMAC_SHA256: (ck.CKK_SHA256_HMAC, 32)}


def der_octet_string(data: bytes) -> bytes:
    """DER OCTET STRING of `data` (CKA_EC_POINT is one: OpenSSH and NSS need the wrapping)."""
    n = len(data)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return b"\x04" + head + data


def _uint(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


@dataclass
class Obj:
    """One object a client sees: its class, the key it stands for, and its attributes."""

    klass: int
    key: str
    attrs: dict[int, Any] = field(repr=False)
    private: bool = False
    """CKA_PRIVATE: visible only after C_Login."""
    oaep: tuple[str, ...] = ()
    """The RSA-OAEP variants (algorithms.RSA_ENCRYPT_ALGORITHMS) the key decrypts: SHA-1
    only when the keystore recorded that its backend decrypts no other (SoftHSM2)."""
    gcm: bool = False
    """An AES key whose ciphertexts are AES-GCM (GCM_BACKENDS): CKM_AES_GCM decrypts."""

    def matches(self, template: dict[int, Any]) -> bool:
        """Whether every attribute of a C_FindObjectsInit template has this value."""
        for kind, want in template.items():
            have = self.attrs.get(kind)
            if have is None or have is SENSITIVE:
                return False
            if isinstance(have, bool) or isinstance(want, bool):
                if bool(have) != bool(want):
                    return False
            elif have != want:
                return False
        return True


def key_objects(api: KeyAPI, info: KeyInfo, gcm: bool = False) -> list[Obj]:
    """The objects key `info` gives; [] for a key no PKCS#11 object stands for (a seed, a
    FIDO credential, an X25519 key). `gcm`: its backend's AES is AES-GCM."""
    name = info.name
    t = info.type
    base = {
        ck.CKA_TOKEN: True,
        ck.CKA_LABEL: name.encode(),
        ck.CKA_ID: name.encode(),
        ck.CKA_MODIFIABLE: False,
        ck.CKA_COPYABLE: False,
        ck.CKA_DESTROYABLE: False,
        ck.CKA_START_DATE: b"",
        ck.CKA_END_DATE: b"",
        ck.CKA_DERIVE: Usage.DERIVE in info.usage,
        ck.CKA_LOCAL: False,
        ck.CKA_KEY_GEN_MECHANISM: ck.UNAVAILABLE,
    }
    u = info.usage
    if t in SECRET_TYPES:
        key_type, size = SECRET_TYPES[t]
        secret = {
            **base,
            ck.CKA_CLASS: ck.CKO_SECRET_KEY,
            ck.CKA_PRIVATE: True,
            ck.CKA_KEY_TYPE: key_type,
            ck.CKA_SENSITIVE: True,
            ck.CKA_EXTRACTABLE: info.exportable,
            ck.CKA_ALWAYS_SENSITIVE: not info.exportable,
            ck.CKA_NEVER_EXTRACTABLE: not info.exportable,
            ck.CKA_ENCRYPT: Usage.ENCRYPT in u,
            ck.CKA_DECRYPT: Usage.DECRYPT in u,
            ck.CKA_SIGN: Usage.SIGN in u or t is KeyType.HMAC_SHA256,
            ck.CKA_VERIFY: Usage.VERIFY in u or t is KeyType.HMAC_SHA256,
            ck.CKA_WRAP: Usage.WRAP in u,
            ck.CKA_UNWRAP: Usage.UNWRAP in u,
            ck.CKA_VALUE_LEN: size,
            ck.CKA_VALUE: SENSITIVE,
            ck.CKA_WRAP_WITH_TRUSTED: False,
            ck.CKA_DESTROYABLE: True,
        }
        return [Obj(ck.CKO_SECRET_KEY, name, secret, private=True, gcm=gcm)]
    if not (t.is_ecdsa or t.is_rsa or t is KeyType.ED25519):
        return []
    public = api.public_key(name)
    certs = _certificates(api, name)
    subject = certs[0].subject.public_bytes() if certs else b""
    key_attrs: dict[int, Any] = {}
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        key_attrs = {
            ck.CKA_KEY_TYPE: ck.CKK_RSA,
            ck.CKA_MODULUS: _uint(numbers.n),
            ck.CKA_PUBLIC_EXPONENT: _uint(numbers.e),
            ck.CKA_MODULUS_BITS: public.key_size,
        }
    elif isinstance(public, ec.EllipticCurvePublicKey):
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        key_attrs = {
            ck.CKA_KEY_TYPE: ck.CKK_EC,
            ck.CKA_EC_PARAMS: EC_PARAMS[t],
            ck.CKA_EC_POINT: der_octet_string(point),
        }
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        key_attrs = {
            ck.CKA_KEY_TYPE: ck.CKK_EC_EDWARDS,
            ck.CKA_EC_PARAMS: EC_PARAMS[KeyType.ED25519],
            ck.CKA_EC_POINT: der_octet_string(raw),
        }
    else:  # pragma: no cover - the types above are all a signing key can be
        return []
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signs = Usage.SIGN in u
    private = {
        **base,
        **key_attrs,
        ck.CKA_CLASS: ck.CKO_PRIVATE_KEY,
        ck.CKA_PRIVATE: True,
        ck.CKA_SUBJECT: subject,
        ck.CKA_SENSITIVE: True,
        ck.CKA_EXTRACTABLE: info.exportable,
        ck.CKA_ALWAYS_SENSITIVE: not info.exportable,
        ck.CKA_NEVER_EXTRACTABLE: not info.exportable,
        ck.CKA_SIGN: signs,
        ck.CKA_SIGN_RECOVER: False,
        ck.CKA_DECRYPT: Usage.DECRYPT in u,
        ck.CKA_UNWRAP: Usage.UNWRAP in u,
        ck.CKA_WRAP_WITH_TRUSTED: False,
        ck.CKA_ALWAYS_AUTHENTICATE: False,
        ck.CKA_PUBLIC_KEY_INFO: spki,
        ck.CKA_VALUE: SENSITIVE,
        ck.CKA_PRIVATE_EXPONENT: SENSITIVE,
        ck.CKA_PRIME_1: SENSITIVE,
        ck.CKA_PRIME_2: SENSITIVE,
        ck.CKA_EXPONENT_1: SENSITIVE,
        ck.CKA_EXPONENT_2: SENSITIVE,
        ck.CKA_COEFFICIENT: SENSITIVE,
        ck.CKA_DESTROYABLE: True,  # C_DestroyObject deletes the key
    }
    if not t.is_rsa:
        for kind in (ck.CKA_PRIVATE_EXPONENT, ck.CKA_PRIME_1, ck.CKA_PRIME_2):
            del private[kind]
        for kind in (ck.CKA_EXPONENT_1, ck.CKA_EXPONENT_2, ck.CKA_COEFFICIENT):
            del private[kind]
    pub = {
        **base,
        **key_attrs,
        ck.CKA_CLASS: ck.CKO_PUBLIC_KEY,
        ck.CKA_PRIVATE: False,
        ck.CKA_SUBJECT: subject,
        ck.CKA_ENCRYPT: Usage.ENCRYPT in u,
        ck.CKA_VERIFY: Usage.VERIFY in u or signs,
        ck.CKA_VERIFY_RECOVER: False,
        ck.CKA_WRAP: Usage.WRAP in u,
        ck.CKA_TRUSTED: False,
        ck.CKA_PUBLIC_KEY_INFO: spki,
    }
    oaep = _oaep_variants(info)
    objects = [
        Obj(ck.CKO_PRIVATE_KEY, name, private, private=True, oaep=oaep),
        Obj(ck.CKO_PUBLIC_KEY, name, pub, oaep=oaep),
    ]
    for cert in certs:
        objects.append(Obj(ck.CKO_CERTIFICATE, name, _certificate_attrs(name, cert)))
    return objects


def _oaep_variants(info: KeyInfo) -> tuple[str, ...]:
    """What an RSA key decrypts: the keystore records the variant its backend decrypts,
    preferred first, when the key is made (algorithms.RSA_ENCRYPT_ATTRIBUTE); a backend
    that prefers SHA-1 has no SHA-256. Without the record, both (a failure is then the
    backend's, at C_Decrypt)."""
    if not info.type.is_rsa:
        return ()
    if info.attributes.get(algorithms.RSA_ENCRYPT_ATTRIBUTE) == "oaep-sha1":
        return ("oaep-sha1",)
    return algorithms.RSA_ENCRYPT_ALGORITHMS


def _certificates(api: KeyAPI, name: str) -> list[x509.Certificate]:
    return list(api.certificate(name))


def _certificate_attrs(name: str, cert: x509.Certificate) -> dict[int, Any]:
    der = cert.public_bytes(serialization.Encoding.DER)
    serial = cert.serial_number
    serial_der = _der_integer(serial)
    return {
        ck.CKA_CLASS: ck.CKO_CERTIFICATE,
        ck.CKA_TOKEN: True,
        ck.CKA_PRIVATE: False,
        ck.CKA_MODIFIABLE: False,
        ck.CKA_COPYABLE: False,
        ck.CKA_DESTROYABLE: False,
        ck.CKA_LABEL: name.encode(),
        ck.CKA_ID: name.encode(),
        ck.CKA_CERTIFICATE_TYPE: ck.CKC_X_509,
        ck.CKA_CERTIFICATE_CATEGORY: 0,
        ck.CKA_TRUSTED: False,
        ck.CKA_SUBJECT: cert.subject.public_bytes(),
        ck.CKA_ISSUER: cert.issuer.public_bytes(),
        ck.CKA_SERIAL_NUMBER: serial_der,
        ck.CKA_VALUE: der,
        ck.CKA_START_DATE: b"",
        ck.CKA_END_DATE: b"",
        ck.CKA_URL: b"",
        ck.CKA_JAVA_MIDP_SECURITY_DOMAIN: 0,
    }


def _der_integer(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True) if value else b"\x00"
    return b"\x02" + der_octet_string(raw)[1:]
