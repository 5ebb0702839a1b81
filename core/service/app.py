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
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.exceptions import InvalidSignature

from ..api import REQUESTER_HEADER, REQUESTER_PATTERN
from ..audit import current_principal, current_requester
from ..config import ServerConfig
from ..errors import (
    AuditUnavailable,
    AuthenticationFailed,
    KeyNotFound,
    StorageError,
    StrongroomError,
)
from ..keystore import Keystore
from ..types import KeyType
from . import wire
from .admin import AdminHandlers
from .codec import (
    Handler,
    HttpError,
    Request,
    Route,
    Scope,
    backend_of,
    client_certificate,
    decoder,
    encoder,
    key_json,
    parse_query,
    query_decoder,
    unquote,
)
from .keys import _EXPORTABLE_NEEDS_EXPORT, KeyHandlers
from .openapi import openapi_document
from .tenants import Identity, Permission, TenantStore
from .wire import API_VERSION, NOT_FOUND, Op

log = logging.getLogger("strongroom.server")


TOKEN_HEADER = b"authorization"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _requester(scope: Scope) -> str | None:
    """The client's requester note (`strongroom.api.requester`): one header of 1-256
    printable ASCII characters, else HttpError 400. Recorded beside the identity, never as
    it: it is the client's claim (an ssh agent naming its peer)."""
    found = [v for n, v in scope["headers"] if n == REQUESTER_HEADER.encode()]
    if not found:
        return None
    note: str = found[0].decode("latin-1")
    if len(found) > 1 or not REQUESTER_PATTERN.fullmatch(note):
        raise HttpError(
            400,
            "InvalidArgument",
            f"send at most one {REQUESTER_HEADER} header of 1-256 printable ASCII characters",
        )
    return note


_AUDITED_REFUSALS = frozenset({401, 403, 404, 413, 423, 429})
"""Refusals written to the audit log (a 404 only once a route matched: a key or policy)."""

_GENERATABLE = [t.value for t in KeyType if t not in (KeyType.SEED, KeyType.SECRET)]

_PATH_PARAMS = {"name": r"(?P<name>[^/]{1,512})", "tenant": r"(?P<tenant>[^/]{1,256})"}
"""The regular expression of each path parameter of `wire.OPS`."""
_KEY_PREFIX = "/v1/keys/" + _PATH_PARAMS["name"]


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


class App(KeyHandlers, AdminHandlers):
    """The ASGI application (its access checks and key handlers in keys.py, its admin routes
    in admin.py). `keystore` stays open for the app's life; `close()` locks it."""

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
            query = parse_query(scope.get("query_string", b""))
            request = Request(scope, params, query, body, identity)
            token = current_principal.set(identity.principal if identity else None)
            note = current_requester.set(_requester(scope) if identity else None)
            try:
                result = await route.handler(request)
            finally:
                current_requester.reset(note)
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
            if isinstance(e, StorageError):
                # The store is away (a PostgreSQL restart, docs/cluster.md): nothing was
                # done, and the next attempt reconnects.
                return status, payload, [(b"retry-after", b"1")]
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
        except (AuditUnavailable, StorageError) as failure:  # the request is refused anyway
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
            except (AuditUnavailable, StorageError) as failure:
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
                    return route, {"name": unquote(name)}
                except UnicodeDecodeError:
                    raise HttpError(400, "InvalidArgument", "the path is not valid UTF-8") from None
        allowed: list[str] = []
        for route in self.routes:
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            if route.method == method:
                try:
                    return route, {k: unquote(v) for k, v in m.groupdict().items()}
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
        der = client_certificate(scope)
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
        fields = [(f.param, decoder(f), f.needs, f.kind) for f in op.body or ()]
        query = [(f.param, query_decoder(f)) for f in op.query]
        shaping = [f.param for f in (*(op.body or ()), *op.query) if not f.passed]
        encode = encoder(op)
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
                        facts["backend"] = backend_of(result)
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
                key_json(k)
                for k in view.keys()
                if Permission.READ in self.tenants.permissions_on(req.identity, k.name)
            ]
            facts["backend"] = None
        return {"keys": keys}
