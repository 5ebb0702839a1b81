"""Host names in `allowed_hosts`, as host keys: the keys a known_hosts file lists for them.

The agent learns where a login goes only from session-bind@openssh.com, which carries the
host key ssh verified, never the name the user typed. A name in `[ssh_agent.policy."..."]
allowed_hosts` is therefore turned into host keys once, when the agent starts, the way
OpenSSH's `ssh-add -h HOST` does: by looking the name up in known_hosts files (ssh's own,
by default). Written from sshd(8)'s "SSH_KNOWN_HOSTS FILE FORMAT": lines of `[marker]
patterns keytype base64 [comment]`, where the patterns are a comma-separated list of host
names or wildcards (`*`, `?`, `!` negation), `[host]:port` for a port other than 22, or one
hashed name `|1|salt|hmac` (HashKnownHosts: HMAC-SHA1 of the name under the salt).

`@revoked` keys are never taken, whatever names they are listed for: they are subtracted
from the keys and CAs found, and kept, so that the agent also refuses a host certificate
whose key or signing CA is revoked, as ssh does. `@cert-authority` keys become (host, CA)
rules: a host certificate that CA signed, valid now, naming the host among its principals,
is allowed as that host, as ssh itself accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgentMessageError
from . import keys, wire
from .policy import host_fingerprint

DEFAULT_FILES = (
    "~/.ssh/known_hosts",
    "~/.ssh/known_hosts2",
    "/etc/ssh/ssh_known_hosts",
    "/etc/ssh/ssh_known_hosts2",
)
"""Where ssh looks by default (UserKnownHostsFile, GlobalKnownHostsFile); missing files
are skipped."""

_HOST_NAME = re.compile(r"[A-Za-z0-9_.:%-]+|\[[A-Za-z0-9_.:%-]+\]:[0-9]{1,5}")
"""A host as known_hosts names it: `name` (port 22), `[name]:port`; IPv6 addresses too."""


def is_host_name(entry: str) -> bool:
    """Whether an `allowed_hosts` entry is a host name (else a fingerprint or key line)."""
    return not entry.startswith("SHA256:") and _HOST_NAME.fullmatch(entry) is not None


@dataclass(frozen=True)
class HostKeys:
    """What known_hosts files say of one name."""

    keys: frozenset[bytes]
    """Host key blobs listed for the name, less the revoked ones."""
    ca_keys: frozenset[bytes]
    """`@cert-authority` key blobs whose patterns match the name, less the revoked ones."""
    revoked: frozenset[bytes] = frozenset()
    """Every `@revoked` key blob of the lines, whatever names it is listed for."""


def _pattern_matches(name: str, pattern: str) -> bool:
    """OpenSSH's wildcard match: `*` any run, `?` one character, case-insensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE | re.DOTALL) is not None


def _hashed_matches(name: str, field: str) -> bool:
    """`|1|base64(salt)|base64(HMAC-SHA1(salt, name))`, as `ssh-keygen -H` writes it."""
    parts = field.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except binascii.Error:
        return False
    if len(salt) != 20 or len(digest) != 20:
        return False
    mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(mac, digest)


def names_match(name: str, field: str) -> bool:
    """Whether a known_hosts line's host field lists `name`: a hashed name, or patterns
    of which one matches and none that is negated (`!pattern`) does."""
    if field.startswith("|"):
        return _hashed_matches(name, field)
    matched = False
    for pattern in field.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(name, pattern[1:]):
                return False
        elif pattern and _pattern_matches(name, pattern):
            matched = True
    return matched


def _line_key(key_type: str, encoded: str) -> bytes | None:
    """The key blob of a line's `keytype base64` fields, if it is a key this agent reads."""
    try:
        blob = base64.b64decode(encoded, validate=True)
        if wire.Reader(blob).name() != key_type:
            return None
        keys.load_blob(blob)
    except (binascii.Error, AgentMessageError):
        return None
    return blob


