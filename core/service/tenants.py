"""Tenants, identities and policies of the key custody service (`strongroom serve`).

A tenant is a namespace of keys. An identity belongs to one tenant (or is a service
admin, in none) and proves itself with an API token or a client certificate. Policies
say which identity may do which operation on which key names; nothing is allowed
unless a policy allows it.

Tokens are `srt_<id>_<secret>`: the id finds the row, and only SHA-256(secret) is
stored (the secret is 32 random bytes, so a slow hash would add nothing). A token is
shown once, when it is issued. A client certificate is pinned by the SHA-256 of its DER.

The store is the keystore's database when `[store] url` names one (PostgreSQL: every
node sees every change at its next request), else SQLite (`tenants.sqlite` in the data
dir); either way with a versioned schema, like the catalog. See docs/server.md and
docs/cluster.md.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import (
    AuthenticationFailed,
    InvalidArgument,
    KeyExists,
)
from ..errors import NotPermitted as NotPermitted  # in errors.py; importable here as before
from ..errors import TenantNotFound as TenantNotFound
from ..store import Store, open_store
from ..store_sqlite import SqliteStore
from .wire import Permission as Permission  # defined with the wire format

if TYPE_CHECKING:
    from ..config import Config

SCHEMA_VERSION = 2
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


# Schema 1: the tables of `tenants.sqlite` as it was first written. A new store is created
# as schema 1 and then migrated, so the upgrade path of an existing one is the one every new
# store takes too. The DDL is written once for SQLite and PostgreSQL (core/store.py): on
# PostgreSQL these tables share the database with the catalog (`meta` is the same table).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    tenant TEXT,
    name TEXT NOT NULL,
    admin INTEGER NOT NULL,
    token_hash TEXT,
    cert_sha256 TEXT UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS policies (
    tenant TEXT NOT NULL,
    identity TEXT NOT NULL,
    keys TEXT NOT NULL,
    permissions TEXT NOT NULL,
    PRIMARY KEY (tenant, identity, keys)
)
"""

# Schema 2: the change stamp. Every change writes a fresh random `tenants_stamp` in its own
# transaction; a reader (each node's cache of tokens and policies) compares it at the start
# of each request, so a change made on any node is seen on every node's next request. (The
# version stays under the key `schema`, so a Strongroom that knows only schema 1, and
# would change rows without the stamp, refuses the store.)
_MIGRATE_1_TO_2 = ("INSERT INTO meta VALUES ('tenants_stamp', '0') ON CONFLICT (key) DO NOTHING",)

LEGACY_FILE = "tenants.sqlite"
"""The embedded tenants store in the data dir; with `[store] url` set, an existing one is
moved into the database on first open and renamed `tenants.sqlite.moved`."""


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def cert_fingerprint(der: bytes) -> str:
    """The pin of a client certificate: SHA-256 of its DER, hex."""
    return hashlib.sha256(der).hexdigest()


def _perms(text: str) -> frozenset[Permission]:
    return frozenset(Permission(p) for p in text.split(","))


def _perms_text(perms: Iterable[Permission]) -> str:
    return ",".join(sorted(p.value for p in perms))


log = logging.getLogger("strongroom.tenants")


class ImportAudit(Protocol):
    """Records one event of moving a `tenants.sqlite` into the database (non-secret facts)."""

    def __call__(self, operation: str, /, **facts: object) -> None: ...


