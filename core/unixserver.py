"""A Unix-socket server for the faces that serve local programs (`strongroom ssh-agent`,
`strongroom pkcs11-server`): the socket (0600, in a 0700 directory it makes when none is
given), an accept loop, one thread per client up to a cap, the peer's credentials from
SO_PEERCRED, and a clean shutdown from any thread or a signal handler.

A subclass says what a client gets (`serve_client`); this module knows nothing of keys or
protocols and imports only errors.
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

from .errors import InvalidArgument

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end of a Unix socket (Linux SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


class UnixSocketServer:
    """Listens on a Unix socket and runs `serve_client(conn)` in a thread per client.

    `prefix` and `name` make the default path, `<runtime dir>/<prefix>XXXX/<name>.<pid>`;
    at most `max_clients` are served at once, one more is closed at accept, so a flood of
    idle clients costs at most that many threads."""

    log = logging.getLogger("strongroom.unixserver")
    thread_name = "client"

    def __init__(self, path: Path | None, prefix: str, name: str, max_clients: int) -> None:
        self.max_clients = max_clients
        self._made_dir: Path | None = None
        self.path = self._choose_path(path, prefix, name)
        self._sock = self._bind(self.path)
        self._wake_r, self._wake_w = os.pipe()
        self._slots = threading.BoundedSemaphore(max_clients)
        self._stopping = threading.Event()

    def serve_client(self, conn: socket.socket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the socket -------------------------------------------------------------------------------
    def _choose_path(self, path: Path | None, prefix: str, name: str) -> Path:
        if path is None:  # like OpenSSH: a private directory of our own, under the runtime dir
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            base = runtime if runtime and os.path.isdir(runtime) else None
            self._made_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
            return self._made_dir / f"{name}.{os.getpid()}"
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
            except OSError:  # nobody listens: a stale socket of a server that died
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

    # -- serving ----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept clients until `shutdown()` (or an exception in the caller's thread)."""
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
                        self.log.warning("cannot accept a client now: %s", e.strerror)
                    continue
                self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            self.log.warning("too many clients (%d): one refused", self.max_clients)
            conn.close()
            return
        try:
            threading.Thread(
                target=self._run_client, args=(conn,), name=self.thread_name, daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._slots.release()
            conn.close()

    def _run_client(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.serve_client(conn)
        except OSError:  # the client went away mid-message
            pass
        finally:
            self._slots.release()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def shutdown(self) -> None:
        """Stop accepting (from any thread or a signal handler); `close()` cleans up."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def detach(self) -> None:
        """Close this process's copy of the socket, leaving the path to the process that
        serves it (the CLI's parent, after the fork)."""
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
