"""The `strongroom` command line. Errors are one line on stderr; exit codes are documented
in docs/cli.md: 0 ok, 1 signature invalid, 2 usage error, 3 key not found, 4 authentication
failed, 5 unsupported operation, 6 backend unavailable, 7 device locked, 8 policy violation,
9 snapshot or data corrupt (a tampered audit log too), 10 key exists, 11 config error,
12 other error, 13 the audit record could not be written (the operation was refused).
Exit 1 also means an attestation statement failed to verify.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import os
import resource
import stat
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol, cast

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from . import __version__, algorithms, strictjson
from . import config as config_mod
from .api import KeyAPI
from .backend import VaultControl
from .errors import (
    AttestationInvalid,
    AuthenticationFailed,
    InvalidArgument,
    StrongroomError,
    UnsupportedOperation,
)
from .keystore import Keystore, vault_restore
from .secrets import (
    NEW_PASSPHRASE_MIN_LENGTH,
    SecretSource,
    check_new_passphrase,
    new_passphrase_policy,
    validate_reference,
)
from .types import KeyInfo, KeyType, Usage

if TYPE_CHECKING:
    from .service.client import RemoteKeystore

    def _both_serve_the_key_api(local: Keystore, remote: RemoteKeystore) -> list[KeyAPI]:
        """Never called: mypy checks here that both faces satisfy `KeyAPI`."""
        return [local, remote]


EXIT_OK = 0
EXIT_BAD_SIGNATURE = 1
EXIT_USAGE = 2


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
            from .service import connect
            from .service.client import TOKEN_ENV

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
            self._local = Keystore(config_mod.load(self.config), presence=tell_user)
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


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"strongroom: {message}", err=True)
    sys.exit(code)


def read_input(path: str | None) -> bytes:
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None


STREAM_MIN = 256 * 1024
"""An ECDSA or RSA signature over more input than this is made from a digest hashed here in
a stream (`prehashed`): the same signature, without holding the input in memory or sending
it to the service."""


def signature_input(ks: KeyAPI, name: str, path: str | None, digest: bool) -> tuple[bytes, bool]:
    """What `key sign`/`key verify` pass on: the input, or its digest; and whether it is one.

    With `digest` the input already is the digest. Otherwise a short input is passed whole;
    a longer one is hashed in a stream when the key signs digests (ECDSA, RSA), and read
    whole for Ed25519, HMAC and FIDO keys, which sign the message itself.
    """
    if digest:
        return read_input(path), True
    stdin = path in (None, "-")
    try:
        f = sys.stdin.buffer if stdin else open(str(path), "rb")
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    try:
        head = f.read(STREAM_MIN + 1)
        if len(head) <= STREAM_MIN:
            return head, False
        try:
            key_type = ks.info(name).type
        except StrongroomError:  # e.g. a service identity allowed to sign but not to read
            return _whole(f, head), False
        if not algorithms.signs_digests(key_type):
            return _whole(f, head), False
        hasher = hashlib.new(algorithms.hash_name(key_type), head)
        del head
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
        return hasher.digest(), True
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    finally:
        if not stdin:
            f.close()


def _whole(f: BinaryIO, head: bytes) -> bytes:
    """The whole input, of which `head` was read already, in one buffer: read again from the
    start where the input can seek, rather than joined (which needs twice the memory)."""
    if f.seekable():
        f.seek(-len(head), io.SEEK_CUR)
        return f.read()
    return b"".join([head, *iter(lambda: f.read(1 << 20), b"")])


MAX_KEY_INPUT = 64 * 1024


def read_secret_into(path: str | None, buf: bytearray) -> int:
    """Read key material straight into `buf`, with no intermediate `bytes` copies."""
    stdin = path in (None, "-")
    try:
        f = open(0 if stdin else str(path), "rb", buffering=0, closefd=not stdin)
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    size = 0
    with f, memoryview(buf) as view:
        while size < len(buf):
            n = f.readinto(view[size:])
            if not n:
                break
            size += n
    if size > MAX_KEY_INPUT:
        raise InvalidArgument(f"key material is larger than {MAX_KEY_INPUT} bytes")
    return size


def _binary_refused(what: str) -> click.UsageError:
    return click.UsageError(
        f"not writing {what} to the terminal: it is binary; give --out FILE, "
        "or --out - to write it to the terminal anyway",
        click.get_current_context(silent=True),
    )


def refuse_binary_on_terminal(out: str | None, what: str) -> None:
    """Binary output goes to a terminal only when asked for with `--out -`: it would garble
    the terminal, and a secret would sit in its scrollback. Checked before any work."""
    if out is None and sys.stdout.isatty():
        raise _binary_refused(what)


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\t\n\r" for c in text)


def is_text(data: bytes) -> bool:
    """UTF-8 without control characters (escape sequences included): safe on a terminal."""
    try:
        return _printable(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


class _TerminalText:
    """stdout at a terminal for decrypted data as it streams: text passes, and the first
    chunk that is not text is refused before it is written."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            text = self._decoder.decode(bytes(data))
        except UnicodeDecodeError:
            raise _binary_refused("the decrypted data") from None
        if not _printable(text):
            raise _binary_refused("the decrypted data")
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()


def write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        out: BinaryIO = sys.stdout.buffer
        out.write(data)
        out.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if os.fstat(fd).st_mode & 0o077:  # an existing file keeps its mode; a key must not
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A plain aligned table."""
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def key_rows(keys: Sequence[KeyInfo]) -> list[list[str]]:
    return [
        [
            k.name,
            k.type.value,
            k.backend,
            ",".join(sorted(u.value for u in k.usage)),
            "yes" if k.exportable else "no",
            k.created.isoformat() if k.created else "",
        ]
        for k in keys
    ]


KEY_HEADERS = ["NAME", "TYPE", "BACKEND", "USAGE", "EXPORTABLE", "CREATED"]


def _traceback_if_debug(ctx: click.Context) -> None:
    """With --debug, print the traceback; the one-line error and its exit code still follow."""
    state = ctx.find_object(State)
    if state.debug if state is not None else "--debug" in sys.argv[1:]:
        traceback.print_exc()


CONFIG_HELP = "Config file (default: $STRONGROOM_CONFIG, then the user config dir)."
JSON_HELP = "Print machine-readable JSON."
DEBUG_HELP = "Show tracebacks on errors."
SERVER_HELP = (
    "Use a running `strongroom serve` (unix:PATH or https://HOST:PORT); default: "
    "[server] url in the config, else in-process. The token: $STRONGROOM_TOKEN or [server] token."
)
_GLOBAL_ATTRIBUTES = {"config": "config", "as_json": "json", "debug": "debug", "server": "server"}


def _store_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command: it overrides the one given before."""
    if value is None or value is False or param.name is None:
        return
    state = ctx.find_object(State)
    if state is not None:
        setattr(state, _GLOBAL_ATTRIBUTES[param.name], value)


def _global_options() -> list[click.Parameter]:
    """The top-level options, accepted again after any command or group (`key list --json`).
    No envvar here: the environment is read once, by the top level."""
    common: dict[str, Any] = {"expose_value": False, "callback": _store_global}
    return [
        click.Option(["--config", "config"], metavar="FILE", help=CONFIG_HELP, **common),
        click.Option(["--json", "as_json"], is_flag=True, help=JSON_HELP, **common),
        click.Option(["--debug", "debug"], is_flag=True, help=DEBUG_HELP, **common),
        click.Option(["--server", "server"], metavar="URL", help=SERVER_HELP, **common),
    ]


