"""The embedded store (core/store.py): one SQLite file in the data_dir, `catalog.sqlite`
(WAL journal, synchronous=FULL, mode 600), with a change stamp file beside it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import CatalogError, StorageError


class SqliteStore:
    blob = "BLOB"
    # BEGIN IMMEDIATE holds the database's one write lock: every row read is already locked.
    for_update = ""
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, *, what: str = "catalog", stamp: bool = True) -> None:
        """`what` names the database in messages; `stamp`: keep the change stamp file."""
        self._path = path
        self._what = what
        with self.errors("open"):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Writers wait up to 10 s for the write lock instead of failing at once.
            self._db.execute("PRAGMA busy_timeout=10000")
            self.stamp: _ChangeStamp | None = (
                _ChangeStamp(path.with_name(path.name + ".stamp")) if stamp else None
            )

    @property
    def location(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """A full or read-only disk (or the like) as a StorageError naming the catalog; a
        file that is no SQLite database, when opening, as a CatalogError."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StorageError(f"cannot {doing} the {self._what} {self._path}: {e}") from None
        except sqlite3.DatabaseError as e:
            if doing != "open":
                raise
            raise CatalogError(f"cannot open the {self._what} {self._path}: {e}") from None
        except OSError as e:
            raise StorageError(
                f"cannot {doing} the {self._what} {self._path}: {e.strerror or e}"
            ) from None

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, tuple(args))

    def begin(self, lock: int | None = None) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # the file's one write lock, whatever `lock`

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    @property
    def changes(self) -> int:
        return self._db.total_changes

    def close(self) -> None:
        self._db.close()
        if self.stamp is not None:
            self.stamp.close()


class _ChangeStamp:
    """Eight shared bytes that every catalog writer sets to a fresh random value.

    Readers cache catalog rows and compare the stamp on each lookup, so a key deleted or
    created by another process is seen at once. The stamp lives in a file beside the
    catalog. A random value rather than a counter needs no lock: two writers can never leave
    it unchanged.

    It is read with pread, not through a shared mapping: a mapped file that another process
    truncates kills every process touching the mapping with SIGBUS, the service included.
    A stamp cut short reads as changed and is grown back to its eight bytes.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(self._fd).st_size < 8:
                os.ftruncate(self._fd, 8)
        except BaseException:
            os.close(self._fd)
            raise

    def read(self) -> bytes:
        stamp = os.pread(self._fd, 8, 0)
        if len(stamp) < 8:  # truncated behind our back: restore the size, report a change
            os.ftruncate(self._fd, 8)
        return stamp

    def bump(self) -> None:
        os.pwrite(self._fd, os.urandom(8), 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
