"""Configuration: `$STRONGROOM_CONFIG`, else `strongroom.toml` in the user config dir.

With no file at all the embedded default applies: one software vault in the user
data dir. Every error names the file, the line and the key.

The tables' keys and dataclasses are in config_schema.py and the faces' tables
(`[server]`, `[ssh_agent]`, `[pkcs11_server]`, `[kmip]`) are parsed in config_faces.py;
every name is still importable from here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from .config_faces import _parse_kmip, _parse_pkcs11_server, _parse_server, _parse_ssh_agent
from .config_schema import (
    APP,
    AUDIT_MODES,
    DEFAULT_VAULT,
    KEYSTORE_KEYS,
    KMIP_KEYS,
    PKCS11_SERVER_KEYS,
    RESERVED_NAMESPACE_PREFIX,
    SERVER_KEYS,
    SSH_AGENT_KEYS,
    SSH_AGENT_POLICY_KEYS,
    STORE_KEYS,
    VAULT_TYPE,
    BackendConfig,
    Config,
    KmipConfig,
    Pkcs11ServerConfig,
    ServerConfig,
    SshAgentConfig,
    SshAgentPolicy,
    check_namespace,
    find_line,
    parse_listen,
)
from .errors import ConfigError, InvalidArgument
from .lifecycle import parse_duration


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


def _toml_error_line(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None


__all__ = [
    "APP",
    "AUDIT_MODES",
    "BackendConfig",
    "Config",
    "DEFAULT_VAULT",
    "KEYSTORE_KEYS",
    "KMIP_KEYS",
    "KmipConfig",
    "PKCS11_SERVER_KEYS",
    "Pkcs11ServerConfig",
    "RESERVED_NAMESPACE_PREFIX",
    "SERVER_KEYS",
    "SSH_AGENT_KEYS",
    "SSH_AGENT_POLICY_KEYS",
    "STORE_KEYS",
    "ServerConfig",
    "SshAgentConfig",
    "SshAgentPolicy",
    "VAULT_TYPE",
    "check_namespace",
    "check_store_url",
    "default_data_dir",
    "default_path",
    "find_line",
    "load",
    "parse",
    "parse_listen",
]
