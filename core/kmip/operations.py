"""One KMIP request message in, one response message out: the header, the batch, and each
operation over KeyAPI (docs/kmip.md has the tables).

A Session is one client connection: its identity (from its certificate), the tenant's view
of the keystore, and the policy check. Every key operation is a KeyAPI call, so the keystore
audits it with the identity as the actor. The Unique Identifier of an object is its key's
name in the tenant's namespace; what only KMIP knows (state, dates, names) is in `store`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ..algorithms import AES_CBC_PAD, CBC_IV, rsa_encrypt, verify_signature
from ..api import KeyAPI
from ..errors import (
    IntegrityError,
    InvalidArgument,
    KeyDisabled,
    KeyNotFound,
    KmipMessageError,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
)
from ..types import SECRET_MAX, KeyType, Usage
from . import keyblocks, ttlv
from .keyblocks import ASYMMETRIC, SYMMETRIC, KmipFailure, algorithm_of, key_type_of
from .store import KmipObject, ObjectStore
from .tags import (
    BlockCipherMode,
    CertificateType,
    CryptographicAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    LinkType,
    ObjectType,
    Operation,
    PaddingMethod,
    QueryFunction,
    ResultReason,
    ResultStatus,
    RevocationReasonCode,
    State,
    Tag,
    UsageMask,
    ValidityIndicator,
)
from .ttlv import Item, Type, structure

log = logging.getLogger("strongroom.kmip")

VERSIONS = [(1, 4), (1, 3), (1, 2), (1, 1), (1, 0)]
"""The protocol versions served, newest first (DiscoverVersions answers in this order)."""
MAX_BATCH = 64
"""Batch items in one request message: more get one error response for the message."""
UID_PREFIX = "kmip-"
GCM_NONCE, GCM_TAG = 12, 16


MAX_RANDOM = 1 << 16
"""RNGRetrieve's Data Length at most (64 KiB)."""
KEYSTORE_OBJECTS = frozenset(
    {
        ObjectType.SYMMETRIC_KEY,
        ObjectType.PRIVATE_KEY,
        ObjectType.SECRET_DATA,
        ObjectType.OPAQUE_OBJECT,
    }
)
"""Objects that are a key in the keystore (named by the Unique Identifier): Secret Data and
Opaque Objects are `secret` keys. A public key and a certificate are not secret: the object
store keeps their DER."""
_SECRETS = frozenset({ObjectType.SECRET_DATA, ObjectType.OPAQUE_OBJECT})

Auditor = Callable[..., AbstractContextManager[dict[str, Any]]]
"""`Keystore.audited` of the tenant's view: `audited(operation, uid, **detail)` records what
KMIP does without a KeyAPI call (a public key or certificate), with the session's actor."""


def _never(_permission: str) -> bool:
    return False


@dataclass(frozen=True)
class Access:
    """What a session may do: `may(permission, uid)` asks the tenant's policies (by the
    object's Unique Identifier, which is the key's name); `may_any(permission)` whether a
    policy grants it on any name (RNGRetrieve's `random`); `principal` names the actor."""

    tenant: str
    principal: str
    may: Callable[[str, str], bool]
    may_any: Callable[[str], bool] = field(default=_never)


# -- small builders ----------------------------------------------------------------------------
def _enum(tag: int, value: int) -> Item:
    return Item(tag, Type.ENUMERATION, int(value))


def _int(tag: int, value: int) -> Item:
    return Item(tag, Type.INTEGER, value)


def _text(tag: int, value: str) -> Item:
    return Item(tag, Type.TEXT_STRING, value)


def _bytes(tag: int, value: bytes) -> Item:
    return Item(tag, Type.BYTE_STRING, value)


def _date(tag: int, value: datetime) -> Item:
    return Item(tag, Type.DATE_TIME, value)


def _version(major: int, minor: int) -> Item:
    return structure(
        Tag.PROTOCOL_VERSION,
        _int(Tag.PROTOCOL_VERSION_MAJOR, major),
        _int(Tag.PROTOCOL_VERSION_MINOR, minor),
    )


