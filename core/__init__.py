"""Strongroom: one key API over TPM 2.0, PKCS#11, PIV, FIDO2 and a guarded software vault.

import strongroom

with strongroom.open() as ks:
    ks.generate("signer", "ed25519")
    sig = ks.sign("signer", b"data")
    ks.verify("signer", b"data", sig)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import config as _config
from .api import BackendStatus, KeyAPI
from .backend import (
    Attester,
    Backend,
    BackendContext,
    ConfigKey,
    ExistingKey,
    NewKey,
    PresencePrompt,
    Sealer,
    SeedProcedures,
)
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
    PresenceTimeout,
    RollbackDetected,
    SnapshotCorrupt,
    SnapshotTampered,
    SnapshotTruncated,
    SnapshotVersionError,
    StorageError,
    StrongroomError,
    UnsupportedOperation,
)
from .keystore import Keystore

if TYPE_CHECKING:
    from .service.client import RemoteKeystore
from .secrets import Prompter
from .types import KeyInfo, KeyType, Operation, Usage

__version__ = "0.1.0"


def open(
    config: str | os.PathLike[str] | None = None,
    *,
    actor: str | None = None,
    prompter: Prompter | None = None,
    presence: PresencePrompt | None = None,
) -> Keystore:
    """Open the keystore described by `config`, $STRONGROOM_CONFIG, or the embedded default.

    `prompter` asks for secrets configured as `prompt`; `presence(message)` is called when a
    device waits for the user, e.g. "touch your security key".
    """
    return Keystore(_config.load(config), actor=actor, prompter=prompter, presence=presence)


def connect(url: str | None = None, **options: object) -> RemoteKeystore:
    """Connect to a running `strongroom serve`: the same key API, over the wire.

    `url` is unix:PATH or https://HOST:PORT (default: `[server] url` in the config, else the
    service's socket in the data dir); see `strongroom.service.connect` for the options."""
    from .service import connect as _connect

    return _connect(url, **options)  # type: ignore[arg-type]


__all__ = [
    "Attester",
    "AuthenticationFailed",
    "Backend",
    "BackendContext",
    "BackendStatus",
    "BackendUnavailable",
    "ConfigError",
    "ConfigKey",
    "connect",
    "DeviceLocked",
    "ExistingKey",
    "GuardedMemoryError",
    "IntegrityError",
    "InvalidArgument",
    "KeyExists",
    "KeyInfo",
    "KeyNotFound",
    "KeyAPI",
    "KeyType",
    "Keystore",
    "NewKey",
    "Operation",
    "PolicyViolation",
    "PresencePrompt",
    "PresenceTimeout",
    "Prompter",
    "Sealer",
    "SeedProcedures",
    "SnapshotCorrupt",
    "RollbackDetected",
    "SnapshotTampered",
    "SnapshotTruncated",
    "SnapshotVersionError",
    "StorageError",
    "StrongroomError",
    "UnsupportedOperation",
    "Usage",
    "open",
]
