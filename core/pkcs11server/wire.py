"""p11-kit's RPC protocol on the wire: the transport's frames, the version byte, the call
table and the typed values of each call's signature.

Written from the protocol (p11-kit's rpc-message.h call table and the encodings described
in draft-ueno-pkcs11-rpc). In short:

- the client opens with one byte, the highest protocol version it speaks; the server
  answers min(that, `MAX_VERSION`) and the client reconnects if it wanted more;
- then each message is a frame: a 12-byte header (call code, options length, body length,
  each a big-endian uint32), the options (the module name; echoed back), the body;
- a body is a uint32 call id, the call's signature as a byte array, and the arguments in
  the signature's order. A reply carries the same call id and the call's reply signature,
  or call id 0 (ERROR) with signature "u" and a CK_RV.

Every decoding error is a `Pkcs11MessageError`: the server answers CKR_DEVICE_ERROR and
serves on. A frame is read whole before it is decoded, so a bad message never
desynchronises the stream; a frame over `MAX_BODY` closes the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import Pkcs11MessageError
from . import ck

MAX_VERSION = 2
"""The highest protocol version served. Version 1 adds the PKCS #11 3.0 calls and
C_InitToken2 (which this server answers CKR_FUNCTION_NOT_SUPPORTED). Version 2 (p11-kit
0.25.6 and later) adds C_DeriveKey2 (not served either) and encodes a mechanism
differently: nothing after the type of a mechanism p11-kit counts as parameterless, and a
presence byte before the parameters of the others (docs/pkcs11-server.md)."""
MAX_BODY = 4 << 20
"""The largest message body read (4 MiB: a single-part signature over a large document
fits; more goes through the multi-part calls); a larger frame closes the connection."""
MAX_OPTIONS = 4096
"""The largest options area (p11-kit sends the module name there)."""
MAX_DEPTH = 8
"""How deep attribute arrays may nest (CKA_WRAP_TEMPLATE inside one, ...), as p11-kit."""
MAX_ITEMS = 4096
"""The most attributes, or ulongs, one array may hold."""
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
"""What C_Initialize carries as its first argument, to tell a p11-kit client."""
HEADER = struct.Struct(">III")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
NULL_LENGTH = 0xFFFFFFFF
"""A byte array's length that means a NULL pointer."""

