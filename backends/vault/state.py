"""The vault's records and its unlocked state.

A `Record` is one key as the vault holds it: metadata in clear, material sealed under the
record key. `_Open` is an unlocked vault: the master key and the record key (a subkey of the
master key) in coffers, and the records, each still sealed. Nothing here reads or writes the
snapshot file; backend.py does.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from strongroom import sodium
from strongroom.memory import Coffer, Guarded, KeyedPool
from strongroom.types import KeyInfo, KeyType, Usage

_REC_PERSONAL = b"srvault-records1"
_PAYLOAD_PERSONAL = b"srvault-payload1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@dataclass(frozen=True)
class Record:
    """One key as the vault holds it: metadata in clear, material sealed."""

    handle: str
    name: str
    namespace: str
    type: KeyType
    usage: tuple[str, ...]
    exportable: bool
    created: str
    public: bytes | None
    sealed: bytes
    version: int = 1
    """The key version this record is (associated data binds it; rows.record_aad)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "h": self.handle,
            "n": self.name,
            "ns": self.namespace,
            "t": self.type.value,
            "u": list(self.usage),
            "x": self.exportable,
            "c": self.created,
            "p": _b64(self.public) if self.public is not None else None,
            "s": _b64(self.sealed),
            "v": self.version,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Record:
        return cls(
            handle=str(d["h"]),
            name=str(d["n"]),
            namespace=str(d["ns"]),
            type=KeyType(d["t"]),
            usage=tuple(str(u) for u in d["u"]),
            exportable=bool(d["x"]),
            created=str(d["c"]),
            public=_unb64(d["p"]) if d.get("p") is not None else None,
            sealed=_unb64(d["s"]),
            version=int(d.get("v", 1)),
        )

    def info(self) -> KeyInfo:
        return KeyInfo(
            name=self.name,
            type=self.type,
            backend="",
            usage=frozenset(Usage(u) for u in self.usage),
            exportable=self.exportable,
            namespace=self.namespace,
            created=datetime.fromisoformat(self.created),
            handle=self.handle,
            version=self.version,
        )


class _Open:
    """The state of an unlocked vault: master key and record key in coffers, records sealed."""

    def __init__(
        self, vault_id: str, generation: int, slots: list[dict[str, Any]], master: Guarded
    ) -> None:
        """Takes ownership of `master` (closes it once its key is in a coffer)."""
        self.vault_id = vault_id
        self.generation = generation
        self.slots = slots
        with master, master.read() as m:
            self.master = Coffer(m)
        try:
            with self.subkey(_REC_PERSONAL) as r:
                self.record_key = Coffer(r)
        except BaseException:
            self.master.close()
            raise
        self.pool = KeyedPool(self.record_key)
        self.records: dict[str, Record] = {}
        """Records loaded so far (lazily, on first use), by record id."""
        self.count = 0
        """The number of records, from the manifest (docs/storage.md)."""
        self.tpm: int | None = None
        """The TPM counter value of the last commit, with `rollback_counter`."""

    @contextlib.contextmanager
    def master_key(self) -> Iterator[memoryview]:
        """The master key, in guarded memory for the length of the block."""
        with Guarded(32) as key:
            with key.write() as k:
                self.master.open_into(k)
            with key.read() as k:
                yield k

    @contextlib.contextmanager
    def subkey(self, personal: bytes) -> Iterator[memoryview]:
        """A key derived from the master key (keyed BLAKE2b), for the length of the block."""
        with Guarded(32) as key:
            with self.master_key() as m, key.write() as k:
                sodium.keyed_hash_into(m, personal, k)
            with key.read() as k:
                yield k

    def payload_key(self) -> contextlib.AbstractContextManager[memoryview]:
        return self.subkey(_PAYLOAD_PERSONAL)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            try:
                self.record_key.close()
            finally:
                self.master.close()
        self.records = {}
