"""The software vault backend: every key type, held as enclaves, persisted as a snapshot.

In memory each key is a *record*: its material sealed with XChaCha20-Poly1305
under the record key, a subkey of the vault master key. The master key and the
record key live in guarded memory. An operation opens one record into a guarded
buffer, uses it, and wipes it. Locked memory stays bounded however many keys the
vault holds.

This module holds the backend's key operations and the snapshot I/O (read, decrypt,
commit); the records and the unlocked state are in state.py, the key slots in slots.py and
the `strongroom vault` commands in control.py, both mixed into `VaultBackend`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lz4.frame
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from strongroom import algorithms, sodium
from strongroom.backend import (
    Backend,
    BackendContext,
    Capability,
    ConfigKey,
    MonotonicCounter,
    NewKey,
)
from strongroom.errors import (
    BackendUnavailable,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    RollbackDetected,
    SnapshotCorrupt,
    SnapshotTampered,
    SnapshotVersionError,
    StorageError,
    StrongroomError,
)
from strongroom.memory import Guarded, scrub_bytes
from strongroom.secrets import validate_reference
from strongroom.storage import VaultHeader, VaultRecords
from strongroom.types import KeyInfo, KeyType, Operation

from . import keyops, procedures, rows, snapshot
from .control import VaultControlMixin
from .slots import (
    MAX_KDF_ITERATIONS,
    MAX_KDF_MEMORY_KIB,
    MIN_KDF_MEMORY_KIB,
    PASSPHRASE,
)
from .state import Record, _Open

log = logging.getLogger("strongroom.vault")


class VaultBackend(VaultControlMixin, Backend):
    """Keys in guarded memory, saved in an encrypted snapshot. Always available."""

    type_name = "vault"
    random_needs_open = False
    transactional = True
    config_keys = {
        "unlock": ConfigKey(
            list, "unlock methods tried in order: passphrase or backend names", [PASSPHRASE]
        ),
        "passphrase": ConfigKey(
            (str, list),
            "where the passphrase comes from",
            ["env:STRONGROOM_PASSPHRASE", "prompt"],
            secret=True,
        ),
        "path": ConfigKey(
            str,
            "a vault snapshot from before the store, moved into it on first unlock "
            "(default: vault.snapshot in data_dir)",
        ),
        "create": ConfigKey(bool, "create the vault on first use when it does not exist", True),
        "rollback_counter": ConfigKey(
            str,
            "a TPM backend whose NV counter each change advances, so that unlocking finds a "
            "store rolled back to an older copy (docs/storage.md)",
        ),
        "kdf_memory_kib": ConfigKey(int, "Argon2id memory for new passphrase slots, KiB", 65536),
        "kdf_iterations": ConfigKey(int, "Argon2id passes for new passphrase slots", 3),
        "member_passphrases": ConfigKey(
            dict,
            "threshold slots: where each named passphrase member's passphrase comes from "
            "(a table of NAME = env:VAR, file:PATH or prompt; default "
            "env:STRONGROOM_PASSPHRASE_<NAME>, then prompt)",
        ),
    }

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        s = context.settings
        self.path = (
            Path(s["path"]).expanduser() if s.get("path") else (context.data_dir / "vault.snapshot")
        )
        self.methods: list[str] = [str(m) for m in s.get("unlock", [PASSPHRASE])]
        self.create = bool(s.get("create", True))
        self.rollback_counter: str | None = s.get("rollback_counter") or None
        self._counter_target: int | None = None
        self.kdf_memory_kib = int(s.get("kdf_memory_kib", 65536))
        self.kdf_iterations = int(s.get("kdf_iterations", 3))
        if not MIN_KDF_MEMORY_KIB <= self.kdf_memory_kib <= MAX_KDF_MEMORY_KIB:
            raise context.config_error(
                f"must be from {MIN_KDF_MEMORY_KIB} to {MAX_KDF_MEMORY_KIB} (KiB)",
                "kdf_memory_kib",
            )
        if not 1 <= self.kdf_iterations <= MAX_KDF_ITERATIONS:
            raise context.config_error(f"must be from 1 to {MAX_KDF_ITERATIONS}", "kdf_iterations")
        self.passphrase = context.secret(PASSPHRASE, "Vault passphrase: ")
        self.member_passphrases: dict[str, list[str]] = {}
        for member, refs in dict(s.get("member_passphrases") or {}).items():
            ref_list = [str(r) for r in (refs if isinstance(refs, list) else [refs])]
            for ref in ref_list:
                try:
                    validate_reference(ref)
                except ValueError as e:
                    raise context.config_error(str(e), f"member_passphrases.{member}") from None
            self.member_passphrases[str(member)] = ref_list
        self._state: _Open | None = None
        self._unlock_failures: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._publics: dict[str, PublicKeyTypes] = {}

    # -- Backend: discovery ------------------------------------------------------------------
    def availability(self) -> str | None:
        return None

    def capabilities(self) -> frozenset[Capability]:
        return _CAPABILITIES

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "unlocked": self._state is not None}

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        if self._state is not None:
            return
        if self._rows.header() is None and not self.path.exists():
            if not self.create:
                raise BackendUnavailable(
                    self.name,
                    f"no vault in {self._rows.location}; run `strongroom init` to create one",
                )
            if self._create(first_use=True):
                return
        self.unlock()

    def close(self) -> None:
        self.lock()

    def _require(self) -> _Open:
        state = self._state
        if state is None:
            self.open()
            state = self._state
            assert state is not None
        return state

    # -- the store (docs/storage.md) -------------------------------------------------------------
    @property
    def _rows(self) -> VaultRecords:
        records = self.context.records
        if records is None:
            raise BackendUnavailable(
                self.name, "this vault was built without a store; open it through a Keystore"
            )
        return records

    def _read_file(self) -> bytes:
        """The snapshot file at `path`: a vault not migrated into the store yet."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise BackendUnavailable(
                self.name, f"no vault in {self._rows.location}; run `strongroom init` to create one"
            ) from None

    def _open_snapshot(self, snap: snapshot.Snapshot, master: Guarded) -> _Open:
        """An unlocked state holding every record of a snapshot (a backup, or a vault file
        from before the store), each sealed for the store (format 3 records already are)."""
        header = snap.header
        try:
            state = _Open(
                str(header["vault_id"]), int(header["generation"]), list(header["slots"]), master
            )
        except (KeyError, ValueError, TypeError):
            master.close()
            raise SnapshotTampered(f"{self.path} is damaged: its header is incomplete") from None
        try:
            records = self._decrypt_records(state, snap)
            if snapshot.version_of(snap) < 3:
                records = {h: self._reseal(state, r) for h, r in records.items()}
            state.records = records
        except BaseException:
            state.close()
            raise
        return state

    def _reseal(self, state: _Open, rec: Record) -> Record:
        """A record of snapshot format 1 or 2, sealed again with the store's associated data
        (which binds its vault, name and version). Its version is the catalog's, if known."""
        version = self._rows.catalog_version(rec.handle) or 1
        new = replace(rec, version=version)
        size = sodium.opened_length(rec.sealed)
        with state.pool.borrow(max(size, 1)) as (rk, out), out[:size] as plain:
            try:
                sodium.open_into(rk, rec.sealed, rows.legacy_aad(rec.handle, rec.type), plain)
            except IntegrityError:
                raise SnapshotTampered(
                    f"{self.path}: the record of key {rec.name!r} does not open"
                ) from None
            return replace(new, sealed=sodium.seal(rk, plain, rows.record_aad(state.vault_id, new)))

    def _decrypt_records(self, state: _Open, snap: snapshot.Snapshot) -> dict[str, Record]:
        ct = snap.payload
        plain = bytearray(max(sodium.opened_length(ct), 0))
        with state.payload_key() as pk:
            try:
                sodium.open_into(pk, ct, snap.associated, memoryview(plain))
            except IntegrityError:
                raise SnapshotTampered(
                    f"{self.path} failed authentication: the snapshot was modified"
                ) from None
        try:
            doc = json.loads(lz4.frame.decompress(bytes(plain)))
            return {r["h"]: Record.from_json(r) for r in doc["records"]}
        except (ValueError, KeyError, TypeError, RuntimeError):
            raise SnapshotTampered(f"{self.path} is damaged: its records cannot be read") from None

    def _encode_snapshot(self, state: _Open, records: list[Record], generation: int) -> bytes:
        """The portable snapshot (format 3) of these records: `vault backup`."""
        header = {
            "vault_id": state.vault_id,
            "generation": generation,
            "slots": state.slots,
            "payload": {"cipher": "xchacha20poly1305-ietf", "compression": "lz4-frame"},
        }
        doc = json.dumps(
            {"records": [r.to_json() for r in records]}, separators=(",", ":")
        ).encode()
        compressed = lz4.frame.compress(doc)

        def seal(associated: bytes) -> bytes:
            with state.payload_key() as pk:
                return sodium.seal(pk, compressed, associated)

        return snapshot.encode(header, seal, snapshot.FORMAT_VERSION)

    def _open_store(self, header: VaultHeader, count: int, master: Guarded) -> _Open:
        """The unlocked state of the vault in the store, once its manifest's MAC and row
        count show that no row was added or removed behind its back. Records load lazily."""
        where = self._rows.location
        if header.format > rows.STORE_FORMAT:
            master.close()
            raise SnapshotVersionError(
                f"the vault in {where} has store format {header.format}, newer than this "
                f"Strongroom reads ({rows.STORE_FORMAT}); upgrade Strongroom to open it",
                header.format,
            )
        state = _Open(header.vault_id, 0, rows.parse_slots(header, where), master)
        try:
            manifest = rows.read_manifest(state, header, where)
            if count != manifest.count:
                raise SnapshotTampered(
                    f"the vault in {where} holds {count} key records where its manifest "
                    f"says {manifest.count}: records were removed or added outside Strongroom"
                )
            if self.rollback_counter is not None:
                self._check_rollback(state.vault_id, manifest)
        except BaseException:
            state.close()
            raise
        state.generation, state.count, state.tpm = manifest.counter, manifest.count, manifest.tpm
        return state

    def _store_snapshot_state(self, state: _Open) -> None:
        """Write every record of `state` and its header into the store, replacing what the
        store held for this vault (migration and restore), in the transaction in progress."""
        store = self._rows
        store.clear()
        manifest = rows.Manifest.empty()
        for row in rows.to_rows(state, state.records.values()):
            store.put(row)
            manifest = manifest.added(row)
        manifest = replace(manifest, counter=max(state.generation, manifest.counter))
        self._commit(state, manifest)

    def _migrate(self, state: _Open) -> bool:
        """Move a pre-store snapshot's vault into the store, then rename the file to
        `<name>.migrated` (its bytes unchanged, a backup). False when another process
        migrated it first (then `state` is not used)."""
        with self._rows.transaction():
            if self._rows.header() is not None:
                return False
            self._store_snapshot_state(state)
        self._retire_snapshot_file()
        log.info("migrated the vault at %s into %s", self.path, self._rows.location)
        return True

    def _retire_snapshot_file(self) -> None:
        target = self.path.with_name(self.path.name + ".migrated")
        with contextlib.suppress(FileNotFoundError):
            if not target.exists():
                os.replace(self.path, target)

    def _current(self, state: _Open) -> rows.Manifest:
        """In a transaction: the manifest and slots as committed now (another process may
        have changed them), checked; the state takes the slots."""
        header = self._rows.header()
        if header is None or header.vault_id != state.vault_id:
            raise SnapshotCorrupt(
                f"the vault in {self._rows.location} was replaced or removed while this one "
                "was open; lock and unlock again"
            )
        manifest = rows.read_manifest(state, header, self._rows.location)
        state.slots = rows.parse_slots(header, self._rows.location)
        return manifest

    def _commit(self, state: _Open, manifest: rows.Manifest) -> None:
        manifest = self._counted(state, manifest)
        self._rows.put_header(rows.header_for(state, state.slots, manifest))
        state.generation, state.count, state.tpm = manifest.counter, manifest.count, manifest.tpm

    # -- the TPM counter against rollback (`rollback_counter`, docs/storage.md) -----------------
    def _counter(self) -> MonotonicCounter:
        factory = self.context.counter
        if factory is None or self.rollback_counter is None:
            raise BackendUnavailable(self.name, "this vault was built without its counter backend")
        return factory(self.rollback_counter)

    def _counted(self, state: _Open, manifest: rows.Manifest) -> rows.Manifest:
        """The manifest with the TPM counter value its commit will leave: one more than the
        counter now. The counter is advanced once the transaction commits, under a lock
        taken here, so no other writer of this data dir reads it in between: the store is
        never behind the counter unless it was rolled back."""
        if self.rollback_counter is None:
            return manifest
        target = self._counter_target
        if target is None:  # the first commit of this transaction
            counter = self._counter()
            lock = _CounterLock(self.context.data_dir)
            try:
                now = counter.counter_read(state.vault_id)
                if now is None:  # the first change with the counter on: make it
                    now = counter.counter_advance(state.vault_id, 0)
            except BaseException:
                lock.release()
                raise
            target = self._counter_target = now + 1
            vault_id = state.vault_id

            def finish(committed: bool) -> None:
                try:
                    if committed:
                        counter.counter_advance(vault_id, target)
                except StrongroomError as e:  # the store is ahead: the next unlock catches up
                    log.warning("could not advance the TPM counter after a commit: %s", e)
                finally:
                    self._counter_target = None
                    lock.release()

            self._rows.on_end(finish)
        return replace(manifest, tpm=target)

    def _check_rollback(self, vault_id: str, manifest: rows.Manifest) -> None:
        """At unlock: the manifest's counter value against the TPM's (under the lock, so no
        commit is between its write and its counter step). Lower is a rollback."""
        where = self._rows.location
        counter = self._counter()
        lock = _CounterLock(self.context.data_dir)
        try:
            now = counter.counter_read(vault_id)
            if manifest.tpm is None:
                if now is not None:
                    raise RollbackDetected(
                        f"the vault in {where} is from before its TPM counter was first "
                        "advanced: the store was rolled back to an older copy"
                    )
                return
            if now is None:
                raise RollbackDetected(
                    f"the TPM ({self.rollback_counter}) has no counter for the vault in {where}, "
                    "so a rollback of its store cannot be ruled out (was the TPM cleared?); to "
                    "open it anyway, remove rollback_counter from the config, then set it again"
                )
            if now > manifest.tpm:
                raise RollbackDetected(
                    f"the vault in {where} is older than its TPM counter says (change "
                    f"{manifest.tpm}, counter {now}): the store was rolled back to an older copy"
                )
            if now < manifest.tpm:  # a commit whose counter step was cut short
                counter.counter_advance(vault_id, manifest.tpm)
        finally:
            lock.release()

    def _mutate(self, change: Callable[[list[dict[str, Any]]], Any]) -> Any:
        """Apply `change` to the newest key slots and commit them with the manifest."""
        state = self._require()
        with self._rows.transaction():
            manifest = self._current(state)
            slots = [dict(s) for s in state.slots]
            result = change(slots)
            state.slots = slots
            self._commit(state, manifest.bumped())
            return result

    # -- records -----------------------------------------------------------------------------
    def _record(self, info: KeyInfo) -> Record:
        """The record of `info`, loaded (and its MAC checked) on first use."""
        state = self._require()
        rec = state.records.get(info.handle)
        if rec is None:
            row = self._rows.get(info.handle)
            if row is None:
                raise KeyNotFound(info.name, info.namespace)
            rec = rows.from_row(state, row, self._rows.location)
            state.records[info.handle] = rec
        if (rec.namespace, rec.name, rec.version) != (info.namespace, info.name, info.version):
            raise SnapshotTampered(
                f"the catalog entry of key {info.name!r} points at the vault record of another "
                "key: the catalog was modified"
            )
        return rec

    def _material(self, info: KeyInfo) -> _Material:
        """`with self._material(info) as m:` the key's plaintext, for one operation."""
        rec = self._record(info)
        state = self._require()
        return _Material(
            state.pool.borrow(sodium.opened_length(rec.sealed)),
            rec,
            rows.record_aad(state.vault_id, rec),
        )

    def _store(self, info: KeyInfo, material: Guarded, public: bytes | None) -> str:
        """Seal a new record and write it, with the manifest, in one transaction (the
        keystore's, when it holds one: then the catalog rows commit with it)."""
        state = self._require()
        handle = os.urandom(16).hex()
        with material:
            probe = Record(
                handle,
                info.name,
                info.namespace,
                info.type,
                tuple(sorted(u.value for u in info.usage)),
                info.exportable,
                (info.created or datetime.now(UTC)).isoformat(),
                public,
                b"",
                info.version,
            )
            with state.pool.borrow(1) as (rk, _), material.read() as m:
                rec = replace(
                    probe, sealed=sodium.seal(rk, m, rows.record_aad(state.vault_id, probe))
                )
        row = rows.to_row(state, rec)
        with self._rows.transaction():
            manifest = self._current(state)
            self._rows.put(row)
            self._commit(state, manifest.added(row))
        return handle

    # -- Backend: operations -------------------------------------------------------------------
    def generate(self, new: NewKey) -> str:
        """Vault: libsodium for 25519 and symmetric keys, OpenSSL for EC and RSA."""
        if (new.info.type, Operation.GENERATE) not in _CAPABILITIES:
            raise self.unsupported(Operation.GENERATE, new.info.type)
        material, public = keyops.generate(new.info.type)
        return self._store(new.info, material, public)

    def import_key(self, new: NewKey, material: memoryview, fmt: str) -> str:
        guarded, public = keyops.import_material(new.info.type, material, fmt)
        return self._store(new.info, guarded, public)

    def export_key(self, info: KeyInfo, fmt: str) -> bytes:
        with self._material(info) as m:
            return keyops.export(info.type, m, fmt)

    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        cached = self._publics.get(info.handle)
        if cached is not None:
            return cached
        rec = self._record(info)
        if rec.public is None:
            raise InvalidArgument(
                f"key {info.name!r} is a {info.type.value} key and has no public key"
            )
        public = keyops.load_public(info.type, rec.public)
        self._publics[info.handle] = public
        return public

    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        """Vault: crypto_sign (Ed25519), OpenSSL ECDSA/RSA, HMAC-SHA256."""
        if info.type not in keyops.SIGN_TYPES:
            raise self.unsupported(Operation.SIGN, info.type)
        with self._material(info) as m:
            return keyops.sign(info.type, m, data, algorithm)

    def sign_digest(self, info: KeyInfo, digest: bytes, algorithm: str | None) -> bytes:
        """Vault: OpenSSL ECDSA/RSA over the caller's digest."""
        if not (info.type.is_ecdsa or info.type.is_rsa):
            raise self.unsupported(Operation.SIGN, info.type)
        with self._material(info) as m:
            return keyops.sign_digest(info.type, m, digest, algorithm)

    def verify(self, info: KeyInfo, data: bytes, signature: bytes, algorithm: str | None) -> None:
        """Vault: HMAC-SHA256 tags compared in constant time; signatures with the public key."""
        if info.type is not KeyType.HMAC_SHA256:
            return super().verify(info, data, signature, algorithm)
        with self._material(info) as m:
            if not keyops.verify_mac(m, data, signature):
                raise InvalidSignature()

    def encrypt(self, info: KeyInfo, plaintext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        if info.type not in keyops.AEAD_TYPES:
            raise self.unsupported(Operation.ENCRYPT, info.type)
        if algorithm == algorithms.AES_KEY_WRAP:
            raise self.unsupported(Operation.WRAP, info.type, _NO_DATA_KEY_WRAP)
        if algorithm == algorithms.AES_CBC_PAD and info.type is KeyType.AES_256:
            _no_aad_for_cbc(aad)
            with self._material(info) as m:
                return keyops.cbc_encrypt(m, plaintext)
        _no_algorithm(algorithm)
        with self._material(info) as m:
            return keyops.encrypt(info.type, m, plaintext, aad)

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        if info.type not in keyops.AEAD_TYPES and not info.type.is_rsa:
            raise self.unsupported(Operation.DECRYPT, info.type)
        if info.type.is_rsa:
            algorithms.check_rsa_encrypt_algorithm(algorithm)
        elif algorithm == algorithms.AES_KEY_WRAP:
            raise self.unsupported(Operation.UNWRAP, info.type, _NO_DATA_KEY_WRAP)
        elif algorithm == algorithms.AES_CBC_PAD and info.type is KeyType.AES_256:
            _no_aad_for_cbc(aad)
            with self._material(info) as m:
                return keyops.cbc_decrypt(m, ciphertext)
        else:
            _no_algorithm(algorithm)
        with self._material(info) as m:
            return keyops.decrypt(info.type, m, ciphertext, aad, algorithm)

    def agree(
        self, info: KeyInfo, peer: PublicKeyTypes, new: NewKey, salt: bytes, context: bytes
    ) -> str:
        if info.type not in keyops.AGREE_TYPES:
            raise self.unsupported(Operation.AGREE, info.type)
        with self._material(info) as m, keyops.shared_secret(info.type, m, peer) as shared:
            with shared.read() as z:
                material, public = keyops.hkdf_into_new(new.info.type, z, salt, context)
        return self._store(new.info, material, public)

    def exchange(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """Vault: libsodium X25519 or OpenSSL ECDH, the secret copied out for the caller."""
        if info.type not in keyops.AGREE_TYPES:
            raise self.unsupported(Operation.AGREE, info.type)
        with self._material(info) as m, keyops.shared_secret(info.type, m, peer) as shared:
            with shared.read() as z:
                return bytes(z)

    def derive(self, info: KeyInfo, new: NewKey, salt: bytes, context: bytes) -> str:
        if info.type not in keyops.DERIVE_SOURCES:
            raise self.unsupported(Operation.DERIVE, info.type)
        with self._material(info) as m:
            material, public = keyops.hkdf_into_new(new.info.type, m, salt, context)
        return self._store(new.info, material, public)

    def wrap(self, info: KeyInfo, target: KeyInfo) -> bytes:
        """AES key wrap with padding (RFC 5649) of the target's raw or PKCS#8 form."""
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.WRAP, info.type)
        with self._material(target) as t, keyops.wrap_form(target.type, t) as form:
            with self._material(info) as w, form.read() as f:
                plain = bytes(f)
                try:
                    return aes_key_wrap_with_padding(w, plain)
                finally:
                    scrub_bytes(plain)

    def unwrap(self, info: KeyInfo, blob: bytes, new: NewKey) -> str:
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.UNWRAP, info.type)
        with self._material(info) as w:
            try:
                plain = aes_key_unwrap_with_padding(w, blob)
            except InvalidUnwrap:
                raise IntegrityError("the wrapped key failed to unwrap: wrong key or damaged blob")
        try:
            material, public = keyops.unwrap_form(new.info.type, memoryview(plain))
        finally:
            scrub_bytes(plain)
        return self._store(new.info, material, public)

    def delete(self, info: KeyInfo) -> None:
        self._publics.pop(info.handle, None)
        state = self._require()
        with self._rows.transaction():
            row = self._rows.get(info.handle)
            if row is None:
                return
            rows.from_row(state, row, self._rows.location)  # a tampered row stays, reported
            manifest = self._current(state)
            self._rows.delete(info.handle)
            self._commit(state, manifest.removed(row))
        state.records.pop(info.handle, None)

    def random(self, n: int) -> bytes:
        return sodium.random_bytes(n)

    # -- SeedProcedures --------------------------------------------------------------------------
    def bip39_generate(self, new: NewKey, words: int, passphrase: str) -> tuple[str, str]:
        mnemonic = procedures.bip39_generate(words)
        return self.bip39_recover(new, mnemonic, passphrase), mnemonic

    def bip39_recover(self, new: NewKey, mnemonic: str, passphrase: str) -> str:
        seed = Guarded(keyops.SEED_SIZE)
        try:
            with seed.write() as s:
                procedures.bip39_to_seed(mnemonic, passphrase, s)
        except BaseException:
            seed.close()
            raise
        return self._store(new.info, seed, None)

    def slip10_derive(self, seed: KeyInfo, path: str, new: NewKey) -> str:
        curve = new.info.type.value
        with Guarded(32) as key:
            with self._material(seed) as s, key.write() as k:
                procedures.slip10_derive(curve, s, path, k)
            with key.read() as k:
                material, public = keyops.from_raw(new.info.type, k)
        return self._store(new.info, material, public)


