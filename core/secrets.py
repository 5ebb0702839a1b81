"""Secret references in config: `env:NAME`, `file:PATH` or `prompt`, never a literal.

A reference is resolved only when the secret is needed. The value is a Python
`str`, which cannot be wiped; see docs/threat-model.md.
"""

from __future__ import annotations

import getpass
import hmac
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthenticationFailed, ConfigError

Prompter = Callable[[str, bool], str]
"""prompter(prompt, confirm) → the secret typed by a person."""


def terminal_prompter(prompt: str, confirm: bool) -> str:
    """Ask on the terminal without echo; refuse when there is no terminal."""
    if not sys.stdin.isatty():
        raise AuthenticationFailed(
            f"{prompt.rstrip(': ')} is needed but there is no terminal to ask on; "
            "set it with env: or file: in the config"
        )
    value = getpass.getpass(prompt)
    if confirm and not hmac.compare_digest(getpass.getpass("again: ").encode(), value.encode()):
        raise AuthenticationFailed("the two entries differ")
    return value


def validate_reference(ref: str) -> None:
    """Raise ValueError unless `ref` is env:NAME, file:PATH or prompt."""
    if ref == "prompt":
        return
    scheme, sep, rest = ref.partition(":")
    if sep and scheme in ("env", "file") and rest:
        return
    raise ValueError("a secret must be given as env:NAME, file:PATH or prompt, never inline")


@dataclass
class SecretSource:
    """One or more references, tried in order; the first that yields a value wins."""

    refs: Sequence[str]
    prompt: str
    prompter: Prompter = terminal_prompter

    def available(self) -> bool:
        """True when some reference could give a value without failing."""
        for ref in self.refs:
            if ref == "prompt":
                return sys.stdin.isatty() or self.prompter is not terminal_prompter
            scheme, _, rest = ref.partition(":")
            if scheme == "env" and rest in os.environ:
                return True
            if scheme == "file" and Path(rest).expanduser().is_file():
                return True
        return False

    def get(self, confirm: bool = False) -> str:
        """Resolve the secret now."""
        for ref in self.refs:
            if ref == "prompt":
                return self.prompter(self.prompt, confirm)
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
        raise AuthenticationFailed(f"{self.prompt.rstrip(': ')} is not available (tried {where})")
