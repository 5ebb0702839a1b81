"""The vault's rows in the keystore's store: how a record is sealed, authenticated and
counted (docs/storage.md).

- A record's material is sealed with XChaCha20-Poly1305 under the record key, with
  associated data that binds the vault id, the record id, the key's namespace, name,
  version and type: a sealed blob moved to another row or vault does not open.
- Each row carries a MAC (keyed BLAKE2b under the record key) over every column, checked
  when the row is loaded: an edited, swapped or copied row is `SnapshotTampered`.
- The header carries a manifest: a counter, the number of rows and a multiset hash
  (MuHash over a 3072-bit prime) of the rows' ids and MACs, under a MAC of its own over
  the key slots too. Every change updates it in the same transaction, in constant time.
  Opening checks its MAC and the row count; `verify` checks every row against it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from strongroom import sodium, strictjson
from strongroom.errors import SnapshotTampered
from strongroom.memory import constant_time_equal
from strongroom.storage import VaultHeader, VaultRow
from strongroom.types import KeyType

from .state import Record, _b64, _Open, _unb64

_ROW_MAC = b"srvault-row-mac1"
_MANIFEST_MAC = b"srvault-manifst1"
MUHASH_PRIME = 2**3072 - 1103717
"""A 3072-bit safe prime (`openssl prime` confirms it and (p-1)/2), the modulus of Bitcoin
Core's MuHash3072 too."""
_MUHASH_BYTES = 384
STORE_FORMAT = 1
"""The layout of the header and rows in the store; a newer one is refused."""


def _canon(*parts: bytes) -> bytes:
    """Length-prefixed fields: no two different tuples encode alike."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def record_aad(vault_id: str, rec: Record) -> bytes:
    """What a record's sealed material is bound to."""
    return b"srvault-record2" + _canon(
        vault_id.encode(),
        rec.handle.encode(),
        rec.namespace.encode(),
        rec.name.encode(),
        str(rec.version).encode(),
        rec.type.value.encode(),
    )


def legacy_aad(handle: str, key_type: KeyType) -> bytes:
    """The associated data of records in snapshot formats 1 and 2."""
    return f"strongroom-record|{handle}|{key_type.value}".encode()


def _meta(rec: Record) -> str:
    return json.dumps(
        {"u": list(rec.usage), "x": rec.exportable, "c": rec.created},
        sort_keys=True,
        separators=(",", ":"),
    )


def _row_fields(vault_id: str, row: VaultRow) -> bytes:
    return _canon(
        vault_id.encode(),
        row.record_id.encode(),
        row.namespace.encode(),
        row.name.encode(),
        str(row.version).encode(),
        row.type.encode(),
        row.meta.encode(),
        b"\x00" if row.public is None else b"\x01" + row.public,
        row.sealed,
    )


def _mac(state: _Open, personal: bytes, message: bytes) -> bytes:
    return _macs(state, personal, [message])[0]


def _macs(state: _Open, personal: bytes, messages: Iterable[bytes]) -> list[bytes]:
    """One MAC per message, under one loan of the record key (a loan costs two mprotect
    calls: a vault of 100,000 rows is listed or restored with one, not 100,000)."""
    with state.pool.borrow(32) as (record_key, out):
        macs = []
        for message in messages:
            sodium.keyed_hash_into(record_key, personal, out, message)
            macs.append(bytes(out))
        return macs


def to_row(state: _Open, rec: Record) -> VaultRow:
    """The row of a record, with its MAC."""
    return to_rows(state, [rec])[0]


def from_rows(state: _Open, rows: Sequence[VaultRow], where: str) -> list[Record]:
    """`from_row` of many rows, their MACs computed under one loan of the record key."""
    expected = _macs(state, _ROW_MAC, (_row_fields(state.vault_id, r) for r in rows))
    return [_checked(row, mac, where) for row, mac in zip(rows, expected, strict=True)]


def to_rows(state: _Open, records: Iterable[Record]) -> list[VaultRow]:
    """`to_row` of many records, their MACs computed under one loan of the record key."""
    bare = [
        VaultRow(
            rec.handle,
            rec.namespace,
            rec.name,
            rec.version,
            rec.type.value,
            _meta(rec),
            rec.public,
            rec.sealed,
            b"",
        )
        for rec in records
    ]
    macs = _macs(state, _ROW_MAC, (_row_fields(state.vault_id, r) for r in bare))
    return [
        VaultRow(r.record_id, r.namespace, r.name, r.version, r.type, r.meta, r.public, r.sealed, m)
        for r, m in zip(bare, macs, strict=True)
    ]


def from_row(state: _Open, row: VaultRow, where: str) -> Record:
    """The record a row holds, once its MAC shows it is the row this vault wrote."""
    return _checked(row, _mac(state, _ROW_MAC, _row_fields(state.vault_id, row)), where)


def _checked(row: VaultRow, expected: bytes, where: str) -> Record:
    if not constant_time_equal(expected, row.mac):
        raise SnapshotTampered(
            f"a key record in {where} failed authentication: it was edited, or copied from "
            "another vault"
        )
    try:
        meta = strictjson.loads(row.meta.encode())
        return Record(
            handle=row.record_id,
            name=row.name,
            namespace=row.namespace,
            type=KeyType(row.type),
            usage=tuple(str(u) for u in meta["u"]),
            exportable=bool(meta["x"]),
            created=str(meta["c"]),
            public=row.public,
            sealed=row.sealed,
            version=row.version,
        )
    except (ValueError, KeyError, TypeError):  # authentic yet unreadable: a bug, not damage
        raise SnapshotTampered(f"a key record in {where} cannot be read") from None


