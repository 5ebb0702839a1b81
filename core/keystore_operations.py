"""The key API's operations on keys (docs/api.md): make (generate, import, agree, derive,
unwrap), read (info, keys, public_key, export, attest) and use them (verify, encrypt,
decrypt, exchange, mac, wrap), and random bytes. Each is one audited keystore operation.

`KeyOperations` is a mixin of `Keystore` (docs/decisions.md, "Modules split along their
banners"); the code moved verbatim from keystore.py's "the key API" section. `sign` stays in
keystore.py: the busiest operation writes its audit record inline, through the keystore's
audit log.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from . import algorithms, lifecycle
from .backend import Attester, Backend
from .catalog import Catalog
from .errors import BackendUnavailable, InvalidArgument, PolicyViolation, UnsupportedOperation
from .types import KeyInfo, KeyType, Operation

_IMPORT_FORMATS = ("auto", "raw", "der", "pem")


class KeyOperations:
    """Mixin of `Keystore`: the key API's operations other than `sign`, `adopt` and `delete`."""

    # Set by Keystore.__init__.
    namespace: str
    catalog: Catalog

    if TYPE_CHECKING:  # Keystore's

        def _audited(
            self, op: str, key: str | None, payload: Any = None, **detail: Any
        ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...
        def _ready(self, backend: Backend) -> Backend: ...
        def backend(self, name: str) -> Backend: ...
        @property
        def vault(self) -> Backend: ...
        def _key(
            self, name: str, op: Operation | None, facts: dict[str, Any], version: int | None = None
        ) -> tuple[KeyInfo, Backend]: ...
        def _choose_backend(
            self, key_type: KeyType, op: Operation, backend: str | None, key: str | None = None
        ) -> Backend: ...
        def _new_info(
            self, name: str, key_type: KeyType | str, usage: Any, exportable: bool, backend: str
        ) -> KeyInfo: ...
        def _rsa_encrypt_attributes(self, b: Backend, info: KeyInfo) -> dict[str, str]: ...
        @staticmethod
        def _rsa_encrypt_algorithm(b: Backend, info: KeyInfo, algorithm: str | None) -> str: ...
        def _create(self, info: KeyInfo, backend: Backend, make: Any) -> KeyInfo: ...
        def sign(
            self,
            name: str,
            data: bytes,
            algorithm: str | None = None,
            *,
            envelope: bool = False,
            prehashed: bool = False,
        ) -> bytes: ...

    def generate(
        self,
        name: str,
        key_type: KeyType | str,
        backend: str | None = None,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo:
        """Create a key in `backend`, or the first backend in `order` that can."""
        with self._audited("generate", name, type=str(key_type)) as facts:
            ktype = KeyType.parse(key_type)
            b = self._choose_backend(ktype, Operation.GENERATE, backend, name)
            facts["backend"] = b.name
            info = self._new_info(name, ktype, usage, exportable, b.name)
            info = replace(info, attributes=self._rsa_encrypt_attributes(b, info))
            return self._create(info, b, b.generate)

    def import_key(
        self,
        name: str,
        key_type: KeyType | str,
        material: bytes | bytearray | memoryview,
        backend: str | None = None,
        usage: Any = None,
        exportable: bool = False,
        format: str = "auto",
    ) -> KeyInfo:
        """Store existing key material (raw, DER or PEM). The caller should wipe its copy."""
        with self._audited("import", name, type=str(key_type)) as facts:
            if format not in _IMPORT_FORMATS:
                raise InvalidArgument(
                    f"unknown import format {format!r}; use {', '.join(_IMPORT_FORMATS)}"
                )
            if not isinstance(material, bytes | bytearray | memoryview):
                raise InvalidArgument("key material must be bytes-like")
            ktype = KeyType.parse(key_type)
            b = self._choose_backend(ktype, Operation.IMPORT, backend, name)
            facts["backend"] = b.name
            info = self._new_info(name, ktype, usage, exportable, b.name)
            info = replace(info, attributes=self._rsa_encrypt_attributes(b, info))
            view = memoryview(material).cast("B")
            return self._create(info, b, lambda new: b.import_key(new, view, format))

    def export_key(self, name: str, format: str = "pem") -> bytes:
        """The private key material of an exportable key (pem, der or raw)."""
        with self._audited("export", name, format=format) as facts:
            info, b = self._key(name, Operation.EXPORT, facts)
            if not info.exportable:
                raise PolicyViolation(f"key {name!r} was not created exportable")
            return b.export_key(info, format)

    def info(self, name: str) -> KeyInfo:
        """The catalog entry for `name`."""
        return self.catalog.get(self.namespace, name)

    def keys(self) -> list[KeyInfo]:
        """Every key in this namespace."""
        return self.catalog.list(self.namespace)

    def public_key(self, name: str, version: int | None = None) -> PublicKeyTypes:
        """The public key as a `cryptography` object (of `version`, default the primary)."""
        with self._audited("public_key", name) as facts:
            info, b = self._key(name, None, facts, version)
            if not info.type.is_asymmetric:
                raise InvalidArgument(
                    f"key {name!r} is a {info.type.value} key and has no public key"
                )
            return b.public_key(info)

    def attest(self, name: str, nonce: bytes | None = None) -> dict[str, Any]:
        """A statement from the key's backend that the key lives in its hardware.

        `nonce` (1-64 bytes, random when None) comes from the relying party; the statement
        carries `backend_type`, which `verify_attestation` uses to find the verifier.
        """
        with self._audited("attest", name) as facts:
            info, b = self._key(name, None, facts)
            if not isinstance(b, Attester):
                raise UnsupportedOperation(
                    b.name, "attest", info.type.value, "this backend cannot attest its keys"
                )
            nonce = os.urandom(32) if nonce is None else bytes(nonce)
            if not 1 <= len(nonce) <= 64:
                raise InvalidArgument("an attestation nonce is 1 to 64 bytes")
            return {**b.attest(info, nonce), "backend_type": b.type_name}

    def verify(
        self,
        name: str,
        data: bytes,
        signature: bytes,
        algorithm: str | None = None,
        *,
        version: int | None = None,
        envelope: bool = False,
        prehashed: bool = False,
    ) -> None:
        """Return None, or raise cryptography's InvalidSignature.

        A bare signature is checked with `version` (default: the primary version); an
        enveloped one (`envelope=True`) with the version it names. With `prehashed=True`,
        `data` is the message's digest, as for `sign`.
        """
        detail: dict[str, Any] = {"size": len(data)}
        if prehashed:
            detail["prehashed"] = True
        with self._audited("verify", name, data, **detail) as facts:
            if envelope:
                version, signature = lifecycle.unpack(
                    lifecycle.SIGNATURE_MAGIC, signature, "signature"
                )
            info, b = self._key(name, Operation.VERIFY, facts, version)
            algorithms.check_sign_algorithm(info.type, algorithm, prehashed=prehashed)
            if prehashed:
                algorithms.check_prehashed(info.type, data, algorithm)
                b.verify_digest(info, bytes(data), bytes(signature), algorithm)
            else:
                b.verify(info, bytes(data), bytes(signature), algorithm)

    def encrypt(
        self,
        name: str,
        plaintext: bytes,
        aad: bytes = b"",
        algorithm: str | None = None,
        *,
        envelope: bool = False,
    ) -> bytes:
        """AEAD-encrypt with a symmetric key, or RSA-OAEP to an RSA key's public half.

        Uses the primary version. With `envelope=True` the result carries that version
        (docs/lifecycle.md), so it still decrypts after the key is rotated.
        """
        with self._audited("encrypt", name, plaintext, size=len(plaintext)) as facts:
            if algorithm == algorithms.AES_KEY_WRAP:  # a key wrap: needs the `wrap` usage
                info, b = self._key(name, Operation.WRAP, facts)
                if aad:
                    raise InvalidArgument("AES key wrap takes no associated data")
                ct = b.encrypt(info, bytes(plaintext), b"", algorithm)
            else:
                info, b = self._key(name, Operation.ENCRYPT, facts)
                if info.type.is_rsa:
                    if aad:
                        raise InvalidArgument("RSA-OAEP takes no associated data")
                    oaep = self._rsa_encrypt_algorithm(b, info, algorithm)
                    ct = algorithms.rsa_encrypt(b.public_key(info), bytes(plaintext), oaep)
                else:
                    ct = b.encrypt(info, bytes(plaintext), bytes(aad), algorithm)
            if envelope:
                return lifecycle.pack(lifecycle.CIPHERTEXT_MAGIC, info.version, ct)
            return ct

    def decrypt(
        self,
        name: str,
        ciphertext: bytes,
        aad: bytes = b"",
        algorithm: str | None = None,
        *,
        version: int | None = None,
        envelope: bool = False,
    ) -> bytes:
        """Decrypt what `encrypt` made; IntegrityError if it was altered or the key is wrong.

        A bare ciphertext is decrypted with `version` (default: the primary version); an
        enveloped one (`envelope=True`) with the version it names. Versions below the key's
        min_decryption_version raise VersionRetired.
        """
        with self._audited("decrypt", name, ciphertext, size=len(ciphertext)) as facts:
            if envelope:
                version, ciphertext = lifecycle.unpack(
                    lifecycle.CIPHERTEXT_MAGIC, ciphertext, "ciphertext"
                )
            if algorithm == algorithms.AES_KEY_WRAP:  # an unwrap: needs the `unwrap` usage
                info, b = self._key(name, Operation.UNWRAP, facts, version)
                if aad:
                    raise InvalidArgument("AES key wrap takes no associated data")
            else:
                info, b = self._key(name, Operation.DECRYPT, facts, version)
            if info.type.is_rsa:
                if aad:
                    raise InvalidArgument("RSA-OAEP takes no associated data")
                algorithm = algorithm or info.attributes.get(algorithms.RSA_ENCRYPT_ATTRIBUTE)
            return b.decrypt(info, bytes(ciphertext), bytes(aad), algorithm)

    def agree(
        self,
        name: str,
        peer: bytes | PublicKeyTypes,
        new_name: str,
        key_type: KeyType | str = KeyType.AES_256,
        usage: Any = None,
        salt: bytes = b"",
        info: bytes = b"",
        exportable: bool = False,
    ) -> KeyInfo:
        """ECDH/X25519 with `peer`, then HKDF-SHA256 into a new key; the secret stays inside."""
        with self._audited("agree", name, new_key=new_name) as facts:
            src, b = self._key(name, Operation.AGREE, facts)
            public = algorithms.load_peer_public(src.type, peer)
            new = self._new_info(new_name, key_type, usage, exportable, b.name)
            return self._create(new, b, lambda n: b.agree(src, public, n, bytes(salt), bytes(info)))

    def exchange(self, name: str, peer: bytes | PublicKeyTypes) -> bytes:
        """The raw ECDH/X25519 shared secret with `peer` (usage agree), for callers that
        derive their own keys, as cryptography's `exchange` does; `agree` keeps the secret
        inside instead. The caller owns the returned bytes and should wipe them."""
        with self._audited("exchange", name) as facts:
            src, b = self._key(name, Operation.AGREE, facts)
            return b.exchange(src, algorithms.load_peer_public(src.type, peer))

    def derive(
        self,
        name: str,
        new_name: str,
        key_type: KeyType | str = KeyType.AES_256,
        usage: Any = None,
        salt: bytes = b"",
        info: bytes = b"",
        exportable: bool = False,
    ) -> KeyInfo:
        """HKDF-SHA256 from a key into a new key of the same backend."""
        with self._audited("derive", name, new_key=new_name) as facts:
            src, b = self._key(name, Operation.DERIVE, facts)
            new = self._new_info(new_name, key_type, usage, exportable, b.name)
            return self._create(new, b, lambda n: b.derive(src, n, bytes(salt), bytes(info)))

    def mac(self, name: str, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` with an HMAC key (the same as `sign` on such a key)."""
        if self.info(name).type is not KeyType.HMAC_SHA256:
            raise InvalidArgument(f"key {name!r} is not an HMAC key")
        return self.sign(name, data)

    def wrap(self, wrapping_key: str, name: str) -> bytes:
        """Wrap the exportable key `name` under `wrapping_key` (AES key wrap with padding)."""
        with self._audited("wrap", wrapping_key, target=name) as facts:
            wk, b = self._key(wrapping_key, Operation.WRAP, facts)
            target = self.catalog.get(self.namespace, name)
            if not target.exportable:
                raise PolicyViolation(
                    f"key {name!r} was not created exportable and cannot be wrapped"
                )
            if target.backend != wk.backend:
                raise UnsupportedOperation(
                    wk.backend,
                    "wrap",
                    target.type.value,
                    f"key {name!r} is in backend {target.backend!r}",
                )
            return b.wrap(wk, target)

    def unwrap(
        self,
        wrapping_key: str,
        blob: bytes,
        new_name: str,
        key_type: KeyType | str,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo:
        """Unwrap a blob made by `wrap` (or RFC 5649 elsewhere) into a new key."""
        with self._audited("unwrap", wrapping_key, new_key=new_name) as facts:
            wk, b = self._key(wrapping_key, Operation.UNWRAP, facts)
            new = self._new_info(new_name, key_type, usage, exportable, b.name)
            return self._create(new, b, lambda n: b.unwrap(wk, bytes(blob), n))

    def random(self, n: int, backend: str | None = None) -> bytes:
        """`n` random bytes from a backend's generator (the vault's by default)."""
        with self._audited("random", None, size=n) as facts:
            if not isinstance(n, int) or n < 1 or n > 1 << 20:
                raise InvalidArgument("random takes a byte count from 1 to 1048576")
            b = self.backend(backend) if backend else self.vault
            facts["backend"] = b.name
            if b.random_needs_open:
                self._ready(b)
            elif (reason := b.availability()) is not None:
                raise BackendUnavailable(b.name, reason)
            return b.random(n)
