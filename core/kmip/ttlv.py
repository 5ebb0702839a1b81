"""KMIP's binary encoding, TTLV (Tag, Type, Length, Value), both ways, with hard limits.

Every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian length and the value, padded
with zeros to a multiple of 8 bytes. A Structure's value is a run of items. Decoding is
strict: fixed-size types must have their size, padding must be zero, text must be UTF-8 and
a Boolean 0 or 1. Anything else is a `KmipMessageError` naming what was wrong, never another
exception; the limits (`Limits`) bound the work any one message can cause.

Our own codec rather than PyKMIP's: docs/decisions.md, "KMIP: our own TTLV codec".
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Union

from ..errors import KmipMessageError

HEADER = 8
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Type(enum.IntEnum):
    STRUCTURE = 0x01
    INTEGER = 0x02
    LONG_INTEGER = 0x03
    BIG_INTEGER = 0x04
    ENUMERATION = 0x05
    BOOLEAN = 0x06
    TEXT_STRING = 0x07
    BYTE_STRING = 0x08
    DATE_TIME = 0x09
    INTERVAL = 0x0A
    DATE_TIME_EXTENDED = 0x0B  # KMIP 2.0: microseconds since the epoch


_FIXED = {  # types whose length is fixed, and that length
    Type.INTEGER: 4,
    Type.ENUMERATION: 4,
    Type.INTERVAL: 4,
    Type.LONG_INTEGER: 8,
    Type.BOOLEAN: 8,
    Type.DATE_TIME: 8,
    Type.DATE_TIME_EXTENDED: 8,
}
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_HEAD = struct.Struct(">3sBI")


@dataclass(frozen=True)
class Limits:
    """What one message may cost to decode."""

    max_bytes: int = 1 << 20
    """The whole message; KMIP's largest objects here are 64 KiB secrets and certificates."""
    max_depth: int = 16
    """Structures inside structures; real requests nest six or seven deep."""
    max_items: int = 10_000
    """Items in the whole message, at every depth."""


DEFAULT_LIMITS = Limits()

Value = Union[int, bool, str, bytes, datetime, list["Item"]]  # noqa: UP007 - recursive alias


@dataclass
class Item:
    """One TTLV item. `value` by type: Structure a list of items; Integer, LongInteger,
    BigInteger, Enumeration and Interval an int; Boolean a bool; TextString a str;
    ByteString bytes; DateTime and DateTimeExtended an aware datetime (UTC)."""

    tag: int
    type: Type
    value: Value = field(default_factory=list)

    # -- reading structures ----------------------------------------------------------------------
    @property
    def items(self) -> list[Item]:
        if self.type is not Type.STRUCTURE:
            raise KmipMessageError(f"item {self.tag:06X} is not a structure")
        assert isinstance(self.value, list)
        return self.value

    def all(self, tag: int) -> Iterator[Item]:
        return (i for i in self.items if i.tag == tag)

    def find(self, tag: int) -> Item | None:
        return next(self.all(tag), None)

    def need(self, tag: int) -> Item:
        found = self.find(tag)
        if found is None:
            raise KmipMessageError(f"item {self.tag:06X} lacks {tag:06X}")
        return found

    def int_of(self, tag: int, default: int | None = None) -> int | None:
        found = self.find(tag)
        if found is None:
            return default
        if not isinstance(found.value, int) or isinstance(found.value, bool):
            raise KmipMessageError(f"item {tag:06X} is not a number")
        return found.value

    def text_of(self, tag: int) -> str | None:
        found = self.find(tag)
        if found is None:
            return None
        if not isinstance(found.value, str):
            raise KmipMessageError(f"item {tag:06X} is not a text string")
        return found.value

    def bytes_of(self, tag: int) -> bytes | None:
        found = self.find(tag)
        if found is None:
            return None
        if not isinstance(found.value, bytes):
            raise KmipMessageError(f"item {tag:06X} is not a byte string")
        return found.value


def structure(tag: int, *items: Item | None) -> Item:
    """A Structure of the items given (None ones left out: optional fields)."""
    return Item(tag, Type.STRUCTURE, [i for i in items if i is not None])


# -- encoding ----------------------------------------------------------------------------------
def _pad(n: int) -> int:
    return -n % 8


def encode(item: Item) -> bytes:
    out = bytearray()
    _encode_into(item, out)
    return bytes(out)


def _encode_into(item: Item, out: bytearray) -> None:
    if not 0 <= item.tag <= 0xFFFFFF:
        raise KmipMessageError(f"tag {item.tag:#x} does not fit in three bytes")
    t, v = Type(item.type), item.value
    start = len(out)
    out += b"\0" * HEADER
    if t is Type.STRUCTURE:
        assert isinstance(v, list)
        for child in v:
            _encode_into(child, out)
        length = len(out) - start - HEADER
    else:
        body = _encode_value(t, v, item.tag)
        length = len(body)
        out += body + b"\0" * _pad(length)
    _HEAD.pack_into(out, start, item.tag.to_bytes(3, "big"), t, length)


