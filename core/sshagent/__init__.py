"""`strongroom ssh-agent`: an SSH agent whose keys stay in the keystore (docs/ssh-agent.md).

A face over `KeyAPI`, like the service: wire.py is the protocol's encoding, keys.py maps
keystore keys to SSH keys and signatures, policy.py says who may use a key and where,
knownhosts.py turns host names into host keys,
agent.py answers requests, server.py is the socket. The command is in `strongroom.cli.sshagent`.
"""

from __future__ import annotations

from .agent import Agent, AgentSettings, Peer
from .policy import KeyPolicy, host_fingerprint
from .server import AgentServer

__all__ = ["Agent", "AgentServer", "AgentSettings", "KeyPolicy", "Peer", "host_fingerprint"]
