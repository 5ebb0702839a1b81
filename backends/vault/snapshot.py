"""The vault snapshot file: format, integrity checks and atomic writes.

Layout (all integers big-endian):

    magic     8 bytes   b"SRVAULT\\x00"
    version   u16       3 (1 and 2, from before the store, are still read)
    hlen      u32       length of the header
    header    hlen      UTF-8 JSON: vault id, generation, key slots, payload cipher
    plen      u64       length of the payload ciphertext
    payload   plen      nonce(24) ‖ XChaCha20-Poly1305(LZ4(records)); associated data =
                        everything above plen
    checksum  32 bytes  SHA-256 of everything above

The checksum is not a security measure (anyone can recompute it); it tells a
truncated or damaged file apart from a wrong passphrase. Authenticity comes from
the AEAD, whose associated data binds the header, slots included.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strongroom import strictjson
from strongroom.errors import (
    SnapshotCorrupt,
    SnapshotTampered,
    SnapshotTruncated,
    SnapshotVersionError,
    StorageError,
)

MAGIC = b"SRVAULT\x00"
FORMAT_VERSION = 3
"""The newest format this code reads and writes. Version 2 added threshold and recovery key
slots. Version 3 (the store's export, `vault backup`) seals each record with associated data
that binds its vault, name and version (backends/vault/rows.py) and gives each its version;
versions 1 and 2 are still read (a vault from before the store, an old backup)."""
READABLE_VERSIONS = (1, 2, 3)
_PREFIX = struct.Struct(">8sHI")
_PLEN = struct.Struct(">Q")
CHECKSUM = 32
MAX_HEADER = 1 << 20


@dataclass
class Snapshot:
    """A parsed (still encrypted) snapshot."""

    header: dict[str, Any]
    associated: bytes
    payload: bytes
    raw_header: bytes = field(repr=False, default=b"")

    @property
    def generation(self) -> int:
        return int(self.header.get("generation", 0))


def encode(
    header: dict[str, Any],
    payload_ct_builder: Callable[[bytes], bytes],
    version: int = FORMAT_VERSION,
) -> bytes:
    """Serialise: `payload_ct_builder(associated_data)` returns the payload ciphertext."""
    if version not in READABLE_VERSIONS:
        raise ValueError(f"cannot write snapshot format {version}")
    raw_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    associated = _PREFIX.pack(MAGIC, version, len(raw_header)) + raw_header
    payload = payload_ct_builder(associated)
    body = associated + _PLEN.pack(len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def version_of(snap: Snapshot) -> int:
    """The format version a decoded snapshot was written in."""
    return int(_PREFIX.unpack_from(snap.associated)[1])


def decode(data: bytes, source: str) -> Snapshot:
    """Parse and check structure; each kind of damage gets its own error."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):  # an empty file included
            raise SnapshotTruncated(f"{source} is truncated: it ends inside the file header")
        raise SnapshotCorrupt(f"{source} is not a Strongroom vault snapshot (bad magic)")
    if len(data) < _PREFIX.size:
        raise SnapshotTruncated(f"{source} is truncated: it ends inside the file header")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise SnapshotVersionError(
            f"{source} uses snapshot format {version}, newer than this Strongroom reads "
            f"({FORMAT_VERSION}); upgrade Strongroom to open it",
            version,
        )
    if version not in READABLE_VERSIONS:
        raise SnapshotVersionError(
            f"{source} has unknown snapshot format version {version}", version
        )
    if hlen > MAX_HEADER:
        raise SnapshotTampered(f"{source} is damaged: its header length is implausible")
    end_header = _PREFIX.size + hlen
    if len(data) < end_header + _PLEN.size:
        raise SnapshotTruncated(f"{source} is truncated: it ends inside the header")
    (plen,) = _PLEN.unpack_from(data, end_header)
    end_payload = end_header + _PLEN.size + plen
    if len(data) < end_payload + CHECKSUM:
        raise SnapshotTruncated(
            f"{source} is truncated: {len(data)} bytes of {end_payload + CHECKSUM}"
        )
    if len(data) > end_payload + CHECKSUM:
        raise SnapshotTampered(f"{source} is damaged: it has data after its end")
    if hashlib.sha256(data[:end_payload]).digest() != data[end_payload:]:
        raise SnapshotTampered(f"{source} is damaged or was modified: its checksum does not match")
    raw_header = data[_PREFIX.size : end_header]
    try:
        header = check_header(strictjson.loads(raw_header))
    except ValueError:
        raise SnapshotTampered(f"{source} is damaged: its header is not valid") from None
    return Snapshot(
        header, data[:end_header], data[end_header + _PLEN.size : end_payload], raw_header
    )


MAX_GENERATION = (1 << 63) - 1
MAX_SLOTS = 1024


def check_header(header: Any) -> dict[str, Any]:
    """The header when the fields every reader relies on have their types and sane bounds;
    else ValueError. It is read before anything authenticates it (the AEAD needs the master
    key, which the slots give), so nothing in it may be trusted to be well formed; each key
    slot's own fields are checked by the method that opens it."""
    if not isinstance(header, dict):
        raise ValueError("the header is not an object")
    if not isinstance(header.get("vault_id"), str):
        raise ValueError("vault_id")
    strictjson.integer(header.get("generation", 0), 0, MAX_GENERATION)
    slots = header.get("slots")
    if not isinstance(slots, list) or len(slots) > MAX_SLOTS:
        raise ValueError("slots")
    for slot in slots:
        if not isinstance(slot, dict) or not isinstance(slot.get("method"), str):
            raise ValueError("slot")
    return header


def read_generation(path: Path) -> tuple[str, int] | None:
    """(vault id, generation) from the header alone, or None when the file is absent."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                return ("", -1)
            _, _, hlen = _PREFIX.unpack(prefix)
            header = check_header(strictjson.loads(f.read(min(hlen, MAX_HEADER))))
            return (header["vault_id"], header.get("generation", -1))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return ("", -1)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temp file in the same directory, fsync it, rename it over, fsync the directory.

    A full disk, a read-only file system or the like is a StorageError naming the path; the
    old file is then untouched and the temp file removed.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None


def remove_stale_temps(path: Path) -> None:
    """Temp files left by a writer that died; only call while holding the vault lock."""
    for tmp in path.parent.glob(f".{path.name}.tmp.*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes that write this snapshot."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
