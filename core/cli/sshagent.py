"""`strongroom ssh-agent`: serve the keystore's signing keys to SSH clients (docs/ssh-agent.md)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .. import config as config_mod
from ..errors import InvalidArgument
from ..sshagent import Agent, AgentServer, AgentSettings, KeyPolicy, host_fingerprint
from ._io import EXIT_OTHER, StrongroomCommand
from ._state import State, pass_state

_READY = b"ready\n"


@click.command("ssh-agent", cls=StrongroomCommand)
@click.option(
    "-a",
    "socket_path",
    metavar="SOCKET",
    help="Listen on this socket path (default: [ssh_agent] socket, else a new private "
    "directory in $XDG_RUNTIME_DIR or the temp dir).",
)
@click.option("-D", "foreground", is_flag=True, help="Stay in the foreground (do not detach).")
@click.option(
    "--keys",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Offer the keys whose names match this glob pattern (repeatable; replaces "
    "[ssh_agent] keys).",
)
@pass_state
def ssh_agent(
    state: State, socket_path: str | None, foreground: bool, patterns: tuple[str, ...]
) -> None:
    """Run an SSH agent whose keys stay in the keystore.

    Prints SSH_AUTH_SOCK for a shell to eval, like OpenSSH's ssh-agent, then detaches
    (unless -D). Offers the Ed25519, ECDSA P-256/P-384 and RSA signing keys that --keys or
    [ssh_agent] keys name, from any backend, in process or through --server.
    """
    cfg = config_mod.load(state.config).ssh_agent
    settings = AgentSettings(
        patterns=tuple(p for p in patterns if p) or tuple(cfg.keys),
        allow_add=cfg.allow_add,
        add_backend=cfg.add_backend,
        confirm=tuple(cfg.confirm),
        askpass=os.environ.get("SSH_ASKPASS") or None,
        policies=tuple(_policy(p) for p in cfg.policies),
    )
    if not settings.patterns and not settings.allow_add:
        raise InvalidArgument(
            "no keys to offer: pass --keys PATTERN or set [ssh_agent] keys (or allow_add)"
        )
    # Bound before the fork, so that the path printed is already being listened on; the
    # keystore is opened after it, in the agent's process (a PKCS#11 or TPM session does
    # not survive a fork).
    server = AgentServer(None, Path(socket_path) if socket_path else cfg.socket)
    if foreground:
        _serve(state, server, settings)
        return
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:  # the parent: wait until the agent serves, then tell the shell where it is
        os.close(ready_w)
        server.detach()
        with os.fdopen(ready_r, "rb") as ready:
            status = ready.read(len(_READY))
        if status != _READY:  # the agent failed, and printed why: exit with its code
            _, wait_status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(wait_status) or EXIT_OTHER)
        click.echo(_environment(server.path, pid), nl=False)
        return
    os.close(ready_r)
    os.setsid()
    _serve(state, server, settings, ready_fd=ready_w)


def _policy(p: config_mod.SshAgentPolicy) -> KeyPolicy:
    """A `[ssh_agent.policy."PATTERN"]` table as the agent keeps it (hosts as fingerprints)."""
    hosts = None
    if p.allowed_hosts is not None:
        try:
            hosts = frozenset(host_fingerprint(h) for h in p.allowed_hosts)
        except ValueError:
            raise InvalidArgument(
                f'[ssh_agent.policy."{p.pattern}"] allowed_hosts: a host key is not an '
                "Ed25519, ECDSA or RSA public key"
            ) from None
    uids = frozenset(p.allowed_uids) if p.allowed_uids is not None else None
    return KeyPolicy(p.pattern, p.confirm, hosts, uids)


def _environment(path: Path, pid: int) -> str:
    """What OpenSSH's agent prints for a Bourne shell to eval."""
    return (
        f"SSH_AUTH_SOCK={path}; export SSH_AUTH_SOCK;\n"
        f"SSH_AGENT_PID={pid}; export SSH_AGENT_PID;\n"
        f"echo Agent pid {pid};\n"
    )


def _serve(
    state: State, server: AgentServer, settings: AgentSettings, ready_fd: int | None = None
) -> None:
    """Open the keystore, say so (the environment, or `ready` to the waiting parent), serve
    until SIGTERM, SIGINT or SIGHUP, then remove the socket."""
    try:
        agent = Agent(state.keystore(), settings)
        agent.identities(strict=True)  # opens the keystore now: passphrase, PIN, token
        server.agent = agent
        if ready_fd is None:
            click.echo(_environment(server.path, os.getpid()), nl=False)
            sys.stdout.flush()
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("strongroom ssh-agent: %(message)s"))
            logger = logging.getLogger("strongroom.sshagent")
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        else:
            os.write(ready_fd, _READY)
            os.close(ready_fd)
            _to_dev_null()

        def stop(signum: int, frame: Any) -> None:
            server.shutdown()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        server.serve_forever()
    finally:
        server.close()


def _to_dev_null() -> None:
    """A detached agent keeps no terminal: stdin, stdout and stderr go to /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
