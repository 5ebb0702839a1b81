"""Key slots of the vault: the ways into the master key, and how each one opens.

Each slot in the snapshot header wraps the master key: a passphrase slot under an Argon2id
key-encryption key, a sealer slot under another backend's `Sealer`, a threshold slot under a
slot key split with SLIP-39 over its members, a recovery slot under the key that the
recovery shares encode. `KeySlots` is a mixin of `VaultBackend`: it reads the settings the
backend parsed and never writes the snapshot (backend.py and control.py do). A slot's
associated data binds it to its vault and to every field but the wrapped key, so a slot
cannot be moved between vaults or edited in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from strongroom import sodium, strictjson, threshold
from strongroom.backend import BackendContext
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    SnapshotTampered,
    StrongroomError,
    ThresholdNotMet,
)
from strongroom.memory import Guarded, scrub_bytes
from strongroom.secrets import SecretSource

from .state import _b64, _Open, _unb64

log = logging.getLogger("strongroom.vault")

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


class KeySlots:
    """Mixin of `VaultBackend`: making passphrase slots and opening the master key."""

    # Set by VaultBackend.__init__ (and Backend's).
    context: BackendContext
    path: Path
    methods: list[str]
    kdf_memory_kib: int
    kdf_iterations: int
    passphrase: SecretSource
    member_passphrases: dict[str, list[str]]
    _unlock_failures: list[dict[str, Any]]

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
            # Kept for `vault_status` of the still locked vault: a node that cannot open
            # the vault says which slots failed and why (docs/cluster.md).
            self._unlock_failures = failed
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
