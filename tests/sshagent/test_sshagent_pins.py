"""PINs in `strongroom ssh-agent`: a `prompt` PIN is asked through $SSH_ASKPASS (the agent
has no terminal once detached), once, and kept; a PIN the token refuses is tried once and
stops the agent as it starts.

The agent runs as its own process (`strongroom ssh-agent -D`, in a new session: no
controlling terminal), on a fresh SoftHSM2 token reached through OpenSC's pkcs11-spy,
whose log counts every C_Login the token really received; signatures come from OpenSSH's
`ssh-keygen -Y sign`.
"""

from __future__ import annotations

import glob
import os
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STRONGROOM_BIN, VAULT_PASS_ENV, VAULT_PASSPHRASE
from pkcs11_support import SoftHsm, cli, make_token, write_config

SPY = next(iter(sorted(glob.glob("/usr/lib/*/pkcs11/pkcs11-spy.so"))), "pkcs11-spy.so")
"""OpenSC's logging PKCS#11 module (Debian's opensc-pkcs11, any architecture)."""

ASKPASS = """#!/bin/sh
printf '%s|%s\\n' "${SSH_ASKPASS_PROMPT:-}" "$1" >> "$(dirname "$0")/asked"
cat "$(dirname "$0")/pin"
"""


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftHsm, Path]:
    """A token of this module's own with one P-256 key, `ssh-pin`, and the key's .pub (in
    the directory whose data/ holds the keystore)."""
    if not Path(SPY).is_file():
        pytest.fail(f"{SPY} is missing; run scripts/setup.sh (it installs opensc)")
    directory = tmp_path_factory.mktemp("sshagent-pins")
    hsm = make_token(directory / "token")
    config = write_config(directory, hsm)
    made = cli(
        config, hsm, "key", "generate", "ssh-pin", "--type", "ecdsa-p256", "--backend", "hsm"
    )
    assert made.returncode == 0, made.stderr
    public = cli(config, hsm, "key", "public", "ssh-pin", "--format", "openssh")
    assert public.returncode == 0, public.stderr
    pub = directory / "ssh-pin.pub"
    pub.write_bytes(public.stdout)
    return hsm, pub


class SpiedAgent:
    """`strongroom ssh-agent -D` with `pin = "prompt"`, SSH_ASKPASS a script that answers
    with the contents of `pin`, and the token behind pkcs11-spy (its log: `spy.log`)."""

    def __init__(self, directory: Path, hsm: SoftHsm, pub: Path, pin: str) -> None:
        self.directory = directory
        # The keystore's data dir is the token fixture's (beside the .pub); the rest is ours.
        self.config = write_config(pub.parent, hsm, pin_ref="prompt", module=SPY, name="agent.toml")
        (directory / "pin").write_text(pin + "\n")
        askpass = directory / "askpass"
        askpass.write_text(ASKPASS)
        askpass.chmod(0o700)
        self.socket = directory / "agent.sock"
        self.spy_log = directory / "spy.log"
        env = {
            **os.environ,
            "SOFTHSM2_CONF": str(hsm.conf),
            "PKCS11SPY": hsm.module,
            "PKCS11SPY_OUTPUT": str(self.spy_log),
            "SSH_ASKPASS": str(askpass),
            VAULT_PASS_ENV: VAULT_PASSPHRASE,
        }
        env.pop("SSH_ASKPASS_REQUIRE", None)
        env.pop("DISPLAY", None)
        self.process = subprocess.Popen(
            [
                *(str(STRONGROOM_BIN), "--config", str(self.config), "ssh-agent", "-D"),
                *("-a", str(self.socket), "--keys", "ssh-*"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # no controlling terminal, as once detached
        )
        assert self.process.stdout is not None
        # The first line once it serves, or b"" once it exits; 60 s bounds a hang.
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        self.first_line = self.process.stdout.readline() if ready else b"(no answer)"

    def sign(self, pub: Path) -> subprocess.CompletedProcess[bytes]:
        message = self.directory / "message"
        message.write_text("sign me\n")
        message.with_suffix(".sig").unlink(missing_ok=True)  # ssh-keygen keeps an old one
        return subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub), str(message)],
            env={**os.environ, "SSH_AUTH_SOCK": str(self.socket)},
            capture_output=True,
            timeout=60,
            check=False,
        )

    def asked(self) -> list[str]:
        path = self.directory / "asked"
        return path.read_text().splitlines() if path.exists() else []

    def logins(self) -> int:
        """C_Login calls the token received (pkcs11-spy logs each call it passes on)."""
        return sum(1 for line in self.spy_log.read_text().splitlines() if "C_Login" in line)

    def stop(self) -> str:
        self.process.terminate()
        try:
            _out, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _out, err = self.process.communicate(timeout=30)
        return err.decode("utf-8", "replace")


