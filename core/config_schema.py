"""What a configuration holds: the keys each table may set, the parsed tables as dataclasses
(`Config` and the tables under it), and the checks and line finding they share.

Moved verbatim out of config.py (docs/decisions.md, "Modules split along their banners");
`strongroom.config` exports every name it did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidArgument

APP = "strongroom"
VAULT_TYPE = "vault"
AUDIT_MODES = ("file", "log", "off")

KEYSTORE_KEYS = {
    "order": "backends to try, in order, when generate names none",
    "data_dir": "where the catalog, the vault snapshot and the audit log live",
    "namespace": "the namespace keys are created in (default: default)",
    "audit": "file (audit.jsonl in data_dir), log (the strongroom.audit logger) or off",
    "core_dumps": "allow core dumps of this process (default false: turned off at open)",
    "audit_signing_key": "name of the key (namespace _audit) that signs audit checkpoints",
    "audit_signing_backend": "backend that holds the checkpoint signing key (default: vault)",
    "audit_checkpoint_every": "sign a checkpoint after this many records per process (0: never)",
    "deletion_wait": "how long `key delete` waits before it destroys a key, e.g. 7d (default 0)",
}
SERVER_KEYS = {
    "socket": "Unix socket path the service listens on (default: serve.sock in data_dir)",
    "socket_mode": 'permissions of the socket, e.g. "0600" (default) or "0660" with a group',
    "socket_group": "group that owns the socket (with socket_mode 0660)",
    "listen": 'host:port for TCP with TLS, e.g. "127.0.0.1:8443" (default: none)',
    "kmip_listen": 'host:port the KMIP server listens on with mutual TLS, e.g. "0.0.0.0:5696" '
    "(default: none; needs tls_cert, tls_key and tls_client_ca)",
    "tls_cert": "PEM certificate chain the service presents on TCP",
    "tls_key": "PEM private key of tls_cert (file mode 600)",
    "tls_client_ca": "PEM CA that client certificates must chain to (mutual TLS)",
    "client_cert_required": "refuse TLS clients without a certificate (default false)",
    "max_request_bytes": "largest request body accepted (default 1048576)",
    "rate_limit": "requests per second per identity (default 1000; 0: no limit)",
    "rate_burst": "requests an identity may make at once above the rate (default 2000)",
    "head_timeout": "seconds a connection has to send a request's line and headers (default 10)",
    "body_timeout": "seconds a request has to send its body once its head is in (default 30)",
    "keepalive_timeout": "seconds an idle connection is kept between requests (default 5)",
    "max_connections": "open connections at most, all peers together (default: the file "
    "descriptor limit, raised to its hard maximum, less 128)",
    "max_connections_per_peer": "open connections at most from one peer: an IP address over "
    "TCP, a user id on the Unix socket (default 256)",
    "audit_checkpoint_seconds": "sign an audit checkpoint this often when records are "
    "pending (default 60; 0: only every audit_checkpoint_every records and at shutdown)",
    "lease_seconds": "with [store] url: the singleton jobs' lease in the database; another "
    "node takes the jobs over this long after the holder stops renewing (default 15)",
    "shutdown_timeout": "seconds in-flight requests get to finish at shutdown (default 30)",
    "url": "where clients (the CLI, strongroom.connect) reach the service: unix:PATH or "
    "https://HOST:PORT",
    "token": "the client's API token: env:NAME or file:PATH",
    "ca": "PEM CA the client trusts for https (default: the system's)",
    "client_cert": "PEM client certificate for mutual TLS",
    "client_key": "PEM key of client_cert",
}
SSH_AGENT_KEYS = {
    "keys": "glob patterns over key names: the keys `strongroom ssh-agent` offers",
    "allow_add": "let clients add keys (ssh-add): they are imported into the keystore "
    "(default false: adding is refused)",
    "add_backend": "the backend keys added through the agent are imported into (default: "
    "the keystore's order)",
    "socket": "the agent's socket path (default: a new private directory in "
    "$XDG_RUNTIME_DIR or the temp dir)",
    "confirm": "glob patterns over key names: each signature with such a key is confirmed "
    "through $SSH_ASKPASS first",
    "policy": 'per-key policy: [ssh_agent.policy."PATTERN"] tables of confirm, allowed_hosts '
    "and allowed_uids",
    "known_hosts": "the known_hosts files host names in allowed_hosts are looked up in "
    "(default: ssh's, ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)",
}
SSH_AGENT_POLICY_KEYS = {
    "confirm": "confirm each signature through $SSH_ASKPASS (true or false)",
    "allowed_hosts": "the hosts the keys may log in to (then they sign SSH logins only): host "
    "names as known_hosts has them, SHA256:... fingerprints or OpenSSH public key lines",
    "allowed_uids": "the peer uids that may use the keys (default: the agent's own and root)",
}
PKCS11_SERVER_KEYS = {
    "keys": "glob patterns over key names: the keys of the one token `strongroom "
    "pkcs11-server` offers (with `label`)",
    "label": 'that token\'s label (default "strongroom")',
    "tokens": "more tokens: a table of token label = [key name patterns], one slot each",
    "pin": "the PIN C_Login checks: env:NAME or file:PATH (required)",
    "socket": "the server's socket path (default: a new private directory in "
    "$XDG_RUNTIME_DIR or the temp dir)",
    "backend": "the backend C_GenerateKey and C_GenerateKeyPair put keys in (default: the "
    "keystore's order)",
    "allow_destroy": "let C_DestroyObject delete a key, after [keystore] deletion_wait "
    "(default false: CKR_ACTION_PROHIBITED)",
}
KMIP_KEYS = {
    "backend": "the backend KMIP Create and Register put keys in (default: the keystore's order)",
    "max_connections": "KMIP connections served at once (default 256)",
    "idle_timeout": "seconds a KMIP connection may stay silent before it is closed (default 120)",
}
STORE_KEYS = {
    "url": 'the shared PostgreSQL store, "postgresql://USER@HOST:PORT/DB" or a libpq '
    "connection string (default: SQLite in data_dir); no password in it: use ~/.pgpass, "
    "$PGPASSFILE or a client certificate",
}
RESERVED_NAMESPACE_PREFIX = "_"
"""Namespaces starting with `_` are Strongroom's own (`_audit` holds the checkpoint key)."""

