"""Key material formats and the operations the vault performs on them.

Material is kept as: Ed25519 the 64-byte libsodium secret key (seed ‖ public);
X25519 the 32-byte scalar; EC and RSA PKCS#8 DER; symmetric keys and seeds raw.
Every function receives material as a view into guarded memory. EC and RSA keys never
pass through `cryptography`: native/keyops.c parses, generates and uses them on the
system libcrypto, reading the guarded page in place and writing secret results into
guarded pages (docs/decisions.md, "Vault EC/RSA keys in native code"). Where a library
only returns `bytes`, the copy is scrubbed right after use (docs/threat-model.md lists
each such place).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers import algorithms as ciphers
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.padding import PKCS7

from strongroom import _native, algorithms, sodium
from strongroom.errors import IntegrityError, InvalidArgument
from strongroom.memory import Guarded, constant_time_equal
from strongroom.types import SECRET_MAX, KeyType

SYMMETRIC_SIZE = 32
SEED_SIZE = 64
GCM_NONCE = 12
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
# Index into native/keyops.c's curve table.
_CURVE_INDEX = {KeyType.ECDSA_P256: 0, KeyType.ECDSA_P384: 1, KeyType.SECP256K1: 2}
_EC_SIZE = {KeyType.ECDSA_P256: 32, KeyType.ECDSA_P384: 48, KeyType.SECP256K1: 32}
# RFC 8410 PKCS#8 of a 25519 key: this header, then the 32-byte private key.
_PKCS8_25519_PREFIX = {
    KeyType.ED25519: bytes.fromhex("302e020100300506032b657004220420"),
    KeyType.X25519: bytes.fromhex("302e020100300506032b656e04220420"),
}

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
        curve = _CURVE_INDEX[key_type]
        g = Guarded(_native.ec_pkcs8_size(curve))
        try:
            with g.write() as out:
                point = _native.ec_generate(curve, out)
        except BaseException:
            g.close()
            raise
        return g, point
    if key_type in _RSA_BITS:
        bits = _RSA_BITS[key_type]
        return _rsa_material(
            key_type, lambda out: _native.rsa_generate(bits, out), bits * 5 // 8 + 256
        )
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
        _expect_len(key_type, raw, _EC_SIZE[key_type])
        return _ec_material(key_type, raw, raw=True)
    if key_type in (KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.CHACHA20_POLY1305):
        _expect_len(key_type, raw, SYMMETRIC_SIZE)
        return Guarded.from_buffer(raw), None
    if key_type is KeyType.SEED:
        if not 16 <= len(raw) <= 64:
            raise InvalidArgument("a seed is 16 to 64 bytes")
        return Guarded.from_buffer(raw), None
    if key_type is KeyType.SECRET:
        if not 1 <= len(raw) <= SECRET_MAX:
            raise InvalidArgument(f"a secret is 1 to {SECRET_MAX} bytes, not {len(raw)}")
        return Guarded.from_buffer(raw), None
    raise InvalidArgument(f"{key_type.value} keys cannot be imported raw; use pem or der")


def _ec_material(key_type: KeyType, data: memoryview, raw: bool) -> tuple[Guarded, bytes]:
    """Checked EC material as the PKCS#8 the vault stores, and its public point.

    A raw scalar or PKCS#8/SEC1 DER goes to native code, which checks 1 <= d < n and any
    embedded public point, and writes PKCS#8 with the public point (the layout
    `private_bytes(DER, PKCS8)` makes) straight into guarded memory.
    """
    curve = _CURVE_INDEX[key_type]
    g = Guarded(_native.ec_pkcs8_size(curve))
    try:
        with g.write() as out:
            point = _native.ec_import(curve, data, raw, out)
    except ValueError:
        g.close()
        raise InvalidArgument(f"the key material is not a {key_type.value} key") from None
    except BaseException:
        g.close()
        raise
    return g, point


def _rsa_material(
    key_type: KeyType, make: Callable[[memoryview], tuple[int, bytes, bytes]], scratch_size: int
) -> tuple[Guarded, bytes]:
    """RSA material from `make` (native generate or import into a scratch guarded page),
    moved into a guarded buffer of its exact PKCS#8 length; and the public key's DER."""
    with Guarded(scratch_size) as scratch:
        with scratch.write() as out:
            try:
                length, n, e = make(out)
            except ValueError:
                raise InvalidArgument(f"the key material is not a {key_type.value} key") from None
            if int.from_bytes(n, "big").bit_length() != _RSA_BITS[key_type]:
                raise InvalidArgument(f"the key material is not a {key_type.value} key")
            with out[:length] as der:
                material = Guarded.from_buffer(der)
    public = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big"))
    return material, public_bytes_of(key_type, public.public_key())


