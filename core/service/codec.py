"""How the service's requests and answers look in Python: `HttpError` (a refusal with its
status), `Request` and `Route`, and the decoding of fields and encoding of answers that the
handlers compiled from `wire.OPS` use (split out of app.py, docs/decisions.md "Modules split
along their banners"). Every refusal here is an `HttpError` 400 that names the field, never
its value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..types import KeyInfo
from . import wire
from .tenants import Identity
from .wire import Field, Op

Scope = dict[str, Any]


class HttpError(Exception):
    """An error answered with `status` and a JSON body; never a traceback."""

    def __init__(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, field_name: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, "InvalidArgument", f"{field_name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "InvalidArgument", f"{field_name} is not valid base64") from None


def opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, "InvalidArgument", f"{name} must be a string")
    return value


def key_json(info: KeyInfo) -> dict[str, Any]:
    return wire.key_to_wire(info)


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


# -- the generic handlers' decoding of fields and encoding of answers, by wire type -----------
Decoder = Callable[[dict[str, Any]], Any]


def decoder(f: Field) -> Decoder:
    """How a body field is read and checked; each refusal is a 400 naming the field."""
    name, kind, default = f.name, f.kind, f.default
    if kind == wire.BYTES:
        if f.nullable:
            return lambda body: None if body.get(name) is None else unb64(body[name], name)
        if f.has_default:
            return lambda body: unb64(body[name], name) if name in body else default
        return lambda body: unb64(body.get(name), name)
    if kind == wire.BOOL:
        return lambda body: flag(body, name)
    if kind == wire.VERSION:
        return _version
    if kind == wire.USAGE:
        return usage_list
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
        return lambda body: opt_str(body, name)
    raise AssertionError(f"no generic decoder for {name} ({kind})")  # a table error, at start


def query_decoder(f: Field) -> Decoder:
    """How a query parameter is read and checked (absent: its default, else None)."""
    name, default = f.name, f.default
    if f.kind == wire.INT:
        lo, hi = f.minimum or 0, f.maximum or 1 << 62

        def integer(query: dict[str, Any]) -> int | None:
            if name not in query:
                return None if not f.has_default else int(default)
            return int_query(query, name, 0, lo, hi)

        return integer
    if f.enum is not None:
        return decoder(f)  # a query is a dict of strings, read as a body is
    raise AssertionError(f"no generic query decoder for {name} ({f.kind})")


Encoder = Callable[[Any, dict[str, Any]], Any]


def encoder(op: Op) -> Encoder:
    """How a generic operation's result becomes its answer; `values` are the request's
    decoded fields (a format asked for shapes the answer)."""
    if op.response == wire.KEY:
        return lambda info, values: key_json(info)
    special = _ENCODERS.get(op.name)
    if special is not None:
        return special
    assert isinstance(op.response, tuple) and op.result is not None
    field = next(f for f in op.response if f.name == op.result)
    if field.kind == wire.BYTES:
        return lambda data, values: {field.name: b64(data)}
    if field.kind == wire.BOOL:  # verify: no exception is the answer (InvalidSignature is
        return lambda result, values: {field.name: True}  # answered {"valid": false})
    if field.kind == wire.OBJECT:
        return lambda result, values: {field.name: jsonable(result)}
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
    return {"der": b64(der)}


def _exported(material: bytes, values: dict[str, Any]) -> dict[str, Any]:
    fmt = values["format"]
    return {"pem": material.decode()} if fmt == "pem" else {fmt: b64(material)}


def _chain(chain: list[Any], values: dict[str, Any]) -> dict[str, Any]:
    return {"pem": "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)}


_ENCODERS: dict[str, Encoder] = {
    "set_certificate": _chain,
    "certificate": _chain,
    "public_key": _public_key,
    "export": _exported,
    "versions": lambda found, values: {"versions": [wire.version_to_wire(v) for v in found]},
}


def backend_of(result: Any) -> str | None:
    """The backend an audited read names: the key's, or its newest version's."""
    if isinstance(result, list):
        return result[-1].backend if result else None
    return getattr(result, "backend", None)


def policy_body(body: dict[str, Any]) -> tuple[str, str, str, list[str] | None]:
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


def usage_list(body: dict[str, Any]) -> list[str] | None:
    usage = body.get("usage")
    if usage is not None and not (
        isinstance(usage, list) and all(isinstance(u, str) for u in usage)
    ):
        raise HttpError(400, "InvalidArgument", "usage must be a list of strings")
    return usage


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise HttpError(400, "InvalidArgument", f"{name} must be true or false")
    return value


def int_query(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not lo <= int(raw) <= hi:
        raise HttpError(400, "InvalidArgument", f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def parse_query(raw: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    if not raw:
        return {}
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "InvalidArgument", "the query string is not valid") from None


def unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value, errors="strict")


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def client_certificate(scope: Scope) -> bytes | None:
    """The client certificate's DER, from the ASGI TLS extension (see TlsHttpProtocol)."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])