# -- the manifest --------------------------------------------------------------------------
def _element(row_id: str, mac: bytes) -> int:
    digest = hashlib.shake_256(b"srvault-muhash1" + _canon(row_id.encode(), mac))
    return int.from_bytes(digest.digest(_MUHASH_BYTES), "big") % MUHASH_PRIME or 1


@dataclass(frozen=True)
class Manifest:
    """What the vault's rows are: `num`/`den` is the product of their elements. `tpm` is
    the TPM counter value this state was committed at, when `rollback_counter` is set."""

    counter: int
    count: int
    num: int
    den: int
    tpm: int | None = None

    @classmethod
    def empty(cls) -> Manifest:
        return cls(0, 0, 1, 1)

    def added(self, row: VaultRow) -> Manifest:
        e = _element(row.record_id, row.mac)
        num = self.num * e % MUHASH_PRIME
        return Manifest(self.counter + 1, self.count + 1, num, self.den, self.tpm)

    def removed(self, row: VaultRow) -> Manifest:
        e = _element(row.record_id, row.mac)
        den = self.den * e % MUHASH_PRIME
        return Manifest(self.counter + 1, self.count - 1, self.num, den, self.tpm)

    def bumped(self) -> Manifest:
        return replace(self, counter=self.counter + 1)

    def matches(self, rows: Iterable[VaultRow]) -> bool:
        product, n = 1, 0
        for row in rows:
            product = product * _element(row.record_id, row.mac) % MUHASH_PRIME
            n += 1
        return n == self.count and product * self.den % MUHASH_PRIME == self.num

    def _signed(self, vault_id: str, slots: str, fmt: int) -> bytes:
        return _canon(
            vault_id.encode(),
            str(fmt).encode(),
            hashlib.sha256(slots.encode()).digest(),
            str(self.counter).encode(),
            str(self.count).encode(),
            self.num.to_bytes(_MUHASH_BYTES, "big"),
            self.den.to_bytes(_MUHASH_BYTES, "big"),
            b"" if self.tpm is None else str(self.tpm).encode(),
        )


def header_for(state: _Open, slots: list[dict[str, Any]], manifest: Manifest) -> VaultHeader:
    """The header row: slots and manifest, the manifest's MAC binding both."""
    slots_text = json.dumps(slots, sort_keys=True, separators=(",", ":"))
    mac = _mac(state, _MANIFEST_MAC, manifest._signed(state.vault_id, slots_text, STORE_FORMAT))
    doc: dict[str, Any] = {
        "counter": manifest.counter,
        "count": manifest.count,
        "num": _b64(manifest.num.to_bytes(_MUHASH_BYTES, "big")),
        "den": _b64(manifest.den.to_bytes(_MUHASH_BYTES, "big")),
        "mac": _b64(mac),
    }
    if manifest.tpm is not None:
        doc["tpm"] = manifest.tpm
    return VaultHeader(state.vault_id, slots_text, json.dumps(doc, sort_keys=True), STORE_FORMAT)


def parse_slots(header: VaultHeader, where: str) -> list[dict[str, Any]]:
    """The key slots, checked for shape only (nothing is authenticated before unlocking)."""
    try:
        slots = strictjson.loads(header.slots.encode())
        if not isinstance(slots, list) or not all(
            isinstance(s, dict) and isinstance(s.get("method"), str) for s in slots
        ):
            raise ValueError("slots")
        return slots
    except ValueError:
        raise SnapshotTampered(f"the vault header in {where} is damaged: bad key slots") from None


def read_manifest(state: _Open, header: VaultHeader, where: str) -> Manifest:
    """The manifest, once its MAC shows that this vault wrote it with these slots."""
    try:
        doc = strictjson.loads(header.manifest.encode())
        num, den = _unb64(doc["num"]), _unb64(doc["den"])
        if len(num) != _MUHASH_BYTES or len(den) != _MUHASH_BYTES:
            raise ValueError("num and den are 384 bytes each")
        manifest = Manifest(
            strictjson.integer(doc["counter"], 0, (1 << 63) - 1),
            strictjson.integer(doc["count"], 0, (1 << 63) - 1),
            int.from_bytes(num, "big"),
            int.from_bytes(den, "big"),
            None if doc.get("tpm") is None else strictjson.integer(doc["tpm"], 0, (1 << 64) - 1),
        )
        if not (0 < manifest.num < MUHASH_PRIME and 0 < manifest.den < MUHASH_PRIME):
            raise ValueError("num and den are residues modulo the prime")
        mac = _unb64(doc["mac"])
    except (ValueError, KeyError, TypeError):
        raise SnapshotTampered(f"the vault header in {where} is damaged: bad manifest") from None
    expected = _mac(
        state, _MANIFEST_MAC, manifest._signed(header.vault_id, header.slots, header.format)
    )
    if header.vault_id != state.vault_id or not constant_time_equal(expected, mac):
        raise SnapshotTampered(
            f"the vault header in {where} failed authentication: its key slots or manifest "
            "were modified"
        )
    return manifest