@pytest.fixture
def spied(tmp_path: Path, token: tuple[SoftHsm, Path]) -> Iterator[list[SpiedAgent]]:
    agents: list[SpiedAgent] = []
    yield agents
    for agent in agents:
        if agent.process.poll() is None:
            agent.stop()


def test_a_prompt_pin_is_asked_through_askpass_once_and_kept(
    tmp_path: Path, token: tuple[SoftHsm, Path], spied: list[SpiedAgent]
) -> None:
    hsm, pub = token
    agent = SpiedAgent(tmp_path, hsm, pub, hsm.pin)
    spied.append(agent)
    assert agent.first_line.startswith(b"SSH_AUTH_SOCK="), agent.stop()
    for _ in range(3):
        signed = agent.sign(pub)
        assert signed.returncode == 0, signed.stderr
    asked = agent.asked()
    assert len(asked) == 1
    kind, prompt = asked[0].split("|", 1)
    assert kind == "" and "PIN for token 'strongroom-test'" in prompt  # a question, not confirm
    assert agent.logins() == 1
    stderr = agent.stop()
    assert hsm.pin not in stderr


def test_a_refused_pin_stops_the_agent_after_one_try(
    tmp_path: Path, token: tuple[SoftHsm, Path], spied: list[SpiedAgent]
) -> None:
    """The agent opens the token as it starts (it reads the keys it offers): a PIN the
    token refuses stops it there, with the reason and without the PIN, after one C_Login
    and one question; it never serves on, asking the token again at each signature. (The
    backend's own memory of a refused PIN, for a keystore that stays open, is tested in
    tests/backends/test_pkcs11.py.)"""
    hsm, pub = token
    wrong = "0000-wrong-pin"
    agent = SpiedAgent(tmp_path, hsm, pub, wrong)
    spied.append(agent)
    assert agent.first_line == b""  # no SSH_AUTH_SOCK line: it did not start
    stderr = agent.stop()
    assert agent.process.returncode not in (0, None)
    assert "wrong PIN for token 'strongroom-test'" in stderr, stderr
    assert wrong not in stderr
    assert agent.logins() == 1
    assert len(agent.asked()) == 1
    assert not agent.socket.exists()


def test_the_askpass_prompter(tmp_path: Path) -> None:
    """The answer is askpass's stdout less one newline; exit status 1 (cancel) or a program
    that cannot run is AuthenticationFailed, naming the prompt and never an answer; a new
    secret (confirm) is asked twice."""
    from strongroom.errors import AuthenticationFailed
    from strongroom.sshagent.agent import askpass_prompter

    script = tmp_path / "askpass"
    script.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$1" >> "$(dirname "$0")/asked"\n'
        'cat "$(dirname "$0")/answer"\nexit "$(cat "$(dirname "$0")/status")"\n'
    )
    script.chmod(0o700)
    (tmp_path / "status").write_text("0")
    (tmp_path / "answer").write_text("12 34 \n\n")
    ask = askpass_prompter(str(script))
    assert ask("PIN for token 'x': ", False) == "12 34 \n"  # one newline removed, no more
    (tmp_path / "answer").write_text("secret")
    assert ask("Passphrase: ", True) == "secret"
    assert (tmp_path / "asked").read_text().splitlines()[-2:] == [
        "Passphrase: ",
        "Again: Passphrase: ",
    ]
    (tmp_path / "status").write_text("1")
    with pytest.raises(AuthenticationFailed, match="PIN for token 'x': cancelled") as e:
        ask("PIN for token 'x': ", False)
    assert "secret" not in str(e.value)
    with pytest.raises(AuthenticationFailed, match="askpass did not answer"):
        askpass_prompter(str(tmp_path / "missing"))("PIN: ", False)
