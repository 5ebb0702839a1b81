"""Host certificates (core/sshagent/keys.py, policy.py): certificates made by OpenSSH's
`ssh-keygen -s`, checked the way OpenSSH's agent checks them; and real logins to an sshd
that presents a host certificate, with `allowed_hosts` naming the host through a
`@cert-authority` line and with `ssh-add -h` carrying the CA key.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from sshagent_support import RawClient, Sshd, running_agent, s, ssh_add, start_sshd

import strongroom
from strongroom import algorithms
from strongroom import config as config_mod
from strongroom.errors import AgentMessageError
from strongroom.keystore import Keystore
from strongroom.sshagent import AgentSettings, KeyPolicy, keys, policy


def keygen(path: Path, key_type: str = "ed25519") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def certify(ca: Path, pub: Path, *options: str) -> bytes:
    """`ssh-keygen -s CA OPTIONS pub`: the certificate's blob."""
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "an-id", *options, str(pub)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    cert = pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub")
    return base64.b64decode(cert.read_text().split()[1])


def blob_of(pub: Path) -> bytes:
    return base64.b64decode(pub.read_text().split()[1])


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_a_host_certificate_is_read_and_checked_as_openssh_does(
    tmp_path: Path, key_type: str
) -> None:
    ca = keygen(tmp_path / "ca")
    host = keygen(tmp_path / "host", key_type)
    pub = host.with_suffix(".pub")
    cert = certify(ca, pub, "-h", "-n", "bastion.example.com,*.internal", "-V", "-5m:+1h")
    assert keys.is_certificate(cert) and not keys.is_certificate(blob_of(pub))
    parsed = keys.host_certificate(cert)
    assert parsed.key == blob_of(pub)
    assert parsed.ca == blob_of(ca.with_suffix(".pub"))
    assert parsed.cert_type == keys.HOST_CERT
    now = time.time()
    assert parsed.valid_for("bastion.example.com", now)
    assert parsed.valid_for("DB.internal", now)  # principals are patterns, names any case
    assert not parsed.valid_for("elsewhere.example.com", now)
    assert not parsed.valid_for("bastion.example.com", now + 7200)  # expired by then
    # A certificate's fingerprint is its key's, as `ssh-keygen -l` prints it.
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "host-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()[1]
    assert keys.host_key_fingerprint(cert) == printed == keys.fingerprint(blob_of(pub))


