"""Signature and encryption schemes shared by every backend, so all agree on encodings.

ECDSA signatures are DER; Ed25519 raw 64 bytes; RSA PKCS#1 v1.5 over SHA-256 (default),
PKCS#1 v1.5 over SHA-512 (`pkcs1v15-sha512`: SSH's rsa-sha2-512) or PSS with SHA-256,
MGF1 and a salt as long as the digest; RSA encryption is OAEP with SHA-256, or with
SHA-1 for a key whose backend decrypts only that (RSA_ENCRYPT_ATTRIBUTE records which).
These are the encodings `openssl pkeyutl`/`openssl dgst` verify.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from .errors import InvalidArgument
from .types import KeyType

RSA_PKCS1V15_SHA512 = "pkcs1v15-sha512"
"""RSA PKCS#1 v1.5 over SHA-512 (RFC 8017; SSH's rsa-sha2-512, RFC 8332). The other RSA
signature algorithms hash with SHA-256."""
RSA_PKCS1V15_RAW = "pkcs1v15-raw"
"""RSA PKCS#1 v1.5 over a block the caller built, as given: `data` is the DigestInfo (RFC
8017 9.2, step 2) of a digest in any hash, at most the key's size - 11 bytes, and the
signature is its block type 1 padding to the power d. Nothing is hashed, so it is
`prehashed` only. It is PKCS#11's CKM_RSA_PKCS sign (what pkcs11-tool --test and TLS
stacks ask of a token); a backend that cannot pad a block it did not build answers
UnsupportedOperation. Not an algorithm of the CLI: a person has a message, not a block."""
RSA_SIGN_ALGORITHMS = ("pkcs1v15", "pss", RSA_PKCS1V15_SHA512)
RSA_SIGN_ALGORITHMS_HELP = (
    "RSA only: pkcs1v15 (PKCS#1 v1.5 with SHA-256, the default), pss (SHA-256) or pkcs1v15-sha512."
)
DIGEST_INFO_PREFIXES = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
"""The DER of a DigestInfo up to its digest, by hash (RFC 8017, 9.2 note 1)."""


def parse_digest_info(block: bytes) -> tuple[str, bytes] | None:
    """(hashlib name, digest) of a DigestInfo in one of DIGEST_INFO_PREFIXES' hashes, or
    None: for a backend that builds the DigestInfo itself (a TPM) and so can sign a
    `pkcs1v15-raw` block only when it is one of those."""
    for name, prefix in DIGEST_INFO_PREFIXES.items():
        if block.startswith(prefix) and len(block) == len(prefix) + prefix[-1]:
            return name, block[len(prefix) :]
    return None


CURVES: dict[KeyType, ec.EllipticCurve] = {
    KeyType.ECDSA_P256: ec.SECP256R1(),
    KeyType.ECDSA_P384: ec.SECP384R1(),
    KeyType.SECP256K1: ec.SECP256K1(),
}


def digest_for(key_type: KeyType, algorithm: str | None = None) -> hashes.HashAlgorithm:
    """The hash a signature with this key type and signature algorithm uses: SHA-384 for
    P-384, SHA-512 for RSA's pkcs1v15-sha512, SHA-256 otherwise."""
    if key_type is KeyType.ECDSA_P384:
        return hashes.SHA384()
    if algorithm == RSA_PKCS1V15_SHA512 and key_type.is_rsa:
        return hashes.SHA512()
    return hashes.SHA256()


def hash_name(key_type: KeyType, algorithm: str | None = None) -> str:
    """The `hashlib` name of `digest_for(key_type, algorithm)`: sha256, sha384 or sha512."""
    return digest_for(key_type, algorithm).name


def signs_digests(key_type: KeyType) -> bool:
    """Whether the key type's signature is over a digest of the message (ECDSA and RSA), so
    that a caller may hash the message itself and sign only the digest (`prehashed`)."""
    return key_type.is_ecdsa or key_type.is_rsa


def check_prehashed(
    key_type: KeyType, digest: bytes | bytearray | memoryview, algorithm: str | None = None
) -> None:
    """Refuse a prehashed signature for a type that signs whole messages, or a digest of the
    wrong length (SHA-256: 32 bytes; SHA-384 for P-384: 48; SHA-512 for pkcs1v15-sha512:
    64)."""
    if not signs_digests(key_type):
        raise InvalidArgument(
            f"{key_type.value} keys sign the whole message, not a digest; "
            "only ECDSA and RSA keys take prehashed input"
        )
    if algorithm == RSA_PKCS1V15_RAW:
        room = rsa_bits(key_type) // 8 - 11
        if not 1 <= len(digest) <= room:
            raise InvalidArgument(
                f"a {RSA_PKCS1V15_RAW} block for a {key_type.value} key is 1 to {room} bytes, "
                f"not {len(digest)}"
            )
        return
    size = digest_for(key_type, algorithm).digest_size
    if len(digest) != size:
        raise InvalidArgument(
            f"a prehashed {key_type.value} signature takes a {size}-byte "
            f"{hash_name(key_type, algorithm).upper()} digest, not {len(digest)} bytes"
        )


