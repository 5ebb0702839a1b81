"""Who may use a key, and where, message by message with a raw client: logins checked
against the session the connection was bound to, destination constraints (`ssh-add -h`,
restrict-destination-v00@openssh.com) and per-key policy (`[ssh_agent.policy."PATTERN"]`:
allowed_hosts, allowed_uids, confirm). With real OpenSSH: test_sshagent_openssh.py.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography.hazmat.primitives.asymmetric import ed25519
from nobody_support import run_stdlib_as_nobody, skip_unless_root_with_setpriv
from sshagent_support import (
    RawClient,
    RunningAgent,
    hop,
    parse_strings,
    restrict_destination,
    running_agent,
    s,
    userauth_request,
)

import strongroom
from strongroom import algorithms
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings, KeyPolicy, keys

FAILURE, SUCCESS, SIGN_RESPONSE = b"\x05", b"\x06", b"\x0e"
OFFERED = ("ssh-free", "ssh-hosts", "ssh-shared")
"""The keystore's keys the agents offer (a key added through an agent is ssh-agent/...)."""


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(tmp_path_factory.mktemp("sshagent-policy"))
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        for name in OFFERED:
            keystore.generate(name, "ed25519")
        yield keystore


@dataclass
class Host:
    """A server's host key, which binds connections to sessions with it."""

    private: ed25519.Ed25519PrivateKey

    @classmethod
    def new(cls) -> Host:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def blob(self) -> bytes:
        return keys.key_blob(self.private.public_key())

    @property
    def fingerprint(self) -> str:
        return keys.fingerprint(self.blob)

    def bind(self, client: RawClient, session_id: bytes, *, forwarding: bool = False) -> bytes:
        """session-bind@openssh.com, as ssh sends it after key exchange."""
        signature = s("ssh-ed25519") + s(self.private.sign(session_id))
        body = s(self.blob) + s(session_id) + s(signature) + (b"\1" if forwarding else b"\0")
        return client.request(b"\x1b" + s("session-bind@openssh.com") + body)


def _sign(client: RawClient, blob: bytes, data: bytes) -> bytes:
    return client.request(b"\x0d" + s(blob) + s(data) + b"\0\0\0\0")


def _listed(client: RawClient) -> list[bytes]:
    """The comments (key names) of REQUEST_IDENTITIES' answer."""
    reply = client.request(b"\x0b")
    assert reply[:1] == b"\x0c"
    return parse_strings(reply[5:])[1::2]


def _login(session_id: bytes, user: str, blob: bytes, host: Host | None = None) -> bytes:
    return userauth_request(session_id, user, blob, "ssh-ed25519", host.blob if host else None)


def _verifies(ks: Keystore, name: str, reply: bytes, data: bytes) -> bool:
    if reply[:1] != SIGN_RESPONSE:
        return False
    _, signature = parse_strings(parse_strings(reply[1:])[0])
    public = ks.public_key(name)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(signature, data)
    return True


@pytest.fixture(scope="module")
def agent(ks: Keystore) -> Iterator[RunningAgent]:
    with running_agent(ks, AgentSettings(patterns=OFFERED)) as running:
        yield running


def test_a_login_must_be_for_the_session_the_connection_is_bound_to(
    ks: Keystore, agent: RunningAgent
) -> None:
    """Any key, no policy: on a connection bound for authentication, a login for another
    session, or naming another host key, is refused; other signatures are not logins."""
    host, other = Host.new(), Host.new()
    sid, other_sid = os.urandom(32), os.urandom(32)
    blob = keys.key_blob(ks.public_key("ssh-free"))
    client = RawClient(agent.path)
    try:
        assert host.bind(client, sid) == SUCCESS
        login = _login(sid, "me", blob, host)
        assert _verifies(ks, "ssh-free", _sign(client, blob, login), login)
        assert _sign(client, blob, _login(other_sid, "me", blob, host)) == FAILURE
        assert _sign(client, blob, _login(sid, "me", blob, other)) == FAILURE
        assert _sign(client, blob, b"SSHSIG not a login")[:1] == SIGN_RESPONSE
    finally:
        client.close()
    unbound = RawClient(agent.path)  # nothing bound: nothing to check the session against
    try:
        assert _sign(unbound, blob, _login(other_sid, "me", blob))[:1] == SIGN_RESPONSE
    finally:
        unbound.close()


