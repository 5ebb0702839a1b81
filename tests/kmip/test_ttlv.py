"""The TTLV codec: every type both ways, and a typed error for each kind of bad input."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from strongroom.errors import KmipMessageError
from strongroom.kmip import ttlv
from strongroom.kmip.ttlv import Item, Limits, Type, structure

EVERY_TYPE = [
    Item(0x420001, Type.INTEGER, -5),
    Item(0x420002, Type.LONG_INTEGER, -(1 << 40)),
    Item(0x420003, Type.BIG_INTEGER, -(1 << 100) + 7),
    Item(0x420004, Type.ENUMERATION, 0xFFFFFFFF),
    Item(0x420005, Type.BOOLEAN, True),
    Item(0x420006, Type.TEXT_STRING, "ünïcode, 13"),
    Item(0x420007, Type.BYTE_STRING, b"\x00\x01\x02"),
    Item(0x420008, Type.DATE_TIME, datetime(2026, 12, 7, 21, 0, tzinfo=UTC)),
    Item(0x420009, Type.INTERVAL, 86400),
    Item(0x42000A, Type.DATE_TIME_EXTENDED, datetime(2026, 12, 7, 21, 0, 0, 123456, tzinfo=UTC)),
]


def test_every_type_round_trips_inside_a_structure() -> None:
    message = structure(0x420078, *EVERY_TYPE, structure(0x420079, Item(0x42000B, Type.INTEGER, 1)))
    data = ttlv.encode(message)
    assert len(data) % 8 == 0
    assert ttlv.decode(data) == message


def test_a_known_encoding() -> None:
    # KMIP 1.4 spec, 9.1.2: an Integer 8 with tag 0x420020
    assert ttlv.encode(Item(0x420020, Type.INTEGER, 8)).hex() == "42002002000000040000000800000000"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (bytes.fromhex("4200200200000004000000080000"), "truncated"),
        (bytes.fromhex("42002002000000050000000800000000"), "4 bytes"),
        (bytes.fromhex("4200200C000000040000000800000000"), "unknown type"),
        (bytes.fromhex("42002002000000040000000800000001"), "padding"),
        (bytes.fromhex("42002006000000080000000000000002"), "0 or 1"),
        (bytes.fromhex("4200200700000002fffe000000000000"), "UTF-8"),
        (bytes.fromhex("420078010000000842002002000000040000000800000000"), "truncated"),
        (bytes.fromhex("42002002000000040000000800000000") + b"\0" * 8, "follow"),
    ],
)
def test_bad_input_is_a_typed_error(data: bytes, says: str) -> None:
    with pytest.raises(KmipMessageError, match=says):
        ttlv.decode(data)


def test_limits_hold() -> None:
    deep = Item(0x420001, Type.INTEGER, 1)
    for _ in range(20):
        deep = structure(0x420078, deep)
    with pytest.raises(KmipMessageError, match="deeper"):
        ttlv.decode(ttlv.encode(deep))
    many = ttlv.encode(structure(0x420078, *[Item(0x420001, Type.INTEGER, 1)] * 50))
    with pytest.raises(KmipMessageError, match="items"):
        ttlv.decode(many, Limits(max_items=10))
    with pytest.raises(KmipMessageError, match="over 64 bytes"):
        ttlv.decode(many, Limits(max_bytes=64))