# The call table: (name, request signature, reply signature), by call id. Types: u CK_ULONG
# (uint64), y byte, v CK_VERSION (two bytes), s space-padded string, z NUL-terminated string,
# ay byte array, au ulong array, aA attribute array, fy / fu / fA a buffer the client offers
# (its size, or its attribute types and sizes), M a mechanism.
CALLS: tuple[tuple[str, str, str], ...] = (
    ("ERROR", "", "u"),
    ("C_Initialize", "ayyay", ""),
    ("C_Finalize", "", ""),
    ("C_GetInfo", "", "vsusv"),
    ("C_GetSlotList", "yfu", "au"),
    ("C_GetSlotInfo", "u", "ssuvv"),
    ("C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"),
    ("C_GetMechanismList", "ufu", "au"),
    ("C_GetMechanismInfo", "uu", "uuu"),
    ("C_InitToken", "uayz", ""),
    ("C_OpenSession", "uu", "u"),
    ("C_CloseSession", "u", ""),
    ("C_CloseAllSessions", "u", ""),
    ("C_GetSessionInfo", "u", "uuuu"),
    ("C_InitPIN", "uay", ""),
    ("C_SetPIN", "uayay", ""),
    ("C_GetOperationState", "ufy", "ay"),
    ("C_SetOperationState", "uayuu", ""),
    ("C_Login", "uuay", ""),
    ("C_Logout", "u", ""),
    ("C_CreateObject", "uaA", "u"),
    ("C_CopyObject", "uuaA", "u"),
    ("C_DestroyObject", "uu", ""),
    ("C_GetObjectSize", "uu", "u"),
    ("C_GetAttributeValue", "uufA", "aAu"),
    ("C_SetAttributeValue", "uuaA", ""),
    ("C_FindObjectsInit", "uaA", ""),
    ("C_FindObjects", "ufu", "au"),
    ("C_FindObjectsFinal", "u", ""),
    ("C_EncryptInit", "uMu", ""),
    ("C_Encrypt", "uayfy", "ay"),
    ("C_EncryptUpdate", "uayfy", "ay"),
    ("C_EncryptFinal", "ufy", "ay"),
    ("C_DecryptInit", "uMu", ""),
    ("C_Decrypt", "uayfy", "ay"),
    ("C_DecryptUpdate", "uayfy", "ay"),
    ("C_DecryptFinal", "ufy", "ay"),
    ("C_DigestInit", "uM", ""),
    ("C_Digest", "uayfy", "ay"),
    ("C_DigestUpdate", "uay", ""),
    ("C_DigestKey", "uu", ""),
    ("C_DigestFinal", "ufy", "ay"),
    ("C_SignInit", "uMu", ""),
    ("C_Sign", "uayfy", "ay"),
    ("C_SignUpdate", "uay", ""),
    ("C_SignFinal", "ufy", "ay"),
    ("C_SignRecoverInit", "uMu", ""),
    ("C_SignRecover", "uayfy", "ay"),
    ("C_VerifyInit", "uMu", ""),
    ("C_Verify", "uayay", ""),
    ("C_VerifyUpdate", "uay", ""),
    ("C_VerifyFinal", "uay", ""),
    ("C_VerifyRecoverInit", "uMu", ""),
    ("C_VerifyRecover", "uayfy", "ay"),
    ("C_DigestEncryptUpdate", "uayfy", "ay"),
    ("C_DecryptDigestUpdate", "uayfy", "ay"),
    ("C_SignEncryptUpdate", "uayfy", "ay"),
    ("C_DecryptVerifyUpdate", "uayfy", "ay"),
    ("C_GenerateKey", "uMaA", "u"),
    ("C_GenerateKeyPair", "uMaAaA", "uu"),
    ("C_WrapKey", "uMuufy", "ay"),
    ("C_UnwrapKey", "uMuayaA", "u"),
    ("C_DeriveKey", "uMuaA", "u"),
    ("C_SeedRandom", "uay", ""),
    ("C_GenerateRandom", "ufy", "ay"),
    ("C_WaitForSlotEvent", "u", "u"),
    # Version 1: PKCS #11 3.0
    ("C_LoginUser", "uuayay", ""),
    ("C_SessionCancel", "uu", ""),
    ("C_MessageEncryptInit", "uMu", ""),
    ("C_EncryptMessage", "uayayayfy", "ay"),
    ("C_EncryptMessageBegin", "uayay", ""),
    ("C_EncryptMessageNext", "uayayfyu", "ay"),
    ("C_MessageEncryptFinal", "u", ""),
    ("C_MessageDecryptInit", "uMu", ""),
    ("C_DecryptMessage", "uayayayfy", "ay"),
    ("C_DecryptMessageBegin", "uayay", ""),
    ("C_DecryptMessageNext", "uayayfyu", "ay"),
    ("C_MessageDecryptFinal", "u", ""),
    ("C_MessageSignInit", "uMu", ""),
    ("C_SignMessage", "uayayfy", "ay"),
    ("C_SignMessageBegin", "uay", ""),
    ("C_SignMessageNext", "uayayyfy", "ay"),
    ("C_MessageSignFinal", "u", ""),
    ("C_MessageVerifyInit", "uMu", ""),
    ("C_VerifyMessage", "uayayay", ""),
    ("C_VerifyMessageBegin", "uay", ""),
    ("C_VerifyMessageNext", "uayayay", ""),
    ("C_MessageVerifyFinal", "u", ""),
    ("C_InitToken2", "uays", ""),
    # Version 2
    ("C_DeriveKey2", "uMuaA", "uPu"),
)
CALL_IDS = {name: i for i, (name, _, _) in enumerate(CALLS)}
V0_CALLS = CALL_IDS["C_WaitForSlotEvent"] + 1
"""Call ids below this are version 0's; the rest came with version 1, but for:"""
V2_CALLS = CALL_IDS["C_DeriveKey2"]
"""Call ids from this one on came with version 2."""

