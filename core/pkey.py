"""Strongroom keys as `cryptography` private keys (docs/x509.md).

`private_key(api, name)` returns an object that *is* an `ec.EllipticCurvePrivateKey`,
`rsa.RSAPrivateKey` or `ed25519.Ed25519PrivateKey` (a subclass of the ABC), so code that
takes a `cryptography` private key (the X.509 builders, PyJWT, ...) can use a key that
lives in a TPM, an HSM, a PIV card or the vault. It holds no key material: `sign` and
`decrypt` are `KeyAPI.sign` and `KeyAPI.decrypt`, so each call is usage-checked, audited
and done with the key's primary version, in process or through `strongroom.connect()`.

A recipe over `KeyAPI` (docs/architecture.md, R4): it imports only the contract. What the
keystore cannot do is refused with a typed error, never worked around here:

- the private half never leaves: `private_bytes`, `private_bytes_raw` and
  `private_numbers` raise UnsupportedOperation;
- ECDH `exchange` goes to `KeyAPI.exchange` (usage agree, audited): the raw shared secret,
  which the caller then owns, as with cryptography's own keys; only `ec.ECDH()` is taken;
- a signature hash other than the ones the key type signs with (`algorithms.digest_for`:
  SHA-256, SHA-384 for P-384, SHA-512 too for RSA PKCS#1 v1.5), deterministic ECDSA, PSS
  with another salt length or MGF1 hash, and RSA decryption other than OAEP (SHA-256 or
  SHA-1, no label) raise UnsupportedOperation naming what is supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed

from . import algorithms
from .errors import InvalidArgument, StrongroomError, UnsupportedOperation
from .types import KeyInfo, KeyType

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from .api import KeyAPI

Buffer = bytes | bytearray | memoryview

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""What `private_key` returns: one of `cryptography`'s private key types."""


def private_key(api: KeyAPI, name: str) -> PrivateKey:
    """The key `name` as the matching `cryptography` private key type.

    ECDSA keys (P-256, P-384, secp256k1) give an `EllipticCurvePrivateKey`, RSA keys an
    `RSAPrivateKey`, Ed25519 keys an `Ed25519PrivateKey`. FIDO credentials (their
    signatures are WebAuthn assertions, not bare signatures) and X25519 keys (agreement
    only) raise UnsupportedOperation; symmetric keys InvalidArgument.
    """
    info = api.info(name)
    t = info.type
    if t.is_fido:
        raise UnsupportedOperation(
            info.backend,
            "private_key",
            t.value,
            "a FIDO credential signs WebAuthn assertions, not the bytes a certificate or "
            "token needs",
        )
    if t.is_ecdsa:
        return _EcKey(api, info)
    if t.is_rsa:
        return _RsaKey(api, info)
    if t is KeyType.ED25519:
        return _Ed25519Key(api, info)
    if t is KeyType.X25519:
        raise UnsupportedOperation(
            info.backend,
            "private_key",
            t.value,
            "an X25519 key only agrees, and the keystore keeps agreed secrets inside",
        )
    raise InvalidArgument(f"key {name!r} is a {t.value} key and has no private key half")


class _KeyRef:
    """What every adapter holds: the API, the key's name, and its type and backend."""

    def __init__(self, api: KeyAPI, info: KeyInfo) -> None:
        self._api = api
        self._name = info.name
        self._type = info.type
        self._backend = info.backend

    @property
    def key_name(self) -> str:
        """The Strongroom key this object signs with."""
        return self._name

    def __repr__(self) -> str:
        return f"<strongroom private key {self._name!r} ({self._type.value}, {self._backend})>"

    def _refuse(self, operation: str, detail: str) -> NoReturn:
        raise UnsupportedOperation(self._backend, operation, self._type.value, detail)

    def _no_export(self) -> NoReturn:
        self._refuse(
            "private_bytes",
            f"the private half of {self._name!r} stays in its backend; use public_key()",
        )

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        self._no_export()

    def _public(self) -> PublicKeyTypes:
        # Asked each time, not cached: after a rotation `sign` uses the new primary version,
        # and the public key must be that version's too.
        return self._api.public_key(self._name)

    def _check_hash(self, algorithm: object, rsa_algorithm: str | None = None) -> bool:
        """Whether the signature hash is `Prehashed`; refuse one the key type (and RSA
        signature algorithm) does not use."""
        prehashed = isinstance(algorithm, Prehashed)
        chosen = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        wanted = algorithms.digest_for(self._type, rsa_algorithm)
        if not isinstance(chosen, hashes.HashAlgorithm) or chosen.name != wanted.name:
            got = getattr(chosen, "name", type(chosen).__name__)
            self._refuse("sign", f"{self._type.value} keys sign with {wanted.name}, not {got}")
        return prehashed

    def _sign(self, data: Buffer, prehashed: bool, algorithm: str | None = None) -> bytes:
        return self._api.sign(self._name, bytes(data), algorithm, prehashed=prehashed)

    def __copy__(self) -> Any:
        return self  # holds no state that a copy could change

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self


