"""The storage contract a backend that keeps its keys in the keystore's database writes
against: the software vault's sealed records and its header (docs/storage.md).

The engine implements `VaultRecords` over the transactional store of a `data_dir`
(catalog.sqlite, core/vaultstore.py); a backend receives one, scoped to its name, as
`BackendContext.records`. Everything here is opaque to the store: it keeps the rows, and
the backend seals, authenticates and checks them. A write made while the keystore holds a
transaction (`transaction()`, `Keystore.batch()`) commits or rolls back with the catalog
change it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class VaultHeader:
    """The vault's header row: its id, key slots and manifest, each as the backend wrote it.

    `slots` and `manifest` are JSON texts; the store does not read them."""

    vault_id: str
    slots: str
    manifest: str
    format: int = 1


@dataclass(frozen=True)
class VaultRow:
    """One key version as the vault keeps it: metadata in clear, material sealed."""

    record_id: str
    namespace: str
    name: str
    version: int
    type: str
    meta: str
    """JSON: usage, exportable, created."""
    public: bytes | None
    sealed: bytes = field(repr=False)
    mac: bytes = field(repr=False)


class VaultRecords(Protocol):
    """A vault's rows in the keystore's store. Writes join the transaction in progress on
    this thread, if any; `transaction()` opens one (or a nested scope of the open one)."""

    @property
    def location(self) -> str:
        """Where the rows live (a path or a URL without credentials), for messages."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """One atomic scope: everything written in it commits together, or none of it."""
        ...

    def on_end(self, hook: Callable[[bool], None]) -> None:
        """Call `hook(committed)` once the transaction in progress ends."""
        ...

    def header(self) -> VaultHeader | None:
        """The header row; None when the store holds no vault of this name yet."""
        ...

    def header_with_count(self) -> tuple[VaultHeader, int] | None:
        """The header and the number of rows, read together (one snapshot of the store)."""
        ...

    def put_header(self, header: VaultHeader) -> None:
        """Insert or replace the header row."""
        ...

    def get(self, record_id: str) -> VaultRow | None: ...

    def put(self, row: VaultRow) -> None:
        """Insert a new row; a record id is never reused, so an existing one is an error."""
        ...

    def delete(self, record_id: str) -> bool:
        """Remove a row; False when there was none."""
        ...

    def rows(self) -> Iterator[VaultRow]:
        """Every row of this vault (for backup, verification and listing)."""
        ...

    def count(self) -> int: ...

    def clear(self) -> None:
        """Remove the header and every row (restore replaces them in the same transaction)."""
        ...

    def catalog_version(self, record_id: str) -> int | None:
        """The key version the catalog records for this handle, if it knows the handle
        (used once, to bind the records of a migrated snapshot to their versions)."""
        ...