class StrongroomCommand(click.Command):
    """A command that also takes the global options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_global_options())


class StrongroomSubGroup(click.Group):
    """A command group (`key`, `vault`, ...) whose commands take the global options too."""

    command_class = StrongroomCommand
    group_class = type  # nested groups are of this class as well

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_global_options())


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
            fail(_error_line(e, ctx.find_object(State)), e.exit_code)
        except (OSError, MemoryError) as e:
            _traceback_if_debug(ctx)
            fail(f"error: {e}", 12)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: still one line and a code that is not "bad signature"
            _traceback_if_debug(ctx)
            fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug)", 12)
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


def _allow_weak(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.with_resource(
        new_passphrase_policy(None if value else "use a longer one, or give --allow-weak")
    )


allow_weak_option = click.option(
    "--allow-weak",
    is_flag=True,
    expose_value=False,
    callback=_allow_weak,
    help=f"Accept a new passphrase shorter than {NEW_PASSPHRASE_MIN_LENGTH} characters.",
)


# -- top level ---------------------------------------------------------------------------------
@cli.command()
@allow_weak_option
@pass_state
def init(state: State) -> None:
    """Create the software vault (asks for a new passphrase)."""
    vault = _vault(state, "init")
    vault.initialize()
    status = vault.vault_status()
    state.emit(status, f"created vault at {status['path']}")


@cli.command()
@pass_state
def backends(state: State) -> None:
    """List configured backends: status, reason and capabilities."""
    statuses = state.keystore().backends()
    data = [s.to_dict() for s in statuses]

    def text() -> str:
        rows = []
        for s in statuses:
            types = sorted({t.value for t, _ in s.capabilities})
            rows.append(
                [
                    s.name,
                    s.type,
                    "available" if s.available else "unavailable",
                    ", ".join(types) if s.available else (s.reason or ""),
                ]
            )
        return table(rows, ["NAME", "TYPE", "STATUS", "KEY TYPES / REASON"])

    state.emit(data, text)


def _core_limit(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def _dumpable() -> bool | None:
    """prctl(PR_GET_DUMPABLE), or None where it cannot be asked (not Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        value = int(libc.prctl(3, 0, 0, 0, 0))  # 3: PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return None
    return None if value < 0 else value != 0


@cli.command()
@pass_state
def doctor(state: State) -> None:
    """Check the native extension, the mlock limit, memfd_secret, the config, core dumps
    and every backend."""
    # Opening the keystore turns core dumps off: note what the process started with first.
    core_at_start = resource.getrlimit(resource.RLIMIT_CORE)[0]
    dumpable_at_start = _dumpable()
    checks: list[dict[str, str]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append(
            {
                "check": name,
                "status": {True: "ok", False: "problem", None: "note"}[ok],
                "detail": detail,
            }
        )

    try:
        from .memory import memlock_status  # needs the native extension
    except ImportError as e:
        check("native extension", False, f"not built ({e}); run pip install -e .")
    else:
        check("native extension", True, "strongroom._native is built")
        mem = memlock_status()
        limit = "unlimited" if mem.soft_limit is None else f"{mem.soft_limit // 1024} KiB"
        check(
            "mlock limit",
            mem.mlock_failures == 0,
            f"RLIMIT_MEMLOCK {limit}, {mem.locked_bytes} bytes locked, "
            f"{mem.mlock_failures} mlock failures",
        )
        if mem.secretmem_enabled and mem.secretmem_available:
            check("memfd_secret", True, "guarded pages leave the kernel's direct map")
        else:
            check(
                "memfd_secret",
                None,
                "not available on this kernel"
                if not mem.secretmem_available
                else "turned off (STRONGROOM_NO_SECRETMEM)",
            )
    try:
        cfg = config_mod.load(state.config)
        check("config", True, cfg.path or "embedded default")
        ks = state.keystore()  # opening the keystore applies the core-dump setting
        core_now = resource.getrlimit(resource.RLIMIT_CORE)[0]
        dumpable_now = _dumpable()
        started = (
            f"started with RLIMIT_CORE {_core_limit(core_at_start)}"
            + ({True: ", dumpable", False: ", not dumpable", None: ""}[dumpable_at_start])
        )
        if not isinstance(ks, Keystore):
            check("core dumps", None, f"{started}; keys are used in the service, not here")
        elif cfg.core_dumps:
            check("core dumps", None, f"{started}; left so: core_dumps = true in the config")
        else:
            off = core_now == 0 and dumpable_now is not True
            now = (
                f"RLIMIT_CORE {_core_limit(core_now)}"
                + ({True: ", dumpable", False: ", not dumpable", None: ""}[dumpable_now])
            )
            check(
                "core dumps",
                off,
                f"{started}; Strongroom set {now}"
                if off
                else f"{started}; Strongroom could not turn them off: {now}",
            )
        for s in ks.backends():
            check(f"backend {s.name}", s.available, s.reason or f"{s.type}: available")
    except StrongroomError as e:
        check("config", False, str(e))
    problems = [c for c in checks if c["status"] == "problem"]
    state.emit(
        checks,
        lambda: table(
            [[c["check"], c["status"], c["detail"]] for c in checks], ["CHECK", "STATUS", "DETAIL"]
        ),
    )
    if problems:
        sys.exit(12)


@cli.command("random")
@click.argument("n", type=click.IntRange(1, 1 << 20))
@click.option("--backend", help="Backend whose generator to use (default: the vault).")
@click.option("--hex", "as_hex", is_flag=True, help="Print hex instead of raw bytes.")
@click.option(
    "--out", "out", metavar="FILE", help="Write the raw bytes here (- for stdout; default stdout)."
)
@pass_state
def random_cmd(state: State, n: int, backend: str | None, as_hex: bool, out: str | None) -> None:
    """Print N random bytes."""
    raw = not state.json and not as_hex
    if raw:
        refuse_binary_on_terminal(out, "random bytes")
    data = state.keystore().random(n, backend)
    if raw:
        write_output(out, data)
    elif state.json:
        state.emit({"hex": data.hex()})
    else:
        click.echo(data.hex())


# -- key ---------------------------------------------------------------------------------------
@cli.group()
def key() -> None:
    """Generate, use and manage keys."""


TYPE_CHOICE = click.Choice(
    [t.value for t in KeyType if t is not KeyType.SEED], case_sensitive=False
)


@key.command("generate")
@click.argument("name")
@click.option("--type", "key_type", required=True, type=TYPE_CHOICE, help="Key type.")
@click.option("--backend", help="Backend to create it in (default: first in order that can).")
@click.option("--usage", help="Comma-separated usages (default depends on the type).")
@click.option("--exportable", is_flag=True, help="Allow the key to be exported or wrapped.")
@pass_state
def key_generate(
    state: State, name: str, key_type: str, backend: str | None, usage: str | None, exportable: bool
) -> None:
    """Create a key."""
    info = state.keystore().generate(
        name, key_type, backend=backend, usage=usage, exportable=exportable
    )
    state.emit(info.to_dict(), f"generated {info.type.value} key {info.name!r} in {info.backend}")


@key.command("list")
@pass_state
def key_list(state: State) -> None:
    """List keys."""
    keys = state.keystore().keys()
    state.emit([k.to_dict() for k in keys], lambda: table(key_rows(keys), KEY_HEADERS))


@key.command("show")
@click.argument("name")
@pass_state
def key_show(state: State, name: str) -> None:
    """Show a key's metadata and public key."""
    ks = state.keystore()
    info = ks.info(name)
    data = info.to_dict()
    if info.type.is_asymmetric and info.type is not KeyType.SEED:
        data["public_key"] = algorithms.encode_public(ks.public_key(name), "pem").decode()
    if info.type.is_fido:
        data["signatures"] = (
            "FIDO assertions: CBOR of authenticator data, client data JSON and a signature over "
            "authenticatorData + SHA-256(clientDataJSON), not a raw signature over the data "
            "(see docs/fido.md)"
        )

    def text() -> str:
        lines = [
            f"{k}: {v if not isinstance(v, list) else ', '.join(v)}"
            for k, v in data.items()
            if k not in ("public_key", "attributes")
        ]
        if "public_key" in data:
            lines.append(str(data["public_key"]).rstrip())
        return "\n".join(lines)

    state.emit(data, text)


@key.command("public")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "der", "raw", "openssh"]),
    default="pem",
    show_default=True,
)
@click.option("--out", "out", metavar="FILE", help="Write here instead of stdout.")
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="The public key of this key version (default: the newest).",
)
@pass_state
def key_public(state: State, name: str, fmt: str, out: str | None, version: int | None) -> None:
    """Print a key's public key."""
    if fmt in ("der", "raw"):
        refuse_binary_on_terminal(out, f"a {fmt} public key")
    data = algorithms.encode_public(state.keystore().public_key(name, version), fmt)
    if fmt == "openssh":
        data += b"\n"
    write_output(out, data)


@key.command("sign")
@click.argument("name")
@click.option("--in", "inp", metavar="FILE", help="Data to sign (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Signature file (default: stdout).")
@click.option(
    "--algorithm",
    type=click.Choice(algorithms.RSA_SIGN_ALGORITHMS),
    help="RSA only: pkcs1v15 (default) or pss.",
)
@click.option(
    "--envelope",
    is_flag=True,
    help="Prefix the signature with the key version (docs/lifecycle.md), for `verify --envelope`.",
)
@click.option(
    "--digest",
    is_flag=True,
    help="The input is the message's SHA-256 digest (SHA-384 for P-384), raw bytes; "
    "ECDSA and RSA keys only.",
)
@pass_state
def key_sign(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    algorithm: str | None,
    envelope: bool,
    digest: bool,
) -> None:
    """Sign data (DER for ECDSA, raw for Ed25519, PKCS#1 v1.5 or PSS for RSA, HMAC tag,
    a FIDO assertion structure for fido-* keys). ECDSA and RSA hash a large input here, in a
    stream, and sign its digest."""
    refuse_binary_on_terminal(out, "a signature")
    ks = state.keystore()
    data, prehashed = signature_input(ks, name, inp, digest)
    write_output(out, ks.sign(name, data, algorithm, envelope=envelope, prehashed=prehashed))


