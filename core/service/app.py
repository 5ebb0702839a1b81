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
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..audit import current_principal
from ..config import ServerConfig
from ..errors import (
    AuditUnavailable,
    AuthenticationFailed,
    KeyNotFound,
    StrongroomError,
)
from ..keystore import Keystore
from ..memory import wipe
from ..types import KeyInfo, KeyType
from . import wire
from .openapi import openapi_document
from .tenants import Identity, Permission, TenantStore
from .wire import API_VERSION, NOT_FOUND, Field, Op

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


_AUDITED_REFUSALS = frozenset({401, 403, 404, 413, 423, 429})
"""Refusals written to the audit log (a 404 only once a route matched: a key or policy)."""

_EXPORTABLE_NEEDS_EXPORT = "making an exportable key needs export"

_GENERATABLE = [t.value for t in KeyType if t is not KeyType.SEED]

_PATH_PARAMS = {"name": r"(?P<name>[^/]{1,512})", "tenant": r"(?P<tenant>[^/]{1,256})"}
"""The regular expression of each path parameter of `wire.OPS`."""
_KEY_PREFIX = "/v1/keys/" + _PATH_PARAMS["name"]


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
    return wire.key_to_wire(info)


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
    op: Op
    pattern: re.Pattern[str]
    handler: Handler

    @property
    def method(self) -> str:
        return self.op.method


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
        self.routes = [self._route(op) for op in wire.OPS]
        # Fast dispatch: exact paths by (method, path); key operations by (method, verb).
        self._exact: dict[tuple[str, str], Route] = {}
        self._key_ops: dict[tuple[str, str], Route] = {}
        for route in self.routes:
            pattern = route.pattern.pattern
            if "(?P<" not in pattern:
                self._exact[(route.method, pattern)] = route
            elif pattern.startswith(_KEY_PREFIX):
                verb = pattern[len(_KEY_PREFIX) :].lstrip("/")
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
            if route.op.auth:
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
            who: Identity | None = scope.get("strongroom.identity")
            admin = who is not None and who.admin
            status, payload = wire.error_to_wire(e, detail=admin)
            if status == 500:
                log.error("request failed: %s: %s", type(e).__name__, e)
            elif status == 503 and not admin:
                # the detail names server paths and devices: the operator's, in the log
                log.warning("refused with 503: %s: %s", type(e).__name__, e)
            return status, payload, []
        except Exception as e:  # a bug: say nothing of it to the caller, log its kind only
            log.exception("request failed: %s", type(e).__name__)
            return 500, wire.INTERNAL_ERROR, []

    def _audit_refusal(
        self, scope: Scope, e: HttpError, route: Route | None, params: dict[str, str] | None
    ) -> None:
        """A refused request is a security event: record who asked for what, and why not."""
        identity: Identity | None = scope.get("strongroom.identity")
        op = route.op.name if route is not None else "request"
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

    # -- routes: compiled from wire.OPS ----------------------------------------------------------
    def _route(self, op: Op) -> Route:
        pattern = re.sub(r"\{(\w+)\}", lambda m: _PATH_PARAMS[m.group(1)], op.path)
        handler = self._generic(op) if op.call is not None else getattr(self, op.name)
        if op.admin:
            handler = self._admin_only(handler)
        return Route(op, re.compile(pattern), handler)

    def _admin_only(self, handler: Handler) -> Handler:
        async def admin_handler(req: Request) -> Any:
            self._admin(req.identity)
            return await handler(req)

        return admin_handler

    def _generic(self, op: Op) -> Handler:
        """The handler of an operation that decodes its fields, calls one KeyAPI method on
        the key in its path and encodes the result: everything it does is in `op`.

        The order of checks is the table's: the permissions on the key in the path, then
        each field in turn (a field that names another key checks the caller's permission
        on that key as it is decoded), then the vault seal, then the call."""
        assert op.call is not None and op.permissions
        first, more = op.permissions[0], op.permissions[1:]
        method = op.call
        fields = [(f.param, _decoder(f), f.needs, f.kind) for f in op.body or ()]
        query = [(f.param, _query_decoder(f)) for f in op.query]
        shaping = [f.param for f in (*(op.body or ()), *op.query) if not f.passed]
        encode = _encoder(op)
        run, status = op.run, op.status

        async def handler(req: Request) -> Any:
            view, name = self._key_request(req, first)
            identity = req.identity
            assert identity is not None
            for permission in more:
                self._check_key(identity, name, permission)
            body = req.body
            kwargs: dict[str, Any] = {}
            for param, decode, needs, kind in fields:
                value = kwargs[param] = decode(body)
                if needs is not None:
                    if kind != wire.BOOL:  # the field names a key
                        self._check_key(identity, value, needs)
                    elif value and needs not in self.tenants.permissions_on(
                        identity, kwargs["new_name"]
                    ):  # an exportable new key
                        raise HttpError(403, "NotPermitted", _EXPORTABLE_NEEDS_EXPORT)
            for param, decode_query in query:
                kwargs[param] = decode_query(req.query)
            values = kwargs
            if shaping:  # fields the call does not take, only the answer
                kwargs = {k: v for k, v in kwargs.items() if k not in shaping}
            call = getattr(view, method)
            if run == wire.INLINE:
                result = await self._run(view, name, lambda: call(name, **kwargs))
            elif run == wire.AUDITED:  # a read the keystore does not audit itself
                try:
                    with view.audited(method, name) as facts:
                        result = call(name, **kwargs)
                        facts["backend"] = _backend_of(result)
                except KeyNotFound:
                    raise HttpError(404, "KeyNotFound", NOT_FOUND) from None
            else:
                if run == wire.SEALED:
                    self._check_vault(view, name)
                result = await asyncio.to_thread(call, name, **kwargs)
            payload = encode(result, values)
            return payload if status == 200 else (status, payload)

        handler.__name__ = op.name
        return handler

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
            raise HttpError(403, "NotPermitted", _EXPORTABLE_NEEDS_EXPORT)
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
            raise HttpError(403, "NotPermitted", _EXPORTABLE_NEEDS_EXPORT)
        return exportable

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
        status = self.ks.vault_control().vault_status()
        return {**_jsonable(status), "sealed_by_service": self.vault_sealed}

    async def vault_lock(self, req: Request) -> Any:
        self.vault_sealed = True
        await asyncio.to_thread(self.ks.vault_control().lock)
        return {"locked": True}

    async def vault_unlock(self, req: Request) -> Any:
        method = _opt_str(req.body, "method")
        used = await asyncio.to_thread(self.ks.vault_control().unlock, method)
        self.vault_sealed = False
        return {"locked": False, "method": used}

    # -- audit ---------------------------------------------------------------------------------
    async def audit_records(self, req: Request) -> Any:
        from ..audit import last_seq, read_records

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

        path = self.ks.config.data_dir / "audit.jsonl"
        public = await asyncio.to_thread(self.ks.audit_public_key)
        report = await asyncio.to_thread(verify_log, path, public)
        return report.to_dict()

    async def audit_checkpoint(self, req: Request) -> Any:
        record = await asyncio.to_thread(self.ks.audit_checkpoint)
        return {"checkpoint": record}

    # -- tenants and policies ------------------------------------------------------------------
    async def list_tenants(self, req: Request) -> Any:
        return {"tenants": self.tenants.tenants()}

    async def create_tenant(self, req: Request) -> Any:
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        with self.ks.audited("tenant_create", None, write_ahead=True, tenant=name):
            await asyncio.to_thread(self.tenants.create_tenant, name)
        return 201, {"name": name}

    async def issue_token(self, req: Request) -> Any:
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        tenant = req.params["tenant"]
        with self.ks.audited("token_issue", None, write_ahead=True, tenant=tenant, identity=name):
            token = await asyncio.to_thread(self.tenants.issue_token, tenant, name)
        return 201, {"tenant": tenant, "name": name, "token": token}

    async def revoke_identity(self, req: Request) -> Any:
        tenant, name = req.params["tenant"], req.params["name"]
        with self.ks.audited("token_revoke", None, write_ahead=True, tenant=tenant, identity=name):
            await asyncio.to_thread(self.tenants.revoke, tenant, name)
        return {"revoked": req.params["name"]}

    async def list_policies(self, req: Request) -> Any:
        tenant = req.query.get("tenant")
        return {"policies": [p.to_dict() for p in self.tenants.policies(tenant)]}

    async def grant(self, req: Request) -> Any:
        from .tenants import parse_permissions

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


