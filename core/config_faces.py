"""The faces' tables of the configuration: `[server]`, `[ssh_agent]` (with its
`[ssh_agent.policy."PATTERN"]` tables), `[pkcs11_server]` and `[kmip]`, each validated into
its dataclass on a `Config`.

Moved verbatim out of config.py (docs/decisions.md, "Modules split along their banners");
`strongroom.config.parse` calls them.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any

from .config_schema import (
    KMIP_KEYS,
    PKCS11_SERVER_KEYS,
    SERVER_KEYS,
    SSH_AGENT_KEYS,
    SSH_AGENT_POLICY_KEYS,
    Config,
    SshAgentPolicy,
    parse_listen,
)
from .errors import InvalidArgument
from .secrets import validate_reference


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
