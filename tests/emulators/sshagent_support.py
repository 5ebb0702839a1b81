"""Test support for `strongroom ssh-agent`: an agent served from a thread of the test process,
a bare protocol client, and an OpenSSH sshd of the test's own (host key, config, loopback
port, authorized_keys; run as the current user).

The raw client frames messages itself (struct), so a test can send what no real client
would; what real clients do is tested with OpenSSH's own ssh-add, ssh-keygen, ssh and git.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strongroom.api import KeyAPI
from strongroom.sshagent import Agent, AgentServer, AgentSettings

SSHD = "/usr/sbin/sshd"


@dataclass
class RunningAgent:
    """An agent serving in a thread of this process, and its socket."""

    agent: Agent
    server: AgentServer
    thread: threading.Thread

    @property
    def path(self) -> Path:
        return self.server.path

    def env(self) -> dict[str, str]:
        """The environment for OpenSSH tools: this agent, and no user ssh config."""
        return {**os.environ, "SSH_AUTH_SOCK": str(self.path)}

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=30)
        self.server.close()


@contextlib.contextmanager
def running_agent(ks: KeyAPI, settings: AgentSettings) -> Iterator[RunningAgent]:
    """Serve `ks` on a socket in a new private directory until the block ends."""
    socket_dir = Path(tempfile.mkdtemp(prefix="sr-agent-"))
    os.rmdir(socket_dir)  # the server makes it (0700) and removes it again
    agent = Agent(ks, settings)
    server = AgentServer(agent, socket_dir / "agent.sock")
    thread = threading.Thread(target=server.serve_forever, name="test-ssh-agent", daemon=True)
    thread.start()
    running = RunningAgent(agent, server, thread)
    try:
        yield running
    finally:
        running.stop()


class RawClient:
    """A bare agent-protocol client: frames in, frames out."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)  # a bound on a hang, not a measurement
        self.sock.connect(str(path))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, body: bytes) -> bytes:
        """Send one message (type byte and contents) and return the reply's body."""
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        reply = self.read_reply()
        assert reply is not None, "the agent closed the connection"
        return reply

    def read_reply(self) -> bytes | None:
        head = self._exact(4)
        if head is None:
            return None
        body = self._exact(struct.unpack(">I", head)[0])
        return body

    def closed(self) -> bool:
        """Whether the agent closed the connection (reads until EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exact(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def s(value: bytes | str) -> bytes:
    """An SSH string."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def parse_strings(data: bytes) -> list[bytes]:
    """A run of SSH strings."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def hop(hostname: str = "", host_keys: tuple[bytes, ...] = (), user: str = "") -> bytes:
    """One hop of a restrict-destination-v00@openssh.com constraint, as ssh-add encodes it:
    user, host name, reserved, then each host key blob with its is-CA flag."""
    return s(s(user) + s(hostname) + s(b"") + b"".join(s(k) + b"\0" for k in host_keys))


def restrict_destination(*constraints: tuple[bytes, bytes]) -> bytes:
    """ADD_ID_CONSTRAINED's extension constraint for (from hop, to hop) pairs (`ssh-add -h`)."""
    body = b"".join(s(source + target + s(b"")) for source, target in constraints)
    return b"\xff" + s("restrict-destination-v00@openssh.com") + s(body)


def userauth_request(
    session_id: bytes, user: str, key_blob: bytes, algorithm: str, host_key: bytes | None = None
) -> bytes:
    """The data ssh asks the agent to sign for a public-key login (RFC 4252, section 7; with
    `host_key`, OpenSSH's publickey-hostbound-v00@openssh.com)."""
    method = "publickey-hostbound-v00@openssh.com" if host_key is not None else "publickey"
    data = s(session_id) + b"\x32" + s(user) + s("ssh-connection") + s(method) + b"\x01"
    data += s(algorithm) + s(key_blob)
    return data + (s(host_key) if host_key is not None else b"")


# -- sshd ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Sshd:
    """An sshd of the test's own on a loopback port, logging to `log`."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    host_key_pub: str
    authorized_keys: Path

    def ssh(
        self, agent: Path, identity_pub: Path, *command: str, options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """`ssh` to this sshd with the agent key whose public key is `identity_pub` only;
        `options` go before the destination (e.g. -vvv)."""
        user = os.environ.get("USER") or _current_user()
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-p",
                str(self.port),
                "-o",
                f"IdentityAgent={agent}",
                "-o",
                f"IdentityFile={identity_pub}",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                f"UserKnownHostsFile={self.directory / 'known_hosts'}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ConnectTimeout=30",
                *options,
                f"{user}@127.0.0.1",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def start_sshd(
    directory: Path, authorized_keys: str, host_ca: Path | None = None, principals: str = ""
) -> Sshd:
    """Start sshd in the foreground (-D -e) with its own host key and config in
    `directory`, as the current user, and wait until it accepts connections. With
    `host_ca` (a CA private key file), the host key is certified by it for `principals`
    (comma-separated, default 127.0.0.1) and sshd presents the certificate; the
    known_hosts file then trusts the CA (`@cert-authority`), not the key."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.fail("OpenSSH's sshd or ssh is missing; run scripts/setup.sh (openssh-server)")
    if os.getuid() == 0:
        # As root, sshd wants its privilege separation directory even in the foreground.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key = directory / "host_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    host_pub = (directory / "host_ed25519.pub").read_text().split()
    keys_file = directory / "authorized_keys"
    keys_file.write_text(authorized_keys)
    port = free_port()
    certificate = ""
    if host_ca is None:
        known = f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n"
    else:
        subprocess.run(
            [
                *("ssh-keygen", "-q", "-s", str(host_ca), "-h", "-I", "test-host"),
                *("-n", principals or "127.0.0.1", "-V", "-5m:+1d", str(host_key) + ".pub"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        certificate = f"HostCertificate {host_key}-cert.pub\n"
        ca_pub = " ".join(Path(str(host_ca) + ".pub").read_text().split()[:2])
        known = f"@cert-authority [127.0.0.1]:{port} {ca_pub}\n"
    (directory / "known_hosts").write_text(known)
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"{certificate}"
        f"PidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {keys_file}\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "LogLevel VERBOSE\n"
    )
    log = directory / "sshd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 30  # a bound on a hang, not a measurement
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sshd exited: {log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("sshd did not start listening")
    return Sshd(directory, port, process, log, f"{host_pub[0]} {host_pub[1]}", keys_file)


def ssh_add(agent: RunningAgent, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    """`ssh-add ARGS` against this agent (its output captured, its status not checked)."""
    return subprocess.run(
        ["ssh-add", *args],
        env=agent.env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