@key.command("verify")
@click.argument("name")
@click.option("--signature", "sig", metavar="FILE", required=True, help="The signature file.")
@click.option("--in", "inp", metavar="FILE", help="Signed data (default: stdin).")
@click.option("--algorithm", type=click.Choice(algorithms.RSA_SIGN_ALGORITHMS))
@click.option(
    "--envelope",
    is_flag=True,
    help="The signature came from `sign --envelope` (names its version).",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="For a bare signature: the key version that made it (default: the newest).",
)
@click.option(
    "--digest",
    is_flag=True,
    help="The input is the message's SHA-256 digest (SHA-384 for P-384), raw bytes; "
    "ECDSA and RSA keys only.",
)
@pass_state
def key_verify(
    state: State,
    name: str,
    sig: str,
    inp: str | None,
    algorithm: str | None,
    envelope: bool,
    version: int | None,
    digest: bool,
) -> None:
    """Verify a signature: exit 0 if valid, 1 if not."""
    if envelope and version is not None:
        raise click.UsageError("--version is for bare signatures; an envelope names its version")
    ks = state.keystore()
    signature = read_input(sig)
    data, prehashed = signature_input(ks, name, inp, digest)
    ks.verify(
        name, data, signature, algorithm, version=version, envelope=envelope, prehashed=prehashed
    )
    state.emit({"valid": True}, "signature valid")


@key.command("encrypt")
@click.argument("name")
@click.option("--in", "inp", metavar="FILE", help="Plaintext (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Ciphertext (default: stdout).")
@click.option("--aad", default="", help="Associated data (text) bound to the ciphertext.")
@click.option(
    "--algorithm",
    type=click.Choice([*algorithms.RSA_ENCRYPT_ALGORITHMS, algorithms.AES_KEY_WRAP]),
    help="RSA: oaep-sha256 or oaep-sha1 (default: the one the key records at generation, "
    "oaep-sha1 on tokens that decrypt only that, such as SoftHSM2); "
    "aes-kwp: RFC 5649 key wrap of a short secret by a PKCS#11 AES key with the wrap usage.",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Write the bare ciphertext, without the key-version prefix (docs/lifecycle.md).",
)
@pass_state
def key_encrypt(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    aad: str,
    algorithm: str | None,
    raw: bool,
) -> None:
    """Encrypt (AES-256-GCM, XChaCha20-Poly1305, or RSA-OAEP) with the newest key version;
    the output names that version unless --raw."""
    refuse_binary_on_terminal(out, "a ciphertext")
    ks = state.keystore()
    ct = ks.encrypt(name, read_input(inp), aad.encode(), algorithm, envelope=not raw)
    write_output(out, ct)


@key.command("decrypt")
@click.argument("name")
@click.option("--in", "inp", metavar="FILE", help="Ciphertext (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Plaintext (default: stdout).")
@click.option("--aad", default="", help="The associated data given at encryption.")
@click.option(
    "--algorithm",
    type=click.Choice([*algorithms.RSA_ENCRYPT_ALGORITHMS, algorithms.AES_KEY_WRAP]),
    help="RSA: the OAEP hash used at encryption (default: the one the key records); aes-kwp "
    "for a "
    "secret wrapped with `encrypt --algorithm aes-kwp`.",
)
@click.option(
    "--raw",
    is_flag=True,
    help="The input is a bare ciphertext (no key-version prefix), e.g. from openssl.",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="For a bare ciphertext: the key version that made it (default: the newest).",
)
@pass_state
def key_decrypt(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    aad: str,
    algorithm: str | None,
    raw: bool,
    version: int | None,
) -> None:
    """Decrypt what `key encrypt` made, with the key version it names. Input without the
    version prefix is taken as a bare ciphertext (as with --raw)."""
    from . import lifecycle

    data = read_input(inp)
    envelope = not raw and lifecycle.is_versioned(lifecycle.CIPHERTEXT_MAGIC, data)
    if envelope and version is not None:
        raise click.UsageError("--version is for bare ciphertexts; this one names its version")
    ks = state.keystore()
    plain = ks.decrypt(name, data, aad.encode(), algorithm, version=version, envelope=envelope)
    if out is None and sys.stdout.isatty() and not is_text(plain):
        raise _binary_refused("the decrypted data")
    write_output(out, plain)


@key.command("import")
@click.argument("name")
@click.option(
    "--type",
    "key_type",
    required=True,
    type=click.Choice([t.value for t in KeyType], case_sensitive=False),
)
@click.option("--in", "inp", metavar="FILE", help="Key material (default: stdin).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "raw", "der", "pem"]),
    default="auto",
    show_default=True,
)
@click.option("--backend", help="Backend to import into.")
@click.option("--usage", help="Comma-separated usages.")
@click.option("--exportable", is_flag=True)
@pass_state
def key_import(
    state: State,
    name: str,
    key_type: str,
    inp: str | None,
    fmt: str,
    backend: str | None,
    usage: str | None,
    exportable: bool,
) -> None:
    """Import key material (PEM, DER or raw)."""
    from .memory import wipe as wipe_buffer  # needs the native extension; doctor must not

    material = bytearray(MAX_KEY_INPUT + 1)
    try:
        size = read_secret_into(inp, material)
        with memoryview(material) as whole, whole[:size] as view:
            info = state.keystore().import_key(
                name,
                key_type,
                view,
                backend=backend,
                usage=usage,
                exportable=exportable,
                format=fmt,
            )
    finally:
        wipe_buffer(material)
    state.emit(info.to_dict(), f"imported {info.type.value} key {info.name!r} into {info.backend}")


@key.command("export")
@click.argument("name")
@click.option(
    "--format", "fmt", type=click.Choice(["pem", "der", "raw"]), default="pem", show_default=True
)
@click.option("--out", "out", metavar="FILE", help="Write here (mode 600) instead of stdout.")
@pass_state
def key_export(state: State, name: str, fmt: str, out: str | None) -> None:
    """Export an exportable key's private material."""
    if fmt != "pem":
        refuse_binary_on_terminal(out, f"a {fmt} private key")
    write_output(out, state.keystore().export_key(name, fmt))


@key.command("adopt")
@click.argument("name")
@click.option("--backend", required=True, help="The backend that holds the key.")
@click.option("--label", help="Find the key by its label (PKCS#11 CKA_LABEL).")
@click.option("--id", "key_id", metavar="HEX", help="Find the key by its id (PKCS#11 CKA_ID).")
@click.option("--type", "key_type", type=TYPE_CHOICE, help="Expected key type (checked).")
@click.option("--usage", help="Comma-separated usages (default: what the key allows).")
@pass_state
def key_adopt(
    state: State,
    name: str,
    backend: str,
    label: str | None,
    key_id: str | None,
    key_type: str | None,
    usage: str | None,
) -> None:
    """Register a key that already exists in a backend, without copying it."""
    if label is None and key_id is None:
        raise click.UsageError("give --label, --id or both")
    ref = {k: v for k, v in (("label", label), ("id", key_id)) if v is not None}
    info = state.keystore().adopt(name, backend, ref, key_type, usage)
    state.emit(info.to_dict(), f"adopted {info.type.value} key {info.name!r} in {info.backend}")


@key.command("attest")
@click.argument("name")
@click.option("--nonce", metavar="HEX", help="The relying party's nonce (default: random).")
@click.option("--out", "out", metavar="FILE", help="Write the statement here (default: stdout).")
@pass_state
def key_attest(state: State, name: str, nonce: str | None, out: str | None) -> None:
    """Prove that a key lives in its hardware: a JSON statement for `attest verify`."""
    statement = state.keystore().attest(name, None if nonce is None else _hex(nonce, "nonce"))
    write_output(out, (json.dumps(statement, indent=2, sort_keys=True) + "\n").encode())


@key.command("delete")
@click.argument("name")
@click.option("--now", "at_once", is_flag=True, help="Destroy the key at once, with no wait.")
@click.option(
    "--after",
    metavar="WAIT",
    help="Waiting period before destruction, e.g. 30d or 12h (default: keystore.deletion_wait).",
)
@click.option("--cancel", is_flag=True, help="Cancel a scheduled deletion.")
@pass_state
def key_delete(state: State, name: str, at_once: bool, after: str | None, cancel: bool) -> None:
    """Delete a key: after the waiting period (keystore.deletion_wait, default none), or --now.

    A scheduled key does no work; `key delete --cancel NAME` brings it back until it is due.
    """
    from .lifecycle import parse_duration

    if sum((at_once, after is not None, cancel)) > 1:
        raise click.UsageError("give only one of --now, --after and --cancel")
    ks = state.keystore()
    if cancel:
        info = ks.cancel_deletion(name)
        state.emit(info.to_dict(), f"deletion of {name!r} cancelled")
        return
    if at_once:
        ks.delete(name)
        state.emit({"deleted": name}, f"deleted {name!r}")
        return
    scheduled = ks.schedule_deletion(name, None if after is None else parse_duration(after))
    if scheduled is None or scheduled.delete_after is None:
        state.emit({"deleted": name}, f"deleted {name!r}")
        return
    when = scheduled.delete_after.isoformat()
    state.emit(
        {"scheduled": name, "delete_after": when},
        f"key {name!r} will be deleted at {when}; cancel with `key delete --cancel {name}`",
    )