def test_a_destination_restricted_key_signs_logins_to_its_hosts_only(
    ks: Keystore, tmp_path: Path
) -> None:
    """`ssh-add -h git*@H -h H>G`: from this machine to H as a git* user, and from H on to G
    through the forwarded agent. Enforced from session-bind, as OpenSSH's agent does."""
    h, g, elsewhere = Host.new(), Host.new(), Host.new()
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    blob = keys.key_blob(private.public_key())
    add = s("ssh-ed25519") + s(public) + s(private.private_bytes_raw() + public) + s(b"")
    constraint = restrict_destination(
        (hop(), hop("h.example", (h.blob,), user="git*")),
        (hop("h.example", (h.blob,)), hop("g.example", (g.blob,))),
    )
    settings = AgentSettings(allow_add=True)
    with running_agent(ks, settings) as adder:
        client = RawClient(adder.path)
        try:
            assert client.request(b"\x19" + add + constraint) == SUCCESS
            [name] = [n for n, a in adder.agent._added.items() if a.destinations]
            sid = os.urandom(32)
            # Unbound (local use): listed, as ssh-add -L shows it, but it signs nothing.
            assert _listed(client) == [name.encode()]
            assert _sign(client, blob, _login(sid, "git", blob)) == FAILURE
            assert _sign(client, blob, b"SSHSIG a file") == FAILURE
            # Bound to H: a login as a git* user, for that session, only.
            assert h.bind(client, sid) == SUCCESS
            assert _listed(client) == [name.encode()]
            login = _login(sid, "git", blob, h)
            reply = _sign(client, blob, login)
            assert reply[:1] == SIGN_RESPONSE
            _, signature = parse_strings(parse_strings(reply[1:])[0])
            private.public_key().verify(signature, login)
            assert _sign(client, blob, _login(sid, "root", blob, h)) == FAILURE
            assert _sign(client, blob, _login(os.urandom(32), "git", blob, h)) == FAILURE
            assert _sign(client, blob, b"SSHSIG a file") == FAILURE
        finally:
            client.close()

        def connection(*binds: tuple[Host, bool]) -> tuple[RawClient, bytes]:
            c = RawClient(adder.path)
            sid = b""
            for host, forwarding in binds:
                sid = os.urandom(32)
                assert host.bind(c, sid, forwarding=forwarding) == SUCCESS
            return c, sid

        # Straight to G, or to another host: not listed, refused.
        for target in (g, elsewhere):
            c, sid = connection((target, False))
            try:
                assert _listed(c) == []
                assert _sign(c, blob, _login(sid, "git", blob, target)) == FAILURE
            finally:
                c.close()
        # Through H's forwarded agent on to G: allowed (any user: the G hop names none).
        c, sid = connection((h, True), (g, False))
        try:
            assert _listed(c) == [name.encode()]
            assert _sign(c, blob, _login(sid, "anyone", blob, g))[:1] == SIGN_RESPONSE
            assert _sign(c, blob, _login(sid, "anyone", blob)) == FAILURE  # no host key named
        finally:
            c.close()
        # A forwarded agent on H is shown the key (it may go on to G); on G it is not.
        for path, shown in (((h, True),), True), (((g, True),), False):
            c, _ = connection(*path)
            try:
                assert (_listed(c) == [name.encode()]) is shown
            finally:
                c.close()
        # A session-bind that does not verify: the key is hidden and refused from then on.
        c = RawClient(adder.path)
        try:
            bad = s("ssh-ed25519") + s(h.private.sign(b"another session"))
            body = s(h.blob) + s(os.urandom(32)) + s(bad) + b"\0"
            assert c.request(b"\x1b" + s("session-bind@openssh.com") + body) == FAILURE
            assert _listed(c) == []
        finally:
            c.close()


def test_allowed_hosts_in_config_restrict_a_key_to_logins_to_those_hosts(ks: Keystore) -> None:
    h, other = Host.new(), Host.new()
    policy = KeyPolicy("ssh-hosts", allowed_hosts=frozenset({h.fingerprint}))
    hosts_blob = keys.key_blob(ks.public_key("ssh-hosts"))
    free_blob = keys.key_blob(ks.public_key("ssh-free"))
    with running_agent(ks, AgentSettings(patterns=OFFERED, policies=(policy,))) as agent:
        client = RawClient(agent.path)
        try:
            sid = os.urandom(32)
            assert b"ssh-hosts" in _listed(client)
            assert _sign(client, hosts_blob, b"SSHSIG a file") == FAILURE
            assert _sign(client, hosts_blob, _login(sid, "me", hosts_blob)) == FAILURE  # unbound
            assert _sign(client, free_blob, b"SSHSIG a file")[:1] == SIGN_RESPONSE  # no policy
            assert h.bind(client, sid) == SUCCESS
            login = _login(sid, "me", hosts_blob, h)
            assert _verifies(ks, "ssh-hosts", _sign(client, hosts_blob, login), login)
        finally:
            client.close()
        client = RawClient(agent.path)
        try:
            sid = os.urandom(32)
            assert other.bind(client, sid) == SUCCESS
            assert b"ssh-hosts" not in _listed(client) and b"ssh-free" in _listed(client)
            assert _sign(client, hosts_blob, _login(sid, "me", hosts_blob, other)) == FAILURE
        finally:
            client.close()