# -- the generic handlers' decoding of fields and encoding of answers, by wire type -----------
Decoder = Callable[[dict[str, Any]], Any]


def _decoder(f: Field) -> Decoder:
    """How a body field is read and checked; each refusal is a 400 naming the field."""
    name, kind, default = f.name, f.kind, f.default
    if kind == wire.BYTES:
        if f.nullable:
            return lambda body: None if body.get(name) is None else _unb64(body[name], name)
        if f.has_default:
            return lambda body: _unb64(body[name], name) if name in body else default
        return lambda body: _unb64(body.get(name), name)
    if kind == wire.BOOL:
        return lambda body: _flag(body, name)
    if kind == wire.VERSION:
        return _version
    if kind == wire.USAGE:
        return _usage_list
    if f.enum is not None:
        enum = f.enum
        choices = f"{', '.join(enum[:-1])} or {enum[-1]}"

        def one_of(body: dict[str, Any]) -> Any:
            value = body.get(name, default)
            if value not in enum:
                raise HttpError(400, "InvalidArgument", f"{name} is {choices}")
            return value

        return one_of
    if kind == wire.INT and f.required and f.maximum is None:

        def positive(body: dict[str, Any]) -> int:
            value = body.get(name)
            if type(value) is not int or value < (f.minimum or 1):
                raise HttpError(400, "InvalidArgument", f"{name} must be a positive integer")
            return value

        return positive
    if kind in (wire.NAME, wire.KEY_TYPE) and f.required:
        nonempty = kind == wire.NAME

        def required(body: dict[str, Any]) -> str:
            value = body.get(name)
            if not isinstance(value, str) or (nonempty and not value):
                raise HttpError(400, "InvalidArgument", f"{name} is required")
            return value

        return required
    if kind in (wire.KEY_TYPE, wire.STR) and f.has_default:

        def string(body: dict[str, Any]) -> str:
            value = body.get(name, default)
            if not isinstance(value, str):
                raise HttpError(400, "InvalidArgument", f"{name} must be a string")
            return value

        return string
    if kind in (wire.STR, wire.BACKEND, wire.SIGN_ALG, wire.ENC_ALG, wire.KEY_TYPE):
        return lambda body: _opt_str(body, name)
    raise AssertionError(f"no generic decoder for {name} ({kind})")  # a table error, at start


