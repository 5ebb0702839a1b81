"""Passphrase prompts on the controlling terminal (/dev/tty), with stdin a pipe of data.

The CLI runs in a new session whose controlling terminal is a pseudo-terminal; the test
types at it like a person. SecretSource.verify's retry rule is unit-tested with a stub
prompter: three tries for a person at the prompt, one for env: and file:.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    assert_openssl_verified,
    openssl_verify,
    run_cli,
    write_vault_config,
)

from strongroom.errors import AuthenticationFailed
from strongroom.secrets import SecretSource

DATA = b"piped data, typed passphrase\n"
PROMPT = b"Vault passphrase: "
LIMIT = 120.0  # seconds before a stuck child is called a failure (never a timing assertion)


class Terminal:
    """`strongroom ARGS` in its own session, a pseudo-terminal as its controlling terminal,
    stdin a pipe and stdout a file."""

    def __init__(self, config: Path, *args: str, stdin: bytes, out: Path) -> None:
        # the test keeps the slave open too: with none open, reading the master fails (EIO)
        self.master, self.slave = os.openpty()
        slave_name = os.ttyname(self.slave)

        def take_the_terminal() -> None:  # after setsid: the first tty opened becomes ours
            os.close(os.open(slave_name, os.O_RDWR))

        env = {**os.environ, "STRONGROOM_CONFIG": str(config)}
        env.pop(VAULT_PASS_ENV, None)
        with out.open("wb") as stdout:
            self.proc = subprocess.Popen(
                [str(STRONGROOM_BIN), *args],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=take_the_terminal,  # one open(2), before exec
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(stdin)
        self.proc.stdin.close()
        self.screen = b""

    def wait_for(self, text: bytes, count: int = 1) -> None:
        """Read the terminal until `text` has appeared `count` times in all."""
        deadline = time.monotonic() + LIMIT
        while self.screen.count(text) < count:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {self.screen!r}"
            if select.select([self.master], [], [], 1.0)[0]:
                self.screen += os.read(self.master, 4096)
            elif self.proc.poll() is not None:
                break
        assert self.screen.count(text) >= count, f"no {text!r} on the terminal: {self.screen!r}"

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self) -> tuple[int, str]:
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode()
        code = self.proc.wait(LIMIT)
        os.close(self.slave)
        while select.select([self.master], [], [], 0)[0]:
            try:
                piece = os.read(self.master, 4096)
            except OSError:
                break
            if not piece:
                break
            self.screen += piece
        os.close(self.master)
        return code, stderr


@pytest.fixture
def vault(tmp_path: Path) -> tuple[Path, Path]:
    """(config with passphrase = prompt, config with the env passphrase) over one vault."""
    by_env = write_vault_config(tmp_path, name="env.toml")
    assert run_cli(by_env, "init").returncode == 0
    assert run_cli(by_env, "key", "generate", "k", "--type", "ed25519").returncode == 0
    return write_vault_config(tmp_path, passphrase_ref="prompt", name="prompt.toml"), by_env


def test_piped_stdin_and_a_prompt_on_the_terminal_work_together(
    vault: tuple[Path, Path], tmp_path: Path
) -> None:
    by_prompt, by_env = vault
    sig = tmp_path / "sig"
    term = Terminal(by_prompt, "key", "sign", "k", stdin=DATA, out=sig)
    term.wait_for(PROMPT)
    term.type(VAULT_PASSPHRASE)
    code, stderr = term.finish()
    assert code == 0, stderr
    assert VAULT_PASSPHRASE.encode() not in term.screen  # no echo
    assert len(sig.read_bytes()) == 64
    (tmp_path / "signed").write_bytes(DATA)
    pub = tmp_path / "k.pem"
    assert run_cli(by_env, "key", "public", "k", "--out", str(pub)).returncode == 0
    assert_openssl_verified(openssl_verify("ed25519", tmp_path, "k.pem", "sig", "signed"))


def test_a_wrong_passphrase_at_the_prompt_asks_again(
    vault: tuple[Path, Path], tmp_path: Path
) -> None:
    by_prompt, _ = vault
    sig = tmp_path / "sig"
    term = Terminal(by_prompt, "key", "sign", "k", stdin=DATA, out=sig)
    for attempt in (1, 2):
        term.wait_for(PROMPT, attempt)
        term.type(f"wrong guess {attempt}")
    term.wait_for(PROMPT, 3)
    term.type(VAULT_PASSPHRASE)
    code, stderr = term.finish()
    assert code == 0, stderr
    assert term.screen.count(b"Sorry, try again.") == 2
    assert len(sig.read_bytes()) == 64


def test_three_wrong_passphrases_fail_with_exit_4(vault: tuple[Path, Path], tmp_path: Path) -> None:
    by_prompt, _ = vault
    sig = tmp_path / "sig"
    term = Terminal(by_prompt, "key", "sign", "k", stdin=DATA, out=sig)
    for attempt in (1, 2, 3):
        term.wait_for(PROMPT, attempt)
        term.type(f"wrong guess {attempt}")
    code, stderr = term.finish()
    assert code == 4, stderr
    assert stderr.strip() == "strongroom: error: wrong vault passphrase"
    assert term.screen.count(PROMPT) == 3
    assert sig.read_bytes() == b""


def test_a_new_passphrase_is_asked_twice_on_the_terminal(tmp_path: Path) -> None:
    cfg = write_vault_config(tmp_path, passphrase_ref="prompt")
    term = Terminal(cfg, "init", stdin=b"", out=tmp_path / "out")
    term.wait_for(PROMPT)
    term.type("short")
    term.wait_for(b"again: ")
    term.type("short")
    code, stderr = term.finish()
    assert code == 2 and "--allow-weak" in stderr, stderr
    term = Terminal(cfg, "init", stdin=b"", out=tmp_path / "out")
    term.wait_for(PROMPT)
    term.type(VAULT_PASSPHRASE)
    term.wait_for(b"again: ")
    term.type(VAULT_PASSPHRASE)
    code, stderr = term.finish()
    assert code == 0, stderr


# -- the retry rule ---------------------------------------------------------------------------
class Person:
    """A prompter that types the given answers in turn."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, prompt: str, confirm: bool) -> str:
        self.asked += 1
        return self.answers.pop(0)


def check(value: str) -> str:
    if value != "right":
        raise AuthenticationFailed("wrong passphrase")
    return value


def test_a_person_gets_three_tries() -> None:
    person = Person("a", "b", "right")
    assert SecretSource(["prompt"], "P: ", person).verify(check) == "right"
    assert person.asked == 3
    person = Person("a", "b", "c", "right")
    with pytest.raises(AuthenticationFailed):
        SecretSource(["prompt"], "P: ", person).verify(check)
    assert person.asked == 3


def test_env_and_file_get_one_try(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SR_TEST_WRONG", "wrong")
    person = Person("right")
    source = SecretSource(["env:SR_TEST_WRONG", "prompt"], "P: ", person)
    with pytest.raises(AuthenticationFailed):
        source.verify(check)
    assert person.asked == 0  # env gave a value: the prompt is not a second chance
    secret = tmp_path / "s"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    with pytest.raises(AuthenticationFailed):
        SecretSource([f"file:{secret}"], "P: ", person).verify(check)
    assert person.asked == 0
