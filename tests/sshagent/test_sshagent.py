"""`strongroom ssh-agent` with vault keys: OpenSSH's ssh-add and ssh-keygen as clients, the
protocol message by message, and hostile clients (core/sshagent/).

One keystore and one agent serve the whole module; the agent runs in a thread of the test
process, so its audit records land in the module's data dir.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from nobody_support import run_stdlib_as_nobody, skip_unless_root_with_setpriv
from sshagent_support import RawClient, RunningAgent, parse_strings, running_agent, s, ssh_add

import strongroom
from strongroom import algorithms
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings
from strongroom.sshagent.agent import AddedKey

KEYS = {
    "ssh-ed25519": "ed25519",
    "ssh-p256": "ecdsa-p256",
    "ssh-p384": "ecdsa-p384",
    "ssh-rsa": "rsa-2048",
}
"""Keys the agent offers (pattern `ssh-*`), by name and type."""

FAILURE, SUCCESS = b"\x05", b"\x06"
REQUEST_IDENTITIES = b"\x0b"


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(tmp_path_factory.mktemp("sshagent"))
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        for name, key_type in KEYS.items():
            keystore.generate(name, key_type)
        keystore.generate("other", "ed25519")  # no pattern matches it
        keystore.generate("ssh-aes", "aes-256")  # matches, but not an SSH key type
        keystore.generate("ssh-verify-only", "ed25519", usage="verify")
        keystore.generate("ssh-disabled", "ed25519")
        keystore.disable("ssh-disabled")
        yield keystore


@pytest.fixture(scope="module")
def agent(ks: Keystore) -> Iterator[RunningAgent]:
    with running_agent(ks, AgentSettings(patterns=("ssh-*",))) as running:
        yield running


def openssh_line(ks: Keystore, name: str) -> str:
    """What `strongroom key public NAME --format openssh` prints (same function)."""
    return algorithms.encode_public(ks.public_key(name), "openssh").decode()


# -- OpenSSH's tools as clients ------------------------------------------------------------------
def test_ssh_add_lists_exactly_the_offered_keys(ks: Keystore, agent: RunningAgent) -> None:
    out = ssh_add(agent, "-L")
    assert out.returncode == 0, out.stderr
    listed = sorted(out.stdout.splitlines())
    expected = sorted(f"{openssh_line(ks, name)} {name}" for name in KEYS)
    assert listed == expected


def test_the_socket_is_private(agent: RunningAgent) -> None:
    assert agent.path.stat().st_mode & 0o777 == 0o600
    assert agent.path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", ["ssh-ed25519", "ssh-p256", "ssh-p384", "ssh-rsa"])
def test_ssh_keygen_signs_and_verifies(
    ks: Keystore, agent: RunningAgent, tmp_path: Path, name: str
) -> None:
    """`ssh-keygen -Y sign` through the agent, checked by `ssh-keygen -Y verify`."""
    pub = tmp_path / "key.pub"
    pub.write_text(openssh_line(ks, name) + "\n")
    message = tmp_path / "message"
    message.write_bytes(b"signed through strongroom ssh-agent\n")
    signed = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub), str(message)],
        env=agent.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert signed.returncode == 0, signed.stderr
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"signer@example {openssh_line(ks, name)}\n")

    def verify(data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                *("ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "signer@example"),
                *("-n", "file", "-s", str(message) + ".sig"),
            ],
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
        )

    assert verify(message.read_bytes()).returncode == 0
    assert verify(b"another message\n").returncode != 0


def test_rsa_signs_sha256_and_sha512_and_refuses_sha1(ks: Keystore, agent: RunningAgent) -> None:
    """rsa-sha2-256 and rsa-sha2-512 are the keystore's pkcs1v15 and pkcs1v15-sha512 (with
    both flags, SHA-256, as OpenSSH's agent answers); ssh-rsa (SHA-1, no flag) is refused."""
    blob = _blob(ks, "ssh-rsa")
    public = ks.public_key("ssh-rsa")
    assert isinstance(public, rsa.RSAPublicKey)
    client = RawClient(agent.path)
    try:
        data = b"rsa data"
        for flags, want, digest in (
            (2, b"rsa-sha2-256", hashes.SHA256()),
            (4, b"rsa-sha2-512", hashes.SHA512()),
            (6, b"rsa-sha2-256", hashes.SHA256()),
        ):
            reply = client.request(b"\x0d" + s(blob) + s(data) + struct.pack(">I", flags))
            assert reply[:1] == b"\x0e"
            name, sig = parse_strings(parse_strings(reply[1:])[0])
            assert name == want
            public.verify(sig, data, padding.PKCS1v15(), digest)
        assert client.request(b"\x0d" + s(blob) + s(data) + struct.pack(">I", 0)) == FAILURE
    finally:
        client.close()


