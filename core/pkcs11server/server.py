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
        before it forks, and opens the keystore in the serving process). None against the
        service when C_Login's PIN is a tenant's token and the server has none of its own."""
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
        if self.settings is None or (self.ks is None and self.settings.login is None):
            return
        buf = bytearray()  # what the client sent that is not answered yet
        if not _fill(conn, buf, 1):
            return
        version = min(buf[0], wire.MAX_VERSION)
        del buf[:1]
        conn.sendall(bytes([version]))
        client = Connection(self.ks, self.settings, version)
        try:
            self._serve_frames(conn, pid, buf, client)
        finally:
            with self._lock:
                client.close()  # its logins' clients of the service

    def _serve_frames(
        self, conn: socket.socket, pid: int, buf: bytearray, client: Connection
    ) -> None:
        size = wire.HEADER.size
        while not self.stopping:
            if not _fill(conn, buf, size):
                return
            code, olen, blen = wire.HEADER.unpack_from(buf)
            if code == 0 or olen > wire.MAX_OPTIONS or blen > wire.MAX_BODY:
                log.info("closed a client (pid %d): a bad frame header", pid)
                return
            end = size + olen + blen
            if not _fill(conn, buf, end):
                return
            options = bytes(buf[size : size + olen])
            body = bytes(buf[size + olen : end])
            del buf[:end]
            with self._lock:
                answer = client.handle(body)
            conn.sendall(wire.frame(code, answer, options))


def _fill(conn: socket.socket, buf: bytearray, n: int) -> bool:
    """Read until `buf` holds at least n bytes (one recv of what is there, usually a whole
    frame); False at end of stream. n is bounded by the frame limits checked above."""
    while len(buf) < n:
        chunk = conn.recv(max(65536, min(n - len(buf), 1 << 20)))
        if not chunk:
            return False
        buf += chunk
    return True