def _attribute(name: str, value: Item, index: int | None = None) -> Item:
    value = Item(Tag.ATTRIBUTE_VALUE, value.type, value.value)
    return structure(
        Tag.ATTRIBUTE,
        _text(Tag.ATTRIBUTE_NAME, name),
        None if index is None else _int(Tag.ATTRIBUTE_INDEX, index),
        value,
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


_DATES = {
    "Initial Date": Tag.INITIAL_DATE,
    "Activation Date": Tag.ACTIVATION_DATE,
    "Deactivation Date": Tag.DEACTIVATION_DATE,
    "Compromise Date": Tag.COMPROMISE_DATE,
    "Compromise Occurrence Date": Tag.COMPROMISE_OCCURRENCE_DATE,
    "Last Change Date": Tag.LAST_CHANGE_DATE,
}
_KEPT = ("Name", "Object Group", "Operation Policy Name", "Application Specific Information")
"""Attributes a client sets that are kept as given (besides `x-`/`y-` custom ones)."""
_FACTS = {
    "Cryptographic Algorithm": ("algorithm", Type.ENUMERATION),
    "Cryptographic Length": ("length", Type.INTEGER),
    "Cryptographic Usage Mask": ("mask", Type.INTEGER),
}
"""Attributes of a new object that the server reads (and keeps in its own form)."""
_SINGLE = frozenset({"Operation Policy Name"})
"""Kept attributes with one instance at most (the others, and `x-`/`y-`, take several)."""


def _client_settable(name: str | None) -> bool:
    """Whether a client may add, modify or delete the attribute (AddAttribute, ...)."""
    return name is not None and (name in _KEPT or name.startswith(("x-", "y-")))


_MASK_USAGE = {
    UsageMask.SIGN: Usage.SIGN,
    UsageMask.VERIFY: Usage.VERIFY,
    UsageMask.ENCRYPT: Usage.ENCRYPT,
    UsageMask.DECRYPT: Usage.DECRYPT,
    UsageMask.WRAP_KEY: Usage.WRAP,
    UsageMask.UNWRAP_KEY: Usage.UNWRAP,
    UsageMask.DERIVE_KEY: Usage.DERIVE,
    UsageMask.MAC_GENERATE: Usage.SIGN,  # an HMAC key's sign is its MAC
    UsageMask.MAC_VERIFY: Usage.VERIFY,
}
_PUBLIC_BITS = UsageMask.VERIFY | UsageMask.ENCRYPT | UsageMask.WRAP_KEY
"""What a public key does: the usage mask bits CreateKeyPair gives the public object."""


def _mask_of(key_type: KeyType, usage: frozenset[Usage], exportable: bool) -> int:
    """The Cryptographic Usage Mask of a keystore key."""
    hmac_key = key_type is KeyType.HMAC_SHA256
    mask = 0
    for bit, u in _MASK_USAGE.items():
        mac_bit = bit in (UsageMask.MAC_GENERATE, UsageMask.MAC_VERIFY)
        if u in usage and mac_bit == hmac_key:
            mask |= bit
    return mask | (UsageMask.EXPORT if exportable else 0)


def _link(link_type: LinkType, uid: str) -> str:
    """A Link attribute's value as the object store keeps it (encoded TTLV, hex)."""
    value = structure(
        Tag.ATTRIBUTE_VALUE,
        _enum(Tag.LINK_TYPE, link_type),
        _text(Tag.LINKED_OBJECT_IDENTIFIER, uid),
    )
    return ttlv.encode(value).hex()


def _reason_of(e: StrongroomError) -> ResultReason:
    if isinstance(e, KeyNotFound):
        return ResultReason.ITEM_NOT_FOUND
    if isinstance(e, KeyDisabled):  # revoked, or disabled outside KMIP
        return ResultReason.ILLEGAL_OPERATION
    if isinstance(e, PolicyViolation):  # NotPermitted, a usage the key lacks, not exportable
        return ResultReason.PERMISSION_DENIED
    if isinstance(e, UnsupportedOperation):
        return ResultReason.FEATURE_NOT_SUPPORTED
    if isinstance(e, KmipMessageError):
        return ResultReason.INVALID_MESSAGE
    return (
        ResultReason.ILLEGAL_OPERATION
        if isinstance(e, ValueError)
        else (ResultReason.GENERAL_FAILURE)
    )


class Session:
    """One client's connection: answers request messages (`handle`)."""

    def __init__(
        self,
        keys: KeyAPI,
        store: ObjectStore,
        access: Access,
        backend: str | None,
        audited: Auditor,
    ) -> None:
        self.keys, self.store, self.access, self.backend = keys, store, access, backend
        self.audited = audited
        self._ops: dict[int, Callable[[Item], list[Item | None]]] = {
            Operation.DISCOVER_VERSIONS: self.discover_versions,
            Operation.QUERY: self.query,
            Operation.CREATE: self.create,
            Operation.CREATE_KEY_PAIR: self.create_key_pair,
            Operation.REGISTER: self.register,
            Operation.GET: self.get,
            Operation.GET_ATTRIBUTES: self.get_attributes,
            Operation.GET_ATTRIBUTE_LIST: self.get_attribute_list,
            Operation.ADD_ATTRIBUTE: self.add_attribute,
            Operation.MODIFY_ATTRIBUTE: self.modify_attribute,
            Operation.DELETE_ATTRIBUTE: self.delete_attribute,
            Operation.REKEY: self.rekey,
            Operation.REKEY_KEY_PAIR: self.rekey_key_pair,
            Operation.LOCATE: self.locate,
            Operation.ACTIVATE: self.activate,
            Operation.REVOKE: self.revoke,
            Operation.DESTROY: self.destroy,
            Operation.ENCRYPT: self.encrypt,
            Operation.DECRYPT: self.decrypt,
            Operation.SIGN: self.sign,
            Operation.SIGNATURE_VERIFY: self.signature_verify,
            Operation.MAC: self.mac,
            Operation.MAC_VERIFY: self.mac_verify,
            Operation.RNG_RETRIEVE: self.rng_retrieve,
        }
        self._placeholder: str | None = None  # the ID Placeholder of the current batch
        self._backend_types: dict[str, str] | None = None  # backend name to type, once

    # -- the message ---------------------------------------------------------------------------
    def handle(self, data: bytes, limits: ttlv.Limits = ttlv.DEFAULT_LIMITS) -> bytes:
        """The response to one request message; a message we cannot read gets one error
        response (in KMIP 1.0's framing when even its version is unreadable)."""
        version = (1, 0)
        try:
            request = ttlv.decode(data, limits)
            if request.tag != Tag.REQUEST_MESSAGE:
                raise KmipMessageError("not a request message")
            header = request.need(Tag.REQUEST_HEADER)
            pv = header.need(Tag.PROTOCOL_VERSION)
            version = (
                pv.int_of(Tag.PROTOCOL_VERSION_MAJOR) or 0,
                pv.int_of(Tag.PROTOCOL_VERSION_MINOR) or 0,
            )
            if version not in VERSIONS:
                raise KmipFailure(
                    ResultReason.INVALID_MESSAGE,
                    f"KMIP {version[0]}.{version[1]} is not served; this server speaks "
                    + ", ".join(f"{a}.{b}" for a, b in VERSIONS),
                )
            items = list(request.all(Tag.BATCH_ITEM))
            if not items or len(items) > MAX_BATCH:
                raise KmipMessageError(f"a request carries 1 to {MAX_BATCH} batch items")
            if header.int_of(Tag.BATCH_COUNT) != len(items):
                raise KmipMessageError("the batch count is not the number of batch items")
        except (KmipMessageError, KmipFailure) as e:
            if version not in VERSIONS:
                version = (1, 0)
            reason = e.reason if isinstance(e, KmipFailure) else ResultReason.INVALID_MESSAGE
            return self._response(version, [self._failed(None, None, reason, str(e))])
        self._placeholder = None
        return self._response(version, [self._one(item) for item in items])

    def _response(self, version: tuple[int, int], items: list[Item]) -> bytes:
        header = structure(
            Tag.RESPONSE_HEADER,
            _version(*version),
            _date(Tag.TIME_STAMP, _now()),
            _int(Tag.BATCH_COUNT, len(items)),
        )
        return ttlv.encode(structure(Tag.RESPONSE_MESSAGE, header, *items))

    def _failed(
        self, op: int | None, batch_id: Item | None, reason: ResultReason, message: str
    ) -> Item:
        return structure(
            Tag.BATCH_ITEM,
            None if op is None else _enum(Tag.OPERATION, op),
            batch_id,
            _enum(Tag.RESULT_STATUS, ResultStatus.OPERATION_FAILED),
            _enum(Tag.RESULT_REASON, reason),
            _text(Tag.RESULT_MESSAGE, message),
        )

    def _one(self, item: Item) -> Item:
        op: int | None = None
        batch_id = item.find(Tag.UNIQUE_BATCH_ITEM_ID)
        try:
            op = item.int_of(Tag.OPERATION)
            if op is None:
                raise KmipMessageError("a batch item names its operation")
            handler = self._ops.get(op)
            if handler is None:
                name = Operation(op).name if op in Operation._value2member_map_ else hex(op)
                raise KmipFailure(
                    ResultReason.OPERATION_NOT_SUPPORTED, f"operation {name} is not supported"
                )
            payload = item.find(Tag.REQUEST_PAYLOAD) or structure(Tag.REQUEST_PAYLOAD)
            out = handler(payload)
        except KmipFailure as e:
            return self._failed(op, batch_id, e.reason, e.message)
        except StrongroomError as e:
            return self._failed(op, batch_id, _reason_of(e), str(e))
        except Exception as e:  # a bug: the client learns nothing of it, the log its kind
            log.exception("KMIP operation failed: %s", type(e).__name__)
            return self._failed(op, batch_id, ResultReason.GENERAL_FAILURE, "internal error")
        return structure(
            Tag.BATCH_ITEM,
            _enum(Tag.OPERATION, op),
            batch_id,
            _enum(Tag.RESULT_STATUS, ResultStatus.SUCCESS),
            structure(Tag.RESPONSE_PAYLOAD, *out),
        )

    # -- helpers -------------------------------------------------------------------------------
    def _check(self, permission: str, uid: str) -> None:
        if not self.access.may(permission, uid):
            raise KmipFailure(
                ResultReason.PERMISSION_DENIED, f"this identity may not {permission} {uid}"
            )

    def _uid(self, payload: Item) -> str:
        uid = payload.text_of(Tag.UNIQUE_IDENTIFIER) or self._placeholder
        if uid is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Unique Identifier given")
        return uid

    def _object(self, uid: str, permission: str = "read") -> KmipObject:
        """The object `uid` of this tenant, once `permission` on it is checked; absent and
        not permitted at all look the same (as in the HTTP service)."""
        if not self.access.may(permission, uid):
            if not self.access.may("read", uid):
                raise KmipFailure(ResultReason.ITEM_NOT_FOUND, "no such object")
            raise KmipFailure(
                ResultReason.PERMISSION_DENIED, f"this identity may not {permission} {uid}"
            )
        obj = self.store.get(self.access.tenant, uid)
        if obj is None:
            raise KmipFailure(ResultReason.ITEM_NOT_FOUND, "no such object")
        self._placeholder = uid
        return self._due(obj)

    def _due(self, obj: KmipObject) -> KmipObject:
        """A Pre-Active object whose Activation Date has come is Active from then on: made
        so (and stored) when it is loaded, as KMIP's state model asks."""
        if obj.state == State.PRE_ACTIVE:
            when = obj.date("Activation Date")
            if when is not None and when <= _now():
                with self.audited("kmip_activate", obj.uid, by="activation_date"):
                    self.store.move_state(
                        self.access.tenant, obj.uid, State.PRE_ACTIVE, State.ACTIVE
                    )
                obj.state = State.ACTIVE
        return obj

    def _attributes_of(self, payload: Item, tag: int = Tag.TEMPLATE_ATTRIBUTE) -> list[Item]:
        """The Attribute items of a Create or Register (Template Attribute, 1.x), or of one
        of CreateKeyPair's templates (`tag`)."""
        template = payload.find(tag)
        found = [] if template is None else list(template.all(Tag.ATTRIBUTE))
        for name in template.all(Tag.NAME) if template is not None else ():
            found.append(_attribute("Name", name))  # a template's Name, not an Attribute
        return found

    def _new_object(
        self, object_type: int, attributes: list[Item]
    ) -> tuple[str, KmipObject, dict[str, object]]:
        uid = UID_PREFIX + secrets.token_hex(16)
        now = int(_now().timestamp())
        obj = KmipObject(uid, object_type, State.PRE_ACTIVE, {"Initial Date": now})
        obj.dates["Last Change Date"] = now
        facts: dict[str, object] = {}
        for attribute in attributes:
            name = attribute.text_of(Tag.ATTRIBUTE_NAME)
            value = attribute.need(Tag.ATTRIBUTE_VALUE)
            if name in _FACTS:
                fact, kind = _FACTS[name]
                if value.type is not kind:
                    raise KmipFailure(
                        ResultReason.INVALID_FIELD, f"{name} is an {kind.name.lower()}"
                    )
                facts[fact] = value.value
            elif name == "Cryptographic Domain Parameters" and value.type is Type.STRUCTURE:
                facts["curve"] = value.int_of(Tag.RECOMMENDED_CURVE)
            elif name in _KEPT or (name or "").startswith(("x-", "y-")):
                assert name is not None
                obj.attributes.setdefault(name, []).append(ttlv.encode(value).hex())
            elif name == "Activation Date" and isinstance(value.value, datetime):
                obj.dates["Activation Date"] = int(value.value.timestamp())
            else:
                raise KmipFailure(
                    ResultReason.INVALID_FIELD, f"the attribute {name!r} cannot be set here"
                )
        return uid, obj, facts

    @staticmethod
    def _usage(mask: object, key_type: KeyType) -> list[Usage] | None:
        """The usage a Cryptographic Usage Mask gives a key of `key_type`: the mask's bits the
        type allows (others, such as Export, are not usages here)."""
        if not isinstance(mask, int) or mask == 0:
            return None  # none given (PyKMIP sends 0): the key type's default usage
        allowed = key_type.allowed_usage
        usage = sorted({u for bit, u in _MASK_USAGE.items() if mask & bit and u in allowed})
        if not usage:
            can = ", ".join(sorted(u.value for u in allowed))
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                f"the usage mask allows nothing a {key_type.value} key does here ({can})",
            )
        return usage

    @staticmethod
    def _symmetric_type(facts: dict[str, object]) -> KeyType:
        algorithm, length = facts.get("algorithm"), facts.get("length")
        if algorithm == CryptographicAlgorithm.AES and length is None:
            length = 256
        key_type = key_type_of(algorithm, length)
        if key_type not in SYMMETRIC:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                f"a {key_type.value} key is not a Symmetric Key (CreateKeyPair, or Register "
                "a Private Key)",
            )
        return key_type

    def _activate_if_dated(self, obj: KmipObject) -> None:
        when = obj.date("Activation Date")
        if when is not None and when <= _now():
            obj.state = State.ACTIVE

    def _keep(self, obj: KmipObject, key_type: KeyType | None = None) -> None:
        """Store a new object (Active at once if its Activation Date has passed)."""
        if key_type is not None:
            obj.extra["algorithm"], obj.extra["length"] = algorithm_of(key_type)
        self._activate_if_dated(obj)
        self.store.put(self.access.tenant, obj)

    @staticmethod
    def _facts(obj: KmipObject) -> tuple[int | None, int | None]:
        """The object's Cryptographic Algorithm and Length (first-slice objects: AES-256)."""
        if obj.object_type in (ObjectType.CERTIFICATE, *_SECRETS):
            return None, None
        return obj.extra.get("algorithm", CryptographicAlgorithm.AES), obj.extra.get("length", 256)

    def _key_type(self, obj: KmipObject) -> KeyType:
        algorithm, length = self._facts(obj)
        return key_type_of(algorithm, length)

    @contextmanager
    def _or_undo(self, uid: str, *others: str) -> Iterator[None]:
        """Around what follows the making of key `uid`: if it fails, the key is deleted again
        (and the objects `uid` and `others` forgotten), so that no keystore key is left
        without its KMIP object."""
        try:
            yield
        except BaseException:
            with suppress(StrongroomError):
                self.keys.delete(uid)
            for gone in (uid, *others):
                with suppress(StrongroomError, sqlite3.Error):
                    self.store.delete(self.access.tenant, gone)
            raise

    def _active(self, obj: KmipObject) -> None:
        if obj.state != State.ACTIVE:
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "the key is not Active")

    # -- DiscoverVersions, Query ---------------------------------------------------------------
    def discover_versions(self, payload: Item) -> list[Item | None]:
        asked = [
            (v.int_of(Tag.PROTOCOL_VERSION_MAJOR), v.int_of(Tag.PROTOCOL_VERSION_MINOR))
            for v in payload.all(Tag.PROTOCOL_VERSION)
        ]
        served = [v for v in VERSIONS if v in asked] if asked else VERSIONS
        return [_version(*v) for v in served]

    def query(self, payload: Item) -> list[Item | None]:
        asked = {f.value for f in payload.all(Tag.QUERY_FUNCTION)}
        out: list[Item | None] = []
        if QueryFunction.OPERATIONS in asked:
            out += [_enum(Tag.OPERATION, op) for op in self._ops]
        if QueryFunction.OBJECTS in asked:
            out += [
                _enum(Tag.OBJECT_TYPE, t)
                for t in (
                    ObjectType.SYMMETRIC_KEY,
                    ObjectType.PRIVATE_KEY,
                    ObjectType.PUBLIC_KEY,
                    ObjectType.CERTIFICATE,
                    ObjectType.SECRET_DATA,
                    ObjectType.OPAQUE_OBJECT,
                )
            ]
        if QueryFunction.SERVER_INFORMATION in asked:
            out.append(_text(Tag.VENDOR_IDENTIFICATION, "Strongroom"))
        return out

    # -- Create, CreateKeyPair, Register -------------------------------------------------------
    def create(self, payload: Item) -> list[Item | None]:
        if payload.int_of(Tag.OBJECT_TYPE) != ObjectType.SYMMETRIC_KEY:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "Create makes symmetric keys (AES-256, HMAC-SHA256); CreateKeyPair makes pairs",
            )
        uid, obj, facts = self._new_object(ObjectType.SYMMETRIC_KEY, self._attributes_of(payload))
        key_type = self._symmetric_type(facts)
        self._check("generate", uid)
        self.keys.generate(
            uid,
            key_type,
            backend=self.backend,
            usage=self._usage(facts.get("mask"), key_type),
            exportable=self.access.may("export", uid),
        )
        with self._or_undo(uid):
            self._keep(obj, key_type)
        self._placeholder = uid
        return [_enum(Tag.OBJECT_TYPE, ObjectType.SYMMETRIC_KEY), _text(Tag.UNIQUE_IDENTIFIER, uid)]

    def create_key_pair(self, payload: Item) -> list[Item | None]:
        """A private key in the keystore and its public key beside it, linked both ways."""
        common = self._attributes_of(payload, Tag.COMMON_TEMPLATE_ATTRIBUTE)
        private_uid, private, pf = self._new_object(
            ObjectType.PRIVATE_KEY,
            common + self._attributes_of(payload, Tag.PRIVATE_KEY_TEMPLATE_ATTRIBUTE),
        )
        public_uid, public, uf = self._new_object(
            ObjectType.PUBLIC_KEY,
            common + self._attributes_of(payload, Tag.PUBLIC_KEY_TEMPLATE_ATTRIBUTE),
        )
        key_type = key_type_of(
            pf.get("algorithm", uf.get("algorithm")),
            pf.get("length", uf.get("length")),
            pf.get("curve", uf.get("curve")),
        )
        if key_type not in ASYMMETRIC:
            raise KmipFailure(
                ResultReason.INVALID_FIELD, "CreateKeyPair makes RSA, EC and Ed25519 key pairs"
            )
        masks = [m for m in (pf.get("mask"), uf.get("mask")) if isinstance(m, int)]
        mask = 0
        for m in masks:
            mask |= m
        self._check("generate", private_uid)
        self._check("generate", public_uid)
        info = self.keys.generate(
            private_uid,
            key_type,
            backend=self.backend,
            usage=self._usage(mask, key_type),
            exportable=self.access.may("export", private_uid),
        )
        with self._or_undo(private_uid, public_uid):
            der = keyblocks.public_in(self.keys.public_key(private_uid), KeyFormatType.X_509)
            public_mask = uf.get("mask") or _mask_of(key_type, info.usage, False) & _PUBLIC_BITS
            public.extra.update(
                {"der": der.hex(), "format": KeyFormatType.X_509, "mask": public_mask}
            )
            private.extra["spki"] = _spki_digest(der)
            private.attributes["Link"] = [_link(LinkType.PUBLIC_KEY_LINK, public_uid)]
            public.attributes["Link"] = [_link(LinkType.PRIVATE_KEY_LINK, private_uid)]
            with self.audited("kmip_register", public_uid, object_type="public_key"):
                self._keep(public, key_type)
            self._keep(private, key_type)
        self._placeholder = private_uid
        return [
            _text(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER, private_uid),
            _text(Tag.PUBLIC_KEY_UNIQUE_IDENTIFIER, public_uid),
        ]

    def register(self, payload: Item) -> list[Item | None]:
        kind = payload.int_of(Tag.OBJECT_TYPE)
        attributes = self._attributes_of(payload)
        if kind == ObjectType.SYMMETRIC_KEY:
            uid = self._register_symmetric(payload.need(Tag.SYMMETRIC_KEY), attributes)
        elif kind == ObjectType.PRIVATE_KEY:
            uid = self._register_private(payload.need(Tag.PRIVATE_KEY), attributes)
        elif kind == ObjectType.PUBLIC_KEY:
            uid = self._register_public(payload.need(Tag.PUBLIC_KEY), attributes)
        elif kind == ObjectType.CERTIFICATE:
            uid = self._register_certificate(payload.need(Tag.CERTIFICATE), attributes)
        elif kind == ObjectType.SECRET_DATA:
            uid = self._register_secret_data(payload.need(Tag.SECRET_DATA), attributes)
        elif kind == ObjectType.OPAQUE_OBJECT:
            uid = self._register_opaque(payload.need(Tag.OPAQUE_OBJECT), attributes)
        else:
            name = ObjectType(kind).name if kind in set(ObjectType) else str(kind)
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED, f"Register of {name} is not supported yet"
            )
        self._placeholder = uid
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    @staticmethod
    def _key_block(obj: Item, formats: tuple[int, ...]) -> tuple[Item, int, Item, Item]:
        """(Key Block, Key Format Type, Key Value, Key Material) of a registered key."""
        block = obj.need(Tag.KEY_BLOCK)
        fmt = block.int_of(Tag.KEY_FORMAT_TYPE)
        if block.find(Tag.KEY_WRAPPING_DATA) is not None:
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "wrapped keys are not taken")
        if fmt not in formats:
            names = ", ".join(KeyFormatType(f).name for f in formats)
            raise KmipFailure(
                ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, f"this object is registered as {names}"
            )
        value = block.need(Tag.KEY_VALUE)
        return block, fmt, value, value.need(Tag.KEY_MATERIAL)

    @staticmethod
    def _material(item: Item) -> bytes:
        if not isinstance(item.value, bytes):
            raise KmipMessageError("Key Material is a byte string")
        return item.value

    def _new_key_object(
        self, object_type: int, block: Item, value: Item, attributes: list[Item]
    ) -> tuple[str, KmipObject, dict[str, object]]:
        """A new object for a registered key: the request's attributes and those in the
        Key Value; the Key Block's algorithm and length where the attributes do not say."""
        uid, obj, facts = self._new_object(object_type, attributes + list(value.all(Tag.ATTRIBUTE)))
        facts.setdefault("algorithm", block.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM))
        facts.setdefault("length", block.int_of(Tag.CRYPTOGRAPHIC_LENGTH))
        return uid, obj, facts

    def _import_key(
        self, uid: str, key_type: KeyType, material: bytes, facts: dict[str, object], how: str
    ) -> None:
        """Import a registered key into the keystore under `uid`, once the client may."""
        self._check("generate", uid)
        self.keys.import_key(
            uid,
            key_type,
            material,
            backend=self.backend,
            usage=self._usage(facts.get("mask"), key_type),
            exportable=self.access.may("export", uid),
            format=how,
        )

    def _register_symmetric(self, key: Item, attributes: list[Item]) -> str:
        block, fmt, value, material_item = self._key_block(
            key, (KeyFormatType.RAW, KeyFormatType.TRANSPARENT_SYMMETRIC_KEY)
        )
        if fmt == KeyFormatType.TRANSPARENT_SYMMETRIC_KEY:
            material = _transparent(material_item)
        else:
            material = self._material(material_item)
        uid, obj, facts = self._new_key_object(ObjectType.SYMMETRIC_KEY, block, value, attributes)
        key_type = self._symmetric_type(facts)
        if len(material) != 32:
            raise KmipFailure(
                ResultReason.INVALID_FIELD, f"a {key_type.value} key is 32 bytes of material"
            )
        self._import_key(uid, key_type, material, facts, "raw")
        with self._or_undo(uid):
            self._keep(obj, key_type)
        return uid

    def _register_private(self, key: Item, attributes: list[Item]) -> str:
        block, fmt, value, material_item = self._key_block(
            key,
            (
                KeyFormatType.RAW,
                KeyFormatType.PKCS_1,
                KeyFormatType.PKCS_8,
                KeyFormatType.EC_PRIVATE_KEY,
            ),
        )
        material = self._material(material_item)
        uid, obj, facts = self._new_key_object(ObjectType.PRIVATE_KEY, block, value, attributes)
        key_type = key_type_of(facts.get("algorithm"), facts.get("length"), facts.get("curve"))
        if key_type not in ASYMMETRIC:
            raise KmipFailure(
                ResultReason.INVALID_FIELD, "private keys here are RSA, EC (P-256, P-384), Ed25519"
            )
        if key_type is KeyType.ED25519 and fmt == KeyFormatType.RAW and len(material) == 32:
            flavour, how = "raw", "raw"  # the 32-byte seed
        else:
            flavour, how = keyblocks.der_flavour(material), "der"
        self._import_key(uid, key_type, material, facts, how)
        with self._or_undo(uid):
            obj.extra.update({"format": fmt, "flavour": flavour})
            obj.extra["spki"] = _spki_digest(
                keyblocks.public_in(self.keys.public_key(uid), KeyFormatType.X_509)
            )
            self._keep(obj, key_type)
        return uid

    def _register_public(self, key: Item, attributes: list[Item]) -> str:
        block, fmt, value, material_item = self._key_block(key, keyblocks.PUBLIC_FORMATS)
        material = self._material(material_item)
        public = keyblocks.load_public(material)
        algorithm, length = keyblocks.public_facts(public)
        declared = block.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM)
        if (
            declared is not None
            and declared != algorithm
            and {declared, algorithm}
            != {
                CryptographicAlgorithm.EC,
                CryptographicAlgorithm.ECDSA,
            }
        ):
            raise KmipFailure(
                ResultReason.INVALID_FIELD, "the key material is not of the Cryptographic Algorithm"
            )
        uid, obj, facts = self._new_object(
            ObjectType.PUBLIC_KEY, attributes + list(value.all(Tag.ATTRIBUTE))
        )
        self._check("generate", uid)
        obj.extra.update(
            {
                "algorithm": algorithm,
                "length": length,
                "der": material.hex(),
                "format": fmt,
                "mask": facts.get("mask") or 0,
            }
        )
        with self.audited("kmip_register", uid, object_type="public_key"):
            self._keep(obj)
        return uid

    def _register_certificate(self, cert: Item, attributes: list[Item]) -> str:
        if cert.int_of(Tag.CERTIFICATE_TYPE) != CertificateType.X_509:
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "certificates here are X.509")
        der = cert.bytes_of(Tag.CERTIFICATE_VALUE)
        if der is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Certificate Value given")
        certificate = keyblocks.load_certificate(der)
        uid, obj, facts = self._new_object(ObjectType.CERTIFICATE, attributes)
        self._check("generate", uid)
        obj.extra.update({"der": der.hex(), "mask": facts.get("mask") or 0})
        public, holder = self._attach(certificate, uid)
        if public is not None:
            obj.attributes["Link"] = [_link(LinkType.PUBLIC_KEY_LINK, public.uid)]
        with self.audited("kmip_register", uid, object_type="certificate"):
            self._keep(obj)
            if holder is not None:  # only once the object is kept
                try:
                    self.keys.set_certificate(holder, der)
                except BaseException:
                    self.store.delete(self.access.tenant, uid)
                    raise
            if public is not None:
                self.store.put(self.access.tenant, public)
        return uid

    def _attach(
        self, certificate: x509.Certificate, uid: str
    ) -> tuple[KmipObject | None, str | None]:
        """The public key object of the private key `certificate` certifies, if this tenant
        holds that key as a KMIP object the identity may manage (given a Certificate Link to
        `uid`), and that private key's name when the certificate is to be kept with it
        (KeyAPI's `set_certificate`, audited as `certificate_set`: `strongroom key cert show`
        and a PKCS#11 token then have it). A key that has a certificate with another leaf
        keeps it: registering a certificate never replaces a key's chain."""
        digest = _spki_digest(keyblocks.public_in(certificate.public_key(), KeyFormatType.X_509))
        for obj in self.store.all(self.access.tenant):
            if (
                obj.object_type != ObjectType.PRIVATE_KEY
                or obj.extra.get("spki") != digest
                or not self.access.may("manage", obj.uid)
            ):
                continue
            kept = self.keys.certificate(obj.uid)
            holder = obj.uid if not kept or kept[0] == certificate else None
            for raw in obj.attributes.get("Link", []):
                link = ttlv.decode(bytes.fromhex(raw))
                if link.int_of(Tag.LINK_TYPE) == LinkType.PUBLIC_KEY_LINK:
                    public = self.store.get(
                        self.access.tenant, link.text_of(Tag.LINKED_OBJECT_IDENTIFIER) or ""
                    )
                    if public is not None:
                        public.attributes.setdefault("Link", []).append(
                            _link(LinkType.CERTIFICATE_LINK, uid)
                        )
                        return public, holder
            return None, holder
        return None, None

    def _keep_secret(
        self, obj: KmipObject, material: bytes, facts: dict[str, object], **extra: object
    ) -> str:
        """Secret Data or an Opaque Object: a `secret` in the keystore (its usage mask is
        kept as given: a secret has no usage there)."""
        if not 1 <= len(material) <= SECRET_MAX:
            raise KmipFailure(
                ResultReason.INVALID_FIELD, f"a secret is 1 to {SECRET_MAX} bytes here"
            )
        self._check("generate", obj.uid)
        self.keys.import_key(
            obj.uid,
            KeyType.SECRET,
            material,
            backend=self.backend,
            exportable=self.access.may("export", obj.uid),
            format="raw",
        )
        with self._or_undo(obj.uid):
            obj.extra.update(extra, mask=facts.get("mask") or 0)
            self._keep(obj)
        return obj.uid

    def _register_secret_data(self, secret: Item, attributes: list[Item]) -> str:
        kind = secret.int_of(Tag.SECRET_DATA_TYPE)
        if kind is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Secret Data Type given")
        _block, fmt, value, material_item = self._key_block(
            secret, (KeyFormatType.OPAQUE, KeyFormatType.RAW)
        )
        material = self._material(material_item)
        _uid, obj, facts = self._new_object(
            ObjectType.SECRET_DATA, attributes + list(value.all(Tag.ATTRIBUTE))
        )
        return self._keep_secret(obj, material, facts, secret_type=kind, format=fmt)

    def _register_opaque(self, opaque: Item, attributes: list[Item]) -> str:
        kind = opaque.int_of(Tag.OPAQUE_DATA_TYPE)
        material = opaque.bytes_of(Tag.OPAQUE_DATA_VALUE)
        if kind is None or material is None:
            raise KmipFailure(
                ResultReason.MISSING_DATA, "an Opaque Object has an Opaque Data Type and Value"
            )
        _uid, obj, facts = self._new_object(ObjectType.OPAQUE_OBJECT, attributes)
        return self._keep_secret(obj, material, facts, opaque_type=kind)

    # -- ReKey, ReKeyKeyPair -------------------------------------------------------------------
    def _successor(self, payload: Item, old: KmipObject, tags: tuple[int, ...]) -> KmipObject:
        """A new object to replace `old`: the attributes of the templates at `tags` (names,
        groups, x-...: not the algorithm, length or usage, which stay the key's)."""
        attributes: list[Item] = []
        for tag in tags:
            attributes += self._attributes_of(payload, tag)
        _uid, new, facts = self._new_object(old.object_type, attributes)
        if facts:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "a replacement keeps the key's algorithm, length and usage mask",
            )
        return new

    def _replace(self, payload: Item, old: KmipObject, new: KmipObject) -> None:
        """KMIP's ReKey bookkeeping: the names move to the new object, the other attributes
        a client set are copied, each object links to the other (Replacement Object,
        Replaced Object), and the new one is active from now plus Offset (from now if the
        old one is Active and no Offset is given)."""
        for name, values in old.attributes.items():
            if name == "Link" or (name == "Name" and "Name" in new.attributes):
                continue
            new.attributes.setdefault(name, list(values))
        old.attributes.pop("Name", None)
        old.attributes.setdefault("Link", []).append(
            _link(LinkType.REPLACEMENT_OBJECT_LINK, new.uid)
        )
        new.attributes.setdefault("Link", []).append(_link(LinkType.REPLACED_OBJECT_LINK, old.uid))
        offset = payload.int_of(Tag.OFFSET)
        now = int(_now().timestamp())
        if offset is not None:
            if offset < 0:
                raise KmipFailure(ResultReason.INVALID_FIELD, "the Offset is not negative")
            new.dates["Activation Date"] = now + offset
        elif old.state == State.ACTIVE:
            new.dates["Activation Date"] = now
        old.dates["Last Change Date"] = now

    def _rekey_one(self, payload: Item, old: KmipObject, tags: tuple[int, ...]) -> KmipObject:
        """A new keystore key of `old`'s type and usage, as its successor."""
        info = self.keys.info(old.uid)
        new = self._successor(payload, old, tags)
        self._check("generate", new.uid)
        self.keys.generate(
            new.uid,
            info.type,
            backend=self.backend,
            usage=sorted(info.usage),
            exportable=info.exportable and self.access.may("export", new.uid),
        )
        with self._or_undo(new.uid):
            self._replace(payload, old, new)
            self._keep(new, info.type)
        with self.audited("kmip_rekey", old.uid, replacement=new.uid):
            self.store.put(self.access.tenant, old)
        return new

    def rekey(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        old = self._object(uid, "manage")
        if old.object_type != ObjectType.SYMMETRIC_KEY:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "ReKey takes a symmetric key (ReKeyKeyPair takes a private key)",
            )
        new = self._rekey_one(payload, old, (Tag.TEMPLATE_ATTRIBUTE,))
        self._placeholder = new.uid
        return [_text(Tag.UNIQUE_IDENTIFIER, new.uid)]

    def rekey_key_pair(self, payload: Item) -> list[Item | None]:
        uid = payload.text_of(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER) or self._placeholder
        if uid is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Private Key Unique Identifier given")
        old = self._object(uid, "manage")
        if old.object_type != ObjectType.PRIVATE_KEY:
            raise KmipFailure(ResultReason.INVALID_FIELD, "ReKeyKeyPair takes a private key")
        old_public = None
        for raw in old.attributes.get("Link", []):
            link = ttlv.decode(bytes.fromhex(raw))
            if link.int_of(Tag.LINK_TYPE) == LinkType.PUBLIC_KEY_LINK:
                found = link.text_of(Tag.LINKED_OBJECT_IDENTIFIER)
                if found is not None and self.access.may("manage", found):
                    old_public = self.store.get(self.access.tenant, found)
        common = Tag.COMMON_TEMPLATE_ATTRIBUTE
        new_public = self._successor(
            payload,
            old_public or KmipObject("", ObjectType.PUBLIC_KEY),
            (common, Tag.PUBLIC_KEY_TEMPLATE_ATTRIBUTE),
        )
        self._check("generate", new_public.uid)
        new = self._rekey_one(payload, old, (common, Tag.PRIVATE_KEY_TEMPLATE_ATTRIBUTE))
        key_type = self._key_type(new)
        der = keyblocks.public_in(self.keys.public_key(new.uid), KeyFormatType.X_509)
        mask = old_public.extra.get("mask", 0) if old_public is not None else 0
        new_public.extra.update({"der": der.hex(), "format": KeyFormatType.X_509, "mask": mask})
        new.extra["spki"] = _spki_digest(der)
        if old_public is not None:
            self._replace(payload, old_public, new_public)
        new_public.attributes.setdefault("Link", []).append(
            _link(LinkType.PRIVATE_KEY_LINK, new.uid)
        )
        new.attributes["Link"] = [
            *new.attributes.get("Link", []),
            _link(LinkType.PUBLIC_KEY_LINK, new_public.uid),
        ]
        with self.audited("kmip_register", new_public.uid, object_type="public_key"):
            self._keep(new_public, key_type)
            if old_public is not None:
                self.store.put(self.access.tenant, old_public)
        self.store.put(self.access.tenant, new)
        self._placeholder = new.uid
        return [
            _text(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER, new.uid),
            _text(Tag.PUBLIC_KEY_UNIQUE_IDENTIFIER, new_public.uid),
        ]

    # -- Get, attributes, Locate ---------------------------------------------------------------
    def get(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        found = self.store.get(self.access.tenant, uid)
        secret = found is None or found.object_type in KEYSTORE_OBJECTS
        obj = self._object(uid, "export" if secret else "read")  # public keys are not secret
        fmt = payload.int_of(Tag.KEY_FORMAT_TYPE)
        if payload.find(Tag.KEY_WRAPPING_SPECIFICATION) is not None:
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "wrapped Get is not supported")
        if obj.state not in (State.PRE_ACTIVE, State.ACTIVE, State.DEACTIVATED, State.COMPROMISED):
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "the object has no material")
        head: list[Item | None] = [
            _enum(Tag.OBJECT_TYPE, obj.object_type),
            _text(Tag.UNIQUE_IDENTIFIER, uid),
        ]
        if obj.object_type == ObjectType.CERTIFICATE:
            with self.audited("kmip_get", uid, object_type="certificate"):
                der = bytes.fromhex(obj.extra["der"])
            return [
                *head,
                structure(
                    Tag.CERTIFICATE,
                    _enum(Tag.CERTIFICATE_TYPE, CertificateType.X_509),
                    _bytes(Tag.CERTIFICATE_VALUE, der),
                ),
            ]
        if obj.object_type == ObjectType.PUBLIC_KEY:
            registered = obj.extra["format"]
            with self.audited("kmip_get", uid, object_type="public_key"):
                der = bytes.fromhex(obj.extra["der"])
                if fmt is None or fmt == registered:
                    fmt, material = registered, der
                else:
                    material = keyblocks.public_in(keyblocks.load_public(der), fmt)
            return [*head, structure(Tag.PUBLIC_KEY, self._block(obj, fmt, material))]
        if obj.object_type == ObjectType.PRIVATE_KEY:
            fmt, material = self._private_material(obj, fmt)
            return [*head, structure(Tag.PRIVATE_KEY, self._block(obj, fmt, material))]
        if obj.object_type == ObjectType.OPAQUE_OBJECT:
            value = self.keys.export_key(uid, format="raw")
            return [
                *head,
                structure(
                    Tag.OPAQUE_OBJECT,
                    _enum(Tag.OPAQUE_DATA_TYPE, obj.extra["opaque_type"]),
                    _bytes(Tag.OPAQUE_DATA_VALUE, value),
                ),
            ]
        if obj.object_type == ObjectType.SECRET_DATA:
            registered = obj.extra.get("format", KeyFormatType.OPAQUE)
            if fmt not in (None, registered, KeyFormatType.OPAQUE, KeyFormatType.RAW):
                raise KmipFailure(
                    ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "Secret Data is Opaque or Raw"
                )
            material = self.keys.export_key(uid, format="raw")
            return [
                *head,
                structure(
                    Tag.SECRET_DATA,
                    _enum(Tag.SECRET_DATA_TYPE, obj.extra["secret_type"]),
                    self._block(obj, registered if fmt is None else fmt, material),
                ),
            ]
        fmt = KeyFormatType.RAW if fmt is None else fmt
        if fmt not in (KeyFormatType.RAW, KeyFormatType.TRANSPARENT_SYMMETRIC_KEY):
            raise KmipFailure(
                ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "keys are given Raw or Transparent"
            )
        material = self.keys.export_key(uid, format="raw")
        if fmt == KeyFormatType.TRANSPARENT_SYMMETRIC_KEY:
            key_material = structure(Tag.KEY_MATERIAL, _bytes(0x42003F, material))  # Key
            return [*head, structure(Tag.SYMMETRIC_KEY, self._block(obj, fmt, key_material))]
        return [*head, structure(Tag.SYMMETRIC_KEY, self._block(obj, fmt, material))]

    def _private_material(self, obj: KmipObject, fmt: int | None) -> tuple[int, bytes]:
        """(Key Format Type, material) of a private key: with no format asked, as it was
        registered (the same DER flavour and Key Format Type), or PKCS#8 for a created key."""
        key_type = self._key_type(obj)
        if fmt is None or (fmt == KeyFormatType.RAW and obj.extra.get("format") == fmt):
            fmt = obj.extra.get("format", KeyFormatType.PKCS_8)
            flavour = obj.extra.get("flavour", "pkcs8")
        elif fmt in keyblocks.PRIVATE_FORMATS:
            flavour = keyblocks.PRIVATE_FORMATS[KeyFormatType(fmt)]
        else:
            raise KmipFailure(
                ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
                "private keys are given as PKCS#8, PKCS#1 (RSA), EC Private Key (EC), or as "
                "registered",
            )
        if flavour == "raw":
            return fmt, self.keys.export_key(obj.uid, format="raw")
        pkcs8 = self.keys.export_key(obj.uid, format="der")
        return fmt, keyblocks.private_in(pkcs8, flavour, key_type)

    def _block(self, obj: KmipObject, fmt: int, material: bytes | Item) -> Item:
        algorithm, length = self._facts(obj)
        if isinstance(material, bytes):
            material = _bytes(Tag.KEY_MATERIAL, material)
        return structure(
            Tag.KEY_BLOCK,
            _enum(Tag.KEY_FORMAT_TYPE, fmt),
            structure(Tag.KEY_VALUE, material),
            None if algorithm is None else _enum(Tag.CRYPTOGRAPHIC_ALGORITHM, algorithm),
            None if length is None else _int(Tag.CRYPTOGRAPHIC_LENGTH, length),
        )

    def _all_attributes(self, obj: KmipObject) -> list[Item]:
        algorithm, length = self._facts(obj)
        if obj.object_type in KEYSTORE_OBJECTS - _SECRETS:
            info = self.keys.info(obj.uid)
            mask = _mask_of(info.type, info.usage, info.exportable)
        else:
            mask = obj.extra.get("mask", 0)
        out = [
            _attribute("Unique Identifier", _text(0, obj.uid)),
            _attribute("Object Type", _enum(0, obj.object_type)),
        ]
        if obj.object_type == ObjectType.CERTIFICATE:
            out.append(_attribute("Certificate Type", _enum(0, CertificateType.X_509)))
        if algorithm is not None:
            out.append(_attribute("Cryptographic Algorithm", _enum(0, algorithm)))
        if length is not None:
            out.append(_attribute("Cryptographic Length", _int(0, length)))
        out += [
            _attribute("Cryptographic Usage Mask", _int(0, mask)),
            _attribute("State", _enum(0, obj.state)),
        ]
        for name in _DATES:
            when = obj.date(name)
            if when is not None:
                out.append(_attribute(name, _date(0, when)))
        for name, values in sorted(obj.attributes.items()):
            for index, raw in enumerate(values):
                value = ttlv.decode(bytes.fromhex(raw))
                out.append(_attribute(name, value, None if name in _SINGLE else index))
        return out

    def get_attributes(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid)
        wanted = {n.value for n in payload.all(Tag.ATTRIBUTE_NAME)}
        found = self._all_attributes(obj)
        if wanted:
            found = [a for a in found if a.text_of(Tag.ATTRIBUTE_NAME) in wanted]
        out: list[Item | None] = [_text(Tag.UNIQUE_IDENTIFIER, uid)]
        return out + found

    def get_attribute_list(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid)
        names = dict.fromkeys(a.text_of(Tag.ATTRIBUTE_NAME) for a in self._all_attributes(obj))
        out: list[Item | None] = [_text(Tag.UNIQUE_IDENTIFIER, uid)]
        return out + [_text(Tag.ATTRIBUTE_NAME, n) for n in names if n]

    # -- AddAttribute, ModifyAttribute, DeleteAttribute (KMIP 1.x) -----------------------------
    def _changed(self, obj: KmipObject, operation: str, name: str) -> None:
        """Store an object whose attributes a client changed: audited, as `manage` is."""
        obj.dates["Last Change Date"] = int(_now().timestamp())
        with self.audited(operation, obj.uid, attribute=name):
            self.store.put(self.access.tenant, obj)

    @staticmethod
    def _settable(attribute: Item) -> tuple[str, Item, int | None]:
        """(name, value, index) of an Attribute a client may change."""
        name = attribute.text_of(Tag.ATTRIBUTE_NAME)
        if not _client_settable(name):
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                f"the attribute {name!r} is not one a client sets (Name, Object Group, "
                "Operation Policy Name, Application Specific Information, x-/y- attributes)",
            )
        assert name is not None
        value = attribute.need(Tag.ATTRIBUTE_VALUE)
        return (
            name,
            Item(Tag.ATTRIBUTE_VALUE, value.type, value.value),
            attribute.int_of(Tag.ATTRIBUTE_INDEX),
        )

    def add_attribute(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "manage")
        name, value, index = self._settable(payload.need(Tag.ATTRIBUTE))
        if index is not None:
            raise KmipFailure(ResultReason.INVALID_FIELD, "AddAttribute takes no Attribute Index")
        values = obj.attributes.setdefault(name, [])
        if name in _SINGLE and values:
            raise KmipFailure(
                ResultReason.ILLEGAL_OPERATION, f"{name!r} has one instance: modify it instead"
            )
        values.append(ttlv.encode(value).hex())
        self._changed(obj, "kmip_add_attribute", name)
        added = None if name in _SINGLE else len(values) - 1
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _attribute(name, value, added)]

    def _instance(self, obj: KmipObject, name: str, index: int | None) -> tuple[list[str], int]:
        values = obj.attributes.get(name, [])
        at = index or 0
        if not values:
            raise KmipFailure(ResultReason.ITEM_NOT_FOUND, f"the object has no {name!r}")
        if not 0 <= at < len(values):
            raise KmipFailure(
                ResultReason.INDEX_OUT_OF_BOUNDS, f"{name!r} has instances 0 to {len(values) - 1}"
            )
        return values, at

    def modify_attribute(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "manage")
        name, value, index = self._settable(payload.need(Tag.ATTRIBUTE))
        values, at = self._instance(obj, name, index)
        values[at] = ttlv.encode(value).hex()
        self._changed(obj, "kmip_modify_attribute", name)
        shown = None if name in _SINGLE else at
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _attribute(name, value, shown)]

    def delete_attribute(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "manage")
        name = payload.text_of(Tag.ATTRIBUTE_NAME)
        if not _client_settable(name):
            raise KmipFailure(
                ResultReason.INVALID_FIELD, f"the attribute {name!r} cannot be deleted"
            )
        assert name is not None
        values, at = self._instance(obj, name, payload.int_of(Tag.ATTRIBUTE_INDEX))
        gone = ttlv.decode(bytes.fromhex(values.pop(at)))
        if not values:
            del obj.attributes[name]
        self._changed(obj, "kmip_delete_attribute", name)
        shown = None if name in _SINGLE else at
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _attribute(name, gone, shown)]

    def locate(self, payload: Item) -> list[Item | None]:
        limit = payload.int_of(Tag.MAXIMUM_ITEMS)
        offset = payload.int_of(Tag.OFFSET_ITEMS, 0) or 0
        wanted: list[tuple[str, Item]] = []
        for attribute in payload.all(Tag.ATTRIBUTE):
            name = attribute.text_of(Tag.ATTRIBUTE_NAME) or ""
            if name not in _LOCATABLE and not name.startswith(("x-", "y-")):
                raise KmipFailure(
                    ResultReason.FEATURE_NOT_SUPPORTED, f"Locate by {name!r} is not supported"
                )
            wanted.append((name, attribute.need(Tag.ATTRIBUTE_VALUE)))
        found: list[str] = []
        for obj in reversed(self.store.all(self.access.tenant)):  # newest first, as KMIP asks
            if not self.access.may("read", obj.uid):
                continue
            obj = self._due(obj)
            if all(_matches(obj, name, value) for name, value in wanted):
                found.append(obj.uid)
        found = found[offset:]
        if limit is not None:
            found = found[: max(limit, 0)]
        return [_text(Tag.UNIQUE_IDENTIFIER, uid) for uid in found]

    # -- lifecycle -----------------------------------------------------------------------------
    def activate(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "manage")
        if obj.state != State.PRE_ACTIVE:
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "only a Pre-Active object activates")
        now = int(_now().timestamp())
        obj.state = State.ACTIVE
        obj.dates.update({"Activation Date": now, "Last Change Date": now})
        if obj.object_type in KEYSTORE_OBJECTS:
            self.keys.enable(uid)  # audited, with the identity as the actor
            self.store.put(self.access.tenant, obj)
        else:
            with self.audited("kmip_activate", uid):
                self.store.put(self.access.tenant, obj)
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    def revoke(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "manage")
        reason = payload.need(Tag.REVOCATION_REASON).int_of(Tag.REVOCATION_REASON_CODE)
        now = int(_now().timestamp())
        if reason in (RevocationReasonCode.KEY_COMPROMISE, RevocationReasonCode.CA_COMPROMISE):
            occurred = payload.find(Tag.COMPROMISE_OCCURRENCE_DATE)
            when = occurred.value if occurred is not None else None
            obj.dates["Compromise Occurrence Date"] = (
                int(when.timestamp()) if isinstance(when, datetime) else now
            )
            obj.dates["Compromise Date"] = now
            obj.state = State.COMPROMISED
        else:
            if obj.state != State.ACTIVE:
                raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "only an Active object revokes")
            obj.state = State.DEACTIVATED
            obj.dates["Deactivation Date"] = now
        obj.dates["Last Change Date"] = now
        if obj.object_type in KEYSTORE_OBJECTS:
            self.keys.disable(uid)  # a revoked key does no work; audited
            self.store.put(self.access.tenant, obj)
        else:
            with self.audited("kmip_revoke", uid, reason=reason):
                self.store.put(self.access.tenant, obj)
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    def destroy(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "delete")
        if obj.state == State.ACTIVE:
            # Permission Denied, as KMIP 1.4's profile test cases (SKLC-M-2, AKLC-M-2) expect.
            raise KmipFailure(ResultReason.PERMISSION_DENIED, "revoke an Active object first")
        if obj.object_type in KEYSTORE_OBJECTS:
            # `[keystore] deletion_wait` holds here as for `key delete`: with a wait the key
            # does no work at once and `key delete --cancel` may bring it back (as a keystore
            # key: the KMIP object is Destroyed now either way); with none it goes at once.
            try:
                if self.keys.info(uid).delete_after is None:
                    self.keys.schedule_deletion(uid)
            except KeyNotFound:
                pass  # deleted outside KMIP: the object goes as well
            self.store.delete(self.access.tenant, uid)
        else:
            with self.audited("kmip_destroy", uid):
                self.store.delete(self.access.tenant, uid)
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    # -- Encrypt, Decrypt (AES-GCM, AES-CBC with PKCS5 padding) -------------------------------
    def _cipher(self, payload: Item, obj: KmipObject) -> tuple[int, bytes, bytes]:
        """(block cipher mode, data, additional data) of an Encrypt or Decrypt."""
        if obj.object_type != ObjectType.SYMMETRIC_KEY or self._facts(obj)[0] != (
            CryptographicAlgorithm.AES
        ):
            raise KmipFailure(
                ResultReason.INVALID_FIELD, "Encrypt and Decrypt take an AES key here"
            )
        params = payload.find(Tag.CRYPTOGRAPHIC_PARAMETERS)
        mode: int = BlockCipherMode.GCM
        if params is not None:
            mode = params.int_of(Tag.BLOCK_CIPHER_MODE, BlockCipherMode.GCM) or 0
            algorithm = params.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM, CryptographicAlgorithm.AES)
            if algorithm != CryptographicAlgorithm.AES:
                raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "the keys here are AES")
            if mode == BlockCipherMode.GCM:
                if params.int_of(Tag.TAG_LENGTH, GCM_TAG) != GCM_TAG:
                    raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "the GCM tag is 16 bytes")
            elif mode == BlockCipherMode.CBC:
                if params.int_of(Tag.PADDING_METHOD, PaddingMethod.PKCS5) != PaddingMethod.PKCS5:
                    raise KmipFailure(
                        ResultReason.FEATURE_NOT_SUPPORTED, "AES-CBC is served with PKCS5 padding"
                    )
            else:
                raise KmipFailure(
                    ResultReason.FEATURE_NOT_SUPPORTED, "the modes served are GCM and CBC"
                )
        if obj.state != State.ACTIVE:
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "the key is not Active")
        data = payload.bytes_of(Tag.DATA)
        if data is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Data given")
        aad = payload.bytes_of(Tag.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA) or b""
        if aad and mode == BlockCipherMode.CBC:
            raise KmipFailure(ResultReason.INVALID_FIELD, "AES-CBC takes no additional data")
        if mode == BlockCipherMode.GCM and self._backend_type(obj.uid) in _NOT_GCM:
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED,
                "this AES key is in a TPM, whose AES is CFB with an HMAC, not GCM",
            )
        return mode, data, aad

    def _backend_type(self, uid: str) -> str | None:
        """The type (vault, pkcs11, tpm, ...) of the backend that holds key `uid`."""
        if self._backend_types is None:
            self._backend_types = {b.name: b.type for b in self.keys.backends()}
        return self._backend_types.get(self.keys.info(uid).backend)

    def _oaep(self, payload: Item, obj: KmipObject) -> tuple[str, bytes]:
        """(KeyAPI algorithm, Data) of an RSA-OAEP Encrypt or Decrypt."""
        if self._facts(obj)[0] != CryptographicAlgorithm.RSA:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "Encrypt and Decrypt take an AES key, or an RSA key (OAEP)",
            )
        params = payload.find(Tag.CRYPTOGRAPHIC_PARAMETERS)
        padding: int = PaddingMethod.OAEP
        hashing: int = HashingAlgorithm.SHA_256
        if params is not None:
            padding = params.int_of(Tag.PADDING_METHOD, padding) or 0
            hashing = params.int_of(Tag.HASHING_ALGORITHM, hashing) or 0
            given = params.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM, CryptographicAlgorithm.RSA)
            if given != CryptographicAlgorithm.RSA:
                raise KmipFailure(ResultReason.INVALID_FIELD, "the key is an RSA key")
        algorithm = _OAEP.get(hashing)
        if padding != PaddingMethod.OAEP or algorithm is None:
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED,
                "RSA encryption here is OAEP with SHA-256 or SHA-1 (MGF1 with the same hash)",
            )
        if payload.find(Tag.IV_COUNTER_NONCE) is not None or payload.find(
            Tag.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA
        ):
            raise KmipFailure(ResultReason.INVALID_FIELD, "RSA-OAEP takes no IV or additional data")
        self._active(obj)
        data = payload.bytes_of(Tag.DATA)
        if data is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Data given")
        return algorithm, data

    def encrypt(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "encrypt")
        if obj.object_type in (ObjectType.PRIVATE_KEY, ObjectType.PUBLIC_KEY):
            algorithm, data = self._oaep(payload, obj)
            if obj.object_type == ObjectType.PRIVATE_KEY:
                out = self.keys.encrypt(uid, data, algorithm=algorithm)  # to its public half
            else:  # a public key object is not in the keystore: encrypt to it here
                public = keyblocks.load_public(bytes.fromhex(obj.extra["der"]))
                with self.audited("encrypt", uid, size=len(data)):
                    out = rsa_encrypt(public, data, algorithm)
            return [_text(Tag.UNIQUE_IDENTIFIER, uid), _bytes(Tag.DATA, out)]
        mode, data, aad = self._cipher(payload, obj)
        if payload.find(Tag.IV_COUNTER_NONCE) is not None:
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED,
                "the server chooses the IV or nonce; send no IV/Counter/Nonce",
            )
        if mode == BlockCipherMode.CBC:
            out = self.keys.encrypt(uid, data, algorithm=AES_CBC_PAD)
            return [
                _text(Tag.UNIQUE_IDENTIFIER, uid),
                _bytes(Tag.DATA, out[CBC_IV:]),
                _bytes(Tag.IV_COUNTER_NONCE, out[:CBC_IV]),
            ]
        out = self.keys.encrypt(uid, data, aad)
        nonce, body, tag = out[:GCM_NONCE], out[GCM_NONCE:-GCM_TAG], out[-GCM_TAG:]
        return [
            _text(Tag.UNIQUE_IDENTIFIER, uid),
            _bytes(Tag.DATA, body),
            _bytes(Tag.IV_COUNTER_NONCE, nonce),
            _bytes(Tag.AUTHENTICATED_ENCRYPTION_TAG, tag),
        ]

    def decrypt(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "decrypt")
        if obj.object_type == ObjectType.PRIVATE_KEY:
            oaep, data = self._oaep(payload, obj)
            try:
                plain = self.keys.decrypt(uid, data, algorithm=oaep)
            except (IntegrityError, InvalidArgument):  # one answer, whatever failed
                raise KmipFailure(ResultReason.CRYPTOGRAPHIC_FAILURE, "decryption failed") from None
            return [_text(Tag.UNIQUE_IDENTIFIER, uid), _bytes(Tag.DATA, plain)]
        mode, data, aad = self._cipher(payload, obj)
        iv = payload.bytes_of(Tag.IV_COUNTER_NONCE)
        if mode == BlockCipherMode.CBC:
            if iv is None or len(iv) != CBC_IV:
                raise KmipFailure(ResultReason.MISSING_DATA, "AES-CBC needs its 16-byte IV")
            blob, algorithm = iv + data, AES_CBC_PAD
        else:
            tag = payload.bytes_of(Tag.AUTHENTICATED_ENCRYPTION_TAG)
            if iv is None or len(iv) != GCM_NONCE or tag is None or len(tag) != GCM_TAG:
                raise KmipFailure(
                    ResultReason.MISSING_DATA, "GCM needs a 12-byte nonce and a 16-byte tag"
                )
            blob, algorithm = iv + data + tag, None
        try:
            plain = self.keys.decrypt(uid, blob, aad, algorithm)
        except IntegrityError:  # one answer for every way it can fail: no padding oracle
            raise KmipFailure(ResultReason.CRYPTOGRAPHIC_FAILURE, "decryption failed") from None
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _bytes(Tag.DATA, plain)]

    # -- Sign, SignatureVerify, MAC, MACVerify, RNGRetrieve ------------------------------------
    def _signed(self, payload: Item, key_type: KeyType) -> tuple[bytes, str | None]:
        """(Data, KeyAPI signature algorithm) of a Sign or SignatureVerify."""
        if payload.find(Tag.DIGESTED_DATA) is not None or payload.find(Tag.INIT_INDICATOR):
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED,
                "signatures here are over whole Data in one request (no Digested Data, no "
                "streaming)",
            )
        data = payload.bytes_of(Tag.DATA)
        if data is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Data given")
        params = payload.find(Tag.CRYPTOGRAPHIC_PARAMETERS)
        if params is None:
            return data, None
        given = params.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM)
        mine = algorithm_of(key_type)[0]
        ec_names = {CryptographicAlgorithm.EC, CryptographicAlgorithm.ECDSA}
        if given is not None and given != mine and not {given, mine} <= ec_names:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "the Cryptographic Algorithm is not the key's "
                f"({CryptographicAlgorithm(mine).name})",
            )
        algorithm = keyblocks.sign_algorithm(
            key_type,
            params.int_of(Tag.PADDING_METHOD),
            params.int_of(Tag.HASHING_ALGORITHM),
            params.int_of(Tag.DIGITAL_SIGNATURE_ALGORITHM),
        )
        return data, algorithm

    def sign(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "sign")
        if obj.object_type != ObjectType.PRIVATE_KEY:
            raise KmipFailure(ResultReason.INVALID_FIELD, "Sign takes a private key")
        self._active(obj)
        data, algorithm = self._signed(payload, self._key_type(obj))
        signature = self.keys.sign(uid, data, algorithm)  # audited
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _bytes(Tag.SIGNATURE_DATA, signature)]

    def signature_verify(self, payload: Item) -> list[Item | None]:
        """With a private key, the keystore's verify; with a public key object, which is not
        in the keystore, a check here over its DER (audited as `verify`)."""
        uid = self._uid(payload)
        obj = self._object(uid, "verify")
        if obj.object_type not in (ObjectType.PRIVATE_KEY, ObjectType.PUBLIC_KEY):
            raise KmipFailure(
                ResultReason.INVALID_FIELD, "SignatureVerify takes a public or private key"
            )
        self._active(obj)
        signature = payload.bytes_of(Tag.SIGNATURE_DATA)
        if signature is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Signature Data given")
        valid = True
        if obj.object_type == ObjectType.PRIVATE_KEY:
            data, algorithm = self._signed(payload, self._key_type(obj))
            try:
                self.keys.verify(uid, data, signature, algorithm)
            except InvalidSignature:
                valid = False
        else:
            public = keyblocks.load_public(bytes.fromhex(obj.extra["der"]))
            key_type = keyblocks.verify_type(public)
            data, algorithm = self._signed(payload, key_type)
            try:
                with self.audited("verify", uid, size=len(data)):
                    verify_signature(key_type, public, data, signature, algorithm)
            except InvalidSignature:
                valid = False
        indicator = ValidityIndicator.VALID if valid else ValidityIndicator.INVALID
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _enum(Tag.VALIDITY_INDICATOR, indicator)]

    def _hmac_key(self, payload: Item, uid: str, permission: str) -> bytes:
        """The Data of a MAC or MACVerify, once the key is an Active HMAC-SHA256 key."""
        obj = self._object(uid, permission)
        if obj.object_type != ObjectType.SYMMETRIC_KEY or self._facts(obj)[0] != (
            CryptographicAlgorithm.HMAC_SHA256
        ):
            raise KmipFailure(ResultReason.INVALID_FIELD, "MAC takes an HMAC-SHA256 key here")
        params = payload.find(Tag.CRYPTOGRAPHIC_PARAMETERS)
        if params is not None and params.int_of(
            Tag.CRYPTOGRAPHIC_ALGORITHM, CryptographicAlgorithm.HMAC_SHA256
        ) != (CryptographicAlgorithm.HMAC_SHA256):
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "the MAC served is HMAC-SHA256")
        self._active(obj)
        data = payload.bytes_of(Tag.DATA)
        if data is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Data given")
        return data

    def mac(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        data = self._hmac_key(payload, uid, "sign")
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _bytes(Tag.MAC_DATA, self.keys.mac(uid, data))]

    def mac_verify(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        data = self._hmac_key(payload, uid, "verify")
        tag = payload.bytes_of(Tag.MAC_DATA)
        if tag is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no MAC Data given")
        try:
            self.keys.verify(uid, data, tag)  # an HMAC key's verify; audited
            valid = True
        except InvalidSignature:
            valid = False
        indicator = ValidityIndicator.VALID if valid else ValidityIndicator.INVALID
        return [_text(Tag.UNIQUE_IDENTIFIER, uid), _enum(Tag.VALIDITY_INDICATOR, indicator)]

    def rng_retrieve(self, payload: Item) -> list[Item | None]:
        if not self.access.may_any("random"):
            raise KmipFailure(ResultReason.PERMISSION_DENIED, "this identity may not get random")
        n = payload.int_of(Tag.DATA_LENGTH)
        if n is None:
            raise KmipFailure(ResultReason.MISSING_DATA, "no Data Length given")
        if not 1 <= n <= MAX_RANDOM:
            raise KmipFailure(
                ResultReason.INVALID_FIELD, f"the Data Length is 1 to {MAX_RANDOM} bytes"
            )
        return [_bytes(Tag.DATA, self.keys.random(n))]  # audited


_NOT_GCM = frozenset({"tpm"})
"""Backend types whose `aes-256` keystore encryption is not AES-GCM (docs/tpm.md)."""

_OAEP: dict[int, str] = {
    HashingAlgorithm.SHA_256: "oaep-sha256",
    HashingAlgorithm.SHA_1: "oaep-sha1",
}

_LOCATABLE = frozenset(
    {
        "Name",
        "Object Type",
        "State",
        "Object Group",
        "Cryptographic Algorithm",
        "Cryptographic Length",
        "Certificate Type",
        "Application Specific Information",
    }
)


def _spki_digest(spki: bytes) -> str:
    """How a private key object remembers its public key, to find it by a certificate."""
    return hashlib.sha256(spki).hexdigest()


def _transparent(material: Item) -> bytes:
    key = material.bytes_of(0x42003F)  # Key
    if key is None:
        raise KmipMessageError("a Transparent Symmetric Key carries its Key")
    return key


def _matches(obj: KmipObject, name: str, value: Item) -> bool:
    if name == "Object Type":
        return obj.object_type == value.value
    if name == "State":
        return int(obj.state) == value.value
    if name == "Certificate Type":
        return obj.object_type == ObjectType.CERTIFICATE and value.value == CertificateType.X_509
    if name in ("Cryptographic Algorithm", "Cryptographic Length"):
        return Session._facts(obj)[name == "Cryptographic Length"] == value.value
    wanted = ttlv.encode(Item(Tag.ATTRIBUTE_VALUE, value.type, value.value)).hex()
    return wanted in obj.attributes.get(name, [])


__all__ = ["VERSIONS", "Access", "KmipFailure", "Session"]