def test_ecdsa_signature_is_ssh_encoded(ks: Keystore, agent: RunningAgent) -> None:
    """The keystore's DER ECDSA signature goes out as SSH's mpint r || mpint s."""
    client = RawClient(agent.path)
    try:
        data = b"p384 data"
        reply = client.request(b"\x0d" + s(_blob(ks, "ssh-p384")) + s(data) + b"\0\0\0\0")
        name, sig = parse_strings(parse_strings(reply[1:])[0])
        assert name == b"ecdsa-sha2-nistp384"
        r, s_ = (int.from_bytes(v, "big") for v in parse_strings(sig))
        public = ks.public_key("ssh-p384")
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(encode_dss_signature(r, s_), data, ec.ECDSA(hashes.SHA384()))
    finally:
        client.close()


def test_unknown_key_is_refused(agent: RunningAgent) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    blob = _raw_blob(other)
    client = RawClient(agent.path)
    try:
        assert client.request(b"\x0d" + s(blob) + s(b"x") + b"\0\0\0\0") == FAILURE
    finally:
        client.close()


# -- adding and removing ---------------------------------------------------------------------------
def test_adding_is_refused_unless_allowed(agent: RunningAgent, tmp_path: Path) -> None:
    key = _key_file(tmp_path)
    out = ssh_add(agent, str(key))
    assert out.returncode != 0
    assert "agent refused" in out.stderr
    assert len(ssh_add(agent, "-L").stdout.splitlines()) == len(KEYS)


def test_added_keys_are_imported_and_only_they_are_removed(ks: Keystore, tmp_path: Path) -> None:
    with running_agent(ks, AgentSettings(patterns=("ssh-ed25519",), allow_add=True)) as adder:
        key = _key_file(tmp_path)
        pub = key.with_suffix(".pub").read_text().split()
        assert ssh_add(adder, str(key)).returncode == 0
        listed = ssh_add(adder, "-L").stdout.splitlines()
        assert any(line.split()[:2] == pub[:2] for line in listed), listed
        imported = [k for k in ks.keys() if k.name.startswith("ssh-agent/")]
        assert len(imported) == 1
        assert openssh_line(ks, imported[0].name).split()[:2] == pub[:2]

        # A configured key is not the agent's to remove...
        configured = tmp_path / "configured.pub"
        configured.write_text(openssh_line(ks, "ssh-ed25519") + "\n")
        assert ssh_add(adder, "-d", str(configured)).returncode != 0
        # ...an added one is, from the agent only: the keystore keeps it.
        assert ssh_add(adder, "-d", str(key.with_suffix(".pub"))).returncode == 0
        listed = ssh_add(adder, "-L").stdout.splitlines()
        assert [line.split()[-1] for line in listed] == ["ssh-ed25519"]
        assert ks.info(imported[0].name).name == imported[0].name
        # Added again: the same keystore key, offered again; remove-all forgets it.
        assert ssh_add(adder, str(key)).returncode == 0
        assert len(ssh_add(adder, "-L").stdout.splitlines()) == 2
        assert ssh_add(adder, "-D").returncode == 0
        assert len(ssh_add(adder, "-L").stdout.splitlines()) == 1
        assert len([k for k in ks.keys() if k.name.startswith("ssh-agent/")]) == 1


