"""Who may use a key, and where: per-key policy from `[ssh_agent.policy."PATTERN"]`,
OpenSSH's destination constraints (`ssh-add -h`, restrict-destination-v00@openssh.com), and
the SSH login requests both are checked against.

The agent learns where a signature goes only from session-bind@openssh.com (the host keys
a connection was bound to, verified) and from the data to sign, when that is an SSH
userauth request (RFC 4252, section 7). A key restricted to hosts therefore signs logins
only, on a bound connection, as OpenSSH's agent does; any other signature with it is
refused. Written from OpenSSH's PROTOCOL.agent and PROTOCOL (publickey-hostbound-v00).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import AgentMessageError
from . import keys, wire

USERAUTH_REQUEST = 50
"""SSH_MSG_USERAUTH_REQUEST (RFC 4252): the message a login signature covers."""
HOSTBOUND_METHOD = "publickey-hostbound-v00@openssh.com"


@dataclass(frozen=True)
class Login:
    """The data of a signature that is an SSH public-key login (a userauth request)."""

    session_id: bytes
    user: str
    key_blob: bytes
    host_key: bytes | None
    """The server's host key, which OpenSSH's publickey-hostbound method signs along."""


def login_request(data: bytes) -> Login | None:
    """The login `data` is, or None when it is another kind of signature (ssh-keygen -Y
    sign's SSHSIG blob, a git commit). Only an exact userauth request counts: session id,
    SSH_MSG_USERAUTH_REQUEST, user, "ssh-connection", a public-key method with a signature,
    algorithm, key (and host key for publickey-hostbound), nothing after."""
    # Most signatures that are not logins fail the first test: a non-empty session id
    # followed by SSH_MSG_USERAUTH_REQUEST. Checked on the bytes, without an exception.
    if len(data) < 5:
        return None
    head = int.from_bytes(data[:4], "big")
    if head == 0 or len(data) <= 4 + head or data[4 + head] != USERAUTH_REQUEST:
        return None
    try:
        r = wire.Reader(data)
        session_id = r.string()
        if not session_id or r.byte() != USERAUTH_REQUEST:
            return None
        user, service, method = r.string(), r.string(), r.string()
        if service != b"ssh-connection" or not r.boolean():
            return None
        r.name()  # the signature algorithm; the key blob says the key
        key_blob = r.string()
        host_key: bytes | None = None
        if method == HOSTBOUND_METHOD.encode():
            host_key = r.string()
        elif method != b"publickey":
            return None
        r.end()
        return Login(session_id, user.decode("utf-8", "replace"), key_blob, host_key)
    except AgentMessageError:
        return None


# -- destination constraints (ssh-add -h) -------------------------------------------------------
@dataclass(frozen=True)
class Hop:
    """One end of a destination constraint: a user pattern (`to` only), a host name, its
    host keys and its CA keys. A plain host key matches one of `keys`; a host certificate
    matches when a CA of `ca_keys` signed it and it is valid now for `hostname`, as OpenSSH's
    agent decides; neither matches when its key, or the certificate's CA, is `revoked`."""

    user: str | None
    hostname: str | None
    keys: frozenset[bytes]
    any_keys: bool
    ca_keys: frozenset[bytes] = frozenset()
    revoked: frozenset[bytes] = frozenset()
    """Key blobs the agent's known_hosts files mark `@revoked` (not part of the constraint
    ssh-add sends: ssh-add leaves revoked keys out, but a certificate of a revoked key, or
    signed by a revoked CA, would still match a listed CA)."""

    def matches(self, host_key: bytes) -> bool:
        if not keys.is_certificate(host_key):
            return host_key in self.keys and host_key not in self.revoked
        if not self.ca_keys or self.hostname is None:
            return False
        try:
            cert = keys.host_certificate(host_key)
        except AgentMessageError:
            return False
        if cert.key in self.revoked or cert.ca in self.revoked:
            return False
        return cert.ca in self.ca_keys and cert.valid_for(self.hostname, time.time())


@dataclass(frozen=True)
class Destination:
    """One restrict-destination constraint: the key may be used from `source` to `target`."""

    source: Hop
    target: Hop


def destination_constraints(
    data: bytes, revoked: frozenset[bytes] = frozenset()
) -> tuple[Destination, ...]:
    """Decode restrict-destination-v00@openssh.com's data (a run of constraints, each
    `string from_hop || string to_hop || string reserved`); each hop refuses the `revoked`
    key blobs. AgentMessageError if malformed: a `from` user, a `from` host without keys
    (or keys without a host), a `to` hop without a host or keys, or no constraint at all."""
    r = wire.Reader(data)
    out: list[Destination] = []
    while r.remaining():
        c = wire.Reader(r.string())
        source, target = _hop(c.string(), revoked), _hop(c.string(), revoked)
        c.string()  # reserved
        c.end()
        if source.user is not None:
            raise AgentMessageError("a destination constraint names a user on its first hop")
        if (source.hostname is None) != (not source.any_keys):
            raise AgentMessageError("a destination constraint's first hop is inconsistent")
        if target.hostname is None or not target.any_keys:
            raise AgentMessageError("a destination constraint names no target host key")
        out.append(Destination(source, target))
    if not out:
        raise AgentMessageError("a destination restriction with no destination")
    return tuple(out)


def _hop(data: bytes, revoked: frozenset[bytes]) -> Hop:
    r = wire.Reader(data)
    user, hostname = r.string(), r.string()
    r.string()  # reserved
    found: set[bytes] = set()
    cas: set[bytes] = set()
    count = 0
    while r.remaining():
        blob, is_ca = r.string(), r.boolean()
        count += 1
        keys.load_blob(blob)  # a key this agent reads, else AgentMessageError
        (cas if is_ca else found).add(blob)
    return Hop(
        user.decode("utf-8", "replace") or None,
        hostname.decode("utf-8", "replace") or None,
        frozenset(found),
        count > 0,
        frozenset(cas),
        revoked,
    )


def _hop_allowed(
    destinations: Sequence[Destination],
    source: bytes | None,
    target: bytes | None,
    user: str | None,
) -> bool:
    for d in destinations:
        if source is None:
            if d.source.hostname is not None or d.source.any_keys:
                continue  # the first hop must come from this machine
        elif not d.source.matches(source):
            continue
        if target is not None and not d.target.matches(target):
            continue
        if d.target.user is not None and user is not None:
            if not keys.match_pattern(user, d.target.user):
                continue
        return True
    return False


def destinations_allow(
    destinations: Sequence[Destination],
    hops: Sequence[tuple[bytes, bool]],
    user: str | None,
) -> bool:
    """Whether every hop a connection was bound to (host key, forwarding) is allowed by a
    constraint, from this machine through each forwarding host to the last; `user` is the
    login's user (None when listing keys). A connection last bound for forwarding lists a
    key only if it may go on from that host. OpenSSH's agent decides the same way."""
    source: bytes | None = None
    for i, (host_key, _forwarding) in enumerate(hops):
        last = i == len(hops) - 1
        if not _hop_allowed(destinations, source, host_key, user if last else None):
            return False
        source = host_key
    if hops and hops[-1][1] and user is None:
        return _hop_allowed(destinations, hops[-1][0], None, None)
    return True


# -- per-key policy (config) --------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPolicy:
    """`[ssh_agent.policy."PATTERN"]`: what the keys whose names match `pattern` need."""

    pattern: str
    confirm: bool = False
    allowed_hosts: frozenset[str] | None = None
    """Host key fingerprints (SHA256:...) every host of a connection must have (plain, or
    inside a host certificate), or None: any host."""
    allowed_uids: frozenset[int] | None = None
    """The peer uids that may use the keys, or None: the agent's own uid and root."""
    allowed_host_cas: frozenset[tuple[str, bytes]] = frozenset()
    """With `allowed_hosts`: (host name, CA key blob) pairs from known_hosts
    `@cert-authority` lines; a host certificate that CA signed, valid now for that name,
    is allowed too."""
    revoked_host_keys: frozenset[bytes] = frozenset()
    """Key blobs the known_hosts files mark `@revoked`, whatever names they are listed
    for: never allowed, bare, as a host certificate's key or as its signing CA."""

    def allows_host(self, host_key: bytes) -> bool:
        """Whether a host key (a session-bind's) is one `allowed_hosts` lets through."""
        cert: keys.HostCertificate | None = None
        if keys.is_certificate(host_key):
            try:
                cert = keys.host_certificate(host_key)
            except AgentMessageError:
                return False
            if cert.key in self.revoked_host_keys or cert.ca in self.revoked_host_keys:
                return False
        elif host_key in self.revoked_host_keys:
            return False
        if keys.host_key_fingerprint(host_key) in (self.allowed_hosts or ()):
            return True
        if not self.allowed_host_cas or cert is None:
            return False
        now = time.time()
        return any(
            cert.ca == ca and cert.valid_for(name, now) for name, ca in self.allowed_host_cas
        )


_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def host_fingerprint(entry: str) -> str:
    """An `allowed_hosts` entry as the fingerprint the agent compares: `SHA256:...` as
    `ssh-keygen -l` prints it, or a public key line (`ssh-ed25519 AAAA... [comment]`, as
    in known_hosts after the host names, or a `.pub` file). ValueError otherwise."""
    entry = entry.strip()
    if _FINGERPRINT.fullmatch(entry):
        return entry
    fields = entry.split()
    if len(fields) >= 2:
        try:
            blob = base64.b64decode(fields[1], validate=True)
            if wire.Reader(blob).name() == fields[0]:
                keys.load_blob(blob)
                return keys.fingerprint(blob)
        except (binascii.Error, AgentMessageError):
            pass
        raise ValueError(f"{fields[0]} ...: not an Ed25519, ECDSA or RSA public key line")
    raise ValueError(
        f"{entry!r}: a host is a host name, a SHA256:... fingerprint or a public key line"
    )