class _Material:
    """Opens one record into borrowed guarded memory (a class: it is on every operation)."""

    __slots__ = ("_aad", "_loan", "_record")

    def __init__(
        self,
        loan: contextlib.AbstractContextManager[tuple[memoryview, memoryview]],
        record: Record,
        aad: bytes,
    ) -> None:
        self._loan, self._record, self._aad = loan, record, aad

    def __enter__(self) -> memoryview:
        record_key, out = self._loan.__enter__()
        try:
            sodium.open_into(record_key, self._record.sealed, self._aad, out)
        except BaseException as e:
            self._loan.__exit__(type(e), e, e.__traceback__)
            raise
        return out

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._loan.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]


def _no_aad_for_cbc(aad: bytes) -> None:
    if aad:
        raise InvalidArgument("AES-CBC takes no associated data")


def _no_algorithm(algorithm: str | None) -> None:
    if algorithm is not None:
        raise InvalidArgument(f"the vault picks the cipher from the key type; got {algorithm!r}")


def _capabilities() -> frozenset[Capability]:
    caps: set[Capability] = set()
    for t in KeyType:
        if t.is_fido:  # FIDO credentials exist only inside an authenticator
            continue
        if t not in (KeyType.SEED, KeyType.SECRET):  # a seed or secret is brought in
            caps.add((t, Operation.GENERATE))
        caps.update({(t, Operation.IMPORT), (t, Operation.EXPORT), (t, Operation.DELETE)})
    for t in keyops.SIGN_TYPES:
        caps.update({(t, Operation.SIGN), (t, Operation.VERIFY)})
    for t in keyops.AEAD_TYPES | {KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096}:
        caps.update({(t, Operation.ENCRYPT), (t, Operation.DECRYPT)})
    for t in keyops.AGREE_TYPES:
        caps.add((t, Operation.AGREE))
    for t in keyops.DERIVE_SOURCES | {KeyType.SEED}:
        caps.add((t, Operation.DERIVE))
    caps.update({(KeyType.AES_256, Operation.WRAP), (KeyType.AES_256, Operation.UNWRAP)})
    return frozenset(caps)


_CAPABILITIES = _capabilities()


_NO_DATA_KEY_WRAP = (
    "the vault wraps data keys with its AEAD (the default); aes-kwp is for HSM key-wrapping keys"
)


class _CounterLock:
    """An exclusive `flock` on `rollback-counter.lock` in the data dir, held from reading the
    TPM counter for a commit until the counter has stepped after it."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / "rollback-counter.lock"
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open {path}: {e.strerror or e}") from None
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