class _EcKey(_KeyRef, ec.EllipticCurvePrivateKey):
    """An ECDSA key in a Strongroom backend, as an `EllipticCurvePrivateKey`."""

    @property
    def curve(self) -> ec.EllipticCurve:
        return algorithms.CURVES[self._type]

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        public = self._public()
        if not isinstance(public, ec.EllipticCurvePublicKey):  # pragma: no cover - typed API
            raise StrongroomError(f"key {self._name!r} did not give an EC public key")
        return public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA through `KeyAPI.sign`: a DER signature, as `cryptography` makes one."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            self._refuse("sign", "EC keys make ECDSA signatures only")
        if signature_algorithm.deterministic_signing:
            self._refuse("sign", "the backend makes randomized ECDSA signatures, not RFC 6979")
        return self._sign(data, self._check_hash(signature_algorithm.algorithm))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        if not isinstance(algorithm, ec.ECDH):
            self._refuse("exchange", "EC keys exchange with ec.ECDH() only")
        if not isinstance(peer_public_key, ec.EllipticCurvePublicKey):
            raise InvalidArgument("ECDH needs an EC peer public key")
        return self._api.exchange(self._name, peer_public_key)

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._no_export()


class _RsaKey(_KeyRef, rsa.RSAPrivateKey):
    """An RSA key in a Strongroom backend, as an `RSAPrivateKey`."""

    @property
    def key_size(self) -> int:
        return int(self._type.value.split("-")[1])

    def public_key(self) -> rsa.RSAPublicKey:
        public = self._public()
        if not isinstance(public, rsa.RSAPublicKey):  # pragma: no cover - typed API
            raise StrongroomError(f"key {self._name!r} did not give an RSA public key")
        return public

    def sign(
        self,
        data: Buffer,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo,
    ) -> bytes:
        """RSA PKCS#1 v1.5 with SHA-256 or SHA-512, or PSS with SHA-256 (MGF1 with the same
        hash, salt as long as the digest)."""
        name = self._padding_name(padding, algorithm)
        prehashed = self._check_hash(algorithm, name)
        return self._sign(data, prehashed, name)

    def _padding_name(self, pad: padding.AsymmetricPadding, algorithm: object) -> str:
        if isinstance(pad, padding.PKCS1v15):
            chosen = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
            if isinstance(chosen, hashes.SHA512):
                return algorithms.RSA_PKCS1V15_SHA512
            return "pkcs1v15"
        if isinstance(pad, padding.PSS):
            wanted = algorithms.digest_for(self._type)
            salt = pad._salt_length  # cryptography keeps it private
            mgf = pad.mgf
            mgf_hash = mgf._algorithm if isinstance(mgf, padding.MGF1) else None
            salt_ok = salt is padding.PSS.DIGEST_LENGTH or salt == wanted.digest_size
            if salt_ok and isinstance(mgf_hash, hashes.HashAlgorithm):
                if mgf_hash.name == wanted.name:
                    return "pss"
            self._refuse(
                "sign",
                f"PSS is supported with MGF1-{wanted.name} and a {wanted.digest_size}-byte "
                "salt (PSS.DIGEST_LENGTH) only",
            )
        self._refuse("sign", f"RSA signatures take PKCS1v15 or PSS padding, not {pad.name}")

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """RSA-OAEP through `KeyAPI.decrypt` (SHA-256, or SHA-1 for tokens that need it)."""
        return self._api.decrypt(self._name, bytes(ciphertext), algorithm=self._oaep_name(padding))

    def _oaep_name(self, pad: padding.AsymmetricPadding) -> str:
        if isinstance(pad, padding.OAEP):
            mgf = pad.mgf
            mgf_hash = mgf._algorithm if isinstance(mgf, padding.MGF1) else None
            label = pad._label  # cryptography keeps it private
            name = pad.algorithm.name
            if not label and getattr(mgf_hash, "name", None) == name:
                if name == "sha256":
                    return "oaep-sha256"
                if name == "sha1":
                    return "oaep-sha1"
        self._refuse(
            "decrypt",
            "RSA decryption is OAEP with MGF1 and SHA-256 (or SHA-1) and no label only",
        )

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        self._no_export()


class _Ed25519Key(_KeyRef, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in a Strongroom backend, as an `Ed25519PrivateKey`."""

    def public_key(self) -> ed25519.Ed25519PublicKey:
        public = self._public()
        if not isinstance(public, ed25519.Ed25519PublicKey):  # pragma: no cover - typed API
            raise StrongroomError(f"key {self._name!r} did not give an Ed25519 public key")
        return public

    def sign(self, data: Buffer) -> bytes:
        """Ed25519 (RFC 8032) through `KeyAPI.sign`: the raw 64-byte signature."""
        return self._sign(data, False)

    def private_bytes_raw(self) -> bytes:
        self._no_export()


__all__ = ["PrivateKey", "private_key"]
