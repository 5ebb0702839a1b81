"""`strongroom.connect()`: the key API of `strongroom.open()`, over the wire to `strongroom serve`.

The transport is httpx: a Unix socket (`unix:/run/strongroom/serve.sock`) or HTTPS
(`https://host:8443`, with the service's CA and optionally a client certificate). Errors
come back as the same `strongroom.errors` classes the in-process keystore raises.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .. import errors
from ..api import BackendStatus
from ..errors import (
    AuthenticationFailed,
    BackendUnavailable,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    NotPermitted,
    RateLimited,
    RequestTooLarge,
    StrongroomError,
    TenantNotFound,
    VaultLocked,
)
from ..types import KeyInfo, KeyType, KeyVersion, Operation, Usage

TOKEN_ENV = "STRONGROOM_TOKEN"  # noqa: S105 - the variable name, not a token


_LOCAL = {
    "NotPermitted": NotPermitted,
    "TenantNotFound": TenantNotFound,
    "VaultLocked": VaultLocked,
    "RateLimited": RateLimited,
    "RequestTooLarge": RequestTooLarge,
}


def _error(status: int, payload: Any, name: str | None) -> StrongroomError:
    """The exception for an error answer: the service's own class where we have it."""
    err = payload.get("error", {}) if isinstance(payload, dict) else {}
    if not isinstance(err, dict):
        err = {}
    kind = str(err.get("type", ""))
    message = str(err.get("message", f"the service answered HTTP {status}"))
    e: StrongroomError
    if kind == "KeyNotFound":
        e = KeyNotFound(name or "?")
    elif kind == "KeyExists":
        e = KeyExists(name or "?")
    elif kind == "AuthenticationFailed":
        retries = err.get("retries_left")
        return AuthenticationFailed(message, retries if isinstance(retries, int) else None)
    elif kind == "BackendUnavailable":
        e = BackendUnavailable(str(err.get("backend", "service")), message)
    elif kind == "UnsupportedOperation":
        key_type = err.get("key_type")
        e = errors.UnsupportedOperation(
            str(err.get("backend", "service")),
            str(err.get("operation", "?")),
            key_type if isinstance(key_type, str) else None,
        )
    else:
        cls = _LOCAL.get(kind) or getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, StrongroomError)):
            if status >= 500:
                return StrongroomError(f"the service failed (HTTP {status}): {message}")
            return StrongroomError(message)
        try:
            return cls(message)
        except TypeError:
            e = StrongroomError()
    e.args = (message,)  # the service's words; the attributes above are for code
    return e


def _b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(data)).decode()


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)


def _key_info(d: dict[str, Any]) -> KeyInfo:
    return KeyInfo(
        name=d["name"],
        type=KeyType(d["type"]),
        backend=d["backend"],
        usage=frozenset(Usage(u) for u in d["usage"]),
        exportable=bool(d.get("exportable", False)),
        namespace=d.get("namespace", "default"),
        version=int(d.get("version", 1)),
        created=datetime.fromisoformat(d["created"]) if d.get("created") else None,
        min_decryption_version=int(d.get("min_decryption_version") or 1),
        disabled=bool(d.get("disabled", False)),
        delete_after=datetime.fromisoformat(d["delete_after"]) if d.get("delete_after") else None,
    )


