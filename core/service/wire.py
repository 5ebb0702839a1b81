"""The service's wire format: one table of its operations (`OPS`), and the codecs both
sides of the connection use.

Each `Op` says what one endpoint is: its method and path, the permissions it needs, the
fields of its request (JSON body or query, with their wire types, defaults and bounds),
the shape of its answer and its success status. Three things are derived from the table
rather than written next to it:

- the routes of the service (`strongroom.service.app`): an operation that only decodes its
  fields, calls one `KeyAPI` method and encodes the result (`Op.call` set) is served by one
  generic handler; the few with logic of their own keep a handler named `Op.name`;
- the OpenAPI document (`strongroom.service.openapi`), one loop over the table;
- the client (`strongroom.service.client`): each method names its operation, and the path,
  the body's encoding and the answer's decoding come from here.

Errors cross the wire as `{"error": {"type": CLASS, "message": ...}}` with the status
`STATUS` gives the class (`error_to_wire`); the client turns them back into the same
exception classes (`error_from_wire`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from .. import errors
from ..api import BackendStatus
from ..errors import (
    AuditUnavailable,
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    NotPermitted,
    PolicyViolation,
    StorageError,
    StrongroomError,
    TenantNotFound,
    UnsupportedOperation,
)
from ..types import KeyInfo, KeyType, KeyVersion, Operation, Usage


class Permission(StrEnum):
    """What a policy grants. `read` covers list, show, public key and versions; `generate`
    covers import; `manage` covers rotate, disable, enable and min_decryption_version;
    `adopt` registers a key that already exists in a backend (never implied by `all`: in
    shared hardware it claims a key nobody gave the tenant); `admin` is the service's own
    management (tenants, tokens, policies, vault, audit)."""

    READ = "read"
    SIGN = "sign"
    VERIFY = "verify"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    AGREE = "agree"
    DERIVE = "derive"
    GENERATE = "generate"
    MANAGE = "manage"
    DELETE = "delete"
    EXPORT = "export"
    RANDOM = "random"
    ADOPT = "adopt"
    ADMIN = "admin"


API_VERSION = "1"

NOT_FOUND = "no such key"
"""The one answer for a key that is absent, another tenant's, or not the caller's at all."""

# -- wire types of fields ----------------------------------------------------------------------
# Each names how a value is written in JSON (and so its OpenAPI schema), how the service
# decodes and checks it, and how the client encodes it.
BYTES: Final = "bytes"  # base64 string
NAME: Final = "name"  # a key name: a non-empty string
IDENT: Final = "ident"  # a tenant or identity name
KEY_TYPE: Final = "key_type"  # a KeyType value (the service lists the ones it makes)
BACKEND: Final = "backend"  # a backend name or null (the service lists its own)
USAGE: Final = "usage"  # a list of Usage values, or null
SIGN_ALG: Final = "sign_algorithm"  # pkcs1v15, pss, pkcs1v15-sha512, pkcs1v15-raw or null
ENC_ALG: Final = "encrypt_algorithm"  # oaep-sha256, oaep-sha1, aes-kwp, aes-cbc-pad or null
BOOL: Final = "bool"
INT: Final = "int"
VERSION: Final = "version"  # a key version (a positive integer) or null
STR: Final = "str"
REF: Final = "ref"  # an object of strings, at least one: where a backend finds a key
STRINGS: Final = "strings"  # a list of strings
OBJECT: Final = "object"  # any JSON object
KEY: Final = "key"  # the Key schema (KeyInfo without backend attributes)
KEYS: Final = "keys"  # a list of Keys
OBJECTS: Final = "objects"  # a list of JSON objects

_MISSING: Final = object()


@dataclass(frozen=True)
class Field:
    """One field of a request body, a query or an answer.

    `default` is what an absent field means (a field that is present must be valid, null
    included, unless `nullable`); `arg` the KeyAPI parameter it fills when that is not
    its own name, and `passed` False for a field that only shapes the answer; `needs` a
    permission the caller must hold on the key the field names (on the new key, for the
    `exportable` flag of an operation that makes one)."""

    name: str
    kind: str
    required: bool = False
    default: Any = _MISSING
    nullable: bool = False
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    arg: str | None = None
    needs: Permission | None = None
    passed: bool = True

    @property
    def param(self) -> str:
        return self.arg or self.name

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


# How a generic handler runs its KeyAPI call (strongroom.service.app):
INLINE: Final = "inline"  # on the event loop for a vault key (fast), else in a thread
SEALED: Final = "sealed"  # in a thread, refused with 423 on a vault key while sealed
THREAD: Final = "thread"  # in a thread
AUDITED: Final = "audited"  # a read the keystore does not audit itself: audited here


@dataclass(frozen=True)
class Op:
    """One operation of the service.

    `permissions` are checked in order on the key named in the path; on an operation
    without one, `admin` means the admin role, `random` the permission on no key,
    `generate` the permission on the name in the body, and `read` (list) the permission
    each listed key needs. `body` is None for an operation without a request body.
    `response` is KEY (the whole answer is a Key), OBJECT (any object), or the answer's
    fields; `result` names the field the client returns. `call` is the KeyAPI method a
    generic handler calls (then `run` says how), None for a custom handler."""

    name: str
    method: str
    path: str
    summary: str
    permissions: tuple[Permission, ...] = ()
    body: tuple[Field, ...] | None = None
    query: tuple[Field, ...] = ()
    response: str | tuple[Field, ...] = OBJECT
    result: str | None = None
    status: int = 200
    auth: bool = True
    call: str | None = None
    run: str = THREAD

    @property
    def admin(self) -> bool:
        return Permission.ADMIN in self.permissions


def _f(name: str, kind: str, **kw: Any) -> Field:
    return Field(name, kind, **kw)


def _req(name: str, kind: str, **kw: Any) -> Field:
    return Field(name, kind, required=True, **kw)


_DATA_OPTIONS = (
    _f("envelope", BOOL, default=False),
    _f("prehashed", BOOL, default=False),
)
_P = Permission
_KEY = "/v1/keys/{name}"

OPS: tuple[Op, ...] = (
    Op("health", "GET", "/v1/health", "liveness", auth=False,
       response=(_req("status", STR),)),
    Op("get_openapi", "GET", "/openapi.json", "this document", auth=False),
    Op("whoami", "GET", "/v1/whoami", "the caller's identity"),
    Op("list_backends", "GET", "/v1/backends", "configured backends", result="backends"),
    Op("list_keys", "GET", "/v1/keys", "the caller's keys", (_P.READ,),
       response=(_req("keys", KEYS),), result="keys"),
    Op("generate", "POST", "/v1/keys", "generate a key", (_P.GENERATE,), status=201,
       body=(
           _req("name", NAME),
           _req("type", KEY_TYPE, arg="key_type"),
           _f("backend", BACKEND),
           _f("usage", USAGE),
           _f("exportable", BOOL, default=False, needs=_P.EXPORT),
           _f("material", BYTES),
           _f("format", STR, enum=("auto", "raw", "der", "pem"), default="auto"),
       ),
       response=KEY),
    Op("show_key", "GET", _KEY, "show a key", (_P.READ,), response=KEY,
       call="info", run=AUDITED),
    Op("delete_key", "DELETE", _KEY,
       "delete a key: after deletion_wait (or `after` seconds), or at once with now=true",
       (_P.DELETE,),
       query=(
           _f("now", STR, enum=("true", "false"), default="false"),
           _f("after", INT, minimum=0, maximum=10 * 365 * 86400),
       ),
       response=(_f("deleted", STR), _f("scheduled", STR), _f("delete_after", STR))),
    Op("exchange", "POST", f"{_KEY}/exchange", "the raw ECDH/X25519 shared secret",
       (_P.AGREE,),
       body=(_req("peer", BYTES),), response=(_req("secret", BYTES),), result="secret",
       call="exchange", run=INLINE),
    Op("mac", "POST", f"{_KEY}/mac", "HMAC-SHA256 with an HMAC key", (_P.SIGN,),
       body=(_req("data", BYTES),), response=(_req("mac", BYTES),), result="mac",
       call="mac", run=INLINE),
    Op("derive", "POST", f"{_KEY}/derive", "HKDF-SHA256 from a key into a new key",
       (_P.DERIVE,), status=201,
       body=(
           _req("new_name", NAME, needs=_P.GENERATE),
           _f("type", KEY_TYPE, default="aes-256", arg="key_type"),
           _f("usage", USAGE),
           _f("salt", BYTES, default=b""),
           _f("info", BYTES, default=b""),
           _f("exportable", BOOL, default=False, needs=_P.EXPORT),
       ),
       response=KEY, call="derive", run=SEALED),
    Op("rotate", "POST", f"{_KEY}/rotate", "a new primary version", (_P.MANAGE,),
       body=(_f("backend", BACKEND),), response=KEY, call="rotate", run=SEALED),
    Op("versions", "GET", f"{_KEY}/versions", "the key's versions", (_P.READ,),
       response=(_req("versions", OBJECTS),), result="versions",
       call="versions", run=AUDITED),
    Op("disable", "POST", f"{_KEY}/disable", "disable a key", (_P.MANAGE,),
       response=KEY, call="disable"),
    Op("enable", "POST", f"{_KEY}/enable", "enable a key", (_P.MANAGE,),
       response=KEY, call="enable"),
    Op("key_config", "POST", f"{_KEY}/config", "set min_decryption_version", (_P.MANAGE,),
       body=(_req("min_decryption_version", INT, minimum=1, arg="version"),),
       response=KEY, call="set_min_decryption_version"),
    Op("cancel_deletion", "POST", f"{_KEY}/cancel-deletion", "cancel a scheduled deletion",
       (_P.DELETE,), response=KEY, call="cancel_deletion"),
    Op("public_key", "GET", f"{_KEY}/public", "the public key", (_P.READ,),
       query=(
           _f("format", STR, enum=("pem", "der"), default="pem", passed=False),
           _f("version", INT, minimum=1, maximum=1 << 31),
       ),
       response=(_f("pem", STR), _f("der", BYTES)), result="der",
       call="public_key", run=INLINE),
    Op("sign", "POST", f"{_KEY}/sign", "sign", (_P.SIGN,),
       body=(_req("data", BYTES), _f("algorithm", SIGN_ALG), *_DATA_OPTIONS),
       response=(_req("signature", BYTES),), result="signature",
       call="sign", run=INLINE),
    Op("verify", "POST", f"{_KEY}/verify", "verify a signature", (_P.VERIFY,),
       body=(
           _req("data", BYTES),
           _req("signature", BYTES),
           _f("algorithm", SIGN_ALG),
           *_DATA_OPTIONS,
           _f("version", VERSION),
       ),
       response=(_req("valid", BOOL),), result="valid", call="verify", run=INLINE),
    Op("encrypt", "POST", f"{_KEY}/encrypt", "encrypt", (_P.ENCRYPT,),
       body=(
           _req("plaintext", BYTES),
           _f("aad", BYTES, default=b""),
           _f("algorithm", ENC_ALG),
           _f("envelope", BOOL, default=False),
       ),
       response=(_req("ciphertext", BYTES),), result="ciphertext",
       call="encrypt", run=INLINE),
    Op("decrypt", "POST", f"{_KEY}/decrypt", "decrypt", (_P.DECRYPT,),
       body=(
           _req("ciphertext", BYTES),
           _f("aad", BYTES, default=b""),
           _f("algorithm", ENC_ALG),
           _f("envelope", BOOL, default=False),
           _f("version", VERSION),
       ),
       response=(_req("plaintext", BYTES),), result="plaintext",
       call="decrypt", run=INLINE),
    Op("agree", "POST", f"{_KEY}/agree", "ECDH/X25519 into a new key", (_P.AGREE,),
       status=201,
       body=(
           _req("new_name", NAME, needs=_P.GENERATE),
           _req("peer", STR),
           _f("type", KEY_TYPE, default="aes-256", arg="key_type"),
           _f("salt", BYTES, default=b""),
           _f("info", BYTES, default=b""),
           _f("usage", USAGE),
           _f("exportable", BOOL, default=False, needs=_P.EXPORT),
       ),
       response=KEY),
    Op("export", "POST", f"{_KEY}/export",
       "export an exportable key: pem (text), der or raw (base64)", (_P.EXPORT,),
       body=(_f("format", STR, enum=("pem", "der", "raw"), default="pem"),),
       response=(_f("pem", STR), _f("der", BYTES), _f("raw", BYTES)),
       call="export_key", run=SEALED),
    Op("wrap", "POST", f"{_KEY}/wrap",
       "wrap the exportable key `key` under this key (AES key wrap, RFC 5649)",
       (_P.ENCRYPT,),
       body=(_req("key", NAME, needs=_P.EXPORT, arg="name"),),
       response=(_req("blob", BYTES),), result="blob", call="wrap", run=INLINE),
    Op("unwrap", "POST", f"{_KEY}/unwrap", "unwrap a wrapped key into a new key",
       (_P.DECRYPT,), status=201,
       body=(
           _req("blob", BYTES),
           _req("new_name", NAME, needs=_P.GENERATE),
           _req("type", KEY_TYPE, arg="key_type"),
           _f("usage", USAGE),
           _f("exportable", BOOL, default=False, needs=_P.EXPORT),
       ),
       response=KEY, call="unwrap", run=SEALED),
    Op("rewrap", "POST", f"{_KEY}/rewrap",
       "re-encrypt an enveloped ciphertext under the primary version",
       (_P.DECRYPT, _P.ENCRYPT),
       body=(_req("ciphertext", BYTES), _f("aad", BYTES, default=b""), _f("algorithm", ENC_ALG)),
       response=(_req("ciphertext", BYTES),), result="ciphertext",
       call="rewrap", run=INLINE),
    Op("attest", "POST", f"{_KEY}/attest",
       "a statement from the key's backend that the key lives in its hardware", (_P.READ,),
       body=(_f("nonce", BYTES, nullable=True),),
       response=(_req("statement", OBJECT),), result="statement",
       call="attest", run=INLINE),
    Op("set_certificate", "POST", f"{_KEY}/certificate",
       "keep a certificate or chain (PEM, leaf first; or DER) with the key; its public key "
       "must be the key's", (_P.MANAGE,),
       body=(_req("certificate", BYTES, arg="data"),),
       response=(_req("pem", STR),), result="pem",
       call="set_certificate"),
    Op("certificate", "GET", f"{_KEY}/certificate",
       "the certificate or chain kept with the key (PEM, leaf first; empty when none)",
       (_P.READ,),
       response=(_req("pem", STR),), result="pem",
       call="certificate"),
    Op("adopt", "POST", f"{_KEY}/adopt",
       "register a key that already exists in a backend, found by `ref`", (_P.ADOPT,),
       status=201,
       body=(
           _req("backend", STR),
           _req("ref", REF),
           _f("type", KEY_TYPE, nullable=True, arg="key_type"),
           _f("usage", USAGE),
       ),
       response=KEY),
    Op("random", "POST", "/v1/random", "random bytes", (_P.RANDOM,),
       body=(_req("n", INT, minimum=1, maximum=65536), _f("backend", BACKEND)),
       response=(_req("data", BYTES),), result="data"),
    Op("vault_status", "GET", "/v1/vault", "vault status (admin)", (_P.ADMIN,)),
    Op("vault_lock", "POST", "/v1/vault/lock", "lock the vault (admin)", (_P.ADMIN,)),
    Op("vault_unlock", "POST", "/v1/vault/unlock", "unlock the vault (admin)", (_P.ADMIN,),
       body=(_f("method", STR, nullable=True),), result="method"),
    Op("audit_records", "GET", "/v1/audit/records", "audit records (admin)", (_P.ADMIN,),
       query=(
           _f("since", INT, minimum=0),
           _f("limit", INT, minimum=1, maximum=10_000),
           _f("last", INT, minimum=1, maximum=10_000),
       ),
       response=(_req("records", OBJECTS),), result="records"),
    Op("audit_verify", "GET", "/v1/audit/verify", "verify the audit log (admin)", (_P.ADMIN,)),
    Op("audit_checkpoint", "POST", "/v1/audit/checkpoint", "sign a checkpoint now (admin)",
       (_P.ADMIN,)),
    Op("list_tenants", "GET", "/v1/tenants", "tenants (admin)", (_P.ADMIN,),
       response=(_req("tenants", OBJECTS),), result="tenants"),
    Op("create_tenant", "POST", "/v1/tenants", "create a tenant (admin)", (_P.ADMIN,),
       status=201, body=(_req("name", IDENT),), response=(_req("name", STR),)),
    Op("issue_token", "POST", "/v1/tenants/{tenant}/tokens",
       "issue an API token (admin); shown once", (_P.ADMIN,), status=201,
       body=(_req("name", IDENT),),
       response=(_f("tenant", STR), _f("name", STR), _req("token", STR)), result="token"),
    Op("revoke_identity", "DELETE", "/v1/tenants/{tenant}/identities/{name}",
       "revoke an identity (admin)", (_P.ADMIN,), response=(_req("revoked", STR),)),
    Op("list_policies", "GET", "/v1/policies", "policies (admin)", (_P.ADMIN,),
       query=(_f("tenant", STR),), response=(_req("policies", OBJECTS),), result="policies"),
    Op("grant", "POST", "/v1/policies", "grant permissions (admin)", (_P.ADMIN,),
       body=(
           _req("tenant", STR),
           _req("identity", STR),
           _req("keys", STR),
           _req("permissions", STRINGS),
       )),
    Op("revoke_policy", "DELETE", "/v1/policies", "take permissions back (admin)", (_P.ADMIN,),
       body=(
           _req("tenant", STR),
           _req("identity", STR),
           _req("keys", STR),
           _f("permissions", STRINGS),
       )),
)  # fmt: skip
"""Every operation of the service. Where two share a path, the order is the one a 405
answer lists their methods in."""

OP: Mapping[str, Op] = {op.name: op for op in OPS}


# -- values --------------------------------------------------------------------------------------
def b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(data)).decode()


def unb64(value: Any, field_name: str) -> bytes:
    """A base64 field's bytes; InvalidArgument (a 400) if it is not a base64 string."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field_name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{field_name} is not valid base64") from None