@key.command("purge")
@pass_state
def key_purge(state: State) -> None:
    """Carry out every scheduled deletion that is due (run it from cron or a timer)."""
    done = state.local("key purge").purge_due()
    state.emit(
        {"deleted": [i.name for i in done]},
        "\n".join(f"deleted {i.name!r}" for i in done) or "no deletion is due",
    )


@key.command("rotate")
@click.argument("name")
@click.option("--backend", help="Backend for the new version (default: the current version's).")
@pass_state
def key_rotate(state: State, name: str, backend: str | None) -> None:
    """Make a new version of a key; it becomes primary, older ones still decrypt and verify."""
    info = state.keystore().rotate(name, backend)
    state.emit(
        info.to_dict(), f"rotated {name!r}: version {info.version} in {info.backend} is primary"
    )


@key.command("versions")
@click.argument("name")
@pass_state
def key_versions(state: State, name: str) -> None:
    """List a key's versions (the last is primary) and which still decrypt."""
    ks = state.keystore()
    info = ks.info(name)
    rows = [
        {
            "version": v.version,
            "backend": v.backend,
            "created": v.created.isoformat(),
            "primary": v.version == info.version,
            "decrypts": v.version >= info.min_decryption_version,
        }
        for v in ks.versions(name)
    ]
    state.emit(
        rows,
        lambda: table(
            [
                [
                    str(r["version"]),
                    str(r["backend"]),
                    str(r["created"]),
                    "primary" if r["primary"] else ("active" if r["decrypts"] else "retired"),
                ]
                for r in rows
            ],
            ["VERSION", "BACKEND", "CREATED", "STATE"],
        ),
    )


@key.command("config")
@click.argument("name")
@click.option(
    "--min-decryption-version",
    "min_dec",
    type=click.IntRange(1),
    required=True,
    help="Versions below this no longer decrypt or verify.",
)
@pass_state
def key_config(state: State, name: str, min_dec: int) -> None:
    """Change a key's settings: min_decryption_version (as in Vault's transit)."""
    info = state.keystore().set_min_decryption_version(name, min_dec)
    state.emit(info.to_dict(), f"key {name!r}: min_decryption_version {min_dec}")


@key.command("trim")
@click.argument("name")
@pass_state
def key_trim(state: State, name: str) -> None:
    """Destroy the versions below min_decryption_version for good."""
    gone = state.local("key trim").trim(name)
    state.emit(
        {"trimmed": gone},
        f"destroyed versions {', '.join(map(str, gone))} of {name!r}"
        if gone
        else "no version to trim",
    )


@key.command("disable")
@click.argument("name")
@pass_state
def key_disable(state: State, name: str) -> None:
    """Refuse every use of a key until `key enable`."""
    info = state.keystore().disable(name)
    state.emit(info.to_dict(), f"key {name!r} disabled")


@key.command("enable")
@click.argument("name")
@pass_state
def key_enable(state: State, name: str) -> None:
    """Allow a disabled key again."""
    info = state.keystore().enable(name)
    state.emit(info.to_dict(), f"key {name!r} enabled")


@key.command("rewrap")
@click.argument("name")
@click.option("--in", "inp", metavar="FILE", help="Ciphertext or envelope (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Where to write (default: stdout).")
@click.option("--aad", default="", help="The associated data given at encryption.")
@click.option("--algorithm", type=click.Choice(algorithms.RSA_ENCRYPT_ALGORITHMS))
@pass_state
def key_rewrap(
    state: State, name: str, inp: str | None, out: str | None, aad: str, algorithm: str | None
) -> None:
    """Move a ciphertext from `key encrypt`, or a `strongroom encrypt` envelope, to the newest
    version of its key. An envelope's data stays as it is: only its data key is rewrapped."""
    from . import envelope

    refuse_binary_on_terminal(out, "a ciphertext")
    ks = state.keystore()
    with _open_in(inp) as src:
        lead = b""
        while len(lead) < len(envelope.MAGIC) and (
            piece := src.read(len(envelope.MAGIC) - len(lead))
        ):
            lead += piece
        if lead == envelope.MAGIC:
            if aad:
                raise click.UsageError("--aad is for `key encrypt` ciphertexts, not envelopes")
            with _open_out(out) as dst:
                envelope.rewrap_stream(
                    state.local("key rewrap of an envelope"),
                    _Prepended(lead, src),
                    dst.stream,
                    algorithm=algorithm,
                    key=name,
                )
                dst.commit()
            return
        data = lead + src.read()
    write_output(out, ks.rewrap(name, data, aad.encode(), algorithm))


@key.command("derive")
@click.argument("name")
@click.argument("new_name")
@click.option("--type", "key_type", default="aes-256", show_default=True, type=TYPE_CHOICE)
@click.option("--salt", default="", help="HKDF salt, hex.")
@click.option("--info", "info", default="", help="HKDF info (context), text.")
@click.option("--usage", help="Usages of the new key.")
@click.option("--exportable", is_flag=True)
@pass_state
def key_derive(
    state: State,
    name: str,
    new_name: str,
    key_type: str,
    salt: str,
    info: str,
    usage: str | None,
    exportable: bool,
) -> None:
    """HKDF-SHA256 from a key into a new key; the secret stays in the backend."""
    new = state.keystore().derive(
        name, new_name, key_type, usage, _hex(salt), info.encode(), exportable
    )
    state.emit(new.to_dict(), f"derived {new.type.value} key {new.name!r}")


@key.command("agree")
@click.argument("name")
@click.argument("new_name")
@click.option("--peer", metavar="FILE", required=True, help="Peer public key (PEM, DER or raw).")
@click.option("--type", "key_type", default="aes-256", show_default=True, type=TYPE_CHOICE)
@click.option("--salt", default="", help="HKDF salt, hex.")
@click.option("--info", "info", default="", help="HKDF info (context), text.")
@click.option("--usage", help="Usages of the new key.")
@pass_state
def key_agree(
    state: State,
    name: str,
    new_name: str,
    peer: str,
    key_type: str,
    salt: str,
    info: str,
    usage: str | None,
) -> None:
    """ECDH or X25519 with a peer, HKDF into a new key."""
    new = state.keystore().agree(
        name, read_input(peer), new_name, key_type, usage, _hex(salt), info.encode()
    )
    state.emit(new.to_dict(), f"agreed {new.type.value} key {new.name!r}")


@key.command("wrap")
@click.argument("wrapping_key")
@click.argument("name")
@click.option("--out", "out", metavar="FILE")
@pass_state
def key_wrap(state: State, wrapping_key: str, name: str, out: str | None) -> None:
    """Wrap an exportable key under an AES key (RFC 5649)."""
    refuse_binary_on_terminal(out, "a wrapped key")
    write_output(out, state.keystore().wrap(wrapping_key, name))


@key.command("unwrap")
@click.argument("wrapping_key")
@click.argument("new_name")
@click.option("--type", "key_type", required=True, type=TYPE_CHOICE)
@click.option("--in", "inp", metavar="FILE")
@click.option("--usage")
@click.option("--exportable", is_flag=True)
@pass_state
def key_unwrap(
    state: State,
    wrapping_key: str,
    new_name: str,
    key_type: str,
    inp: str | None,
    usage: str | None,
    exportable: bool,
) -> None:
    """Unwrap a wrapped key into a new key."""
    new = state.keystore().unwrap(
        wrapping_key, read_input(inp), new_name, key_type, usage, exportable
    )
    state.emit(new.to_dict(), f"unwrapped {new.type.value} key {new.name!r}")


@key.command("bip39-generate")
@click.argument("name")
@click.option("--words", type=click.Choice(["12", "15", "18", "21", "24"]), default="24")
@click.option(
    "--passphrase",
    "bip39_pass",
    default=None,
    help="BIP39 passphrase as env:NAME, file:PATH or prompt (default: none).",
)
@pass_state
def key_bip39_generate(state: State, name: str, words: str, bip39_pass: str | None) -> None:
    """Make a BIP39 seed inside the vault; print its mnemonic once, for the paper backup."""
    info, mnemonic = state.local("key bip39-generate").bip39_generate(
        name, int(words), _passphrase(bip39_pass)
    )
    state.emit({"key": info.to_dict(), "mnemonic": mnemonic}, mnemonic)


@key.command("bip39-recover")
@click.argument("name")
@click.option(
    "--passphrase",
    "bip39_pass",
    default=None,
    help="BIP39 passphrase as env:NAME, file:PATH or prompt (default: none).",
)
@pass_state
def key_bip39_recover(state: State, name: str, bip39_pass: str | None) -> None:
    """Store the seed of a mnemonic read from stdin."""
    mnemonic = sys.stdin.readline().strip()
    info = state.local("key bip39-recover").bip39_recover(name, mnemonic, _passphrase(bip39_pass))
    state.emit(info.to_dict(), f"recovered seed {info.name!r}")


