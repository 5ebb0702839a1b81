"""The Keystore: resolves names through the catalog, checks usage, routes, audits.

Key versions and lifecycle (keystore_lifecycle.py), the seed procedures
(keystore_seeds.py), certificates (keystore_certs.py), the key API's operations other than
`sign` (keystore_operations.py) and the choice of a new key's backend
(keystore_placement.py) are mixins of `Keystore` in modules of their own; `_Audited` is in
keystore_audited.py. The audited vault commands and `vault_restore` (keystore_vault.py) and
the audit checkpoint signer (keystore_signer.py) take a keystore through a Protocol of what
they use.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from . import algorithms, lifecycle, pkey
from .api import BackendStatus
from .audit import Audit, CheckpointSigner
from .backend import (
    Backend,
    Capability,
    DeviceFactory,
    ExistingKey,
    MonotonicCounter,
    NewKey,
    PresencePrompt,
    Sealer,
    VaultControl,
    no_presence_prompt,
)
from .catalog import Catalog, Fence, now
from .config import VAULT_TYPE, Config, check_namespace
from .discovery import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP  # still importable from here
from .discovery import backend_classes, build_backends, harden_process, verify_attestation
from .errors import (
    BackendUnavailable,
    ConfigError,
    InvalidArgument,
    KeyDisabled,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    StorageError,
    StrongroomError,
    UnsupportedOperation,
    VersionRetired,
)
from .keystore_audited import _Audited, _AuditedAhead
from .keystore_certs import KeyCertificates
from .keystore_lifecycle import ADOPTED, KeyLifecycle
from .keystore_operations import KeyOperations
from .keystore_placement import KeyPlacement
from .keystore_repair import Orphan, device_creation_lock, find_orphans, remove_orphans
from .keystore_seeds import KeySeeds
from .keystore_signer import _KeystoreSigner
from .keystore_vault import _AuditedVault, _failed_slots, _unlocked, _vault_control, vault_restore
from .secrets import Prompter, terminal_prompter
from .store import open_store
from .store_chain import open_chain
from .types import OPERATION_USAGE, KeyInfo, KeyType, KeyVersion, Operation, Usage
from .vaultstore import StoreVaultRecords

logger = logging.getLogger("strongroom")


class Keystore(KeyLifecycle, KeySeeds, KeyCertificates, KeyPlacement, KeyOperations):
    """One key API over every configured backend. Use `strongroom.open()` to make one."""

    def __init__(
        self,
        config: Config,
        *,
        actor: str | None = None,
        prompter: Prompter | None = None,
        presence: PresencePrompt | None = None,
        device_factories: Mapping[str, DeviceFactory] | None = None,
    ) -> None:
        """`device_factories` maps a backend name to the device it uses instead of the one
        its config names (`BackendContext.device_factory`): the test suite's software
        authenticator. Only code passes it, so no config can reach a test device."""
        self.config = config
        self.namespace = config.namespace
        self._prompter = prompter or terminal_prompter
        self._presence = presence or no_presence_prompt
        self._device_factories = dict(device_factories or {})
        for name in self._device_factories:
            if name not in config.backends:
                raise InvalidArgument(
                    f"device_factories names {name!r}, which is not a configured backend"
                )
        self._lock = threading.RLock()
        self._opened: set[str] = set()
        self._closed = False
        self._audit_prefix = ""
        self._is_view = False
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StorageError(
                f"cannot make the data directory {config.data_dir}: {e.strerror or e}"
            ) from None
        # One transactional store (docs/storage.md): the catalog's database, which holds the
        # vault's rows too; SQLite in the data_dir, or PostgreSQL (docs/cluster.md).
        self.catalog = Catalog(open_store(config.store_url, config.data_dir))
        try:
            self._backends, self._unusable = build_backends(
                config,
                self._prompter,
                self._presence,
                self._sealer,
                self._device_factories,
                lambda name: StoreVaultRecords(self.catalog, name),
                self.catalog.store_id,
                self._counter,
            )
        except BaseException:
            self.catalog.close()
            raise
        harden_process(config.core_dumps)
        chain = None
        try:
            if config.store_url is not None and config.audit == "file":
                # A shared store: one chain in the database for every node (docs/audit.md).
                chain = open_chain(config.store_url)
            self.audit = Audit(
                config.audit,
                config.data_dir / "audit.jsonl",
                actor,
                checkpoint_every=config.audit_checkpoint_every,
                chain=chain,
            )
        except BaseException:  # no log, no keystore: nothing may run unrecorded
            if chain is not None:
                chain.close()
            self.catalog.close()
            raise
        if config.audit == "file":
            self.audit.signer = _KeystoreSigner(
                self, config.audit_signing_key, config.audit_signing_backend
            )

    # -- construction ------------------------------------------------------------------------
    def _sealer(self, name: str) -> Sealer:
        """A backend's `BackendContext.sealer`: the configured backend `name`, opened, when
        it can seal secrets (the vault's key slots)."""
        backend = self.backend(name)
        if not isinstance(backend, Sealer):
            raise UnsupportedOperation(name, "seal", None, "this backend cannot seal secrets")
        self._ready(backend)
        return backend

    def _counter(self, name: str) -> MonotonicCounter:
        """A backend's `BackendContext.counter`: the configured backend `name`, opened, when
        it keeps monotonic counters (the vault's `rollback_counter`)."""
        backend = self.backend(name)
        if not isinstance(backend, MonotonicCounter):
            raise UnsupportedOperation(name, "counter", None, "this backend keeps no counters")
        self._ready(backend)
        return backend

    def __enter__(self) -> Keystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every backend (the vault locks and wipes its keys) and the catalog."""
        if self._is_view:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            errors: list[BaseException] = []
            if self.audit.pending:  # sign the tail while the signing key's backend is open
                try:
                    self.audit.checkpoint(force=False, create=False)
                except Exception as e:  # the records are written; only the signature is missing
                    logger.warning("audit checkpoint at close failed: %s: %s", type(e).__name__, e)
            for backend in self._backends.values():
                try:
                    backend.close()
                except Exception as e:  # close the others regardless
                    errors.append(e)
            self.catalog.close()
            self.audit.close()
            if errors:
                raise errors[0]

    # -- backends ----------------------------------------------------------------------------
    def backend(self, name: str) -> Backend:
        """The configured backend called `name`."""
        if name in self._backends:
            return self._backends[name]
        if name in self._unusable:
            raise BackendUnavailable(name, self._unusable[name][1])
        raise InvalidArgument(
            f"no backend named {name!r} is configured; configured: {', '.join(self.config.order)}"
        )

    @property
    def vault(self) -> Backend:
        """The software vault backend (always configured)."""
        for name, bcfg in self.config.backends.items():
            if bcfg.type == VAULT_TYPE:
                return self.backend(name)
        raise BackendUnavailable(VAULT_TYPE, "no vault backend is configured")  # pragma: no cover

    def backends(self) -> list[BackendStatus]:
        """Status, reason and capabilities of every configured backend, in `order`."""
        out = []
        names = list(self.config.order) + [
            n for n in self.config.backends if n not in self.config.order
        ]
        for name in names:
            if name in self._unusable:
                btype, reason = self._unusable[name]
                out.append(BackendStatus(name, btype, False, reason, frozenset(), {}))
                continue
            backend = self._backends[name]
            why = backend.availability()
            caps: frozenset[Capability] = backend.capabilities() if why is None else frozenset()
            try:
                details = backend.status()
            except StrongroomError as e:
                details = {"error": str(e)}
            out.append(BackendStatus(name, backend.type_name, why is None, why, caps, details))
        return out

    def _ready(self, backend: Backend) -> Backend:
        if backend.name in self._opened:
            return backend
        with self._lock:
            if self._closed:
                raise StrongroomError("the keystore is closed")
            if backend.name not in self._opened:
                reason = backend.availability()
                if reason is not None:
                    raise BackendUnavailable(backend.name, reason)
                vault = backend if isinstance(backend, VaultControl) else None
                was_unlocked = vault is not None and _unlocked(vault)
                backend.open()
                self._opened.add(backend.name)
                if vault is not None and not was_unlocked and (failed := _failed_slots(vault)):
                    # an unlock on first use has no record of its own; one whose hardware
                    # slot failed gets one, so the failure is in the log
                    self.audit.record(
                        "vault_unlock", None, "ok", backend.name, None, failed_slots=failed
                    )
        return backend

    # -- helpers -------------------------------------------------------------------------------
    def _audited(self, op: str, key: str | None, payload: Any = None, **detail: Any) -> _Audited:
        return _Audited(self.audit, op, self._audit_key(key), detail, payload)

    def _audit_key(self, key: str | None) -> str | None:
        """How a key is named in the audit log: `namespace/name` in a namespace view."""
        return self._audit_prefix + key if self._audit_prefix and key is not None else key

    def in_namespace(self, namespace: str) -> Keystore:
        """This keystore as seen from `namespace`: the same backends, catalog and audit log,
        keys looked up and created in `namespace`, audited as `namespace/name`.

        The view shares everything with this keystore; closing it does nothing (close this
        one). The custody service gives each tenant one."""
        check_namespace(namespace)
        view = copy.copy(self)
        view.namespace = namespace
        view._audit_prefix = "" if namespace == self.config.namespace else namespace + "/"
        view._is_view = True
        return view

    def _key(
        self, name: str, op: Operation | None, facts: dict[str, Any], version: int | None = None
    ) -> tuple[KeyInfo, Backend]:
        info = self.catalog.get(self.namespace, name)
        facts["backend"] = info.backend
        if op is not None:
            if info.disabled or info.delete_after is not None:
                self._refuse_state(info)
            needed = OPERATION_USAGE.get(op)
            if needed is not None and needed not in info.usage:
                allowed = ", ".join(sorted(u.value for u in info.usage))
                raise PolicyViolation(
                    f"key {name!r} may not be used to {op.value}; its usages: {allowed}"
                )
        if version is not None and version != info.version:
            info = self._version_info(info, version)
            facts["backend"] = info.backend
            facts["version"] = version
        b = self._backends.get(info.backend)
        if b is not None and b.name in self._opened:
            return info, b  # the hot path: a configured backend that is open already
        return info, self._ready(self.backend(info.backend))

    def _refuse_state(self, info: KeyInfo) -> None:
        """A disabled key, or one scheduled for deletion, does no work; a due one is destroyed."""
        if info.delete_after is not None:
            if info.delete_after <= now():
                self._destroy_due(info)
                raise KeyNotFound(info.name, info.namespace)
            raise KeyDisabled(
                f"key {info.name!r} is scheduled for deletion at {info.delete_after.isoformat()}; "
                "cancel with `key delete --cancel`"
            )
        raise KeyDisabled(f"key {info.name!r} is disabled; `key enable` turns it back on")

    def _version_info(self, info: KeyInfo, version: int) -> KeyInfo:
        """The catalog entry of an older version of a key (for decrypt and verify)."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidArgument("a key version is a whole number from 1")
        if version > info.version:
            raise VersionRetired(
                f"key {info.name!r} has no version {version}; its newest is {info.version}"
            )
        if version < info.min_decryption_version:
            raise VersionRetired(
                f"version {version} of key {info.name!r} is retired: its min_decryption_version "
                f"is {info.min_decryption_version}"
            )
        for v in self.catalog.versions(info.namespace, info.name):
            if v.version == version:
                return replace(
                    info,
                    backend=v.backend,
                    handle=v.handle,
                    version=v.version,
                    created=v.created,
                    attributes=v.attributes,
                )
        raise VersionRetired(f"version {version} of key {info.name!r} has been deleted")

    def _skip_optional(
        self, name: str, reason: str, op: Operation, key_type: KeyType, key: str | None
    ) -> None:
        """Say that an optional backend was passed over: a warning and an audit record."""
        logger.warning(
            "warning: optional backend %r is unavailable and was skipped for %s %s key %r: %s",
            name,
            op.value,
            key_type.value,
            key,
            reason,
        )
        self.audit.record(
            "backend_skipped",
            self._audit_key(key),
            "skipped",
            name,
            None,
            during=op.value,
            type=key_type.value,
            reason=reason,
        )

    def _create(self, info: KeyInfo, backend: Backend, make: Any) -> KeyInfo:
        """The backend key and its catalog row. A transactional backend (the vault) writes
        its row in the same transaction as the catalog's: both commit, or neither. Any
        other makes its key first, then the row is written; if the row fails the key is
        undone, and a key left by a crash in between is what `doctor` reports."""
        with self._creating(backend):
            return self._create_now(info, backend, make)

    def _creating(self, backend: Backend) -> contextlib.AbstractContextManager[None]:
        """The scope a new key and its catalog rows are made in: one transaction for a
        transactional backend; for a device, the shared lock that keeps `doctor --repair`
        from taking a key whose row is not written yet (core/keystore_repair.py)."""
        if backend.transactional:
            return self.catalog.transaction()
        return device_creation_lock(self.config.data_dir, exclusive=False)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def _all_backends(self) -> Mapping[str, Backend]:
        return self._backends

    def orphans(self) -> tuple[list[Orphan], list[str]]:
        """Keys a device backend created for the catalog that no catalog row names (left by
        a crash between the two), and the backends that could not be searched, with why."""
        return find_orphans(self)

    def repair_orphans(self, confirm: Callable[[Orphan], bool]) -> list[Orphan]:
        """Destroy the orphans `confirm(orphan)` agrees to; returns those removed."""
        return remove_orphans(self, confirm)

    def _transactional(self, backend: str) -> bool:
        found = self._backends.get(backend)
        return found is not None and found.transactional

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """`with ks.batch():` every key change inside commits in one transaction, or none
        does (an exception out of the block rolls all of them back). Vault keys and catalog
        rows only: a key made in a device cannot be rolled back, so it is made at once and
        its row joins the batch (`doctor` finds a key whose row never committed)."""
        return self.catalog.transaction()

    def _create_now(self, info: KeyInfo, backend: Backend, make: Any) -> KeyInfo:
        if self.catalog.exists(info.namespace, info.name):
            raise KeyExists(info.name, info.namespace)
        handle = make(NewKey(info))
        created = replace(info, handle=handle)
        try:
            self.catalog.add(created)
        except BaseException:
            with contextlib.suppress(Exception):
                backend.delete(created)
            raise
        return created

    # -- the key API ---------------------------------------------------------------------------
    def adopt(
        self,
        name: str,
        backend: str,
        ref: dict[str, str],
        key_type: KeyType | str | None = None,
        usage: Any = None,
    ) -> KeyInfo:
        """Register a key that already exists in `backend`, found by `ref`, without copying it.

        The backend reports the key's type and what it may do; `key_type`, if given, must
        match, and `usage` may only narrow it. Deleting the key later removes the catalog
        row and leaves the backend's key alone.
        """
        with self._audited("adopt", name, ref=sorted(ref)) as facts:
            facts["backend"] = backend
            b = self._ready(self.backend(backend))
            if self.catalog.exists(self.namespace, name):
                raise KeyExists(name, self.namespace)
            found: ExistingKey = b.adopt(dict(ref))
            if key_type is not None and KeyType.parse(key_type) is not found.type:
                raise InvalidArgument(
                    f"the key in {backend!r} is a {found.type.value} key, not {key_type}"
                )
            wanted = Usage.parse_set(usage)
            if wanted is not None and not wanted <= found.usage:
                extra = ", ".join(sorted(u.value for u in wanted - found.usage))
                raise PolicyViolation(f"the key in {backend!r} does not allow usage {extra}")
            # Registered already, under any name, namespace or version (an older version's
            # handle counts: adopting it would hand a rotated-out key to a second owner).
            # Only a registration in the caller's own namespace is named.
            for other in self.catalog.list(None):
                if other.backend == b.name and other.handle == found.handle:
                    if other.namespace == self.namespace:
                        raise InvalidArgument(f"that key is already registered as {other.name!r}")
                    break
            if found.handle in self.catalog.handles(b.name):
                raise InvalidArgument("that key is already registered (in another namespace)")
            usages = found.usage & found.type.allowed_usage if wanted is None else wanted
            info = self._new_info(name, found.type, usages, found.exportable, b.name)
            info = replace(
                info,
                handle=found.handle,
                attributes={
                    **found.attributes,
                    **self._rsa_encrypt_attributes(b, info),
                    ADOPTED: "true",
                },
            )
            self.catalog.add(info)
            return info

    def private_key(self, name: str) -> pkey.PrivateKey:
        """The key as the matching `cryptography` private key type (ec, rsa or ed25519).

        Its `sign` and `decrypt` are this keystore's, so they are usage-checked and audited
        like any call; its private bytes cannot be read (docs/x509.md).
        """
        return pkey.private_key(self, name)

    def sign(
        self,
        name: str,
        data: bytes,
        algorithm: str | None = None,
        *,
        envelope: bool = False,
        prehashed: bool = False,
    ) -> bytes:
        """Sign (or, for an HMAC key, MAC) `data` with the primary version.

        With `envelope=True` the signature carries the key version (docs/lifecycle.md), so
        `verify(..., envelope=True)` checks it with that version after a rotation. With
        `prehashed=True`, `data` is the message's SHA-256 digest (SHA-384 for P-384) and the
        signature is the one the whole message would get: ECDSA and RSA keys only. An RSA
        key's `algorithm="pkcs1v15-raw"` (prehashed only) signs `data` as the DigestInfo
        the caller built, in any hash (`algorithms.RSA_PKCS1V15_RAW`).
        """
        # The busiest operation: audited inline rather than through _Audited (same record).
        facts: dict[str, Any] = {}
        key = self._audit_key(name)
        detail: dict[str, Any] = {"size": len(data)}
        if prehashed:
            detail["prehashed"] = True
        try:
            info, b = self._key(name, Operation.SIGN, facts)
            algorithms.check_sign_algorithm(info.type, algorithm, prehashed=prehashed)
            if prehashed:
                algorithms.check_prehashed(info.type, data, algorithm)
                sig = b.sign_digest(info, bytes(data), algorithm)
            else:
                sig = b.sign(info, bytes(data), algorithm)
            if envelope:
                sig = lifecycle.pack(lifecycle.SIGNATURE_MAGIC, info.version, sig)
        except BaseException as e:
            self.audit.record("sign", key, type(e).__name__, facts.get("backend"), data, **detail)
            raise
        self.audit.record("sign", key, "ok", facts["backend"], data, **detail)
        return sig

    def delete(self, name: str) -> None:
        """Destroy the backend key (every version of it) now, then remove the catalog rows.

        In this order a failure never leaves a key that the catalog calls deleted: at worst
        a row whose key is gone, and deleting again finishes the job. A key registered with
        `adopt` is only removed from the catalog; the backend keeps it. For a deletion after
        a waiting period, see `schedule_deletion`.
        """
        with self._audited("delete", name) as facts:
            info = self.catalog.get(self.namespace, name)
            facts["backend"] = info.backend
            self._destroy(info)

    def _destroy(self, info: KeyInfo, fence: Fence | None = None) -> None:
        """Destroy every version's backend key (adopted ones are only forgotten), then rows.
        When every version is in a transactional backend, all of it is one transaction.
        `fence` (core/store_lease.py) starts that transaction; for device keys, only the
        transaction that marks the key, before any device key is destroyed."""
        versions = self.catalog.versions(info.namespace, info.name)

        def scope() -> contextlib.AbstractContextManager[None]:
            return self.catalog.transaction() if fence is None else self.catalog.fenced(fence)

        if all(
            v.attributes.get(ADOPTED) == "true" or self._transactional(v.backend) for v in versions
        ):
            with scope():
                self._destroy_versions(info, versions)
        else:
            # A device key cannot be destroyed in the catalog's transaction. Mark the key due
            # for deletion first: if the process dies between destroying its device keys and
            # removing its rows, the key is refused from then on (any use, or a rotation,
            # finishes the deletion and answers "no key named"), never served half-deleted.
            with scope():
                self.catalog.set_state(info.namespace, info.name, delete_after=now())
            self._destroy_versions(info, versions)

    def _destroy_versions(self, info: KeyInfo, versions: list[KeyVersion]) -> None:
        if not versions:  # pragma: no cover - a schema 2 catalog has a row per version
            versions = [KeyVersion(info.version, info.backend, now(), info.handle, info.attributes)]
        for v in versions:
            if v.attributes.get(ADOPTED) == "true":
                continue
            b = self._ready(self.backend(v.backend))
            b.delete(replace(info, backend=v.backend, handle=v.handle, version=v.version))
        self.catalog.remove(info.namespace, info.name)

    # -- envelope encryption (docs/envelope.md) ------------------------------------------------
    def encrypt_stream(
        self,
        name: str,
        src: BinaryIO,
        dst: BinaryIO,
        *,
        algorithm: str | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Envelope-encrypt the stream `src` into `dst`: a fresh data key wrapped by key `name`,
        the data in AES-256-GCM STREAM chunks. Returns the header (no secrets)."""
        from . import envelope

        with self._audited("envelope_encrypt", name) as facts:
            facts["backend"] = self.catalog.get(self.namespace, name).backend
            header = envelope.encrypt_stream(
                self,
                name,
                src,
                dst,
                algorithm=algorithm,
                chunk_size=chunk_size or envelope.DEFAULT_CHUNK,
                progress=progress,
            )
            return header.to_dict()

    def decrypt_stream(
        self, src: BinaryIO, dst: BinaryIO, *, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """Decrypt what `encrypt_stream` made; the header names the key and its version."""
        from . import envelope

        with self._audited("envelope_decrypt", None) as facts:
            header = envelope.decrypt_stream(self, src, dst, progress=progress)
            facts["backend"] = self.catalog.get(self.namespace, header.key).backend
            return header.to_dict()

    def vault_control(self) -> VaultControl:
        """The vault's own commands (init, unlock, enroll, backup, ...), audited."""
        return cast(VaultControl, _AuditedVault(self, _vault_control(self), self.vault.name))

    def audited(
        self, operation: str, key: str | None = None, *, write_ahead: bool = False, **detail: Any
    ) -> _Audited:
        """Context manager that records one audit event for an operation done outside the API.

        With `write_ahead` (an operation that changes state, e.g. the service's tenant and
        policy changes) a `started` record is written before it acts, so an unwritable log
        refuses it before anything changed."""
        if write_ahead:
            return _AuditedAhead(self.audit, operation, self._audit_key(key), detail)
        return self._audited(operation, key, **detail)

    def audit_checkpoint(self) -> dict[str, Any] | None:
        """Append a signed checkpoint to the audit log now (opening the signing key's backend,
        and making the key on first use); None when the audit sink is not `file`."""
        with self._lock:
            if self._closed:
                raise StrongroomError("the keystore is closed")
        return self.audit.checkpoint(force=True)

    def audit_public_key(self, create: bool = False) -> PublicKeyTypes | None:
        """The public key that signs this keystore's audit checkpoints (None if not made yet)."""
        signer: CheckpointSigner | None = self.audit.signer
        if signer is None:
            signer = _KeystoreSigner(
                self, self.config.audit_signing_key, self.config.audit_signing_backend
            )
        return signer.public_key(create)


__all__ = [
    "BackendStatus",
    "ConfigError",
    "Keystore",
    "backend_classes",
    "vault_restore",
    "verify_attestation",
]