# Attribute value encodings, by attribute type (what is not listed is a byte array).
_BOOL_ATTRS = frozenset(
    {
        ck.CKA_TOKEN, ck.CKA_PRIVATE, ck.CKA_TRUSTED, ck.CKA_SENSITIVE, ck.CKA_ENCRYPT,
        ck.CKA_DECRYPT, ck.CKA_WRAP, ck.CKA_UNWRAP, ck.CKA_SIGN, ck.CKA_SIGN_RECOVER,
        ck.CKA_VERIFY, ck.CKA_VERIFY_RECOVER, ck.CKA_DERIVE, ck.CKA_EXTRACTABLE, ck.CKA_LOCAL,
        ck.CKA_NEVER_EXTRACTABLE, ck.CKA_ALWAYS_SENSITIVE, ck.CKA_MODIFIABLE, ck.CKA_COPYABLE,
        ck.CKA_DESTROYABLE, ck.CKA_ALWAYS_AUTHENTICATE, ck.CKA_WRAP_WITH_TRUSTED,
        0x204,  # CKA_SECONDARY_AUTH
        0x301, 0x302, 0x405,  # CKA_RESET_ON_INIT, CKA_HAS_RESET, CKA_COLOR
    }
)  # fmt: skip
_ULONG_ATTRS = frozenset(
    {
        ck.CKA_CLASS, ck.CKA_CERTIFICATE_TYPE, ck.CKA_CERTIFICATE_CATEGORY,
        ck.CKA_JAVA_MIDP_SECURITY_DOMAIN, ck.CKA_KEY_TYPE, ck.CKA_MODULUS_BITS,
        0x134, 0x135, 0x160,  # CKA_PRIME_BITS, CKA_SUB_PRIME_BITS, CKA_VALUE_BITS
        ck.CKA_VALUE_LEN, ck.CKA_KEY_GEN_MECHANISM,
        0x201, 0x300,  # CKA_AUTH_PIN_FLAGS, CKA_HW_FEATURE_TYPE
        0x400, 0x401, 0x402, 0x403, 0x404, 0x406,  # the CKA_PIXEL_X ... CKA_BITS_PER_PIXEL
        0x500,  # CKA_MECHANISM_TYPE
    }
)  # fmt: skip
_ARRAY_ATTRS = frozenset({ck.CKA_WRAP_TEMPLATE, ck.CKA_UNWRAP_TEMPLATE, ck.CKA_DERIVE_TEMPLATE})
_DATE_ATTRS = frozenset({ck.CKA_START_DATE, ck.CKA_END_DATE})
ULONG_SIZE = 8
"""sizeof(CK_ULONG) on the LP64 platforms p11-kit's clients run on: a ulong attribute's
length field."""
ATTRIBUTE_SIZE = 24
"""sizeof(CK_ATTRIBUTE) there: an attribute array's length field is count * this."""

# Mechanisms whose parameters have an encoding of their own (the rest: a byte array).
_PSS = frozenset({ck.CKM_RSA_PKCS_PSS, ck.CKM_SHA256_RSA_PKCS_PSS, 0x0E, 0x44, 0x45, 0x46, 0x47})
_OAEP = frozenset({ck.CKM_RSA_PKCS_OAEP})
_GCM = frozenset({ck.CKM_AES_GCM})
V2_NO_PARAMETERS = frozenset(
    {
        ck.CKM_RSA_PKCS_KEY_PAIR_GEN, ck.CKM_RSA_PKCS, ck.CKM_SHA256_RSA_PKCS,
        ck.CKM_SHA384_RSA_PKCS, ck.CKM_SHA512_RSA_PKCS, ck.CKM_EC_KEY_PAIR_GEN, ck.CKM_ECDSA,
        ck.CKM_ECDSA_SHA1, ck.CKM_ECDSA_SHA224, ck.CKM_ECDSA_SHA256, ck.CKM_ECDSA_SHA384,
        ck.CKM_ECDSA_SHA512, ck.CKM_SHA256_HMAC, ck.CKM_AES_KEY_GEN,
        ck.CKM_GENERIC_SECRET_KEY_GEN,
    }
)  # fmt: skip
"""Of the mechanisms this server serves, those p11-kit sends with no parameters, which in
version 2 means that nothing follows their type. (p11-kit's own list is longer; a
mechanism on neither this list nor the parameterised ones here cannot be decoded in
version 2 without it, and is answered CKR_MECHANISM_INVALID.)"""
"""CK_GCM_PARAMS as p11-kit 0.25 and later encode it (pIv, ulIvBits, pAAD, ulTagBits);
0.24's client refuses the mechanism before it reaches a server."""


