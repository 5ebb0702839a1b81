"""One KMIP request message in, one response message out: the header, the batch, and each
operation over KeyAPI (docs/kmip.md has the tables).

A Session is one client connection: its identity (from its certificate), the tenant's view
of the keystore, and the policy check. Every key operation is a KeyAPI call, so the keystore
audits it with the identity as the actor. The Unique Identifier of an object is its key's
name in the tenant's namespace; what only KMIP knows (state, dates, names) is in `store`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..algorithms import AES_CBC_PAD, CBC_IV
from ..api import KeyAPI
from ..errors import (
    IntegrityError,
    KeyDisabled,
    KeyNotFound,
    KmipMessageError,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
)
from ..types import KeyType, Usage
from . import ttlv
from .store import KmipObject, ObjectStore
from .tags import (
    BlockCipherMode,
    CryptographicAlgorithm,
    KeyFormatType,
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
)
from .ttlv import Item, Type, structure

log = logging.getLogger("strongroom.kmip")

VERSIONS = [(1, 4), (1, 3), (1, 2), (1, 1), (1, 0)]
"""The protocol versions served, newest first (DiscoverVersions answers in this order)."""
MAX_BATCH = 64
"""Batch items in one request message: more get one error response for the message."""
UID_PREFIX = "kmip-"
GCM_NONCE, GCM_TAG = 12, 16


class KmipFailure(Exception):
    """An operation failed with this KMIP result reason; `message` goes to the client."""

    def __init__(self, reason: ResultReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Access:
    """What a session may do: `may(permission, uid)` asks the tenant's policies (by the
    object's Unique Identifier, which is the key's name); `principal` names the actor."""

    tenant: str
    principal: str
    may: Callable[[str, str], bool]


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
_MASK_USAGE = {
    UsageMask.ENCRYPT: Usage.ENCRYPT,
    UsageMask.DECRYPT: Usage.DECRYPT,
    UsageMask.WRAP_KEY: Usage.WRAP,
    UsageMask.UNWRAP_KEY: Usage.UNWRAP,
    UsageMask.DERIVE_KEY: Usage.DERIVE,
}


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
        self, keys: KeyAPI, store: ObjectStore, access: Access, backend: str | None
    ) -> None:
        self.keys, self.store, self.access, self.backend = keys, store, access, backend
        self._ops: dict[int, Callable[[Item], list[Item | None]]] = {
            Operation.DISCOVER_VERSIONS: self.discover_versions,
            Operation.QUERY: self.query,
            Operation.CREATE: self.create,
            Operation.REGISTER: self.register,
            Operation.GET: self.get,
            Operation.GET_ATTRIBUTES: self.get_attributes,
            Operation.GET_ATTRIBUTE_LIST: self.get_attribute_list,
            Operation.LOCATE: self.locate,
            Operation.ACTIVATE: self.activate,
            Operation.REVOKE: self.revoke,
            Operation.DESTROY: self.destroy,
            Operation.ENCRYPT: self.encrypt,
            Operation.DECRYPT: self.decrypt,
        }
        self._placeholder: str | None = None  # the ID Placeholder of the current batch

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
        return obj

    def _attributes_of(self, payload: Item) -> list[Item]:
        """The Attribute items of a Create or Register (Template Attribute, 1.x)."""
        template = payload.find(Tag.TEMPLATE_ATTRIBUTE)
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
            if name == "Cryptographic Algorithm":
                facts["algorithm"] = value.value
            elif name == "Cryptographic Length":
                facts["length"] = value.value
            elif name == "Cryptographic Usage Mask":
                facts["mask"] = value.value
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

    def _usage(self, facts: dict[str, object]) -> list[Usage] | None:
        mask = facts.get("mask")
        if not isinstance(mask, int) or mask == 0:
            return None  # none given (PyKMIP sends 0): the key type's default usage
        usage = [u for bit, u in _MASK_USAGE.items() if mask & bit]
        if not usage:
            raise KmipFailure(
                ResultReason.INVALID_FIELD,
                "the usage mask allows nothing an AES key does here (encrypt, decrypt, wrap, "
                "unwrap, derive)",
            )
        return usage

    @staticmethod
    def _aes_256(facts: dict[str, object]) -> None:
        if facts.get("algorithm") != CryptographicAlgorithm.AES:
            raise KmipFailure(ResultReason.INVALID_FIELD, "symmetric keys here are AES")
        if facts.get("length") not in (256, None):
            raise KmipFailure(ResultReason.INVALID_FIELD, "AES keys here are 256 bits")

    def _activate_if_dated(self, obj: KmipObject) -> None:
        when = obj.date("Activation Date")
        if when is not None and when <= _now():
            obj.state = State.ACTIVE

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
            out += [_enum(Tag.OBJECT_TYPE, ObjectType.SYMMETRIC_KEY)]
        if QueryFunction.SERVER_INFORMATION in asked:
            out.append(_text(Tag.VENDOR_IDENTIFICATION, "Strongroom"))
        return out

    # -- Create, Register ----------------------------------------------------------------------
    def create(self, payload: Item) -> list[Item | None]:
        if payload.int_of(Tag.OBJECT_TYPE) != ObjectType.SYMMETRIC_KEY:
            raise KmipFailure(ResultReason.INVALID_FIELD, "Create makes symmetric keys (AES-256)")
        uid, obj, facts = self._new_object(ObjectType.SYMMETRIC_KEY, self._attributes_of(payload))
        self._aes_256(facts)
        self._check("generate", uid)
        self.keys.generate(
            uid,
            KeyType.AES_256,
            backend=self.backend,
            usage=self._usage(facts),
            exportable=self.access.may("export", uid),
        )
        self._activate_if_dated(obj)
        self.store.put(self.access.tenant, obj)
        self._placeholder = uid
        return [_enum(Tag.OBJECT_TYPE, ObjectType.SYMMETRIC_KEY), _text(Tag.UNIQUE_IDENTIFIER, uid)]

    def register(self, payload: Item) -> list[Item | None]:
        kind = payload.int_of(Tag.OBJECT_TYPE)
        if kind != ObjectType.SYMMETRIC_KEY:
            name = ObjectType(kind).name if kind in set(ObjectType) else str(kind)
            raise KmipFailure(
                ResultReason.FEATURE_NOT_SUPPORTED, f"Register of {name} is not supported yet"
            )
        block = payload.need(Tag.SYMMETRIC_KEY).need(Tag.KEY_BLOCK)
        fmt = block.int_of(Tag.KEY_FORMAT_TYPE)
        if block.find(Tag.KEY_WRAPPING_DATA) is not None:
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "wrapped keys are not taken")
        value = block.need(Tag.KEY_VALUE)
        material_item = value.need(Tag.KEY_MATERIAL)
        if fmt == KeyFormatType.TRANSPARENT_SYMMETRIC_KEY:
            material = _transparent(material_item)
        elif fmt == KeyFormatType.RAW:
            if not isinstance(material_item.value, bytes):
                raise KmipMessageError("Key Material is a byte string")
            material = material_item.value
        else:
            raise KmipFailure(
                ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "keys are registered Raw or Transparent"
            )
        attributes = self._attributes_of(payload) + list(value.all(Tag.ATTRIBUTE))
        uid, obj, facts = self._new_object(ObjectType.SYMMETRIC_KEY, attributes)
        facts.setdefault("algorithm", block.int_of(Tag.CRYPTOGRAPHIC_ALGORITHM))
        facts.setdefault("length", block.int_of(Tag.CRYPTOGRAPHIC_LENGTH))
        self._aes_256(facts)
        if len(material) != 32:
            raise KmipFailure(ResultReason.INVALID_FIELD, "AES keys here are 256 bits")
        self._check("generate", uid)
        self.keys.import_key(
            uid,
            KeyType.AES_256,
            material,
            backend=self.backend,
            usage=self._usage(facts),
            exportable=self.access.may("export", uid),
            format="raw",
        )
        self._activate_if_dated(obj)
        self.store.put(self.access.tenant, obj)
        self._placeholder = uid
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    # -- Get, attributes, Locate ---------------------------------------------------------------
    def get(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "export")
        fmt = payload.int_of(Tag.KEY_FORMAT_TYPE, KeyFormatType.RAW)
        if fmt not in (KeyFormatType.RAW, KeyFormatType.TRANSPARENT_SYMMETRIC_KEY):
            raise KmipFailure(
                ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED, "keys are given Raw or Transparent"
            )
        if payload.find(Tag.KEY_WRAPPING_SPECIFICATION) is not None:
            raise KmipFailure(ResultReason.FEATURE_NOT_SUPPORTED, "wrapped Get is not supported")
        if obj.state not in (State.PRE_ACTIVE, State.ACTIVE, State.DEACTIVATED, State.COMPROMISED):
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "the object has no material")
        material = self.keys.export_key(uid, format="raw")
        if fmt == KeyFormatType.RAW:
            key_material = _bytes(Tag.KEY_MATERIAL, material)
        else:
            key_material = structure(Tag.KEY_MATERIAL, _bytes(0x42003F, material))  # Key
        block = structure(
            Tag.KEY_BLOCK,
            _enum(Tag.KEY_FORMAT_TYPE, fmt),
            structure(Tag.KEY_VALUE, key_material),
            _enum(Tag.CRYPTOGRAPHIC_ALGORITHM, CryptographicAlgorithm.AES),
            _int(Tag.CRYPTOGRAPHIC_LENGTH, 8 * len(material)),
        )
        return [
            _enum(Tag.OBJECT_TYPE, obj.object_type),
            _text(Tag.UNIQUE_IDENTIFIER, uid),
            structure(Tag.SYMMETRIC_KEY, block),
        ]

    def _all_attributes(self, obj: KmipObject) -> list[Item]:
        info = self.keys.info(obj.uid)
        mask = sum(int(bit) for bit, u in _MASK_USAGE.items() if u in info.usage)
        if info.exportable:
            mask |= UsageMask.EXPORT
        out = [
            _attribute("Unique Identifier", _text(0, obj.uid)),
            _attribute("Object Type", _enum(0, obj.object_type)),
            _attribute("Cryptographic Algorithm", _enum(0, CryptographicAlgorithm.AES)),
            _attribute("Cryptographic Length", _int(0, 256)),
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
                out.append(_attribute(name, value, index if index or len(values) > 1 else None))
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

    def locate(self, payload: Item) -> list[Item | None]:
        limit = payload.int_of(Tag.MAXIMUM_ITEMS)
        offset = payload.int_of(Tag.OFFSET_ITEMS, 0) or 0
        wanted: list[tuple[str, Item]] = []
        for attribute in payload.all(Tag.ATTRIBUTE):
            name = attribute.text_of(Tag.ATTRIBUTE_NAME) or ""
            if name not in ("Name", "Object Type", "State", "Object Group"):
                raise KmipFailure(
                    ResultReason.FEATURE_NOT_SUPPORTED, f"Locate by {name!r} is not supported"
                )
            wanted.append((name, attribute.need(Tag.ATTRIBUTE_VALUE)))
        found: list[str] = []
        for obj in reversed(self.store.all(self.access.tenant)):  # newest first, as KMIP asks
            if not self.access.may("read", obj.uid):
                continue
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
        self.keys.enable(uid)  # audited, with the identity as the actor
        obj.state = State.ACTIVE
        now = int(_now().timestamp())
        obj.dates.update({"Activation Date": now, "Last Change Date": now})
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
        self.keys.disable(uid)  # a revoked key does no work; audited
        obj.dates["Last Change Date"] = now
        self.store.put(self.access.tenant, obj)
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    def destroy(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "delete")
        if obj.state == State.ACTIVE:
            raise KmipFailure(ResultReason.ILLEGAL_OPERATION, "revoke an Active object first")
        try:
            self.keys.delete(uid)
        except KeyNotFound:
            pass  # deleted outside KMIP: the object goes as well
        self.store.delete(self.access.tenant, uid)
        return [_text(Tag.UNIQUE_IDENTIFIER, uid)]

    # -- Encrypt, Decrypt (AES-GCM, AES-CBC with PKCS5 padding) -------------------------------
    def _cipher(self, payload: Item, obj: KmipObject) -> tuple[int, bytes, bytes]:
        """(block cipher mode, data, additional data) of an Encrypt or Decrypt."""
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
        return mode, data, aad

    def encrypt(self, payload: Item) -> list[Item | None]:
        uid = self._uid(payload)
        obj = self._object(uid, "encrypt")
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
    wanted = ttlv.encode(Item(Tag.ATTRIBUTE_VALUE, value.type, value.value)).hex()
    return wanted in obj.attributes.get(name, [])


__all__ = ["VERSIONS", "Access", "KmipFailure", "Session"]
