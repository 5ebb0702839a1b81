"""The state every command shares: the global options and the keystore they open."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .. import config as config_mod
from ..api import KeyAPI
from ..errors import UnsupportedOperation
from ..keystore import Keystore
from ..secrets import Prompter

if TYPE_CHECKING:
    from ..service.client import RemoteKeystore


class State:
    """Options shared by every command."""

    def __init__(
        self, config: str | None, as_json: bool, debug: bool, server: str | None = None
    ) -> None:
        self.config = config
        self.json = as_json
        self.debug = debug
        self.server = server
        self.sends_no_credentials = False
        """Set for a client of the service that has no token and no client certificate."""
        self._ks: KeyAPI | None = None
        self._local: Keystore | None = None
        self._remote: RemoteKeystore | None = None
        self.prompter: Prompter | None = None
        """How the in-process keystore asks for `prompt` secrets (None: the terminal); set
        before the keystore is opened (`ssh-agent` asks through $SSH_ASKPASS)."""

    def remote(self) -> bool:
        """Whether commands go to a running service: --server, else `[server] url`."""
        if self.server is None:
            url = config_mod.load(self.config).server.url
            self.server = url or ""
        return bool(self.server)

    def keystore(self) -> KeyAPI:
        """The key API: the in-process keystore, or with a service configured, a client of
        the service (`strongroom.connect`)."""
        if self._ks is None:
            self._ks = self.service() if self.remote() else self._open_local()
        return self._ks

    def service(self) -> RemoteKeystore:
        """The client of the configured service (for the key API and the admin commands)."""
        if self._remote is None:
            from ..service import connect
            from ..service.client import TOKEN_ENV

            settings = config_mod.load(self.config).server
            self.sends_no_credentials = (
                settings.token is None
                and not os.environ.get(TOKEN_ENV)
                and settings.client_cert is None
            )
            self._remote = connect(self.server, config=self.config)
            self._ks = self._remote
        return self._remote

    def local(self, command: str) -> Keystore:
        """The in-process keystore, for a command outside the key API (vault, audit, seed
        procedures, envelopes, trim, purge). With a service configured, such a command is
        refused here, in one place, rather than run against the wrong keystore."""
        if self.remote():
            raise UnsupportedOperation(
                "service",
                command,
                None,
                "not offered through the service; run it on the service host without --server",
            )
        return self._open_local()

    def _open_local(self) -> Keystore:
        if self._local is None:
            self._local = Keystore(
                config_mod.load(self.config), prompter=self.prompter, presence=tell_user
            )
            self._ks = self._local
        return self._local

    def local_keystore(self) -> Keystore:
        """The in-process keystore, even when a service is configured (`serve` itself)."""
        self.server = ""
        return self._open_local()

    def close(self) -> None:
        if self._ks is not None:
            self._ks.close()
        self._ks = self._local = self._remote = None

    def emit(self, data: Any, text: str | Callable[[], str] | None = None) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif text is not None:
            click.echo(text() if callable(text) else text)


pass_state = click.make_pass_decorator(State)


def tell_user(message: str) -> None:
    """Presence prompts from backends ("touch your security key") go to stderr at once."""
    click.echo(message, err=True)