# -- values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ByteArray:
    """An `ay` argument: the bytes, or (data None) only a length, as C passes NULL."""

    data: bytes | None = field(repr=False)
    length: int


@dataclass(frozen=True)
class Attribute:
    """One attribute of an `aA` array. `value` is bool, int, bytes, a date's 8 bytes, a
    tuple of nested attributes or of mechanism types; None for a NULL value; `valid`
    False for the length -1 (an attribute the client marks unavailable)."""

    type: int
    value: Any = field(repr=False)
    length: int = 0
    valid: bool = True


@dataclass(frozen=True)
class AttributeQuery:
    """One entry of an `fA` template: the type asked for and the client's buffer size (0:
    the client asks for the length only)."""

    type: int
    length: int
    nested: tuple[AttributeQuery, ...] = ()


@dataclass(frozen=True)
class Mechanism:
    """A CK_MECHANISM. `params` is a dict for the structured parameters (PSS, OAEP, GCM), the
    raw bytes for the rest, None for none; `type` None for the NULL mechanism (which
    cancels an operation)."""

    type: int | None
    params: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Call:
    """A decoded request: the call's id and name, and its arguments in signature order."""

    call_id: int
    name: str
    args: tuple[Any, ...] = field(repr=False)


class Reader:
    """Reads the protocol's values from a body; running past its end is an error."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, data: bytes) -> None:
        self._buf = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise Pkcs11MessageError("the message is truncated")
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def byte(self) -> int:
        pos = self._pos
        if pos >= len(self._buf):
            raise Pkcs11MessageError("the message is truncated")
        self._pos = pos + 1
        return self._buf[pos]

    def uint32(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._buf):
            raise Pkcs11MessageError("the message is truncated")
        self._pos = pos + 4
        value: int = _U32.unpack_from(self._buf, pos)[0]
        return value

    def uint64(self) -> int:
        pos = self._pos
        if pos + 8 > len(self._buf):
            raise Pkcs11MessageError("the message is truncated")
        self._pos = pos + 8
        value: int = _U64.unpack_from(self._buf, pos)[0]
        return value

    def byte_array(self) -> bytes | None:
        n = self.uint32()
        if n == NULL_LENGTH:
            return None
        if n > len(self._buf) - self._pos:
            raise Pkcs11MessageError("a byte array runs past the end of the message")
        return self.take(n)

    def count(self) -> int:
        n = self.uint32()
        if n > MAX_ITEMS:
            raise Pkcs11MessageError(f"an array of {n} items (the most is {MAX_ITEMS})")
        return n

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise Pkcs11MessageError("the message has trailing bytes")


def _attribute(r: Reader, depth: int) -> Attribute:
    kind = r.uint32()
    if not r.byte():  # validity: 0 is a length of -1, and nothing follows
        return Attribute(kind, None, 0, valid=False)
    length = r.uint32()
    value: Any
    if kind in _BOOL_ATTRS:
        value = r.byte() != 0
    elif kind in _ULONG_ATTRS:
        value = r.uint64()
    elif kind in _ARRAY_ATTRS:
        if depth + 1 >= MAX_DEPTH:
            raise Pkcs11MessageError(f"attribute arrays nest deeper than {MAX_DEPTH}")
        value = tuple(_attribute(r, depth + 1) for _ in range(r.count()))
    elif kind == ck.CKA_ALLOWED_MECHANISMS:
        value = tuple(r.uint64() for _ in range(r.count()))
    else:  # byte arrays, and the dates' 8 bytes
        value = r.byte_array()
        if kind in _DATE_ATTRS and value is not None and len(value) not in (0, 8):
            raise Pkcs11MessageError("a date attribute is not 8 bytes")
    return Attribute(kind, value, length)


def _attribute_queries(r: Reader, depth: int) -> tuple[AttributeQuery, ...]:
    if depth >= MAX_DEPTH:
        raise Pkcs11MessageError(f"attribute templates nest deeper than {MAX_DEPTH}")
    out = []
    for _ in range(r.count()):
        kind, length = r.uint32(), r.uint32()
        nested: tuple[AttributeQuery, ...] = ()
        if kind in _ARRAY_ATTRS and length:  # the client's template inside the array
            nested = _attribute_queries(r, depth + 1)
        out.append(AttributeQuery(kind, length, nested))
    return tuple(out)


class UnknownMechanism(Pkcs11MessageError):
    """A version 2 mechanism whose encoding this server does not know: its parameters
    cannot be skipped, so the rest of the message cannot be read (CKR_MECHANISM_INVALID)."""

    call: str = ""
    """The name of the call that carried it (decode sets it)."""


def _mechanism(r: Reader, version: int) -> Mechanism:
    kind = r.uint32()
    if kind == NULL_LENGTH:
        return Mechanism(None)
    if version >= 2:
        if kind in V2_NO_PARAMETERS:
            return Mechanism(kind)
        if kind not in _PSS | _OAEP | _GCM:
            raise UnknownMechanism(f"mechanism 0x{kind:x} in version 2")
        if not r.byte():  # no parameters
            return Mechanism(kind)
    if kind in _PSS:
        return Mechanism(kind, {"hash": r.uint64(), "mgf": r.uint64(), "salt": r.uint64()})
    if kind in _OAEP:
        params: dict[str, Any] = {"hash": r.uint64(), "mgf": r.uint64(), "source": r.uint64()}
        params["label"] = r.byte_array() or b""
        return Mechanism(kind, params)
    if kind in _GCM:
        iv, iv_bits = r.byte_array() or b"", r.uint64()
        aad, tag_bits = r.byte_array() or b"", r.uint64()
        return Mechanism(kind, {"iv": iv, "iv_bits": iv_bits, "aad": aad, "tag_bits": tag_bits})
    return Mechanism(kind, r.byte_array())


def _value(r: Reader, code: str, version: int) -> Any:
    if code == "u":
        return r.uint64()
    if code == "y":
        return r.byte()
    if code in ("z", "s"):
        raw = r.byte_array()
        return b"" if raw is None else raw
    if code == "ay":
        if r.byte():
            data = r.byte_array()
            return ByteArray(data, 0 if data is None else len(data))
        return ByteArray(None, r.uint32())
    if code in ("fy", "fu"):
        return r.uint32()
    if code == "aA":
        return tuple(_attribute(r, 0) for _ in range(r.count()))
    if code == "fA":
        return _attribute_queries(r, 0)
    if code == "M":
        return _mechanism(r, version)
    raise Pkcs11MessageError(f"no request carries a {code!r} value")  # pragma: no cover


def parts(signature: str) -> list[str]:
    """A signature's value codes: "uayfy" → ["u", "ay", "fy"]."""
    out, i = [], 0
    while i < len(signature):
        width = 2 if signature[i] in "af" else 1
        out.append(signature[i : i + width])
        i += width
    return out