def _query_decoder(f: Field) -> Decoder:
    """How a query parameter is read and checked (absent: its default, else None)."""
    name, default = f.name, f.default
    if f.kind == wire.INT:
        lo, hi = f.minimum or 0, f.maximum or 1 << 62

        def integer(query: dict[str, Any]) -> int | None:
            if name not in query:
                return None if not f.has_default else int(default)
            return _int_query(query, name, 0, lo, hi)

        return integer
    if f.enum is not None:
        return _decoder(f)  # a query is a dict of strings, read as a body is
    raise AssertionError(f"no generic query decoder for {name} ({f.kind})")


Encoder = Callable[[Any, dict[str, Any]], Any]


def _encoder(op: Op) -> Encoder:
    """How a generic operation's result becomes its answer; `values` are the request's
    decoded fields (a format asked for shapes the answer)."""
    if op.response == wire.KEY:
        return lambda info, values: _key_json(info)
    special = _ENCODERS.get(op.name)
    if special is not None:
        return special
    assert isinstance(op.response, tuple) and op.result is not None
    field = next(f for f in op.response if f.name == op.result)
    if field.kind == wire.BYTES:
        return lambda data, values: {field.name: _b64(data)}
    if field.kind == wire.BOOL:  # verify: no exception is the answer (InvalidSignature is
        return lambda result, values: {field.name: True}  # answered {"valid": false})
    if field.kind == wire.OBJECT:
        return lambda result, values: {field.name: _jsonable(result)}
    raise AssertionError(f"no generic encoder for {op.name}")


def _public_key(public: Any, values: dict[str, Any]) -> dict[str, Any]:
    if values["format"] == "pem":
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {"pem": pem.decode()}
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"der": _b64(der)}


def _exported(material: bytes, values: dict[str, Any]) -> dict[str, Any]:
    fmt = values["format"]
    return {"pem": material.decode()} if fmt == "pem" else {fmt: _b64(material)}


_ENCODERS: dict[str, Encoder] = {
    "public_key": _public_key,
    "export": _exported,
    "versions": lambda found, values: {"versions": [wire.version_to_wire(v) for v in found]},
}


def _backend_of(result: Any) -> str | None:
    """The backend an audited read names: the key's, or its newest version's."""
    if isinstance(result, list):
        return result[-1].backend if result else None
    return getattr(result, "backend", None)


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