# -- constraints and confirmation ----------------------------------------------------------------
ASKPASS = """#!/bin/sh
printf '%s|%s\\n' "$SSH_ASKPASS_PROMPT" "$1" >> "$(dirname "$0")/prompts"
exit "$(cat "$(dirname "$0")/answer")"
"""


def _askpass(directory: Path, answer: int) -> Path:
    """A stand-in for ssh-askpass: records each prompt, answers yes (0) or no (1)."""
    script = directory / "askpass"
    script.write_text(ASKPASS)
    script.chmod(0o700)
    (directory / "answer").write_text(str(answer))
    return script


def _keygen_sign(agent: RunningAgent, pub: Path, message: Path) -> int:
    return subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub), str(message)],
        env=agent.env(),
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode


def test_configured_keys_are_confirmed_through_askpass(ks: Keystore, tmp_path: Path) -> None:
    askpass = _askpass(tmp_path, 0)
    settings = AgentSettings(patterns=("ssh-*",), confirm=("ssh-ed*",), askpass=str(askpass))
    message = tmp_path / "message"
    message.write_text("confirm me\n")
    confirmed, plain = tmp_path / "ed.pub", tmp_path / "p256.pub"
    confirmed.write_text(openssh_line(ks, "ssh-ed25519") + "\n")
    plain.write_text(openssh_line(ks, "ssh-p256") + "\n")
    with running_agent(ks, settings) as confirming:
        assert _keygen_sign(confirming, confirmed, message) == 0
        prompts = (tmp_path / "prompts").read_text()
        assert prompts.startswith("confirm|Allow use of key ssh-ed25519?")
        fingerprint = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(confirmed)], capture_output=True, text=True, timeout=30
        ).stdout.split()[1]
        assert f"Key fingerprint {fingerprint}" in prompts
        assert "ssh-keygen" in prompts  # the peer's program, from /proc/PID/exe
        assert f"(uid {os.getuid()})" in prompts
        assert "For a signature that is not an SSH login" in prompts
        # A key no pattern asks to confirm signs without a prompt...
        assert _keygen_sign(confirming, plain, message) == 0
        assert (tmp_path / "prompts").read_text() == prompts
        # ...and a "no" refuses the signature.
        (tmp_path / "answer").write_text("1")
        assert _keygen_sign(confirming, confirmed, message) != 0
    with running_agent(ks, AgentSettings(patterns=("ssh-*",), confirm=("ssh-ed*",))) as no_ask:
        assert _keygen_sign(no_ask, confirmed, message) != 0  # nobody to ask: refused


def test_added_keys_keep_their_constraints(ks: Keystore, tmp_path: Path) -> None:
    askpass = _askpass(tmp_path, 0)
    settings = AgentSettings(patterns=(), allow_add=True, askpass=str(askpass))
    message = tmp_path / "message"
    message.write_text("constrained\n")
    with running_agent(ks, settings) as adder:
        key = _key_file(tmp_path)
        assert ssh_add(adder, "-c", "-t", "600", str(key)).returncode == 0
        key.unlink()  # from now on only the agent can sign with it (ssh-keygen would use it)
        [(name, added)] = adder.agent._added.items()
        assert added.confirm
        assert added.expires is not None and 0 < added.expires - time.monotonic() <= 600
        assert _keygen_sign(adder, key.with_suffix(".pub"), message) == 0
        assert "Allow use of key ssh-agent/" in (tmp_path / "prompts").read_text()
        # The lifetime over (set, not waited for): the key is forgotten, the keystore keeps it.
        adder.agent._added[name] = AddedKey(expires=time.monotonic() - 1)
        assert ssh_add(adder, "-L").returncode != 0  # "The agent has no identities."
        assert _keygen_sign(adder, key.with_suffix(".pub"), message) != 0
        assert ks.info(name).name == name
        # A constraint the agent cannot keep (a restrict-destination naming no host) is
        # refused, not ignored.
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes_raw()
        add = s("ssh-ed25519") + s(public) + s(private.private_bytes_raw() + public) + s(b"")
        restricted = b"\x19" + add + b"\xff" + s("restrict-destination-v00@openssh.com") + s(b"")
        client = RawClient(adder.path)
        try:
            assert client.request(restricted) == FAILURE
            assert client.request(b"\x19" + add + b"\x01" + struct.pack(">I", 60)) == SUCCESS
        finally:
            client.close()


