"""asyncssh's agent client against `strongroom ssh-agent`: a second, independent client
implementation (besides OpenSSH's ssh-add) for listing, signing, adding keys with the
lifetime and confirm constraints, removing, locking and the extensions; and asyncssh as
an SSH client logging in to an sshd of the test's own through the agent.

asyncssh has no parameter for restrict-destination; that constraint is tested with
`ssh-add -h` (test_sshagent_openssh.py) and message by message (test_sshagent_policy.py).
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from sshagent_support import RunningAgent, Sshd, running_agent, start_sshd

import strongroom
from strongroom import algorithms
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings

with warnings.catch_warnings():  # asyncssh imports cryptography's deprecated DSA at load
    warnings.simplefilter("ignore")
    import asyncssh

KEYS = {  # no pattern of the agent matches the names of added keys, ssh-agent/...
    "id-ed25519": "ed25519",
    "id-p256": "ecdsa-p256",
    "id-p384": "ecdsa-p384",
    "id-rsa": "rsa-3072",
}
T = TypeVar("T")

ASKPASS = """#!/bin/sh
printf '%s\\n' "$1" >> "$(dirname "$0")/prompts"
exit "$(cat "$(dirname "$0")/answer")"
"""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=120))  # a bound on a hang


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(tmp_path_factory.mktemp("sshagent-asyncssh"))
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        for name, key_type in KEYS.items():
            keystore.generate(name, key_type)
        yield keystore


@pytest.fixture
def askpass(tmp_path: Path) -> Path:
    script = tmp_path / "askpass"
    script.write_text(ASKPASS)
    script.chmod(0o700)
    (tmp_path / "answer").write_text("0")
    return script


@pytest.fixture
def agent(ks: Keystore, askpass: Path) -> Iterator[RunningAgent]:
    settings = AgentSettings(patterns=("id-*",), allow_add=True, askpass=str(askpass))
    with running_agent(ks, settings) as running:
        yield running


def _public(ks: Keystore, name: str) -> asyncssh.SSHKey:
    return asyncssh.import_public_key(algorithms.encode_public(ks.public_key(name), "openssh"))


def test_lists_and_signs_with_every_key_type(ks: Keystore, agent: RunningAgent) -> None:
    """get_keys lists the configured keys by name; each signature verifies with asyncssh's
    own verifier; RSA signs rsa-sha2-256 and -512 on request and refuses SHA-1 ssh-rsa."""

    async def go() -> None:
        async with asyncssh.connect_agent(str(agent.path)) as client:
            listed = await client.get_keys()
            assert sorted(k.get_comment() or "" for k in listed) == sorted(KEYS)
            for pair in listed:
                name = pair.get_comment() or ""
                public = _public(ks, name)
                assert pair.public_data == public.public_data
                algs = [b"rsa-sha2-256", b"rsa-sha2-512"] if "rsa" in name else [None]
                for alg in algs:
                    [fresh] = await client.get_keys([pair.public_data])  # flags accumulate
                    if alg is not None:
                        fresh.set_sig_algorithm(alg)
                    data = os.urandom(48)
                    signature = await fresh.sign_async(data)
                    assert public.verify(data, signature), (name, alg)
                    if alg is not None:
                        assert signature[4 : 4 + len(alg)] == alg
            [rsa] = await client.get_keys([_public(ks, "id-rsa").public_data])
            with pytest.raises(ValueError, match="Unable to sign"):
                await client.sign(rsa.public_data, b"sha-1 is refused", 0)

    run(go())


def test_added_keys_with_constraints_remove_and_remove_all(
    ks: Keystore, agent: RunningAgent, tmp_path: Path
) -> None:
    """add_keys(confirm=True): each signature asks through SSH_ASKPASS, "no" refuses;
    add_keys(lifetime=1): the agent forgets the key on its own; remove_keys and remove_all
    forget added keys only, and the keystore keeps what was imported."""
    confirmed = asyncssh.generate_private_key("ssh-ed25519")
    fleeting = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    lasting = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    prompts, answer = tmp_path / "prompts", tmp_path / "answer"

    async def go() -> None:
        async with asyncssh.connect_agent(str(agent.path)) as client:
            await client.add_keys([confirmed], confirm=True)
            await client.add_keys([fleeting], lifetime=1)
            await client.add_keys([lasting], lifetime=3600)
            [added] = await client.get_keys([confirmed.public_data])
            signature = await added.sign_async(b"confirmed")
            assert confirmed.convert_to_public().verify(b"confirmed", signature)
            assert prompts.read_text().startswith("Allow use of key ssh-agent/")
            answer.write_text("1")
            with pytest.raises(ValueError, match="Unable to sign"):
                await added.sign_async(b"refused")
            assert prompts.read_text().count("Allow use of key") == 2

            # The lifetime runs out by itself (polled, with a bound far above 1 s).
            deadline = time.monotonic() + 60
            while await client.get_keys([fleeting.public_data]):
                assert time.monotonic() < deadline, "the 1 s lifetime never ran out"
                await asyncio.sleep(0.2)
            with pytest.raises(ValueError, match="Unable to sign"):
                await client.sign(fleeting.public_data, b"expired", 0)
            assert await client.get_keys([lasting.public_data])

            # A configured key is not the agent's to remove; an added one is.
            configured = await client.get_keys([_public(ks, "id-ed25519").public_data])
            with pytest.raises(ValueError, match="Key not found"):
                await client.remove_keys(configured)
            await client.remove_keys(await client.get_keys([confirmed.public_data]))
            assert not await client.get_keys([confirmed.public_data])
            await client.remove_all()
            names = sorted(k.get_comment() or "" for k in await client.get_keys())
            assert names == sorted(KEYS)

    run(go())
    imported = [k.name for k in ks.keys() if k.name.startswith("ssh-agent/")]
    assert len(imported) == 3  # forgotten by the agent, kept by the keystore


def test_lock_unlock_and_extensions(ks: Keystore, agent: RunningAgent) -> None:
    async def go() -> None:
        async with asyncssh.connect_agent(str(agent.path)) as client:
            blob = _public(ks, "id-ed25519").public_data
            await client.lock("lock words")
            assert await client.get_keys() == []
            with pytest.raises(ValueError, match="Unable to sign"):
                await client.sign(blob, b"locked", 0)
            with pytest.raises(ValueError, match="Unable to add"):
                await client.add_keys([asyncssh.generate_private_key("ssh-ed25519")])
            with pytest.raises(ValueError, match="Unable to unlock"):
                await client.unlock("wrong words")
            await client.unlock("lock words")
            assert len(await client.get_keys()) == len(KEYS)
            assert await client.sign(blob, b"unlocked", 0)
            # `query`: the agent answers as OpenSSH's does and RFC 9987 says
            # (SSH_AGENT_EXTENSION_RESPONSE, "query", the names); asyncssh up to 2.24 reads
            # the earlier draft's SSH_AGENT_SUCCESS form and reports the type it did not
            # expect. Either way the agent answers, and the connection serves on.
            try:
                names = await client.query_extensions()
            except ValueError as e:
                assert "Unknown SSH agent response: 29" in str(e)
            else:
                assert names == ["query", "session-bind@openssh.com"]

        async with asyncssh.connect_agent(str(agent.path)) as client:
            assert len(await client.get_keys()) == len(KEYS)

    run(go())


@pytest.fixture(scope="module")
def sshd(ks: Keystore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    authorized = "".join(
        algorithms.encode_public(ks.public_key(name), "openssh").decode() + "\n" for name in KEYS
    )
    server = start_sshd(tmp_path_factory.mktemp("sshd-asyncssh"), authorized)
    yield server
    server.stop()


@pytest.mark.parametrize("name", sorted(KEYS))
def test_asyncssh_logs_in_through_the_agent(
    ks: Keystore, agent: RunningAgent, sshd: Sshd, tmp_path: Path, name: str
) -> None:
    """asyncssh as the SSH client: its userauth request is signed by the agent with the
    one key named (agent_identities), and sshd accepts it."""
    pub = tmp_path / f"{name}.pub"
    pub.write_bytes(algorithms.encode_public(ks.public_key(name), "openssh") + b"\n")

    async def go() -> str:
        async with asyncssh.connect(
            "127.0.0.1",
            sshd.port,
            username=os.environ.get("USER") or _user(),
            known_hosts=str(sshd.directory / "known_hosts"),
            agent_path=str(agent.path),
            agent_identities=[str(pub)],
            client_keys=[],
            config=[],
            preferred_auth="publickey",
        ) as conn:
            result = await conn.run("echo logged-in", check=True)
            return str(result.stdout)

    assert run(go()) == "logged-in\n"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
