"""Strongroom: one key API over TPM 2.0, PKCS#11, PIV, FIDO2 and a guarded software vault.

import strongroom

with strongroom.open() as ks:
    ks.generate("signer", "ed25519")
    sig = ks.sign("signer", b"data")
    ks.verify("signer", b"data", sig)
"""

from __future__ import annotations

import os

from . import config as _config
from .backend import Attester, Backend, BackendContext, ConfigKey, NewKey, Sealer, SeedProcedures
from .errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    DeviceLocked,
    GuardedMemoryError,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    SnapshotCorrupt,
    SnapshotTampered,
    SnapshotTruncated,
    SnapshotVersionError,
    StrongroomError,
    UnsupportedOperation,
)
from .keystore import BackendStatus, Keystore
from .secrets import Prompter
from .types import KeyInfo, KeyType, Operation, Usage

__version__ = "0.1.0"


def open(
    config: str | os.PathLike[str] | None = None,
    *,
    actor: str | None = None,
    prompter: Prompter | None = None,
) -> Keystore:
    """Open the keystore described by `config`, $STRONGROOM_CONFIG, or the embedded default."""
    return Keystore(_config.load(config), actor=actor, prompter=prompter)


__all__ = [
    "Attester",
    "AuthenticationFailed",
    "Backend",
    "BackendContext",
    "BackendStatus",
    "BackendUnavailable",
    "ConfigError",
    "ConfigKey",
    "DeviceLocked",
    "GuardedMemoryError",
    "IntegrityError",
    "InvalidArgument",
    "KeyExists",
    "KeyInfo",
    "KeyNotFound",
    "KeyType",
    "Keystore",
    "NewKey",
    "Operation",
    "PolicyViolation",
    "Prompter",
    "Sealer",
    "SeedProcedures",
    "SnapshotCorrupt",
    "SnapshotTampered",
    "SnapshotTruncated",
    "SnapshotVersionError",
    "StrongroomError",
    "UnsupportedOperation",
    "Usage",
    "open",
]