# -- lock, extensions ------------------------------------------------------------------------------
def test_lock_and_unlock(ks: Keystore, agent: RunningAgent) -> None:
    client = RawClient(agent.path)
    sign = b"\x0d" + s(_blob(ks, "ssh-ed25519")) + s(b"data") + b"\0\0\0\0"
    try:
        assert client.request(b"\x16" + s(b"lock words")) == SUCCESS
        try:
            assert client.request(REQUEST_IDENTITIES) == b"\x0c\0\0\0\0"
            assert client.request(sign) == FAILURE
            assert client.request(b"\x16" + s(b"again")) == FAILURE
            assert client.request(b"\x17" + s(b"wrong words")) == FAILURE
        finally:
            assert client.request(b"\x17" + s(b"lock words")) == SUCCESS
        assert client.request(sign)[:1] == b"\x0e"
        assert client.request(b"\x17" + s(b"lock words")) == FAILURE  # not locked
    finally:
        client.close()


def test_query_lists_the_extensions(agent: RunningAgent) -> None:
    client = RawClient(agent.path)
    try:
        reply = client.request(b"\x1b" + s("query"))
        assert reply[:1] == b"\x1d"
        assert parse_strings(reply[1:]) == [b"query", b"query", b"session-bind@openssh.com"]
        assert client.request(b"\x1b" + s("nobody@example.com")) == FAILURE
    finally:
        client.close()


def test_session_bind_is_verified_and_names_the_destination_in_the_audit(
    ks: Keystore, agent: RunningAgent
) -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    host_blob = _raw_blob(host.public_key())
    session_id = os.urandom(32)
    good = s(b"ssh-ed25519") + s(host.sign(session_id))
    bad = s(b"ssh-ed25519") + s(host.sign(b"another session"))

    def bind(signature: bytes, sid: bytes = session_id) -> bytes:
        return b"\x1b" + s("session-bind@openssh.com") + s(host_blob) + s(sid) + s(signature)

    client = RawClient(agent.path)
    try:
        assert client.request(bind(bad) + b"\0") == FAILURE
        assert client.request(bind(good) + b"\0") == SUCCESS
        assert client.request(bind(good) + b"\0") == FAILURE  # bound for authentication already
        data = b"after the bind"
        assert client.request(b"\x0d" + s(_blob(ks, "ssh-ed25519")) + s(data) + b"\0\0\0\0")[
            :1
        ] == (b"\x0e")
    finally:
        client.close()
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"],
        input=algorithms.encode_public(host.public_key(), "openssh"),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    records = _audit(ks)
    signs = [r for r in records if r["op"] == "sign" and r["key"] == "ssh-ed25519"]
    actor = signs[-1]["actor"]
    assert f"uid={os.getuid()}" in actor and f"pid={os.getpid()}" in actor
    assert f"dest={fingerprint.decode()}" in actor


