"""`strongroom.connect()`'s client: the key API of `strongroom.open()`, over the wire to
`strongroom serve`.

The transport is httpx: a Unix socket (`unix:/run/strongroom/serve.sock`) or HTTPS
(`https://host:8443`, with the service's CA and optionally a client certificate). Each
method names its operation in `wire.OPS`, which gives its method, path, the encoding of
its fields and the shape of the answer. Errors come back as the same `strongroom.errors`
classes the in-process keystore raises (`wire.error_from_wire`).

This module imports only `wire` and the contract layer: a client installs no server side.
Reading the config for `connect()`'s defaults is `strongroom.service.connect`'s business.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .. import pkey
from ..api import REQUESTER_HEADER, REQUESTER_PATTERN, BackendStatus, requester
from ..errors import (
    BackendUnavailable,
    InvalidArgument,
    NotPermitted,
    RateLimited,
    RequestTooLarge,
    StrongroomError,
    TenantNotFound,
    VaultLocked,
)
from ..types import KeyInfo, KeyType, KeyVersion, Operation, Usage
from . import wire

TOKEN_ENV = "STRONGROOM_TOKEN"  # noqa: S105 - the variable name, not a token


_LOCAL: dict[str, type[StrongroomError]] = {
    "NotPermitted": NotPermitted,
    "TenantNotFound": TenantNotFound,
    "VaultLocked": VaultLocked,
    "RateLimited": RateLimited,
    "RequestTooLarge": RequestTooLarge,
}
"""Error classes of the client's own, for `wire.error_from_wire`."""


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)


def _usage(usage: Any) -> list[str] | None:
    if usage is None:
        return None
    if isinstance(usage, str):
        return [u.strip() for u in usage.split(",") if u.strip()]
    if isinstance(usage, Usage):
        return [usage.value]
    return [u.value if isinstance(u, Usage) else str(u) for u in usage]


def _chain(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode()) if pem else []


_ENCODED_DEFAULTS: dict[int, Any] = {}
"""Each field's default as the wire writes it, by the field's id: the fields are the
constants of `wire.OPS`, so each is encoded once, not on every request."""


def _encoded_default(f: wire.Field) -> Any:
    key = id(f)
    if key not in _ENCODED_DEFAULTS:
        _ENCODED_DEFAULTS[key] = _encode(f, f.default)
    return _ENCODED_DEFAULTS[key]


def _encode(f: wire.Field, value: Any) -> Any:
    """A value as the field's wire type writes it."""
    if f.kind == wire.BYTES:
        return wire.b64(value)
    if f.kind == wire.KEY_TYPE:
        return KeyType.parse(value).value
    if f.kind == wire.USAGE:
        return _usage(value)
    if f.kind == wire.REF:
        return dict(value)
    if f.kind == wire.STRINGS:
        return list(value)
    return value


class RemoteBackend:
    """What the service says of one of its backends (name and capabilities)."""

    def __init__(self, status: BackendStatus) -> None:
        self.name = status.name
        self.type_name = status.type
        self._status = status

    def capabilities(self) -> frozenset[tuple[KeyType, Operation]]:
        return self._status.capabilities