def key_to_wire(info: KeyInfo) -> dict[str, Any]:
    d = info.to_dict()
    d.pop("attributes", None)  # backend handles and blobs are the service's business
    return d


def key_from_wire(d: dict[str, Any]) -> KeyInfo:
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


def version_to_wire(v: KeyVersion) -> dict[str, Any]:
    """A version without its backend handle."""
    return {"version": v.version, "backend": v.backend, "created": v.created.isoformat()}


def version_from_wire(d: dict[str, Any]) -> KeyVersion:
    return KeyVersion(int(d["version"]), str(d["backend"]), datetime.fromisoformat(d["created"]))


def backend_status_to_wire(status: BackendStatus) -> dict[str, Any]:
    return status.to_dict()


def backend_status_from_wire(d: dict[str, Any]) -> BackendStatus:
    caps = frozenset(
        (KeyType(t), Operation(op)) for t, ops in d["capabilities"].items() for op in ops
    )
    return BackendStatus(
        d["name"], d["type"], d["available"], d["reason"], caps, d.get("details", {})
    )


# -- errors --------------------------------------------------------------------------------------
STATUS: Mapping[type[StrongroomError], int] = {
    KeyNotFound: 404,
    TenantNotFound: 404,
    KeyExists: 409,
    NotPermitted: 403,
    PolicyViolation: 403,
    DeviceLocked: 423,
    AuthenticationFailed: 401,
    IntegrityError: 400,
    InvalidArgument: 400,
    UnsupportedOperation: 422,
    BackendUnavailable: 503,
    AuditUnavailable: 503,
    StorageError: 503,
}
"""The HTTP status of each error class, the first that matches in this order; any other
StrongroomError is a 500 that says nothing of itself."""

