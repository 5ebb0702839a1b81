"""Real OpenSSH through `strongroom ssh-agent`: `ssh` into an sshd the module starts itself,
with a vault key, a SoftHSM2 (PKCS#11) key and a swtpm (TPM) key; `git commit -S` with
gpg.format=ssh, checked by `git verify-commit`.

One keystore (vault + HSM + TPM), one agent and one sshd serve the whole module.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fido_authenticator import (
    FIDO_PIN_ENV,
    FIDO_VAULT_PASS,
    FIDO_VAULT_PASS_ENV,
    Presence,
    SoftAuthenticator,
    open_with_authenticator,
    write_fido_config,
)
from pkcs11_support import (
    SoftHsm,
    softhsm,  # noqa: F401  (the session's token)
    write_three_backends_config,
)
from sshagent_support import RawClient, RunningAgent, Sshd, running_agent, s, ssh_add, start_sshd
from tpm_support import Swtpm, swtpm  # noqa: F401  (the session's TPM)

import strongroom
from strongroom import algorithms
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings, KeyPolicy, host_fingerprint, keys

KEYS = {
    "ssh-vault": ("vault", "ed25519"),
    "ssh-vault-rsa": ("vault", "rsa-2048"),
    "ssh-hsm": ("hsm", "ecdsa-p256"),
    "ssh-tpm": ("tpm", "ecdsa-p256"),
}
"""The keys ssh logs in with: the backend that holds each, and its type. ssh's default
algorithms sign with the RSA key as rsa-sha2-512."""


@pytest.fixture(scope="module")
def ks(
    tmp_path_factory: pytest.TempPathFactory,
    softhsm: SoftHsm,  # noqa: F811
    swtpm: Swtpm,  # noqa: F811
) -> Iterator[Keystore]:
    directory = tmp_path_factory.mktemp("sshagent-openssh")
    config = write_three_backends_config(directory, softhsm, swtpm.tcti)
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        for name, (backend, key_type) in KEYS.items():
            keystore.generate(name, key_type, backend=backend)
        yield keystore
        for name in ("ssh-hsm", "ssh-tpm"):  # the token and the TPM outlive this module
            keystore.delete(name)


@pytest.fixture(scope="module")
def agent(ks: Keystore) -> Iterator[RunningAgent]:
    with running_agent(ks, AgentSettings(patterns=("ssh-*",))) as running:
        yield running


@pytest.fixture(scope="module")
def pubs(ks: Keystore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each key's OpenSSH public key file, as `strongroom key public --format openssh`."""
    directory = tmp_path_factory.mktemp("pubs")
    out = {}
    for name in KEYS:
        path = directory / f"{name}.pub"
        path.write_bytes(algorithms.encode_public(ks.public_key(name), "openssh") + b"\n")
        out[name] = path
    return out


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, pubs: dict[str, Path]) -> Iterator[Sshd]:
    authorized = "".join(p.read_text() for p in pubs.values())
    server = start_sshd(tmp_path_factory.mktemp("sshd"), authorized)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_sshd(tmp_path_factory: pytest.TempPathFactory, sshd: Sshd) -> Iterator[Sshd]:
    """Another host (its own host key), with the same authorized keys as `sshd`."""
    server = start_sshd(tmp_path_factory.mktemp("sshd-b"), sshd.authorized_keys.read_text())
    server.authorized_keys.unlink()
    server.authorized_keys.symlink_to(sshd.authorized_keys)  # one list for both hosts
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(KEYS))
def test_ssh_logs_in_with_the_key(
    ks: Keystore, agent: RunningAgent, sshd: Sshd, pubs: dict[str, Path], name: str
) -> None:
    assert ks.info(name).backend == KEYS[name][0]
    out = sshd.ssh(agent.path, pubs[name], "echo", "logged-in", options=("-vvv",))
    assert out.returncode == 0, out.stderr + sshd.log.read_text()
    assert out.stdout == "logged-in\n"
    if KEYS[name][1].startswith("rsa-"):  # ssh's own choice, which the agent used to refuse
        assert "signing using rsa-sha2-512" in out.stderr
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pubs[name])],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    assert "Accepted publickey for " in sshd.log.read_text()
    assert fingerprint in sshd.log.read_text()
    # The signature's audit record names this process as the peer, and the sshd's host key
    # (from ssh's session-bind) as the destination.
    host_fp = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"],
        input=sshd.host_key_pub,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    records = [
        json.loads(line)
        for line in (ks.config.data_dir / "audit.jsonl").read_text().splitlines()
        if line.strip()
    ]
    signs = [r for r in records if r["op"] == "sign" and r["key"] == name]
    assert signs and signs[-1]["result"] == "ok"
    assert f"dest={host_fp}" in signs[-1]["actor"]


