"""`ssh` logs in with PIV card keys through `strongroom ssh-agent`: the card emulator over
pcscd (one card for the module), an sshd of the test's own. RSA goes as rsa-sha2-512, which
ssh asks for by default: hashed and padded on the host, the raw RSA on the card.

Like the other PIV modules, this one uses the machine's one pcscd: run it alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pcsc_support
import pytest
from piv_card import DEFAULT_PIN
from piv_support import (
    PIV_PIN_ENV,
    PIV_VAULT_PASS,
    PIV_VAULT_PASS_ENV,
    PivReader,
    piv_reader,
    write_piv_config,
)
from sshagent_support import Sshd, running_agent, start_sshd

import strongroom
from strongroom import algorithms
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings

__all__ = ["piv_reader"]  # the fixture, imported so pytest finds it

_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

KEYS = {"ssh-piv-p256": "ecdsa-p256", "ssh-piv-rsa": "rsa-2048"}


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory, piv_reader: PivReader) -> Iterator[Keystore]:
    os.environ[PIV_VAULT_PASS_ENV] = PIV_VAULT_PASS
    os.environ[PIV_PIN_ENV] = DEFAULT_PIN
    config = write_piv_config(tmp_path_factory.mktemp("sshagent-piv"), piv_reader.name)
    with strongroom.open(config) as keystore:
        for name, key_type in KEYS.items():
            keystore.generate(name, key_type, backend="piv")
        yield keystore


@pytest.fixture(scope="module")
def pubs(ks: Keystore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("piv-pubs")
    out = {}
    for name in KEYS:
        out[name] = directory / f"{name}.pub"
        out[name].write_bytes(algorithms.encode_public(ks.public_key(name), "openssh") + b"\n")
    return out


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, pubs: dict[str, Path]) -> Iterator[Sshd]:
    authorized = "".join(p.read_text() for p in pubs.values())
    server = start_sshd(tmp_path_factory.mktemp("sshd-piv"), authorized)
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(KEYS))
def test_ssh_logs_in_with_a_piv_key(
    ks: Keystore, sshd: Sshd, pubs: dict[str, Path], name: str
) -> None:
    assert ks.info(name).backend == "piv"
    with running_agent(ks, AgentSettings(patterns=("ssh-piv-*",))) as agent:
        out = sshd.ssh(agent.path, pubs[name], "echo", "logged-in", options=("-vvv",))
    assert out.returncode == 0, out.stderr + sshd.log.read_text()
    assert out.stdout == "logged-in\n"
    assert "Accepted publickey for " in sshd.log.read_text()
    if name == "ssh-piv-rsa":  # ssh's own choice, which the agent used to refuse
        assert "signing using rsa-sha2-512" in out.stderr