_REQUEST_PARTS = [parts(req) for _, req, _ in CALLS]


def decode(body: bytes, version: int = 0) -> Call:
    """One request body → its call. Raises Pkcs11MessageError (UnknownMechanism, with the
    call's name, for a version 2 mechanism it cannot read)."""
    r = Reader(body)
    call_id = r.uint32()
    if (
        call_id == 0
        or call_id >= len(CALLS)
        or (version == 0 and call_id >= V0_CALLS)
        or (version < 2 and call_id >= V2_CALLS)
    ):
        raise Pkcs11MessageError(f"unknown call id {call_id}")
    name, request, _ = CALLS[call_id]
    signature = r.byte_array()
    if signature is None or signature != request.encode():
        raise Pkcs11MessageError(f"{name} does not carry its signature")
    try:
        args = tuple(_value(r, code, version) for code in _REQUEST_PARTS[call_id])
    except UnknownMechanism as e:
        e.call = name
        raise
    r.end()
    return Call(call_id, name, args)


# -- replies -------------------------------------------------------------------------------------
_u32 = _U32.pack
_u64 = _U64.pack


def byte_array(value: bytes | None) -> bytes:
    return _u32(NULL_LENGTH) if value is None else _u32(len(value)) + value


@dataclass(frozen=True)
class Out:
    """An `ay` or `au` reply: the data, or (data None) only its length (a length query, or
    a buffer too small for it)."""

    data: bytes | tuple[int, ...] | None = field(repr=False)
    length: int


