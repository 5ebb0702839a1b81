"""The software vault: keys in guarded memory, persisted as an encrypted snapshot."""

from .backend import VaultBackend

__all__ = ["VaultBackend"]
