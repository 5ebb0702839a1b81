"""Versions and lifecycle of a key (docs/lifecycle.md): rotate, list versions, retire old
versions (`min_decryption_version`) and destroy them (`trim`), disable and enable, scheduled
deletion and its purge, and re-encryption under the newest version (`rewrap`).

`KeyLifecycle` is a mixin of `Keystore`: every method is one audited keystore operation, as
the key API's are. A rotation makes the backend key first and the catalog row second, and
destroys the new backend key when the catalog refuses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import algorithms, lifecycle
from .backend import Backend, NewKey
from .catalog import Catalog, Fence, now
from .config import Config
from .errors import InvalidArgument, KeyNotFound
from .types import KeyInfo, KeyType, KeyVersion, Operation

ADOPTED = "adopted"
"""Catalog attribute of keys registered with `adopt`: delete forgets them, never destroys."""


class KeyLifecycle:
    """Mixin of `Keystore`: key versions, retirement, disabling and scheduled deletion."""

    # Set by Keystore.__init__.
    config: Config
    namespace: str
    catalog: Catalog

    if TYPE_CHECKING:  # Keystore's

        def _audited(
            self, op: str, key: str | None, payload: Any = None, **detail: Any
        ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...
        def _ready(self, backend: Backend) -> Backend: ...
        def backend(self, name: str) -> Backend: ...
        def _key(
            self, name: str, op: Operation | None, facts: dict[str, Any], version: int | None = None
        ) -> tuple[KeyInfo, Backend]: ...
        def _refuse_state(self, info: KeyInfo) -> None: ...
        def _choose_backend(
            self, key_type: KeyType, op: Operation, backend: str | None, key: str | None = None
        ) -> Backend: ...
        def _rsa_encrypt_attributes(self, b: Backend, info: KeyInfo) -> dict[str, str]: ...
        @staticmethod
        def _rsa_encrypt_algorithm(b: Backend, info: KeyInfo, algorithm: str | None) -> str: ...
        def delete(self, name: str) -> None: ...
        def _destroy(self, info: KeyInfo, fence: Fence | None = None) -> None: ...
        def _creating(self, backend: Backend) -> contextlib.AbstractContextManager[None]: ...

    def rotate(self, name: str, backend: str | None = None) -> KeyInfo:
        """Make a new version of a key (in `backend`, else the primary's) and make it primary.

        Older versions keep decrypting and verifying until min_decryption_version passes them.
        The new version has the key's type, usage and exportable flag. Backend key first,
        then the catalog; the new backend key is destroyed if the catalog refuses it.
        """
        with self._audited("rotate", name) as facts:
            info = self.catalog.get(self.namespace, name)
            if info.disabled or info.delete_after is not None:
                self._refuse_state(info)
            b = self._choose_backend(info.type, Operation.GENERATE, backend or info.backend)
            facts["backend"] = b.name
            # A vault key and its catalog rows commit together; a device key comes first.
            with self._creating(b):
                if b.transactional:
                    # Read again inside the write transaction, which other writers (other
                    # processes, other nodes on a shared store) queue behind: concurrent
                    # rotations then take turns, each making the next version, instead of
                    # all but one failing on a version already taken.
                    info = self.catalog.get(self.namespace, name)
                    if info.disabled or info.delete_after is not None:
                        self._refuse_state(info)
                new_version = info.version + 1
                if new_version > lifecycle.MAX_VERSION:
                    raise InvalidArgument(f"key {name!r} has run out of versions")
                new = replace(
                    info,
                    backend=b.name,
                    handle="",
                    version=new_version,
                    created=now(),
                    attributes={},
                )
                attributes = self._rsa_encrypt_attributes(b, new)
                handle = b.generate(NewKey(new))
                try:
                    self.catalog.add_version(
                        info.namespace,
                        name,
                        KeyVersion(new_version, b.name, new.created or now(), handle, attributes),
                    )
                except BaseException:
                    if not b.transactional:  # a transaction rolls the vault's row back
                        with contextlib.suppress(Exception):
                            b.delete(replace(new, handle=handle))
                    raise
                # Read inside the transaction (vault keys): the version this rotation made.
                # Read after it, another node's rotation may have committed in between and
                # the caller would be told of a version it did not make.
                made = self.catalog.get(self.namespace, name)
            facts["version"] = new_version
            return made

    def versions(self, name: str) -> list[KeyVersion]:
        """Every version of a key that still exists, oldest first; the last is primary."""
        return self.catalog.versions(self.namespace, name)

    def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        """Retire versions below `version`: they no longer decrypt or verify (reversible, as
        in Vault's transit, until `trim` destroys them)."""
        with self._audited("key_config", name, min_decryption_version=version) as facts:
            info = self.catalog.get(self.namespace, name)
            facts["backend"] = info.backend
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise InvalidArgument("min_decryption_version is a whole number from 1")
            if version > info.version:
                raise InvalidArgument(
                    f"min_decryption_version {version} is above the newest version of key "
                    f"{name!r} ({info.version})"
                )
            oldest = self.catalog.versions(self.namespace, name)[0].version
            if version < oldest:
                raise InvalidArgument(
                    f"versions below {oldest} of key {name!r} were trimmed and cannot come back"
                )
            return self.catalog.set_state(self.namespace, name, min_decryption_version=version)

    def trim(self, name: str) -> list[int]:
        """Destroy the backend keys of versions below min_decryption_version, for good.

        Returns the versions destroyed. Data made with them can never be decrypted again.
        """
        with self._audited("trim", name) as facts:
            info = self.catalog.get(self.namespace, name)
            facts["backend"] = info.backend
            gone = []
            for v in self.catalog.versions(self.namespace, name):
                if v.version >= info.min_decryption_version:
                    break
                if v.attributes.get(ADOPTED) == "true":
                    self.catalog.remove_version(self.namespace, name, v.version)
                else:
                    b = self._ready(self.backend(v.backend))
                    scope = b.transactional and self.catalog.transaction()
                    with scope or contextlib.nullcontext():
                        b.delete(
                            replace(info, backend=v.backend, handle=v.handle, version=v.version)
                        )
                        self.catalog.remove_version(self.namespace, name, v.version)
                gone.append(v.version)
            facts["versions"] = gone
            return gone

    def disable(self, name: str) -> KeyInfo:
        """Refuse every operation with the key until `enable`; nothing is destroyed."""
        with self._audited("disable", name) as facts:
            facts["backend"] = self.catalog.get(self.namespace, name).backend
            return self.catalog.set_state(self.namespace, name, disabled=True)

    def enable(self, name: str) -> KeyInfo:
        """Undo `disable`."""
        with self._audited("enable", name) as facts:
            facts["backend"] = self.catalog.get(self.namespace, name).backend
            return self.catalog.set_state(self.namespace, name, disabled=False)

    def schedule_deletion(self, name: str, wait: timedelta | None = None) -> KeyInfo | None:
        """Schedule the key's destruction after `wait` (default: the config's deletion_wait).

        Until then the key does no work and `cancel_deletion` brings it back. Once due, the
        deletion is carried out by `purge_due` (`strongroom key purge`) or by the next
        attempt to use the key. A zero wait destroys the key at once, as `delete` does, and
        returns None.
        """
        wait = self.config.deletion_wait if wait is None else wait
        if not isinstance(wait, timedelta) or wait < timedelta(0):
            raise InvalidArgument("a waiting period is a timedelta of zero or more")
        if not wait:
            self.delete(name)
            return None
        with self._audited("schedule_deletion", name, wait_seconds=int(wait.total_seconds())) as f:
            info = self.catalog.get(self.namespace, name)
            f["backend"] = info.backend
            if info.delete_after is not None:
                raise InvalidArgument(
                    f"key {name!r} is already scheduled for deletion at "
                    f"{info.delete_after.isoformat()}"
                )
            return self.catalog.set_state(self.namespace, name, delete_after=now() + wait)

    def cancel_deletion(self, name: str) -> KeyInfo:
        """Cancel a scheduled deletion; the key works again (unless it is disabled)."""
        with self._audited("cancel_deletion", name) as facts:
            info = self.catalog.get(self.namespace, name)
            facts["backend"] = info.backend
            if info.delete_after is None:
                raise InvalidArgument(f"key {name!r} is not scheduled for deletion")
            if info.delete_after <= now():
                self._destroy_due(info)
                raise KeyNotFound(name, self.namespace)
            return self.catalog.set_state(self.namespace, name, delete_after=None)

    def purge_due(
        self, fence: Fence | None = None, stop: Callable[[], bool] | None = None
    ) -> list[KeyInfo]:
        """Carry out every scheduled deletion that is due (all namespaces); return those keys.

        For a singleton job (core/store_lease.py): `fence(store)` starts each deletion's
        transaction and raises to refuse it (the error ends the run), and `stop()`, asked
        before each deletion, ends the run early when it says so."""
        done = []
        for info in self.catalog.due_for_deletion(now()):
            if stop is not None and stop():
                break
            self._destroy_due(info, fence)
            done.append(info)
        return done

    def _destroy_due(self, info: KeyInfo, fence: Fence | None = None) -> None:
        """Carry out a scheduled deletion that is due, as its own audit event."""
        with self._audited("delete", info.name, scheduled="yes") as facts:
            facts["backend"] = info.backend
            self._destroy(info, fence)

    def rewrap(
        self, name: str, ciphertext: bytes, aad: bytes = b"", algorithm: str | None = None
    ) -> bytes:
        """Re-encrypt an enveloped ciphertext under the key's primary version.

        The plaintext passes through this process's memory (a Python bytes object, as every
        `decrypt` result does) and is never returned; see docs/lifecycle.md.
        """
        with self._audited("rewrap", name, size=len(ciphertext)) as facts:
            version, body = lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, ciphertext, "ciphertext")
            facts["from_version"] = version
            old, ob = self._key(name, Operation.DECRYPT, facts, version)
            old_algorithm = algorithm
            if old.type.is_rsa:
                if aad:
                    raise InvalidArgument("RSA-OAEP takes no associated data")
                old_algorithm = algorithm or old.attributes.get(algorithms.RSA_ENCRYPT_ATTRIBUTE)
            plain = ob.decrypt(old, bytes(body), bytes(aad), old_algorithm)
            info, b = self._key(name, Operation.ENCRYPT, facts)
            facts["backend"] = info.backend
            if info.type.is_rsa:  # the new version's own variant: its backend may differ
                oaep = self._rsa_encrypt_algorithm(b, info, algorithm)
                ct = algorithms.rsa_encrypt(b.public_key(info), plain, oaep)
            else:
                ct = b.encrypt(info, plain, bytes(aad), algorithm)
            del plain
            return lifecycle.pack(lifecycle.CIPHERTEXT_MAGIC, info.version, ct)
