"""Tenants, identities and policies of the key custody service (`strongroom serve`).

A tenant is a namespace of keys. An identity belongs to one tenant (or is a service
admin, in none) and proves itself with an API token or a client certificate. Policies
say which identity may do which operation on which key names; nothing is allowed
unless a policy allows it.

Tokens are `srt_<id>_<secret>`: the id finds the row, and only SHA-256(secret) is
stored (the secret is 32 random bytes, so a slow hash would add nothing). A token is
shown once, when it is issued. A client certificate is pinned by the SHA-256 of its DER.

The store is SQLite (`tenants.sqlite` in the data dir), with a schema version, like the
catalog. See docs/server.md.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    AuthenticationFailed,
    InvalidArgument,
    KeyExists,
)
from ..errors import NotPermitted as NotPermitted  # in errors.py; importable here as before
from ..errors import TenantNotFound as TenantNotFound
from .wire import Permission as Permission  # defined with the wire format

SCHEMA_VERSION = 1
TOKEN_PREFIX = "srt_"  # noqa: S105 - a prefix, not a secret
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")


# Permission is the wire format's (core/service/wire.py), so a client needs no tenant store.


KEY_PERMISSIONS = frozenset(Permission) - {Permission.ADMIN, Permission.RANDOM}
_NOT_IN_ALL = frozenset({Permission.ADOPT})


def parse_permissions(value: str | Iterable[str]) -> frozenset[Permission]:
    """`sign,verify` or a list of names → permissions; `all` means every key permission
    but `adopt`, which is granted only by name."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: set[Permission] = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item == "all":
            out |= (KEY_PERMISSIONS - _NOT_IN_ALL) | {Permission.RANDOM}
            continue
        try:
            out.add(Permission(item))
        except ValueError:
            known = ", ".join(p.value for p in Permission)
            raise InvalidArgument(f"unknown permission {item!r}; known: {known}, all") from None
    if not out:
        raise InvalidArgument("no permission was given")
    return frozenset(out)


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{kind} names are 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return name


def check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not _PATTERN.fullmatch(pattern):
        raise InvalidArgument(
            "a key pattern is a name with shell wildcards (*, ?, [..]), 1-128 characters"
        )
    return pattern


@dataclass(frozen=True)
class Identity:
    """Who a request comes from. `tenant` is None for a service admin."""

    id: str
    tenant: str | None
    name: str
    admin: bool

    @property
    def principal(self) -> str:
        """The actor written into the audit log."""
        return f"admin:{self.name}" if self.tenant is None else f"{self.tenant}:{self.name}"


