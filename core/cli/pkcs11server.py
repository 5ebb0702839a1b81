"""`strongroom pkcs11-server`: serve the keystore's keys to PKCS#11 applications through
p11-kit's client module (docs/pkcs11-server.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import config as config_mod
from ..api import KeyAPI
from ..errors import ConfigError, InvalidArgument
from ..secrets import SecretSource
from ._daemon import detach_or_serve, serve_until_signal
from ._io import StrongroomCommand
from ._state import State, pass_state

# strongroom.pkcs11server is imported by the command, not by every start of the CLI.
if TYPE_CHECKING:
    from ..pkcs11server import Pkcs11Server


@click.command("pkcs11-server", cls=StrongroomCommand)
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="Listen on this socket path (default: [pkcs11_server] socket, else a new private "
    "directory in $XDG_RUNTIME_DIR or the temp dir).",
)
@click.option("-D", "foreground", is_flag=True, help="Stay in the foreground (do not detach).")
@pass_state
def pkcs11_server(state: State, socket_path: str | None, foreground: bool) -> None:
    """Serve the keystore's keys over p11-kit's RPC protocol.

    Prints P11_KIT_SERVER_ADDRESS for a shell to eval, like `p11-kit server`, then detaches
    (unless -D). Applications load p11-kit-client.so and see one slot per token of
    [pkcs11_server]; C_Login takes [pkcs11_server] pin. Works in process and through --server;
    there, without [pkcs11_server] pin, C_Login takes a tenant's API token.
    """
    from ..pkcs11server import Pkcs11Server, Settings, TokenSpec

    cfg = config_mod.load(state.config).pkcs11_server
    if not cfg.tokens:
        raise ConfigError("no keys to offer: set [pkcs11_server] keys (or tokens)")
    tokens = tuple(TokenSpec(label, tuple(p)) for label, p in cfg.tokens.items())
    if cfg.pin is None:
        if not state.remote():
            raise ConfigError(
                "set [pkcs11_server] pin (env:NAME or file:PATH): C_Login checks it "
                "(against a service, with --server, C_Login may take an API token instead)"
            )
        settings = Settings(
            tokens,
            backend=cfg.backend,
            login=_tenant_client(state),
            allow_destroy=cfg.allow_destroy,
        )
    else:
        pin = SecretSource([cfg.pin], "the PKCS#11 PIN: ").get()
        if not pin:
            raise InvalidArgument("the PKCS#11 PIN is empty")
        settings = Settings(tokens, pin=pin, backend=cfg.backend, allow_destroy=cfg.allow_destroy)
    # Bound before the fork, so that the address printed is already being listened on; the
    # keystore is opened after it, in the serving process (a PKCS#11 or TPM session does
    # not survive a fork).
    server = Pkcs11Server(None, settings, Path(socket_path) if socket_path else cfg.socket)
    detach_or_serve(
        server,
        foreground,
        lambda pid: _environment(server.address),
        lambda ready_fd: _serve(state, server, ready_fd),
    )


def _tenant_client(state: State) -> Callable[[str], KeyAPI]:
    """What C_Login calls with the PIN against a service: a client of it with that token."""

    def login(token: str) -> KeyAPI:
        from ..service import connect

        return connect(state.server, token=token, config=state.config)

    return login


def _has_credentials(state: State) -> bool:
    """Whether the client of the service has a token or certificate of its own (then its
    keys' public objects are visible before C_Login)."""
    state.service()
    return not state.sends_no_credentials


def _environment(address: str) -> str:
    """What `p11-kit server` prints for a Bourne shell to eval."""
    return f"P11_KIT_SERVER_ADDRESS={address}; export P11_KIT_SERVER_ADDRESS;\n"


def _serve(state: State, server: Pkcs11Server, ready_fd: int | None = None) -> None:
    """Open the keystore, then serve until SIGTERM, SIGINT or SIGHUP (cli/_daemon.py)."""
    try:
        ks: KeyAPI | None = None
        assert server.settings is not None
        if server.settings.login is None or _has_credentials(state):
            ks = state.keystore()
            ks.keys()  # opens the keystore now: passphrase, PIN, token
    except BaseException:
        server.close()
        raise
    server.ks = ks
    serve_until_signal(
        server,
        ready_fd,
        _environment(server.address),
        "strongroom.pkcs11server",
        "strongroom pkcs11-server",
    )
