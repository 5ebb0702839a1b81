"""`VaultRecords` (core/storage.py) over the catalog's store (core/store.py): SQLite in the
data_dir, or PostgreSQL shared by several nodes.

The rows sit beside the catalog's, in the same database and on the same connection, so a
key change and its catalog change commit in one transaction (`Catalog.transaction`). The
layout is in docs/storage.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import cast

from .catalog import Catalog
from .storage import VaultHeader, VaultRow

_ROW = "record_id, namespace, name, version, type, meta, public, sealed, mac"


class StoreVaultRecords:
    """One vault backend's rows (`backend` = its name in the config)."""

    def __init__(self, catalog: Catalog, backend: str) -> None:
        self._catalog = catalog
        self._backend = backend

    @property
    def location(self) -> str:
        return self._catalog.location

    def transaction(self) -> AbstractContextManager[None]:
        return self._catalog.transaction()

    def on_end(self, hook: Callable[[bool], None]) -> None:
        self._catalog.on_end(hook)

    def header(self) -> VaultHeader | None:
        # Inside a writing transaction the vault checks this header and then writes the
        # next one: the row stays locked until the transaction ends.
        lock = self._catalog.for_update if self._catalog.in_transaction else ""
        row = self._catalog.query_one(
            "SELECT vault_id, slots, manifest, format FROM vault_headers WHERE backend=?"  # noqa: S608
            + lock,
            (self._backend,),
        )
        if row is None:
            return None
        vault_id, slots, manifest, fmt = row
        return VaultHeader(str(vault_id), str(slots), str(manifest), int(str(fmt)))

    def header_with_count(self) -> tuple[VaultHeader, int] | None:
        row = self._catalog.query_one(
            "SELECT vault_id, slots, manifest, format, "
            "(SELECT COUNT(*) FROM vault_records WHERE backend=?) "
            "FROM vault_headers WHERE backend=?",
            (self._backend, self._backend),
        )
        if row is None:
            return None
        vault_id, slots, manifest, fmt, count = row
        return VaultHeader(str(vault_id), str(slots), str(manifest), int(str(fmt))), int(str(count))

    def put_header(self, header: VaultHeader) -> None:
        self._catalog.write(
            "INSERT INTO vault_headers (backend, vault_id, format, slots, manifest) "
            "VALUES (?,?,?,?,?) ON CONFLICT (backend) DO UPDATE SET vault_id=excluded.vault_id, "
            "format=excluded.format, slots=excluded.slots, manifest=excluded.manifest",
            (self._backend, header.vault_id, header.format, header.slots, header.manifest),
        )

    def get(self, record_id: str) -> VaultRow | None:
        row = self._catalog.query_one(
            f"SELECT {_ROW} FROM vault_records WHERE backend=? AND record_id=?",  # noqa: S608
            (self._backend, record_id),
        )
        return None if row is None else _row(row)

    def put(self, row: VaultRow) -> None:
        self._catalog.write(
            f"INSERT INTO vault_records (backend, {_ROW}) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
            (
                self._backend,
                row.record_id,
                row.namespace,
                row.name,
                row.version,
                row.type,
                row.meta,
                row.public,
                row.sealed,
                row.mac,
            ),
        )

    def delete(self, record_id: str) -> bool:
        return (
            self._catalog.write(
                "DELETE FROM vault_records WHERE backend=? AND record_id=?",
                (self._backend, record_id),
            )
            > 0
        )

    def rows(self) -> Iterator[VaultRow]:
        for row in self._catalog.query_all(
            f"SELECT {_ROW} FROM vault_records WHERE backend=? ORDER BY record_id",  # noqa: S608
            (self._backend,),
        ):
            yield _row(row)

    def count(self) -> int:
        row = self._catalog.query_one(
            "SELECT COUNT(*) FROM vault_records WHERE backend=?", (self._backend,)
        )
        return int(str(row[0])) if row else 0

    def clear(self) -> None:
        with self.transaction():
            self._catalog.write("DELETE FROM vault_records WHERE backend=?", (self._backend,))
            self._catalog.write("DELETE FROM vault_headers WHERE backend=?", (self._backend,))

    def catalog_version(self, record_id: str) -> int | None:
        row = self._catalog.query_one(
            "SELECT version FROM key_versions WHERE backend=? AND handle=?",
            (self._backend, record_id),
        )
        return None if row is None else int(str(row[0]))


SqliteVaultRecords = StoreVaultRecords
"""The name from before the store had two databases."""


def _row(row: tuple[object, ...]) -> VaultRow:
    record_id, namespace, name, version, ktype, meta, public, sealed, mac = row
    return VaultRow(
        str(record_id),
        str(namespace),
        str(name),
        int(str(version)),
        str(ktype),
        str(meta),
        None if public is None else bytes(cast(bytes, public)),
        bytes(cast(bytes, sealed)),
        bytes(cast(bytes, mac)),
    )
