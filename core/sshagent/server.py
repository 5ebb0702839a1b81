"""The agent's socket: a Unix socket (0600, in a 0700 directory it makes), one thread per
client, the peer's credentials from SO_PEERCRED.

A client of another user is refused at accept unless a key's policy lists its uid
(`allowed_uids`; that client then sees those keys only). Root too may connect, as with
OpenSSH's agent: it can read this process's memory anyway. A frame longer than
`wire.MAX_MESSAGE` closes that connection; a bad message inside a well-framed one gets
SSH_AGENT_FAILURE. No client can stop the agent or delay another client's answer beyond
its own keystore call.
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

from ..errors import InvalidArgument
from . import wire
from .agent import Agent, Peer

log = logging.getLogger("strongroom.sshagent")

MAX_CLIENTS = 128
"""Connections served at once; one more is closed at accept, so a flood of idle clients
costs at most this many threads."""
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_U32 = struct.Struct(">I")


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end of a Unix socket (Linux SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


class AgentServer:
    """Listens on a Unix socket and serves `agent` to every client of this user."""

    def __init__(self, agent: Agent | None, path: Path | None = None) -> None:
        self.agent = agent
        """Set before `serve_forever` when the socket is bound first (the CLI binds it
        before it forks, and opens the keystore in the agent process)."""
        self._made_dir: Path | None = None
        self.path = self._choose_path(path)
        self._sock = self._bind(self.path)
        self._wake_r, self._wake_w = os.pipe()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = threading.Event()

    # -- the socket -------------------------------------------------------------------------------
    def _choose_path(self, path: Path | None) -> Path:
        if path is None:  # like OpenSSH: a private directory of our own, under the runtime dir
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            base = runtime if runtime and os.path.isdir(runtime) else None
            self._made_dir = Path(tempfile.mkdtemp(prefix="strongroom-ssh-", dir=base))
            return self._made_dir / f"agent.{os.getpid()}"
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
            except OSError:  # nobody listens: a stale socket of an agent that died
                os.unlink(path)
            else:
                raise InvalidArgument(f"an agent already listens on {path}")
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
                target=self._serve_client, args=(conn,), name="ssh-agent-client", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._slots.release()
            conn.close()

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            with conn:
                pid, uid = peer_credentials(conn)
                agent = self.agent
                if agent is None:
                    return
                if uid not in (os.getuid(), 0) and uid not in agent.settings.other_uids():
                    log.warning("refused a client of uid %d (pid %d)", uid, pid)
                    return
                peer = Peer(pid, uid)
                buf = bytearray()  # what the client sent that is not answered yet
                while not self._stopping.is_set():
                    need = 4
                    if len(buf) >= 4:
                        (length,) = _U32.unpack_from(buf)
                        if not 0 < length <= wire.MAX_MESSAGE:
                            log.info("closed a client (pid %d): a %d-byte message", pid, length)
                            return
                        need = 4 + length
                        if len(buf) >= need:
                            body = bytes(buf[4:need])
                            del buf[:need]
                            conn.sendall(agent.handle(body, peer))
                            continue
                    chunk = conn.recv(max(65536, need - len(buf)))
                    if not chunk:
                        return
                    buf += chunk
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