def _encode_value(t: Type, v: Value, tag: int) -> bytes:
    try:
        if t in (Type.INTEGER, Type.ENUMERATION, Type.INTERVAL):
            assert isinstance(v, int)
            return _U32.pack(v) if t is not Type.INTEGER else _I32.pack(v)
        if t is Type.LONG_INTEGER:
            assert isinstance(v, int)
            return _I64.pack(v)
        if t is Type.BOOLEAN:
            return _I64.pack(1 if v else 0)
        if t is Type.BIG_INTEGER:
            assert isinstance(v, int)
            n = max(8, (v.bit_length() + 8 + 63) // 64 * 8)  # room for the sign bit
            return v.to_bytes(n, "big", signed=True)
        if t is Type.TEXT_STRING:
            assert isinstance(v, str)
            return v.encode()
        if t is Type.BYTE_STRING:
            assert isinstance(v, bytes | bytearray)
            return bytes(v)
        if t is Type.DATE_TIME:
            assert isinstance(v, datetime)
            return _I64.pack(int(v.timestamp()))
        if t is Type.DATE_TIME_EXTENDED:
            assert isinstance(v, datetime)
            return _I64.pack(round(v.timestamp() * 1_000_000))
    except (AssertionError, struct.error, OverflowError):
        pass
    raise KmipMessageError(f"item {tag:06X}: a {type(v).__name__} cannot be a {t.name}")


# -- decoding ----------------------------------------------------------------------------------
def message_length(header: bytes) -> int:
    """The whole length of the message whose first 8 bytes are `header` (for framing)."""
    if len(header) < HEADER:
        raise KmipMessageError("a TTLV header is 8 bytes")
    _tag, t, length = _HEAD.unpack_from(header)
    if t != Type.STRUCTURE:
        raise KmipMessageError("a KMIP message is a structure")
    return HEADER + int(length)


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Item:
    """The one item that `data` is, exactly (nothing may follow it)."""
    buf = memoryview(data)
    if len(buf) > limits.max_bytes:
        raise KmipMessageError(f"the message is over {limits.max_bytes} bytes")
    budget = [limits.max_items]
    item, end = _decode_at(buf, 0, len(buf), 1, limits, budget)
    if end != len(buf):
        raise KmipMessageError("bytes follow the message")
    return item


def _decode_at(
    buf: memoryview, pos: int, stop: int, depth: int, limits: Limits, budget: list[int]
) -> tuple[Item, int]:
    if stop - pos < HEADER:
        raise KmipMessageError("truncated: an item header is cut off")
    budget[0] -= 1
    if budget[0] < 0:
        raise KmipMessageError(f"the message has over {limits.max_items} items")
    raw_tag, raw_type, length = _HEAD.unpack_from(buf, pos)
    tag = int.from_bytes(raw_tag, "big")
    try:
        t = Type(raw_type)
    except ValueError:
        raise KmipMessageError(f"item {tag:06X} has an unknown type {raw_type:#04x}") from None
    pos += HEADER
    padded = length + _pad(length)
    if t is Type.STRUCTURE:
        if length % 8:
            raise KmipMessageError(f"structure {tag:06X} has a length not a multiple of 8")
        if length > stop - pos:
            raise KmipMessageError(f"truncated: structure {tag:06X} is cut off")
        if depth >= limits.max_depth:
            raise KmipMessageError(f"structures nest deeper than {limits.max_depth}")
        end = pos + length
        children: list[Item] = []
        while pos < end:
            child, pos = _decode_at(buf, pos, end, depth + 1, limits, budget)
            children.append(child)
        return Item(tag, t, children), end
    if padded > stop - pos:
        raise KmipMessageError(f"truncated: item {tag:06X} is cut off")
    fixed = _FIXED.get(t)
    if fixed is not None and length != fixed:
        raise KmipMessageError(f"item {tag:06X}: a {t.name} is {fixed} bytes, not {length}")
    if t is Type.BIG_INTEGER and (length == 0 or length % 8):
        raise KmipMessageError(f"item {tag:06X}: a BIG_INTEGER length is a multiple of 8")
    raw = bytes(buf[pos : pos + length])
    if any(buf[pos + length : pos + padded]):
        raise KmipMessageError(f"item {tag:06X} has padding that is not zero")
    return Item(tag, t, _decode_value(t, raw, tag)), pos + padded


def _decode_value(t: Type, raw: bytes, tag: int) -> Value:
    if t is Type.INTEGER:
        return int(_I32.unpack(raw)[0])
    if t in (Type.ENUMERATION, Type.INTERVAL):
        return int(_U32.unpack(raw)[0])
    if t is Type.LONG_INTEGER:
        return int(_I64.unpack(raw)[0])
    if t is Type.BIG_INTEGER:
        return int.from_bytes(raw, "big", signed=True)
    if t is Type.BOOLEAN:
        n = _I64.unpack(raw)[0]
        if n not in (0, 1):
            raise KmipMessageError(f"item {tag:06X}: a BOOLEAN is 0 or 1")
        return bool(n)
    if t is Type.TEXT_STRING:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise KmipMessageError(f"item {tag:06X}: the text is not UTF-8") from None
    if t is Type.BYTE_STRING:
        return raw
    n = _I64.unpack(raw)[0]
    try:
        if t is Type.DATE_TIME_EXTENDED:
            return _EPOCH + timedelta(microseconds=n)
        return _EPOCH + timedelta(seconds=n)
    except OverflowError:
        raise KmipMessageError(f"item {tag:06X}: the date is out of range") from None


__all__ = [
    "DEFAULT_LIMITS",
    "HEADER",
    "Item",
    "Limits",
    "Type",
    "decode",
    "encode",
    "message_length",
    "structure",
]