DEFAULT_VAULT: dict[str, Any] = {
    "type": VAULT_TYPE,
    "unlock": ["passphrase"],
    "passphrase": ["env:STRONGROOM_PASSPHRASE", "prompt"],
}


@dataclass
class BackendConfig:
    """One `[backends.NAME]` table."""

    name: str
    type: str
    settings: dict[str, Any]
    optional: bool = False
    """`optional = true`: when it is unavailable, `generate` and `import` without a named
    backend skip it (with a warning and an audit record) instead of failing."""


@dataclass
class ServerConfig:
    """The `[server]` table: where `strongroom serve` listens and how clients reach it."""

    socket: Path | None = None
    socket_mode: int = 0o600
    socket_group: str | None = None
    listen: tuple[str, int] | None = None
    kmip_listen: tuple[str, int] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    client_cert_required: bool = False
    max_request_bytes: int = 1 << 20
    rate_limit: float = 1_000.0
    rate_burst: int = 2_000
    shutdown_timeout: float = 30.0
    audit_checkpoint_seconds: float = 60.0
    lease_seconds: float = 15.0
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_connections: int | None = None
    max_connections_per_peer: int = 256
    url: str | None = None
    token: str | None = None
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass
class KmipConfig:
    """The `[kmip]` table: what `strongroom serve --kmip` does with keys and connections."""

    backend: str | None = None
    max_connections: int = 256
    idle_timeout: float = 120.0


@dataclass
class SshAgentConfig:
    """The `[ssh_agent]` table: what `strongroom ssh-agent` offers and allows."""

    keys: list[str] = field(default_factory=list)
    confirm: list[str] = field(default_factory=list)
    allow_add: bool = False
    add_backend: str | None = None
    socket: Path | None = None
    policies: list[SshAgentPolicy] = field(default_factory=list)
    known_hosts: list[str] | None = None
    """Where host names in `allowed_hosts` are looked up; None: ssh's default files."""


