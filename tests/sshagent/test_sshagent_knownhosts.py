"""Host names in `allowed_hosts`, looked up in known_hosts (core/sshagent/knownhosts.py).

OpenSSH's own `ssh-keygen -F NAME` is the oracle: for every name, the agent takes the
host keys ssh-keygen finds (less the revoked ones), in a plain file and in the same file
hashed by `ssh-keygen -H`. The login test with a host name is in test_sshagent_openssh.py.
"""

from __future__ import annotations

import base64
import binascii
import subprocess
from pathlib import Path

import pytest

from strongroom import config as config_mod
from strongroom.errors import InvalidArgument
from strongroom.sshagent import keys
from strongroom.sshagent.knownhosts import (
    DEFAULT_FILES,
    is_host_name,
    lookup,
    names_match,
    resolve_allowed_hosts,
)

NAMES = [
    "host-a",
    "HOST-A",  # ssh lower-cases names before it looks them up
    "10.0.0.1",
    "x.example.com",
    "bad.example.com",
    "[127.0.0.1]:2222",
    "127.0.0.1",
    "revoked-host",
    "foo.ca.test",
    "nowhere",
]


def _keygen(directory: Path, name: str) -> str:
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A known_hosts file with every kind of line, and its copy hashed by ssh-keygen -H."""
    directory = tmp_path_factory.mktemp("known-hosts")
    k = {n: _keygen(directory, n) for n in ("a", "b", "c", "revoked", "ca")}
    plain = directory / "known_hosts"
    plain.write_text(
        "# a comment\n"
        f"host-a,10.0.0.1 {k['a']} a comment\n"
        f"*.example.com,!bad.example.com {k['b']}\n"
        f"[127.0.0.1]:2222 {k['c']}\n"
        f"@cert-authority *.ca.test {k['ca']}\n"
        f"@revoked * {k['revoked']}\n"
        f"revoked-host {k['revoked']}\n"
    )
    hashed = directory / "known_hosts_hashed"
    hashed.write_text(plain.read_text())
    subprocess.run(
        ["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True, timeout=30
    )
    assert "|1|" in hashed.read_text()
    # Lines ssh skips (ssh-keygen -H refuses to hash a file with them).
    malformed = "host-a ssh-ed25519 not-base64!\nhost-a\n\n"
    for path in (plain, hashed):
        path.write_text(path.read_text() + malformed)
    return {"plain": plain, "hashed": hashed}


def _oracle(name: str, path: Path) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """(host keys, CA keys, revoked keys) that `ssh-keygen -F name` finds in `path`."""
    out = subprocess.run(
        ["ssh-keygen", "-F", name, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.splitlines()
    found: dict[str, set[bytes]] = {"": set(), "CA": set(), "REVOKED": set()}
    for header, line in zip(out[::2], out[1::2], strict=True):
        kind = header.split("found: line", 1)[1].split()[1:] or [""]
        fields = line.split()
        if fields[0].startswith("@"):
            fields = fields[1:]
        try:  # -F prints a matching line whose key does not parse too; ssh never uses it
            found[kind[0]].add(base64.b64decode(fields[2], validate=True))
        except (IndexError, binascii.Error):
            continue
    return found[""], found["CA"], found["REVOKED"]


@pytest.mark.parametrize("kind", ["plain", "hashed"])
@pytest.mark.parametrize("name", NAMES)
def test_lookup_finds_what_ssh_keygen_finds(files: dict[str, Path], kind: str, name: str) -> None:
    path = files[kind]
    known = lookup(name, path.read_text().splitlines())
    plain, cas, revoked = _oracle(name.lower(), path)
    assert known.keys == plain - revoked
    assert known.ca_keys == cas - revoked
    assert revoked <= known.revoked  # kept, whatever names they are listed for


def test_names_resolve_to_fingerprints_or_fail_with_a_reason(files: dict[str, Path]) -> None:
    path = files["hashed"]
    [key_a] = lookup("host-a", path.read_text().splitlines()).keys
    fingerprint = keys.fingerprint(key_a)
    line = "ssh-ed25519 " + base64.b64encode(key_a).decode()
    [revoked] = lookup("anything", path.read_text().splitlines()).revoked
    # Names, fingerprints and key lines mix; the file is read only for names, and its
    # @revoked keys come along.
    assert resolve_allowed_hosts(["host-a", fingerprint, line], [path]) == (
        {fingerprint},
        set(),
        {revoked},
    )
    assert resolve_allowed_hosts([fingerprint], [path]) == ({fingerprint}, set(), set())
    with pytest.raises(ValueError, match=r"no host key for nowhere in .*known_hosts_hashed"):
        resolve_allowed_hosts(["nowhere"], [path])
    with pytest.raises(ValueError, match="no host key for revoked-host"):
        resolve_allowed_hosts(["revoked-host"], [path])
    with pytest.raises(ValueError, match="no known_hosts file"):
        resolve_allowed_hosts(["host-a"], [])
    # A name known through @cert-authority: (host, CA) pairs, no fingerprint.
    [ca] = lookup("foo.ca.test", path.read_text().splitlines()).ca_keys
    assert resolve_allowed_hosts(["FOO.ca.test"], [path]) == (
        set(),
        {("foo.ca.test", ca)},
        {revoked},
    )
    # A missing file is skipped; the others still count.
    both, _, _ = resolve_allowed_hosts(["host-a", "x.example.com"], [path / "missing", path])
    assert len(both) == 2 and fingerprint in both
    assert "~/.ssh/known_hosts" in DEFAULT_FILES


def test_the_command_looks_names_up_in_the_configured_files(files: dict[str, Path]) -> None:
    from strongroom.cli.sshagent import _policy

    policy = config_mod.SshAgentPolicy("ssh-*", allowed_hosts=("[127.0.0.1]:2222",))
    [key_c] = lookup("[127.0.0.1]:2222", files["plain"].read_text().splitlines()).keys
    resolved = _policy(policy, [str(files["hashed"])])
    assert resolved.allowed_hosts == {keys.fingerprint(key_c)}
    with pytest.raises(InvalidArgument, match=r'policy\."ssh-\*"\] allowed_hosts: no host key'):
        _policy(config_mod.SshAgentPolicy("ssh-*", allowed_hosts=("elsewhere",)), [])


@pytest.mark.parametrize(
    ("field", "name", "matches"),
    [
        ("a,b,c", "b", True),
        ("*.example.com", "deep.sub.example.com", True),
        ("*.example.com", "example.com", False),
        ("host?", "host1", True),
        ("host?", "host12", False),
        ("*,!secret", "secret", False),
        ("!secret,*", "public", True),
        ("!secret", "public", False),  # a negation alone matches nothing
        ("Host-A", "host-a", True),
        ("[10.0.0.5]:2222", "[10.0.0.5]:2222", True),
        ("10.0.0.5", "[10.0.0.5]:2222", False),
        ("|1|bad|hash", "host", False),
        ("|2|AAAA|AAAA", "host", False),
    ],
)
def test_host_patterns(field: str, name: str, matches: bool) -> None:
    assert names_match(name, field) is matches


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        ("bastion.example.com", True),
        ("[10.0.0.5]:2222", True),
        ("::1", True),
        ("SHA256:" + "A" * 43, False),
        ("ssh-ed25519 AAAA", False),
        ("user@host", False),
    ],
)
def test_which_entries_are_host_names(entry: str, name: bool) -> None:
    assert is_host_name(entry) is name
