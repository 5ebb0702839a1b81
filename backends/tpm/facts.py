"""What the TPM device reports and holds: its capabilities (`Facts`), the
dictionary-attack state (`Lockout`) and the objects of a key (`KeyRef`). Part of the device
layer (device.py re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_CC,
)


@dataclass(frozen=True)
class Facts:
    """What this TPM can do, read from TPM2_GetCapability and TPM2_TestParms."""

    manufacturer: str
    firmware: str
    curves: frozenset[int]
    algorithms: frozenset[int]
    commands: frozenset[int]
    rsa_bits: tuple[int, ...]
    aes256: bool
    transient_slots: int

    def has_alg(self, name: str) -> bool:
        return int(getattr(TPM2_ALG, name)) in self.algorithms

    def has_command(self, name: str) -> bool:
        return int(getattr(TPM2_CC, name)) in self.commands


@dataclass(frozen=True)
class Lockout:
    """The dictionary-attack state (TPM_PT_LOCKOUT_COUNTER and friends)."""

    failures: int
    max_failures: int
    interval: int
    recovery: int
    in_lockout: bool

    @property
    def tries_left(self) -> int:
        return max(0, self.max_failures - self.failures)

    def describe(self) -> str:
        state = "in lockout" if self.in_lockout else f"{self.tries_left} tries left before lockout"
        return (
            f"TPM dictionary-attack counter {self.failures} of {self.max_failures}, {state}; "
            f"one failure is forgotten every {self.interval} s"
        )

    def to_dict(self) -> dict[str, int | bool]:
        return {
            "failures": self.failures,
            "max_failures": self.max_failures,
            "interval_s": self.interval,
            "lockout_recovery_s": self.recovery,
            "in_lockout": self.in_lockout,
        }


@dataclass(frozen=True)
class KeyRef:
    """One TPM object of a key, as the LRU knows it; `auth` is the PIN (never printed)."""

    cache_id: str
    public: bytes
    private: bytes
    auth: bytes | None = None

    def __repr__(self) -> str:
        return f"KeyRef({self.cache_id[:24]}..., pin={self.auth is not None})"


class StorageKeyProblem(Exception):
    """The configured persistent handle holds something that is not a storage key."""


class CounterIndexTaken(Exception):
    """The NV index meant for a counter holds something else (another program's index)."""