def rsa_padding(algorithm: str | None) -> padding.AsymmetricPadding:
    """PKCS#1 v1.5 unless `algorithm` is "pss" (the hash is `digest_for`'s)."""
    algorithm = algorithm or "pkcs1v15"
    if algorithm in ("pkcs1v15", RSA_PKCS1V15_SHA512):
        return padding.PKCS1v15()
    if algorithm == "pss":
        return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    raise InvalidArgument(
        f"unknown RSA signature algorithm {algorithm!r}; "
        f"use one of {', '.join(RSA_SIGN_ALGORITHMS)}"
    )


RSA_ENCRYPT_ALGORITHMS = ("oaep-sha256", "oaep-sha1")

AES_KEY_WRAP = "aes-kwp"
"""AES key wrap with padding (RFC 5649) of a short secret, such as an envelope's data key,
under an AES key with the `wrap` usage: `encrypt(..., algorithm="aes-kwp")`. A backend that
has it does it inside its hardware (PKCS#11: C_WrapKey with CKM_AES_KEY_WRAP_PAD)."""

AES_CBC_PAD = "aes-cbc-pad"
"""AES-256-CBC with PKCS#7 padding and a random 16-byte IV: `encrypt(..., algorithm=
"aes-cbc-pad")` gives iv ‖ ciphertext, and takes no associated data. It is not
authenticated, so it is never a default: it is there for KMIP clients that ask for it
(MongoDB's delegated mode, EDB). A backend that has it runs it inside its hardware
(PKCS#11: CKM_AES_CBC_PAD). A failed decryption says nothing of why (no padding oracle
in the message), but the caller of an unauthenticated mode must authenticate elsewhere."""
CBC_IV = 16

KEK_ALGORITHMS = (*RSA_ENCRYPT_ALGORITHMS, AES_KEY_WRAP)
"""What `strongroom encrypt --algorithm` (the envelope's data-key wrap) takes; the CLI's
choices and help, docs/cli.md and docs/envelope.md all say this list."""
KEK_ALGORITHMS_HELP = (
    "How the data key is wrapped. An RSA KEK: oaep-sha256 or oaep-sha1 (default: the one "
    "recorded with the key, which its backend can decrypt). An AES KEK: aes-kwp (RFC 5649 "
    "in the token; the default for an AES key that may wrap but not encrypt). Other KEKs "
    "take none."
)

RSA_ENCRYPT_ATTRIBUTE = "rsa_encrypt"
"""Catalog attribute of an RSA key (version) with the encrypt or decrypt usage: the OAEP
variant its backend decrypts, chosen when the key is made and used whenever `encrypt`,
`decrypt` or an envelope is given no algorithm. Keys made before it existed mean
oaep-sha256."""


@runtime_checkable
class RsaDecryptVariants(Protocol):
    """A backend whose RSA keys decrypt only some of RSA_ENCRYPT_ALGORITHMS."""

    def rsa_encrypt_algorithms(self) -> tuple[str, ...]:
        """The RSA_ENCRYPT_ALGORITHMS this backend's RSA keys decrypt, preferred first."""
        ...


def rsa_decrypt_algorithms(backend: object) -> tuple[str, ...]:
    """The OAEP variants `backend` decrypts, preferred first: all of them unless it says."""
    if isinstance(backend, RsaDecryptVariants):
        return backend.rsa_encrypt_algorithms()
    return RSA_ENCRYPT_ALGORITHMS


def check_rsa_encrypt_algorithm(algorithm: str | None) -> str:
    """RSA-OAEP with SHA-256 (the default) or, for tokens that only have it, SHA-1."""
    algorithm = algorithm or "oaep-sha256"
    if algorithm not in RSA_ENCRYPT_ALGORITHMS:
        raise InvalidArgument(
            f"unknown RSA encryption algorithm {algorithm!r}; "
            f"use one of {', '.join(RSA_ENCRYPT_ALGORITHMS)}"
        )
    return algorithm


def oaep(algorithm: str | None = None) -> padding.OAEP:
    """OAEP with MGF1 and no label, hashing with SHA-256 unless `algorithm` is oaep-sha1."""
    digest = hashes.SHA1 if check_rsa_encrypt_algorithm(algorithm) == "oaep-sha1" else hashes.SHA256
    return padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)


def rsa_bits(key_type: KeyType) -> int:
    """The modulus size of an RSA key type (rsa-2048: 2048)."""
    return int(key_type.value.split("-")[1])