def test_ssh_without_an_authorized_key_is_refused(
    agent: RunningAgent, sshd: Sshd, pubs: dict[str, Path], tmp_path: Path
) -> None:
    """The login above is the agent's doing: with the key dropped from authorized_keys, the
    same ssh command fails."""
    kept = sshd.authorized_keys.read_text()
    try:
        sshd.authorized_keys.write_text(
            "".join(p.read_text() for n, p in pubs.items() if n != "ssh-vault")
        )
        out = sshd.ssh(agent.path, pubs["ssh-vault"], "true")
        assert out.returncode != 0
    finally:
        sshd.authorized_keys.write_text(kept)


@pytest.mark.parametrize("name", ["ssh-vault", "ssh-hsm"])
def test_git_signs_commits_through_the_agent(
    agent: RunningAgent, pubs: dict[str, Path], tmp_path: Path, name: str
) -> None:
    repo = tmp_path / "repo"
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"dev@example.com {pubs[name].read_text()}")
    env = {
        **agent.env(),
        "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path),
    }

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    repo.mkdir()
    for args in (
        ("init", "-q"),
        ("config", "user.name", "Dev"),
        ("config", "user.email", "dev@example.com"),
        ("config", "gpg.format", "ssh"),
        ("config", "user.signingkey", str(pubs[name])),
        ("config", "gpg.ssh.allowedSignersFile", str(allowed)),
    ):
        assert git(*args).returncode == 0
    (repo / "file").write_text("signed\n")
    assert git("add", "file").returncode == 0
    committed = git("commit", "-q", "-S", "-m", "signed through strongroom ssh-agent")
    assert committed.returncode == 0, committed.stderr
    verified = git("verify-commit", "HEAD")
    assert verified.returncode == 0, verified.stderr
    assert 'Good "git" signature for dev@example.com' in verified.stderr


def test_a_destination_restricted_key_logs_in_to_its_host_only(
    ks: Keystore, sshd: Sshd, second_sshd: Sshd, tmp_path: Path
) -> None:
    """`ssh-add -h` names the first sshd (by its host key, from a known_hosts file): ssh
    logs in there with the added key, and the agent refuses the login to the second."""
    key = tmp_path / "id_restricted"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    pub = key.with_suffix(".pub")
    known = tmp_path / "known_hosts"
    known.write_text(f"host-a {sshd.host_key_pub}\n")
    kept = sshd.authorized_keys.read_text()
    sshd.authorized_keys.write_text(kept + pub.read_text())
    try:
        with running_agent(ks, AgentSettings(allow_add=True)) as adder:
            added = ssh_add(adder, "-H", str(known), "-h", "host-a", str(key))
            assert added.returncode == 0, added.stderr
            key.unlink()  # only the agent can sign with it now
            [constraint] = [a.destinations for a in adder.agent._added.values()]
            assert len(constraint) == 1
            out = sshd.ssh(adder.path, pub, "echo", "logged-in")
            assert out.returncode == 0, out.stderr + sshd.log.read_text()
            assert out.stdout == "logged-in\n"
            refused = second_sshd.ssh(adder.path, pub, "echo", "logged-in")
            assert refused.returncode != 0
            assert "logged-in" not in refused.stdout
    finally:
        sshd.authorized_keys.write_text(kept)


