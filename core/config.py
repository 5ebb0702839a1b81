"""Configuration: `$STRONGROOM_CONFIG`, else `strongroom.toml` in the user config dir.

With no file at all the embedded default applies: one software vault in the user
data dir. Every error names the file, the line and the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import platformdirs

from .errors import ConfigError, InvalidArgument
from .lifecycle import parse_duration
from .secrets import validate_reference

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


def default_path() -> Path:
    """Where the config file is looked for when $STRONGROOM_CONFIG is not set."""
    return Path(platformdirs.user_config_dir(APP)) / "strongroom.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from `path`, $STRONGROOM_CONFIG, the user config dir, or the default."""
    if path is None:
        env = os.environ.get("STRONGROOM_CONFIG")
        if env:
            path = env
        elif default_path().is_file():
            path = default_path()
    if path is None:
        return parse({}, None, "")
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file not found", str(p)) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", str(p)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition; name the line so a Latin-1 editor's save is easy to find
        raise ConfigError(
            f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); TOML files are UTF-8",
            str(p),
            data.count(b"\n", 0, e.start) + 1,
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = _toml_error_line(str(e))
        raise ConfigError(f"not valid TOML: {e}", str(p), line) from None
    except RecursionError:  # tomllib recurses on nested arrays and inline tables
        raise ConfigError("not valid TOML: arrays or tables nested too deeply", str(p)) from None
    return parse(raw, str(p), text)