@key.command("slip10-derive")
@click.argument("seed")
@click.argument("path")
@click.argument("new_name")
@click.option(
    "--type",
    "key_type",
    type=click.Choice(["ed25519", "secp256k1"], case_sensitive=False),
    default="ed25519",
)
@click.option("--usage")
@pass_state
def key_slip10(
    state: State, seed: str, path: str, new_name: str, key_type: str, usage: str | None
) -> None:
    """Derive a key at a SLIP-0010 path (e.g. m/44'/0'/0') from a seed key."""
    new = state.local("key slip10-derive").slip10_derive(seed, path, new_name, key_type, usage)
    state.emit(new.to_dict(), f"derived {new.type.value} key {new.name!r} at {path}")


# -- envelope encryption -----------------------------------------------------------------------
PROGRESS_MIN = 8 * 1024 * 1024
"""Inputs at least this large get a progress bar (when stderr is a terminal)."""


class _Output:
    """A file written beside its destination and renamed into place only on success, so a
    failure never leaves partial plaintext and never clobbers an existing file. stdout is
    written as it comes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tmp: str | None = None
        if path in (None, "-"):
            self.stream: BinaryIO = sys.stdout.buffer
            return
        target = Path(str(path))
        directory = target.parent if str(target.parent) else Path(".")
        import tempfile

        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
        except OSError as e:
            raise InvalidArgument(f"cannot write {path}: {e.strerror}") from None
        self.stream = os.fdopen(fd, "wb", buffering=1 << 20)

    def commit(self) -> None:
        self.stream.flush()
        if self._tmp is not None:
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self._tmp, str(self.path))
            self._tmp = None

    def abort(self) -> None:
        if self._tmp is not None:
            self.stream.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


class _Prepended:
    """A reader that gives `lead` first, then the rest of `src`."""

    def __init__(self, lead: bytes, src: BinaryIO) -> None:
        self._lead, self._src = lead, src

    def read(self, n: int = -1) -> bytes:
        if self._lead:
            if n < 0:
                out, self._lead = self._lead + self._src.read(), b""
                return out
            out, self._lead = self._lead[:n], self._lead[n:]
            return out
        return self._src.read(n)


@contextlib.contextmanager
def _open_out(path: str | None) -> Iterator[_Output]:
    out = _Output(path)
    try:
        yield out
    finally:
        out.abort()


@contextlib.contextmanager
def _open_in(path: str | None) -> Iterator[io.BufferedReader]:
    if path in (None, "-"):
        yield cast(io.BufferedReader, sys.stdin.buffer)
        return
    try:
        f = cast(io.BufferedReader, open(str(path), "rb", buffering=1 << 20))
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


@contextlib.contextmanager
def _progress(src: BinaryIO, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for a large regular file, only when stderr is a terminal."""
    size = 0
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        st = os.fstat(src.fileno())
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
    if size < PROGRESS_MIN or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
        yield bar.update


@cli.command("encrypt")
@click.option("--key", "name", required=True, help="The key that wraps the data key (the KEK).")
@click.option("--in", "inp", metavar="FILE", help="Data to encrypt (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Where the envelope goes (default: stdout).")
@click.option(
    "--algorithm",
    type=click.Choice(algorithms.KEK_ALGORITHMS),
    help=algorithms.KEK_ALGORITHMS_HELP,
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1024, 16 * 1024 * 1024),
    default=65536,
    show_default=True,
    help="Plaintext bytes per authenticated chunk.",
)
@pass_state
def encrypt_cmd(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    algorithm: str | None,
    chunk_size: int,
) -> None:
    """Envelope-encrypt a file or stream of any size: a fresh data key wrapped by --key, the
    data in authenticated AES-256-GCM chunks (docs/envelope.md)."""
    refuse_binary_on_terminal(out, "an envelope")
    ks = state.local("encrypt")
    with _open_in(inp) as src, _open_out(out) as dst, _progress(src, "encrypting") as bar:
        header = ks.encrypt_stream(
            name, src, dst.stream, algorithm=algorithm, chunk_size=chunk_size, progress=bar
        )
        dst.commit()
    if state.json and out not in (None, "-"):
        state.emit(header)


@cli.command("decrypt")
@click.option("--in", "inp", metavar="FILE", help="The envelope (default: stdin).")
@click.option("--out", "out", metavar="FILE", help="Where the plaintext goes (default: stdout).")
@pass_state
def decrypt_cmd(state: State, inp: str | None, out: str | None) -> None:
    """Decrypt an envelope from `strongroom encrypt`; its header names the key and version.

    With --out, the file appears only if every chunk authenticates. On stdout, chunks are
    written as they authenticate, and a failure exits non-zero after them."""
    ks = state.local("decrypt")
    with _open_in(inp) as src, _open_out(out) as dst, _progress(src, "decrypting") as bar:
        sink = dst.stream
        if out is None and sys.stdout.isatty():
            sink = cast(BinaryIO, _TerminalText(sink))
        header = ks.decrypt_stream(src, sink, progress=bar)
        dst.commit()
    if state.json and out not in (None, "-"):
        state.emit(header)


# -- attest ------------------------------------------------------------------------------------
@cli.group()
def attest() -> None:
    """Check key attestation statements (made by `key attest`); needs no config or device."""


@attest.command("verify")
@click.option("--in", "inp", metavar="FILE", help="The statement (default: stdin).")
@click.option("--nonce", metavar="HEX", help="The nonce you asked for; checked when given.")
@click.option("--ak", metavar="FILE", help="PEM public key of the attestation key you trust.")
@click.option("--public", metavar="FILE", help="PEM public key the attested key must have.")
@pass_state
def attest_verify(
    state: State, inp: str | None, nonce: str | None, ak: str | None, public: str | None
) -> None:
    """Verify a statement: exit 0 if it proves what it claims, 1 if not."""
    from .keystore import verify_attestation

    try:
        statement = strictjson.loads(read_input(inp))
    except ValueError:
        raise AttestationInvalid("the statement is not JSON") from None
    facts = verify_attestation(
        statement,
        None if nonce is None else _hex(nonce, "nonce"),
        None if ak is None else _pem_public(ak),
        None if public is None else _pem_public(public),
    )

    def text() -> str:
        lines = [
            f"attestation valid: key {facts.get('key')!r} ({facts.get('key_type')}) "
            "cannot leave the TPM that certified it",
            f"attestation key: {facts.get('attestation_key')}"
            + ("" if facts.get("attestation_key_trusted") else " (NOT checked: give --ak)"),
            "nonce: " + ("matches" if facts.get("nonce_checked") else "NOT checked: give --nonce"),
        ]
        return "\n".join(lines)

    state.emit(facts, text)


def _pem_public(path: str) -> PublicKeyTypes:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(read_input(path))
    except (ValueError, TypeError):
        raise InvalidArgument(f"{path} is not a PEM public key") from None


# -- vault -------------------------------------------------------------------------------------
@cli.group()
def vault() -> None:
    """The software vault: status, lock, unlock, key slots, backup and restore."""


class VaultAdmin(Protocol):
    """The vault commands the service offers too (to its admin): status, unlock and lock."""

    def vault_status(self) -> dict[str, Any]: ...

    def unlock(self, method: str | None = None) -> str: ...

    def lock(self) -> None: ...


def _vault_admin(state: State) -> VaultAdmin:
    """The vault here, or with a service configured, the service's (admin only)."""
    if state.remote():
        return state.service().vault_control()
    return state.local("vault").vault_control()


def _vault(state: State, command: str) -> VaultControl:
    """The vault's own commands: in process only (`State.local` refuses them otherwise)."""
    return state.local(command).vault_control()


@vault.command("status")
@pass_state
def vault_status(state: State) -> None:
    """Show where the vault is and whether it opens (does not unlock it)."""
    status = _vault_admin(state).vault_status()
    state.emit(status, lambda: "\n".join(f"{k}: {v}" for k, v in status.items()))


@vault.command("unlock")
@click.option("--method", help="Unlock method to use (default: the configured ones, in order).")
@pass_state
def vault_unlock(state: State, method: str | None) -> None:
    """Check that the vault opens. A CLI process holds it open only while it runs."""
    vault = _vault_admin(state)
    used = vault.unlock(method)
    status = vault.vault_status()
    state.emit(status, f"vault unlocked with {used}: {status['keys']} keys")


@vault.command("lock")
@pass_state
def vault_lock(state: State) -> None:
    """Wipe the vault's keys from this process (each CLI run locks it when it ends)."""
    _vault_admin(state).lock()
    state.emit({"unlocked": False}, "vault locked")


