"""Keys left in a device by a crash, and their repair (`strongroom doctor [--repair]`).

A device backend (PKCS#11 today) makes its key first and the keystore writes the catalog
row after it; a process killed in between leaves a key no catalog row names. Such a
backend lists the keys it created (`KeyInventory`); a listed key whose handle no catalog
version names is an *orphan*.

A key being made right now would look the same, so creating a device key holds a shared
lock (`device-keys.lock` in the data dir, `flock`) from the device call until its row has
committed, and listing or removing orphans holds it exclusively: it waits for creations in
flight, and holds new ones back while it works. A killed process's lock goes with it.
Within one machine only: nodes sharing one database (the PostgreSQL store) would need the
database's own advisory lock.

This module takes the keystore through `RepairHost`, so it never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .backend import Backend, KeyInventory
from .catalog import Catalog
from .errors import StorageError, StrongroomError

LOCK_NAME = "device-keys.lock"


@dataclass(frozen=True)
class Orphan:
    """A key a backend created for the catalog that no catalog row names."""

    backend: str
    handle: str
    description: str


class RepairHost(Protocol):
    """What this module uses of a `Keystore`."""

    catalog: Catalog

    @property
    def data_dir(self) -> Path: ...
    def _all_backends(self) -> Mapping[str, Backend]: ...
    def _ready(self, backend: Backend) -> Backend: ...
    def _audited(
        self, op: str, key: str | None, payload: Any = None, **detail: Any
    ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...


@contextlib.contextmanager
def device_creation_lock(data_dir: Path, exclusive: bool) -> Iterator[None]:
    """Shared while a device key and its row are made; exclusive while orphans are sought."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _orphans(ks: RepairHost) -> tuple[list[Orphan], list[str]]:
    """(orphans, backends that could not be searched and why), under the caller's lock."""
    found: list[Orphan] = []
    unsearched: list[str] = []
    for name, backend in ks._all_backends().items():
        if not isinstance(backend, KeyInventory):
            continue
        try:
            owned = ks._ready(backend).owned_keys()  # type: ignore[attr-defined]
        except StrongroomError as e:
            unsearched.append(f"{name}: {e}")
            continue
        known = ks.catalog.handles(name)
        found += [
            Orphan(name, handle, description)
            for handle, description in sorted(owned.items())
            if handle not in known
        ]
    return found, unsearched


def find_orphans(ks: RepairHost) -> tuple[list[Orphan], list[str]]:
    """Every orphan in every backend that keeps an inventory, and the backends that could
    not be searched (unavailable, locked) with the reason."""
    with device_creation_lock(ks.data_dir, exclusive=True):
        return _orphans(ks)


def remove_orphans(ks: RepairHost, confirm: Callable[[Orphan], bool]) -> list[Orphan]:
    """Destroy each orphan `confirm` agrees to, each an audited `repair_orphan`; the search
    is made again under the lock, so only keys that are orphans now are offered."""
    removed: list[Orphan] = []
    with device_creation_lock(ks.data_dir, exclusive=True):
        orphans, _ = _orphans(ks)
        for orphan in orphans:
            if not confirm(orphan):
                continue
            with ks._audited("repair_orphan", None, handle=orphan.handle) as facts:
                facts["backend"] = orphan.backend
                backend = ks._all_backends()[orphan.backend]
                backend.remove_owned(orphan.handle)  # type: ignore[attr-defined]
            removed.append(orphan)
    return removed
