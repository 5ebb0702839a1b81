"""Keys as KMIP carries them: which key type a Cryptographic Algorithm and Length name, the
Key Format Types of private and public keys (PKCS#1, PKCS#8, X.509, EC Private Key), and
the signature parameters of Sign and SignatureVerify (docs/kmip.md).

Private key material comes from the keystore as PKCS#8 DER (`export_key(..., "der")`) and
goes into it as PKCS#1 or PKCS#8 DER (the backend's strict DER reader checks it); only a
Get in another format re-encodes it here. Public keys and certificates are not secret.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ..types import KeyType
from .tags import (
    CryptographicAlgorithm,
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    PaddingMethod,
    RecommendedCurve,
    ResultReason,
)


class KmipFailure(Exception):
    """An operation failed with this KMIP result reason; `message` goes to the client."""

    def __init__(self, reason: ResultReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- key types ---------------------------------------------------------------------------------
_BY_ALGORITHM: dict[tuple[int, int | None], KeyType] = {
    (CryptographicAlgorithm.AES, 256): KeyType.AES_256,
    (CryptographicAlgorithm.HMAC_SHA256, 256): KeyType.HMAC_SHA256,
    (CryptographicAlgorithm.HMAC_SHA256, None): KeyType.HMAC_SHA256,
    (CryptographicAlgorithm.RSA, 2048): KeyType.RSA_2048,
    (CryptographicAlgorithm.RSA, 3072): KeyType.RSA_3072,
    (CryptographicAlgorithm.RSA, 4096): KeyType.RSA_4096,
    (CryptographicAlgorithm.ECDSA, 256): KeyType.ECDSA_P256,
    (CryptographicAlgorithm.ECDSA, 384): KeyType.ECDSA_P384,
    (CryptographicAlgorithm.EC, 256): KeyType.ECDSA_P256,
    (CryptographicAlgorithm.EC, 384): KeyType.ECDSA_P384,
    (CryptographicAlgorithm.ED25519, 255): KeyType.ED25519,
    (CryptographicAlgorithm.ED25519, 256): KeyType.ED25519,
    (CryptographicAlgorithm.ED25519, None): KeyType.ED25519,
}
_CURVE_LENGTH: dict[int, int] = {RecommendedCurve.P_256: 256, RecommendedCurve.P_384: 384}
SERVED = (
    "AES-256, HMAC-SHA256, RSA-2048/3072/4096, EC or ECDSA P-256/P-384, Ed25519 "
    "(KMIP 2.0's Cryptographic Algorithm 0x37)"
)
SYMMETRIC = frozenset({KeyType.AES_256, KeyType.HMAC_SHA256})
ASYMMETRIC = frozenset(
    {
        KeyType.RSA_2048,
        KeyType.RSA_3072,
        KeyType.RSA_4096,
        KeyType.ECDSA_P256,
        KeyType.ECDSA_P384,
        KeyType.ED25519,
    }
)


def key_type_of(algorithm: object, length: object, curve: object = None) -> KeyType:
    """The key type a Cryptographic Algorithm and Length (or Recommended Curve) name."""
    if not isinstance(algorithm, int):
        raise KmipFailure(ResultReason.MISSING_DATA, "no Cryptographic Algorithm given")
    if isinstance(curve, int) and length is None:
        length = _CURVE_LENGTH.get(curve)
    if length is not None and not isinstance(length, int):
        raise KmipFailure(ResultReason.INVALID_FIELD, "Cryptographic Length is an integer")
    found = _BY_ALGORITHM.get((algorithm, length))
    if found is None:
        name = (
            CryptographicAlgorithm(algorithm).name
            if algorithm in _ALGORITHM_VALUES
            else hex(algorithm)
        )
        raise KmipFailure(
            ResultReason.FEATURE_NOT_SUPPORTED,
            f"{name} with length {length} is not served; the keys here are {SERVED}",
        )
    return found


_ALGORITHM_VALUES = {int(a) for a in CryptographicAlgorithm}


def algorithm_of(key_type: KeyType) -> tuple[CryptographicAlgorithm, int]:
    """The Cryptographic Algorithm and Length KMIP reports for a key type."""
    if key_type is KeyType.AES_256:
        return CryptographicAlgorithm.AES, 256
    if key_type is KeyType.HMAC_SHA256:
        return CryptographicAlgorithm.HMAC_SHA256, 256
    if key_type.is_rsa:
        return CryptographicAlgorithm.RSA, int(key_type.value.split("-")[1])
    if key_type is KeyType.ECDSA_P256:
        return CryptographicAlgorithm.ECDSA, 256
    if key_type is KeyType.ECDSA_P384:
        return CryptographicAlgorithm.ECDSA, 384
    if key_type is KeyType.ED25519:
        return CryptographicAlgorithm.ED25519, 255
    raise KmipFailure(
        ResultReason.FEATURE_NOT_SUPPORTED, f"a {key_type.value} key has no KMIP form here"
    )


# -- private keys ------------------------------------------------------------------------------
def der_flavour(der: bytes) -> str:
    """ "pkcs8", "pkcs1" (RSAPrivateKey) or "sec1" (ECPrivateKey) by the DER's first fields
    (a peek for the Get format; the backend's strict reader checks the whole key)."""
    try:
        if der[0] != 0x30:
            raise IndexError
        n = der[1]
        pos = 2 + (n & 0x7F if n & 0x80 else 0)
        if der[pos : pos + 2] != b"\x02\x01":
            raise IndexError
        version, following = der[pos + 2], der[pos + 3]
    except IndexError:
        raise KmipFailure(ResultReason.INVALID_FIELD, "the key material is not a DER private key")
    if version == 0 and following == 0x30:
        return "pkcs8"
    if version == 0 and following == 0x02:
        return "pkcs1"
    if version == 1 and following == 0x04:
        return "sec1"
    raise KmipFailure(ResultReason.INVALID_FIELD, "the key material is not a DER private key")


PRIVATE_FORMATS = {
    KeyFormatType.PKCS_8: "pkcs8",
    KeyFormatType.PKCS_1: "pkcs1",
    KeyFormatType.EC_PRIVATE_KEY: "sec1",
}


def private_in(pkcs8: bytes, flavour: str, key_type: KeyType) -> bytes:
    """A private key (PKCS#8 DER, from the keystore) in `flavour`."""
    if flavour == "pkcs8":
        return pkcs8
    if (flavour == "pkcs1" and not key_type.is_rsa) or (
        flavour == "sec1" and not key_type.is_ecdsa
    ):
        raise KmipFailure(
            ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
            f"a {key_type.value} key is given as PKCS#8"
            + (
                " or PKCS#1"
                if key_type.is_rsa
                else " or EC Private Key"
                if key_type.is_ecdsa
                else ""
            ),
        )
    key = serialization.load_der_private_key(pkcs8, None)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# -- public keys and certificates --------------------------------------------------------------
PUBLIC_FORMATS = (KeyFormatType.X_509, KeyFormatType.PKCS_1, KeyFormatType.RAW)


def load_public(der: bytes) -> PublicKeyTypes:
    """A public key from SubjectPublicKeyInfo or PKCS#1 RSAPublicKey DER."""
    try:
        public = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise KmipFailure(
            ResultReason.INVALID_FIELD,
            "the key material is not a DER public key (X.509 SubjectPublicKeyInfo or PKCS#1)",
        ) from None
    if not isinstance(
        public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ):
        raise KmipFailure(
            ResultReason.FEATURE_NOT_SUPPORTED, "public keys here are RSA, EC or Ed25519"
        )
    return public


def public_facts(public: PublicKeyTypes) -> tuple[CryptographicAlgorithm, int]:
    """The Cryptographic Algorithm and Length of a public key."""
    if isinstance(public, rsa.RSAPublicKey):
        return CryptographicAlgorithm.RSA, public.key_size
    if isinstance(public, ec.EllipticCurvePublicKey):
        return CryptographicAlgorithm.ECDSA, public.curve.key_size
    return CryptographicAlgorithm.ED25519, 255


def public_in(public: PublicKeyTypes, fmt: int) -> bytes:
    """A public key as X.509 SubjectPublicKeyInfo or PKCS#1 (RSA) DER."""
    if fmt == KeyFormatType.X_509:
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if fmt == KeyFormatType.PKCS_1 and isinstance(public, rsa.RSAPublicKey):
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise KmipFailure(
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
        "public keys are given as X.509 (SubjectPublicKeyInfo), PKCS#1 for RSA, or as registered",
    )


def load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise KmipFailure(ResultReason.INVALID_FIELD, "not a DER X.509 certificate") from None


def verify_type(public: PublicKeyTypes) -> KeyType:
    """The key type whose signature scheme a public key checks with: its own, or for an RSA
    key of another size RSA-2048's (every RSA scheme here hashes the same way)."""
    if isinstance(public, rsa.RSAPublicKey):
        return KeyType.RSA_2048
    if isinstance(public, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    assert isinstance(public, ec.EllipticCurvePublicKey)
    if isinstance(public.curve, ec.SECP256R1):
        return KeyType.ECDSA_P256
    if isinstance(public.curve, ec.SECP384R1):
        return KeyType.ECDSA_P384
    raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "signatures here are on P-256 and P-384")


# -- signature parameters ----------------------------------------------------------------------
_RSA_BY_DSA = {
    DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION: "pkcs1v15",
    DigitalSignatureAlgorithm.SHA512_WITH_RSA_ENCRYPTION: "pkcs1v15-sha512",
    DigitalSignatureAlgorithm.RSASSA_PSS: "pss",
}
_ECDSA_HASH = {
    KeyType.ECDSA_P256: HashingAlgorithm.SHA_256,
    KeyType.ECDSA_P384: HashingAlgorithm.SHA_384,
}
_ECDSA_BY_DSA: dict[int, HashingAlgorithm] = {
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA256: HashingAlgorithm.SHA_256,
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA384: HashingAlgorithm.SHA_384,
}
SIGNATURES = (
    "RSA PKCS#1 v1.5 with SHA-256 or SHA-512, RSA-PSS with SHA-256 (MGF1 SHA-256, salt the "
    "digest's length), ECDSA P-256 with SHA-256, P-384 with SHA-384, Ed25519"
)


def sign_algorithm(
    key_type: KeyType, padding: int | None, hashing: int | None, dsa: int | None
) -> str | None:
    """The KeyAPI signature algorithm for a Sign's Cryptographic Parameters (None: the key
    type's own); a combination not served is Feature Not Supported."""

    def refuse() -> KmipFailure:
        return KmipFailure(
            ResultReason.FEATURE_NOT_SUPPORTED, f"the signatures served are {SIGNATURES}"
        )

    if key_type.is_rsa:
        if dsa is not None:
            if dsa not in _RSA_BY_DSA:
                raise refuse()
            algorithm = _RSA_BY_DSA[DigitalSignatureAlgorithm(dsa)]
            # a Padding Method beside it must say the same: PSS with SHA256WithRSAEncryption
            # (PKCS#1 v1.5) is a contradiction, refused rather than signed one way silently
            if padding not in (
                None,
                PaddingMethod.PSS if algorithm == "pss" else PaddingMethod.PKCS1V15,
            ):
                raise refuse()
            if hashing not in (
                None,
                HashingAlgorithm.SHA_256
                if algorithm != "pkcs1v15-sha512"
                else HashingAlgorithm.SHA_512,
            ):
                raise refuse()
            return algorithm
        if padding in (None, PaddingMethod.PKCS1V15):
            if hashing in (None, HashingAlgorithm.SHA_256):
                return "pkcs1v15"
            if hashing == HashingAlgorithm.SHA_512:
                return "pkcs1v15-sha512"
        elif padding == PaddingMethod.PSS and hashing in (None, HashingAlgorithm.SHA_256):
            return "pss"
        raise refuse()
    if key_type.is_ecdsa:
        wanted = _ECDSA_HASH.get(key_type)
        if dsa is not None:
            if _ECDSA_BY_DSA.get(dsa) != wanted:
                raise refuse()
        if hashing not in (None, wanted) or padding not in (None, PaddingMethod.NONE):
            raise refuse()
        return None
    if key_type is KeyType.ED25519:
        if dsa is not None or padding not in (None, PaddingMethod.NONE):
            raise refuse()
        return None
    raise KmipFailure(ResultReason.INVALID_FIELD, f"a {key_type.value} key does not sign")


__all__ = [
    "ASYMMETRIC",
    "PRIVATE_FORMATS",
    "PUBLIC_FORMATS",
    "SYMMETRIC",
    "KmipFailure",
    "algorithm_of",
    "der_flavour",
    "key_type_of",
    "load_certificate",
    "load_public",
    "private_in",
    "public_facts",
    "public_in",
    "sign_algorithm",
    "verify_type",
]
