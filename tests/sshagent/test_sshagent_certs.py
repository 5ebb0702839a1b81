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
from strongroom.sshagent.knownhosts import resolve_allowed_hosts


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


def test_a_certificate_of_a_revoked_key_or_by_a_revoked_ca_is_refused(tmp_path: Path) -> None:
    """known_hosts `@revoked` keys, whatever names they are listed for, are refused as a
    host certificate's key and as its CA, as ssh refuses them; by `allowed_hosts` (through
    resolve_allowed_hosts) and by ssh-add -h hops alike."""
    ca, other_ca = keygen(tmp_path / "ca"), keygen(tmp_path / "other-ca")
    pub = keygen(tmp_path / "host").with_suffix(".pub")
    cert = certify(ca, pub, "-h", "-n", "bastion")
    other_cert = certify(other_ca, pub, "-h", "-n", "bastion")
    ca_line = " ".join(ca.with_suffix(".pub").read_text().split()[:2])
    host_line = " ".join(pub.read_text().split()[:2])
    ca_blob, host_blob = blob_of(ca.with_suffix(".pub")), blob_of(pub)
    known = tmp_path / "known_hosts"

    # The CA is trusted for bastion, the host's own key is revoked (for any name).
    known.write_text(f"@cert-authority bastion {ca_line}\n@revoked other-name {host_line}\n")
    hosts, cas, revoked = resolve_allowed_hosts(["bastion"], [known])
    assert cas == {("bastion", ca_blob)} and revoked == {host_blob}
    assert not KeyPolicy("k", False, hosts, None, cas, revoked).allows_host(cert)
    assert KeyPolicy("k", False, hosts, None, cas).allows_host(cert)  # the same, unrevoked

    # The host's key is listed, the CA that signed its certificate is revoked: the bare
    # key passes, the certificate does not; one by another CA still does.
    known.write_text(f"bastion {host_line}\n@revoked * {ca_line}\n")
    hosts, cas, revoked = resolve_allowed_hosts(["bastion"], [known])
    assert hosts == {keys.fingerprint(host_blob)} and revoked == {ca_blob}
    rule = KeyPolicy("k", False, hosts, None, cas, revoked)
    assert rule.allows_host(host_blob) and rule.allows_host(other_cert)
    assert not rule.allows_host(cert)
    assert KeyPolicy("k", False, hosts, None, cas).allows_host(cert)

    # ssh-add -h hops: the agent's revoked keys are refused the same way.
    def hop(revoked: frozenset[bytes]) -> policy.Hop:
        return policy.Hop(
            None, "bastion", frozenset({host_blob}), True, frozenset({ca_blob}), revoked
        )

    assert hop(frozenset()).matches(cert) and hop(frozenset()).matches(host_blob)
    assert not hop(frozenset({host_blob})).matches(cert)
    assert not hop(frozenset({host_blob})).matches(host_blob)
    assert not hop(frozenset({ca_blob})).matches(cert)
    assert hop(frozenset({ca_blob})).matches(host_blob)


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


def test_a_host_whose_certified_key_the_agent_finds_revoked_is_refused(
    ks: Keystore, pub: Path, hosts: tuple[Sshd, Sshd], tmp_path: Path
) -> None:
    """The agent's known_hosts trusts the CA for the host and revokes the host's own key;
    ssh's known_hosts (the sshd's, without the revocation) lets ssh connect, so it is the
    agent that refuses: over a forwarded agent, ssh on another machine may not know of
    the revocation. The same with ssh-add -h, whose constraint carries the CA only."""
    from strongroom.cli.sshagent import _policy

    certified, _other = hosts
    host_blob = base64.b64decode(certified.host_key_pub.split()[1])
    known = tmp_path / "known_hosts"
    revoked_line = " ".join(certified.host_key_pub.split()[:2])
    known.write_text(
        (certified.directory / "known_hosts").read_text() + f"@revoked * {revoked_line}\n"
    )
    table = config_mod.SshAgentPolicy(
        "ssh-cert-login", allowed_hosts=(f"[127.0.0.1]:{certified.port}",)
    )
    rule = _policy(table, [str(known)])
    assert rule.revoked_host_keys == {host_blob} and len(rule.allowed_host_cas) == 1
    with running_agent(ks, AgentSettings(patterns=("ssh-*",), policies=(rule,))) as agent:
        refused = certified.ssh(agent.path, pub, "echo", "logged-in")
        assert refused.returncode != 0 and "logged-in" not in refused.stdout

    key = keygen(tmp_path / "id_added")
    added_pub = key.with_suffix(".pub")
    ca_line = (certified.directory / "known_hosts").read_text().split(None, 2)[2]
    ssh_add_known = tmp_path / "known_hosts_ssh_add"
    ssh_add_known.write_text(f"@cert-authority host-a {ca_line}")
    kept = certified.authorized_keys.read_text()
    certified.authorized_keys.write_text(kept + added_pub.read_text())
    try:
        for revoked, allowed in ((frozenset({host_blob}), False), (frozenset(), True)):
            settings = AgentSettings(allow_add=True, revoked_host_keys=revoked)
            with running_agent(ks, settings) as adder:
                added = subprocess.run(
                    ["ssh-add", "-H", str(ssh_add_known), "-h", "host-a", str(key)],
                    env=adder.env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert added.returncode == 0, added.stderr
                out = certified.ssh(adder.path, added_pub, "echo", "logged-in")
                assert (out.returncode == 0) == allowed, out.stderr
                assert ("logged-in" in out.stdout) == allowed
    finally:
        certified.authorized_keys.write_text(kept)
