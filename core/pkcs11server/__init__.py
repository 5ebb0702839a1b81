"""`strongroom pkcs11-server`: p11-kit's RPC protocol over the keystore, so that any PKCS#11
application that loads p11-kit-client.so uses Strongroom keys (docs/pkcs11-server.md).

A face over `KeyAPI`, like the SSH agent: ck.py holds the PKCS#11 constants, wire.py the
protocol's encoding, objects.py maps keys to PKCS#11 objects, token.py answers the calls
(one `Connection` per client), server.py is the socket. The command is in
`strongroom.cli.pkcs11server`.
"""

from __future__ import annotations

from .server import Pkcs11Server
from .token import Connection, Settings, TokenSpec

__all__ = ["Connection", "Pkcs11Server", "Settings", "TokenSpec"]
