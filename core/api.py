"""The key API, once: `KeyAPI` is what both faces of Strongroom serve.

`strongroom.open()` returns a `Keystore` (in process) and `strongroom.connect()` a
`RemoteKeystore` (one request to `strongroom serve` per call); both satisfy `KeyAPI`, and
mypy checks it (`_both_serve_the_key_api` in `strongroom.cli`). Code that uses keys
should be typed against `KeyAPI`, so it runs the same either way.

What is not here is not offered through the service: the keystore's own machinery (vault
commands, audit checkpoints, seed procedures, `trim`, `purge_due`, the envelope streams).
A face that offers those asks for a `Keystore` by name.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .backend import Capability
from .types import KeyInfo, KeyType, KeyVersion

requester: ContextVar[str | None] = ContextVar("strongroom_requester", default=None)
"""Who a face asks on behalf of, in its own words: `strongroom ssh-agent` sets its peer and
destination (`ssh-agent[uid=1000 pid=52811 dest=SHA256:...]`) around each signature. A
`RemoteKeystore` sends it with each request (`REQUESTER_HEADER`) and the service records
it in the audit record as `requester`, beside the authenticated identity, which it never
replaces: it is the client's claim."""
REQUESTER_HEADER = "x-strongroom-requester"
REQUESTER_PATTERN = re.compile(r"[\x20-\x7e]{1,256}")
"""What a requester note may be: 1-256 printable ASCII characters (a header value)."""


@dataclass(frozen=True)
class BackendStatus:
    """What `strongroom backends` shows for one configured backend."""

    name: str
    type: str
    available: bool
    reason: str | None
    capabilities: frozenset[Capability]
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        ops: dict[str, list[str]] = {}
        for key_type, op in sorted(self.capabilities):
            ops.setdefault(key_type.value, []).append(op.value)
        return {
            "name": self.name,
            "type": self.type,
            "available": self.available,
            "reason": self.reason,
            "capabilities": ops,
            "details": self.details,
        }


class KeyAPI(Protocol):
    """The key API of `strongroom.open()` and `strongroom.connect()`.

    The signatures are `Keystore`'s; its docstrings say what each method does. `usage` is
    a `Usage`, a string such as "sign,verify", an iterable of either, or None (the type's
    default usage).
    """

    @property
    def namespace(self) -> str:
        """The namespace whose keys this object sees (a tenant's, through the service)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...

    # -- backends and random bytes -------------------------------------------------------------
    def backends(self) -> list[BackendStatus]: ...

    def random(self, n: int, backend: str | None = None) -> bytes: ...

    # -- making and registering keys -----------------------------------------------------------
    def generate(
        self,
        name: str,
        key_type: KeyType | str,
        backend: str | None = None,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo: ...

    def import_key(
        self,
        name: str,
        key_type: KeyType | str,
        material: bytes | bytearray | memoryview,
        backend: str | None = None,
        usage: Any = None,
        exportable: bool = False,
        format: str = "auto",
    ) -> KeyInfo: ...

    def adopt(
        self,
        name: str,
        backend: str,
        ref: dict[str, str],
        key_type: KeyType | str | None = None,
        usage: Any = None,
    ) -> KeyInfo: ...

    def derive(
        self,
        name: str,
        new_name: str,
        key_type: KeyType | str = KeyType.AES_256,
        usage: Any = None,
        salt: bytes = b"",
        info: bytes = b"",
        exportable: bool = False,
    ) -> KeyInfo: ...

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
    ) -> KeyInfo: ...

    def unwrap(
        self,
        wrapping_key: str,
        blob: bytes,
        new_name: str,
        key_type: KeyType | str,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo: ...

    # -- reading keys --------------------------------------------------------------------------
    def info(self, name: str) -> KeyInfo: ...

    def keys(self) -> list[KeyInfo]: ...

    def versions(self, name: str) -> list[KeyVersion]: ...

    def public_key(self, name: str, version: int | None = None) -> PublicKeyTypes: ...

    def attest(self, name: str, nonce: bytes | None = None) -> dict[str, Any]: ...

    def private_key(
        self, name: str
    ) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        """The key as a `cryptography` private key whose operations are this API's calls
        (`strongroom.pkey.private_key`)."""
        ...

    def export_key(self, name: str, format: str = "pem") -> bytes: ...

    # -- certificates kept with keys (docs/x509.md) --------------------------------------------
    def set_certificate(self, name: str, data: bytes) -> list[x509.Certificate]: ...

    def certificate(self, name: str) -> list[x509.Certificate]: ...

    def wrap(self, wrapping_key: str, name: str) -> bytes: ...

    # -- using keys ----------------------------------------------------------------------------
    def sign(
        self,
        name: str,
        data: bytes,
        algorithm: str | None = None,
        *,
        envelope: bool = False,
        prehashed: bool = False,
    ) -> bytes: ...

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
    ) -> None: ...

    def mac(self, name: str, data: bytes) -> bytes: ...

    def exchange(self, name: str, peer: bytes | PublicKeyTypes) -> bytes:
        """The raw ECDH/X25519 shared secret with `peer` (usage agree)."""
        ...

    def encrypt(
        self,
        name: str,
        plaintext: bytes,
        aad: bytes = b"",
        algorithm: str | None = None,
        *,
        envelope: bool = False,
    ) -> bytes: ...

    def decrypt(
        self,
        name: str,
        ciphertext: bytes,
        aad: bytes = b"",
        algorithm: str | None = None,
        *,
        version: int | None = None,
        envelope: bool = False,
    ) -> bytes: ...

    def rewrap(
        self, name: str, ciphertext: bytes, aad: bytes = b"", algorithm: str | None = None
    ) -> bytes: ...

    # -- lifecycle -----------------------------------------------------------------------------
    def rotate(self, name: str, backend: str | None = None) -> KeyInfo: ...

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo: ...

    def disable(self, name: str) -> KeyInfo: ...

    def enable(self, name: str) -> KeyInfo: ...

    def delete(self, name: str) -> None: ...

    def schedule_deletion(self, name: str, wait: timedelta | None = None) -> KeyInfo | None: ...

    def cancel_deletion(self, name: str) -> KeyInfo: ...


__all__ = ["BackendStatus", "KeyAPI"]
