"""The vault's own commands as the keystore offers them: each one audited, and `vault
restore`, which brings the catalog in line with the restored vault.

`_AuditedVault` wraps the vault's `VaultControl` (`Keystore.vault_control`) so that every
command that changes state is recorded in the audit log, with the hardware key slots that
failed before another method unlocked the vault. `vault_restore` replaces the vault with a
backup, then removes the catalog rows of keys the backup lacks and adds those it brings.
Both work through keystore internals, declared here as the `VaultHost` Protocol, so this
module never imports the keystore (tests/test_layers.py checks that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from .backend import Backend, VaultControl
from .catalog import Catalog, now
from .errors import UnsupportedOperation
from .types import KeyVersion


class AuditedOperation(Protocol):
    """One audited operation (`keystore._Audited`): a context manager giving the dict of
    facts for its record."""

    def __enter__(self) -> dict[str, Any]: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None: ...
    def add_detail(self, **detail: Any) -> None: ...


class VaultHost(Protocol):
    """What this module uses of a `Keystore`."""

    catalog: Catalog
    _opened: set[str]

    @property
    def vault(self) -> Backend: ...
    def _audited(
        self, op: str, key: str | None, payload: Any = None, **detail: Any
    ) -> AuditedOperation: ...


class _AuditedVault:
    """The vault's own commands, each recorded in the audit log (status is read-only)."""

    _AUDITED = frozenset(
        {
            "initialize",
            "lock",
            "unlock",
            "enroll",
            "unenroll",
            "change_passphrase",
            "backup",
            "restore",
            "enroll_threshold",
            "recovery_shares",
            "recover",
        }
    )

    def __init__(self, ks: VaultHost, vault: VaultControl, name: str) -> None:
        self._ks, self._vault, self._name = ks, vault, name

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._vault, attr)
        if attr not in self._AUDITED:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            audited = self._ks._audited(f"vault_{attr}", None)
            with audited as facts:
                facts["backend"] = self._name
                was_unlocked = attr == "unlock" and _unlocked(self._vault)
                result = target(*args, **kwargs)
                if attr in ("unlock", "restore") and not was_unlocked:
                    failed = _failed_slots(self._vault)
                    if failed:  # a hardware slot failed before another method opened it
                        audited.add_detail(failed_slots=failed)
                return result

        return call


def _unlocked(vault: VaultControl) -> bool:
    return bool(vault.vault_status().get("unlocked"))


def _failed_slots(vault: VaultControl) -> str:
    """The key slots that failed in the vault's last unlock, as one line for the audit log:
    `METHOD (slot ID): ERROR: REASON`, separated by `; `; empty when none failed."""
    return "; ".join(
        f"{f.get('method')} (slot {', '.join(f.get('slots') or [])}): "
        f"{f.get('error')}: {f.get('reason')}"
        for f in vault.vault_status().get("unlock_failures") or []
    )


def _vault_control(ks: VaultHost) -> VaultControl:
    v = ks.vault
    if not isinstance(v, VaultControl):  # pragma: no cover - the built-in vault implements it
        raise UnsupportedOperation(v.name, "vault", None)
    return v


def vault_restore(ks: VaultHost, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Replace the vault with a backup and bring the catalog in line with it."""
    vault = _vault_control(ks)
    name = ks.vault.name
    with ks._audited("vault_restore", None) as facts:
        facts["backend"] = name
        with ks.catalog.transaction():  # the vault's rows and the catalog's, together
            return _restore(ks, vault, name, Path(source))


def _restore(ks: VaultHost, vault: VaultControl, name: str, source: Path) -> dict[str, Any]:
    """Replace the vault, then remove the catalog rows of keys the backup lacks and add
    those it brings (inside the caller's transaction)."""
    restored = vault.restore(source)
    ks._opened.add(name)
    current = {i.handle: i for i in ks.catalog.list(None) if i.backend == name}
    kept = {i.handle for i in restored}
    removed, added, conflicts = [], [], []
    for info in current.values():
        if info.handle not in kept:
            ks.catalog.remove(info.namespace, info.name)
            removed.append(info.name)
    versions = ks.catalog.handles(name)  # older versions of rotated keys, too
    brought: set[tuple[str, str]] = set()
    # Oldest version first: a rotated key comes back with every version it had.
    for info in sorted(restored, key=lambda i: (i.namespace, i.name, i.version)):
        if info.handle in current or info.handle in versions:
            continue
        key = (info.namespace, info.name)
        if key in brought:
            ks.catalog.add_version(
                info.namespace,
                info.name,
                KeyVersion(info.version, name, info.created or now(), info.handle, {}),
            )
            continue
        if ks.catalog.exists(info.namespace, info.name):
            conflicts.append(info.name)
            continue
        ks.catalog.add(info)
        brought.add(key)
        added.append(info.name)
    return {"keys": len(restored), "added": added, "removed": removed, "conflicts": conflicts}