@dataclass(frozen=True)
class SshAgentPolicy:
    """One `[ssh_agent.policy."PATTERN"]` table: what the keys matching `pattern` need."""

    pattern: str
    confirm: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    allowed_uids: tuple[int, ...] | None = None


@dataclass
class Pkcs11ServerConfig:
    """The `[pkcs11_server]` table: the tokens `strongroom pkcs11-server` offers."""

    tokens: dict[str, list[str]] = field(default_factory=dict)
    """Token label → key name patterns, one slot each, in this order."""
    pin: str | None = None
    """A secret reference (env:NAME or file:PATH), never the PIN itself."""
    socket: Path | None = None
    backend: str | None = None
    """Where C_GenerateKey/C_GenerateKeyPair make keys; None: the keystore's order."""
    allow_destroy: bool = False
    """Whether C_DestroyObject deletes keys (after deletion_wait); False: refused."""


@dataclass
class Config:
    """The parsed configuration, with enough of the source kept to name lines in errors."""

    path: str | None
    order: list[str]
    data_dir: Path
    namespace: str
    audit: str
    backends: dict[str, BackendConfig]
    text: str = field(default="", repr=False)
    core_dumps: bool = False
    audit_signing_key: str = "checkpoints"
    audit_signing_backend: str | None = None
    audit_checkpoint_every: int = 1000

    deletion_wait: timedelta = timedelta(0)
    store_url: str | None = None
    """`[store] url`: the PostgreSQL store (docs/cluster.md); None is SQLite in data_dir."""
    server: ServerConfig = field(default_factory=ServerConfig)
    ssh_agent: SshAgentConfig = field(default_factory=SshAgentConfig)
    pkcs11_server: Pkcs11ServerConfig = field(default_factory=Pkcs11ServerConfig)
    kmip: KmipConfig = field(default_factory=KmipConfig)

    def error(self, message: str, table: str | None = None, key: str | None = None) -> ConfigError:
        """A ConfigError naming this file, and the line of `table.key` when it can be found."""
        line = find_line(self.text, table, key) if self.text else None
        dotted = ".".join(p for p in (table, key) if p) or None
        return ConfigError(message, self.path or "<embedded default config>", line, dotted)


def parse_listen(value: object) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) → (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:([0-9]{1,5})", value) if isinstance(value, str) else None
    if m is None or not 0 <= int(m.group(2)) <= 65535:
        raise InvalidArgument('a listen address is "HOST:PORT", e.g. "127.0.0.1:8443"')
    return m.group(1), int(m.group(2))


def check_namespace(value: object) -> str:
    """A tenant's namespace: 1-64 letters, digits, '.', '_' or '-', not starting with '_'."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise InvalidArgument("a namespace is 1-64 letters, digits, '.', '_' or '-'")
    if value.startswith(RESERVED_NAMESPACE_PREFIX):
        raise InvalidArgument("namespaces starting with '_' are reserved")
    return value


def find_line(text: str, table: str | None, key: str | None) -> int | None:
    """The 1-based line that sets `table.key`; else the first line inside it (for an unknown
    table `[a.b]` names `a`); else the `[table]` header line."""
    target = ".".join(p for p in (table, key) if p)
    if not target:
        return None
    current = ""
    inside = header = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        m = re.match(r"^\[\[?\s*([^\[\]]+?)\s*\]\]?", stripped)
        if m:
            current = path = _dotted(m.group(1))
        else:
            a = re.match(r"^([A-Za-z0-9_\-\"'. ]+?)\s*=", stripped)
            if not a:
                continue
            path = ".".join(p for p in (current, _dotted(a.group(1))) if p)
        if path == target:
            return number
        if inside is None and path.startswith(target + "."):
            inside = number
        if header is None and m and table and path == table:
            header = number
    return inside if inside is not None else header


def _dotted(name: str) -> str:
    return name.replace('"', "").replace("'", "").replace(" ", "")