@vault.command("enroll")
@click.argument("methods", nargs=-1, metavar="METHOD [METHOD ...]")
@click.option(
    "--threshold",
    "threshold_k",
    type=int,
    metavar="K",
    help="A threshold slot: any K of the METHODs together open the vault (with --group: K groups).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="K:METHOD,...",
    help="A group of a threshold slot: K of its methods make the group, e.g. 2:tpm,hsm,fido "
    "(repeat it; --threshold then counts groups, default all).",
)
@click.option(
    "--exclusive",
    is_flag=True,
    help="Threshold: remove every other key slot (but recovery shares) in the same commit.",
)
@click.option(
    "--passphrase",
    "new_pass",
    multiple=True,
    metavar="REF",
    help="For passphrase methods: the new passphrase as env:NAME, file:PATH or prompt "
    "(repeat it for several passphrase members, in order; default prompt).",
)
@click.option(
    "--pcrs",
    metavar="LIST",
    help="For a sealing backend that can: bind the slot to these PCRs, e.g. 7,11.",
)
@click.option(
    "--pin", is_flag=True, help="For a sealing backend that can: also require its PIN to unseal."
)
@click.option(
    "--no-touch",
    "no_touch",
    is_flag=True,
    help="For a FIDO2 security key: unseal without a touch (user presence not required).",
)
@allow_weak_option
@pass_state
def vault_enroll(
    state: State,
    methods: tuple[str, ...],
    threshold_k: int | None,
    groups: tuple[str, ...],
    exclusive: bool,
    new_pass: tuple[str, ...],
    pcrs: str | None,
    pin: bool,
    no_touch: bool,
) -> None:
    """Add a key slot: `passphrase`, or the name of a backend that can seal (tpm, fido, ...).

    With --threshold K (and/or --group), the slot opens only when K of the methods succeed,
    e.g. `vault enroll --threshold 2 tpm hsm passphrase`. Name several methods of one kind
    METHOD:NAME (passphrase:alice passphrase:bob); see docs/threshold.md.
    """
    options: dict[str, Any] = {}
    if no_touch:
        options["touch"] = False
    if pcrs is not None:
        try:
            options["pcrs"] = [int(p) for p in pcrs.replace(" ", "").split(",") if p]
        except ValueError:
            raise click.UsageError("--pcrs takes PCR numbers separated by commas, e.g. 7,11")
    if pin:
        options["pin"] = True
    if threshold_k is not None or groups:
        _enroll_threshold(state, methods, threshold_k, groups, exclusive, new_pass, options)
        return
    if exclusive:
        raise click.UsageError("--exclusive is for threshold slots (--threshold or --group)")
    if len(methods) != 1:
        raise click.UsageError(
            "give one METHOD, or --threshold K with several (e.g. --threshold 2 tpm hsm passphrase)"
        )
    (method,) = methods
    if len(new_pass) > 1:
        raise click.UsageError("--passphrase is given once for one passphrase slot")
    if method == "passphrase" and options:
        raise click.UsageError(
            "--pcrs, --pin and --no-touch are for sealing backends, not passphrase"
        )
    v = _vault(state, "vault enroll")
    v.unlock()
    if method == "passphrase":
        ref = new_pass[0] if new_pass else "prompt"
        options["passphrase"] = _new_passphrase(ref, "New passphrase: ")
    slot = v.enroll(method, options)
    state.emit(slot, f"enrolled {slot['method']} as key slot {slot['id']}")


def _enroll_threshold(
    state: State,
    methods: tuple[str, ...],
    threshold_k: int | None,
    group_specs: tuple[str, ...],
    exclusive: bool,
    new_pass: tuple[str, ...],
    options: dict[str, Any],
) -> None:
    from .threshold import Group, Member, Policy, parse_group, parse_member

    if group_specs:
        groups = [parse_group(g) for g in group_specs]
        groups += [Group(1, (parse_member(m),)) for m in methods]  # bare methods: required
        k = len(groups) if threshold_k is None else threshold_k
    else:
        if not methods:
            raise click.UsageError("--threshold K needs the METHODs to split over")
        assert threshold_k is not None
        groups = [Group(threshold_k, tuple(parse_member(m) for m in methods))]
        k = 1
    Policy(k, tuple(groups)).validated()  # before any prompt
    ks = state.local("vault enroll")
    passphrases = list(new_pass)
    used_options: set[str] = set()
    members_out: list[Group] = []
    for g in groups:
        built: list[Member] = []
        for m in g.members:
            opts: dict[str, Any] = {}
            if m.method == "passphrase":
                ref = passphrases.pop(0) if passphrases else "prompt"
                opts["passphrase"] = _new_passphrase(ref, f"New passphrase for {m.name}: ")
            else:
                kind = ks.backend(m.method).type_name
                wanted = {"tpm": {"pcrs", "pin"}, "fido": {"touch", "pin"}}.get(kind, set())
                opts = {o: v for o, v in options.items() if o in wanted}
                used_options |= set(opts)
            built.append(Member(m.method, m.label, opts))
        members_out.append(Group(g.threshold, tuple(built)))
    if passphrases:
        raise click.UsageError("more --passphrase values than passphrase methods")
    unused = set(options) - used_options
    if unused:
        names = {"pcrs": "--pcrs", "pin": "--pin", "touch": "--no-touch"}
        raise click.UsageError(
            f"{', '.join(sorted(names[o] for o in unused))}: no method of the slot takes it"
        )
    policy = Policy(k, tuple(members_out)).validated()
    v = _vault(state, "vault enroll")
    v.unlock()
    slot = v.enroll_threshold(policy, exclusive=exclusive)
    state.emit(slot, f"enrolled threshold key slot {slot['id']}: {slot['policy']}")
    alone = [
        f"{s['id']} ({s['method']})"
        for s in v.vault_status().get("slots", [])
        if s.get("method") not in ("threshold", "recovery")
    ]
    if alone and not state.json:
        click.echo(
            f"note: key slots {', '.join(alone)} still open the vault on their own; "
            "remove them with `strongroom vault unenroll ID` (or enroll with --exclusive)",
            err=True,
        )


@vault.command("unenroll")
@click.argument("slot_id")
@pass_state
def vault_unenroll(state: State, slot_id: str) -> None:
    """Remove a key slot (never the last one)."""
    v = _vault(state, "vault unenroll")
    v.unlock()
    v.unenroll(slot_id)
    state.emit({"removed": slot_id}, f"removed key slot {slot_id}")


@vault.command("passphrase")
@click.option(
    "--new",
    "new_pass",
    default="prompt",
    show_default=True,
    help="The new passphrase as env:NAME, file:PATH or prompt.",
)
@allow_weak_option
@pass_state
def vault_passphrase(state: State, new_pass: str) -> None:
    """Change the vault passphrase; the old one stops working."""
    v = _vault(state, "vault passphrase")
    v.unlock()
    v.change_passphrase(_new_passphrase(new_pass, "New passphrase: ", "--new"))
    state.emit({"changed": True}, "vault passphrase changed")


@vault.command("recovery-shares")
@click.option("--threshold", "threshold_k", type=int, required=True, metavar="K")
@click.option("--shares", type=int, required=True, metavar="N")
@click.option(
    "--passphrase",
    "share_pass",
    default=None,
    help="A SLIP-39 passphrase on the shares, as env:NAME, file:PATH or prompt (default: "
    "none); it is needed again to recover.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    help="Also write each share to DIR/share-I-of-N.txt (mode 600).",
)
@allow_weak_option
@pass_state
def vault_recovery_shares(
    state: State, threshold_k: int, shares: int, share_pass: str | None, out_dir: str | None
) -> None:
    """Print N SLIP-39 mnemonic shares, any K of which open the vault (`vault recover`).

    They replace any earlier set, whose shares stop working. Print them once, write them
    down and keep them apart.
    """
    from .threshold import check_recovery_shape

    check_recovery_shape([(threshold_k, shares)])  # before any prompt
    passphrase = "" if share_pass is None else _new_passphrase(share_pass, "Share passphrase: ")
    v = _vault(state, "vault recovery-shares")
    v.unlock()
    groups = v.recovery_shares(threshold_k, shares, passphrase)
    mnemonics = [m for g in groups for m in g]
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i, m in enumerate(mnemonics, 1):
            write_output(str(directory / f"share-{i}-of-{len(mnemonics)}.txt"), (m + "\n").encode())
    state.emit(
        {"threshold": threshold_k, "shares": mnemonics, "passphrase": bool(passphrase)},
        lambda: "\n".join(mnemonics),
    )
    if not state.json:
        click.echo(
            f"{len(mnemonics)} recovery shares; any {threshold_k} open the vault with "
            "`strongroom vault recover`. Keep them apart and offline.",
            err=True,
        )


