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

import logging
import os
import socket
import struct
from pathlib import Path

from ..unixserver import UnixSocketServer, peer_credentials
from . import wire
from .agent import Agent, Peer

log = logging.getLogger("strongroom.sshagent")

MAX_CLIENTS = 128
"""Connections served at once; one more is closed at accept, so a flood of idle clients
costs at most this many threads."""
_U32 = struct.Struct(">I")

__all__ = ["MAX_CLIENTS", "AgentServer", "peer_credentials"]


class AgentServer(UnixSocketServer):
    """Listens on a Unix socket and serves `agent` to every client of this user."""

    log = log
    thread_name = "ssh-agent-client"

    def __init__(self, agent: Agent | None, path: Path | None = None) -> None:
        self.agent = agent
        """Set before `serve_forever` when the socket is bound first (the CLI binds it
        before it forks, and opens the keystore in the agent process)."""
        super().__init__(path, "strongroom-ssh-", "agent", MAX_CLIENTS)

    def serve_client(self, conn: socket.socket) -> None:
        pid, uid = peer_credentials(conn)
        agent = self.agent
        if agent is None:
            return
        if uid not in (os.getuid(), 0) and uid not in agent.settings.other_uids():
            log.warning("refused a client of uid %d (pid %d)", uid, pid)
            return
        peer = Peer(pid, uid)
        buf = bytearray()  # what the client sent that is not answered yet
        while not self.stopping:
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
            if not buf and len(chunk) > 4:  # the usual case: one whole message per read
                (length,) = _U32.unpack_from(chunk)
                if len(chunk) == 4 + length and length <= wire.MAX_MESSAGE:
                    conn.sendall(agent.handle(chunk[4:], peer))
                    continue
            buf += chunk