def parse(raw: Mapping[str, Any], path: str | None, text: str) -> Config:
    """Validate a decoded TOML document into a Config."""
    cfg = Config(path, [], default_data_dir(), "default", "file", {}, text)
    for top in raw:
        if top not in (
            "keystore",
            "store",
            "backends",
            "server",
            "ssh_agent",
            "pkcs11_server",
            "kmip",
        ):
            what = "table" if isinstance(raw[top], dict) else "key"
            raise cfg.error(
                f"unknown {what}; expected [keystore], [store], [server], [ssh_agent], "
                "[pkcs11_server], [kmip] or [backends.NAME]",
                top,
            )
    _parse_store(cfg, raw.get("store", {}))
    _parse_server(cfg, raw.get("server", {}))
    _parse_ssh_agent(cfg, raw.get("ssh_agent", {}))
    _parse_pkcs11_server(cfg, raw.get("pkcs11_server", {}))
    _parse_kmip(cfg, raw.get("kmip", {}))
    ks = raw.get("keystore", {})
    if not isinstance(ks, dict):
        raise cfg.error("must be a table", "keystore")
    for key, value in ks.items():
        if key not in KEYSTORE_KEYS:
            raise cfg.error(
                f"unknown key; expected one of {', '.join(KEYSTORE_KEYS)}", "keystore", key
            )
        if key == "order":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise cfg.error("must be a list of backend names", "keystore", key)
            cfg.order = list(value)
        elif key == "data_dir":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be a path", "keystore", key)
            cfg.data_dir = Path(value).expanduser()
        elif key == "namespace":
            try:
                cfg.namespace = check_namespace(value)
            except InvalidArgument as e:
                raise cfg.error(str(e), "keystore", key) from None
        elif key == "audit":
            if value not in AUDIT_MODES:
                raise cfg.error(f"must be one of {', '.join(AUDIT_MODES)}", "keystore", key)
            cfg.audit = value
        elif key == "core_dumps":
            if not isinstance(value, bool):
                raise cfg.error("must be true or false", "keystore", key)
            cfg.core_dumps = value
        elif key == "audit_signing_key":
            if not isinstance(value, str) or not re.fullmatch(
                r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value
            ):
                raise cfg.error(
                    "must be a key name (letters, digits, '.', '_', '-')", "keystore", key
                )
            cfg.audit_signing_key = value
        elif key == "audit_signing_backend":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be the name of a configured backend", "keystore", key)
            cfg.audit_signing_backend = value
        elif key == "audit_checkpoint_every":
            if type(value) is not int or not 0 <= value <= 10_000_000:
                raise cfg.error("must be an integer from 0 to 10000000", "keystore", key)
            cfg.audit_checkpoint_every = value

        elif key == "deletion_wait":
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise cfg.error("must be a waiting period such as 7d, 12h or 0", "keystore", key)
            try:
                cfg.deletion_wait = parse_duration(value)
            except InvalidArgument as e:
                raise cfg.error(str(e), "keystore", key) from None
    backends = raw.get("backends", {})
    if not isinstance(backends, dict):
        raise cfg.error("must be a table of [backends.NAME] tables", "backends")
    for name, table in backends.items():
        where = f"backends.{name}"
        if not isinstance(table, dict):
            raise cfg.error("must be a table", where)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
            raise cfg.error("backend names are 1-32 letters, digits, '_' or '-'", where)
        btype = table.get("type")
        if not isinstance(btype, str):
            raise cfg.error('every backend needs a type, e.g. type = "vault"', where, "type")
        optional = table.get("optional", False)
        if not isinstance(optional, bool):
            raise cfg.error("must be true or false", where, "optional")
        if optional and btype == VAULT_TYPE:
            raise cfg.error(
                "the vault is the last resort and cannot be optional", where, "optional"
            )
        settings = {k: v for k, v in table.items() if k not in ("type", "optional")}
        cfg.backends[name] = BackendConfig(name, btype, settings, optional)
    vaults = [b.name for b in cfg.backends.values() if b.type == VAULT_TYPE]
    if not vaults:
        cfg.backends[VAULT_TYPE] = BackendConfig(
            VAULT_TYPE, VAULT_TYPE, {k: v for k, v in DEFAULT_VAULT.items() if k != "type"}
        )
        vaults = [VAULT_TYPE]
    if len(vaults) > 1:
        raise cfg.error("only one vault backend may be configured", f"backends.{vaults[1]}")
    vault_settings = cfg.backends[vaults[0]].settings
    if cfg.store_url is not None and "rollback_counter" in vault_settings:
        # Each node's TPM would count its own commits while the manifest, shared, records
        # whichever node wrote last: the nodes would report each other as rollbacks.
        raise cfg.error(
            "a TPM rollback counter belongs to one machine and cannot guard a store that "
            "several nodes share ([store] url); see docs/cluster.md",
            f"backends.{vaults[0]}",
            "rollback_counter",
        )
    named: list[tuple[str | None, str, str]] = [(name, "keystore", "order") for name in cfg.order]
    named += [
        (cfg.pkcs11_server.backend, "pkcs11_server", "backend"),
        (cfg.kmip.backend, "kmip", "backend"),
        (cfg.ssh_agent.add_backend, "ssh_agent", "add_backend"),
        (cfg.audit_signing_backend, "keystore", "audit_signing_backend"),
    ]
    for backend, table, key in named:
        if backend is not None and backend not in cfg.backends:
            raise cfg.error(
                f"names backend {backend!r}, which has no [backends.{backend}] table", table, key
            )
    if len(set(cfg.order)) != len(cfg.order):
        raise cfg.error("names a backend twice", "keystore", "order")
    vault = vaults[0]
    if vault in cfg.order and cfg.order[-1] != vault:
        raise cfg.error("the vault is the fallback and must come last", "keystore", "order")
    if vault not in cfg.order:
        cfg.order.append(vault)
    return cfg


def _parse_store(cfg: Config, table: Any) -> None:
    """Validate the `[store]` table into cfg.store_url."""
    if not isinstance(table, dict):
        raise cfg.error("must be a table", "store")
    for key, value in table.items():
        if key not in STORE_KEYS:
            raise cfg.error(f"unknown key; expected one of {', '.join(STORE_KEYS)}", "store", key)
        if not isinstance(value, str) or not value.strip():
            raise cfg.error("must be a PostgreSQL URL", "store", key)
        cfg.store_url = check_store_url(value, cfg.error)


