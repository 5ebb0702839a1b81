"""Test support: fill a vault with many keys in one transaction (generate() commits per key).

Used by tests that need tens of thousands of keys; also imported by child processes. The
keys get vault rows only, no catalog rows: the tests use them through the vault itself.
"""

from __future__ import annotations

import os
from dataclasses import replace

from strongroom import sodium
from strongroom.backends.vault import VaultBackend, rows
from strongroom.backends.vault.state import Record
from strongroom.types import KeyType


def add_aes_keys(vault: VaultBackend, count: int, prefix: str = "bulk") -> None:
    """Add `count` random AES-256 keys to the vault's rows in one transaction."""
    vault.open()
    state = vault._state
    assert state is not None
    material = bytearray(32)
    store = vault._rows
    records = []
    with state.pool.borrow(1) as (record_key, _):
        for i in range(count):
            sodium.random_into(memoryview(material))
            probe = Record(
                os.urandom(16).hex(), f"{prefix}-{i}", "default", KeyType.AES_256,
                ("decrypt", "encrypt"), False, "2026-01-01T00:00:00+00:00", None, b"", 1,
            )  # fmt: skip
            aad = rows.record_aad(state.vault_id, probe)
            records.append(replace(probe, sealed=sodium.seal(record_key, material, aad)))
    with store.transaction():
        manifest = vault._current(state)
        for row in rows.to_rows(state, records):
            store.put(row)
            manifest = manifest.added(row)
        vault._commit(state, manifest)
    material[:] = bytes(32)