def test_a_certificate_that_is_not_for_a_host_or_not_signed_is_refused(tmp_path: Path) -> None:
    ca = keygen(tmp_path / "ca")
    pub = keygen(tmp_path / "host").with_suffix(".pub")
    user_cert = certify(ca, pub, "-n", "bastion")  # no -h: a user certificate
    assert not keys.host_certificate(user_cert).valid_for("bastion", time.time())
    old = certify(ca, pub, "-h", "-n", "bastion", "-V", "20200101:20200102")
    assert not keys.host_certificate(old).valid_for("bastion", time.time())
    critical = certify(ca, pub, "-h", "-n", "bastion", "-O", "force-command=true")
    assert not keys.host_certificate(critical).valid_for("bastion", time.time())
    good = certify(ca, pub, "-h", "-n", "bastion")
    tampered = bytearray(good)
    tampered[-5] ^= 1  # inside the CA's signature
    with pytest.raises(AgentMessageError):
        keys.host_certificate(bytes(tampered))
    renamed = bytearray(good)
    renamed[len(good) // 2] ^= 1  # inside the signed fields
    with pytest.raises(AgentMessageError):
        keys.host_certificate(bytes(renamed))
    with pytest.raises(AgentMessageError):
        keys.host_certificate(blob_of(pub))  # not a certificate


def test_allowed_hosts_and_hops_match_certificates_by_their_ca(tmp_path: Path) -> None:
    ca, other_ca = keygen(tmp_path / "ca"), keygen(tmp_path / "other-ca")
    pub = keygen(tmp_path / "host").with_suffix(".pub")
    cert = certify(ca, pub, "-h", "-n", "bastion")
    ca_blob, other_blob = blob_of(ca.with_suffix(".pub")), blob_of(other_ca.with_suffix(".pub"))
    by_ca = KeyPolicy(
        "k", allowed_hosts=frozenset(), allowed_host_cas=frozenset({("bastion", ca_blob)})
    )
    assert by_ca.allows_host(cert)
    assert not by_ca.allows_host(blob_of(pub))  # the bare key was not listed
    assert not KeyPolicy(
        "k", allowed_hosts=frozenset(), allowed_host_cas=frozenset({("bastion", other_blob)})
    ).allows_host(cert)
    assert not KeyPolicy(
        "k", allowed_hosts=frozenset(), allowed_host_cas=frozenset({("db", ca_blob)})
    ).allows_host(cert)
    # A listed key matches whether the host shows it bare or inside a certificate.
    by_key = KeyPolicy("k", allowed_hosts=frozenset({keys.fingerprint(blob_of(pub))}))
    assert by_key.allows_host(cert) and by_key.allows_host(blob_of(pub))
    # ssh-add -h: a hop's CA keys match certificates for its host name only; its plain
    # keys never match a certificate (OpenSSH's agent decides so too).
    hop = policy.Hop(None, "bastion", frozenset({blob_of(pub)}), True, frozenset({ca_blob}))
    assert hop.matches(cert) and hop.matches(blob_of(pub))
    assert not policy.Hop(None, "db", frozenset(), True, frozenset({ca_blob})).matches(cert)
    assert not policy.Hop(None, "bastion", frozenset({blob_of(pub)}), True).matches(cert)


# -- real logins ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(tmp_path_factory.mktemp("sshagent-certs"))
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        keystore.generate("ssh-cert-login", "ed25519")
        yield keystore


@pytest.fixture(scope="module")
def pub(ks: Keystore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pub") / "ssh-cert-login.pub"
    path.write_bytes(algorithms.encode_public(ks.public_key("ssh-cert-login"), "openssh") + b"\n")
    return path


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, pub: Path) -> Iterator[tuple[Sshd, Sshd]]:
    """An sshd presenting a host certificate (principals 127.0.0.1 and host-a), and a
    second one, certified by the same CA for another name (host-b)."""
    ca = keygen(tmp_path_factory.mktemp("host-ca") / "ca")
    certified = start_sshd(
        tmp_path_factory.mktemp("sshd-cert"), pub.read_text(), ca, "127.0.0.1,host-a"
    )
    other = start_sshd(
        tmp_path_factory.mktemp("sshd-cert-b"), pub.read_text(), ca, "127.0.0.1,host-b"
    )
    yield certified, other
    certified.stop()
    other.stop()


def test_allowed_hosts_through_a_cert_authority_line(
    ks: Keystore, pub: Path, hosts: tuple[Sshd, Sshd], tmp_path: Path
) -> None:
    """`allowed_hosts = [NAME]` whose known_hosts line is `@cert-authority`: ssh's
    session-bind carries the host certificate, the agent verifies it and its CA and checks
    NAME among its principals. The policy lists no host key at all, so a login can only
    pass through the CA rule."""
    from strongroom.cli.sshagent import _policy

    certified, other = hosts
    known = certified.directory / "known_hosts"
    assert known.read_text().startswith("@cert-authority")
    table = config_mod.SshAgentPolicy(
        "ssh-cert-login", allowed_hosts=(f"[127.0.0.1]:{certified.port}",)
    )
    rule = _policy(table, [str(known)])
    assert rule.allowed_hosts == frozenset() and len(rule.allowed_host_cas) == 1
    [(principal, _ca)] = rule.allowed_host_cas
    assert principal == "127.0.0.1"  # the name without its port, as ssh checks it
    with running_agent(ks, AgentSettings(patterns=("ssh-*",), policies=(rule,))) as agent:
        out = certified.ssh(agent.path, pub, "echo", "logged-in", options=("-v",))
        assert out.returncode == 0, out.stderr + certified.log.read_text()
        assert "Server host certificate" in out.stderr  # a certificate, not a bare key

    # A rule for host-b: the first host's certificate (127.0.0.1, host-a) does not name
    # it, the second's does.
    known_b = tmp_path / "known_hosts"
    known_b.write_text(known.read_text().replace(f"[127.0.0.1]:{certified.port}", "host-b"))
    table_b = config_mod.SshAgentPolicy("ssh-cert-login", allowed_hosts=("host-b",))
    rule_b = _policy(table_b, [str(known_b)])
    with running_agent(ks, AgentSettings(patterns=("ssh-*",), policies=(rule_b,))) as agent:
        refused = certified.ssh(agent.path, pub, "echo", "logged-in")
        assert refused.returncode != 0 and "logged-in" not in refused.stdout
        allowed = other.ssh(agent.path, pub, "echo", "logged-in")
        assert allowed.returncode == 0, allowed.stderr + other.log.read_text()


def test_ssh_add_h_with_a_cert_authority_restricts_to_the_certified_host(
    ks: Keystore, hosts: tuple[Sshd, Sshd], tmp_path: Path
) -> None:
    """`ssh-add -H known_hosts -h host-a` where known_hosts trusts a CA for host-a: the
    constraint carries the CA key; ssh logs in to the host whose certificate names
    host-a, and the agent refuses the host certified for host-b."""
    certified, other = hosts
    key = keygen(tmp_path / "id_added")
    added_pub = key.with_suffix(".pub")
    ca_line = (certified.directory / "known_hosts").read_text().split(None, 2)[2]
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority host-a {ca_line}")
    kept = [h.authorized_keys.read_text() for h in (certified, other)]
    for h, text in zip((certified, other), kept, strict=True):
        h.authorized_keys.write_text(text + added_pub.read_text())
    try:
        with running_agent(ks, AgentSettings(allow_add=True)) as adder:
            added = ssh_add(adder, "-H", str(known), "-h", "host-a", str(key))
            assert added.returncode == 0, added.stderr
            key.unlink()
            [constraint] = [a.destinations for a in adder.agent._added.values()]
            [destination] = constraint
            assert destination.target.ca_keys and not destination.target.keys
            out = certified.ssh(adder.path, added_pub, "echo", "logged-in")
            assert out.returncode == 0, out.stderr + certified.log.read_text()
            refused = other.ssh(adder.path, added_pub, "echo", "logged-in")
            assert refused.returncode != 0 and "logged-in" not in refused.stdout
            # Listing on an unbound connection still shows it (local use), as before.
            client = RawClient(adder.path)
            try:
                reply = client.request(b"\x0b")
                assert s(blob_of(added_pub)) in reply
            finally:
                client.close()
    finally:
        for h, text in zip((certified, other), kept, strict=True):
            h.authorized_keys.write_text(text)