def check_store_url(value: str, error: Any) -> str:
    """A `postgresql://` (or `postgres://`) URL or a `key=value` libpq connection string,
    without a password: config files are read by more eyes than secrets should be, and
    libpq reads the password from ~/.pgpass or $PGPASSFILE. Neither the value nor its
    password appears in the message."""
    url = value.strip()
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme not in ("postgresql", "postgres"):
            raise error(
                "must be a PostgreSQL URL (postgresql://...) or a libpq connection string",
                "store",
                "url",
            )
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        has_password = ":" in userinfo or re.search(r"[?&]password=", rest) is not None
    elif "=" in url:
        has_password = re.search(r"(^|\s)password\s*=", url) is not None
    else:
        raise error(
            "must be a PostgreSQL URL (postgresql://...) or a libpq connection string",
            "store",
            "url",
        )
    if has_password:
        raise error(
            "holds a password; put it in ~/.pgpass or $PGPASSFILE (libpq reads it there), "
            "or use a client certificate",
            "store",
            "url",
        )
    return url


def _parse_server(cfg: Config, table: Any) -> None:
    """Validate the `[server]` table into cfg.server."""
    if not isinstance(table, dict):
        raise cfg.error("must be a table", "server")
    out = cfg.server

    def path(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise cfg.error("must be a path", "server", key)
        return Path(value).expanduser()

    def number(key: str, value: Any, lo: float, hi: float, integer: bool = True) -> Any:
        ok = type(value) is int or (not integer and type(value) is float)
        if not ok or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            raise cfg.error(f"must be {kind} from {lo:g} to {hi:g}", "server", key)
        return value

    for key, value in table.items():
        if key not in SERVER_KEYS:
            raise cfg.error(f"unknown key; expected one of {', '.join(SERVER_KEYS)}", "server", key)
        if key in (
            "socket",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "ca",
            "client_cert",
            "client_key",
        ):
            setattr(out, key, path(key, value))
        elif key == "socket_mode":
            if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
                raise cfg.error('must be an octal mode string such as "0600"', "server", key)
            mode = int(value, 8)
            if mode & 0o007:
                raise cfg.error("must not let other users connect (no o+rwx)", "server", key)
            out.socket_mode = mode
        elif key == "socket_group":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be a group name", "server", key)
            out.socket_group = value
        elif key in ("listen", "kmip_listen"):
            try:
                setattr(out, key, parse_listen(value))
            except InvalidArgument as e:
                raise cfg.error(str(e), "server", key) from None
        elif key == "client_cert_required":
            if not isinstance(value, bool):
                raise cfg.error("must be true or false", "server", key)
            out.client_cert_required = value
        elif key == "max_request_bytes":
            out.max_request_bytes = number(key, value, 1024, 1 << 30)
        elif key == "rate_limit":
            out.rate_limit = float(number(key, value, 0, 1e7, integer=False))
        elif key == "rate_burst":
            out.rate_burst = number(key, value, 1, 10_000_000)
        elif key == "shutdown_timeout":
            out.shutdown_timeout = float(number(key, value, 0, 3600, integer=False))
        elif key == "head_timeout":
            out.head_timeout = float(number(key, value, 0.1, 600, integer=False))
        elif key == "body_timeout":
            out.body_timeout = float(number(key, value, 0.1, 3600, integer=False))
        elif key == "keepalive_timeout":
            out.keepalive_timeout = float(number(key, value, 0.1, 3600, integer=False))
        elif key == "max_connections":
            out.max_connections = number(key, value, 1, 10_000_000)
        elif key == "max_connections_per_peer":
            out.max_connections_per_peer = number(key, value, 1, 10_000_000)
        elif key == "audit_checkpoint_seconds":
            out.audit_checkpoint_seconds = float(number(key, value, 0, 86400, integer=False))
        elif key == "lease_seconds":
            out.lease_seconds = float(number(key, value, 1, 3600, integer=False))
        elif key == "url":
            if not isinstance(value, str) or not (
                value.startswith("unix:") or value.startswith("https://")
            ):
                raise cfg.error("must be unix:PATH or https://HOST:PORT", "server", key)
            out.url = value
        elif key == "token":
            if not isinstance(value, str) or not (
                value.startswith("env:") or value.startswith("file:")
            ):
                raise cfg.error(
                    "an API token is given as env:NAME or file:PATH, never inline", "server", key
                )
            out.token = value
    if out.client_cert_required and out.tls_client_ca is None:
        raise cfg.error("needs tls_client_ca", "server", "client_cert_required")
    if (out.tls_cert is None) != (out.tls_key is None):
        raise cfg.error("tls_cert and tls_key go together", "server", "tls_cert")
    if out.listen is not None and out.tls_cert is None:
        raise cfg.error("TCP is served only with TLS: set tls_cert and tls_key", "server", "listen")
    if out.kmip_listen is not None and (out.tls_cert is None or out.tls_client_ca is None):
        raise cfg.error(
            "KMIP is served only with mutual TLS: set tls_cert, tls_key and tls_client_ca",
            "server",
            "kmip_listen",
        )


def _parse_ssh_agent(cfg: Config, table: Any) -> None:
    """Validate the `[ssh_agent]` table into cfg.ssh_agent."""
    if not isinstance(table, dict):
        raise cfg.error("must be a table", "ssh_agent")
    out = cfg.ssh_agent
    for key, value in table.items():
        if key not in SSH_AGENT_KEYS:
            raise cfg.error(
                f"unknown key; expected one of {', '.join(SSH_AGENT_KEYS)}", "ssh_agent", key
            )
        if key in ("keys", "confirm"):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise cfg.error(
                    'must be a list of key name patterns, e.g. ["ssh-*"]', "ssh_agent", key
                )
            setattr(out, key, list(value))
        elif key == "allow_add":
            if not isinstance(value, bool):
                raise cfg.error("must be true or false", "ssh_agent", key)
            out.allow_add = value
        elif key == "add_backend":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be the name of a configured backend", "ssh_agent", key)
            out.add_backend = value
        elif key == "socket":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be a path", "ssh_agent", key)
            out.socket = Path(value).expanduser()
        elif key == "known_hosts":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise cfg.error(
                    'must be a list of paths, e.g. ["~/.ssh/known_hosts"]', "ssh_agent", key
                )
            out.known_hosts = list(value)
        elif key == "policy":
            if not isinstance(value, dict):
                raise cfg.error(
                    'must be tables named by key pattern, e.g. [ssh_agent.policy."ssh-*"]',
                    "ssh_agent",
                    key,
                )
            out.policies = [_parse_agent_policy(cfg, p, t) for p, t in value.items()]


_HOST_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_HOST_KEY_LINE = re.compile(r"([a-z0-9@.-]+) ([A-Za-z0-9+/]+={0,2})(?: .*)?")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.:%-]+|\[[A-Za-z0-9_.:%-]+\]:[0-9]{1,5}")


