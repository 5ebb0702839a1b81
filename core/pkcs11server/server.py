"""The server's socket: a Unix socket (0600, in a 0700 directory it makes), one thread per
client, the peer's uid from SO_PEERCRED (another user's client is refused, root allowed).

Per connection: the version byte, then frames. A frame whose options or body exceed
`wire.MAX_OPTIONS` / `wire.MAX_BODY` closes the connection (skipping it would mean reading
it); a bad message inside a well-framed one gets CKR_DEVICE_ERROR. Each client has its own
`token.Connection`, so its sessions and object handles are invisible to the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import tempfile
import threading
from pathlib import Path

from ..api import KeyAPI
from ..errors import InvalidArgument
from . import wire
from .token import Connection, Settings

log = logging.getLogger("strongroom.pkcs11server")

MAX_CLIENTS = 128
"""Connections served at once; one more is closed at accept."""
_UCRED = struct.Struct("3i")


class Pkcs11Server:
    """Listens on a Unix socket and serves the keystore's tokens to this user's clients."""

    def __init__(
        self, ks: KeyAPI | None, settings: Settings | None, path: Path | None = None
    ) -> None:
        self.ks = ks
        """Set before `serve_forever` when the socket is bound first (the CLI binds it
        before it forks, and opens the keystore in the serving process)."""
        self.settings = settings
        self._made_dir: Path | None = None
        self.path = self._choose_path(path)
        self._sock = self._bind(self.path)
        self._wake_r, self._wake_w = os.pipe()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        """Serialises keystore calls: a Keystore in process is not for concurrent use by
        many threads of one connection pool (a RemoteKeystore has its own)."""

    @property
    def address(self) -> str:
        """What P11_KIT_SERVER_ADDRESS names."""
        return f"unix:path={self.path}"

    def _choose_path(self, path: Path | None) -> Path:
        if path is None:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            base = runtime if runtime and os.path.isdir(runtime) else None
            self._made_dir = Path(tempfile.mkdtemp(prefix="strongroom-p11-", dir=base))
            return self._made_dir / f"pkcs11.{os.getpid()}"
        path = Path(path).expanduser().absolute()
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
            self._made_dir = path.parent
        return path

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        if len(os.fsencode(path)) >= 108:
            raise InvalidArgument(f"the socket path is too long for a Unix socket: {path}")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise InvalidArgument(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:  # a stale socket of a server that died
                os.unlink(path)
            else:
                raise InvalidArgument(f"a server already listens on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is never, even briefly, open to others
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        return sock

    def serve_forever(self) -> None:
        """Accept clients until `shutdown()`."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    return
                try:
                    conn, _addr = self._sock.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("cannot accept a client now: %s", e.strerror)
                    continue
                self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("too many clients (%d): one refused", MAX_CLIENTS)
            conn.close()
            return
        try:
            threading.Thread(
                target=self._serve_client, args=(conn,), name="pkcs11-client", daemon=True
            ).start()
        except RuntimeError:
            self._slots.release()
            conn.close()

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            with conn:
                raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                pid, uid, _gid = _UCRED.unpack(raw)
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
                while not self._stopping.is_set():
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
        except OSError:  # the client went away mid-message
            pass
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        """Stop accepting (from any thread or a signal handler); `close()` cleans up."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def detach(self) -> None:
        """Close this process's copy of the socket (the CLI's parent, after the fork)."""
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close the socket and remove it (and the directory made for it)."""
        self._stopping.set()
        self.detach()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._made_dir is not None:
            with contextlib.suppress(OSError):
                self._made_dir.rmdir()


def _exact(conn: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None at end of stream."""
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(min(n - len(out), 1 << 20))
        if not chunk:
            return None
        out += chunk
    return bytes(out)