INTERNAL_ERROR: Final = {"error": {"type": "InternalError", "message": "internal error"}}

_REDACTED = {
    AuditUnavailable: "the audit log cannot be written: the operation was refused",
    StorageError: "the service cannot save its state: the operation was refused",
}
_REDACTED_BACKEND = "a backend the operation needs is unavailable; see the service log"


def status_of(e: BaseException) -> int:
    for cls, status in STATUS.items():  # in order: the first class that matches
        if isinstance(e, cls):
            return status
    return 500


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, **extra}}


def error_to_wire(e: StrongroomError, *, detail: bool = True) -> tuple[int, dict[str, Any]]:
    """The status and body of an error answer. A 500 says only `internal error`; without
    `detail` (a caller that is not an admin), a 503 does not say what failed either: its
    message names server paths and devices, which are the operator's business."""
    status = status_of(e)
    if status == 500:
        return 500, INTERNAL_ERROR
    extra: dict[str, Any] = {}
    retries = getattr(e, "retries_left", None)
    if isinstance(retries, int):
        extra["retries_left"] = retries
    if isinstance(e, UnsupportedOperation):
        extra.update(backend=e.backend, operation=e.operation, key_type=e.key_type)
    elif isinstance(e, BackendUnavailable):
        extra["backend"] = e.backend
    message = NOT_FOUND if isinstance(e, KeyNotFound) else str(e)
    if status == 503 and not detail:
        message = next((m for cls, m in _REDACTED.items() if isinstance(e, cls)), _REDACTED_BACKEND)
    return status, error_body(type(e).__name__, message, **extra)


_BY_NAME: Mapping[str, type[StrongroomError]] = {
    "NotPermitted": NotPermitted,
    "TenantNotFound": TenantNotFound,
}


def error_from_wire(
    status: int,
    body: Any,
    name: str | None = None,
    local: Mapping[str, type[StrongroomError]] | None = None,
) -> StrongroomError:
    """The exception for an error answer: the service's own class where we have it (from
    `strongroom.errors`, the tenant store, or `local`: the client's own classes), else a
    StrongroomError with the service's message. `name` is the key the request named."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
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
        e = UnsupportedOperation(
            str(err.get("backend", "service")),
            str(err.get("operation", "?")),
            key_type if isinstance(key_type, str) else None,
        )
    else:
        cls = (local or {}).get(kind) or _BY_NAME.get(kind) or getattr(errors, kind, None)
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


__all__ = [
    "API_VERSION",
    "OP",
    "OPS",
    "STATUS",
    "Field",
    "NotPermitted",
    "Op",
    "Permission",
    "TenantNotFound",
    "error_from_wire",
    "error_to_wire",
]
