"""The server's socket: a Unix socket (0600, in a 0700 directory it makes), one thread per
client, the peer's uid from SO_PEERCRED (another user's client is refused, root allowed).

Per connection: the version byte, then frames. A frame whose options or body exceed
`wire.MAX_OPTIONS` / `wire.MAX_BODY` closes the connection (skipping it would mean reading
it); a bad message inside a well-framed one gets CKR_DEVICE_ERROR. Each client has its own
`token.Connection`, so its sessions and object handles are invisible to the others.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

from ..api import KeyAPI
from ..unixserver import UnixSocketServer, peer_credentials
from . import wire
from .token import Connection, Settings

log = logging.getLogger("strongroom.pkcs11server")

MAX_CLIENTS = 128
"""Connections served at once; one more is closed at accept."""


class Pkcs11Server(UnixSocketServer):
    """Listens on a Unix socket and serves the keystore's tokens to this user's clients."""

    log = log
    thread_name = "pkcs11-client"

    def __init__(
        self, ks: KeyAPI | None, settings: Settings | None, path: Path | None = None
    ) -> None:
        self.ks = ks
        """Set before `serve_forever` when the socket is bound first (the CLI binds it
        before it forks, and opens the keystore in the serving process)."""
        self.settings = settings
        self._lock = threading.Lock()
        """Serialises keystore calls: a Keystore in process is not for concurrent use by
        many threads of one connection pool (a RemoteKeystore has its own)."""
        super().__init__(path, "strongroom-p11-", "pkcs11", MAX_CLIENTS)

    @property
    def address(self) -> str:
        """What P11_KIT_SERVER_ADDRESS names."""
        return f"unix:path={self.path}"

    def serve_client(self, conn: socket.socket) -> None:
        pid, uid = peer_credentials(conn)
        if uid not in (os.getuid(), 0):
            log.warning("refused a client of uid %d (pid %d)", uid, pid)
            return
        if self.ks is None or self.settings is None:
            return
        asked = _exact(conn, 1)
        if asked is None:
            return
        version = min(asked[0], wire.MAX_VERSION)
        conn.sendall(bytes([version]))
        client = Connection(self.ks, self.settings, version)
        while not self.stopping:
            head = _exact(conn, wire.HEADER.size)
            if head is None:
                return
            code, olen, blen = wire.HEADER.unpack(head)
            if code == 0 or olen > wire.MAX_OPTIONS or blen > wire.MAX_BODY:
                log.info("closed a client (pid %d): a bad frame header", pid)
                return
            options = _exact(conn, olen)
            body = _exact(conn, blen)
            if options is None or body is None:
                return
            with self._lock:
                answer = client.handle(body)
            conn.sendall(wire.frame(code, answer, options))


def _exact(conn: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None at end of stream."""
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(min(n - len(out), 1 << 20))
        if not chunk:
            return None
        out += chunk
    return bytes(out)
