"""The software vault backend: every key type, held as enclaves, persisted as a snapshot.

In memory each key is a *record*: its material sealed with XChaCha20-Poly1305
under the record key, a subkey of the vault master key. The master key and the
record key live in guarded memory. An operation opens one record into a guarded
buffer, uses it, and wipes it. Locked memory stays bounded however many keys the
vault holds.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
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

from strongroom import algorithms, sodium, strictjson, threshold
from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    PolicyViolation,
    SnapshotCorrupt,
    SnapshotTampered,
    StrongroomError,
    ThresholdNotMet,
)
from strongroom.memory import Coffer, Guarded, KeyedPool, memlock_status, scrub_bytes
from strongroom.secrets import SecretSource, check_new_passphrase, validate_reference
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import keyops, procedures, snapshot

log = logging.getLogger("strongroom.vault")

_REC_PERSONAL = b"srvault-records1"
_PAYLOAD_PERSONAL = b"srvault-payload1"
MIN_KDF_MEMORY_KIB = 8192
# The most Argon2id may cost: a snapshot header is read before anything authenticates it, so
# a tampered key slot must not be able to ask for hours of work or more memory than a machine
# has. libsodium's own "sensitive" preset is 4 passes over 1 GiB.
MAX_KDF_MEMORY_KIB = 4 * 1024 * 1024
MAX_KDF_ITERATIONS = 16
PASSPHRASE = "passphrase"  # noqa: S105 - the method name, not a secret
THRESHOLD = "threshold"
RECOVERY = "recovery"
_NEW_KINDS = frozenset({THRESHOLD, RECOVERY})
"""Slot methods that need snapshot format 2."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@dataclass(frozen=True)
class Record:
    """One key as the vault holds it: metadata in clear, material sealed."""

    handle: str
    name: str
    namespace: str
    type: KeyType
    usage: tuple[str, ...]
    exportable: bool
    created: str
    public: bytes | None
    sealed: bytes

    def aad(self) -> bytes:
        return f"strongroom-record|{self.handle}|{self.type.value}".encode()

    def to_json(self) -> dict[str, Any]:
        return {
            "h": self.handle,
            "n": self.name,
            "ns": self.namespace,
            "t": self.type.value,
            "u": list(self.usage),
            "x": self.exportable,
            "c": self.created,
            "p": _b64(self.public) if self.public is not None else None,
            "s": _b64(self.sealed),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Record:
        return cls(
            handle=str(d["h"]),
            name=str(d["n"]),
            namespace=str(d["ns"]),
            type=KeyType(d["t"]),
            usage=tuple(str(u) for u in d["u"]),
            exportable=bool(d["x"]),
            created=str(d["c"]),
            public=_unb64(d["p"]) if d.get("p") is not None else None,
            sealed=_unb64(d["s"]),
        )

    def info(self) -> KeyInfo:
        return KeyInfo(
            name=self.name,
            type=self.type,
            backend="",
            usage=frozenset(Usage(u) for u in self.usage),
            exportable=self.exportable,
            namespace=self.namespace,
            created=datetime.fromisoformat(self.created),
            handle=self.handle,
        )


class _Open:
    """The state of an unlocked vault: master key and record key in coffers, records sealed."""

    def __init__(
        self, vault_id: str, generation: int, slots: list[dict[str, Any]], master: Guarded
    ) -> None:
        """Takes ownership of `master` (closes it once its key is in a coffer)."""
        self.vault_id = vault_id
        self.generation = generation
        self.slots = slots
        with master, master.read() as m:
            self.master = Coffer(m)
        try:
            with self.subkey(_REC_PERSONAL) as r:
                self.record_key = Coffer(r)
        except BaseException:
            self.master.close()
            raise
        self.pool = KeyedPool(self.record_key)
        self.records: dict[str, Record] = {}

    @contextlib.contextmanager
    def master_key(self) -> Iterator[memoryview]:
        """The master key, in guarded memory for the length of the block."""
        with Guarded(32) as key:
            with key.write() as k:
                self.master.open_into(k)
            with key.read() as k:
                yield k

    @contextlib.contextmanager
    def subkey(self, personal: bytes) -> Iterator[memoryview]:
        """A key derived from the master key (keyed BLAKE2b), for the length of the block."""
        with Guarded(32) as key:
            with self.master_key() as m, key.write() as k:
                sodium.keyed_hash_into(m, personal, k)
            with key.read() as k:
                yield k

    def payload_key(self) -> contextlib.AbstractContextManager[memoryview]:
        return self.subkey(_PAYLOAD_PERSONAL)

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            try:
                self.record_key.close()
            finally:
                self.master.close()
        self.records = {}


class VaultBackend(Backend):
    """Keys in guarded memory, saved in an encrypted snapshot. Always available."""

    type_name = "vault"
    random_needs_open = False
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
        "path": ConfigKey(str, "the snapshot file (default: vault.snapshot in data_dir)"),
        "create": ConfigKey(bool, "create the vault on first use when it does not exist", True),
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
        with self._lock:
            if self._state is not None:
                return
            if not self.path.exists():
                if not self.create:
                    raise BackendUnavailable(
                        self.name, f"no vault at {self.path}; run `strongroom init` to create one"
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

    # -- VaultControl ------------------------------------------------------------------------
    def initialize(self) -> None:
        self._create(first_use=False)

    def _create(self, first_use: bool) -> bool:
        """Make a new vault; True when this call made it. On first use (`create = true`)
        another process may have made it since `open` looked: then False, and the caller
        opens that one instead of failing with "already exists"."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock, snapshot.locked(self.path):
            if self.path.exists():
                if first_use:
                    return False
                raise StrongroomError(f"a vault already exists at {self.path}")
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
                self._write(state, state.records, state.slots, 1)
            except BaseException:
                state.close()
                raise
            state.generation = 1
            self._state = state
            log.info("created a new vault at %s", self.path)
            return True

    def lock(self) -> None:
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None
            self._unlock_failures = []
            self._publics.clear()

    def unlock(self, method: str | None = None) -> str:
        with self._lock:
            if self._state is not None and method is None:
                return "already unlocked"
            data = self._read_file()
            snap = snapshot.decode(data, str(self.path))
            master, used = self._unwrap_master(snap.header, method)
            state = self._open_snapshot(snap, master)
            if self._state is not None:
                self._state.close()
            self._state = state
            return used

    def vault_status(self) -> dict[str, Any]:
        state = self._state
        out: dict[str, Any] = {
            "path": str(self.path),
            "exists": self.path.exists(),
            "unlocked": state is not None,
            "unlock_methods": list(self.methods),
        }
        if state is not None:
            out.update(
                vault_id=state.vault_id,
                generation=state.generation,
                keys=len(state.records),
                slots=[_public_slot(s) for s in state.slots],
                guarded_memory=memlock_status().__dict__,
                unlock_failures=[dict(f) for f in self._unlock_failures],
            )
        if self.path.exists():
            out["snapshot_bytes"] = self.path.stat().st_size
        return out

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
        self._mutate(lambda records, slots: slots.append(slot))
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

        def add(records: dict[str, Record], slots: list[dict[str, Any]]) -> None:
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

        def replace_set(records: dict[str, Record], slots: list[dict[str, Any]]) -> None:
            slots[:] = [s for s in slots if s.get("method") != RECOVERY] + [slot]

        self._mutate(replace_set)
        return mnemonics

    def recover(self, mnemonics: list[str], passphrase: str = "") -> str:
        """Open the vault with enough SLIP-39 recovery shares; return the recovery slot id."""
        given = [m for m in mnemonics if m.strip()]
        if not given:
            raise InvalidArgument("no recovery shares were given")
        with self._lock:
            snap = snapshot.decode(self._read_file(), str(self.path))
            header = snap.header
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
            state = self._open_snapshot(snap, master)
            if self._state is not None:
                self._state.close()
            self._state = state
            self._unlock_failures = []
            return str(slot["id"])

    def unenroll(self, slot_id: str) -> None:
        self._require()

        def remove(records: dict[str, Record], slots: list[dict[str, Any]]) -> None:
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

        def swap(records: dict[str, Record], slots: list[dict[str, Any]]) -> None:
            slots[:] = [s for s in slots if s["method"] != PASSPHRASE] + [new_slot]

        self._mutate(swap)

    def backup(self, destination: Path) -> None:
        self._require()
        with self._lock, snapshot.locked(self.path):
            data = self._read_file()
            snapshot.decode(data, str(self.path))
            destination = destination.expanduser()
            destination.parent.mkdir(parents=True, exist_ok=True)
            snapshot.write_atomic(destination, data)

    def restore(self, source: Path) -> list[KeyInfo]:
        try:
            data = source.expanduser().read_bytes()
        except FileNotFoundError:
            raise InvalidArgument(f"no backup file at {source}") from None
        snap = snapshot.decode(data, str(source))
        master, _ = self._unwrap_master(snap.header, None)
        state = self._open_snapshot(snap, master)
        with self._lock, snapshot.locked(self.path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                snapshot.remove_stale_temps(self.path)
                snapshot.write_atomic(self.path, data)
            except BaseException:
                state.close()
                raise
            if self._state is not None:
                self._state.close()
            self._state = state
            self._publics.clear()
            return [replace(r.info(), backend=self.name) for r in state.records.values()]

    def records(self) -> list[KeyInfo]:
        """Every key the vault holds, with the metadata kept inside the snapshot."""
        state = self._require()
        return [replace(r.info(), backend=self.name) for r in state.records.values()]

    # -- key slots -----------------------------------------------------------------------------
    def _passphrase_slot(self, state: _Open, passphrase: str) -> dict[str, Any]:
        slot: dict[str, Any] = {
            "id": uuid.uuid4().hex[:8],
            "method": PASSPHRASE,
            "kdf": "argon2id13",
            "ops": self.kdf_iterations,
            "mem": self.kdf_memory_kib * 1024,
            "salt": _b64(sodium.random_bytes(16)),
            "created": _now(),
        }
        with self._kek(passphrase, slot) as kek, state.master_key() as m:
            slot["wrapped"] = _b64(sodium.seal(kek, m, _slot_aad(state.vault_id, slot)))
        return slot

    @contextlib.contextmanager
    def _kek(self, passphrase: str, slot: Mapping[str, Any]) -> Iterator[memoryview]:
        secret = passphrase.encode("utf-8")
        try:
            if slot.get("kdf") != "argon2id13":
                raise ValueError("unknown KDF")
            ops = strictjson.integer(slot["ops"], 1, MAX_KDF_ITERATIONS)
            mem = strictjson.integer(
                slot["mem"], MIN_KDF_MEMORY_KIB * 1024, MAX_KDF_MEMORY_KIB * 1024
            )
            with Guarded(32) as kek:
                with kek.write() as k:
                    sodium.argon2id_into(k, secret, _unb64(slot["salt"]), ops, mem)
                with kek.read() as k:
                    yield k
        finally:
            scrub_bytes(secret)

    def _unwrap_master(self, header: Mapping[str, Any], only: str | None) -> tuple[Guarded, str]:
        vault_id = str(header.get("vault_id", ""))
        slots = header.get("slots")
        if not isinstance(slots, list) or not slots:
            raise SnapshotTampered(f"{self.path} is damaged: it has no key slots")
        methods = [only] if only else self.methods
        if only == RECOVERY:
            raise InvalidArgument(
                "recovery shares open the vault with `strongroom vault recover`, not unlock"
            )
        thresholds = [s for s in slots if isinstance(s, dict) and s.get("method") == THRESHOLD]
        if only is None and thresholds and THRESHOLD not in methods:
            methods = [*methods, THRESHOLD]  # a threshold slot is tried after the single ones
        failures: list[StrongroomError] = []
        failed: list[dict[str, Any]] = []
        for method in methods:
            mine = [s for s in slots if isinstance(s, dict) and s.get("method") == method]
            if not mine:
                continue
            master = Guarded(32)
            try:
                if method == PASSPHRASE:
                    self._unwrap_with_passphrase(vault_id, mine, master)
                elif method == THRESHOLD:
                    method = self._unwrap_with_threshold(vault_id, mine, master)
                else:
                    self._unwrap_with_sealer(method, mine, master)
            except StrongroomError as e:
                master.close()
                failures.append(e)
                if isinstance(e, AuthenticationFailed) and method == PASSPHRASE:
                    raise  # never go on to try more after a wrong passphrase
                failed.append(
                    {
                        "method": method,
                        "slots": [str(s.get("id")) for s in mine],
                        "error": type(e).__name__,
                        "reason": str(e),
                    }
                )
                continue
            except BaseException:
                master.close()
                raise
            self._report_failed_slots(failed, method)
            return master, method
        if failures:
            raise failures[-1]
        enrolled = sorted({str(s.get("method")) for s in slots if isinstance(s, dict)})
        raise AuthenticationFailed(
            f"the vault has no key slot for {', '.join(methods)}; enrolled: {', '.join(enrolled)}"
        )

    def _report_failed_slots(self, failed: list[dict[str, Any]], opened_by: str) -> None:
        """Remember, and warn about, the key slots that failed before `opened_by` worked.

        A TPM whose PCRs changed or an HSM that is gone must not go unnoticed just because a
        passphrase opened the vault anyway. `vault_status()["unlock_failures"]` keeps the
        list of the last unlock, for the audit record of that unlock.
        """
        self._unlock_failures = failed
        for f in failed:
            log.warning(
                "warning: vault key slot %s (%s) failed: %s; the vault was opened with %s",
                ", ".join(f["slots"]),
                f["method"],
                f["reason"],
                opened_by,
            )

    def _unwrap_with_passphrase(
        self, vault_id: str, slots: list[dict[str, Any]], master: Guarded
    ) -> None:
        def open_with(passphrase: str) -> None:
            for slot in slots:
                try:
                    with self._kek(passphrase, slot) as kek, master.write() as m:
                        sodium.open_into(
                            kek, _unb64(str(slot["wrapped"])), _slot_aad(vault_id, slot), m
                        )
                    return
                except IntegrityError:
                    continue
                except (KeyError, ValueError, TypeError):
                    raise SnapshotTampered(
                        f"{self.path} is damaged: a passphrase slot is malformed"
                    ) from None
            raise AuthenticationFailed("wrong vault passphrase")

        self.passphrase.verify(open_with)  # typed at the prompt: three tries

    def _unwrap_with_threshold(
        self, vault_id: str, slots: list[dict[str, Any]], master: Guarded
    ) -> str:
        """Try each threshold slot; return "threshold (names that opened)"."""
        last: StrongroomError | None = None
        for slot in slots:
            try:
                opened = self._open_threshold_slot(vault_id, slot, master)
                return f"{THRESHOLD} ({', '.join(opened)})"
            except StrongroomError as e:
                last = e
        assert last is not None
        raise last

    def _open_threshold_slot(
        self, vault_id: str, slot: Mapping[str, Any], master: Guarded
    ) -> list[str]:
        """Unseal members' shares until the policy is met, combine, unwrap the master key."""
        try:
            slot_id = str(slot["id"])
            sharing = dict(slot["sharing"])
            groups = [
                (int(g["threshold"]), [dict(m) for m in g["members"]]) for g in slot["groups"]
            ]
            group_threshold = int(sharing["group_threshold"])
            wrapped = _unb64(str(slot["wrapped"]))
            if not groups or not 1 <= group_threshold <= len(groups):
                raise ValueError("groups")
            for _, members in groups:
                for member in members:
                    int(member["group"]), int(member["index"]), str(member["method"])
        except (KeyError, ValueError, TypeError):
            raise SnapshotTampered(f"{self.path} is damaged: a threshold key slot is malformed")
        policy = str(slot.get("policy", ""))
        failed: dict[str, str] = {}
        opened: list[str] = []
        shares: list[threshold.MemberShare] = []
        got = [0] * len(groups)
        complete = 0
        try:
            for gi, (k, members) in enumerate(groups):
                for mi, member in enumerate(members):
                    left = len(members) - mi
                    if got[gi] >= k or got[gi] + left < k:
                        break  # done, or this group can no longer reach its threshold
                    name = str(member.get("name") or member.get("method"))
                    try:
                        value = self._unseal_share(vault_id, slot_id, member)
                    except StrongroomError as e:
                        failed[name] = str(e)
                        continue
                    shares.append(
                        threshold.MemberShare(int(member["group"]), int(member["index"]), value)
                    )
                    opened.append(name)
                    got[gi] += 1
                if got[gi] >= k:
                    complete += 1
                if complete >= group_threshold:
                    break
                if complete + (len(groups) - gi - 1) < group_threshold:
                    break  # too few groups left to reach the group threshold
            if complete < group_threshold:
                raise self._threshold_not_met(
                    slot_id, policy, groups, group_threshold, got, failed, opened
                )
            secret = threshold.combine(sharing, [k for k, _ in groups], shares)
        finally:
            for share in shares:
                scrub_bytes(share.value)
        try:
            with master.write() as m:
                sodium.open_into(memoryview(secret), wrapped, _slot_aad(vault_id, slot), m)
        except IntegrityError:
            raise SnapshotTampered(
                f"{self.path} is damaged: threshold key slot {slot_id} does not open with its "
                "own shares (it was modified)"
            ) from None
        finally:
            scrub_bytes(secret)
        return opened

    def _threshold_not_met(
        self,
        slot_id: str,
        policy: str,
        groups: list[tuple[int, list[dict[str, Any]]]],
        group_threshold: int,
        got: list[int],
        failed: dict[str, str],
        opened: list[str],
    ) -> ThresholdNotMet:
        missing = sorted(max(k - g, 0) for (k, _), g in zip(groups, got, strict=True))
        complete = sum(1 for m in missing if m == 0)
        needed = sum([m for m in missing if m > 0][: max(group_threshold - complete, 0)])
        tried = set(failed) | set(opened)
        untried = [
            str(m.get("name") or m.get("method"))
            for _, members in groups
            for m in members
            if str(m.get("name") or m.get("method")) not in tried
        ]
        parts = [
            f"the vault did not open: key slot {slot_id} needs {policy or 'a threshold'}",
            f"{len(opened)} succeeded, {needed} more needed",
        ]
        if failed:
            parts.append(
                "failed: " + "; ".join(f"{name} ({reason})" for name, reason in failed.items())
            )
        if opened:
            parts.append("opened: " + ", ".join(opened))
        if untried:
            parts.append("not tried: " + ", ".join(untried))
        return ThresholdNotMet(" - ".join(parts), failed, opened, needed)

    def _unseal_share(self, vault_id: str, slot_id: str, member: Mapping[str, Any]) -> bytes:
        """One member's share (bytes: the SLIP-39 library takes nothing else)."""
        method = str(member.get("method"))
        with Guarded(threshold.SECRET_BYTES) as out:
            if method == PASSPHRASE:
                name = str(member.get("name") or method)
                source = self._member_passphrase(name)
                try:
                    sealed = _unb64(str(member["sealed"]))
                    with self._kek(source.get(), member) as kek, out.write() as o:
                        sodium.open_into(kek, sealed, _share_aad(vault_id, slot_id, member), o)
                except IntegrityError:
                    raise AuthenticationFailed("wrong passphrase") from None
                except (KeyError, ValueError, TypeError):
                    raise IntegrityError("its share in the key slot is malformed") from None
            else:
                sealer = self.context.sealer(method)
                params = member.get("params")
                if not isinstance(params, Mapping):
                    raise IntegrityError("its share in the key slot is malformed")
                with out.write() as o:
                    sealer.unseal(params, o)
            with out.read() as o:
                return bytes(o)

    def _member_passphrase(self, name: str) -> SecretSource:
        """The vault's own passphrase source for the member called `passphrase`; else the
        member's entry in member_passphrases, or env:STRONGROOM_PASSPHRASE_<NAME>, prompt."""
        if name == PASSPHRASE:
            return self.passphrase
        refs = self.member_passphrases.get(name)
        if refs is None:
            env = "STRONGROOM_PASSPHRASE_" + "".join(c if c.isalnum() else "_" for c in name)
            refs = [f"env:{env.upper()}", "prompt"]
        return SecretSource(refs, f"Passphrase of {name}: ", self.passphrase.prompter)

    def _unwrap_with_sealer(
        self, method: str, slots: list[dict[str, Any]], master: Guarded
    ) -> None:
        sealer = self.context.sealer(method)
        last: StrongroomError | None = None
        for slot in slots:
            try:
                with master.write() as m:
                    sealer.unseal(slot["params"], m)
                return
            except StrongroomError as e:
                last = e
        assert last is not None
        raise last

    # -- snapshot I/O --------------------------------------------------------------------------
    def _read_file(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise BackendUnavailable(
                self.name, f"no vault at {self.path}; run `strongroom init` to create one"
            ) from None

    def _open_snapshot(self, snap: snapshot.Snapshot, master: Guarded) -> _Open:
        header = snap.header
        try:
            state = _Open(
                str(header["vault_id"]), int(header["generation"]), list(header["slots"]), master
            )
        except (KeyError, ValueError, TypeError):
            master.close()
            raise SnapshotTampered(f"{self.path} is damaged: its header is incomplete") from None
        try:
            state.records = self._decrypt_records(state, snap)
        except BaseException:
            state.close()
            raise
        return state

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

    def _write(
        self,
        state: _Open,
        records: Mapping[str, Record],
        slots: list[dict[str, Any]],
        generation: int,
    ) -> None:
        header = {
            "vault_id": state.vault_id,
            "generation": generation,
            "slots": slots,
            "payload": {"cipher": "xchacha20poly1305-ietf", "compression": "lz4-frame"},
        }
        doc = json.dumps(
            {"records": [r.to_json() for r in records.values()]}, separators=(",", ":")
        ).encode()
        compressed = lz4.frame.compress(doc)

        def seal(associated: bytes) -> bytes:
            with state.payload_key() as pk:
                return sodium.seal(pk, compressed, associated)

        version = 2 if any(s.get("method") in _NEW_KINDS for s in slots) else 1
        snapshot.write_atomic(self.path, snapshot.encode(header, seal, version))

    def _mutate(self, change: Callable[[dict[str, Record], list[dict[str, Any]]], Any]) -> Any:
        """Apply `change` to the newest on-disk state and commit it atomically."""
        with self._lock:
            state = self._require()
            with snapshot.locked(self.path):
                snapshot.remove_stale_temps(self.path)
                self._catch_up(state)
                records = dict(state.records)
                slots = [dict(s) for s in state.slots]
                result = change(records, slots)
                self._write(state, records, slots, state.generation + 1)
                state.records, state.slots = records, slots
                state.generation += 1
                return result

    def _catch_up(self, state: _Open) -> None:
        """Reload when another process committed since we read the snapshot."""
        on_disk = snapshot.read_generation(self.path)
        if on_disk is None or on_disk == (state.vault_id, state.generation):
            return
        snap = snapshot.decode(self._read_file(), str(self.path))
        if str(snap.header.get("vault_id")) != state.vault_id:
            raise SnapshotCorrupt(
                f"{self.path} was replaced by a different vault while this one was open; "
                "lock and unlock again"
            )
        state.records = self._decrypt_records(state, snap)
        state.slots = list(snap.header["slots"])
        state.generation = snap.generation

    # -- records -----------------------------------------------------------------------------
    def _record(self, info: KeyInfo) -> Record:
        state = self._require()
        rec = state.records.get(info.handle)
        if rec is None:
            with self._lock, snapshot.locked(self.path):
                self._catch_up(state)
            rec = state.records.get(info.handle)
            if rec is None:
                raise KeyNotFound(info.name, info.namespace)
        return rec

    def _material(self, info: KeyInfo) -> _Material:
        """`with self._material(info) as m:` the key's plaintext, for one operation."""
        rec = self._record(info)
        state = self._require()
        return _Material(state.pool.borrow(sodium.opened_length(rec.sealed)), rec)

    def _store(self, info: KeyInfo, material: Guarded, public: bytes | None) -> str:
        state = self._require()
        handle = os.urandom(16).hex()
        with material:
            with state.pool.borrow(1) as (rk, _), material.read() as m:
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
                )
                rec = replace(probe, sealed=sodium.seal(rk, m, probe.aad()))
        self._mutate(lambda records, slots: records.__setitem__(handle, rec))
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
        self._mutate(lambda records, slots: records.pop(info.handle, None))

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

    __slots__ = ("_loan", "_record")

    def __init__(
        self, loan: contextlib.AbstractContextManager[tuple[memoryview, memoryview]], record: Record
    ) -> None:
        self._loan, self._record = loan, record

    def __enter__(self) -> memoryview:
        record_key, out = self._loan.__enter__()
        try:
            sodium.open_into(record_key, self._record.sealed, self._record.aad(), out)
        except BaseException as e:
            self._loan.__exit__(type(e), e, e.__traceback__)
            raise
        return out

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._loan.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]


def _no_algorithm(algorithm: str | None) -> None:
    if algorithm is not None:
        raise InvalidArgument(f"the vault picks the cipher from the key type; got {algorithm!r}")


def _slot_aad(vault_id: str, slot: Mapping[str, Any]) -> bytes:
    fields = {k: v for k, v in slot.items() if k != "wrapped"}
    return ("strongroom-slot|" + vault_id + "|" + json.dumps(fields, sort_keys=True)).encode()


def _public_slot(slot: Mapping[str, Any]) -> dict[str, Any]:
    out = {"id": slot.get("id"), "method": slot.get("method"), "created": slot.get("created")}
    if slot.get("method") == PASSPHRASE:
        out["kdf"] = f"argon2id t={slot.get('ops')} m={int(slot.get('mem', 0)) // 1024}KiB"
    if slot.get("method") == THRESHOLD:
        out["policy"] = slot.get("policy")
        out["groups"] = [
            {
                "threshold": g.get("threshold"),
                "members": [
                    {"name": m.get("name"), "method": m.get("method")} for m in g.get("members", [])
                ],
            }
            for g in slot.get("groups", [])
        ]
    if slot.get("method") == RECOVERY:
        out["policy"] = _slot_summary(slot)
        out["identifier"] = slot.get("identifier")
        out["passphrase"] = bool(slot.get("passphrase"))
    return out


def _slot_summary(slot: Mapping[str, Any]) -> str:
    method = str(slot.get("method"))
    if method == THRESHOLD:
        return f"threshold: {slot.get('policy')}"
    if method == RECOVERY:
        shape = slot.get("groups") or []
        if len(shape) == 1:
            k, n = shape[0]
            return f"recovery shares: {k} of {n}"
        return f"recovery shares: {slot.get('group_threshold')} of {len(shape)} groups"
    return method


def _share_aad(vault_id: str, slot_id: str, member: Mapping[str, Any]) -> bytes:
    fields = {k: v for k, v in member.items() if k != "sealed"}
    return (f"strongroom-share|{vault_id}|{slot_id}|" + json.dumps(fields, sort_keys=True)).encode()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _capabilities() -> frozenset[Capability]:
    caps: set[Capability] = set()
    for t in KeyType:
        if t.is_fido:  # FIDO credentials exist only inside an authenticator
            continue
        if t is not KeyType.SEED:
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