def open_tenants(config: Config, audit: ImportAudit | None = None) -> TenantStore:
    """The tenants store of a config: in the database `[store] url` names (shared by every
        node), else `tenants.sqlite` in the data dir. A `tenants.sqlite` left in the data dir of
        a node that now has a database is moved into it (`TenantStore.import_file`; `audit`
    records each row it copies and each conflict)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    legacy = config.data_dir / LEGACY_FILE
    if config.store_url is None:
        return TenantStore(legacy)
    store = TenantStore(open_store(config.store_url, config.data_dir))
    try:
        if legacy.exists():
            store.import_file(legacy, audit)
    except BaseException:
        store.close()
        raise
    return store


class TenantStore:
    """The tenants, identities and policies. Thread-safe.

    `store` is the database (core/store.py): a path opens an SQLite file there (the
    embedded default, `tenants.sqlite`); a PostgreSQL store is the one every node shares.
    Token and policy lookups are cached while the database's change stamp is unchanged;
    the stamp is read once per request (`authenticate_token`, `authenticate_certificate`),
    so no cached answer outlives a change committed by any node before the request."""

    def __init__(self, store: Store | Path) -> None:
        if isinstance(store, Path):
            self.path: Path | None = store
            store = SqliteStore(store, what="tenants store", stamp=False)
        else:
            self.path = store.path
        self._store: Store = store
        self.location = store.location
        self._lock = threading.RLock()
        try:
            if self.path is not None:
                self.path.chmod(0o600)
            with store.errors("open"):
                self._migrate()
        except BaseException:
            store.close()
            raise
        self._stamp = ""
        self._policies: dict[tuple[str, str], list[Policy]] = {}
        self._tokens: dict[str, tuple[Identity, str] | None] = {}
        self._certs: dict[str, Identity | None] = {}

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def _migrate(self) -> None:
        db = self._store
        db.begin()  # two nodes opening a new database at once create it once
        try:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:  # a new store: schema 1, then the same steps as an old one
                db.execute("INSERT INTO meta VALUES ('schema', '1')")
                found = 1
            else:
                found = int(str(row[0]))
            if found > SCHEMA_VERSION:
                raise InvalidArgument(
                    f"{self.location} has tenants schema {found}; this Strongroom reads up "
                    f"to {SCHEMA_VERSION}: upgrade Strongroom"
                )
            for version, steps in ((1, _MIGRATE_1_TO_2),):
                if found == version:
                    for stmt in steps:
                        db.execute(stmt)
                    found = version + 1
                    db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(found),))
        except BaseException:
            db.rollback()
            raise
        db.commit()

    @property
    def schema_version(self) -> int:
        row = self._read_one("SELECT value FROM meta WHERE key='schema'", ())
        assert row is not None  # made by _migrate
        return int(str(row[0]))

    # -- database access -------------------------------------------------------------------------
    def _read_one(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        with self._lock, self._store.errors("read"):
            row = self._store.execute(sql, args).fetchone()
            return None if row is None else tuple(row)

    def _read_all(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock, self._store.errors("read"):
            return [tuple(r) for r in self._store.execute(sql, args).fetchall()]

    @contextlib.contextmanager
    def _change(self) -> Iterator[Store]:
        """One write transaction that ends by changing the stamp: every writer of the
        database (every node) queues behind it (`Store.begin`), and every reader's cache
        drops at its next request."""
        with self._lock:
            db = self._store
            with db.errors("write"):
                try:
                    db.begin()
                except BaseException:
                    db.rollback()
                    raise
            try:
                with db.errors("write"):
                    yield db
                    db.execute(
                        "UPDATE meta SET value=? WHERE key='tenants_stamp'",
                        (secrets.token_hex(8),),
                    )
                    db.commit()
            except BaseException:
                db.rollback()
                raise
            finally:
                self._policies.clear()
                self._tokens.clear()
                self._certs.clear()

    def _fresh(self) -> None:
        """Drop cached lookups when any process or node changed the store (one query)."""
        row = self._read_one("SELECT value FROM meta WHERE key='tenants_stamp'", ())
        stamp = "" if row is None else str(row[0])
        if stamp != self._stamp:
            self._stamp = stamp
            self._policies.clear()
            self._tokens.clear()
            self._certs.clear()

    # -- tenants -------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> None:
        check_name("tenant", name)
        if name.startswith("_") or name == "default":
            raise InvalidArgument(f"the namespace {name!r} is reserved")
        with self._change() as db:
            if db.execute("SELECT 1 FROM tenants WHERE name=?", (name,)).fetchone():
                raise KeyExists(name, "tenants")
            db.execute("INSERT INTO tenants VALUES (?, ?)", (name, time.time()))

    def tenants(self) -> list[dict[str, object]]:
        rows = self._read_all(
            "SELECT t.name, t.created, "
            "(SELECT COUNT(*) FROM identities i WHERE i.tenant=t.name AND revoked IS NULL) "
            "FROM tenants t ORDER BY t.name",
            (),
        )
        return [{"name": n, "created": c, "identities": int(str(k))} for n, c, k in rows]

    def tenant_exists(self, name: str) -> bool:
        return self._read_one("SELECT 1 FROM tenants WHERE name=?", (name,)) is not None

    # -- identities ----------------------------------------------------------------------------
    def issue_token(self, tenant: str | None, name: str, *, admin: bool = False) -> str:
        """Make an identity with a new API token; return the token (shown once)."""
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        ident_id = self._new_identity(tenant, name, admin, None, _hash_secret(secret))
        return f"{TOKEN_PREFIX}{ident_id}_{secret}"

    def add_certificate(
        self, tenant: str | None, name: str, der: bytes, *, admin: bool = False
    ) -> str:
        """Make an identity proved by the client certificate `der`; return its id."""
        return self._new_identity(tenant, name, admin, cert_fingerprint(der), None)

    def _new_identity(
        self, tenant: str | None, name: str, admin: bool, cert: str | None, token: str | None
    ) -> str:
        check_name("identity", name)
        if tenant is None and not admin:
            raise InvalidArgument("an identity outside every tenant must be an admin")
        if tenant is not None and admin:
            raise InvalidArgument("an admin belongs to no tenant")
        ident_id = secrets.token_hex(8)
        with self._change() as db:
            if (
                tenant is not None
                and not db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone()
            ):
                raise TenantNotFound(f"no tenant named {tenant!r}")
            # `COALESCE(tenant, '')`: an admin's tenant is NULL, and no tenant is named ''.
            live = db.execute(
                "SELECT 1 FROM identities WHERE COALESCE(tenant, '')=? AND name=? "
                "AND revoked IS NULL",
                (tenant or "", name),
            ).fetchone()
            if live:
                raise KeyExists(name, f"identities of {tenant or 'admin'}")
            if (
                cert is not None
                and db.execute("SELECT 1 FROM identities WHERE cert_sha256=?", (cert,)).fetchone()
            ):
                raise KeyExists("that certificate", "identities")
            db.execute(
                "INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (ident_id, tenant, name, int(admin), token, cert, time.time()),
            )
        return ident_id

    def identities(self, tenant: str | None = None) -> list[dict[str, object]]:
        sql = (
            "SELECT id, tenant, name, admin, token_hash, cert_sha256, created, revoked "
            "FROM identities"
        )
        args: tuple[object, ...] = ()
        if tenant is not None:
            sql, args = sql + " WHERE tenant=?", (tenant,)
        rows = self._read_all(sql + " ORDER BY tenant, name", args)
        return [
            {
                "id": r[0],
                "tenant": r[1],
                "name": r[2],
                "admin": bool(r[3]),
                "kind": "token" if r[4] is not None else "certificate",
                "certificate_sha256": r[5],
                "created": r[6],
                "revoked": r[7],
            }
            for r in rows
        ]

    def revoke(self, tenant: str | None, name: str) -> None:
        """Revoke an identity's token or certificate; its policies stay for a new one.
        Every node refuses it from its next request on."""
        with self._change() as db:
            cur = db.execute(
                "UPDATE identities SET revoked=?, cert_sha256=NULL "
                "WHERE COALESCE(tenant, '')=? AND name=? AND revoked IS NULL",
                (time.time(), tenant or "", name),
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
                row = self._read_one(
                    "SELECT tenant, name, admin, token_hash FROM identities "
                    "WHERE id=? AND revoked IS NULL AND token_hash IS NOT NULL",
                    (ident_id,),
                )
                cached = (
                    None
                    if row is None
                    else (
                        Identity(
                            ident_id,
                            None if row[0] is None else str(row[0]),
                            str(row[1]),
                            bool(row[2]),
                        ),
                        str(row[3]),
                    )
                )
                self._tokens[ident_id] = cached
        # compare even when there is no row, so that timing says nothing about the id
        expected = cached[1] if cached else "0" * 64
        if not hmac.compare_digest(_hash_secret(secret), expected) or cached is None:
            raise bad
        return cached[0]

    def certificate_enrolled(self, der: bytes) -> bool:
        return (
            self._read_one(
                "SELECT 1 FROM identities WHERE cert_sha256=? AND revoked IS NULL",
                (cert_fingerprint(der),),
            )
            is not None
        )

    def authenticate_certificate(self, der: bytes) -> Identity:
        """The identity of an enrolled client certificate, cached while the change stamp
        stays (one query when nothing changed: KMIP calls this before every message)."""
        fingerprint = cert_fingerprint(der)
        with self._lock:
            self._fresh()
            found = self._certs.get(fingerprint, ...)
            if found is ...:
                row = self._read_one(
                    "SELECT id, tenant, name, admin FROM identities "
                    "WHERE cert_sha256=? AND revoked IS NULL",
                    (fingerprint,),
                )
                found = (
                    None
                    if row is None
                    else Identity(
                        str(row[0]),
                        None if row[1] is None else str(row[1]),
                        str(row[2]),
                        bool(row[3]),
                    )
                )
                self._certs[fingerprint] = found
        if found is None:
            raise AuthenticationFailed("the client certificate is not enrolled")
        return found

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
        with self._change() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone():
                raise TenantNotFound(f"no tenant named {tenant!r}")
            row = db.execute(
                "SELECT permissions FROM policies WHERE tenant=? AND identity=? AND keys=?",
                (tenant, identity, keys),
            ).fetchone()
            if row:
                perms |= _perms(str(row[0]))
            db.execute(
                "INSERT INTO policies VALUES (?, ?, ?, ?) ON CONFLICT (tenant, identity, keys) "
                "DO UPDATE SET permissions=excluded.permissions",
                (tenant, identity, keys, _perms_text(perms)),
            )
        return Policy(tenant, identity, keys, perms)

    def revoke_policy(
        self, tenant: str, identity: str, keys: str, permissions: Iterable[Permission] | None
    ) -> None:
        """Take permissions back (all of them when `permissions` is None)."""
        with self._change() as db:
            row = db.execute(
                "SELECT permissions FROM policies WHERE tenant=? AND identity=? AND keys=?",
                (tenant, identity, keys),
            ).fetchone()
            if row is None:
                raise TenantNotFound(f"no policy for {identity!r} on {keys!r} in {tenant!r}")
            left = frozenset() if permissions is None else _perms(str(row[0])) - set(permissions)
            if left:
                db.execute(
                    "UPDATE policies SET permissions=? WHERE tenant=? AND identity=? AND keys=?",
                    (_perms_text(left), tenant, identity, keys),
                )
            else:
                db.execute(
                    "DELETE FROM policies WHERE tenant=? AND identity=? AND keys=?",
                    (tenant, identity, keys),
                )

    def policies(self, tenant: str | None = None) -> list[Policy]:
        sql = "SELECT tenant, identity, keys, permissions FROM policies"
        args: tuple[object, ...] = ()
        if tenant is not None:
            sql, args = sql + " WHERE tenant=?", (tenant,)
        rows = self._read_all(sql + " ORDER BY tenant, identity, keys", args)
        return [Policy(str(t), str(i), str(k), _perms(str(p))) for t, i, k, p in rows]

    def _policies_for(self, identity: Identity) -> list[Policy]:
        """The identity's policies, cached: `authenticate_token` at the start of each request
        has checked the cache against the database's stamp already (one query a request)."""
        assert identity.tenant is not None
        with self._lock:
            found = self._policies.get((identity.tenant, identity.name))
            if found is None:
                rows = self._read_all(
                    "SELECT keys, permissions FROM policies "
                    "WHERE tenant=? AND identity IN (?, '*')",
                    (identity.tenant, identity.name),
                )
                found = [
                    Policy(identity.tenant, identity.name, str(k), _perms(str(perms)))
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

    # -- moving an embedded store into the database ----------------------------------------------
    def import_file(self, path: Path, audit: ImportAudit | None = None) -> dict[str, int]:
        """Copy the tenants, identities and policies of the embedded store at `path` into
        this one, in one transaction, then rename the file `<name>.moved` (kept, not
        deleted). A tenant of the same name is one tenant. An identity of the same id is
        the same identity (a data dir copied to another node): it is not copied again, but
        a revocation wins, the earliest `revoked` date of the two staying. A policy of the
        same tenant, identity and key pattern with other permissions is a conflict: the
        database's row stays (never a union, which could give back a permission taken away
        on one node), and the conflict is logged and reported. So the data dirs of several
        nodes may each be moved in, in any order; tokens issued by any of them keep working
        on every node, and none revoked on any of them comes back.

        `audit(operation, **facts)`, if given, gets one `tenant_import` record for each row
        copied or changed and one `tenant_import_conflict` for each conflict, after the
        commit and before the rename (so a failed record leaves the file to be moved again,
        which copies nothing twice). Returns how many rows of each kind were copied, and
        `revoked` (identities revoked by the file) and `conflicts`."""
        old = TenantStore(path)  # migrates the file first: the rows read have one shape
        try:
            tenants = old._read_all("SELECT name, created FROM tenants", ())
            identities = old._read_all(
                "SELECT id, tenant, name, admin, token_hash, cert_sha256, created, revoked "
                "FROM identities",
                (),
            )
            policies = old._read_all("SELECT tenant, identity, keys, permissions FROM policies", ())
        finally:
            old.close()
        counts = {"tenants": 0, "identities": 0, "policies": 0, "revoked": 0, "conflicts": 0}
        events: list[tuple[str, dict[str, object]]] = []

        def conflict(kind: str, **facts: object) -> None:
            counts["conflicts"] += 1
            events.append(("tenant_import_conflict", {"kind": kind, "file": str(path), **facts}))

        with self._change() as db:
            for row in tenants:
                cur = db.execute(
                    "INSERT INTO tenants VALUES (?, ?) ON CONFLICT (name) DO NOTHING", row
                )
                if cur.rowcount > 0:
                    counts["tenants"] += 1
                    events.append(("tenant_import", {"kind": "tenant", "tenant": row[0]}))
            for row in identities:
                here = db.execute(
                    "SELECT tenant, name, admin, token_hash, cert_sha256, revoked "
                    "FROM identities WHERE id=?",
                    (row[0],),
                ).fetchone()
                facts: dict[str, object] = {
                    "kind": "identity",
                    "id": row[0],
                    "tenant": row[1],
                    "identity": row[2],
                }
                if here is not None:
                    if tuple(here[:4]) != tuple(row[1:5]):  # the same id, another identity
                        conflict("identity", id=row[0], tenant=here[0], identity=here[1])
                    revoked = [float(str(r)) for r in (here[5], row[7]) if r is not None]
                    if revoked and (here[5] is None or min(revoked) < float(str(here[5]))):
                        db.execute(
                            "UPDATE identities SET revoked=?, cert_sha256=NULL WHERE id=?",
                            (min(revoked), row[0]),
                        )
                        counts["revoked"] += 1
                        events.append(("tenant_import", {**facts, "revoked": min(revoked)}))
                    continue
                cert = row[5]
                if (
                    cert is not None
                    and db.execute(
                        "SELECT 1 FROM identities WHERE cert_sha256=?", (cert,)
                    ).fetchone()
                ):
                    raise KeyExists(f"the certificate of identity {row[2]!r}", "identities")
                db.execute("INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                counts["identities"] += 1
                events.append(("tenant_import", facts))
            for t, i, k, p in policies:
                here = db.execute(
                    "SELECT permissions FROM policies WHERE tenant=? AND identity=? AND keys=?",
                    (t, i, k),
                ).fetchone()
                perms = _perms_text(_perms(str(p)))
                if here is not None:
                    kept = _perms_text(_perms(str(here[0])))
                    if kept != perms:
                        conflict("policy", tenant=t, identity=i, keys=k, kept=kept, dropped=perms)
                    continue
                db.execute("INSERT INTO policies VALUES (?, ?, ?, ?)", (t, i, k, perms))
                counts["policies"] += 1
                events.append(
                    (
                        "tenant_import",
                        {
                            "kind": "policy",
                            "tenant": t,
                            "identity": i,
                            "keys": k,
                            "permissions": perms,
                        },
                    )
                )
        for op, facts in events:
            if op == "tenant_import_conflict":
                log.warning(
                    "moving %s into the database: conflicting %s, the database's row kept: %s",
                    path,
                    facts["kind"],
                    ", ".join(f"{k}={v}" for k, v in facts.items() if k not in ("kind", "file")),
                )
        if audit is not None:
            for op, facts in events:
                audit(op, **facts)
        path.rename(path.with_name(path.name + ".moved"))
        for suffix in ("-wal", "-shm"):  # SQLite's side files, empty once it closed
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return counts


__all__ = [
    "KEY_PERMISSIONS",
    "Identity",
    "NotPermitted",
    "Permission",
    "Policy",
    "TenantNotFound",
    "TenantStore",
    "cert_fingerprint",
    "open_tenants",
    "check_name",
    "check_pattern",
    "parse_permissions",
]