# -- hostile clients -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"\x0d",  # sign request with nothing
        b"\x0d\0\0\0\x10abc",  # a string longer than the message
        b"\x0b\0",  # trailing byte after request-identities
        b"\x11" + s("ssh-dss") + b"\0" * 20,  # add of an unknown key type
        b"\x11" + s("ssh-ed25519") + s(b"\1" * 32) + s(b"\2" * 64) + s(b""),  # not a key
        b"\x19" + s("ssh-ed25519") + s(b"\1" * 32) + s(b"\2" * 64) + s(b"") + b"\x09",
        b"\x1b" + s("session-bind@openssh.com") + s(b"junk"),
        b"\x1b\0\0\0\0",  # an empty extension name
        b"\x14",  # smartcard keys: not served
        b"\xfe",  # unknown message type
        b"\x16",  # lock without a passphrase
    ],
)
def test_bad_messages_fail_and_the_connection_serves_on(agent: RunningAgent, body: bytes) -> None:
    client = RawClient(agent.path)
    try:
        assert client.request(body) == FAILURE
        assert client.request(REQUEST_IDENTITIES)[:1] == b"\x0c"
    finally:
        client.close()


@pytest.mark.parametrize("length", [0, 256 * 1024 + 1, 0xFFFFFFFF])
def test_bad_lengths_close_the_connection(agent: RunningAgent, length: int) -> None:
    client = RawClient(agent.path)
    try:
        client.send_raw(struct.pack(">I", length) + b"\x0b")
        assert client.closed()
    finally:
        client.close()
    _still_serves(agent)


def test_a_stalled_client_does_not_block_others(ks: Keystore, agent: RunningAgent) -> None:
    stalled = RawClient(agent.path)
    stalled.send_raw(struct.pack(">I", 1000) + b"\x0d")  # a frame that never completes
    try:
        results: list[bytes] = []
        errors: list[BaseException] = []
        blob = _blob(ks, "ssh-ed25519")

        def sign(i: int) -> None:
            try:
                client = RawClient(agent.path)
                try:
                    for j in range(5):
                        reply = client.request(
                            b"\x0d" + s(blob) + s(b"m%d-%d" % (i, j)) + b"\0\0\0\0"
                        )
                        results.append(reply)
                finally:
                    client.close()
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=sign, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        assert len(results) == 40
        public = ks.public_key("ssh-ed25519")
        assert isinstance(public, ed25519.Ed25519PublicKey)
        assert all(r[:1] == b"\x0e" for r in results)
        sigs = {parse_strings(parse_strings(r[1:])[0])[1] for r in results}
        assert len(sigs) == 40
    finally:
        stalled.close()


def test_another_uid_is_refused(ks: Keystore, tmp_path: Path) -> None:
    """SO_PEERCRED: even with the socket opened to everyone, another user gets nothing."""
    skip_unless_root_with_setpriv()
    with running_agent(ks, AgentSettings(patterns=("ssh-*",))) as open_agent:
        open_agent.path.parent.chmod(0o755)
        open_agent.path.chmod(0o777)
        code = (
            "import socket, struct, sys\n"
            "c = socket.socket(socket.AF_UNIX)\n"
            "c.settimeout(60)\n"
            f"c.connect({str(open_agent.path)!r})\n"
            "try:\n"  # the agent may close before the request is even sent
            "    c.sendall(struct.pack('>IB', 1, 11))\n"
            "    got = c.recv(64)\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    got = b''\n"
            "sys.stdout.write('closed' if got == b'' else 'answered')\n"
        )
        out = run_stdlib_as_nobody(code)
        assert out.stdout == "closed", out.stderr
        _still_serves(open_agent)


