"""Test support: fill a vault with many keys in one commit (generate() commits per key).

Used by tests that need tens of thousands of keys; also imported by child processes.
"""

from __future__ import annotations

import os

from strongroom import sodium
from strongroom.backends.vault import VaultBackend
from strongroom.backends.vault import backend as vault_backend
from strongroom.types import KeyType


def add_aes_keys(vault: VaultBackend, count: int, prefix: str = "bulk") -> None:
    """Add `count` random AES-256 keys to the vault's snapshot in one commit."""
    vault.open()
    state = vault._state
    assert state is not None
    new = {}
    material = bytearray(32)
    with state.pool.borrow(1) as (record_key, _):
        for i in range(count):
            sodium.random_into(memoryview(material))
            handle = os.urandom(16).hex()
            probe = vault_backend.Record(
                handle, f"{prefix}-{i}", "default", KeyType.AES_256, ("decrypt", "encrypt"),
                False, "2026-01-01T00:00:00+00:00", None, b"",
            )  # fmt: skip
            sealed = sodium.seal(record_key, material, probe.aad())
            new[handle] = vault_backend.Record(**{**probe.__dict__, "sealed": sealed})
    material[:] = bytes(32)
    vault._mutate(lambda records, slots: records.update(new))
