"""The keystore's signer of audit checkpoints: a key of the reserved namespace `_audit`,
made on first use.

`_KeystoreSigner` implements `audit.CheckpointSigner`; the keystore hands it to the audit
writer (`Audit.signer`). It makes, finds and uses its key through keystore internals,
declared here as the `SignerHost` Protocol, so neither this module nor the audit package
imports the keystore (tests/test_layers.py checks that).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .audit import CheckpointSignature
from .audit.log import AUDIT_NAMESPACE, fingerprint
from .backend import Backend
from .catalog import Catalog, now
from .errors import KeyExists, KeyNotFound
from .types import KeyInfo, KeyType, Operation, Usage


class SignerHost(Protocol):
    """What `_KeystoreSigner` uses of a `Keystore`."""

    catalog: Catalog
    _opened: set[str]

    @property
    def vault(self) -> Backend: ...
    def backend(self, name: str) -> Backend: ...
    def _ready(self, backend: Backend) -> Backend: ...
    def _create(self, info: KeyInfo, backend: Backend, make: Any) -> KeyInfo: ...


class _KeystoreSigner:
    """Signs audit checkpoints (`audit.CheckpointSigner`) with the key `name` in namespace
    `_audit`, made on first use.

    The key is generated in `backend` (default: the vault) as ed25519, or ecdsa-p256 when
    that backend cannot make ed25519. Used only when its backend is already open, unless
    forced (an explicit checkpoint), so a checkpoint never prompts for a passphrase. It
    lives here, not in the audit modules, because it works through the keystore's private
    `_ready`, `_create` and `_opened`.
    """

    def __init__(self, ks: SignerHost, name: str, backend: str | None) -> None:
        self._ks = ks
        self.name = name
        self._backend_name = backend
        self._fp: str | None = None

    def _backend(self) -> Backend:
        ks = self._ks
        return ks.backend(self._backend_name) if self._backend_name else ks.vault

    def ready(self, force: bool) -> bool:
        """Whether a checkpoint can be signed now without opening (unlocking) a backend: it
        must be open in this keystore and not locked since (`vault lock` wipes the vault but
        its next use would unlock it again, which a checkpoint must not do)."""
        if force:
            return True
        b = self._backend()
        if b.name not in self._ks._opened:
            return False
        try:
            return bool(b.status().get("unlocked", True))
        except Exception:  # a backend that cannot say: do not touch it now
            return False

    def info(self, create: bool) -> KeyInfo | None:
        ks = self._ks
        try:
            return ks.catalog.get(AUDIT_NAMESPACE, self.name)
        except KeyNotFound:
            if not create:
                return None
        b = ks._ready(self._backend())
        ktype = KeyType.ED25519
        if not b.supports(ktype, Operation.GENERATE):
            ktype = KeyType.ECDSA_P256
        info = KeyInfo(
            name=self.name,
            type=ktype,
            backend=b.name,
            usage=frozenset({Usage.SIGN, Usage.VERIFY}),
            exportable=False,
            namespace=AUDIT_NAMESPACE,
            created=now(),
        )
        try:
            made = ks._create(info, b, b.generate)
        except KeyExists:
            return ks.catalog.get(AUDIT_NAMESPACE, self.name)
        return replace(made)

    def public_key(self, create: bool = False) -> PublicKeyTypes | None:
        info = self.info(create)
        if info is None:
            return None
        b = self._ks._ready(self._ks.backend(info.backend))
        public: PublicKeyTypes = b.public_key(info)
        return public

    def sign(self, message: bytes) -> CheckpointSignature:
        ks = self._ks
        info = self.info(True)
        assert info is not None  # made on first use
        b = ks._ready(ks.backend(info.backend))
        if self._fp is None:
            self._fp = fingerprint(b.public_key(info))
        sig = b.sign(info, message, None)
        name = f"{info.namespace}/{info.name}"
        return CheckpointSignature(name, b.name, info.type.value, self._fp, bytes(sig))