def from_der(key_type: KeyType, der: memoryview) -> tuple[Guarded, bytes | None]:
    """Material from a DER private key: PKCS#8, or PKCS#1 (RSA) or SEC1 (EC), unencrypted.

    Parsed by native/keyops.c's strict DER reader, never by a general decoder.
    """
    if key_type in algorithms.CURVES:
        return _ec_material(key_type, der, raw=False)
    if key_type in _RSA_BITS:
        return _rsa_material(key_type, lambda out: _native.rsa_import(der, out), len(der) + 64)
    if key_type in _PKCS8_25519_PREFIX:
        with Guarded(32) as key:
            with key.write() as k:
                try:
                    _native.pkcs8_25519(der, key_type is KeyType.X25519, k)
                except ValueError:
                    raise InvalidArgument(
                        f"the key material is not a {key_type.value} key"
                    ) from None
            with key.read() as k:
                return from_raw(key_type, k)
    raise InvalidArgument(f"{key_type.value} keys are imported raw")


def from_pem(key_type: KeyType, pem: memoryview) -> tuple[Guarded, bytes | None]:
    """Material from an unencrypted PEM private key, decoded into guarded memory."""
    with Guarded(max(len(pem), 1)) as der:
        with der.write() as d:
            try:
                length = _native.pem_to_der(pem, d)
            except ValueError:
                raise InvalidArgument(
                    "the key material is not an unencrypted PEM private key"
                ) from None
        with der.read() as d, d[:length] as body:
            return from_der(key_type, body)


def _raw_size(key_type: KeyType) -> int | None:
    """The length of `key_type`'s raw material; None where there is no raw form (RSA)."""
    if key_type in _EC_SIZE:
        return _EC_SIZE[key_type]
    return None if key_type in _RSA_BITS else 32


def import_material(key_type: KeyType, data: memoryview, fmt: str) -> tuple[Guarded, bytes | None]:
    """Parse caller material in `fmt` (auto, raw, der, pem)."""
    if fmt == "auto":
        # Raw material has one length per type; anything else starting with a DER SEQUENCE
        # is DER. (A length test alone took a 48-byte Ed25519/X25519 PKCS#8 for raw, and a
        # P-384 raw scalar is 48 bytes too and may begin with 0x30.)
        if _starts_with(data, b"-----BEGIN"):
            fmt = "pem"
        elif (
            key_type.is_asymmetric and len(data) not in (0, _raw_size(key_type)) and data[0] == 0x30
        ):
            fmt = "der"
        else:
            fmt = "raw"
    if fmt == "raw":
        return from_raw(key_type, data)
    if not key_type.is_asymmetric:
        raise InvalidArgument(f"{key_type.value} keys are imported raw")
    return from_pem(key_type, data) if fmt == "pem" else from_der(key_type, data)


def export(key_type: KeyType, material: memoryview, fmt: str) -> bytes:
    """Material as pem/der (PKCS#8) or raw. The result is ordinary `bytes`: the caller's now.

    Each form is made in one step into that result (native code for PEM and the EC
    scalar), so no other copy of the key is left behind.
    """
    if fmt == "raw":
        if key_type is KeyType.ED25519:
            return bytes(material[:32])
        if key_type is KeyType.X25519 or not key_type.is_asymmetric:
            return bytes(material)
        if key_type in algorithms.CURVES:
            return _native.ec_scalar(_CURVE_INDEX[key_type], material)
        raise InvalidArgument("RSA keys export as pem or der")
    if fmt not in ("pem", "der"):
        raise InvalidArgument(f"unknown export format {fmt!r}; use pem, der or raw")
    if not key_type.is_asymmetric:
        raise InvalidArgument(f"{key_type.value} keys export raw")
    if key_type in _PKCS8_25519_PREFIX:
        prefix = _PKCS8_25519_PREFIX[key_type]
        with Guarded(len(prefix) + 32) as der:
            with der.write() as d:
                d[: len(prefix)] = prefix
                d[len(prefix) :] = material[:32]
            with der.read() as d:
                return bytes(d) if fmt == "der" else _native.der_to_pem(d, "PRIVATE KEY")
    return bytes(material) if fmt == "der" else _native.der_to_pem(material, "PRIVATE KEY")


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
    """Ed25519 and HMAC over `data`; ECDSA and RSA over its digest (see `sign_digest`)."""
    if key_type is KeyType.ED25519:
        return sodium.ed25519_sign(material, data)
    if key_type is KeyType.HMAC_SHA256:
        return hmac_sha256(material, data)
    name = algorithms.hash_name(key_type, algorithm)
    return sign_digest(key_type, material, hashlib.new(name, data).digest(), algorithm)