@vault.command("recover")
@click.option(
    "--share-file",
    "share_files",
    multiple=True,
    metavar="FILE",
    help="A file of mnemonic shares, one per line (repeatable; - is stdin). Default: stdin, "
    "or a prompt per share on a terminal.",
)
@click.option(
    "--passphrase",
    "share_pass",
    default=None,
    help="The shares' SLIP-39 passphrase, as env:NAME, file:PATH or prompt (default: none).",
)
@click.option(
    "--new-passphrase",
    "new_pass",
    default="prompt",
    show_default=True,
    help="The new vault passphrase to enroll once open (replaces the passphrase slot).",
)
@click.option(
    "--check-only", is_flag=True, help="Only check that the shares open the vault; change nothing."
)
@allow_weak_option
@pass_state
def vault_recover(
    state: State,
    share_files: tuple[str, ...],
    share_pass: str | None,
    new_pass: str,
    check_only: bool,
) -> None:
    """Open the vault with K recovery shares when the other methods are gone, and enroll a new
    passphrase. Then remove the dead key slots with `vault unenroll`."""
    mnemonics = _read_mnemonics(share_files)
    passphrase = "" if share_pass is None else _secret(share_pass, "Share passphrase: ").get()
    v = _vault(state, "vault recover")
    slot_id = v.recover(mnemonics, passphrase)
    result: dict[str, Any] = {"recovered": True, "recovery_slot": slot_id}
    if not check_only:
        v.change_passphrase(_new_passphrase(new_pass, "New vault passphrase: ", "--new-passphrase"))
        result["new_passphrase"] = True
    status = v.vault_status()
    result["slots"] = status.get("slots", [])

    def text() -> str:
        lines = [f"vault opened with recovery shares (key slot {slot_id}): {status['keys']} keys"]
        if not check_only:
            lines.append("new vault passphrase enrolled (it replaces any passphrase slot)")
        lines.append("key slots now (remove dead ones with `strongroom vault unenroll ID`):")
        lines += [
            f"  {s['id']}  {s['method']}" + (f"  {s['policy']}" if s.get("policy") else "")
            for s in result["slots"]
        ]
        return "\n".join(lines)

    state.emit(result, text)


def _read_mnemonics(files: tuple[str, ...]) -> list[str]:
    """Mnemonics from files (one per line, # comments), stdin, or prompts on a terminal."""
    if not files and sys.stdin.isatty():
        out: list[str] = []
        click.echo("Type the recovery shares, one per line; an empty line ends.", err=True)
        while True:
            line = click.prompt(
                f"Share {len(out) + 1}", default="", show_default=False, err=True, hide_input=True
            )
            if not line.strip():
                return out
            out.append(line)
    lines: list[str] = []
    for f in files or ("-",):
        try:
            text = read_input(f).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{f} is not a text file of mnemonic shares") from None
        lines += [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


@vault.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_state
def vault_backup(state: State, file: str) -> None:
    """Write a backup of the vault snapshot (it opens with the same unlock methods)."""
    v = _vault(state, "vault backup")
    v.backup(Path(file))
    state.emit({"backup": file}, f"vault backed up to {file}")


@vault.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_state
def vault_restore_cmd(state: State, file: str) -> None:
    """Replace the vault with a backup (checked first) and update the catalog."""
    report = vault_restore(state.local("vault restore"), file)
    state.emit(
        report,
        f"restored {report['keys']} keys from {file}"
        + (
            f"; name conflicts left alone: {', '.join(report['conflicts'])}"
            if report["conflicts"]
            else ""
        ),
    )


# -- audit -----------------------------------------------------------------------------------
@cli.group()
def audit() -> None:
    """The tamper-evident audit log: verify, list, hash an input, checkpoint."""


def _audit_path(state: State, file: str | None) -> Path:
    if file is not None:
        return Path(file)
    return config_mod.load(state.config).data_dir / "audit.jsonl"


def _load_public(path: str) -> PublicKeyTypes:
    from cryptography.hazmat.primitives import serialization

    data = read_input(path)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_public_key(data)
        return serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{path} is not a PEM or DER public key") from None


def _anchor(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise InvalidArgument("--anchor is SEQ:HASH (a record number and its 64-hex-digit hash)")
    return int(seq), digest


@audit.command("verify")
@click.option("--file", "file", metavar="FILE", help="The log (default: audit.jsonl in data_dir).")
@click.option(
    "--public-key",
    "public",
    metavar="FILE",
    help="Checkpoint key (PEM or DER), e.g. from `audit public-key`; default: the keystore's.",
)
@click.option(
    "--anchor", metavar="SEQ:HASH", help="A record noted earlier that must still be there."
)
@pass_state
def audit_verify(state: State, file: str | None, public: str | None, anchor: str | None) -> None:
    """Check the hash chain and checkpoint signatures; exit 9 naming the first bad record."""
    from .audit import verify_log

    path = _audit_path(state, file)
    expected = _anchor(anchor)
    key = _load_public(public) if public else state.local("audit verify").audit_public_key()
    report = verify_log(path, key, expected)
    for warning in report.warnings:
        if not state.json:
            click.echo(f"strongroom: warning: {warning}", err=True)
    if not report.ok:
        state.emit(report.to_dict())
        report.raise_if_tampered()

    def text() -> str:
        signed = (
            f"{report.checkpoints} checkpoint(s), {report.checkpoints_verified} verified"
            if key is not None
            else f"{report.checkpoints} checkpoint(s), signatures not checked (no key yet)"
        )
        return (
            f"audit log OK: {report.records} records"
            + (f" (seq {report.first_seq}-{report.last_seq})" if report.records else "")
            + f", {signed}; last record {report.last_seq}:{report.last_hash}"
        )

    state.emit(report.to_dict(), text)


@audit.command("list")
@click.option("--file", "file", metavar="FILE", help="The log (default: audit.jsonl in data_dir).")
@click.option("--since", "since", type=click.IntRange(0), default=0, help="Only records after seq.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_state
def audit_list(state: State, file: str | None, since: int, limit: int) -> None:
    """Print records (JSON lines), oldest first; this does not verify them."""
    from .audit import read_records

    records = read_records(_audit_path(state, file), since, limit)
    state.emit(records, lambda: "\n".join(json.dumps(r, sort_keys=True) for r in records))


@audit.command("hash")
@click.option("--in", "inp", metavar="FILE", help="The input to look for (default: stdin).")
@click.option("--file", "file", metavar="FILE", help="The log whose HMAC key to use.")
@pass_state
def audit_hash(state: State, inp: str | None, file: str | None) -> None:
    """The HMAC of an input as this log records it (`input` field), to find it in the log."""
    from .audit.log import input_hmac, key_path_for, load_key

    mac = input_hmac(
        load_key(key_path_for(_audit_path(state, file)), create=False), read_input(inp)
    )
    state.emit({"input": mac}, mac)


@audit.command("checkpoint")
@pass_state
def audit_checkpoint(state: State) -> None:
    """Append a checkpoint signed by the audit key now (made on first use)."""
    done = state.local("audit checkpoint").audit_checkpoint()
    if done is None:
        raise InvalidArgument('checkpoints need audit = "file" in the config')
    state.emit(done, f"checkpoint seq {done['seq']} signs records 1-{done['covers']}")


@audit.command("public-key")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "der", "raw", "openssh"]),
    default="pem",
    show_default=True,
)
@click.option("--out", "out", metavar="FILE", help="Write here instead of stdout.")
@pass_state
def audit_public_key(state: State, fmt: str, out: str | None) -> None:
    """The checkpoint signing key's public key, to keep apart from the log for verify."""
    if fmt in ("der", "raw"):
        refuse_binary_on_terminal(out, f"a {fmt} public key")
    public = state.local("audit public-key").audit_public_key()
    if public is None:
        raise InvalidArgument("no audit checkpoint key yet; run `strongroom audit checkpoint`")
    data = algorithms.encode_public(public, fmt)
    write_output(out, data + (b"\n" if fmt == "openssh" else b""))


def _hex(text: str, what: str = "salt") -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be hex") from None


def _secret(ref: str, prompt: str, option: str = "--passphrase") -> SecretSource:
    """The secret an option names; without a terminal, the hint is that option's env: form."""
    try:
        validate_reference(ref)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    return SecretSource([ref], prompt, hint=f"give {option} env:NAME or {option} file:PATH")


def _new_passphrase(ref: str, prompt: str, option: str = "--passphrase") -> str:
    """A new passphrase (asked twice at a prompt), held to the minimum length."""
    value = _secret(ref, prompt, option).get(confirm=True)
    check_new_passphrase(value)
    return value


def _passphrase(ref: str | None) -> str:
    return "" if ref is None else _secret(ref, "BIP39 passphrase: ").get()