@dataclass(frozen=True)
class Policy:
    tenant: str
    identity: str  # an identity name in the tenant, or "*"
    keys: str  # a shell pattern over key names
    permissions: frozenset[Permission]

    def to_dict(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "identity": self.identity,
            "keys": self.keys,
            "permissions": sorted(p.value for p in self.permissions),
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    name TEXT NOT NULL,
    admin INTEGER NOT NULL,
    token_hash TEXT,
    cert_sha256 TEXT UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS policies (
    tenant TEXT NOT NULL,
    identity TEXT NOT NULL,
    keys TEXT NOT NULL,
    permissions TEXT NOT NULL,
    PRIMARY KEY (tenant, identity, keys)
);
"""


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def cert_fingerprint(der: bytes) -> str:
    """The pin of a client certificate: SHA-256 of its DER, hex."""
    return hashlib.sha256(der).hexdigest()


class TenantStore:
    """The tenants database. Thread-safe; lookups of tokens are cached until a change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise InvalidArgument(
                    f"{path} has tenants schema {row[0]}; this Strongroom reads up to "
                    f"{SCHEMA_VERSION}: upgrade Strongroom"
                )
        except BaseException:
            self._db.close()
            raise
        self._stamp: tuple[int, int] = (-1, -1)
        self._policies: dict[tuple[str, str], list[Policy]] = {}
        self._tokens: dict[str, tuple[Identity, str] | None] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- cache ---------------------------------------------------------------------------------
    def _fresh(self) -> None:
        """Drop cached lookups when another process (the CLI) changed the store."""
        stamp = self._db.execute("PRAGMA data_version").fetchone()[0]
        total = self._db.total_changes
        if (stamp, total) != self._stamp:
            self._stamp = (stamp, total)
            self._policies.clear()
            self._tokens.clear()

    # -- tenants -------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> None:
        check_name("tenant", name)
        if name.startswith("_") or name == "default":
            raise InvalidArgument(f"the namespace {name!r} is reserved")
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?)", (name, time.time()))
            except sqlite3.IntegrityError:
                raise KeyExists(name, "tenants") from None

    def tenants(self) -> list[dict[str, object]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT t.name, t.created, "
                "(SELECT COUNT(*) FROM identities i WHERE i.tenant=t.name AND revoked IS NULL) "
                "FROM tenants t ORDER BY t.name"
            ).fetchall()
        return [{"name": n, "created": c, "identities": k} for n, c, k in rows]

    def tenant_exists(self, name: str) -> bool:
        with self._lock:
            return bool(self._db.execute("SELECT 1 FROM tenants WHERE name=?", (name,)).fetchone())

    # -- identities ----------------------------------------------------------------------------
    def issue_token(self, tenant: str | None, name: str, *, admin: bool = False) -> str:
        """Make an identity with a new API token; return the token (shown once)."""
        ident_id = self._new_identity(tenant, name, admin, cert=None)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        with self._lock:
            self._db.execute(
                "UPDATE identities SET token_hash=? WHERE id=?", (_hash_secret(secret), ident_id)
            )
        return f"{TOKEN_PREFIX}{ident_id}_{secret}"

    def add_certificate(
        self, tenant: str | None, name: str, der: bytes, *, admin: bool = False
    ) -> str:
        """Make an identity proved by the client certificate `der`; return its id."""
        return self._new_identity(tenant, name, admin, cert=cert_fingerprint(der))

    def _new_identity(self, tenant: str | None, name: str, admin: bool, cert: str | None) -> str:
        check_name("identity", name)
        if tenant is None and not admin:
            raise InvalidArgument("an identity outside every tenant must be an admin")
        if tenant is not None and admin:
            raise InvalidArgument("an admin belongs to no tenant")
        ident_id = secrets.token_hex(8)
        with self._lock:
            if (
                tenant is not None
                and not self._db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone()
            ):
                raise TenantNotFound(f"no tenant named {tenant!r}")
            live = self._db.execute(
                "SELECT 1 FROM identities WHERE tenant IS ? AND name=? AND revoked IS NULL",
                (tenant, name),
            ).fetchone()
            if live:
                raise KeyExists(name, f"identities of {tenant or 'admin'}")
            try:
                self._db.execute(
                    "INSERT INTO identities VALUES (?, ?, ?, ?, NULL, ?, ?, NULL)",
                    (ident_id, tenant, name, int(admin), cert, time.time()),
                )
            except sqlite3.IntegrityError:
                raise KeyExists("that certificate", "identities") from None
        return ident_id

    def identities(self, tenant: str | None = None) -> list[dict[str, object]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, name, admin, token_hash IS NOT NULL, cert_sha256, created, "
                "revoked FROM identities WHERE (? IS NULL OR tenant=?) ORDER BY tenant, name",
                (tenant, tenant),
            ).fetchall()
        return [
            {
                "id": r[0],
                "tenant": r[1],
                "name": r[2],
                "admin": bool(r[3]),
                "kind": "token" if r[4] else "certificate",
                "certificate_sha256": r[5],
                "created": r[6],
                "revoked": r[7],
            }
            for r in rows
        ]

    def revoke(self, tenant: str | None, name: str) -> None:
        """Revoke an identity's token or certificate; its policies stay for a new one."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE identities SET revoked=?, cert_sha256=NULL "
                "WHERE tenant IS ? AND name=? AND revoked IS NULL",
                (time.time(), tenant, name),
            )
            if cur.rowcount == 0:
                raise TenantNotFound(f"no live identity {name!r} in {tenant or 'admin'}")

    def authenticate_token(self, token: str) -> Identity:
        """The identity of an API token; AuthenticationFailed for any bad token, alike."""
        bad = AuthenticationFailed("the API token is not valid")
        if not token.startswith(TOKEN_PREFIX):
            raise bad
        ident_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
        if not sep or not re.fullmatch(r"[0-9a-f]{16}", ident_id):
            raise bad
        with self._lock:
            self._fresh()
            cached = self._tokens.get(ident_id, ...)
            if cached is ...:
                row = self._db.execute(
                    "SELECT tenant, name, admin, token_hash FROM identities "
                    "WHERE id=? AND revoked IS NULL AND token_hash IS NOT NULL",
                    (ident_id,),
                ).fetchone()
                cached = (
                    None
                    if row is None
                    else (Identity(ident_id, row[0], row[1], bool(row[2])), row[3])
                )
                self._tokens[ident_id] = cached
        # compare even when there is no row, so that timing says nothing about the id
        expected = cached[1] if cached else "0" * 64
        if not hmac.compare_digest(_hash_secret(secret), expected) or cached is None:
            raise bad
        return cached[0]

    def certificate_enrolled(self, der: bytes) -> bool:
        with self._lock:
            return bool(
                self._db.execute(
                    "SELECT 1 FROM identities WHERE cert_sha256=? AND revoked IS NULL",
                    (cert_fingerprint(der),),
                ).fetchone()
            )

    def authenticate_certificate(self, der: bytes) -> Identity:
        with self._lock:
            self._fresh()
            row = self._db.execute(
                "SELECT id, tenant, name, admin FROM identities "
                "WHERE cert_sha256=? AND revoked IS NULL",
                (cert_fingerprint(der),),
            ).fetchone()
        if row is None:
            raise AuthenticationFailed("the client certificate is not enrolled")
        return Identity(row[0], row[1], row[2], bool(row[3]))

    # -- policies ------------------------------------------------------------------------------
    def grant(
        self, tenant: str, identity: str, keys: str, permissions: Iterable[Permission]
    ) -> Policy:
        """Add permissions for `identity` (or "*") on key names matching `keys`."""
        if identity != "*":
            check_name("identity", identity)
        check_pattern(keys)
        perms = frozenset(permissions)
        if Permission.ADMIN in perms:
            raise InvalidArgument("admin is a role given to an identity, not a key permission")
        with self._lock:
            if not self._db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone():
                raise TenantNotFound(f"no tenant named {tenant!r}")
            row = self._db.execute(
                "SELECT permissions FROM policies WHERE tenant=? AND identity=? AND keys=?",
                (tenant, identity, keys),
            ).fetchone()
            if row:
                perms |= frozenset(Permission(p) for p in row[0].split(","))
            self._db.execute(
                "INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)",
                (tenant, identity, keys, ",".join(sorted(p.value for p in perms))),
            )
        return Policy(tenant, identity, keys, perms)

    def revoke_policy(
        self, tenant: str, identity: str, keys: str, permissions: Iterable[Permission] | None
    ) -> None:
        """Take permissions back (all of them when `permissions` is None)."""
        with self._lock:
            row = self._db.execute(
                "SELECT permissions FROM policies WHERE tenant=? AND identity=? AND keys=?",
                (tenant, identity, keys),
            ).fetchone()
            if row is None:
                raise TenantNotFound(f"no policy for {identity!r} on {keys!r} in {tenant!r}")
            left = (
                frozenset()
                if permissions is None
                else frozenset(Permission(p) for p in row[0].split(",")) - set(permissions)
            )
            if left:
                self._db.execute(
                    "UPDATE policies SET permissions=? WHERE tenant=? AND identity=? AND keys=?",
                    (",".join(sorted(p.value for p in left)), tenant, identity, keys),
                )
            else:
                self._db.execute(
                    "DELETE FROM policies WHERE tenant=? AND identity=? AND keys=?",
                    (tenant, identity, keys),
                )

    def policies(self, tenant: str | None = None) -> list[Policy]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, identity, keys, permissions FROM policies "
                "WHERE (? IS NULL OR tenant=?) ORDER BY tenant, identity, keys",
                (tenant, tenant),
            ).fetchall()
        return [
            Policy(t, i, k, frozenset(Permission(p) for p in perms.split(",")))
            for t, i, k, perms in rows
        ]

    def _policies_for(self, identity: Identity) -> list[Policy]:
        """The identity's policies, cached: `authenticate_token` at the start of each request
        has checked the cache against the database already (one query per request)."""
        assert identity.tenant is not None
        with self._lock:
            found = self._policies.get((identity.tenant, identity.name))
            if found is None:
                rows = self._db.execute(
                    "SELECT keys, permissions FROM policies "
                    "WHERE tenant=? AND identity IN (?, '*')",
                    (identity.tenant, identity.name),
                ).fetchall()
                found = [
                    Policy(
                        identity.tenant,
                        identity.name,
                        k,
                        frozenset(Permission(p) for p in perms.split(",")),
                    )
                    for k, perms in rows
                ]
                self._policies[(identity.tenant, identity.name)] = found
        return found

    def permissions_on(self, identity: Identity, key: str) -> frozenset[Permission]:
        """Everything `identity` may do to the key called `key` (by name alone)."""
        if identity.tenant is None:
            return frozenset()
        out: frozenset[Permission] = frozenset()
        for policy in self._policies_for(identity):
            if fnmatch.fnmatchcase(key, policy.keys):
                out |= policy.permissions
        return out

    def may(self, identity: Identity, permission: Permission) -> bool:
        """Whether `identity` holds `permission` on any key name (for key-less operations)."""
        if permission is Permission.ADMIN:
            return identity.admin
        if identity.tenant is None:
            return False
        return any(permission in p.permissions for p in self._policies_for(identity))


__all__ = [
    "KEY_PERMISSIONS",
    "Identity",
    "NotPermitted",
    "Permission",
    "Policy",
    "TenantNotFound",
    "TenantStore",
    "cert_fingerprint",
    "check_name",
    "check_pattern",
    "parse_permissions",
]