def sign_digest(
    key_type: KeyType, material: memoryview, digest: bytes, algorithm: str | None
) -> bytes:
    """ECDSA (DER signature) or RSA (pkcs1v15, pss or pkcs1v15-sha512) over a precomputed
    digest: SHA-384 for P-384, SHA-512 for pkcs1v15-sha512, SHA-256 otherwise; or RSA
    pkcs1v15-raw over the caller's DigestInfo. The message is not secret, so it is hashed
    in Python."""
    if key_type not in _CURVE_INDEX and key_type not in _RSA_BITS:
        raise InvalidArgument(f"{key_type.value} keys do not sign a digest")
    name = algorithm or "pkcs1v15"
    if key_type in _RSA_BITS and name == algorithms.RSA_PKCS1V15_RAW:
        try:  # the caller's DigestInfo, padded as given (CKM_RSA_PKCS)
            return _native.rsa_sign(material, digest, 2)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
    if key_type in _RSA_BITS and name not in algorithms.RSA_SIGN_ALGORITHMS:
        algorithms.rsa_padding(name)  # raises the standard InvalidArgument
    expected = algorithms.digest_for(key_type, algorithm).digest_size
    if len(digest) != expected:
        raise InvalidArgument(f"a {key_type.value} digest is {expected} bytes, not {len(digest)}")
    if key_type in _CURVE_INDEX:
        return _native.ec_sign(_CURVE_INDEX[key_type], material, digest)
    # The native signer tells PKCS#1 v1.5's hash by the digest's length (32 or 64).
    return _native.rsa_sign(material, digest, 1 if name == "pss" else 0)


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


def cbc_encrypt(material: memoryview, plaintext: bytes) -> bytes:
    """AES-256-CBC, PKCS#7 padding, a random IV: iv(16) ‖ ct (algorithms.AES_CBC_PAD)."""
    iv = sodium.random_bytes(algorithms.CBC_IV)
    padder = PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(ciphers.AES(bytes(material)), modes.CBC(iv)).encryptor()
    return iv + enc.update(padded) + enc.finalize()


def cbc_decrypt(material: memoryview, ciphertext: bytes) -> bytes:
    """Undo `cbc_encrypt`; a wrong key, IV, length or padding is one IntegrityError."""
    iv, body = ciphertext[: algorithms.CBC_IV], ciphertext[algorithms.CBC_IV :]
    if not body or len(body) % 16:
        raise IntegrityError("ciphertext is not AES-CBC output (IV and whole blocks)")
    dec = Cipher(ciphers.AES(bytes(material)), modes.CBC(iv)).decryptor()
    padded = dec.update(body) + dec.finalize()
    unpadder = PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise IntegrityError("AES-CBC decryption failed: wrong key or data") from None


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
        sha1 = algorithms.check_rsa_encrypt_algorithm(algorithm) == "oaep-sha1"
        try:
            return _native.rsa_decrypt(material, ciphertext, sha1)
        except ValueError:
            raise IntegrityError("RSA-OAEP decryption failed: wrong key or damaged data") from None
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
    if not isinstance(peer, ec.EllipticCurvePublicKey):
        raise InvalidArgument(f"the peer key is not a {key_type.value} public key")
    point = algorithms.encode_public(peer, "raw")
    out = Guarded(_EC_SIZE[key_type])
    try:
        with out.write() as o:
            _native.ec_ecdh(_CURVE_INDEX[key_type], material, point, o)
    except ValueError:
        out.close()
        raise InvalidArgument(f"the peer key is not a {key_type.value} public key") from None
    except BaseException:
        out.close()
        raise
    return out


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