def test_allowed_hosts_in_config_let_a_key_log_in_to_those_hosts_only(
    ks: Keystore, sshd: Sshd, second_sshd: Sshd, pubs: dict[str, Path]
) -> None:
    policy = KeyPolicy("ssh-vault", allowed_hosts=frozenset({host_fingerprint(sshd.host_key_pub)}))
    settings = AgentSettings(patterns=("ssh-vault",), policies=(policy,))
    with running_agent(ks, settings) as agent:
        out = sshd.ssh(agent.path, pubs["ssh-vault"], "echo", "logged-in")
        assert out.returncode == 0, out.stderr + sshd.log.read_text()
        refused = second_sshd.ssh(agent.path, pubs["ssh-vault"], "echo", "logged-in")
        assert refused.returncode != 0
        # The same key, with no policy, logs in to the second host: the policy refused it.
        with running_agent(ks, AgentSettings(patterns=("ssh-vault",))) as free:
            assert second_sshd.ssh(free.path, pubs["ssh-vault"], "true").returncode == 0


def test_allowed_hosts_by_name_through_a_hashed_known_hosts(
    ks: Keystore, sshd: Sshd, second_sshd: Sshd, pubs: dict[str, Path], tmp_path: Path
) -> None:
    """`allowed_hosts = ["[127.0.0.1]:PORT"]`: the name is looked up in a known_hosts file
    that lists both sshds, hashed by `ssh-keygen -H` (Debian's HashKnownHosts default); the
    key logs in to the named host only."""
    from strongroom import config as config_mod
    from strongroom.cli.sshagent import _policy

    known = tmp_path / "known_hosts"
    known.write_text(
        (sshd.directory / "known_hosts").read_text()
        + (second_sshd.directory / "known_hosts").read_text()
    )
    subprocess.run(
        ["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True, timeout=30
    )
    assert "127.0.0.1" not in known.read_text()
    table = config_mod.SshAgentPolicy("ssh-vault", allowed_hosts=(f"[127.0.0.1]:{sshd.port}",))
    policy = _policy(table, [str(known)])
    assert policy.allowed_hosts == {host_fingerprint(sshd.host_key_pub)}
    settings = AgentSettings(patterns=("ssh-vault",), policies=(policy,))
    with running_agent(ks, settings) as agent:
        out = sshd.ssh(agent.path, pubs["ssh-vault"], "echo", "logged-in")
        assert out.returncode == 0, out.stderr + sshd.log.read_text()
        refused = second_sshd.ssh(agent.path, pubs["ssh-vault"], "echo", "logged-in")
        assert refused.returncode != 0
        assert "logged-in" not in refused.stdout


@pytest.mark.parametrize(
    ("key_type", "ssh_type"),
    [
        ("fido-es256", "sk-ecdsa-sha2-nistp256@openssh.com"),
        ("fido-eddsa", "sk-ssh-ed25519@openssh.com"),
    ],
)
def test_fido_keys_are_openssh_security_keys(
    sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_type: str, ssh_type: str
) -> None:
    """A credential the software authenticator made for the `ssh:` application (the fido
    backend's rp_id) is an sk- key: `ssh-keygen -Y verify` and sshd accept its signatures."""
    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, FIDO_VAULT_PASS)
    monkeypatch.setenv(FIDO_PIN_ENV, "2468")
    authenticator = SoftAuthenticator(tmp_path / "authenticator.json")
    config = write_fido_config(tmp_path / "ks", fido_extra='rp_id = "ssh:"')
    with (
        open_with_authenticator(authenticator, config) as fido_ks,
        running_agent(fido_ks, AgentSettings(patterns=("ssh-sk",))) as agent,
    ):
        fido_ks.generate("ssh-sk", key_type, backend="fido")
        listed = subprocess.run(
            ["ssh-add", "-L"], env=agent.env(), capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr
        [line] = listed.stdout.splitlines()
        assert line.split()[0] == ssh_type and line.split()[2] == "ssh-sk"
        # `strongroom key public --format openssh` prints the same sk- line
        assert keys.openssh_public_line(fido_ks, "ssh-sk").decode() == " ".join(line.split()[:2])
        pub = tmp_path / "sk.pub"
        pub.write_text(line + "\n")
        message = tmp_path / "message"
        message.write_text("signed by a security key\n")
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
        allowed.write_text(f"dev@example.com {line}\n")
        verify = [
            *("ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "dev@example.com"),
            *("-n", "file", "-s", f"{message}.sig"),
        ]
        ok = subprocess.run(verify, input=message.read_bytes(), capture_output=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(verify, input=b"another message\n", capture_output=True, timeout=60)
        assert bad.returncode != 0
        kept = sshd.authorized_keys.read_text()
        sshd.authorized_keys.write_text(kept + line + "\n")
        try:
            out = sshd.ssh(agent.path, pub, "echo", "logged-in")
            assert out.returncode == 0, out.stderr + sshd.log.read_text()
            assert out.stdout == "logged-in\n"
        finally:
            sshd.authorized_keys.write_text(kept)


def test_fido_keys_of_a_webauthn_rp_are_not_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSH cannot verify a credential made for a WebAuthn RP (strongroom.local)."""
    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, FIDO_VAULT_PASS)
    monkeypatch.setenv(FIDO_PIN_ENV, "2468")
    authenticator = SoftAuthenticator(tmp_path / "authenticator.json")
    config = write_fido_config(tmp_path / "ks")
    with open_with_authenticator(authenticator, config) as fido_ks:
        fido_ks.generate("ssh-webauthn", "fido-es256", backend="fido")
        with running_agent(fido_ks, AgentSettings(patterns=("ssh-*",))) as agent:
            assert agent.agent.identities() == []
        public = fido_ks.public_key("ssh-webauthn")  # its plain ECDSA line, as before
        assert keys.openssh_public_line(fido_ks, "ssh-webauthn") == algorithms.encode_public(
            public, "openssh"
        )


NOTICE_ASKPASS = """#!/bin/sh
printf '%s|%s|%s\\n' "$$" "$SSH_ASKPASS_PROMPT" "$1" > "$(dirname "$0")/notice.tmp"
mv "$(dirname "$0")/notice.tmp" "$(dirname "$0")/notice"
exec sleep 60
"""


def test_a_fido_signature_shows_a_presence_notice_until_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With SSH_ASKPASS, the agent shows "Confirm user presence" (SSH_ASKPASS_PROMPT=none)
    while the security key waits; the person touches once it is shown (the authenticator's
    presence hook waits for it), and the notice is closed when the signature is made. The
    keystore opened as the command opens it (the CLI's presence callback) also prints
    "touch your security key" on stderr, which `-D` shows."""
    from strongroom.cli._state import tell_user

    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, FIDO_VAULT_PASS)
    monkeypatch.setenv(FIDO_PIN_ENV, "2468")
    askpass = tmp_path / "askpass"
    askpass.write_text(NOTICE_ASKPASS)
    askpass.chmod(0o700)
    notice = tmp_path / "notice"
    touched: list[bool] = []

    def touch_after_the_notice(command: str) -> Presence:
        if command == "getAssertion":
            deadline = time.monotonic() + 30  # a bound on a hang, not a measurement
            while not notice.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            touched.append(notice.exists())
        return Presence.TOUCH

    authenticator = SoftAuthenticator(tmp_path / "a.json", presence=touch_after_the_notice)
    config = write_fido_config(tmp_path / "ks", fido_extra='rp_id = "ssh:"')
    settings = AgentSettings(patterns=("ssh-sk",), askpass=str(askpass))
    with (
        open_with_authenticator(authenticator, config, presence=tell_user) as fido_ks,
        running_agent(fido_ks, settings) as agent,
    ):
        fido_ks.generate("ssh-sk", "fido-eddsa", backend="fido")
        [identity] = agent.agent.identities()
        capsys.readouterr()  # what making the credential printed
        client = RawClient(agent.path)
        try:
            reply = client.request(b"\x0d" + s(identity.blob) + s(b"data") + b"\0\0\0\0")
        finally:
            client.close()
    assert reply[:1] == b"\x0e"
    assert "touch your security key" in capsys.readouterr().err
    assert touched == [True]
    pid, kind, prompt = notice.read_text().split("|", 2)
    assert kind == "none" and prompt.startswith("Confirm user presence for key ssh-sk")
    assert not Path(f"/proc/{pid}").exists()  # closed and reaped once the signature was made