def test_allowed_uids_let_another_user_use_only_its_keys(ks: Keystore) -> None:
    """uid 65534 is listed for ssh-shared: it connects and sees that key only; the agent's
    own uid, not listed for it, no longer sees or signs with it."""
    skip_unless_root_with_setpriv()
    policy = KeyPolicy("ssh-shared", allowed_uids=frozenset({65534}))
    shared = keys.key_blob(ks.public_key("ssh-shared"))
    with running_agent(ks, AgentSettings(patterns=OFFERED, policies=(policy,))) as agent:
        agent.path.parent.chmod(0o755)
        agent.path.chmod(0o777)  # what an administrator would open for that user
        code = (
            "import socket, struct, sys\n"
            "c = socket.socket(socket.AF_UNIX)\n"
            "c.settimeout(60)\n"
            f"c.connect({str(agent.path)!r})\n"
            "c.sendall(struct.pack('>IB', 1, 11))\n"
            "head = c.recv(4)\n"
            "n = struct.unpack('>I', head)[0]\n"
            "body = b''\n"
            "while len(body) < n:\n"
            "    body += c.recv(n - len(body))\n"
            "count = struct.unpack('>I', body[1:5])[0]\n"
            "pos, names = 5, []\n"
            "for _ in range(count):\n"
            "    for field in range(2):\n"
            "        (size,) = struct.unpack('>I', body[pos:pos + 4])\n"
            "        if field:\n"
            "            names.append(body[pos + 4:pos + 4 + size].decode())\n"
            "        pos += 4 + size\n"
            "sys.stdout.write(','.join(names))\n"
        )
        out = run_stdlib_as_nobody(code)
        assert out.stdout == "ssh-shared", out.stderr
        client = RawClient(agent.path)
        try:
            assert sorted(_listed(client)) == [b"ssh-free", b"ssh-hosts"]
            assert _sign(client, shared, b"data") == FAILURE
        finally:
            client.close()


ASKPASS = """#!/bin/sh
printf '%s\\n' "$1" >> "$(dirname "$0")/prompts"
exit 0
"""


def test_confirm_in_config_and_the_prompt_says_login_or_not(ks: Keystore, tmp_path: Path) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text(ASKPASS)
    askpass.chmod(0o700)
    prompts = tmp_path / "prompts"
    policy = KeyPolicy("ssh-shared", confirm=True)
    settings = AgentSettings(patterns=OFFERED, policies=(policy,), askpass=str(askpass))
    blob = keys.key_blob(ks.public_key("ssh-shared"))
    with running_agent(ks, settings) as agent:
        client = RawClient(agent.path)
        try:
            free = keys.key_blob(ks.public_key("ssh-free"))
            assert _sign(client, free, b"no policy")[:1] == SIGN_RESPONSE
            assert not prompts.exists()
            assert _sign(client, blob, _login(os.urandom(32), "deploy", blob))[:1] == SIGN_RESPONSE
            assert "For an SSH login as 'deploy'" in prompts.read_text()
            assert _sign(client, blob, b"SSHSIG a commit")[:1] == SIGN_RESPONSE
        finally:
            client.close()
    asked = prompts.read_text()
    assert asked.count("Allow use of key ssh-shared?") == 2
    assert "For a signature that is not an SSH login" in asked


def test_allowed_hosts_entries_become_fingerprints(tmp_path: Path) -> None:
    """A fingerprint is kept; a key line (known_hosts or .pub) becomes the fingerprint that
    `ssh-keygen -l` prints; anything else stops the agent with a one-line reason."""
    from strongroom import config as config_mod
    from strongroom.cli.sshagent import _policy
    from strongroom.errors import InvalidArgument
    from strongroom.sshagent import host_fingerprint

    host = Host.new()
    line = algorithms.encode_public(host.private.public_key(), "openssh").decode()
    (tmp_path / "host.pub").write_text(line + "\n")
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "host.pub")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    assert host_fingerprint(line + " a comment") == printed == host.fingerprint
    assert host_fingerprint(printed) == printed
    for bad in ("github.com", "SHA256:short", "ssh-rsa " + line.split()[1]):
        with pytest.raises(ValueError):
            host_fingerprint(bad)
    policy = _policy(config_mod.SshAgentPolicy("ssh-*", allowed_hosts=(line,), allowed_uids=(7,)))
    assert policy == KeyPolicy("ssh-*", False, frozenset({printed}), frozenset({7}))
    # A line whose blob is not a key the agent reads passes the config's format check only.
    broken = "ssh-ed25519 " + base64.b64encode(s("ssh-ed25519") + s(b"short")).decode()
    with pytest.raises(InvalidArgument, match="allowed_hosts"):
        _policy(config_mod.SshAgentPolicy("ssh-*", allowed_hosts=(broken,)))