def lookup(name: str, lines: Iterable[str]) -> HostKeys:
    """The host keys and CA keys that known_hosts `lines` list for `name` (as ssh writes
    it: lower-case, `[name]:port` off port 22). Lines ssh would skip are skipped: comments,
    malformed lines, keys of types this agent does not read."""
    name = name.lower()
    found: set[bytes] = set()
    cas: set[bytes] = set()
    revoked: set[bytes] = set()
    for raw in lines:
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields[0] if fields[0].startswith("@") else None
        if marker is not None:
            fields = fields[1:]
        if len(fields) < 3 or marker not in (None, "@cert-authority", "@revoked"):
            continue
        blob = _line_key(fields[1], fields[2])
        if blob is None:
            continue
        if marker == "@revoked":
            revoked.add(blob)  # a revoked key is refused whatever names it is listed for
        elif names_match(name, fields[0]):
            (cas if marker == "@cert-authority" else found).add(blob)
    return HostKeys(frozenset(found - revoked), frozenset(cas - revoked), frozenset(revoked))


def read_lines(files: Sequence[str | Path]) -> list[str]:
    """The lines of the known_hosts files that exist (`~` expanded), in order. ValueError
    for a file that exists but cannot be read."""
    out: list[str] = []
    for file in files:
        path = Path(file).expanduser()
        try:
            out.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return out


def host_name(name: str) -> str:
    """The host a known_hosts name stands for, as a certificate's principals name it:
    `[host]:port` without its brackets and port."""
    if name.startswith("[") and "]:" in name:
        return name[1 : name.index("]:")]
    return name


def revoked_keys(lines: Iterable[str]) -> frozenset[bytes]:
    """The key blobs of known_hosts `lines` marked `@revoked`, whatever names they list."""
    return lookup("", lines).revoked


def host_rules(
    name: str, lines: Sequence[str], files: Sequence[str | Path]
) -> tuple[set[str], set[tuple[str, bytes]]]:
    """What known_hosts says `name` may present: the fingerprints of its host keys, and
    (host, CA key) pairs from its `@cert-authority` lines (a host certificate that CA
    signed for that host), revoked keys left out. ValueError, naming the files, when it
    says nothing of it."""
    known = lookup(name, lines)
    if not known.keys and not known.ca_keys:
        where = ", ".join(str(f) for f in files) or "no known_hosts file"
        raise ValueError(f"no host key for {name} in {where} (ssh-keyscan, or ssh once)")
    host = host_name(name.lower())
    return {keys.fingerprint(b) for b in known.keys}, {(host, ca) for ca in known.ca_keys}


def resolve_allowed_hosts(
    entries: Iterable[str], files: Sequence[str | Path] | None = None
) -> tuple[frozenset[str], frozenset[tuple[str, bytes]], frozenset[bytes]]:
    """An `allowed_hosts` list as what the agent compares: host key fingerprints, (host,
    CA key) pairs for host certificates, and the `@revoked` key blobs of the known_hosts
    files (a host certificate whose key or CA is one of them is refused). Host names go
    through the known_hosts `files` (None: ssh's defaults, read once, only if a name is
    listed; else no revoked key); fingerprints and key lines as `policy.host_fingerprint`
    reads them. ValueError with a one-line reason for an entry that names no key."""
    files = DEFAULT_FILES if files is None else tuple(files)
    lines: list[str] | None = None
    fingerprints: set[str] = set()
    cas: set[tuple[str, bytes]] = set()
    for entry in entries:
        entry = entry.strip()
        if is_host_name(entry):
            if lines is None:
                lines = read_lines(files)
            found, signers = host_rules(entry, lines, files)
            fingerprints |= found
            cas |= signers
        else:
            fingerprints.add(host_fingerprint(entry))
    revoked = revoked_keys(lines) if lines is not None else frozenset()
    return frozenset(fingerprints), frozenset(cas), revoked