def _usage(usage: Any) -> list[str] | None:
    if usage is None:
        return None
    if isinstance(usage, str):
        return [u.strip() for u in usage.split(",") if u.strip()]
    if isinstance(usage, Usage):
        return [usage.value]
    return [u.value if isinstance(u, Usage) else str(u) for u in usage]


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

    # -- plumbing ------------------------------------------------------------------------------
    def _call(
        self, method: str, path: str, body: Any = None, name: str | None = None, **params: Any
    ) -> Any:
        import httpx

        try:
            r = self._client.request(
                method,
                path,
                json=body,
                params={k: v for k, v in params.items() if v is not None} or None,
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
            raise _error(r.status_code, payload, name)
        return payload

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteKeystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the key API ---------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/whoami"))

    def backends(self) -> list[BackendStatus]:
        out = []
        for d in self._call("GET", "/v1/backends")["backends"]:
            caps = frozenset(
                (KeyType(t), Operation(op)) for t, ops in d["capabilities"].items() for op in ops
            )
            out.append(
                BackendStatus(
                    d["name"], d["type"], d["available"], d["reason"], caps, d.get("details", {})
                )
            )
        return out

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
        body = {
            "name": name,
            "type": KeyType.parse(key_type).value,
            "backend": backend,
            "usage": _usage(usage),
            "exportable": exportable,
        }
        return _key_info(
            self._call(
                "POST", "/v1/keys", {k: v for k, v in body.items() if v is not None}, name=name
            )
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
        body: dict[str, Any] = {
            "name": name,
            "type": KeyType.parse(key_type).value,
            "material": _b64(material),
            "format": format,
            "exportable": exportable,
        }
        if backend is not None:
            body["backend"] = backend
        if usage is not None:
            body["usage"] = _usage(usage)
        return _key_info(self._call("POST", "/v1/keys", body, name=name))

    def mac(self, name: str, data: bytes) -> bytes:
        body = {"data": _b64(data)}
        return _unb64(self._call("POST", f"/v1/keys/{_segment(name)}/mac", body, name=name)["mac"])

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
        body: dict[str, Any] = {
            "new_name": new_name,
            "type": KeyType.parse(key_type).value,
            "salt": _b64(salt),
            "info": _b64(info),
        }
        if usage is not None:
            body["usage"] = _usage(usage)
        if exportable:
            body["exportable"] = True
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/derive", body, name=name))

    def rotate(self, name: str, backend: str | None = None) -> KeyInfo:
        body = {} if backend is None else {"backend": backend}
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/rotate", body, name=name))

    def versions(self, name: str) -> list[KeyVersion]:
        """The key's versions, oldest first (without backend handles)."""
        found = self._call("GET", f"/v1/keys/{_segment(name)}/versions", name=name)["versions"]
        return [
            KeyVersion(int(v["version"]), str(v["backend"]), datetime.fromisoformat(v["created"]))
            for v in found
        ]

    def disable(self, name: str) -> KeyInfo:
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/disable", {}, name=name))

    def enable(self, name: str) -> KeyInfo:
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/enable", {}, name=name))

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        body = {"min_decryption_version": version}
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/config", body, name=name))

    def info(self, name: str) -> KeyInfo:
        return _key_info(self._call("GET", f"/v1/keys/{_segment(name)}", name=name))

    def keys(self) -> list[KeyInfo]:
        return [_key_info(d) for d in self._call("GET", "/v1/keys")["keys"]]

    def delete(self, name: str) -> None:
        """Destroy the key at once, as `Keystore.delete` does."""
        self._call("DELETE", f"/v1/keys/{_segment(name)}", name=name, now="true")

    def schedule_deletion(self, name: str, wait: timedelta | None = None) -> KeyInfo | None:
        """Delete after `wait` (default: the service's deletion_wait); None if done at once."""
        after = None if wait is None else str(int(wait.total_seconds()))
        r = self._call("DELETE", f"/v1/keys/{_segment(name)}", name=name, after=after)
        return None if "scheduled" not in r else self.info(name)

    def cancel_deletion(self, name: str) -> KeyInfo:
        return _key_info(
            self._call("POST", f"/v1/keys/{_segment(name)}/cancel-deletion", {}, name=name)
        )

    def public_key(self, name: str, version: int | None = None) -> PublicKeyTypes:
        path = f"/v1/keys/{_segment(name)}/public"
        der = _unb64(self._call("GET", path, name=name, format="der", version=version)["der"])
        return serialization.load_der_public_key(der)

    def attest(self, name: str, nonce: bytes | None = None) -> dict[str, Any]:
        """The key's backend's statement that the key lives in its hardware (the service
        makes the nonce when None); check it with `strongroom.keystore.verify_attestation`."""
        body = {} if nonce is None else {"nonce": _b64(nonce)}
        return dict(
            self._call("POST", f"/v1/keys/{_segment(name)}/attest", body, name=name)["statement"]
        )

    def sign(
        self,
        name: str,
        data: bytes,
        algorithm: str | None = None,
        *,
        envelope: bool = False,
        prehashed: bool = False,
    ) -> bytes:
        body: dict[str, Any] = {"data": _b64(data)}
        _options(body, algorithm, envelope, prehashed=prehashed)
        return _unb64(
            self._call("POST", f"/v1/keys/{_segment(name)}/sign", body, name=name)["signature"]
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
        body: dict[str, Any] = {"data": _b64(data), "signature": _b64(signature)}
        _options(body, algorithm, envelope, version, prehashed=prehashed)
        if not self._call("POST", f"/v1/keys/{_segment(name)}/verify", body, name=name)["valid"]:
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
        body: dict[str, Any] = {"plaintext": _b64(plaintext), "aad": _b64(aad)}
        _options(body, algorithm, envelope)
        return _unb64(
            self._call("POST", f"/v1/keys/{_segment(name)}/encrypt", body, name=name)["ciphertext"]
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
        body: dict[str, Any] = {"ciphertext": _b64(ciphertext), "aad": _b64(aad)}
        _options(body, algorithm, envelope, version)
        return _unb64(
            self._call("POST", f"/v1/keys/{_segment(name)}/decrypt", body, name=name)["plaintext"]
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
            wire = raw.decode() if raw.lstrip().startswith(b"-----BEGIN") else _b64(raw)
        else:
            wire = peer.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        body: dict[str, Any] = {
            "peer": wire,
            "new_name": new_name,
            "type": KeyType.parse(key_type).value,
            "salt": _b64(salt),
            "info": _b64(info),
        }
        if usage is not None:
            body["usage"] = _usage(usage)
        if exportable:
            body["exportable"] = True
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/agree", body, name=name))

    def export_key(self, name: str, format: str = "pem") -> bytes:
        """The private key material of an exportable key (pem, der or raw)."""
        body = {"format": format}
        found = self._call("POST", f"/v1/keys/{_segment(name)}/export", body, name=name)
        return str(found["pem"]).encode() if format == "pem" else _unb64(found[format])

    def wrap(self, wrapping_key: str, name: str) -> bytes:
        """The exportable key `name` wrapped under `wrapping_key` (AES key wrap, RFC 5649)."""
        body = {"key": name}
        path = f"/v1/keys/{_segment(wrapping_key)}/wrap"
        return _unb64(self._call("POST", path, body, name=wrapping_key)["blob"])

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
        body: dict[str, Any] = {
            "blob": _b64(blob),
            "new_name": new_name,
            "type": KeyType.parse(key_type).value,
        }
        if usage is not None:
            body["usage"] = _usage(usage)
        if exportable:
            body["exportable"] = True
        path = f"/v1/keys/{_segment(wrapping_key)}/unwrap"
        return _key_info(self._call("POST", path, body, name=wrapping_key))

    def rewrap(
        self, name: str, ciphertext: bytes, aad: bytes = b"", algorithm: str | None = None
    ) -> bytes:
        """Re-encrypt an enveloped ciphertext under the key's primary version; the plaintext
        stays in the service."""
        body: dict[str, Any] = {"ciphertext": _b64(ciphertext), "aad": _b64(aad)}
        if algorithm is not None:
            body["algorithm"] = algorithm
        return _unb64(
            self._call("POST", f"/v1/keys/{_segment(name)}/rewrap", body, name=name)["ciphertext"]
        )

    def adopt(
        self,
        name: str,
        backend: str,
        ref: dict[str, str],
        key_type: KeyType | str | None = None,
        usage: Any = None,
    ) -> KeyInfo:
        """Register a key that already exists in the service's `backend`, found by `ref`."""
        body: dict[str, Any] = {"backend": backend, "ref": dict(ref)}
        if key_type is not None:
            body["type"] = KeyType.parse(key_type).value
        if usage is not None:
            body["usage"] = _usage(usage)
        return _key_info(self._call("POST", f"/v1/keys/{_segment(name)}/adopt", body, name=name))

    def random(self, n: int, backend: str | None = None) -> bytes:
        body: dict[str, Any] = {"n": n}
        if backend is not None:
            body["backend"] = backend
        return _unb64(self._call("POST", "/v1/random", body)["data"])

    def vault_control(self) -> RemoteVault:
        return RemoteVault(self)

    # -- the service's own commands (admin) ----------------------------------------------------
    def vault_status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/vault"))

    def vault_lock(self) -> None:
        self._call("POST", "/v1/vault/lock", {})

    def vault_unlock(self, method: str | None = None) -> str:
        body = {} if method is None else {"method": method}
        return str(self._call("POST", "/v1/vault/unlock", body)["method"])

    def audit_verify(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/audit/verify"))

    def audit_records(
        self, since: int = 0, limit: int = 100, last: int | None = None
    ) -> list[dict[str, Any]]:
        """Records after seq `since` (oldest first), or with `last`, the newest `last`."""
        if last is not None:
            return list(self._call("GET", "/v1/audit/records", last=last)["records"])
        return list(self._call("GET", "/v1/audit/records", since=since, limit=limit)["records"])

    def create_tenant(self, name: str) -> None:
        self._call("POST", "/v1/tenants", {"name": name})

    def tenants(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/tenants")["tenants"])

    def issue_token(self, tenant: str, name: str) -> str:
        return str(
            self._call("POST", f"/v1/tenants/{_segment(tenant)}/tokens", {"name": name})["token"]
        )

    def revoke_identity(self, tenant: str, name: str) -> None:
        self._call("DELETE", f"/v1/tenants/{_segment(tenant)}/identities/{_segment(name)}")

    def grant(self, tenant: str, identity: str, keys: str, permissions: Iterable[str]) -> None:
        body = {
            "tenant": tenant,
            "identity": identity,
            "keys": keys,
            "permissions": list(permissions),
        }
        self._call("POST", "/v1/policies", body)

    def revoke_policy(
        self, tenant: str, identity: str, keys: str, permissions: Iterable[str] | None = None
    ) -> None:
        body: dict[str, Any] = {"tenant": tenant, "identity": identity, "keys": keys}
        if permissions is not None:
            body["permissions"] = list(permissions)
        self._call("DELETE", "/v1/policies", body)

    def policies(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/policies", tenant=tenant)["policies"])


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


def _options(
    body: dict[str, Any],
    algorithm: str | None,
    envelope: bool,
    version: int | None = None,
    *,
    prehashed: bool = False,
) -> None:
    """Add the optional fields of a sign, verify, encrypt or decrypt request."""
    if algorithm is not None:
        body["algorithm"] = algorithm
    if envelope:
        body["envelope"] = True
    if prehashed:
        body["prehashed"] = True
    if version is not None:
        body["version"] = version


def _segment(value: str) -> str:
    from urllib.parse import quote

    if not value:
        raise InvalidArgument("a name must not be empty")
    return quote(value, safe="")


def connect(
    url: str | None = None,
    *,
    token: str | None = None,
    config: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> RemoteKeystore:
    """Connect to a running `strongroom serve`.

    `url` is `unix:PATH` or `https://HOST:PORT`; by default `[server] url` from the config,
    else the service's default socket in the data dir. `token` defaults to `[server] token`
    (env:/file:), else $STRONGROOM_TOKEN. With a client certificate no token is needed.
    """
    try:
        import httpx
    except ImportError:
        raise BackendUnavailable(
            "service", "strongroom.connect needs httpx: pip install 'strongroom[server]'"
        ) from None
    from .. import config as _config
    from ..secrets import SecretSource

    cfg = _config.load(config)
    server = cfg.server
    url = url or server.url or f"unix:{server.socket or cfg.data_dir / 'serve.sock'}"
    if token is None and server.token is not None:
        token = SecretSource([server.token], "API token").get()
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    ca = ca if ca is not None else server.ca
    client_cert = client_cert if client_cert is not None else server.client_cert
    client_key = client_key if client_key is not None else server.client_key
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


__all__ = ["NotPermitted", "RateLimited", "RemoteKeystore", "VaultLocked", "connect"]
