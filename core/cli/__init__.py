"""The `strongroom` command line: the root group, its error handling and `main()`.

The commands are in the modules of this package, one per group: keys.py and keyops.py
(`key`), vault.py, audit.py, service.py (`serve`, `tenant`, `policy`), sshagent.py
(`ssh-agent`) and misc.py (`init`, `backends`, `doctor`, `random`, `encrypt`, `decrypt`,
`attest`). Errors are one line on
stderr, and each error class has its exit code in `EXIT_CODES` (docs/cli.md): 0 ok,
1 signature or attestation invalid, 2 usage error, 3 key not found, 4 authentication
failed, 5 unsupported operation, 6 backend unavailable, 7 device locked, 8 policy violation,
9 snapshot or data corrupt (a tampered audit log too), 10 key exists, 11 config error,
12 other error, 13 the audit record could not be written (the operation was refused),
14 the data directory cannot be written.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click
from cryptography.exceptions import InvalidSignature

from .. import __version__
from ..api import KeyAPI
from ..errors import (
    AttestationInvalid,
    AuditUnavailable,
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    SnapshotCorrupt,
    StorageError,
    StrongroomError,
    TenantNotFound,
    UnsupportedOperation,
)
from ..secrets import new_passphrase_policy
from ..types import Usage
from . import audit, certs, keyops, keys, misc, pkcs11server, service, sshagent, vault
from ._io import (
    CONFIG_HELP,
    DEBUG_HELP,
    EXIT_BAD_SIGNATURE,
    EXIT_OK,
    EXIT_OTHER,
    EXIT_USAGE,
    JSON_HELP,
    SERVER_HELP,
    StrongroomCommand,
    StrongroomSubGroup,
    fail,
)
from ._state import State

if TYPE_CHECKING:
    from ..keystore import Keystore
    from ..service.client import RemoteKeystore

    def _both_serve_the_key_api(local: Keystore, remote: RemoteKeystore) -> list[KeyAPI]:
        """Never called: mypy checks here that both faces satisfy `KeyAPI`."""
        return [local, remote]


EXIT_CODES: Mapping[type[StrongroomError], int] = {
    AttestationInvalid: 1,
    InvalidArgument: 2,
    KeyNotFound: 3,
    TenantNotFound: 3,
    AuthenticationFailed: 4,
    UnsupportedOperation: 5,
    BackendUnavailable: 6,
    DeviceLocked: 7,
    PolicyViolation: 8,
    SnapshotCorrupt: 9,
    IntegrityError: 9,
    KeyExists: 10,
    ConfigError: 11,
    StrongroomError: EXIT_OTHER,
    AuditUnavailable: 13,
    StorageError: 14,
}
"""The exit code of each error (docs/cli.md, "Errors and exit codes"). A subclass not listed
has its nearest listed base's code (`exit_code_of`): `PresenceTimeout` is 4, `KeyDisabled` 8,
`DataTruncated` 9, and any other `StrongroomError` 12."""


def exit_code_of(error: type[StrongroomError]) -> int:
    """The code of the first class in `error`'s method resolution order that `EXIT_CODES`
    lists: the most specific one, as attribute lookup found the classes' own codes before."""
    for cls in error.__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_OTHER


def _traceback_if_debug(ctx: click.Context) -> None:
    """With --debug, print the traceback; the one-line error and its exit code still follow."""
    state = ctx.find_object(State)
    if state.debug if state is not None else "--debug" in sys.argv[1:]:
        traceback.print_exc()


def _error_line(e: StrongroomError, state: State | None) -> str:
    if isinstance(e, AuthenticationFailed) and state is not None and state.sends_no_credentials:
        return (
            f"error: {e}; the CLI sent no API token: set $STRONGROOM_TOKEN "
            "(or [server] token in the config)"
        )
    return f"error: {e}"


class StrongroomGroup(click.Group):
    """Turns errors into one line and a distinct exit code."""

    command_class = StrongroomCommand
    group_class = StrongroomSubGroup

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidSignature:
            fail("signature invalid", EXIT_BAD_SIGNATURE)
        except StrongroomError as e:
            _traceback_if_debug(ctx)
            fail(_error_line(e, ctx.find_object(State)), exit_code_of(type(e)))
        except (OSError, MemoryError) as e:
            _traceback_if_debug(ctx)
            fail(f"error: {e}", EXIT_OTHER)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: still one line and a code that is not "bad signature"
            _traceback_if_debug(ctx)
            fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug)", EXIT_OTHER)
        finally:
            state = ctx.find_object(State)
            if state is not None:
                state.close()


@click.group(cls=StrongroomGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", metavar="FILE", envvar="STRONGROOM_CONFIG", help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@click.option("--server", metavar="URL", envvar="STRONGROOM_SERVER", help=SERVER_HELP)
@click.version_option(__version__, prog_name="strongroom")
@click.pass_context
def cli(
    ctx: click.Context, config: str | None, as_json: bool, debug: bool, server: str | None
) -> None:
    """Strongroom: one key API over TPM, PKCS#11, PIV, FIDO2 and a guarded software vault.

    The global options (--config, --json, --debug, --server) may also follow the command:
    `strongroom key list --json`.
    """
    ctx.obj = State(config, as_json, debug, server)
    # A vault created on first use by any command gets the same minimum as `init`.
    ctx.with_resource(
        new_passphrase_policy(
            "use a longer one, or create the vault with `strongroom init --allow-weak`"
        )
    )


for command in (
    misc.init,
    misc.backends,
    misc.doctor,
    misc.random_cmd,
    misc.encrypt_cmd,
    misc.decrypt_cmd,
    misc.attest,
    keys.key,
    vault.vault,
    audit.audit,
    service.serve,
    service.tenant,
    service.policy,
    sshagent.ssh_agent,
    pkcs11server.pkcs11_server,
):
    cli.add_command(command)
# The `key` commands that pass data through a key are in keyops.py.
for command in (
    keyops.key_sign,
    keyops.key_verify,
    keyops.key_encrypt,
    keyops.key_decrypt,
    keyops.key_rewrap,
    certs.key_csr,
    certs.key_certificate,
    certs.key_cert,
):
    keys.key.add_command(command)


_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point. Usage errors, too, are one line on stderr (exit 2)."""
    try:
        rv = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="strongroom",
            standalone_mode=False,
        )
    except _NO_ARGS_IS_HELP as e:  # bare `strongroom`: the help text, as click prints it
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(f"usage: {' '.join(e.format_message().split())}{hint}", EXIT_USAGE)
    except click.ClickException as e:
        fail(f"error: {' '.join(e.format_message().split())}", e.exit_code)
    except click.Abort:
        fail("aborted", EXIT_OTHER)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


__all__ = ["EXIT_CODES", "State", "Usage", "cli", "exit_code_of", "main"]