# -- the custody service -----------------------------------------------------------------------
@cli.command()
@click.option("--socket", "socket_path", metavar="PATH", help="Unix socket (overrides the config).")
@click.option("--listen", metavar="HOST:PORT", help="TCP with TLS (overrides the config).")
@pass_state
def serve(state: State, socket_path: str | None, listen: str | None) -> None:
    """Run the key custody service until SIGTERM or SIGINT (docs/server.md).

    Listens on the Unix socket (default: serve.sock in the data dir, mode 0600) and, when
    configured, on TCP with TLS. At shutdown in-flight requests finish, then the vault is
    locked and guarded memory purged."""
    from .service.transport import serve as run

    cfg = config_mod.load(state.config)
    settings = cfg.server
    if listen is not None:
        settings.listen = config_mod.parse_listen(listen)
    if socket_path is not None:
        settings.socket = Path(socket_path)
    if settings.socket is None:
        settings.socket = cfg.data_dir / "serve.sock"
    state.server = ""

    def ready(where: list[str]) -> None:
        click.echo(f"strongroom: serving on {', '.join(where)}", err=True)

    run(cfg, settings, ready=ready)


def _tenants(state: State) -> Any:
    """The tenants store: local (file access to the data dir is admin), or the service's."""
    if state.remote():
        return state.service()
    from .service.tenants import TenantStore

    cfg = config_mod.load(state.config)
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return TenantStore(cfg.data_dir / "tenants.sqlite")


def _audit_change(state: State, operation: str, **detail: Any) -> Any:
    """Record a tenant or policy change in the audit log (the service records its own)."""
    if state.remote():
        return contextlib.nullcontext()
    return state.local_keystore().audited(operation, None, write_ahead=True, **detail)


@contextlib.contextmanager
def _tenant_store(state: State) -> Iterator[Any]:
    store = _tenants(state)
    try:
        yield store
    finally:
        if not state.remote():
            store.close()


@cli.group()
def tenant() -> None:
    """Tenants of the custody service and their API tokens (admin)."""


@tenant.command("create")
@click.argument("name")
@pass_state
def tenant_create(state: State, name: str) -> None:
    """Create a tenant: a namespace of keys of its own."""
    with _tenant_store(state) as store, _audit_change(state, "tenant_create", tenant=name):
        store.create_tenant(name)
    state.emit({"tenant": name}, f"created tenant {name!r}")


@tenant.command("list")
@pass_state
def tenant_list(state: State) -> None:
    """List tenants and how many live identities each has."""
    with _tenant_store(state) as store:
        rows = store.tenants()
    state.emit(
        rows,
        lambda: table(
            [[r["name"], str(r.get("identities", ""))] for r in rows], ["TENANT", "IDENTITIES"]
        ),
    )


@tenant.group("token")
def tenant_token() -> None:
    """API tokens: issue (shown once) and revoke."""


def _identity_args(names: tuple[str, ...], admin: bool) -> tuple[str | None, str]:
    """TENANT IDENTITY, or with --admin the admin's IDENTITY alone."""
    if admin:
        if len(names) != 1:
            raise click.UsageError("with --admin give only the identity's name")
        return None, names[0]
    if len(names) != 2:
        raise click.UsageError("give TENANT and IDENTITY (or --admin IDENTITY)")
    return names[0], names[1]


@tenant_token.command("issue")
@click.argument("names", nargs=-1, required=True, metavar="TENANT IDENTITY")
@click.option("--admin", is_flag=True, help="A service admin (give IDENTITY only, no tenant).")
@click.option(
    "--grant",
    "grant",
    metavar="PERMS",
    help="Also grant these permissions (e.g. sign,verify,read) on --keys.",
)
@click.option("--keys", default="*", show_default=True, help="Key-name pattern for --grant.")
@pass_state
def tenant_token_issue(
    state: State, names: tuple[str, ...], admin: bool, grant: str | None, keys: str
) -> None:
    """Issue an API token for a new identity; print it once (only its hash is kept)."""
    from .service.tenants import parse_permissions

    if admin and grant:
        raise click.UsageError("an admin holds no key permissions; --grant is for tenants")
    tenant_name, ident = _identity_args(names, admin)
    perms = parse_permissions(grant) if grant else None
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_issue", tenant=tenant_name, identity=ident, admin=admin),
    ):
        if state.remote():
            if admin:
                raise click.UsageError("admin tokens are issued on the service host, not remotely")
            token = store.issue_token(tenant_name, ident)
            if perms:
                store.grant(tenant_name, ident, keys, [p.value for p in perms])
        else:
            token = store.issue_token(tenant_name, ident, admin=admin)
            if perms and tenant_name is not None:
                store.grant(tenant_name, ident, keys, perms)
    state.emit(
        {"tenant": tenant_name, "identity": ident, "token": token},
        f"{token}\n(shown once: store it now; `tenant token revoke` disables it)",
    )


@tenant_token.command("revoke")
@click.argument("names", nargs=-1, required=True, metavar="TENANT IDENTITY")
@click.option("--admin", is_flag=True, help="Revoke a service admin (give IDENTITY only).")
@pass_state
def tenant_token_revoke(state: State, names: tuple[str, ...], admin: bool) -> None:
    """Revoke an identity's token (or certificate) at once."""
    tenant_name, ident = _identity_args(names, admin)
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_revoke", tenant=tenant_name, identity=ident),
    ):
        if state.remote():
            if tenant_name is None:
                raise click.UsageError("admin identities are revoked on the service host")
            store.revoke_identity(tenant_name, ident)
        else:
            store.revoke(tenant_name, ident)
    state.emit({"revoked": ident}, f"revoked {ident!r}")


@tenant.command("cert")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--cert", "cert", required=True, metavar="FILE", help="The client certificate (PEM).")
@pass_state
def tenant_cert(state: State, tenant_name: str, ident: str, cert: str) -> None:
    """Enroll a client certificate (mutual TLS) as an identity of TENANT (pinned by hash)."""
    import ssl

    pem = read_input(cert).decode("ascii", "replace")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        raise InvalidArgument(f"{cert} is not a PEM certificate") from None
    if state.remote():
        raise click.UsageError("certificates are enrolled on the service host")
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_issue", tenant=tenant_name, identity=ident, certificate=True),
    ):
        store.add_certificate(tenant_name, ident, der)
    state.emit({"tenant": tenant_name, "identity": ident}, f"enrolled {ident!r} in {tenant_name!r}")


@cli.group()
def policy() -> None:
    """Who may do what to which keys, per tenant (deny by default)."""


PERMS_HELP = (
    "Comma-separated: read, sign, verify, encrypt, decrypt, agree, generate, delete, export, "
    "random, or all."
)


@policy.command("grant")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--keys", required=True, help="Key-name pattern (shell wildcards), e.g. 'app-*'.")
@click.option("--permissions", "perms", required=True, help=PERMS_HELP)
@pass_state
def policy_grant(state: State, tenant_name: str, ident: str, keys: str, perms: str) -> None:
    """Let IDENTITY (or '*', every identity of the tenant) do PERMISSIONS on matching keys."""
    from .service.tenants import parse_permissions

    parsed = parse_permissions(perms)
    with (
        _tenant_store(state) as store,
        _audit_change(
            state,
            "policy_grant",
            tenant=tenant_name,
            identity=ident,
            keys=keys,
            permissions=",".join(sorted(parsed)),
        ),
    ):
        if state.remote():
            store.grant(tenant_name, ident, keys, [p.value for p in parsed])
        else:
            store.grant(tenant_name, ident, keys, parsed)
    state.emit(
        {"tenant": tenant_name, "identity": ident, "keys": keys, "permissions": sorted(parsed)},
        f"granted {', '.join(sorted(parsed))} on {keys!r} to {ident!r} in {tenant_name!r}",
    )


@policy.command("revoke")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--keys", required=True, help="The key-name pattern of the grant.")
@click.option("--permissions", "perms", help=PERMS_HELP + " Default: all of the grant.")
@pass_state
def policy_revoke(state: State, tenant_name: str, ident: str, keys: str, perms: str | None) -> None:
    """Take back permissions granted on a key pattern."""
    from .service.tenants import parse_permissions

    parsed = parse_permissions(perms) if perms else None
    with (
        _tenant_store(state) as store,
        _audit_change(
            state,
            "policy_revoke",
            tenant=tenant_name,
            identity=ident,
            keys=keys,
            permissions="all" if parsed is None else ",".join(sorted(parsed)),
        ),
    ):
        if state.remote():
            store.revoke_policy(
                tenant_name, ident, keys, None if parsed is None else [p.value for p in parsed]
            )
        else:
            store.revoke_policy(tenant_name, ident, keys, parsed)
    state.emit({"revoked": True}, f"revoked on {keys!r} from {ident!r} in {tenant_name!r}")


@policy.command("list")
@click.option("--tenant", "tenant_name", help="Only this tenant's policies.")
@pass_state
def policy_list(state: State, tenant_name: str | None) -> None:
    """List policies."""
    with _tenant_store(state) as store:
        found = store.policies(tenant_name)
    rows = [p if isinstance(p, dict) else p.to_dict() for p in found]
    state.emit(
        rows,
        lambda: table(
            [[r["tenant"], r["identity"], r["keys"], ",".join(r["permissions"])] for r in rows],
            ["TENANT", "IDENTITY", "KEYS", "PERMISSIONS"],
        ),
    )


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
        fail("aborted", 12)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


__all__ = ["Usage", "cli", "main"]