def _host_entry_ok(entry: object) -> bool:
    """A host name (`name` or `[name]:port`, looked up in known_hosts when the agent
    starts), a SHA256 fingerprint, or `TYPE BASE64 [comment]` whose blob names TYPE (the
    agent checks the key itself when it starts)."""
    if not isinstance(entry, str):
        return False
    entry = entry.strip()
    if _HOST_FINGERPRINT.fullmatch(entry):
        return True
    if not entry.startswith("SHA256:") and _HOST_NAME.fullmatch(entry):
        return True
    m = _HOST_KEY_LINE.fullmatch(entry)
    if m is None:
        return False
    try:
        blob = base64.b64decode(m.group(2), validate=True)
    except binascii.Error:
        return False
    name = m.group(1).encode()
    return blob[:4] == len(name).to_bytes(4, "big") and blob[4 : 4 + len(name)] == name


def _parse_agent_policy(cfg: Config, pattern: str, table: Any) -> SshAgentPolicy:
    where = f"ssh_agent.policy.{pattern}"
    if not pattern or not isinstance(table, dict):
        raise cfg.error("must be a table named by a non-empty key name pattern", where)
    confirm = False
    hosts: tuple[str, ...] | None = None
    uids: tuple[int, ...] | None = None
    for key, value in table.items():
        if key not in SSH_AGENT_POLICY_KEYS:
            expected = ", ".join(SSH_AGENT_POLICY_KEYS)
            raise cfg.error(f"unknown key; expected one of {expected}", where, key)
        if key == "confirm":
            if not isinstance(value, bool):
                raise cfg.error("must be true or false", where, key)
            confirm = value
        elif key == "allowed_hosts":
            if not isinstance(value, list) or not all(_host_entry_ok(v) for v in value):
                raise cfg.error(
                    "must be a list of hosts: host names as known_hosts has them "
                    '("bastion.example.com", "[10.0.0.5]:2222"), SHA256:... fingerprints '
                    '(ssh-keygen -l) or public key lines ("ssh-ed25519 AAAA...")',
                    where,
                    key,
                )
            hosts = tuple(v.strip() for v in value)
        elif key == "allowed_uids":
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value
            ):
                raise cfg.error("must be a list of user ids, e.g. [1000]", where, key)
            uids = tuple(value)
    return SshAgentPolicy(pattern, confirm, hosts, uids)