def _encode_attribute_value(kind: int, value: Any, length: int) -> bytes:
    if kind in _BOOL_ATTRS:
        return bytes([1 if value else 0])
    if kind in _ULONG_ATTRS:
        return _u64(value or 0)
    if kind in _ARRAY_ATTRS:
        return _u32(0)
    if kind == ck.CKA_ALLOWED_MECHANISMS:
        items = value or ()
        return _u32(length // ULONG_SIZE) + b"".join(_u64(m) for m in items)
    return byte_array(value)


def attribute(kind: int, value: Any, length: int | None) -> bytes:
    """One attribute of an `aA` reply. `length` None is the -1 of an unavailable, sensitive
    or too-small attribute; `value` None with a length answers a length query."""
    if length is None:
        return _u32(kind) + b"\x00"
    return _u32(kind) + b"\x01" + _u32(length) + _encode_attribute_value(kind, value, length)


def attribute_length(kind: int, value: Any) -> int:
    """The length a C client sees for an attribute value (CK_ULONG and CK_BBOOL sizes)."""
    if kind in _BOOL_ATTRS:
        return 1
    if kind in _ULONG_ATTRS:
        return ULONG_SIZE
    if kind == ck.CKA_ALLOWED_MECHANISMS:
        return ULONG_SIZE * len(value)
    return len(value)


def padded(text: str, width: int) -> bytes:
    """A space-padded CK_UTF8CHAR field, cut to `width` bytes on a character boundary."""
    raw = text.encode()[:width]
    while True:
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return raw + b" " * (width - len(raw))


def _encode(code: str, value: Any) -> bytes:
    if code == "u":
        return _u64(value)
    if code == "y":
        return bytes([value])
    if code == "v":
        major, minor = value
        return bytes([major, minor])
    if code in ("s", "z"):
        return byte_array(value)
    if code == "ay":
        if value.data is None:
            return b"\x00" + _u32(value.length)
        return b"\x01" + byte_array(value.data)
    if code == "au":
        if value.data is None:
            return b"\x00" + _u32(value.length)
        return b"\x01" + _u32(len(value.data)) + b"".join(_u64(v) for v in value.data)
    if code == "aA":  # already encoded attributes
        return _u32(len(value)) + b"".join(value)
    raise ValueError(f"no reply carries a {code!r} value")  # pragma: no cover


_REPLY_PARTS = [parts(rep) for _, _, rep in CALLS]


def reply(call_id: int, *values: Any) -> bytes:
    """The reply body to a call, its values in the call's reply signature."""
    codes = _REPLY_PARTS[call_id]
    if len(codes) != len(values):
        raise ValueError(f"{CALLS[call_id][0]} replies {len(codes)} values, not {len(values)}")
    signature = CALLS[call_id][2].encode()
    return (
        _u32(call_id)
        + byte_array(signature)
        + b"".join(_encode(c, v) for c, v in zip(codes, values, strict=True))
    )


def error(rv: int) -> bytes:
    """The reply body of a failed call: ERROR, with the CK_RV."""
    return _u32(0) + byte_array(b"u") + _u64(rv)


def frame(code: int, body: bytes, options: bytes = b"") -> bytes:
    """One message on the wire: header, options, body."""
    return HEADER.pack(code, len(options), len(body)) + options + body


def request(name: str, *encoded: bytes) -> bytes:
    """A request body from already encoded arguments (for tests and the fuzz target)."""
    call_id = CALL_IDS[name]
    return _u32(call_id) + byte_array(CALLS[call_id][1].encode()) + b"".join(encoded)
