"""The key custody service: `strongroom serve`, an ASGI app served by uvicorn.

One process holds the unlocked keystore; applications and people reach it over a Unix
socket (mode 0600, or 0660 for a group) or over TCP with TLS (mutual TLS optional).
Each request carries an identity (an API token, or a client certificate), which maps to
a tenant; a tenant is a namespace of keys, and policies say what each identity may do
(docs/server.md). Every operation goes through `Keystore`, so every use is in the audit
log with the caller as its actor.

The app is plain ASGI with a small route table: the hot path (sign) is a few dict
look-ups, a JSON parse and the keystore call. Work that may block on hardware (a TPM, a
card, a touch) runs in a worker thread; work on vault keys runs on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..audit import current_principal
from ..config import Config, ServerConfig
from ..errors import (
    AuditUnavailable,
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    StorageError,
    StrongroomError,
    UnsupportedOperation,
)
from ..keystore import Keystore
from ..memory import wipe
from ..types import KeyInfo, KeyType
from .openapi import API_VERSION, openapi_document
from .tenants import Identity, NotPermitted, Permission, TenantNotFound, TenantStore

log = logging.getLogger("strongroom.server")


TOKEN_HEADER = b"authorization"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpError(Exception):
    """An error answered with `status` and a JSON body; never a traceback."""

    def __init__(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}


_STATUS_OF: list[tuple[type[BaseException], int]] = [
    (KeyNotFound, 404),
    (TenantNotFound, 404),
    (KeyExists, 409),
    (NotPermitted, 403),
    (PolicyViolation, 403),
    (DeviceLocked, 423),
    (AuthenticationFailed, 401),
    (IntegrityError, 400),
    (InvalidArgument, 400),
    (UnsupportedOperation, 422),
    (BackendUnavailable, 503),
    (AuditUnavailable, 503),
    (StorageError, 503),
]

_AUDITED_REFUSALS = frozenset({401, 403, 404, 413, 423, 429})
"""Refusals written to the audit log (a 404 only once a route matched: a key or policy)."""

_GENERATABLE = [t.value for t in KeyType if t is not KeyType.SEED]

NOT_FOUND = "no such key"
"""The one answer for a key that is absent, another tenant's, or not the caller's at all."""


def _status_of(e: BaseException) -> int:
    for kind, status in _STATUS_OF:
        if isinstance(e, kind):
            return status
    return 500


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, field_name: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, "InvalidArgument", f"{field_name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "InvalidArgument", f"{field_name} is not valid base64") from None


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, "InvalidArgument", f"{name} must be a string")
    return value


def _key_json(info: KeyInfo) -> dict[str, Any]:
    d = info.to_dict()
    d.pop("attributes", None)  # backend handles and blobs are the service's business
    return d


class RateLimiter:
    """A token bucket per identity: `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, list[float]] = {}

    def allow(self, who: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        bucket = self._buckets.get(who)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[who] = [float(self.burst), now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True


Handler = Callable[["Request"], Awaitable[Any]]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: bool = True


@dataclass
class Request:
    scope: Scope
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    identity: Identity | None


class App:
    """The ASGI application. `keystore` stays open for the app's life; `close()` locks it."""

    def __init__(
        self, keystore: Keystore, tenants: TenantStore, settings: ServerConfig | None = None
    ) -> None:
        self.ks = keystore
        self.tenants = tenants
        self.settings = settings or ServerConfig()
        self.limiter = RateLimiter(self.settings.rate_limit, self.settings.rate_burst)
        self.vault_sealed = False  # `vault lock` through the service: stays locked until unlock
        self._views: dict[str, Keystore] = {}
        self._vault_name = keystore.vault.name
        self._lock = threading.Lock()
        self._inflight = 0
        self._refusals: dict[tuple[str, str, str], list[float]] = {}
        self.routes = self._routes()
        # Fast dispatch: exact paths by (method, path); key operations by (method, verb).
        self._exact: dict[tuple[str, str], Route] = {}
        self._key_ops: dict[tuple[str, str], Route] = {}
        for route in self.routes:
            pattern = route.pattern.pattern
            if "(?P<" not in pattern:
                self._exact[(route.method, pattern)] = route
            elif pattern.startswith("/v1/keys/(?P<name>[^/]{1,512})"):
                verb = pattern[len("/v1/keys/(?P<name>[^/]{1,512})") :].lstrip("/")
                self._key_ops[(route.method, verb)] = route
        self.openapi = openapi_document(
            backends=list(keystore.config.order), key_types=_GENERATABLE
        )
        self._openapi_body = json.dumps(self.openapi).encode()

    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        self._inflight += 1
        try:
            status, payload, extra_headers = await self._handle(scope, receive)
        finally:
            self._inflight -= 1
        if isinstance(payload, bytes):
            body = payload
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *extra_headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        """Lock the vault and close the keystore (wipes guarded memory)."""
        try:
            self.flush_refusals()
            self.ks.close()
        finally:
            self.tenants.close()

    async def _handle(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        route: Route | None = None
        params: dict[str, str] | None = None
        try:
            raw = scope.get("raw_path")
            # Match on the path as sent, then decode each parameter: an encoded "/" stays
            # inside its segment (a key name), never a way to another route.
            path: str = raw.decode("latin-1").partition("?")[0] if raw else scope["path"]
            method: str = scope["method"]
            route, params = self._match(method, path)
            identity = None
            if route.auth:
                identity = self._authenticate(scope)
                scope["strongroom.identity"] = identity
                if not self.limiter.allow(identity.id):
                    raise HttpError(
                        429,
                        "RateLimited",
                        "too many requests; slow down",
                        headers={"retry-after": "1"},
                    )
            body = await self._read_body(scope, receive, method)
            query = _parse_query(scope.get("query_string", b""))
            request = Request(scope, params, query, body, identity)
            token = current_principal.set(identity.principal if identity else None)
            try:
                result = await route.handler(request)
            finally:
                current_principal.reset(token)
            status, payload = (200, result) if not isinstance(result, tuple) else result
            return status, payload, []
        except HttpError as e:
            if e.status in _AUDITED_REFUSALS and (e.status != 404 or route is not None):
                self._audit_refusal(scope, e, route, params)
            headers = [(k.encode(), v.encode()) for k, v in e.headers.items()]
            return e.status, {"error": {"type": e.kind, "message": e.message}}, headers
        except InvalidSignature:
            return 200, {"valid": False}, []
        except StrongroomError as e:
            status = _status_of(e)
            if status == 500:
                log.error("request failed: %s: %s", type(e).__name__, e)
                return 500, {"error": {"type": "InternalError", "message": "internal error"}}, []
            extra: dict[str, Any] = {}
            retries = getattr(e, "retries_left", None)
            if isinstance(retries, int):
                extra["retries_left"] = retries
            if isinstance(e, UnsupportedOperation):
                extra.update(backend=e.backend, operation=e.operation, key_type=e.key_type)
            elif isinstance(e, BackendUnavailable):
                extra["backend"] = e.backend
            message = NOT_FOUND if isinstance(e, KeyNotFound) else str(e)
            who: Identity | None = scope.get("strongroom.identity")
            if status == 503 and not (who is not None and who.admin):
                # the detail names server paths and devices: the operator's, in the log
                log.warning("refused with 503: %s: %s", type(e).__name__, e)
                if isinstance(e, AuditUnavailable):
                    message = "the audit log cannot be written: the operation was refused"
                elif isinstance(e, StorageError):
                    message = "the service cannot save its state: the operation was refused"
                else:
                    message = "a backend the operation needs is unavailable; see the service log"
            return status, {"error": {"type": type(e).__name__, "message": message, **extra}}, []
        except Exception as e:  # a bug: say nothing of it to the caller, log its kind only
            log.exception("request failed: %s", type(e).__name__)
            return 500, {"error": {"type": "InternalError", "message": "internal error"}}, []

    def _audit_refusal(
        self, scope: Scope, e: HttpError, route: Route | None, params: dict[str, str] | None
    ) -> None:
        """A refused request is a security event: record who asked for what, and why not."""
        identity: Identity | None = scope.get("strongroom.identity")
        op = route.handler.__name__ if route is not None else "request"
        key = (params or {}).get("name")
        if key is not None and identity is not None and identity.tenant is not None:
            key = f"{identity.tenant}/{key}"
        client = scope.get("client")
        peer = "unix" if not client else f"{client[0]}"
        actor = identity.principal if identity is not None else "unauthenticated"
        extra: dict[str, Any] = {}
        if e.status in (401, 429):
            # These can come as a flood (anyone can send a bad token): one record per actor,
            # kind and peer a second, counting the ones it stands for.
            now = time.monotonic()
            slot = (actor, e.kind, peer)
            window = self._refusals.get(slot)
            if window is not None and now - window[0] < 1.0:
                window[1] += 1
                return
            if len(self._refusals) > 10_000:
                self.flush_refusals()
            self._refusals[slot] = [now, 0]
            if window is not None and window[1]:
                extra["suppressed"] = window[1]  # like this one, since the last record
        token = current_principal.set(actor)
        try:
            self.ks.audit.record(op, key, e.kind, None, None, status=e.status, client=peer, **extra)
        except AuditUnavailable as failure:  # the request is refused anyway
            log.warning("could not record a refused request: %s", failure)
        finally:
            current_principal.reset(token)

    def flush_refusals(self) -> None:
        """Write the counts of refusals not yet in the log (at shutdown; when the table is
        full), one `refused_since` record per actor, kind and peer, and forget them."""
        pending = [(slot, w[1]) for slot, w in self._refusals.items() if w[1]]
        self._refusals.clear()
        for (actor, kind, peer), count in pending:
            token = current_principal.set(actor)
            try:
                self.ks.audit.record(
                    "refused_since", None, kind, None, None, client=peer, suppressed=count
                )
            except AuditUnavailable as failure:
                log.warning("could not record refused requests: %s", failure)
                return
            finally:
                current_principal.reset(token)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        if path.startswith("/v1/keys/"):
            name, _, verb = path[9:].partition("/")
            route = self._key_ops.get((method, verb))
            if route is not None and 0 < len(name) <= 512 and "/" not in verb:
                try:
                    return route, {"name": _unquote(name)}
                except UnicodeDecodeError:
                    raise HttpError(400, "InvalidArgument", "the path is not valid UTF-8") from None
        allowed: list[str] = []
        for route in self.routes:
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            if route.method == method:
                try:
                    return route, {k: _unquote(v) for k, v in m.groupdict().items()}
                except UnicodeDecodeError:
                    raise HttpError(400, "InvalidArgument", "the path is not valid UTF-8") from None
            allowed.append(route.method)
        if allowed:
            raise HttpError(
                405,
                "MethodNotAllowed",
                f"{method} is not allowed here; allowed: {', '.join(allowed)}",
                headers={"allow": ", ".join(allowed)},
            )
        raise HttpError(404, "NotFound", "no such endpoint")

    def _authenticate(self, scope: Scope) -> Identity:
        token = None
        for name, value in scope["headers"]:
            if name == TOKEN_HEADER:
                if token is not None:  # which one would count is a proxy's guess: neither
                    raise HttpError(400, "InvalidArgument", "send one Authorization header")
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not rest.strip():
                    raise HttpError(401, "AuthenticationFailed", "use Authorization: Bearer TOKEN")
                token = rest.strip()
        der = _client_certificate(scope)
        try:
            if token is not None:
                if der is not None and self.tenants.certificate_enrolled(der):
                    raise HttpError(
                        400,
                        "InvalidArgument",
                        "send one credential: an API token or an enrolled client certificate",
                    )
                return self.tenants.authenticate_token(token)
            if der is not None:
                return self.tenants.authenticate_certificate(der)
        except AuthenticationFailed as e:
            raise HttpError(401, "AuthenticationFailed", str(e)) from None
        raise HttpError(
            401, "AuthenticationFailed", "no credentials: send an API token or a client certificate"
        )

    async def _read_body(self, scope: Scope, receive: Receive, method: str) -> Any:
        limit = self.settings.max_request_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HttpError(400, "InvalidArgument", "bad Content-Length") from None
                if declared > limit:
                    raise HttpError(
                        413, "RequestTooLarge", f"requests are limited to {limit} bytes"
                    )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "InvalidArgument", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, "RequestTooLarge", f"requests are limited to {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if method in ("GET", "HEAD") or not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise HttpError(400, "InvalidArgument", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "InvalidArgument", "the body must be a JSON object")
        return body

    # -- authorisation -------------------------------------------------------------------------
    def _view(self, identity: Identity) -> Keystore:
        """The keystore as the identity's tenant sees it: its namespace only."""
        tenant = identity.tenant
        if tenant is None:
            raise HttpError(403, "NotPermitted", "a service admin holds no keys; use a tenant")
        view = self._views.get(tenant)
        if view is None:
            with self._lock:
                view = self._views.get(tenant) or self.ks.in_namespace(tenant)
                self._views[tenant] = view
        return view

    def _check_key(self, identity: Identity, name: str, permission: Permission) -> Keystore:
        """The tenant's keystore if `identity` may `permission` the key `name`.

        Decided from the name alone, never from whether the key exists: a name the identity
        has no permission on at all gets the same 404 as an absent key (except to make a
        key, where "no such key" would make no sense: a 403, which says as little)."""
        view = self._view(identity)
        granted = self.tenants.permissions_on(identity, name)
        if permission not in granted:
            if not granted and permission is not Permission.GENERATE:
                raise HttpError(404, "KeyNotFound", NOT_FOUND)
            raise HttpError(
                403, "NotPermitted", f"this identity may not {permission.value} this key"
            )
        return view

    def _key_request(self, req: Request, permission: Permission) -> tuple[Keystore, str]:
        """The tenant's keystore and the key name of a /v1/keys/{name}/... request, once
        `permission` on that name is checked (see `_check_key`)."""
        assert req.identity is not None
        name = req.params["name"]
        return self._check_key(req.identity, name, permission), name

    def _admin(self, identity: Identity | None) -> None:
        if identity is None or not identity.admin:
            raise HttpError(403, "NotPermitted", "this needs the admin role")

    def _in_vault(self, view: Keystore, name: str) -> bool:
        """Whether the key lives in the vault; a 423 if so while an admin keeps it sealed."""
        try:
            backend = view.info(name).backend
        except KeyNotFound:
            raise HttpError(404, "KeyNotFound", NOT_FOUND) from None
        if backend != self._vault_name:
            return False
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        return True

    def _check_vault(self, view: Keystore, name: str) -> None:
        if self.vault_sealed:
            self._in_vault(view, name)

    async def _run(self, view: Keystore, name: str, fn: Callable[[], Any]) -> Any:
        """Run a keystore call: inline for vault keys (fast), in a thread for hardware."""
        if self._in_vault(view, name):
            return fn()
        return await asyncio.to_thread(fn)

    # -- routes --------------------------------------------------------------------------------
    def _routes(self) -> list[Route]:
        name = r"(?P<name>[^/]{1,512})"
        tenant = r"(?P<tenant>[^/]{1,256})"
        r = [
            ("GET", "/v1/health", self.health, False),
            ("GET", "/openapi.json", self.get_openapi, False),
            ("GET", "/v1/whoami", self.whoami, True),
            ("GET", "/v1/backends", self.list_backends, True),
            ("GET", "/v1/keys", self.list_keys, True),
            ("POST", "/v1/keys", self.generate, True),
            ("GET", f"/v1/keys/{name}", self.show_key, True),
            ("DELETE", f"/v1/keys/{name}", self.delete_key, True),
            ("GET", f"/v1/keys/{name}/public", self.public_key, True),
            ("POST", f"/v1/keys/{name}/sign", self.sign, True),
            ("POST", f"/v1/keys/{name}/verify", self.verify, True),
            ("POST", f"/v1/keys/{name}/encrypt", self.encrypt, True),
            ("POST", f"/v1/keys/{name}/decrypt", self.decrypt, True),
            ("POST", f"/v1/keys/{name}/agree", self.agree, True),
            ("POST", f"/v1/keys/{name}/export", self.export, True),
            ("POST", f"/v1/keys/{name}/cancel-deletion", self.cancel_deletion, True),
            ("POST", f"/v1/keys/{name}/mac", self.mac, True),
            ("POST", f"/v1/keys/{name}/derive", self.derive, True),
            ("POST", f"/v1/keys/{name}/rotate", self.rotate, True),
            ("GET", f"/v1/keys/{name}/versions", self.versions, True),
            ("POST", f"/v1/keys/{name}/disable", self.disable, True),
            ("POST", f"/v1/keys/{name}/enable", self.enable, True),
            ("POST", f"/v1/keys/{name}/config", self.key_config, True),
            ("POST", f"/v1/keys/{name}/wrap", self.wrap, True),
            ("POST", f"/v1/keys/{name}/unwrap", self.unwrap, True),
            ("POST", f"/v1/keys/{name}/rewrap", self.rewrap, True),
            ("POST", f"/v1/keys/{name}/attest", self.attest, True),
            ("POST", f"/v1/keys/{name}/adopt", self.adopt, True),
            ("POST", "/v1/random", self.random, True),
            ("GET", "/v1/vault", self.vault_status, True),
            ("POST", "/v1/vault/lock", self.vault_lock, True),
            ("POST", "/v1/vault/unlock", self.vault_unlock, True),
            ("GET", "/v1/audit/records", self.audit_records, True),
            ("GET", "/v1/audit/verify", self.audit_verify, True),
            ("POST", "/v1/audit/checkpoint", self.audit_checkpoint, True),
            ("GET", "/v1/tenants", self.list_tenants, True),
            ("POST", "/v1/tenants", self.create_tenant, True),
            ("POST", f"/v1/tenants/{tenant}/tokens", self.issue_token, True),
            ("DELETE", f"/v1/tenants/{tenant}/identities/{name}", self.revoke_identity, True),
            ("GET", "/v1/policies", self.list_policies, True),
            ("POST", "/v1/policies", self.grant, True),
            ("DELETE", "/v1/policies", self.revoke_policy, True),
        ]
        return [Route(m, re.compile(p), h, a) for m, p, h, a in r]

    async def health(self, req: Request) -> Any:
        return {"status": "ok", "api": API_VERSION}

    async def get_openapi(self, req: Request) -> Any:
        return 200, self._openapi_body

    async def whoami(self, req: Request) -> Any:
        ident = req.identity
        assert ident is not None
        return {"id": ident.id, "tenant": ident.tenant, "name": ident.name, "admin": ident.admin}

    async def list_backends(self, req: Request) -> Any:
        statuses = await asyncio.to_thread(self.ks.backends)
        out = [s.to_dict() for s in statuses]
        if req.identity is None or not req.identity.admin:
            for d in out:  # paths, serials and lock states are the operator's business
                d["details"] = {}
                if d["reason"] is not None:
                    d["reason"] = "unavailable"
        return {"backends": out}

    async def list_keys(self, req: Request) -> Any:
        assert req.identity is not None
        view = self._view(req.identity)
        with view.audited("list", None) as facts:
            keys = [
                _key_json(k)
                for k in view.keys()
                if Permission.READ in self.tenants.permissions_on(req.identity, k.name)
            ]
            facts["backend"] = None
        return {"keys": keys}

    async def generate(self, req: Request) -> Any:
        assert req.identity is not None
        body = req.body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "InvalidArgument", "name is required")
        key_type = body.get("type")
        if not isinstance(key_type, str):
            raise HttpError(400, "InvalidArgument", "type is required")
        backend = _opt_str(body, "backend")
        usage = _usage_list(body)
        exportable = body.get("exportable", False)
        if not isinstance(exportable, bool):
            raise HttpError(400, "InvalidArgument", "exportable must be true or false")
        view = self._check_key(req.identity, name, Permission.GENERATE)
        if exportable and Permission.EXPORT not in self.tenants.permissions_on(req.identity, name):
            raise HttpError(403, "NotPermitted", "making an exportable key needs export")
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        if "material" in body:  # an import: the material goes straight into the backend
            material = bytearray(_unb64(body.get("material"), "material"))
            fmt = body.get("format", "auto")
            if not isinstance(fmt, str):
                raise HttpError(400, "InvalidArgument", "format must be a string")
            try:
                info = await asyncio.to_thread(
                    view.import_key, name, key_type, material, backend, usage, exportable, fmt
                )
            finally:
                wipe(material)
            return 201, _key_json(info)
        info = await asyncio.to_thread(
            view.generate, name, key_type, backend=backend, usage=usage, exportable=exportable
        )
        return 201, _key_json(info)

    def _new_key_args(self, req: Request) -> tuple[str, str, list[str] | None, bytes, bytes]:
        """`new_name` (which the caller must be allowed to generate), `type`, `usage`, and
        the HKDF `salt` and `info` of an agree or derive request."""
        assert req.identity is not None
        new_name = req.body.get("new_name")
        if not isinstance(new_name, str) or not new_name:
            raise HttpError(400, "InvalidArgument", "new_name is required")
        self._check_key(req.identity, new_name, Permission.GENERATE)
        key_type = req.body.get("type", "aes-256")
        if not isinstance(key_type, str):
            raise HttpError(400, "InvalidArgument", "type must be a string")
        usage = _usage_list(req.body)
        salt = _unb64(req.body.get("salt", ""), "salt")
        info = _unb64(req.body.get("info", ""), "info")
        return new_name, key_type, usage, salt, info

    def _check_exportable(self, req: Request, name: str) -> bool:
        """The request's `exportable` flag; making an exportable key needs `export` on it."""
        assert req.identity is not None
        exportable = _flag(req.body, "exportable")
        if exportable and Permission.EXPORT not in self.tenants.permissions_on(req.identity, name):
            raise HttpError(403, "NotPermitted", "making an exportable key needs export")
        return exportable

    async def mac(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.SIGN)
        data = _unb64(req.body.get("data"), "data")
        tag = await self._run(view, name, lambda: view.mac(name, data))
        return {"mac": _b64(tag)}

    async def derive(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.DERIVE)
        new_name, key_type, usage, salt, info_bytes = self._new_key_args(req)
        exportable = self._check_exportable(req, new_name)
        self._check_vault(view, name)
        info = await asyncio.to_thread(
            view.derive, name, new_name, key_type, usage, salt, info_bytes, exportable
        )
        return 201, _key_json(info)

    async def rotate(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.MANAGE)
        backend = _opt_str(req.body, "backend")
        self._check_vault(view, name)
        return _key_json(await asyncio.to_thread(view.rotate, name, backend))

    async def versions(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.READ)
        try:
            with view.audited("versions", name) as facts:
                found = view.versions(name)
                facts["backend"] = found[-1].backend if found else None
        except KeyNotFound:
            raise HttpError(404, "KeyNotFound", NOT_FOUND) from None
        return {
            "versions": [
                {"version": v.version, "backend": v.backend, "created": v.created.isoformat()}
                for v in found
            ]
        }

    async def disable(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.MANAGE)
        return _key_json(await asyncio.to_thread(view.disable, name))

    async def enable(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.MANAGE)
        return _key_json(await asyncio.to_thread(view.enable, name))

    async def key_config(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.MANAGE)
        version = req.body.get("min_decryption_version")
        if type(version) is not int or version < 1:
            raise HttpError(
                400, "InvalidArgument", "min_decryption_version must be a positive integer"
            )
        return _key_json(await asyncio.to_thread(view.set_min_decryption_version, name, version))

    async def show_key(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.READ)
        try:
            with view.audited("info", name) as facts:
                info = view.info(name)
                facts["backend"] = info.backend
        except KeyNotFound:
            raise HttpError(404, "KeyNotFound", NOT_FOUND) from None
        return _key_json(info)

    async def delete_key(self, req: Request) -> Any:
        """Delete after the keystore's deletion_wait (or `?after=SECONDS`), or `?now=true`."""
        from datetime import timedelta

        view, name = self._key_request(req, Permission.DELETE)
        self._check_vault(view, name)
        now_flag = req.query.get("now", "false")
        if now_flag not in ("true", "false"):
            raise HttpError(400, "InvalidArgument", "now is true or false")
        if now_flag == "true":
            await asyncio.to_thread(view.delete, name)
            return {"deleted": name}
        after = req.query.get("after")
        wait = None
        if after is not None:
            wait = timedelta(seconds=_int_query(req.query, "after", 0, 0, 10 * 365 * 86400))
        scheduled = await asyncio.to_thread(view.schedule_deletion, name, wait)
        if scheduled is None or scheduled.delete_after is None:
            return {"deleted": name}
        return {"scheduled": name, "delete_after": scheduled.delete_after.isoformat()}

    async def cancel_deletion(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.DELETE)
        info = await asyncio.to_thread(view.cancel_deletion, name)
        return _key_json(info)

    async def public_key(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.READ)
        fmt = req.query.get("format", "pem")
        if fmt not in ("pem", "der"):
            raise HttpError(400, "InvalidArgument", "format is pem or der")
        version = None
        if "version" in req.query:
            version = _int_query(req.query, "version", 1, 1, 1 << 31)
        public = await self._run(view, name, lambda: view.public_key(name, version))
        if fmt == "pem":
            pem = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return {"pem": pem.decode()}
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {"der": _b64(der)}

    async def sign(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.SIGN)
        data = _unb64(req.body.get("data"), "data")
        algorithm = _opt_str(req.body, "algorithm")
        envelope = _flag(req.body, "envelope")
        prehashed = _flag(req.body, "prehashed")
        sig = await self._run(
            view,
            name,
            lambda: view.sign(name, data, algorithm, envelope=envelope, prehashed=prehashed),
        )
        return {"signature": _b64(sig)}

    async def verify(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.VERIFY)
        data = _unb64(req.body.get("data"), "data")
        sig = _unb64(req.body.get("signature"), "signature")
        algorithm = _opt_str(req.body, "algorithm")
        envelope = _flag(req.body, "envelope")
        prehashed = _flag(req.body, "prehashed")
        version = _version(req.body)
        await self._run(
            view,
            name,
            lambda: view.verify(
                name, data, sig, algorithm, version=version, envelope=envelope, prehashed=prehashed
            ),
        )
        return {"valid": True}

    async def encrypt(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.ENCRYPT)
        pt = _unb64(req.body.get("plaintext"), "plaintext")
        aad = _unb64(req.body.get("aad", ""), "aad")
        algorithm = _opt_str(req.body, "algorithm")
        envelope = _flag(req.body, "envelope")
        ct = await self._run(
            view, name, lambda: view.encrypt(name, pt, aad, algorithm, envelope=envelope)
        )
        return {"ciphertext": _b64(ct)}

    async def decrypt(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.DECRYPT)
        ct = _unb64(req.body.get("ciphertext"), "ciphertext")
        aad = _unb64(req.body.get("aad", ""), "aad")
        algorithm = _opt_str(req.body, "algorithm")
        envelope = _flag(req.body, "envelope")
        version = _version(req.body)
        pt = await self._run(
            view,
            name,
            lambda: view.decrypt(name, ct, aad, algorithm, version=version, envelope=envelope),
        )
        return {"plaintext": _b64(pt)}

    async def agree(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.AGREE)
        new_name, key_type, usage, salt, info_bytes = self._new_key_args(req)
        peer = req.body.get("peer")
        if not isinstance(peer, str):
            raise HttpError(400, "InvalidArgument", "peer must be a PEM public key or base64")
        public: Any
        if peer.lstrip().startswith("-----BEGIN"):
            try:
                public = serialization.load_pem_public_key(peer.encode())
            except (ValueError, TypeError, UnicodeError):
                raise HttpError(400, "InvalidArgument", "peer is not a PEM public key") from None
        else:
            public = _unb64(peer, "peer")  # raw or DER; the keystore reads it for the key type
        exportable = self._check_exportable(req, new_name)
        self._check_vault(view, name)
        info = await asyncio.to_thread(
            view.agree, name, public, new_name, key_type, usage, salt, info_bytes, exportable
        )
        return 201, _key_json(info)

    async def export(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.EXPORT)
        fmt = req.body.get("format", "pem")
        if fmt not in ("pem", "der", "raw"):
            raise HttpError(400, "InvalidArgument", "format is pem, der or raw")
        self._check_vault(view, name)
        material = await asyncio.to_thread(view.export_key, name, fmt)
        return {"pem": material.decode()} if fmt == "pem" else {fmt: _b64(material)}

    async def wrap(self, req: Request) -> Any:
        """Wrap the exportable key `key` under this one: `encrypt` on the wrapping key (a key
        wrap is an encryption with it) and `export` on the key that leaves, wrapped."""
        view, name = self._key_request(req, Permission.ENCRYPT)
        target = req.body.get("key")
        if not isinstance(target, str) or not target:
            raise HttpError(400, "InvalidArgument", "key is required")
        assert req.identity is not None
        self._check_key(req.identity, target, Permission.EXPORT)
        blob = await self._run(view, name, lambda: view.wrap(name, target))
        return {"blob": _b64(blob)}

    async def unwrap(self, req: Request) -> Any:
        """A wrapped key into a new key: `decrypt` on the wrapping key, `generate` on the new
        name (and `export` for an exportable one), as for derive and agree."""
        view, name = self._key_request(req, Permission.DECRYPT)
        blob = _unb64(req.body.get("blob"), "blob")
        new_name = req.body.get("new_name")
        if not isinstance(new_name, str) or not new_name:
            raise HttpError(400, "InvalidArgument", "new_name is required")
        assert req.identity is not None
        self._check_key(req.identity, new_name, Permission.GENERATE)
        key_type = req.body.get("type")
        if not isinstance(key_type, str):
            raise HttpError(400, "InvalidArgument", "type is required")
        usage = _usage_list(req.body)
        exportable = self._check_exportable(req, new_name)
        self._check_vault(view, name)
        info = await asyncio.to_thread(
            view.unwrap, name, blob, new_name, key_type, usage, exportable
        )
        return 201, _key_json(info)

    async def rewrap(self, req: Request) -> Any:
        """Re-encrypt under the primary version: it decrypts and encrypts, so it needs both."""
        view, name = self._key_request(req, Permission.DECRYPT)
        assert req.identity is not None
        self._check_key(req.identity, name, Permission.ENCRYPT)
        ct = _unb64(req.body.get("ciphertext"), "ciphertext")
        aad = _unb64(req.body.get("aad", ""), "aad")
        algorithm = _opt_str(req.body, "algorithm")
        new = await self._run(view, name, lambda: view.rewrap(name, ct, aad, algorithm))
        return {"ciphertext": _b64(new)}

    async def attest(self, req: Request) -> Any:
        """The backend's statement that the key lives in its hardware: `read`, as for the
        public key (the statement says no more than where the key is)."""
        view, name = self._key_request(req, Permission.READ)
        nonce = None if req.body.get("nonce") is None else _unb64(req.body["nonce"], "nonce")
        statement = await self._run(view, name, lambda: view.attest(name, nonce))
        return {"statement": _jsonable(statement)}

    async def adopt(self, req: Request) -> Any:
        """Register a key that already exists in a backend under this name: the `adopt`
        permission on the name, which `all` does not imply (in shared hardware, adopting
        claims a key nobody gave this tenant); the admin's vault seal stops it, as it stops
        generate."""
        assert req.identity is not None
        name = req.params["name"]
        backend = req.body.get("backend")
        if not isinstance(backend, str) or not backend:
            raise HttpError(400, "InvalidArgument", "backend is required")
        ref = req.body.get("ref")
        if not (
            isinstance(ref, dict)
            and ref
            and all(isinstance(k, str) and isinstance(v, str) for k, v in ref.items())
        ):
            raise HttpError(400, "InvalidArgument", "ref must be an object of strings")
        key_type = _opt_str(req.body, "type")
        usage = _usage_list(req.body)
        view = self._check_key(req.identity, name, Permission.ADOPT)
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        info = await asyncio.to_thread(view.adopt, name, backend, ref, key_type, usage)
        return 201, _key_json(info)

    async def random(self, req: Request) -> Any:
        ident = req.identity
        assert ident is not None
        if not self.tenants.may(ident, Permission.RANDOM):
            raise HttpError(403, "NotPermitted", "this identity may not ask for random bytes")
        n = req.body.get("n")
        if type(n) is not int or not 1 <= n <= 65536:
            raise HttpError(400, "InvalidArgument", "n must be an integer from 1 to 65536")
        backend = _opt_str(req.body, "backend")
        if backend is not None and backend not in self.ks.config.backends:
            raise HttpError(400, "InvalidArgument", "no backend by that name")
        data = await asyncio.to_thread(self._view(ident).random, n, backend)
        return {"data": _b64(data)}

    # -- vault ---------------------------------------------------------------------------------
    async def vault_status(self, req: Request) -> Any:
        self._admin(req.identity)
        status = self.ks.vault_control().vault_status()
        return {**_jsonable(status), "sealed_by_service": self.vault_sealed}

    async def vault_lock(self, req: Request) -> Any:
        self._admin(req.identity)
        self.vault_sealed = True
        await asyncio.to_thread(self.ks.vault_control().lock)
        return {"locked": True}

    async def vault_unlock(self, req: Request) -> Any:
        self._admin(req.identity)
        method = _opt_str(req.body, "method")
        used = await asyncio.to_thread(self.ks.vault_control().unlock, method)
        self.vault_sealed = False
        return {"locked": False, "method": used}

    # -- audit ---------------------------------------------------------------------------------
    async def audit_records(self, req: Request) -> Any:
        from ..audit import last_seq, read_records

        self._admin(req.identity)
        path = self.ks.config.data_dir / "audit.jsonl"
        limit = _int_query(req.query, "limit", 100, 1, 10_000)
        if "last" in req.query:  # the newest N records
            if "since" in req.query:
                raise HttpError(400, "InvalidArgument", "give since or last, not both")
            last = _int_query(req.query, "last", 100, 1, 10_000)
            newest = await asyncio.to_thread(last_seq, path)
            since, limit = max(0, newest - last), last
        else:
            since = _int_query(req.query, "since", 0, 0, 1 << 62)
        records = await asyncio.to_thread(read_records, path, since, limit)
        return {"records": records}

    async def audit_verify(self, req: Request) -> Any:
        from ..audit import verify_log

        self._admin(req.identity)
        path = self.ks.config.data_dir / "audit.jsonl"
        public = await asyncio.to_thread(self.ks.audit_public_key)
        report = await asyncio.to_thread(verify_log, path, public)
        return report.to_dict()

    async def audit_checkpoint(self, req: Request) -> Any:
        self._admin(req.identity)
        record = await asyncio.to_thread(self.ks.audit_checkpoint)
        return {"checkpoint": record}

    # -- tenants and policies ------------------------------------------------------------------
    async def list_tenants(self, req: Request) -> Any:
        self._admin(req.identity)
        return {"tenants": self.tenants.tenants()}

    async def create_tenant(self, req: Request) -> Any:
        self._admin(req.identity)
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        with self.ks.audited("tenant_create", None, write_ahead=True, tenant=name):
            await asyncio.to_thread(self.tenants.create_tenant, name)
        return 201, {"name": name}

    async def issue_token(self, req: Request) -> Any:
        self._admin(req.identity)
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        tenant = req.params["tenant"]
        with self.ks.audited("token_issue", None, write_ahead=True, tenant=tenant, identity=name):
            token = await asyncio.to_thread(self.tenants.issue_token, tenant, name)
        return 201, {"tenant": tenant, "name": name, "token": token}

    async def revoke_identity(self, req: Request) -> Any:
        self._admin(req.identity)
        tenant, name = req.params["tenant"], req.params["name"]
        with self.ks.audited("token_revoke", None, write_ahead=True, tenant=tenant, identity=name):
            await asyncio.to_thread(self.tenants.revoke, tenant, name)
        return {"revoked": req.params["name"]}

    async def list_policies(self, req: Request) -> Any:
        self._admin(req.identity)
        tenant = req.query.get("tenant")
        return {"policies": [p.to_dict() for p in self.tenants.policies(tenant)]}

    async def grant(self, req: Request) -> Any:
        from .tenants import parse_permissions

        self._admin(req.identity)
        tenant, identity, keys, perms = _policy_body(req.body)
        if perms is None:
            raise HttpError(400, "InvalidArgument", "permissions are required")
        parsed = parse_permissions(perms)
        with self.ks.audited(
            "policy_grant",
            None,
            write_ahead=True,
            tenant=tenant,
            identity=identity,
            keys=keys,
            permissions=",".join(sorted(parsed)),
        ):
            policy = await asyncio.to_thread(self.tenants.grant, tenant, identity, keys, parsed)
        return policy.to_dict()

    async def revoke_policy(self, req: Request) -> Any:
        from .tenants import parse_permissions

        self._admin(req.identity)
        tenant, identity, keys, perms = _policy_body(req.body)
        parsed = None if perms is None else parse_permissions(perms)
        with self.ks.audited(
            "policy_revoke",
            None,
            write_ahead=True,
            tenant=tenant,
            identity=identity,
            keys=keys,
            permissions="all" if parsed is None else ",".join(sorted(parsed)),
        ):
            await asyncio.to_thread(self.tenants.revoke_policy, tenant, identity, keys, parsed)
        return {"revoked": True}


def _policy_body(body: dict[str, Any]) -> tuple[str, str, str, list[str] | None]:
    tenant, identity, keys = body.get("tenant"), body.get("identity"), body.get("keys")
    perms = body.get("permissions")
    if not all(isinstance(v, str) for v in (tenant, identity, keys)):
        raise HttpError(400, "InvalidArgument", "tenant, identity and keys are required strings")
    if perms is not None and not (
        isinstance(perms, list) and all(isinstance(p, str) for p in perms)
    ):
        raise HttpError(400, "InvalidArgument", "permissions must be a list of strings")
    return tenant, identity, keys, perms  # type: ignore[return-value]


def _version(body: dict[str, Any]) -> int | None:
    value = body.get("version")
    if value is not None and (type(value) is not int or not 1 <= value <= 1 << 31):
        raise HttpError(400, "InvalidArgument", "version must be a positive integer")
    return value


def _usage_list(body: dict[str, Any]) -> list[str] | None:
    usage = body.get("usage")
    if usage is not None and not (
        isinstance(usage, list) and all(isinstance(u, str) for u in usage)
    ):
        raise HttpError(400, "InvalidArgument", "usage must be a list of strings")
    return usage


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise HttpError(400, "InvalidArgument", f"{name} must be true or false")
    return value


def _int_query(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not lo <= int(raw) <= hi:
        raise HttpError(400, "InvalidArgument", f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _parse_query(raw: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    if not raw:
        return {}
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "InvalidArgument", "the query string is not valid") from None


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value, errors="strict")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _client_certificate(scope: Scope) -> bytes | None:
    """The client certificate's DER, from the ASGI TLS extension (see TlsHttpProtocol)."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


# -- serving -----------------------------------------------------------------------------------
MAX_HEAD_BYTES = 16 * 1024
"""The request line and headers together: larger is refused with 431 before it is buffered."""


class _HeadTooLarge(Exception):
    """Raised in the HTTP parser's callbacks to stop parsing a head over MAX_HEAD_BYTES."""


class _ConnectionLimits:
    """Open connections, counted in total and per peer, against the service's caps."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self.open = 0
        self.by_peer: dict[object, int] = {}

    def admit(self, peer: object) -> bool:
        if self.open >= self.total or self.by_peer.get(peer, 0) >= self.per_peer:
            return False
        self.open += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return True

    def release(self, peer: object) -> None:
        self.open -= 1
        left = self.by_peer[peer] - 1
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]


def _peer_of(transport: Any) -> object:
    """Who a connection is from: its IP address over TCP; its user id on the Unix socket
    (SO_PEERCRED), since any number of processes of one user are one peer there."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and name:
        return ("ip", name[0])
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return ("uid", struct.unpack("3i", cred)[1])
    return ("unknown", None)


def _plain_response(status: str, kind: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _protocol_class(settings: ServerConfig, limits: _ConnectionLimits) -> type:
    """uvicorn's httptools protocol with additions of ours.

    - A cap on the request line and headers (MAX_HEAD_BYTES): uvicorn's httptools protocol
      has none, and a caller could make it buffer hundreds of megabytes before any check of
      ours runs. Larger heads get 431 and the connection is closed.
    - Deadlines, so that a client that sends slowly or not at all cannot hold a connection:
      `head_timeout` for a request's line and headers (from the connection, or from the
      request's first byte), then `body_timeout` for its body; a connection past either gets
      408 and is closed. Idle connections between requests close after uvicorn's keep-alive
      timeout (`keepalive_timeout`).
    - Caps on open connections, in total and per peer (`_ConnectionLimits`): a connection
      over either gets 503 at once and is closed.
    - The ASGI TLS extension: uvicorn (0.55) does not fill `scope["extensions"]["tls"]`;
      we add the spec's `client_cert_chain` (the verified leaf, PEM) so that mutual TLS can
      name the caller. The certificate was verified by the handshake against tls_client_ca.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    response = _plain_response(
        "431 Request Header Fields Too Large",
        "RequestTooLarge",
        "the request headers are too large",
    )
    too_slow = _plain_response(
        "408 Request Timeout", "RequestTimeout", "the request was not sent in time"
    )
    too_many = _plain_response(
        "503 Service Unavailable", "TooManyConnections", "too many open connections"
    )
    head_timeout, body_timeout = settings.head_timeout, settings.body_timeout

    class StrongroomHttpProtocol(HttpToolsProtocol):
        _tls_ext: dict[str, Any] | None = None
        _in_head = True
        _head_bytes = 0
        _head_parts = 0
        _peer: object = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            peer = _peer_of(transport)
            if not limits.admit(peer):  # uvicorn never learns of it
                transport.write(too_many)
                transport.close()
                return
            self._peer = peer
            super().connection_made(transport)
            self._arm(head_timeout)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                der = ssl_object.getpeercert(binary_form=True)
                chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
                self._tls_ext = {
                    "server_cert": None,
                    "client_cert_chain": chain,
                    "client_cert_name": None,
                    "client_cert_error": None,
                    "tls_version": None,
                    "cipher_suite": None,
                }

        def data_received(self, data: bytes) -> None:
            # Two counts: the raw bytes of a head that arrives over several reads (so that
            # httptools never buffers more than the cap), and in the parser's callbacks the
            # head's parts, which also catches a whole oversized head (or several pipelined
            # ones) arriving in a single read.
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

        def _refuse_head(self) -> None:
            self._in_head = False
            self.transport.write(response)
            self.transport.close()

        def _count_head(self, size: int) -> None:
            self._head_parts += size
            if self._head_parts > MAX_HEAD_BYTES:
                # httptools turns this into a parse error, which uvicorn answers through
                # send_400_response: that is where the 431 goes out instead
                raise _HeadTooLarge

        def send_400_response(self, msg: str) -> None:
            if self._head_parts > MAX_HEAD_BYTES:
                self._refuse_head()
            else:
                super().send_400_response(msg)

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_message_begin(self) -> None:
            self._head_parts = 0
            self._arm(head_timeout)
            super().on_message_begin()
            if self._tls_ext is not None:
                self.scope["extensions"] = cast(Any, {"tls": self._tls_ext})

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._peer is None:  # refused in connection_made
                return
            limits.release(self._peer)
            self._peer = None
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                self._arm(seconds)  # we are busy answering (reads paused): not their delay
                return
            if cycle is None or not cycle.response_started:  # else it has had its answer
                self.transport.write(too_slow)
            self.transport.close()

    return StrongroomHttpProtocol


def bind_unix_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the service's Unix socket with `mode` set before anyone can connect."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # a stale socket from a service that died
        else:
            raise InvalidArgument(f"a service is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777)  # nobody can connect in the window before chmod
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise InvalidArgument(f"no group named {group!r}") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def tls_context(settings: ServerConfig) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2+, client certificates checked against the CA."""
    assert settings.tls_cert is not None and settings.tls_key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            ctx.load_verify_locations(settings.tls_client_ca)
            ctx.verify_mode = (
                ssl.CERT_REQUIRED if settings.client_cert_required else ssl.CERT_OPTIONAL
            )
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the TLS certificate or key: {e}") from None
    return ctx


def serve(
    config: Config,
    settings: ServerConfig,
    *,
    ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT; then finish in-flight requests, lock the vault
    and purge guarded memory."""
    if not (_has("uvicorn") and _has("httptools")):
        raise BackendUnavailable(
            "server", "the service needs uvicorn and httptools: pip install 'strongroom[server]'"
        )
    if settings.socket is None and settings.listen is None:
        raise InvalidArgument("nothing to listen on: set [server] socket or listen")
    if settings.listen is not None and (settings.tls_cert is None or settings.tls_key is None):
        raise InvalidArgument("TCP needs TLS: set [server] tls_cert and tls_key")
    ks = Keystore(config, actor="strongroom-serve")
    tenants = TenantStore(config.data_dir / "tenants.sqlite")
    app = App(ks, tenants, settings)
    loop_factory = None
    if _has("uvloop"):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(app, settings, ready))


FD_RESERVE = 128
"""File descriptors kept back from connections: the keystore's own files, devices, logs."""


def _connection_budget() -> int:
    """The default total cap: raise the soft RLIMIT_NOFILE to the hard one where allowed,
    and leave FD_RESERVE descriptors for everything else, so that accept() never runs out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return max(16, soft - FD_RESERVE)


async def _serve(
    app: App, settings: ServerConfig, ready: Callable[[list[str]], None] | None
) -> None:
    import uvicorn

    servers: list[Any] = []
    where: list[str] = []
    limits = _ConnectionLimits(
        settings.max_connections or _connection_budget(), settings.max_connections_per_peer
    )
    protocol = _protocol_class(settings, limits)  # one class: the caps span both listeners
    common: dict[str, Any] = {
        "lifespan": "off",
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "timeout_keep_alive": settings.keepalive_timeout,
        "server_header": False,
        "date_header": False,
        "limit_concurrency": limits.total + 1024,  # ours refuses first, with a clearer answer
    }
    loop_name = "uvloop" if _has("uvloop") else "asyncio"
    sockets: list[tuple[Any, socket.socket]] = []
    try:
        if settings.socket is not None:
            sock = bind_unix_socket(settings.socket, settings.socket_mode, settings.socket_group)
            cfg = uvicorn.Config(app, loop=loop_name, http=protocol, **common)
            sockets.append((uvicorn.Server(cfg), sock))
            where.append(f"unix:{settings.socket}")
        if settings.listen is not None:
            host, port = settings.listen
            ctx = tls_context(settings)
            tcp = socket.create_server((host, port), reuse_port=False, backlog=1024)
            tcp.setblocking(False)
            real_port = tcp.getsockname()[1]
            cfg = uvicorn.Config(
                app,
                loop=loop_name,
                http=protocol,
                ssl_context_factory=lambda _config, _default: ctx,
                **common,
            )
            sockets.append((uvicorn.Server(cfg), tcp))
            where.append(f"https://{host}:{real_port}")
        servers.extend(server for server, _ in sockets)
        stop = asyncio.Event()

        def on_signal() -> None:
            stop.set()

        import signal

        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
        tasks = [asyncio.create_task(_run_server(server, sock)) for server, sock in sockets]
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                for t in tasks:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
            await asyncio.sleep(0.01)
        if settings.audit_checkpoint_seconds > 0:
            tasks.append(asyncio.create_task(_checkpoints(app, settings.audit_checkpoint_seconds)))
        if ready is not None:
            ready(where)
        log.info("strongroom service listening on %s", ", ".join(where))
        await stop.wait()
        for server in servers:
            server.should_exit = True
        for task in tasks[len(servers) :]:  # the checkpoint timer
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for _, sock in sockets:
            sock.close()
        if settings.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(settings.socket)
        app.close()


async def _checkpoints(app: App, every: float) -> None:
    """Sign a checkpoint every `every` seconds while records are pending, so that a cut at
    the log's end loses at most that much unsigned tail (docs/audit.md)."""
    while True:
        await asyncio.sleep(every)
        if app.ks.audit.pending:
            try:
                await asyncio.to_thread(app.ks.audit_checkpoint)
            except StrongroomError as e:  # the records stand; the next round tries again
                log.warning("periodic audit checkpoint failed: %s: %s", type(e).__name__, e)


async def _run_server(server: Any, sock: socket.socket) -> None:
    """uvicorn's Server.serve on our own socket, without its own signal handling."""
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    if server.should_exit:
        return
    await server.main_loop()
    await server.shutdown(sockets=[sock])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


__all__ = ["App", "HttpError", "bind_unix_socket", "serve"]