def _parse_pkcs11_server(cfg: Config, table: Any) -> None:
    """Validate the `[pkcs11_server]` table into cfg.pkcs11_server."""
    if not isinstance(table, dict):
        raise cfg.error("must be a table", "pkcs11_server")
    out = cfg.pkcs11_server
    for key in table:
        if key not in PKCS11_SERVER_KEYS:
            raise cfg.error(
                f"unknown key; expected one of {', '.join(PKCS11_SERVER_KEYS)}",
                "pkcs11_server",
                key,
            )

    def patterns(value: Any, key: str) -> list[str]:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise cfg.error(
                'must be a list of key name patterns, e.g. ["web-*"]', "pkcs11_server", key
            )
        return list(value)

    def label_ok(label: Any, key: str) -> str:
        if not isinstance(label, str) or not 0 < len(label.encode()) <= 32:
            raise cfg.error("a token label is 1 to 32 bytes of UTF-8", "pkcs11_server", key)
        return label

    if "keys" in table:
        out.tokens[label_ok(table.get("label", "strongroom"), "label")] = patterns(
            table["keys"], "keys"
        )
    elif "label" in table:
        raise cfg.error("names the token of `keys`, which is not set", "pkcs11_server", "label")
    tokens = table.get("tokens", {})
    if not isinstance(tokens, dict):
        raise cfg.error("must be a table of label = [patterns]", "pkcs11_server", "tokens")
    for label, value in tokens.items():
        if label in out.tokens:
            raise cfg.error(f"names token {label!r} twice", "pkcs11_server", "tokens")
        out.tokens[label_ok(label, "tokens")] = patterns(value, "tokens")
    if "pin" in table:
        pin = table["pin"]
        try:
            if not isinstance(pin, str):
                raise ValueError("not a string")
            validate_reference(pin)
            if pin == "prompt":
                raise ValueError("prompt")
        except ValueError:
            raise cfg.error(
                "must be env:NAME or file:PATH (the server runs without a terminal)",
                "pkcs11_server",
                "pin",
            ) from None
        out.pin = pin
    if "backend" in table:
        if not isinstance(table["backend"], str) or not table["backend"]:
            raise cfg.error("must be the name of a configured backend", "pkcs11_server", "backend")
        out.backend = table["backend"]
    if "allow_destroy" in table:
        if not isinstance(table["allow_destroy"], bool):
            raise cfg.error("must be true or false", "pkcs11_server", "allow_destroy")
        out.allow_destroy = table["allow_destroy"]
    if "socket" in table:
        if not isinstance(table["socket"], str) or not table["socket"]:
            raise cfg.error("must be a path", "pkcs11_server", "socket")
        out.socket = Path(table["socket"]).expanduser()


def _parse_kmip(cfg: Config, table: Any) -> None:
    """Validate the `[kmip]` table into cfg.kmip."""
    if not isinstance(table, dict):
        raise cfg.error("must be a table", "kmip")
    out = cfg.kmip
    for key, value in table.items():
        if key not in KMIP_KEYS:
            raise cfg.error(f"unknown key; expected one of {', '.join(KMIP_KEYS)}", "kmip", key)
        if key == "backend":
            if not isinstance(value, str) or not value:
                raise cfg.error("must be the name of a configured backend", "kmip", key)
            out.backend = value
        elif key == "max_connections":
            if type(value) is not int or not 1 <= value <= 100_000:
                raise cfg.error("must be an integer from 1 to 100000", "kmip", key)
            out.max_connections = value
        elif key == "idle_timeout":
            if type(value) not in (int, float) or not 0.1 <= value <= 86400:
                raise cfg.error("must be a number from 0.1 to 86400", "kmip", key)
            out.idle_timeout = float(value)


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


def _toml_error_line(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None
