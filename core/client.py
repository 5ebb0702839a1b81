"""`strongroom.client`, kept for the names docs/server.md gives: the client is now
`strongroom.service.client` (and `connect()` is `strongroom.service.connect`). This module
only re-exports them."""

from __future__ import annotations

from .errors import NotPermitted, RateLimited, RequestTooLarge, VaultLocked
from .service import connect
from .service.client import TOKEN_ENV, RemoteBackend, RemoteKeystore, RemoteVault

__all__ = [
    "TOKEN_ENV",
    "NotPermitted",
    "RateLimited",
    "RemoteBackend",
    "RemoteKeystore",
    "RemoteVault",
    "RequestTooLarge",
    "VaultLocked",
    "connect",
]
