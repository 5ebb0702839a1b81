"""Secret references in config: `env:NAME`, `file:PATH` or `prompt`, never a literal.

A reference is resolved only when the secret is needed. The value is a Python
`str`, which cannot be wiped; see docs/threat-model.md.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import AuthenticationFailed, ConfigError, InvalidArgument

Prompter = Callable[[str, bool], str]
"""prompter(prompt, confirm) → the secret typed by a person."""

T = TypeVar("T")

TTY = "/dev/tty"
"""The controlling terminal. Prompts use it even when stdin is a pipe (`echo data |
strongroom key sign k`), as ssh and gpg do, so the data and the passphrase do not mix."""

PROMPT_TRIES = 3
"""How often a person at the prompt may type a wrong vault passphrase in one run."""

NEW_PASSPHRASE_MIN_LENGTH = 12

_weak_passphrase_hint: ContextVar[str | None] = ContextVar("strongroom_weak_passphrase_hint")


@contextlib.contextmanager
def _tty() -> Iterator[int]:
    """The controlling terminal, opened for reading and writing; OSError when there is none."""
    fd = os.open(TTY, os.O_RDWR | os.O_NOCTTY)
    try:
        yield fd
    finally:
        os.close(fd)


def tty_available() -> bool:
    """Whether this process has a controlling terminal to ask on."""
    try:
        with _tty():
            return True
    except OSError:
        return False


def _read_hidden(fd: int, prompt: str) -> str:
    """Write `prompt` to the terminal `fd` and read one line with echo off."""
    import termios

    try:
        saved = termios.tcgetattr(fd)
    except termios.error:  # not a real terminal: refuse rather than read a secret with echo on
        raise AuthenticationFailed(f"{TTY} cannot turn off echo; not asking on it") from None
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO  # lflag
    with io.FileIO(fd, "r+", closefd=False) as raw:
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            raw.write(prompt.encode())
            line = bytearray()
            while not line.endswith(b"\n"):
                piece = raw.read(1)
                if not piece:
                    break
                line += piece
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
            raw.write(b"\n")  # the Enter the person typed was not echoed
    if not line:
        raise AuthenticationFailed(f"{prompt.rstrip(': ')}: nothing typed (end of input)")
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:  # replacing bytes would make different passphrases equal
        raise InvalidArgument(
            "what was typed is not UTF-8; check the terminal's encoding"
        ) from None


def tell_terminal(message: str) -> None:
    """Print a line on the controlling terminal, if there is one (stdout may be data)."""
    with contextlib.suppress(OSError), _tty() as fd:
        os.write(fd, (message + "\n").encode())


def terminal_prompter(prompt: str, confirm: bool) -> str:
    """Ask on the controlling terminal without echo; refuse when there is none."""
    try:
        with _tty() as fd:
            value = _read_hidden(fd, prompt)
            if confirm and not hmac.compare_digest(
                _read_hidden(fd, "again: ").encode(), value.encode()
            ):
                raise AuthenticationFailed("the two entries differ")
            return value
    except OSError:
        raise AuthenticationFailed(
            f"{prompt.rstrip(': ')} is needed but there is no terminal to ask on"
        ) from None


def validate_reference(ref: str) -> None:
    """Raise ValueError unless `ref` is env:NAME, file:PATH or prompt."""
    if ref == "prompt":
        return
    scheme, sep, rest = ref.partition(":")
    if sep and scheme in ("env", "file") and rest:
        return
    raise ValueError("a secret must be given as env:NAME, file:PATH or prompt, never inline")


@contextlib.contextmanager
def new_passphrase_policy(hint: str | None) -> Iterator[None]:
    """Within this block, a new passphrase under NEW_PASSPHRASE_MIN_LENGTH characters is
    refused with `hint` (the CLI's way round it); None allows any. Outside, all are allowed:
    the Python API leaves the choice to the application."""
    token = _weak_passphrase_hint.set(hint)
    try:
        yield
    finally:
        _weak_passphrase_hint.reset(token)


def check_new_passphrase(value: str, what: str = "the new passphrase") -> None:
    """Refuse a short new passphrase when a `new_passphrase_policy` asks for it."""
    hint = _weak_passphrase_hint.get(None)
    if hint is not None and len(value) < NEW_PASSPHRASE_MIN_LENGTH:
        raise InvalidArgument(
            f"{what} is shorter than {NEW_PASSPHRASE_MIN_LENGTH} characters; {hint}"
        )


@dataclass
class SecretSource:
    """One or more references, tried in order; the first that yields a value wins.

    `hint` says how to supply the secret when none of the references gives it (by default
    it is made from the references: "set $NAME")."""

    refs: Sequence[str]
    prompt: str
    prompter: Prompter = terminal_prompter
    hint: str | None = None
    prompted: bool = False
    """Whether the last `get` asked a person (so a retry means typing again)."""

    def available(self) -> bool:
        """True when some reference could give a value without failing."""
        for ref in self.refs:
            if ref == "prompt":
                return self.prompter is not terminal_prompter or tty_available()
            scheme, _, rest = ref.partition(":")
            if scheme == "env" and rest in os.environ:
                return True
            if scheme == "file" and Path(rest).expanduser().is_file():
                return True
        return False

    def how_to_supply(self) -> str:
        """The one-line fix for a missing secret."""
        if self.hint:
            return self.hint
        names = [r.partition(":")[2] for r in self.refs if r.startswith("env:")]
        if names:
            return "set " + " or ".join(f"${n}" for n in names)
        return "give it as env:NAME or file:PATH in the config, or run at a terminal"

    def get(self, confirm: bool = False) -> str:
        """Resolve the secret now."""
        self.prompted = False
        what = self.prompt.rstrip(": ")
        for ref in self.refs:
            if ref == "prompt":
                if self.prompter is terminal_prompter and not tty_available():
                    raise AuthenticationFailed(
                        f"{what} is needed but there is no terminal to ask on; "
                        f"{self.how_to_supply()}"
                    )
                value = self.prompter(self.prompt, confirm)
                self.prompted = True
                return value
            scheme, _, rest = ref.partition(":")
            if scheme == "env":
                if rest in os.environ:
                    return os.environ[rest]
                continue
            if scheme == "file":
                path = Path(rest).expanduser()
                if not path.is_file():
                    continue
                mode = path.stat().st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise ConfigError(
                        "secret file is readable by group or others; chmod 600 it", str(path)
                    )
                return path.read_text(encoding="utf-8").rstrip("\r\n")
        where = ", ".join(self.refs) or "nothing configured"
        raise AuthenticationFailed(
            f"{what} is not available (tried {where}); {self.how_to_supply()}"
        )

    def verify(self, check: Callable[[str], T], tries: int = PROMPT_TRIES) -> T:
        """Resolve the secret and return `check(secret)`. When a person typed it at the prompt
        and `check` raises AuthenticationFailed, ask again, up to `tries` times in all; a
        secret from env: or file: gets one try (it would be the same again).

        Only for secrets checked in software (the vault passphrase): a hardware PIN counts
        against the device's lockout, so it is never retried automatically.
        """
        tries = max(tries, 1)
        for attempt in range(1, tries + 1):
            value = self.get()
            try:
                return check(value)
            except AuthenticationFailed:
                if not self.prompted or attempt == tries:
                    raise
                if self.prompter is terminal_prompter:
                    tell_terminal("Sorry, try again.")
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
