"""Key types as PKCS#11 sees them: parameters, attribute encodings, signature formats.

No python-pkcs11 import here, so these pure functions are testable on their own.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom import algorithms
from strongroom.errors import InvalidArgument, StrongroomError
from strongroom.types import KeyType

# CKA_EC_PARAMS: DER of the curve's OID (namedCurve).
EC_PARAMS = {
    KeyType.ECDSA_P256: bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    KeyType.ECDSA_P384: bytes.fromhex("06052b81040022"),  # 1.3.132.0.34
}
ED25519_PARAMS = bytes.fromhex("06032b6570")  # 1.3.101.112
# Older tokens (and OpenSC's pkcs11-tool) name the curve as PrintableString "edwards25519".
ED25519_PARAMS_NAMED = b"\x13\x0cedwards25519"
COORDINATE_SIZE = {KeyType.ECDSA_P256: 32, KeyType.ECDSA_P384: 48}
RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
SYMMETRIC_SIZE = 32
# DigestInfo prefixes for SHA-256 and SHA-512 (RFC 8017, section 9.2, note 1): CKM_RSA_PKCS
# signs prefix + digest.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
SHA512_DIGEST_INFO = bytes.fromhex("3051300d060960864801650304020305000440")
GCM_NONCE = 12
GCM_TAG = 16
# The key types this backend holds, and the two forms of a key's handle in the catalog.
_EC_TYPES = (KeyType.ECDSA_P256, KeyType.ECDSA_P384)
_RSA_TYPES = (KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096)
_SECRET_TYPES = (KeyType.AES_256, KeyType.HMAC_SHA256)
_ID_PREFIX = "id:"
_LABEL_PREFIX = "label:"
OWNED_ID_MARK = b"srkey\x01"
"""The first bytes of the CKA_ID of every key Strongroom creates for the catalog; the eight
bytes of the keystore's store id and ten random bytes follow. How `strongroom doctor` tells
a key left by a crash, before its catalog row was written, from a key another program (or
another keystore sharing the token) made. Keys from before the mark have plain random ids;
they are in the catalog, so nothing needs to find them."""


def ec_type_of(params: bytes) -> KeyType | None:
    """The key type for a CKA_EC_PARAMS value of a CKK_EC key, or None if unsupported."""
    for key_type, der in EC_PARAMS.items():
        if params == der:
            return key_type
    return None


def is_ed25519_params(params: bytes) -> bool:
    return params in (ED25519_PARAMS, ED25519_PARAMS_NAMED)


def rsa_type_of(bits: int) -> KeyType | None:
    for key_type, size in RSA_BITS.items():
        if size == bits:
            return key_type
    return None


def point_from_attribute(value: bytes, size: int) -> bytes:
    """The raw point from CKA_EC_POINT: a DER OCTET STRING by the standard, raw on some tokens.

    `size` is the length of the raw point (65 or 97 for uncompressed P-256/P-384, 32 for
    Ed25519).
    """
    if len(value) == size:
        return value
    if len(value) >= 2 and value[0] == 0x04:
        if value[1] < 0x80 and value[1] == len(value) - 2 == size:
            return value[2:]
        if value[1] == 0x81 and len(value) >= 3 and value[2] == len(value) - 3 == size:
            return value[3:]
    raise StrongroomError(f"the token returned a CKA_EC_POINT of {len(value)} bytes, not a point")


def ec_public(key_type: KeyType, ec_point: bytes) -> ec.EllipticCurvePublicKey:
    size = 1 + 2 * COORDINATE_SIZE[key_type]
    point = point_from_attribute(ec_point, size)
    return ec.EllipticCurvePublicKey.from_encoded_point(algorithms.CURVES[key_type], point)


def ed25519_public(ec_point: bytes) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(point_from_attribute(ec_point, 32))


def rsa_public(modulus: bytes, exponent: bytes) -> rsa.RSAPublicKey:
    numbers = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    return numbers.public_key()


def ec_point_attribute(public: ec.EllipticCurvePublicKey) -> bytes:
    """CKA_EC_POINT for a public key object: DER OCTET STRING of the uncompressed point."""
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return der_octet_string(point)


def der_octet_string(data: bytes) -> bytes:
    if len(data) < 0x80:
        return bytes([0x04, len(data)]) + data
    if len(data) < 0x100:
        return bytes([0x04, 0x81, len(data)]) + data
    raise InvalidArgument("value too long for this encoder")


def uncompressed_point(public: ec.EllipticCurvePublicKey) -> bytes:
    """The peer point CKM_ECDH1_DERIVE takes (raw, as PKCS#11 v2.30 and later require)."""
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def generator(key_type: KeyType) -> bytes:
    """The curve's base point G, uncompressed (the public key of the scalar 1)."""
    one = ec.derive_private_key(1, algorithms.CURVES[key_type])
    return uncompressed_point(one.public_key())


def ec_public_candidates(key_type: KeyType, x: bytes) -> list[ec.EllipticCurvePublicKey]:
    """The two points with x-coordinate `x` (y and -y): ECDH with G gives x(d·G), not y."""
    curve = algorithms.CURVES[key_type]
    out = []
    for prefix in (b"\x02", b"\x03"):
        try:
            out.append(ec.EllipticCurvePublicKey.from_encoded_point(curve, prefix + x))
        except ValueError:
            continue
    if not out:
        raise StrongroomError("the token's ECDH result is not an x-coordinate on the curve")
    return out


def ecdsa_der(raw: bytes) -> bytes:
    """CKM_ECDSA's r‖s as the DER SEQUENCE openssl and cryptography expect."""
    if len(raw) % 2 or not raw:
        raise StrongroomError(f"the token returned a {len(raw)}-byte ECDSA signature")
    half = len(raw) // 2
    r, s = der_integer(raw[:half]), der_integer(raw[half:])
    body = r + s
    if len(body) < 0x80:
        return b"\x30" + bytes((len(body),)) + body
    return b"\x30\x81" + bytes((len(body),)) + body  # P-384/P-521 sizes stay under 256


def der_integer(value: bytes) -> bytes:
    """A big-endian unsigned integer as a DER INTEGER (minimal, non-negative)."""
    value = value.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + bytes((len(value),)) + value


def public_matches(public: PublicKeyTypes, other: PublicKeyTypes) -> bool:
    """True when two public keys are the same key."""
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return public.public_bytes(der, spki) == other.public_bytes(der, spki)
