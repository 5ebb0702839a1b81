"""The catalog: (namespace, name) to (backend, handle, type, usage, ...), in the keystore's
store (core/store.py: SQLite in the data_dir, or PostgreSQL).

It holds no secret. Writes are durable and the schema is versioned. The SQL here is
written once for both databases (the rules are in core/store.py).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from .errors import CatalogError, KeyExists, KeyNotFound
from .store import Store
from .store_sqlite import SqliteStore
from .types import KeyInfo, KeyType, KeyVersion, Usage

SCHEMA_VERSION = 4

# Schema 1: one row per key. A fresh catalog is created as schema 1 and then migrated, so
# the upgrade path of an existing catalog is the one every new catalog takes too.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    handle TEXT NOT NULL,
    type TEXT NOT NULL,
    usage TEXT NOT NULL,
    exportable INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created TEXT NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
"""


# Schema 2 (docs/lifecycle.md): key versions and lifecycle state. `keys` keeps one row per key,
# describing its primary (newest) version, so readers of schema 1 columns see what they did;
# `key_versions` holds every version, the primary included.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE keys ADD COLUMN min_decryption_version INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE keys ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE keys ADD COLUMN delete_after TEXT",
    """CREATE TABLE key_versions (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        backend TEXT NOT NULL,
        handle TEXT NOT NULL,
        created TEXT NOT NULL,
        attributes TEXT NOT NULL,
        PRIMARY KEY (namespace, name, version)
    )""",
    "INSERT INTO key_versions SELECT namespace, name, version, backend, handle, created, "
    "attributes FROM keys",
)

# Schema 3 (docs/storage.md): the software vault's header and sealed records live in this
# database too, so that a key and its catalog rows commit in one transaction. The store
# reads none of their contents; backends/vault/rows.py seals and authenticates them.
_MIGRATE_2_TO_3 = (
    """CREATE TABLE vault_headers (
        backend TEXT PRIMARY KEY,
        vault_id TEXT NOT NULL,
        format INTEGER NOT NULL,
        slots TEXT NOT NULL,
        manifest TEXT NOT NULL
    )""",
    """CREATE TABLE vault_records (
        backend TEXT NOT NULL,
        record_id TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        type TEXT NOT NULL,
        meta TEXT NOT NULL,
        public {blob},
        sealed {blob} NOT NULL,
        mac {blob} NOT NULL,
        UNIQUE (backend, record_id)
    )""",
    # Unlock counts a vault's rows (docs/storage.md): the narrowest index makes that cheap.
    "CREATE INDEX vault_records_backend ON vault_records (backend)",
)


# Schema 4 (docs/x509.md): the certificate, or chain (leaf first), kept with a key, as PEM.
# One row per key at most; removing the key removes it.
_MIGRATE_3_TO_4 = (
    """CREATE TABLE certificates (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        pem TEXT NOT NULL,
        PRIMARY KEY (namespace, name)
    )""",
)

_COLUMNS = (
    "namespace, name, backend, handle, type, usage, exportable, version, created, attributes, "
    "min_decryption_version, disabled, delete_after"
)


# A check run first in a write transaction of the store, on the same connection, that may
# lock rows until the transaction ends and raises to refuse it (core/store_lease.py).
Fence = Callable[[Store], None]


