"""`strongroom ssh-agent`: serve the keystore's signing keys to SSH clients (docs/ssh-agent.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import config as config_mod
from ..errors import InvalidArgument
from ..secrets import Prompter, terminal_prompter, tty_available
from ._daemon import detach_or_serve, serve_until_signal
from ._io import StrongroomCommand
from ._state import State, pass_state

# strongroom.sshagent is imported by the command that uses it, not by every start of the
# CLI (it is a fifth of the CLI's import time).
if TYPE_CHECKING:
    from ..sshagent import AgentServer, AgentSettings, KeyPolicy


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
    from ..sshagent import AgentServer, AgentSettings

    cfg = config_mod.load(state.config).ssh_agent
    policies = tuple(_policy(p, cfg.known_hosts) for p in cfg.policies)
    settings = AgentSettings(
        patterns=tuple(p for p in patterns if p) or tuple(cfg.keys),
        allow_add=cfg.allow_add,
        add_backend=cfg.add_backend,
        confirm=tuple(cfg.confirm),
        askpass=os.environ.get("SSH_ASKPASS") or None,
        policies=policies,
        revoked_host_keys=frozenset(k for p in policies for k in p.revoked_host_keys),
    )
    if not settings.patterns and not settings.allow_add:
        raise InvalidArgument(
            "no keys to offer: pass --keys PATTERN or set [ssh_agent] keys (or allow_add)"
        )
    state.prompter = _prompter(settings.askpass)
    # Bound before the fork, so that the path printed is already being listened on; the
    # keystore is opened after it, in the agent's process (a PKCS#11 or TPM session does
    # not survive a fork).
    server = AgentServer(None, Path(socket_path) if socket_path else cfg.socket)
    detach_or_serve(
        server,
        foreground,
        lambda pid: _environment(server.path, pid),
        lambda ready_fd: _serve(state, server, settings, ready_fd),
    )


def _policy(p: config_mod.SshAgentPolicy, known_hosts: Sequence[str] | None = None) -> KeyPolicy:
    """A `[ssh_agent.policy."PATTERN"]` table as the agent keeps it: hosts as fingerprints,
    host names looked up in the known_hosts files (`[ssh_agent] known_hosts`) now."""
    from ..sshagent import KeyPolicy
    from ..sshagent.knownhosts import resolve_allowed_hosts

    hosts = None
    cas: frozenset[tuple[str, bytes]] = frozenset()
    revoked: frozenset[bytes] = frozenset()
    if p.allowed_hosts is not None:
        try:
            hosts, cas, revoked = resolve_allowed_hosts(p.allowed_hosts, known_hosts)
        except ValueError as e:
            raise InvalidArgument(f'[ssh_agent.policy."{p.pattern}"] allowed_hosts: {e}') from None
    uids = frozenset(p.allowed_uids) if p.allowed_uids is not None else None
    return KeyPolicy(p.pattern, p.confirm, hosts, uids, cas, revoked)


def _prompter(askpass: str | None) -> Prompter | None:
    """How the agent's keystore asks for a `prompt` secret (a PIN, the vault passphrase):
    through $SSH_ASKPASS when there is no terminal (a detached agent has none) or
    SSH_ASKPASS_REQUIRE=force, else on the terminal; SSH_ASKPASS_REQUIRE=never keeps the
    terminal only, as with OpenSSH's tools."""
    require = os.environ.get("SSH_ASKPASS_REQUIRE", "")
    if not askpass or require == "never":
        return None
    from ..sshagent.agent import askpass_prompter

    ask = askpass_prompter(askpass)

    def prompter(prompt: str, confirm: bool) -> str:
        if require == "force" or not tty_available():
            return ask(prompt, confirm)
        return terminal_prompter(prompt, confirm)

    return prompter


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
    """Open the keystore, then serve until SIGTERM, SIGINT or SIGHUP (cli/_daemon.py)."""
    try:
        from ..sshagent import Agent

        agent = Agent(state.keystore(), settings)
        agent.identities(strict=True)  # opens the keystore now: passphrase, PIN, token
    except BaseException:
        server.close()
        raise
    server.agent = agent
    serve_until_signal(
        server,
        ready_fd,
        _environment(server.path, os.getpid()),
        "strongroom.sshagent",
        "strongroom ssh-agent",
    )
