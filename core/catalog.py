"""The catalog: SQLite mapping (namespace, name) to (backend, handle, type, usage, ...).

It holds no secret. Writes are durable (synchronous=FULL) and the schema is versioned.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from .errors import KeyExists, KeyNotFound, StrongroomError
from .types import KeyInfo, KeyType, Usage

SCHEMA_VERSION = 1

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


class CatalogError(StrongroomError):
    """The catalog file cannot be used (newer schema, or not a catalog)."""


class Catalog:
    """Thread-safe access to the catalog; cached reads are invalidated by any writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"cannot open the catalog {path}: {e}") from None
        self._lock = threading.RLock()
        self._cache: dict[tuple[str, str], KeyInfo] = {}
        self._stamp = _ChangeStamp(path.with_name(path.name + ".stamp"))
        self._cache_stamp = self._stamp.read()

    def _migrate(self) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise CatalogError(
                    f"the catalog {self.path} has schema version {row[0]}, newer than this "
                    f"Strongroom understands ({SCHEMA_VERSION}); upgrade Strongroom"
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._stamp.close()

    def _fresh(self) -> None:
        # Every writer stamps the shared change stamp after it commits: drop the cache then.
        stamp = self._stamp.read()
        if stamp != self._cache_stamp:
            self._cache.clear()
            self._cache_stamp = stamp

    def _changed(self) -> None:
        self._stamp.bump()
        self._cache.clear()
        self._cache_stamp = self._stamp.read()

    def get(self, namespace: str, name: str) -> KeyInfo:
        # The hot path takes no lock: a cached row is good while the shared stamp is the one
        # the cache was filled under (both reads are atomic; a writer changes the stamp after
        # its commit, so a reader at worst sees the state from just before that commit).
        if self._stamp.read() == self._cache_stamp:
            info = self._cache.get((namespace, name))
            if info is not None:
                return info
        with self._lock:
            self._fresh()
            info = self._cache.get((namespace, name))
            if info is None:
                row = self._db.execute(
                    "SELECT * FROM keys WHERE namespace=? AND name=?", (namespace, name)
                ).fetchone()
                if row is None:
                    raise KeyNotFound(name, namespace)
                info = _row_to_info(row)
                self._cache[(namespace, name)] = info
            return info

    def exists(self, namespace: str, name: str) -> bool:
        try:
            self.get(namespace, name)
        except KeyNotFound:
            return False
        return True

    def list(self, namespace: str | None = None) -> list[KeyInfo]:
        with self._lock:
            if namespace is None:
                rows = self._db.execute("SELECT * FROM keys ORDER BY namespace, name").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM keys WHERE namespace=? ORDER BY name", (namespace,)
                ).fetchall()
            return [_row_to_info(r) for r in rows]

    def add(self, info: KeyInfo) -> None:
        """Insert a row; KeyExists if the name is taken."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        info.namespace,
                        info.name,
                        info.backend,
                        info.handle,
                        info.type.value,
                        ",".join(sorted(u.value for u in info.usage)),
                        int(info.exportable),
                        info.version,
                        (info.created or now()).isoformat(),
                        json.dumps(info.attributes, sort_keys=True),
                    ),
                )
            except sqlite3.IntegrityError:
                raise KeyExists(info.name, info.namespace) from None
            self._changed()

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM keys WHERE namespace=? AND name=?", (namespace, name)
            )
            self._changed()
            if cur.rowcount == 0:
                raise KeyNotFound(name, namespace)

    def handles(self, backend: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT handle FROM keys WHERE backend=?", (backend,)
            ).fetchall()
            return {r[0] for r in rows}


class _ChangeStamp:
    """Eight shared bytes that every catalog writer sets to a fresh random value.

    Readers cache catalog rows and compare the stamp (a memory read, no system call) on
    each lookup, so a key deleted or created by another process is seen at once. The
    stamp lives in a file mapped MAP_SHARED beside the catalog. A random value rather
    than a counter needs no lock: two writers can never leave it unchanged.
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:8]

    def bump(self) -> None:
        self._map[:8] = os.urandom(8)

    def close(self) -> None:
        self._map.close()


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _row_to_info(row: tuple[object, ...]) -> KeyInfo:
    ns, name, backend, handle, ktype, usage, exportable, version, created, attrs = row
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
    )