# -- the command ---------------------------------------------------------------------------------
def test_the_command_detaches_and_prints_the_environment(tmp_path: Path) -> None:
    """`strongroom ssh-agent` as a shell would run it: eval its output, use it, kill it."""
    config = write_vault_config(tmp_path)
    env = {VAULT_PASS_ENV: VAULT_PASSPHRASE}
    assert run_cli(config, "init", env=env).returncode == 0
    made = run_cli(config, "key", "generate", "ssh-one", "--type", "ed25519", env=env)
    assert made.returncode == 0, made.stderr
    sock = Path(f"/tmp/sr-agent-cli-{os.getpid()}") / "agent.sock"
    out = run_cli(config, "ssh-agent", "-a", str(sock), "--keys", "ssh-*", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0] == f"SSH_AUTH_SOCK={sock}; export SSH_AUTH_SOCK;"
    pid = int(lines[1].split("=")[1].split(";")[0])
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700  # made by the agent
        listed = subprocess.run(
            ["ssh-add", "-L"],
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        public = run_cli(config, "key", "public", "ssh-one", "--format", "openssh", env=env)
        assert listed.stdout == public.stdout.decode().rstrip("\n") + " ssh-one\n"
    finally:
        os.kill(pid, 15)
    _wait_gone(sock.parent)


def test_the_default_socket_is_private_in_a_directory_of_its_own(tmp_path: Path) -> None:
    """Without -a or [ssh_agent] socket: `agent.PID` in a new 0700 directory under
    $XDG_RUNTIME_DIR, the socket 0600; both gone once the agent is stopped."""
    config = write_vault_config(tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o755)  # the directory the agent makes must be private by itself
    env = {VAULT_PASS_ENV: VAULT_PASSPHRASE, "XDG_RUNTIME_DIR": str(runtime)}
    assert run_cli(config, "init", env=env).returncode == 0
    assert (
        run_cli(config, "key", "generate", "ssh-one", "--type", "ed25519", env=env).returncode == 0
    )
    out = run_cli(config, "ssh-agent", "--keys", "ssh-*", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    sock = Path(lines[0].removeprefix("SSH_AUTH_SOCK=").split(";")[0])
    pid = int(lines[1].split("=")[1].split(";")[0])
    try:
        assert sock.parent.parent == runtime
        assert sock.name.startswith("agent.")  # the pid of the process that bound it
        assert sock.stat().st_mode & 0o777 == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700
    finally:
        os.kill(pid, 15)
    _wait_gone(sock.parent)


def test_the_command_fails_on_a_wrong_passphrase_instead_of_offering_nothing(
    tmp_path: Path,
) -> None:
    config = write_vault_config(tmp_path)
    assert run_cli(config, "init").returncode == 0
    assert run_cli(config, "key", "generate", "ssh-one", "--type", "ed25519").returncode == 0
    sock = tmp_path / "agent" / "agent.sock"
    wrong = "wrong passphrase, 32 characters!"
    out = run_cli(config, "ssh-agent", "-a", str(sock), "--keys", "*", env={VAULT_PASS_ENV: wrong})
    assert out.returncode == 4, out.stderr
    assert out.stdout == b""
    assert out.stderr.strip() == "strongroom: error: wrong vault passphrase"
    assert wrong not in out.stderr
    assert not sock.parent.exists()


def test_the_command_needs_keys_to_offer(tmp_path: Path) -> None:
    config = write_vault_config(tmp_path)
    out = run_cli(config, "ssh-agent", "-D")
    assert out.returncode == 2
    assert "no keys to offer" in out.stderr


# -- helpers -------------------------------------------------------------------------------------
def _raw_blob(public: object) -> bytes:
    from strongroom.sshagent.keys import key_blob

    return key_blob(public)  # type: ignore[arg-type]


def _blob(ks: Keystore, name: str) -> bytes:
    return _raw_blob(ks.public_key(name))


def _key_file(directory: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / "id_added"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" added\n"
    )
    return path


def _audit(ks: Keystore) -> list[dict[str, object]]:
    log = ks.config.data_dir / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _still_serves(agent: RunningAgent) -> None:
    client = RawClient(agent.path)
    try:
        assert client.request(REQUEST_IDENTITIES)[:1] == b"\x0c"
    finally:
        client.close()


def _wait_gone(path: Path) -> None:
    """The agent removes its socket directory when it stops (bounded wait, not a timing)."""
    import time

    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists()