class RemoteKeystore:
    """The `Keystore` API, each call one request to the service. Thread-safe."""

    def __init__(self, client: Any, url: str) -> None:
        self._client = client
        self.url = url
        self._namespace: str | None = None

    @property
    def namespace(self) -> str:
        """The caller's tenant: the namespace its keys are in (asked once, then kept).

        A service admin belongs to no tenant and holds no keys: NotPermitted."""
        if self._namespace is None:
            tenant = self.whoami().get("tenant")
            if not isinstance(tenant, str):
                raise NotPermitted("a service admin holds no keys; use a tenant's identity")
            self._namespace = tenant
        return self._namespace

    # -- plumbing: every request is an operation of wire.OPS -----------------------------------
    def _op(
        self,
        op_name: str,
        key: str | None = None,
        *,
        about: str | None = None,
        path: dict[str, str] | None = None,
        **values: Any,
    ) -> Any:
        """Send the operation `op_name` and return the answer's JSON. `key` fills the path's
        {name}, `path` any other path parameter, `values` the request's fields by KeyAPI
        parameter; `about` is the key an error names (default `key`). A field left at None,
        or at its default, is not sent: the service reads an absent field as its default."""
        op = wire.OP[op_name]
        params = dict(path or {})
        if key is not None:
            params["name"] = key
        url = op.path.format(**{k: _segment(v) for k, v in params.items()})
        body: dict[str, Any] | None = None
        if op.body is not None or op.method == "POST":  # a POST always sends an object
            body = {}
            for f in op.body or ():
                value = values.get(f.param)
                if value is None:
                    continue
                value = _encode(f, value)
                if not f.required and f.has_default and value == _encoded_default(f):
                    continue
                body[f.name] = value
        query = {f.name: values[f.param] for f in op.query if values.get(f.param) is not None}
        return self._call(op.method, url, body, about or key, **query)

    def _result(self, op_name: str, key: str | None = None, **values: Any) -> Any:
        """The value of the answer's `result` field (a base64 field decoded)."""
        op = wire.OP[op_name]
        assert op.result is not None
        value = self._op(op_name, key, **values)[op.result]
        fields = op.response if isinstance(op.response, tuple) else ()
        if any(f.name == op.result and f.kind == wire.BYTES for f in fields):
            return _unb64(value)
        return value

    def _bytes(self, op_name: str, key: str | None = None, **values: Any) -> bytes:
        return bytes(self._result(op_name, key, **values))

    def _key(self, op_name: str, key: str | None = None, **values: Any) -> KeyInfo:
        """An operation whose answer is a Key."""
        assert wire.OP[op_name].response == wire.KEY
        return wire.key_from_wire(self._op(op_name, key, **values))

    def _call(
        self, method: str, path: str, body: Any = None, name: str | None = None, **params: Any
    ) -> Any:
        import httpx

        note = requester.get()
        headers = (
            {REQUESTER_HEADER: note}
            if note is not None and REQUESTER_PATTERN.fullmatch(note)
            else None
        )
        try:
            r = self._client.request(
                method, path, json=body, params=params or None, headers=headers
            )
        except httpx.TransportError as e:
            raise BackendUnavailable(
                "service", f"cannot reach the Strongroom service at {self.url}: {e}"
            ) from None
        try:
            payload = r.json()
        except ValueError:
            payload = None
        if r.status_code >= 400:
            raise wire.error_from_wire(r.status_code, payload, name, _LOCAL)
        return payload

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteKeystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the key API ---------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return dict(self._op("whoami"))

    def backends(self) -> list[BackendStatus]:
        return [wire.backend_status_from_wire(d) for d in self._result("list_backends")]

    def backend(self, name: str) -> RemoteBackend:
        for status in self.backends():
            if status.name == name:
                return RemoteBackend(status)
        raise InvalidArgument(f"the service has no backend named {name!r}")

    def generate(
        self,
        name: str,
        key_type: KeyType | str,
        backend: str | None = None,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo:
        return self._key_about(
            "generate",
            name,
            name=name,
            key_type=key_type,
            backend=backend,
            usage=usage,
            exportable=exportable,
        )

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
        """Store existing key material (raw, DER or PEM) in the service's backend. The material
        crosses the connection (TLS or the Unix socket); wiping your copy is up to you."""
        return self._key_about(
            "generate",
            name,
            name=name,
            key_type=key_type,
            material=material,
            backend=backend,
            usage=usage,
            exportable=exportable,
            format=format,
        )

    def _key_about(self, op_name: str, about: str, **values: Any) -> KeyInfo:
        """An operation on no key in the path whose answer is a Key (generate, import)."""
        return wire.key_from_wire(self._op(op_name, about=about, **values))

    def mac(self, name: str, data: bytes) -> bytes:
        return self._bytes("mac", name, data=data)

    def exchange(self, name: str, peer: bytes | PublicKeyTypes) -> bytes:
        """The raw shared secret with `peer` (a public key object, or PEM, DER or raw bytes)."""
        if not isinstance(peer, bytes | bytearray):
            peer = peer.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return self._bytes("exchange", name, peer=bytes(peer))

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
        return self._key(
            "derive",
            name,
            new_name=new_name,
            key_type=key_type,
            usage=usage,
            salt=salt,
            info=info,
            exportable=exportable,
        )

    def rotate(self, name: str, backend: str | None = None) -> KeyInfo:
        return self._key("rotate", name, backend=backend)

    def versions(self, name: str) -> list[KeyVersion]:
        """The key's versions, oldest first (without backend handles)."""
        return [wire.version_from_wire(v) for v in self._result("versions", name)]

    def disable(self, name: str) -> KeyInfo:
        return self._key("disable", name)

    def enable(self, name: str) -> KeyInfo:
        return self._key("enable", name)

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        return self._key("key_config", name, version=version)

    def info(self, name: str) -> KeyInfo:
        return self._key("show_key", name)

    def keys(self) -> list[KeyInfo]:
        return [wire.key_from_wire(d) for d in self._result("list_keys")]

    def delete(self, name: str) -> None:
        """Destroy the key at once, as `Keystore.delete` does."""
        self._op("delete_key", name, now="true")

    def schedule_deletion(self, name: str, wait: timedelta | None = None) -> KeyInfo | None:
        """Delete after `wait` (default: the service's deletion_wait); None if done at once."""
        after = None if wait is None else str(int(wait.total_seconds()))
        r = self._op("delete_key", name, after=after)
        return None if "scheduled" not in r else self.info(name)

    def cancel_deletion(self, name: str) -> KeyInfo:
        return self._key("cancel_deletion", name)

    def public_key(self, name: str, version: int | None = None) -> PublicKeyTypes:
        der = self._bytes("public_key", name, format="der", version=version)
        return serialization.load_der_public_key(der)

    def private_key(self, name: str) -> pkey.PrivateKey:
        """The key as a `cryptography` private key that signs and decrypts through the
        service (the sign and decrypt permissions), as `Keystore.private_key` does in process."""
        return pkey.private_key(self, name)

    def set_certificate(self, name: str, data: bytes) -> list[x509.Certificate]:
        """Keep a certificate or chain with the key (the `manage` permission)."""
        return _chain(self._result("set_certificate", name, data=bytes(data)))

    def certificate(self, name: str) -> list[x509.Certificate]:
        """The certificate or chain kept with the key, leaf first; [] when there is none."""
        return _chain(self._result("certificate", name))

    def attest(self, name: str, nonce: bytes | None = None) -> dict[str, Any]:
        """The key's backend's statement that the key lives in its hardware (the service
        makes the nonce when None); check it with `strongroom.keystore.verify_attestation`."""
        return dict(self._result("attest", name, nonce=nonce))

    def sign(
        self,
        name: str,
        data: bytes,
        algorithm: str | None = None,
        *,
        envelope: bool = False,
        prehashed: bool = False,
    ) -> bytes:
        return self._bytes(
            "sign", name, data=data, algorithm=algorithm, envelope=envelope, prehashed=prehashed
        )

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
        """None, or raise cryptography's InvalidSignature, as `Keystore.verify` does."""
        valid = self._result(
            "verify",
            name,
            data=data,
            signature=signature,
            algorithm=algorithm,
            version=version,
            envelope=envelope,
            prehashed=prehashed,
        )
        if not valid:
            raise InvalidSignature()

    def encrypt(
        self,
        name: str,
        plaintext: bytes,
        aad: bytes = b"",
        algorithm: str | None = None,
        *,
        envelope: bool = False,
    ) -> bytes:
        return self._bytes(
            "encrypt", name, plaintext=plaintext, aad=aad, algorithm=algorithm, envelope=envelope
        )

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
        return self._bytes(
            "decrypt",
            name,
            ciphertext=ciphertext,
            aad=aad,
            algorithm=algorithm,
            version=version,
            envelope=envelope,
        )

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
        """ECDH/X25519 with `peer` (a public key object, or PEM, DER or raw bytes)."""
        if isinstance(peer, bytes | bytearray):
            raw = bytes(peer)
            wire_peer = raw.decode() if raw.lstrip().startswith(b"-----BEGIN") else wire.b64(raw)
        else:
            wire_peer = peer.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        return self._key(
            "agree",
            name,
            peer=wire_peer,
            new_name=new_name,
            key_type=key_type,
            usage=usage,
            salt=salt,
            info=info,
            exportable=exportable,
        )

    def export_key(self, name: str, format: str = "pem") -> bytes:
        """The private key material of an exportable key (pem, der or raw)."""
        found = self._op("export", name, format=format)
        return str(found["pem"]).encode() if format == "pem" else _unb64(found[format])

    def wrap(self, wrapping_key: str, name: str) -> bytes:
        """The exportable key `name` wrapped under `wrapping_key` (AES key wrap, RFC 5649)."""
        return self._bytes("wrap", wrapping_key, name=name)

    def unwrap(
        self,
        wrapping_key: str,
        blob: bytes,
        new_name: str,
        key_type: KeyType | str,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo:
        """Unwrap `blob` (from `wrap`, or RFC 5649 elsewhere) into the new key `new_name`."""
        return self._key(
            "unwrap",
            wrapping_key,
            blob=blob,
            new_name=new_name,
            key_type=key_type,
            usage=usage,
            exportable=exportable,
        )

    def rewrap(
        self, name: str, ciphertext: bytes, aad: bytes = b"", algorithm: str | None = None
    ) -> bytes:
        """Re-encrypt an enveloped ciphertext under the key's primary version; the plaintext
        stays in the service."""
        return self._bytes("rewrap", name, ciphertext=ciphertext, aad=aad, algorithm=algorithm)

    def adopt(
        self,
        name: str,
        backend: str,
        ref: dict[str, str],
        key_type: KeyType | str | None = None,
        usage: Any = None,
    ) -> KeyInfo:
        """Register a key that already exists in the service's `backend`, found by `ref`."""
        return self._key("adopt", name, backend=backend, ref=ref, key_type=key_type, usage=usage)

    def random(self, n: int, backend: str | None = None) -> bytes:
        return self._bytes("random", n=n, backend=backend)

    def vault_control(self) -> RemoteVault:
        return RemoteVault(self)

    # -- the service's own commands (admin) ----------------------------------------------------
    def vault_status(self) -> dict[str, Any]:
        return dict(self._op("vault_status"))

    def vault_lock(self) -> None:
        self._op("vault_lock")

    def vault_unlock(self, method: str | None = None) -> str:
        return str(self._result("vault_unlock", method=method))

    def audit_verify(self) -> dict[str, Any]:
        return dict(self._op("audit_verify"))

    def audit_records(
        self, since: int = 0, limit: int = 100, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Records after seq `since` (oldest first), or with `last`, the newest `last`."""
        if last is not None:
            return list(self._result("audit_records", last=last))
        return list(self._result("audit_records", since=since, limit=limit))

    def create_tenant(self, name: str) -> None:
        self._op("create_tenant", name=name)

    def tenants(self) -> list[dict[str, Any]]:
        return list(self._result("list_tenants"))

    def issue_token(self, tenant: str, name: str) -> str:
        return str(self._result("issue_token", path={"tenant": tenant}, name=name))

    def revoke_identity(self, tenant: str, name: str) -> None:
        self._op("revoke_identity", path={"tenant": tenant, "name": name})

    def grant(self, tenant: str, identity: str, keys: str, permissions: Iterable[str]) -> None:
        self._op("grant", tenant=tenant, identity=identity, keys=keys, permissions=permissions)

    def revoke_policy(
        self, tenant: str, identity: str, keys: str, permissions: Iterable[str] | None = None
    ) -> None:
        self._op(
            "revoke_policy", tenant=tenant, identity=identity, keys=keys, permissions=permissions
        )

    def policies(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return list(self._result("list_policies", tenant=tenant))


class RemoteVault:
    """`vault status|lock|unlock` on the service's vault (admin only)."""

    def __init__(self, remote: RemoteKeystore) -> None:
        self._remote = remote

    def vault_status(self) -> dict[str, Any]:
        return self._remote.vault_status()

    def lock(self) -> None:
        self._remote.vault_lock()

    def unlock(self, method: str | None = None) -> str:
        return self._remote.vault_unlock(method)


def _segment(value: str) -> str:
    from urllib.parse import quote

    if not value:
        raise InvalidArgument("a name must not be empty")
    return quote(value, safe="")


def require_httpx() -> Any:
    """The httpx module, or BackendUnavailable naming the extra that installs it."""
    try:
        import httpx
    except ImportError:
        raise BackendUnavailable(
            "service", "strongroom.connect needs httpx: pip install 'strongroom[server]'"
        ) from None
    return httpx


def open_client(
    url: str,
    *,
    token: str | None = None,
    ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> RemoteKeystore:
    """A client of the service at `url` (`unix:PATH` or `https://HOST:PORT`), every option
    given: `strongroom.connect()` fills them in from the config first."""
    httpx = require_httpx()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        transport = httpx.HTTPTransport(uds=path)
        client = httpx.Client(
            transport=transport, base_url="http://strongroom", headers=headers, timeout=timeout
        )
    elif url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        client = httpx.Client(base_url=url, verify=ctx, headers=headers, timeout=timeout)
    else:
        raise InvalidArgument("the service URL is unix:PATH or https://HOST:PORT")
    return RemoteKeystore(client, url)


__all__ = [
    "TOKEN_ENV",
    "NotPermitted",
    "RateLimited",
    "RemoteBackend",
    "RemoteKeystore",
    "RemoteVault",
    "RequestTooLarge",
    "VaultLocked",
    "open_client",
    "require_httpx",
]