def check_sign_algorithm(
    key_type: KeyType, algorithm: str | None, *, prehashed: bool | None = None
) -> None:
    """Only RSA keys take a signature algorithm; refuse it elsewhere rather than ignore it.
    `pkcs1v15-raw` signs a block the caller built, so it is refused unless `prehashed` is
    True (None: the caller checks that itself)."""
    if algorithm is None:
        return
    if key_type.is_rsa:
        if algorithm == RSA_PKCS1V15_RAW:
            if prehashed is False:
                raise InvalidArgument(
                    f"{RSA_PKCS1V15_RAW} signs a DigestInfo the caller built: "
                    "pass it as prehashed input"
                )
            return
        rsa_padding(algorithm)
        return
    raise InvalidArgument(f"{key_type.value} keys take no signature algorithm (got {algorithm!r})")


def verify_signature(
    key_type: KeyType,
    public: PublicKeyTypes,
    data: bytes,
    signature: bytes,
    algorithm: str | None,
    *,
    prehashed: bool = False,
) -> None:
    """Return None or raise cryptography's InvalidSignature. With `prehashed`, `data` is the
    message's digest (`check_prehashed`)."""
    check_sign_algorithm(key_type, algorithm, prehashed=prehashed)
    if prehashed:
        check_prehashed(key_type, data, algorithm)
    if algorithm == RSA_PKCS1V15_RAW:
        if not isinstance(public, rsa.RSAPublicKey):  # pragma: no cover - checked above
            raise InvalidArgument(f"{key_type.value} keys do not make RSA signatures")
        try:
            block = public.recover_data_from_signature(signature, padding.PKCS1v15(), None)
        except (InvalidSignature, ValueError):
            raise InvalidSignature() from None
        if not hmac.compare_digest(block, data):
            raise InvalidSignature()
        return
    digest = digest_for(key_type, algorithm)
    hashed: Any = Prehashed(digest) if prehashed else digest
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashed))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, rsa_padding(algorithm), hashed)
    else:
        raise InvalidArgument(f"{key_type.value} keys do not make signatures")


def rsa_encrypt(public: PublicKeyTypes, plaintext: bytes, algorithm: str | None = None) -> bytes:
    """RSA-OAEP (SHA-256 unless `algorithm` is oaep-sha1) to a public key."""
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidArgument("RSA-OAEP needs an RSA public key")
    return public.encrypt(plaintext, oaep(algorithm))


def public_key_matches(key_type: KeyType, public: Any) -> bool:
    """True when a `cryptography` public key object is of `key_type`."""
    if key_type in (KeyType.ED25519, KeyType.FIDO_EDDSA):
        return isinstance(public, ed25519.Ed25519PublicKey)
    if key_type is KeyType.FIDO_ES256:
        return isinstance(public, ec.EllipticCurvePublicKey) and isinstance(
            public.curve, ec.SECP256R1
        )
    if key_type is KeyType.X25519:
        return isinstance(public, x25519.X25519PublicKey)
    if key_type in CURVES:
        return isinstance(public, ec.EllipticCurvePublicKey) and isinstance(
            public.curve, type(CURVES[key_type])
        )
    if key_type.is_rsa:
        bits = int(key_type.value.split("-")[1])
        return isinstance(public, rsa.RSAPublicKey) and public.key_size == bits
    return False


def encode_public(public: PublicKeyTypes, fmt: str) -> bytes:
    """Serialise a public key as pem, der (SubjectPublicKeyInfo), raw or openssh."""
    if fmt == "pem":
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if fmt == "der":
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if fmt == "raw":
        if isinstance(public, ed25519.Ed25519PublicKey | x25519.X25519PublicKey):
            return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if isinstance(public, ec.EllipticCurvePublicKey):
            return public.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        raise InvalidArgument("raw format is for Ed25519, X25519 and EC keys; use pem or der")
    if fmt == "openssh":
        if isinstance(public, x25519.X25519PublicKey) or (
            isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256K1)
        ):
            raise InvalidArgument("OpenSSH has no format for this key type; use pem or der")
        return public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    raise InvalidArgument(f"unknown public key format {fmt!r}; use pem, der, raw or openssh")


def load_peer_public(key_type: KeyType, data: bytes | PublicKeyTypes) -> PublicKeyTypes:
    """A peer's public key for agreement: an object, PEM, DER, or raw bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        public = data
    else:
        public = _parse_peer(key_type, bytes(data))
    if not public_key_matches(key_type, public):
        raise InvalidArgument(f"the peer public key is not a {key_type.value} key")
    return public


def _parse_peer(key_type: KeyType, raw: bytes) -> PublicKeyTypes:
    try:
        if raw.startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(raw)
        if key_type is KeyType.X25519 and len(raw) == 32:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        if key_type in CURVES and raw[:1] in (b"\x02", b"\x03", b"\x04"):
            return ec.EllipticCurvePublicKey.from_encoded_point(CURVES[key_type], raw)
        return serialization.load_der_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument(
            f"the peer public key is not a valid PEM, DER or raw {key_type.value} key"
        ) from None
