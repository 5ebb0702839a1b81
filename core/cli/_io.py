"""What the commands share: reading input and key material, writing output (never binary to a
terminal unasked), tables, the exit of the process, and the options several commands take."""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar, cast

import click

from ..errors import InvalidArgument
from ..secrets import (
    NEW_PASSPHRASE_MIN_LENGTH,
    SecretSource,
    check_new_passphrase,
    new_passphrase_policy,
    validate_reference,
)
from ..types import KeyInfo
from ._state import State

# The exit codes that are no error class's (`EXIT_CODES` in __init__.py has those).
EXIT_OK = 0
EXIT_BAD_SIGNATURE = 1
EXIT_USAGE = 2
EXIT_OTHER = 12


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


def binary_refused(what: str) -> click.UsageError:
    return click.UsageError(
        f"not writing {what} to the terminal: it is binary; give --out FILE, "
        "or --out - to write it to the terminal anyway",
        click.get_current_context(silent=True),
    )


def refuse_binary_on_terminal(out: str | None, what: str) -> None:
    """Binary output goes to a terminal only when asked for with `--out -`: it would garble
    the terminal, and a secret would sit in its scrollback. Checked before any work."""
    if out is None and sys.stdout.isatty():
        raise binary_refused(what)


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\t\n\r" for c in text)


def is_text(data: bytes) -> bool:
    """UTF-8 without control characters (escape sequences included): safe on a terminal."""
    try:
        return _printable(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False


class TerminalText:
    """stdout at a terminal for decrypted data as it streams: text passes, and the first
    chunk that is not text is refused before it is written."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            text = self._decoder.decode(bytes(data))
        except UnicodeDecodeError:
            raise binary_refused("the decrypted data") from None
        if not _printable(text):
            raise binary_refused("the decrypted data")
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
    mode = os.fstat(fd).st_mode
    # An existing regular file keeps its mode, and a key must not: make it the owner's. A
    # device, FIFO or terminal (`--out /dev/null`, `--out /dev/stdout`) is not ours to
    # change: as root, fchmod would make /dev/null root's alone for the whole machine.
    if stat.S_ISREG(mode) and mode & 0o077:
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class _WriteAll(io.RawIOBase):
    """An unbuffered writer that writes all it is given (a raw write to a pipe may be short)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        return done

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class Output:
    """A file written beside its destination and renamed into place only on success, so a
    failure never leaves partial plaintext and never clobbers an existing file. stdout, and
    a destination that is not a regular file (a device, FIFO or terminal), are written as
    the data comes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._tmp: str | None = None
        self._opened: BinaryIO | None = None  # a special file we opened, closed at the end
        if path in (None, "-"):
            self.stream: BinaryIO = sys.stdout.buffer
            return
        target = Path(str(path))
        try:
            special = not stat.S_ISREG(os.stat(target).st_mode)
        except FileNotFoundError:
            special = False
        except OSError as e:
            raise InvalidArgument(f"cannot write {path}: {e.strerror}") from None
        if special:
            # A device, FIFO or terminal is written in place: a file renamed over it would
            # replace the node itself (as root, /dev/null would become a regular file). Like
            # stdout it gets the data as it comes; unbuffered, so that a failure releases
            # nothing more when the file is closed.
            try:
                fd = os.open(target, os.O_WRONLY)
            except OSError as e:
                raise InvalidArgument(f"cannot write {path}: {e.strerror}") from None
            self._opened = cast(BinaryIO, _WriteAll(fd))
            self.stream = self._opened
            return
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
        if self._opened is not None:
            with contextlib.suppress(OSError):
                self._opened.close()
            self._opened = None
        if self._tmp is not None:
            self.stream.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


class Prepended:
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
def open_out(path: str | None) -> Iterator[Output]:
    out = Output(path)
    try:
        yield out
    finally:
        out.abort()


@contextlib.contextmanager
def open_in(path: str | None) -> Iterator[io.BufferedReader]:
    if path in (None, "-"):
        yield cast(io.BufferedReader, sys.stdin.buffer)
        return
    try:
        f = cast(io.BufferedReader, open(str(path), "rb", buffering=1 << 20))
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


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


def parse_hex(text: str, what: str = "salt") -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be hex") from None


def secret_source(ref: str, prompt: str, option: str = "--passphrase") -> SecretSource:
    """The secret an option names; without a terminal, the hint is that option's env: form."""
    try:
        validate_reference(ref)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    return SecretSource([ref], prompt, hint=f"give {option} env:NAME or {option} file:PATH")


def new_passphrase(ref: str, prompt: str, option: str = "--passphrase") -> str:
    """A new passphrase (asked twice at a prompt), held to the minimum length."""
    value = secret_source(ref, prompt, option).get(confirm=True)
    check_new_passphrase(value)
    return value


# -- the global options, taken before and after any command -----------------------------------
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


def global_options() -> list[click.Parameter]:
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
        self.params.extend(global_options())


class StrongroomSubGroup(click.Group):
    """A command group (`key`, `vault`, ...) whose commands take the global options too."""

    command_class = StrongroomCommand
    group_class = type  # nested groups are of this class as well

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())


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


# -- options that several commands take, defined once (their help differs per command) -----------
FC = TypeVar("FC", bound="Callable[..., Any] | click.Command")

public_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "der", "raw", "openssh"]),
    default="pem",
    show_default=True,
)
"""`--format` of a public key written out (`key public`, `audit public-key`)."""


def in_option(help: str | None = None) -> Callable[[FC], FC]:
    """`--in FILE`, the input (stdin when not given, or `-`)."""
    return click.option("--in", "inp", metavar="FILE", help=help)


def out_option(help: str | None = None) -> Callable[[FC], FC]:
    """`--out FILE`, where the output goes (stdout when not given, or `-`)."""
    return click.option("--out", "out", metavar="FILE", help=help)


def usage_option(help: str | None = None) -> Callable[[FC], FC]:
    """`--usage LIST`, the comma-separated usages of a key being made."""
    return click.option("--usage", help=help)


def exportable_option(help: str | None = None) -> Callable[[FC], FC]:
    """`--exportable`, a flag: the key being made may be exported or wrapped."""
    return click.option("--exportable", is_flag=True, help=help)
