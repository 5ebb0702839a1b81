"""The vault's own commands (`VaultControl`, `strongroom vault ...`): create, lock and
unlock, enroll and remove key slots, threshold slots and recovery shares, backup and restore.

`VaultControlMixin` is a mixin of `VaultBackend`. It changes the snapshot only through the
backend's `_mutate` (one atomic commit on the newest state) or, for a new vault and a
restore, by writing the whole file under the snapshot lock; the slot formats are in
slots.py.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom import sodium, threshold
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    PolicyViolation,
    SnapshotCorrupt,
    SnapshotTampered,
    StorageError,
    StrongroomError,
)
from strongroom.memory import Guarded, memlock_status, scrub_bytes
from strongroom.secrets import check_new_passphrase
from strongroom.storage import VaultHeader, VaultRecords
from strongroom.types import KeyInfo

from . import rows, snapshot
from .slots import (
    _NEW_KINDS,
    PASSPHRASE,
    RECOVERY,
    THRESHOLD,
    KeySlots,
    _now,
    _public_slot,
    _share_aad,
    _slot_aad,
    _slot_summary,
)
from .state import Record, _b64, _Open, _unb64

log = logging.getLogger("strongroom.vault")


class VaultControlMixin(KeySlots):
    """Mixin of `VaultBackend`: the `VaultControl` commands."""

    # Set by VaultBackend.__init__ (and Backend's).
    name: str
    _state: _Open | None
    _lock: threading.RLock
    _publics: dict[str, PublicKeyTypes]
    rollback_counter: str | None

    if TYPE_CHECKING:  # VaultBackend's store and snapshot I/O

        @property
        def _rows(self) -> VaultRecords: ...
        def _require(self) -> _Open: ...
        def _read_file(self) -> bytes: ...
        def _open_snapshot(self, snap: snapshot.Snapshot, master: Guarded) -> _Open: ...
        def _open_store(self, header: VaultHeader, count: int, master: Guarded) -> _Open: ...
        def _migrate(self, state: _Open) -> bool: ...
        def _store_snapshot_state(self, state: _Open) -> None: ...
        def _encode_snapshot(
            self, state: _Open, records: list[Record], generation: int
        ) -> bytes: ...
        def _current(self, state: _Open) -> rows.Manifest: ...
        def _mutate(self, change: Callable[[list[dict[str, Any]]], Any]) -> Any: ...

    def initialize(self) -> None:
        self._create(first_use=False)

    def _create(self, first_use: bool) -> bool:
        """Make a new vault; True when this call made it. On first use (`create = true`)
        another process may have made it since `open` looked: then False, and the caller
        opens that one instead of failing with "already exists"."""
        if self._exists():
            if first_use:
                return False
            raise StrongroomError(f"a vault already exists in {self._rows.location}")
        passphrase = self.passphrase.get(confirm=True)
        if not passphrase:
            raise InvalidArgument("the vault passphrase must not be empty")
        check_new_passphrase(passphrase)  # the CLI's minimum length, unless --allow-weak
        master = Guarded(32)
        with master.write() as m:
            sodium.random_into(m)
        state = _Open(uuid.uuid4().hex, 0, [], master)
        try:
            state.slots.append(self._passphrase_slot(state, passphrase))
            with self._rows.transaction():
                if self._exists():  # made by another process while we derived the key
                    state.close()
                    if first_use:
                        return False
                    raise StrongroomError(f"a vault already exists in {self._rows.location}")
                self._store_snapshot_state(state)
        except BaseException:
            state.close()
            raise
        self._install(state)
        log.info("created a new vault in %s", self._rows.location)
        return True

    def _install(self, state: _Open) -> None:
        """Make `state` the vault's unlocked state, closing the one it replaces."""
        with self._lock:
            if self._state is not None:
                self._state.close()
            self._state = state

    def _exists(self) -> bool:
        return self._rows.header() is not None or self.path.exists()

    def lock(self) -> None:
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None
            self._unlock_failures = []
            self._publics.clear()

    def _source(self) -> tuple[VaultHeader, int] | snapshot.Snapshot:
        """Where the vault is: its header in the store (with the row count read with it),
        or a snapshot file from before the store."""
        found = self._rows.header_with_count()
        if found is not None:
            return found
        return snapshot.decode(self._read_file(), str(self.path))

    def _open_source(
        self, source: tuple[VaultHeader, int] | snapshot.Snapshot, master: Guarded
    ) -> _Open:
        """The unlocked state: from the store, or a snapshot migrated into it now."""
        if not isinstance(source, snapshot.Snapshot):
            return self._open_store(*source, master)
        state = self._open_snapshot(source, master)
        try:
            migrated = self._migrate(state)
        except BaseException:
            state.close()
            raise
        if migrated:
            return state
        state.close()  # another process migrated it first: open the store's copy
        found = self._rows.header_with_count()
        if found is None:  # pragma: no cover - a migration never removes the header
            raise SnapshotCorrupt(f"the vault in {self._rows.location} vanished")
        return self._open_store(*found, self._reopen_master(found[0]))

    def _reopen_master(self, header: VaultHeader) -> Guarded:
        slots = rows.parse_slots(header, self._rows.location)
        master, _ = self._unwrap_master({"vault_id": header.vault_id, "slots": slots}, None)
        return master

    def unlock(self, method: str | None = None) -> str:
        if self._state is not None and method is None:
            return "already unlocked"
        source = self._source()
        header = _header_dict(source, self._rows.location)
        with self._lock:
            if self._state is not None and method is None:
                return "already unlocked"
            master, used = self._unwrap_master(header, method)
        self._install(self._open_source(source, master))
        return used

    def vault_status(self) -> dict[str, Any]:
        state = self._state
        # Unlocked, the manifest knows the number of keys (checked against the rows at
        # unlock and kept by every commit): no COUNT over the rows here, which the keystore
        # asks for on every open.
        in_store = state is not None or self._rows.header() is not None
        out: dict[str, Any] = {
            "path": str(self.path),
            "store": self._rows.location,
            "exists": in_store or self.path.exists(),
            "unlocked": state is not None,
            "unlock_methods": list(self.methods),
        }
        if not in_store and self.path.exists():
            out["migrates_on_unlock"] = True
            out["snapshot_bytes"] = self.path.stat().st_size
        if state is not None:
            out.update(
                vault_id=state.vault_id,
                generation=state.generation,
                keys=state.count,
                slots=[_public_slot(s) for s in state.slots],
                guarded_memory=memlock_status().__dict__,
                unlock_failures=[dict(f) for f in self._unlock_failures],
            )
            if self.rollback_counter is not None:
                out["rollback_counter"] = state.tpm
        elif self._unlock_failures:  # the last unlock failed: which slots, and why
            out["unlock_failures"] = [dict(f) for f in self._unlock_failures]
        return out

    def verify_store(self) -> dict[str, Any]:
        """Check every row of the vault against its manifest: each row's MAC, their number
        and their multiset hash (a row removed, added or replaced shows here even when the
        catalog no longer names it). O(keys); `strongroom vault verify`."""
        state = self._require()
        where = self._rows.location
        with self._rows.transaction():  # one consistent view; writers wait
            manifest = self._current(state)
            all_rows = list(self._rows.rows())
        rows.from_rows(state, all_rows, where)
        if not manifest.matches(all_rows):
            raise SnapshotTampered(
                f"the vault in {where} does not match its manifest: key records were removed, "
                "added or replaced outside Strongroom"
            )
        return {"keys": len(all_rows), "generation": manifest.counter, "store": where}

    def enroll(self, method: str, options: Mapping[str, Any]) -> dict[str, Any]:
        state = self._require()
        if method == PASSPHRASE:
            new = options.get("passphrase")
            if not isinstance(new, str) or not new:
                raise InvalidArgument("enrolling a passphrase needs a non-empty passphrase")
            slot = self._passphrase_slot(state, new)
        else:
            sealer = self.context.sealer(method)
            slot = {"id": uuid.uuid4().hex[:8], "method": method, "created": _now()}
            with state.master_key() as m:
                slot["params"] = sealer.seal(m, f"strongroom-vault:{state.vault_id}", options)
        self._mutate(lambda slots: slots.append(slot))
        return _public_slot(slot)

    def enroll_threshold(self, policy: threshold.Policy, exclusive: bool = False) -> dict[str, Any]:
        """Add a threshold key slot: a random slot key, split over `policy` with SLIP-39, each
        member's share sealed by its method; the slot key wraps the master key.

        Every share is sealed before anything is written, so a method that fails part-way
        leaves the snapshot as it was. With `exclusive`, every other key slot except
        recovery shares is removed in the same commit, so only the policy opens the vault.
        """
        state = self._require()
        policy.validated()
        for m in policy.members():
            if m.method in _NEW_KINDS:
                raise InvalidArgument(f"{m.method!r} cannot be a member of a threshold slot")
            if m.method == PASSPHRASE:
                extra = set(m.options) - {"passphrase"}
                pw = m.options.get("passphrase")
                if extra or not isinstance(pw, str) or not pw:
                    raise InvalidArgument(
                        f"passphrase member {m.name!r} needs a non-empty passphrase "
                        "(and takes no other option)"
                    )
        slot_id = uuid.uuid4().hex[:8]
        slot: dict[str, Any] = {
            "id": slot_id,
            "method": THRESHOLD,
            "created": _now(),
            "policy": policy.describe(),
        }
        with Guarded(threshold.SECRET_BYTES) as slot_key:
            with slot_key.write() as k:
                sodium.random_into(k)
            with slot_key.read() as k:
                key_bytes = bytes(k)
            shares: list[threshold.MemberShare] = []
            try:
                slot["sharing"], shares = threshold.split(policy, key_bytes)
                members = iter(zip(policy.members(), shares, strict=True))
                slot["groups"] = [
                    {
                        "threshold": g.threshold,
                        "members": [
                            self._seal_share(state, slot_id, *next(members)) for _ in g.members
                        ],
                    }
                    for g in policy.groups
                ]
            finally:
                for share in shares:
                    scrub_bytes(share.value)
                scrub_bytes(key_bytes)
            with slot_key.read() as k, state.master_key() as mk:
                slot["wrapped"] = _b64(sodium.seal(k, mk, _slot_aad(state.vault_id, slot)))

        def add(slots: list[dict[str, Any]]) -> None:
            if exclusive:
                slots[:] = [s for s in slots if s.get("method") == RECOVERY]
            slots.append(slot)

        self._mutate(add)
        return _public_slot(slot)

    def _seal_share(
        self, state: _Open, slot_id: str, member: threshold.Member, share: threshold.MemberShare
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": member.name,
            "method": member.method,
            "group": share.group,
            "index": share.index,
        }
        with Guarded(len(share.value)) as g:
            with g.write() as w:
                w[:] = share.value
            if member.method == PASSPHRASE:
                out.update(
                    kdf="argon2id13",
                    ops=self.kdf_iterations,
                    mem=self.kdf_memory_kib * 1024,
                    salt=_b64(sodium.random_bytes(16)),
                )
                aad = _share_aad(state.vault_id, slot_id, out)
                with self._kek(str(member.options["passphrase"]), out) as kek, g.read() as v:
                    out["sealed"] = _b64(sodium.seal(kek, v, aad))
            else:
                sealer = self.context.sealer(member.method)
                label = f"strongroom-vault:{state.vault_id}:{slot_id}:{member.name}"
                with g.read() as v:
                    out["params"] = sealer.seal(v, label, dict(member.options))
        return out

    def recovery_shares(
        self,
        threshold_k: int,
        shares: int,
        passphrase: str = "",
        groups: list[tuple[int, int]] | None = None,
        group_threshold: int = 1,
    ) -> list[list[str]]:
        """Make a new set of SLIP-39 recovery shares and a `recovery` key slot they open.

        The shares encode a fresh random recovery key (not the master key), which wraps the
        master key in the slot; a new set replaces the old one, whose shares stop working.
        Returns the mnemonics, one list per group.
        """
        state = self._require()
        with Guarded(threshold.SECRET_BYTES) as rk:
            with rk.write() as k:
                sodium.random_into(k)
            with rk.read() as k:
                secret = bytes(k)
            try:
                mnemonics = threshold.recovery_mnemonics(
                    secret, threshold_k, shares, passphrase, groups, group_threshold
                )
            finally:
                scrub_bytes(secret)
            shape = [list(g) for g in groups] if groups else [[threshold_k, shares]]
            slot: dict[str, Any] = {
                "id": uuid.uuid4().hex[:8],
                "method": RECOVERY,
                "created": _now(),
                "scheme": "slip39",
                "identifier": threshold.mnemonic_identifier(mnemonics[0][0]),
                "group_threshold": group_threshold,
                "groups": shape,
                "passphrase": bool(passphrase),
            }
            with rk.read() as k, state.master_key() as m:
                slot["wrapped"] = _b64(sodium.seal(k, m, _slot_aad(state.vault_id, slot)))

        def replace_set(slots: list[dict[str, Any]]) -> None:
            slots[:] = [s for s in slots if s.get("method") != RECOVERY] + [slot]

        self._mutate(replace_set)
        return mnemonics

    def recover(self, mnemonics: list[str], passphrase: str = "") -> str:
        """Open the vault with enough SLIP-39 recovery shares; return the recovery slot id."""
        given = [m for m in mnemonics if m.strip()]
        if not given:
            raise InvalidArgument("no recovery shares were given")
        source = self._source()
        header = _header_dict(source, self._rows.location)
        with self._lock:
            vault_id = str(header.get("vault_id", ""))
            slots = [
                s
                for s in header.get("slots") or []
                if isinstance(s, dict) and s.get("method") == RECOVERY
            ]
            if not slots:
                raise AuthenticationFailed(
                    "this vault has no recovery shares; they are made with "
                    "`strongroom vault recovery-shares` while it is unlocked"
                )
            ident = threshold.mnemonic_identifier(given[0])
            slot = next((s for s in slots if s.get("identifier") == ident), None)
            if slot is None:
                raise AuthenticationFailed(
                    f"these recovery shares (set {ident}) do not belong to this vault's recovery "
                    f"set ({', '.join(str(s.get('identifier')) for s in slots)}): they were "
                    "made for another vault, or replaced by a newer set"
                )
            secret = threshold.recover_secret(given, passphrase)
            master = Guarded(32)
            try:
                with master.write() as m:
                    sodium.open_into(
                        memoryview(secret),
                        _unb64(str(slot["wrapped"])),
                        _slot_aad(vault_id, slot),
                        m,
                    )
            except IntegrityError:
                master.close()
                hint = (
                    "wrong recovery passphrase"
                    if slot.get("passphrase")
                    else "the slot was modified, or a passphrase was given that the set has not"
                )
                raise AuthenticationFailed(f"the recovery shares do not open this vault: {hint}")
            except (KeyError, ValueError, TypeError):
                master.close()
                raise SnapshotTampered(f"{self.path} is damaged: a recovery key slot is malformed")
            finally:
                scrub_bytes(secret)
        state = self._open_source(source, master)
        with self._lock:
            if self._state is not None:
                self._state.close()
            self._state = state
            self._unlock_failures = []
            return str(slot["id"])

    def unenroll(self, slot_id: str) -> None:
        self._require()

        def remove(slots: list[dict[str, Any]]) -> None:
            keep = [s for s in slots if s["id"] != slot_id]
            if len(keep) == len(slots):
                raise InvalidArgument(f"the vault has no key slot {slot_id!r}")
            if not any(s.get("method") != RECOVERY for s in keep):
                gone = next(s for s in slots if s["id"] == slot_id)
                raise PolicyViolation(
                    f"refusing to remove the last way into the vault: key slot {slot_id} "
                    f"({_slot_summary(gone)}) is the only one left"
                    + (" besides recovery shares" if keep else "")
                    + "; enroll another method first"
                )
            slots[:] = keep

        self._mutate(remove)

    def change_passphrase(self, new_passphrase: str) -> None:
        state = self._require()
        if not new_passphrase:
            raise InvalidArgument("the vault passphrase must not be empty")
        new_slot = self._passphrase_slot(state, new_passphrase)

        def swap(slots: list[dict[str, Any]]) -> None:
            slots[:] = [s for s in slots if s["method"] != PASSPHRASE] + [new_slot]

        self._mutate(swap)

    def backup(self, destination: Path) -> None:
        """The portable snapshot (format 3) of every record, checked against the manifest."""
        state = self._require()
        where = self._rows.location
        with self._rows.transaction():  # one consistent view; writers wait
            manifest = self._current(state)
            all_rows = list(self._rows.rows())
        if not manifest.matches(all_rows):
            raise SnapshotTampered(
                f"the vault in {where} does not match its manifest: key records were removed, "
                "added or replaced outside Strongroom; not writing a backup of it"
            )
        records = rows.from_rows(state, all_rows, where)
        data = self._encode_snapshot(state, records, manifest.counter)
        destination = destination.expanduser()
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot write {destination}: {e.strerror or e}") from None
        snapshot.write_atomic(destination, data)

    def restore(self, source: Path) -> list[KeyInfo]:
        """Replace the vault in the store with a backup's, in the transaction in progress
        (the keystore brings the catalog in line in the same one)."""
        try:
            data = source.expanduser().read_bytes()
        except FileNotFoundError:
            raise InvalidArgument(f"no backup file at {source}") from None
        except OSError as e:
            raise StorageError(f"cannot read {source}: {e.strerror or e}") from None
        snap = snapshot.decode(data, str(source))
        master, _ = self._unwrap_master(snap.header, None)
        state = self._open_snapshot(snap, master)
        try:
            with self._rows.transaction():
                self._store_snapshot_state(state)
        except BaseException:
            state.close()
            raise
        self._install(state)
        self._publics.clear()
        return [replace(r.info(), backend=self.name) for r in state.records.values()]

    def records(self) -> list[KeyInfo]:
        """Every key the vault holds, with the metadata kept in its records."""
        state = self._require()
        where = self._rows.location
        return [
            replace(rec.info(), backend=self.name)
            for rec in rows.from_rows(state, list(self._rows.rows()), where)
        ]


def _header_dict(source: tuple[VaultHeader, int] | snapshot.Snapshot, where: str) -> dict[str, Any]:
    """What the key slots need of a header: the vault id and the slots."""
    if isinstance(source, snapshot.Snapshot):
        return source.header
    header = source[0]
    return {"vault_id": header.vault_id, "slots": rows.parse_slots(header, where)}
