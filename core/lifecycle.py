"""Key versions: the small self-describing envelopes that carry a key version, and durations.

A ciphertext from `key encrypt` (or `Keystore.encrypt(..., envelope=True)`) is

    b"SRK" 0x01 | version (uint32, big-endian) | the backend's ciphertext

and a signature from `key sign --envelope` is

    b"SRS" 0x01 | version (uint32, big-endian) | the bare signature

so decryption and verification pick the key version that made them (docs/lifecycle.md).
"""

from __future__ import annotations

import re
import struct
from datetime import timedelta

from .errors import DataFormatError, InvalidArgument

CIPHERTEXT_MAGIC = b"SRK\x01"
SIGNATURE_MAGIC = b"SRS\x01"
_HEADER = struct.Struct(">4sI")
HEADER_SIZE = _HEADER.size
MAX_VERSION = 0xFFFFFFFF


def pack(magic: bytes, version: int, body: bytes) -> bytes:
    """Prefix `body` with `magic` and the key version."""
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"key version {version} is out of range")
    return _HEADER.pack(magic, version) + body


def unpack(magic: bytes, blob: bytes, what: str) -> tuple[int, bytes]:
    """(version, body) of a versioned blob; DataFormatError if it is not one."""
    blob = bytes(blob)
    if len(blob) < HEADER_SIZE or blob[:3] != magic[:3]:
        raise DataFormatError(
            f"this is not a versioned Strongroom {what} (give --raw for a bare one)"
        )
    found, version = _HEADER.unpack_from(blob)
    if found != magic:
        raise DataFormatError(
            f"versioned {what} format {found[3]} is not one this Strongroom reads "
            f"(it reads {magic[3]})"
        )
    if version == 0:
        raise DataFormatError(f"the versioned {what} names key version 0, which never exists")
    return version, blob[HEADER_SIZE:]


def is_versioned(magic: bytes, blob: bytes) -> bool:
    """Whether `blob` starts like a versioned blob of this kind (any format version)."""
    return len(blob) >= HEADER_SIZE and bytes(blob[:3]) == magic[:3]


_DURATION_RE = re.compile(r"\s*(\d+)\s*([smhd]?)\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 86400}


def parse_duration(text: str | int) -> timedelta:
    """A waiting period: "30s", "15m", "12h", "7d", or a bare number of days."""
    if isinstance(text, bool):
        raise InvalidArgument("a waiting period is a number with s, m, h or d, e.g. 7d")
    if isinstance(text, int):
        text = str(text)
    m = _DURATION_RE.fullmatch(str(text))
    if m is None:
        raise InvalidArgument(
            f"bad waiting period {text!r}: a number with s, m, h or d, e.g. 7d or 12h"
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > 3650 * 86400:
        raise InvalidArgument("a waiting period is at most 3650 days")
    return timedelta(seconds=seconds)


__all__ = [
    "CIPHERTEXT_MAGIC",
    "SIGNATURE_MAGIC",
    "is_versioned",
    "pack",
    "parse_duration",
    "unpack",
]
