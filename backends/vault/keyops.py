"""Key material formats and the operations the vault performs on them.

Material is kept as: Ed25519 the 64-byte libsodium secret key (seed ‖ public);
X25519 the 32-byte scalar; EC and RSA PKCS#8 DER; symmetric keys and seeds raw.
Every function receives material as a view into guarded memory. Where a library
only returns `bytes`, the copy is scrubbed right after use (docs/threat-model.md
lists each such place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom import algorithms
from strongroom.errors import IntegrityError, InvalidArgument
from strongroom.memory import Guarded, constant_time_equal, scrub_bytes
from strongroom.types import KeyType

from . import sodium

SYMMETRIC_SIZE = 32
SEED_SIZE = 64
GCM_NONCE = 12
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
_PKCS8 = serialization.PrivateFormat.PKCS8
_DER = serialization.Encoding.DER
_NOENC = serialization.NoEncryption()

SIGN_TYPES = frozenset({KeyType.ED25519, KeyType.HMAC_SHA256, *algorithms.CURVES, *_RSA_BITS})
AEAD_TYPES = frozenset({KeyType.AES_256, KeyType.CHACHA20_POLY1305})
DERIVABLE = frozenset(
    {
        KeyType.AES_256,
        KeyType.HMAC_SHA256,
        KeyType.CHACHA20_POLY1305,
        KeyType.ED25519,
        KeyType.X25519,
    }
)
DERIVE_SOURCES = frozenset(
    {KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.CHACHA20_POLY1305, KeyType.SEED}
)
AGREE_TYPES = frozenset({KeyType.X25519, *algorithms.CURVES})


def _guarded_copy(data: bytes) -> Guarded:
    """Move library-returned bytes into guarded memory and scrub the bytes."""
    try:
        return Guarded.from_buffer(data)
    finally:
        scrub_bytes(data)


def _pkcs8_of(key: PrivateKeyTypes) -> Guarded:
    return _guarded_copy(key.private_bytes(_DER, _PKCS8, _NOENC))


def public_bytes_of(key_type: KeyType, public: PublicKeyTypes) -> bytes:
    """The compact public form stored beside each record."""
    if key_type in (KeyType.ED25519, KeyType.X25519):
        return algorithms.encode_public(public, "raw")
    if key_type in algorithms.CURVES:
        return algorithms.encode_public(public, "raw")
    return algorithms.encode_public(public, "der")


def load_public(key_type: KeyType, data: bytes) -> PublicKeyTypes:
    """Inverse of `public_bytes_of`."""
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if key_type is KeyType.X25519:
        return x25519.X25519PublicKey.from_public_bytes(data)
    if key_type in algorithms.CURVES:
        return ec.EllipticCurvePublicKey.from_encoded_point(algorithms.CURVES[key_type], data)
    return serialization.load_der_public_key(data)


@contextlib.contextmanager
def _private(key_type: KeyType, material: memoryview) -> Iterator[Any]:
    """An OpenSSL key object loaded straight from guarded memory (no Python copy)."""
    key = serialization.load_der_private_key(material, None)
    try:
        yield key
    finally:
        del key


def generate(key_type: KeyType) -> tuple[Guarded, bytes | None]:
    """New material for `key_type`, and its public form (None for symmetric keys)."""
    if key_type is KeyType.ED25519:
        with Guarded(32) as seed:
            with seed.write() as s:
                sodium.random_into(s)
            return _ed25519_from_seed(seed)
    if key_type is KeyType.X25519:
        g = Guarded(32)
        with g.write() as s:
            sodium.random_into(s)
            pub = sodium.x25519_public(s)
        return g, pub
    if key_type in algorithms.CURVES:
        ec_key = ec.generate_private_key(algorithms.CURVES[key_type])
        return _pkcs8_of(ec_key), public_bytes_of(key_type, ec_key.public_key())
    if key_type in _RSA_BITS:
        rsa_key = rsa.generate_private_key(65537, _RSA_BITS[key_type])
        return _pkcs8_of(rsa_key), public_bytes_of(key_type, rsa_key.public_key())
    if key_type in (KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.CHACHA20_POLY1305):
        g = Guarded(SYMMETRIC_SIZE)
        with g.write() as s:
            sodium.random_into(s)
        return g, None
    raise InvalidArgument(f"the vault cannot generate {key_type.value} keys this way")


def _ed25519_from_seed(seed: Guarded) -> tuple[Guarded, bytes]:
    sk = Guarded(sodium.ED25519_SK)
    with seed.read() as s, sk.write() as out:
        pub = sodium.ed25519_keypair_from_seed(s, out)
    return sk, pub


def from_raw(key_type: KeyType, raw: memoryview) -> tuple[Guarded, bytes | None]:
    """Material from raw bytes: a seed/scalar for 25519 and EC, the key for symmetric types."""
    if key_type is KeyType.ED25519:
        _expect_len(key_type, raw, 32)
        with Guarded.from_buffer(raw) as seed:
            return _ed25519_from_seed(seed)
    if key_type is KeyType.X25519:
        _expect_len(key_type, raw, 32)
        g = Guarded.from_buffer(raw)
        with g.read() as s:
            return g, sodium.x25519_public(s)
    if key_type in algorithms.CURVES:
        size = 48 if key_type is KeyType.ECDSA_P384 else 32
        _expect_len(key_type, raw, size)
        prefix = _EC_PKCS8_PREFIX[key_type]
        with Guarded(len(prefix) + size) as der:
            with der.write() as d:
                d[: len(prefix)] = prefix
                d[len(prefix) :] = raw
            with der.read() as d:
                try:
                    key = serialization.load_der_private_key(d, None)
                except (ValueError, TypeError, UnsupportedAlgorithm):
                    raise InvalidArgument(
                        f"the key material is not a {key_type.value} key"
                    ) from None
                public = key.public_key()
                del key
        if not algorithms.public_key_matches(key_type, public):
            raise InvalidArgument(f"the key material is not a {key_type.value} key")
        return _ec_pkcs8(key_type, raw, public), public_bytes_of(key_type, public)
    if key_type in (KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.CHACHA20_POLY1305):
        _expect_len(key_type, raw, SYMMETRIC_SIZE)
        return Guarded.from_buffer(raw), None
    if key_type is KeyType.SEED:
        if not 16 <= len(raw) <= 64:
            raise InvalidArgument("a seed is 16 to 64 bytes")
        return Guarded.from_buffer(raw), None
    raise InvalidArgument(f"{key_type.value} keys cannot be imported raw; use pem or der")


# PKCS#8 headers for an EC private key given only its scalar (RFC 5915 inside RFC 5208).
_EC_PKCS8_PREFIX = {
    KeyType.ECDSA_P256: bytes.fromhex(
        "3041020100301306072a8648ce3d020106082a8648ce3d030107042730250201010420"
    ),
    KeyType.ECDSA_P384: bytes.fromhex(
        "304e020100301006072a8648ce3d020106052b81040022043730350201010430"
    ),
    KeyType.SECP256K1: bytes.fromhex(
        "303e020100301006072a8648ce3d020106052b8104000a042730250201010420"
    ),
}


_EC_CURVE_OID = {
    KeyType.ECDSA_P256: bytes.fromhex("06082a8648ce3d030107"),
    KeyType.ECDSA_P384: bytes.fromhex("06052b81040022"),
    KeyType.SECP256K1: bytes.fromhex("06052b8104000a"),
}
_EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return bytes([0x81, n])
    return bytes([0x82, n >> 8, n & 0xFF])


def _ec_pkcs8(key_type: KeyType, scalar: memoryview, public: PublicKeyTypes) -> Guarded:
    """The PKCS#8 that `private_bytes(DER, PKCS8)` makes for an EC key (RFC 5208 around an
    RFC 5915 ECPrivateKey with its public key), written straight into guarded memory.

    `private_bytes` would leave the key in a freed heap buffer of the library (a Rust Vec
    that is not zeroed), which tests/test_memory_scan.py can find; and storing the key
    without its public point would make every later load compute it from the scalar,
    leaving the scalar on the stack.
    """
    point = algorithms.encode_public(public, "raw")  # uncompressed: 04 || x || y
    bits = b"\x03" + _der_len(len(point) + 1) + b"\x00" + point
    tagged = b"\xa1" + _der_len(len(bits)) + bits
    head = b"\x02\x01\x01\x04" + _der_len(len(scalar))
    inner_len = len(head) + len(scalar) + len(tagged)
    inner_head = b"\x30" + _der_len(inner_len)
    octet_head = b"\x04" + _der_len(len(inner_head) + inner_len)
    alg = _EC_PUBLIC_KEY_OID + _EC_CURVE_OID[key_type]
    alg = b"\x30" + _der_len(len(alg)) + alg
    body_len = 3 + len(alg) + len(octet_head) + len(inner_head) + inner_len
    lead = b"\x30" + _der_len(body_len) + b"\x02\x01\x00" + alg + octet_head + inner_head + head
    g = Guarded(len(lead) + len(scalar) + len(tagged))
    with g.write() as out:
        out[: len(lead)] = lead
        out[len(lead) : len(lead) + len(scalar)] = scalar
        out[len(lead) + len(scalar) :] = tagged
    return g


def from_der(key_type: KeyType, der: memoryview) -> tuple[Guarded, bytes | None]:
    """Material from a DER private key (PKCS#8, or PKCS#1/SEC1 which OpenSSL also reads)."""
    try:
        key = serialization.load_der_private_key(der, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument("the key material is not an unencrypted DER private key") from None
    return _from_object(key_type, key)


def from_pem(key_type: KeyType, pem: memoryview) -> tuple[Guarded, bytes | None]:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument("the key material is not an unencrypted PEM private key") from None
    return _from_object(key_type, key)


def _from_object(key_type: KeyType, key: PrivateKeyTypes) -> tuple[Guarded, bytes | None]:
    public = key.public_key()
    if not algorithms.public_key_matches(key_type, public):
        raise InvalidArgument(f"the key material is not a {key_type.value} key")
    if isinstance(key, ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NOENC)
        try:
            return from_raw(key_type, memoryview(raw))
        finally:
            scrub_bytes(raw)
    return _pkcs8_of(key), public_bytes_of(key_type, public)


def import_material(key_type: KeyType, data: memoryview, fmt: str) -> tuple[Guarded, bytes | None]:
    """Parse caller material in `fmt` (auto, raw, der, pem)."""
    if fmt == "auto":
        if _starts_with(data, b"-----BEGIN"):
            fmt = "pem"
        elif key_type.is_asymmetric and len(data) > 48 and data[0] == 0x30:
            fmt = "der"
        else:
            fmt = "raw"
    if fmt == "raw":
        return from_raw(key_type, data)
    if not key_type.is_asymmetric:
        raise InvalidArgument(f"{key_type.value} keys are imported raw")
    return from_pem(key_type, data) if fmt == "pem" else from_der(key_type, data)


def export(key_type: KeyType, material: memoryview, fmt: str) -> bytes:
    """Material as pem/der (PKCS#8) or raw. The result is ordinary `bytes`: the caller's now."""
    if fmt == "raw":
        if key_type is KeyType.ED25519:
            return bytes(material[:32])
        if key_type is KeyType.X25519 or not key_type.is_asymmetric:
            return bytes(material)
        if key_type in algorithms.CURVES:
            with _private(key_type, material) as key:
                size = (key.curve.key_size + 7) // 8
                return int(key.private_numbers().private_value).to_bytes(size, "big")
        raise InvalidArgument("RSA keys export as pem or der")
    if fmt not in ("pem", "der"):
        raise InvalidArgument(f"unknown export format {fmt!r}; use pem, der or raw")
    if not key_type.is_asymmetric:
        raise InvalidArgument(f"{key_type.value} keys export raw")
    enc = serialization.Encoding.PEM if fmt == "pem" else _DER
    if key_type is KeyType.ED25519:
        obj: Any = ed25519.Ed25519PrivateKey.from_private_bytes(material[:32])
    elif key_type is KeyType.X25519:
        obj = x25519.X25519PrivateKey.from_private_bytes(material)
    elif fmt == "der":
        return bytes(material)
    else:
        obj = serialization.load_der_private_key(material, None)
    return bytes(obj.private_bytes(enc, _PKCS8, _NOENC))


def wrap_form(key_type: KeyType, material: memoryview) -> Guarded:
    """What AES key wrap carries: raw for symmetric and 25519 keys, PKCS#8 DER otherwise."""
    if key_type is KeyType.ED25519:
        return Guarded.from_buffer(material[:32])
    return Guarded.from_buffer(material)


def unwrap_form(key_type: KeyType, data: memoryview) -> tuple[Guarded, bytes | None]:
    if key_type.is_asymmetric and key_type not in (KeyType.ED25519, KeyType.X25519):
        return from_der(key_type, data)
    return from_raw(key_type, data)


def sign(key_type: KeyType, material: memoryview, data: bytes, algorithm: str | None) -> bytes:
    if key_type is KeyType.ED25519:
        return sodium.ed25519_sign(material, data)
    if key_type is KeyType.HMAC_SHA256:
        return hmac_sha256(material, data)
    with _private(key_type, material) as key:
        if key_type in algorithms.CURVES:
            return bytes(key.sign(data, ec.ECDSA(algorithms.digest_for(key_type))))
        return bytes(key.sign(data, algorithms.rsa_padding(algorithm), hashes.SHA256()))


def sign_digest(
    key_type: KeyType, material: memoryview, digest: bytes, algorithm: str | None
) -> bytes:
    """ECDSA or RSA over a digest of the message (`algorithms.digest_for`)."""
    hashed = Prehashed(algorithms.digest_for(key_type))
    with _private(key_type, material) as key:
        if key_type in algorithms.CURVES:
            return bytes(key.sign(digest, ec.ECDSA(hashed)))
        return bytes(key.sign(digest, algorithms.rsa_padding(algorithm), hashed))


def hmac_sha256(material: memoryview, data: bytes) -> bytes:
    h = hmac.HMAC(material, hashes.SHA256())
    h.update(data)
    return h.finalize()


def verify_mac(material: memoryview, data: bytes, tag: bytes) -> bool:
    return constant_time_equal(hmac_sha256(material, data), tag)


def encrypt(key_type: KeyType, material: memoryview, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: nonce(12) ‖ ct ‖ tag. ChaCha20-Poly1305 (XChaCha): nonce(24) ‖ ct ‖ tag."""
    if key_type is KeyType.AES_256:
        nonce = sodium.random_bytes(GCM_NONCE)
        return nonce + AESGCM(material).encrypt(nonce, plaintext, aad)
    if key_type is KeyType.CHACHA20_POLY1305:
        return sodium.seal(material, plaintext, aad)
    raise InvalidArgument(f"{key_type.value} keys do not encrypt in the vault")


def decrypt(
    key_type: KeyType,
    material: memoryview,
    ciphertext: bytes,
    aad: bytes,
    algorithm: str | None = None,
) -> bytes:
    """AEAD decrypt, or RSA-OAEP (`algorithm`: oaep-sha256, the default, or oaep-sha1)."""
    if key_type is KeyType.AES_256:
        if len(ciphertext) < GCM_NONCE + 16:
            raise IntegrityError("ciphertext is too short to be AES-GCM output")
        try:
            return AESGCM(material).decrypt(ciphertext[:GCM_NONCE], ciphertext[GCM_NONCE:], aad)
        except InvalidTag:
            raise IntegrityError(
                "ciphertext failed authentication: wrong key, AAD or data"
            ) from None
    if key_type is KeyType.CHACHA20_POLY1305:
        out = bytearray(max(sodium.opened_length(ciphertext), 0))
        try:
            sodium.open_into(material, ciphertext, aad, memoryview(out))
        except IntegrityError:
            raise IntegrityError(
                "ciphertext failed authentication: wrong key, AAD or data"
            ) from None
        return bytes(out)
    if key_type in _RSA_BITS:
        with _private(key_type, material) as key:
            try:
                return bytes(key.decrypt(ciphertext, algorithms.oaep(algorithm)))
            except ValueError:
                raise IntegrityError(
                    "RSA-OAEP decryption failed: wrong key or damaged data"
                ) from None
    raise InvalidArgument(f"{key_type.value} keys do not decrypt in the vault")


def shared_secret(key_type: KeyType, material: memoryview, peer: PublicKeyTypes) -> Guarded:
    """The raw ECDH/X25519 shared secret, in guarded memory."""
    if key_type is KeyType.X25519:
        assert isinstance(peer, x25519.X25519PublicKey)
        out = Guarded(32)
        try:
            with out.write() as o:
                sodium.x25519_into(material, peer.public_bytes_raw(), o)
        except BaseException:  # e.g. a low-order peer point: wipe and unmap, then report it
            out.close()
            raise
        return out
    with _private(key_type, material) as key:
        return _guarded_copy(key.exchange(ec.ECDH(), peer))


def hkdf_into_new(
    key_type: KeyType, ikm: memoryview, salt: bytes, info: bytes
) -> tuple[Guarded, bytes | None]:
    """HKDF-SHA256 from `ikm` into new material of `key_type`."""
    if key_type not in DERIVABLE:
        names = ", ".join(sorted(t.value for t in DERIVABLE))
        raise InvalidArgument(f"derive makes only {names} keys")
    out = Guarded(32)
    with out.write() as o:
        HKDF(hashes.SHA256(), 32, salt or None, info).derive_into(ikm, o)
    if key_type in (KeyType.ED25519, KeyType.X25519):
        with out:
            with out.read() as o:
                return from_raw(key_type, o)
    return out, None


def _starts_with(data: memoryview, prefix: bytes) -> bool:
    """Compare without slicing the caller's key material into a new bytes object."""
    return len(data) >= len(prefix) and all(data[i] == prefix[i] for i in range(len(prefix)))


def _expect_len(key_type: KeyType, raw: memoryview, size: int) -> None:
    if len(raw) != size:
        raise InvalidArgument(f"raw {key_type.value} key material is {size} bytes, not {len(raw)}")