class Catalog:
    """Thread-safe access to the catalog; cached reads are invalidated by any writer.

    `store` is the database (core/store.py); a path opens the SQLite store there."""

    def __init__(self, store: Store | Path) -> None:
        self._store: Store = SqliteStore(store) if isinstance(store, Path) else store
        self.path = self._store.path
        """The database file of an embedded store; None on a server."""
        self.location = self._store.location
        try:
            with self._store.errors("open"):
                self._migrate()
        except BaseException:
            self._store.close()
            raise
        self._lock = threading.RLock()
        self._depth = 0
        self._wrote = False
        self._on_end: list[Callable[[bool], None]] = []
        self._cache: dict[tuple[str, str], KeyInfo] = {}
        # No stamp, no cache: rows other machines write are read anew on each call.
        self._stamp = self._store.stamp
        self._cache_stamp = self._stamp.read() if self._stamp else b""

    @property
    def store(self) -> Store:
        return self._store

    def _storage(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """Database trouble (a full disk, a server gone) as a StorageError naming the store."""
        return self._store.errors(doing)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic scope over the whole store (catalog and vault rows): the outermost
        scope is a write transaction (`Store.begin`: every other writer, here or on another
        node, queues behind it instead of failing later), a nested one a savepoint that rolls
        back alone. The thread holds the store's lock for the whole scope. Other processes
        see the change, and caches drop, only when the outermost scope commits."""
        with self._lock:
            depth = self._depth
            with self._storage("write"):
                if depth == 0:
                    try:
                        self._store.begin()
                    except BaseException:
                        self._store.rollback()
                        raise
                else:
                    self._store.execute(f"SAVEPOINT s{depth}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if depth == 0:
                    self._store.rollback()
                    self._end(committed=False)
                else:
                    with contextlib.suppress(Exception):
                        self._store.execute(f"ROLLBACK TO SAVEPOINT s{depth}")
                        self._store.execute(f"RELEASE SAVEPOINT s{depth}")
                raise
            self._depth -= 1
            if depth:
                with self._storage("write"):
                    self._store.execute(f"RELEASE SAVEPOINT s{depth}")
                return
            try:
                with self._storage("write"):
                    self._store.commit()
            except BaseException:
                self._store.rollback()
                self._end(committed=False)
                raise
            self._end(committed=True)

    @contextlib.contextmanager
    def fenced(self, fence: Fence) -> Iterator[None]:
        """An outermost `transaction()` whose first statement is `fence(store)`: a check on
        the same connection that may lock rows until the end and raises to refuse the whole
        scope (a lease still held, core/store_lease.py)."""
        with self.transaction():
            if self._depth != 1:
                raise RuntimeError("a fenced transaction cannot be nested")
            fence(self._store)
            yield

    # -- raw access for the store's other tables (core/vaultstore.py) --------------------------
    @property
    def for_update(self) -> str:
        """Appended to a SELECT inside a transaction: locks its rows until the transaction
        ends (core/store.py)."""
        return self._store.for_update

    def query_one(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        with self._lock, self._storage("read"):
            row = self._store.execute(sql, args).fetchone()
            return None if row is None else tuple(row)

    def query_all(self, sql: str, args: tuple[object, ...]) -> builtins.list[tuple[object, ...]]:
        with self._lock, self._storage("read"):
            return [tuple(r) for r in self._store.execute(sql, args).fetchall()]

    def write(self, sql: str, args: tuple[object, ...]) -> int:
        """One statement in the transaction in progress (or one of its own); rows changed.
        It changes no catalog row, so other processes' catalog caches stay good."""
        with self._lock:
            if self._depth:  # a statement is atomic on its own: no savepoint needed
                with self._storage("write"):
                    return int(self._store.execute(sql, args).rowcount)
            with self.transaction(), self._storage("write"):
                return int(self._store.execute(sql, args).rowcount)

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def _end(self, committed: bool) -> None:
        wrote, self._wrote = self._wrote, False
        self._cache.clear()
        if self._stamp is not None:
            if committed and wrote:
                self._stamp.bump()
            self._cache_stamp = self._stamp.read()
        hooks, self._on_end = self._on_end, []
        for hook in hooks:
            hook(committed)

    def on_end(self, hook: Callable[[bool], None]) -> None:
        """Call `hook(committed)` when the transaction in progress ends (the vault advances
        its TPM counter after a commit). Outside a transaction: at once, as committed."""
        with self._lock:
            if not self._depth:
                hook(True)
                return
            self._on_end.append(hook)

    def _migrate(self) -> None:
        db = self._store
        # The write transaction: two processes (or nodes) opening a new store at once
        # create it once.
        db.begin()
        try:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
                found = 1
            else:
                found = int(str(row[0]))
            if found > SCHEMA_VERSION:
                raise CatalogError(
                    f"the catalog {self.location} has schema version {found}, newer than this "
                    f"Strongroom understands ({SCHEMA_VERSION}); upgrade Strongroom"
                )
            # This store's own id (docs/storage.md), made once: device backends mark the keys
            # they create with it, so `doctor` tells this keystore's keys from another's.
            db.execute(
                "INSERT INTO meta VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                (os.urandom(8).hex(),),
            )
            # In the same transaction: all of it happens, or none.
            for version, steps in (
                (1, _MIGRATE_1_TO_2),
                (2, _MIGRATE_2_TO_3),
                (3, _MIGRATE_3_TO_4),
            ):
                if found == version:
                    for stmt in steps:
                        db.execute(stmt.format(blob=db.blob))
                    found = version + 1
                    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(found),))
        except BaseException:
            db.rollback()
            raise
        db.commit()

    @property
    def store_id(self) -> bytes:
        """Eight random bytes made with the store: what the keys device backends create for
        this keystore carry, so that its inventory never claims another keystore's keys."""
        with self._lock, self._storage("read"):
            row = self._store.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            assert row is not None  # made by _migrate
            return bytes.fromhex(str(row[0]))

    @property
    def schema_version(self) -> int:
        with self._lock, self._storage("read"):
            row = self._store.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
            assert row is not None  # made by _migrate
            return int(str(row[0]))

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def _fresh(self) -> None:
        # Every writer stamps the shared change stamp after it commits: drop the cache then.
        if self._stamp is None:
            return
        stamp = self._stamp.read()
        if stamp != self._cache_stamp:
            self._cache.clear()
            self._cache_stamp = stamp

    def _changed(self) -> None:
        """After a write: inside a transaction, remember it for the commit; else announce it."""
        self._cache.clear()
        if self._depth:
            self._wrote = True
            return
        if self._stamp is not None:
            self._stamp.bump()
            self._cache_stamp = self._stamp.read()

    def get(self, namespace: str, name: str) -> KeyInfo:
        # The hot path takes no lock: a cached row is good while the shared stamp is the one
        # the cache was filled under (both reads are atomic; a writer changes the stamp after
        # its commit, so a reader at worst sees the state from just before that commit).
        # Inside a write transaction the cache is not used: what it reads there decides
        # what it writes (a rotation's next version), so it must be the committed row.
        stamp = self._stamp
        if stamp is not None and not self._depth and stamp.read() == self._cache_stamp:
            info = self._cache.get((namespace, name))
            if info is not None:
                return info
        with self._lock, self._storage("read"):
            self._fresh()
            row = self._store.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE namespace=? AND name=?",  # noqa: S608
                (namespace, name),
            ).fetchone()
            if row is None:
                raise KeyNotFound(name, namespace)
            info = _row_to_info(tuple(row))
            # Never cache what a transaction may still roll back, nor without a stamp.
            if not self._depth and stamp is not None:
                self._cache[(namespace, name)] = info
            return info

    def exists(self, namespace: str, name: str) -> bool:
        try:
            self.get(namespace, name)
        except KeyNotFound:
            return False
        return True

    def list(self, namespace: str | None = None) -> list[KeyInfo]:
        with self._lock, self._storage("read"):
            if namespace is None:
                rows = self._store.execute(
                    f"SELECT {_COLUMNS} FROM keys ORDER BY namespace, name"  # noqa: S608 - constant
                ).fetchall()
            else:
                rows = self._store.execute(
                    f"SELECT {_COLUMNS} FROM keys WHERE namespace=? ORDER BY name",  # noqa: S608
                    (namespace,),
                ).fetchall()
            return [_row_to_info(tuple(r)) for r in rows]

    def add(self, info: KeyInfo) -> None:
        """Insert a row; KeyExists if the name is taken."""
        created = (info.created or now()).isoformat()
        attributes = json.dumps(info.attributes, sort_keys=True)
        with self._lock, self._storage("write"):
            try:
                with self.transaction():
                    self._store.execute(
                        "INSERT INTO keys (namespace, name, backend, handle, type, usage, "
                        "exportable, version, created, attributes) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            info.namespace,
                            info.name,
                            info.backend,
                            info.handle,
                            info.type.value,
                            ",".join(sorted(u.value for u in info.usage)),
                            int(info.exportable),
                            info.version,
                            created,
                            attributes,
                        ),
                    )
                    self._store.execute(
                        "INSERT INTO key_versions VALUES (?,?,?,?,?,?,?) "
                        "ON CONFLICT (namespace, name, version) DO UPDATE SET "
                        "backend=excluded.backend, handle=excluded.handle, "
                        "created=excluded.created, attributes=excluded.attributes",
                        (
                            info.namespace,
                            info.name,
                            info.version,
                            info.backend,
                            info.handle,
                            created,
                            attributes,
                        ),
                    )
            except self._store.integrity_errors:
                raise KeyExists(info.name, info.namespace) from None
            self._changed()

    def remove(self, namespace: str, name: str) -> None:
        """Remove a key's row and the rows of all its versions."""
        with self._lock, self._storage("write"):
            with self.transaction():
                cur = self._store.execute(
                    "DELETE FROM keys WHERE namespace=? AND name=?", (namespace, name)
                )
                self._store.execute(
                    "DELETE FROM key_versions WHERE namespace=? AND name=?", (namespace, name)
                )
                self._store.execute(
                    "DELETE FROM certificates WHERE namespace=? AND name=?", (namespace, name)
                )
            self._changed()
            if cur.rowcount == 0:
                raise KeyNotFound(name, namespace)

    # -- certificates (schema 4) ---------------------------------------------------------------
    def certificate(self, namespace: str, name: str) -> str | None:
        """The PEM certificate (or chain) kept with a key, or None."""
        with self._lock, self._storage("read"):
            row = self._store.execute(
                "SELECT pem FROM certificates WHERE namespace=? AND name=?", (namespace, name)
            ).fetchone()
            return None if row is None else str(row[0])

    def set_certificate(self, namespace: str, name: str, pem: str) -> None:
        """Keep `pem` with the key, replacing what was kept; KeyNotFound if there is no key."""
        with self._lock, self._storage("write"):
            with self.transaction():
                if not self._store.execute(
                    "SELECT 1 FROM keys WHERE namespace=? AND name=?" + self.for_update,  # noqa: S608 - constant
                    (namespace, name),
                ).fetchone():
                    raise KeyNotFound(name, namespace)
                self._store.execute(
                    "INSERT INTO certificates VALUES (?,?,?) ON CONFLICT (namespace, name) "
                    "DO UPDATE SET pem=excluded.pem",
                    (namespace, name, pem),
                )

    def add_attributes(
        self, namespace: str, name: str, version: int, attributes: Mapping[str, str]
    ) -> None:
        """Merge `attributes` into one version's (and, for the primary, the key's) row."""
        with self._lock, self._storage("write"):
            with self.transaction():
                for table, where in (("key_versions", "version=?"), ("keys", "version=?")):
                    row = self._store.execute(
                        f"SELECT attributes FROM {table} WHERE namespace=? AND name=? AND {where}"  # noqa: S608 - constants
                        + self.for_update,
                        (namespace, name, version),
                    ).fetchone()
                    if row is None:
                        continue
                    merged = {**json.loads(str(row[0])), **attributes}
                    self._store.execute(
                        f"UPDATE {table} SET attributes=? WHERE namespace=? AND name=? AND {where}",  # noqa: S608 - constants
                        (json.dumps(merged, sort_keys=True), namespace, name, version),
                    )
            self._changed()

    def remove_certificate(self, namespace: str, name: str) -> bool:
        """Forget the certificate kept with a key; whether there was one."""
        with self._lock, self._storage("write"):
            cur = self._store.execute(
                "DELETE FROM certificates WHERE namespace=? AND name=?", (namespace, name)
            )
            return cur.rowcount > 0

    def handles(self, backend: str) -> set[str]:
        """Handles of every key version in `backend` (older versions included)."""
        with self._lock, self._storage("read"):
            rows = self._store.execute(
                "SELECT handle FROM key_versions WHERE backend=? UNION "
                "SELECT handle FROM keys WHERE backend=?",
                (backend, backend),
            ).fetchall()
            return {str(r[0]) for r in rows}

    # -- versions and lifecycle state (schema 2) -----------------------------------------------
    def versions(self, namespace: str, name: str) -> builtins.list[KeyVersion]:
        """Every stored version of a key, oldest first."""
        with self._lock, self._storage("read"):
            rows = self._store.execute(
                "SELECT version, backend, created, handle, attributes FROM key_versions "
                "WHERE namespace=? AND name=? ORDER BY version",
                (namespace, name),
            ).fetchall()
            if not rows:
                self.get(namespace, name)  # KeyNotFound if there is no such key
            return [
                KeyVersion(
                    int(str(v)),
                    str(b),
                    datetime.fromisoformat(str(c)),
                    str(h),
                    json.loads(str(a)),
                )
                for v, b, c, h, a in rows
            ]

    def add_version(self, namespace: str, name: str, new: KeyVersion) -> None:
        """Record a new version and make it primary, and forget the key's kept certificate,
        in one transaction.

        Refuses (KeyExists) unless `new.version` is one more than the current primary, so two
        rotations racing each other cannot both win.
        """
        attributes = json.dumps(new.attributes, sort_keys=True)
        with self._lock, self._storage("write"):
            with self.transaction():
                cur = self._store.execute(
                    "UPDATE keys SET backend=?, handle=?, version=?, created=?, attributes=? "
                    "WHERE namespace=? AND name=? AND version=?",
                    (
                        new.backend,
                        new.handle,
                        new.version,
                        new.created.isoformat(),
                        attributes,
                        namespace,
                        name,
                        new.version - 1,
                    ),
                )
                if cur.rowcount != 1:
                    raise KeyExists(f"{name} version {new.version}", namespace)
                # A kept certificate certifies the old primary's public key: forget it.
                self._store.execute(
                    "DELETE FROM certificates WHERE namespace=? AND name=?", (namespace, name)
                )
                self._store.execute(
                    "INSERT INTO key_versions VALUES (?,?,?,?,?,?,?)",
                    (
                        namespace,
                        name,
                        new.version,
                        new.backend,
                        new.handle,
                        new.created.isoformat(),
                        attributes,
                    ),
                )
            self._changed()

    def remove_version(self, namespace: str, name: str, version: int) -> None:
        """Forget one older version (never the primary)."""
        with self._lock, self._storage("write"):
            self._store.execute(
                "DELETE FROM key_versions WHERE namespace=? AND name=? AND version=? AND "
                "version < (SELECT version FROM keys WHERE namespace=? AND name=?)",
                (namespace, name, version, namespace, name),
            )
            self._changed()

    def set_state(
        self,
        namespace: str,
        name: str,
        *,
        min_decryption_version: int | None = None,
        disabled: bool | None = None,
        delete_after: datetime | bool | None = False,
    ) -> KeyInfo:
        """Change a key's lifecycle state; `delete_after=None` cancels a scheduled deletion
        (the default, False, leaves it alone). Returns the updated entry."""
        sets: list[str] = []
        args: list[object] = []
        if min_decryption_version is not None:
            sets.append("min_decryption_version=?")
            args.append(int(min_decryption_version))
        if disabled is not None:
            sets.append("disabled=?")
            args.append(int(disabled))
        if delete_after is None or isinstance(delete_after, datetime):
            sets.append("delete_after=?")
            args.append(None if delete_after is None else delete_after.isoformat())
        with self._lock, self._storage("write"):
            if sets:
                cur = self._store.execute(
                    f"UPDATE keys SET {', '.join(sets)} WHERE namespace=? AND name=?",  # noqa: S608
                    (*args, namespace, name),
                )
                self._changed()
                if cur.rowcount == 0:
                    raise KeyNotFound(name, namespace)
            return self.get(namespace, name)

    def due_for_deletion(self, when: datetime) -> builtins.list[KeyInfo]:
        """Keys (any namespace) whose scheduled deletion time is at or before `when`."""
        with self._lock, self._storage("read"):
            rows = self._store.execute(
                f"SELECT {_COLUMNS} FROM keys WHERE delete_after IS NOT NULL"  # noqa: S608 - constant
            ).fetchall()
            return [
                i
                for i in (_row_to_info(tuple(r)) for r in rows)
                if i.delete_after is not None and i.delete_after <= when
            ]


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _row_to_info(row: tuple[object, ...]) -> KeyInfo:
    ns, name, backend, handle, ktype, usage, exportable, version, created, attrs = row[:10]
    min_dec, disabled, delete_after = row[10:13]
    return KeyInfo(
        name=str(name),
        type=KeyType(str(ktype)),
        backend=str(backend),
        usage=frozenset(Usage(u) for u in str(usage).split(",") if u),
        exportable=bool(exportable),
        namespace=str(ns),
        version=int(str(version)),
        created=datetime.fromisoformat(str(created)),
        handle=str(handle),
        attributes=json.loads(str(attrs)),
        min_decryption_version=int(str(min_dec)),
        disabled=bool(disabled),
        delete_after=None if delete_after is None else datetime.fromisoformat(str(delete_after)),
    )
