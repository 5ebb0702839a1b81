"""The backend protocol every key store implements, and the opt-in extensions.

A backend is constructed from its config table and a `BackendContext`. It must
import even when its library or device is missing; `availability()` then returns
the reason, which the user sees in `strongroom backends`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from . import algorithms
from .errors import ConfigError, UnsupportedOperation
from .types import KeyInfo, KeyType, Operation, Usage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from .secrets import SecretSource
    from .storage import VaultRecords
    from .threshold import Policy

Capability = tuple[KeyType, Operation]
PresencePrompt = Callable[[str], None]
"""presence(message) tells the person to act on a device now, e.g. "touch your security key"."""


def no_presence_prompt(message: str) -> None:
    """The default for library use: say nothing (the CLI prints the message)."""


DeviceFactory = Callable[[], object]
"""device_factory() → an open device object of the kind the backend's library speaks to (for
fido, a python-fido2 `CtapDevice`), used instead of the device its config names."""


@dataclass
class BackendContext:
    """What the keystore hands a backend when it builds it."""

    name: str
    data_dir: Path
    settings: Mapping[str, Any]
    secret: Callable[[str, str], SecretSource]
    """secret(setting_name, prompt) → a SecretSource for a config secret reference."""
    sealer: Callable[[str], Sealer]
    """sealer(backend_name) → another configured backend that can seal (for vault key slots)."""
    config_error: Callable[[str, str], ConfigError]
    """config_error(message, key) → a ConfigError naming the file, line and this backend's key."""
    presence: PresencePrompt = no_presence_prompt
    """Called when the device waits for a touch (or similar), so the user can be told."""
    device_factory: DeviceFactory | None = None
    """Opens the device in place of the `device` setting: the seam through which tests pass
    a software device (like python-fido2's `Ctap2(device)`). Only code can set it, through
    `Keystore(device_factories=...)`; no config value reaches it."""
    counter: Callable[[str], MonotonicCounter] | None = None
    """counter(backend_name) → another configured backend that keeps monotonic counters (a
    TPM), opened: the vault's check against rollback of its store (`rollback_counter`)."""
    owner: bytes = b""
    """Eight bytes naming the keystore's store (`Catalog.store_id`): a device backend puts
    them in the ids of the keys it creates, so that its `KeyInventory` lists this keystore's
    keys only, never those of another keystore sharing the token."""
    records: VaultRecords | None = None
    """This backend's rows in the keystore's transactional store (core/storage.py), for a
    backend that keeps its keys there (`Backend.transactional`): the software vault."""


@dataclass(frozen=True)
class ConfigKey:
    """One key a backend accepts in its config table."""

    kind: type | tuple[type, ...]
    help: str
    default: Any = None
    secret: bool = False


@dataclass(frozen=True)
class NewKey:
    """What the keystore asks a backend to create: the catalog row-to-be."""

    info: KeyInfo


@dataclass(frozen=True)
class ExistingKey:
    """A key found in a backend that Strongroom did not create (`key adopt`)."""

    handle: str
    type: KeyType
    usage: frozenset[Usage]
    """What the backend lets the key do; the catalog row may narrow it, never widen it."""
    exportable: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """A key store. Methods take the key's catalog entry; unsupported ones raise."""

    type_name: ClassVar[str]
    config_keys: ClassVar[Mapping[str, ConfigKey]] = {}
    random_needs_open: ClassVar[bool] = True
    """False when `random` works without logging in or unlocking."""
    transactional: ClassVar[bool] = False
    """True when the backend keeps its keys as rows of the keystore's store
    (`BackendContext.records`): the keystore then writes the key and its catalog rows in one
    transaction. A device-backed store cannot join one; its key is made first, then the row."""

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.name = context.name

    # -- discovery ---------------------------------------------------------------------------
    @abc.abstractmethod
    def availability(self) -> str | None:
        """None when usable, else a reason the user can act on."""

    @abc.abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """The (key type, operation) pairs this backend can do."""

    def status(self) -> dict[str, Any]:
        """Backend-specific facts for `strongroom backends` and `doctor` (no secrets)."""
        return {}

    def supports(self, key_type: KeyType, op: Operation) -> bool:
        return (key_type, op) in self.capabilities()

    def unsupported(
        self, op: Operation | str, key_type: KeyType | None, detail: str = ""
    ) -> UnsupportedOperation:
        return UnsupportedOperation(
            self.name, str(op), key_type.value if key_type else None, detail
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, log in or unlock. Called on first use, not at construction."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, handles and secrets."""

    # -- key operations (defaults refuse) -----------------------------------------------------
    def generate(self, new: NewKey) -> str:
        """Create a key and return its backend handle."""
        raise self.unsupported(Operation.GENERATE, new.info.type)

    def import_key(self, new: NewKey, material: memoryview, fmt: str) -> str:
        """Store caller-supplied material (raw, der or pem) and return the handle."""
        raise self.unsupported(Operation.IMPORT, new.info.type)

    def adopt(self, ref: Mapping[str, str]) -> ExistingKey:
        """Find a key that already exists in the backend (`ref` is backend-specific, e.g.
        label or id) so the keystore can register it without copying it."""
        raise self.unsupported("adopt", None)

    def export_key(self, info: KeyInfo, fmt: str) -> bytes:
        """Return the key material of an exportable key."""
        raise self.unsupported(Operation.EXPORT, info.type)

    @abc.abstractmethod
    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        """The public half as a `cryptography` object."""

    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        raise self.unsupported(Operation.SIGN, info.type)

    def sign_digest(self, info: KeyInfo, digest: bytes, algorithm: str | None) -> bytes:
        """Sign a digest the caller made (`algorithms.check_prehashed` has checked its length):
        the same signature `sign` makes over the message, for ECDSA and RSA keys."""
        raise self.unsupported(Operation.SIGN, info.type)

    def verify(self, info: KeyInfo, data: bytes, signature: bytes, algorithm: str | None) -> None:
        """Return None or raise cryptography's InvalidSignature (the keystore has checked
        `algorithm` with `algorithms.check_sign_algorithm`).

        The default checks a signature with the public key, which needs no device. A backend
        overrides it for what only it can check: an HMAC tag (the vault, pkcs11, tpm) or a
        FIDO assertion structure (fido), handing every other key type back to this default.
        """
        algorithms.verify_signature(info.type, self.public_key(info), data, signature, algorithm)

    def verify_digest(
        self, info: KeyInfo, digest: bytes, signature: bytes, algorithm: str | None
    ) -> None:
        """`verify` for a digest the caller made, as `sign_digest` is for `sign`: ECDSA and RSA
        keys only, always with the public key (`algorithms.check_prehashed` checks the length)."""
        algorithms.verify_signature(
            info.type, self.public_key(info), digest, signature, algorithm, prehashed=True
        )

    def encrypt(self, info: KeyInfo, plaintext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        raise self.unsupported(Operation.ENCRYPT, info.type)

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        raise self.unsupported(Operation.DECRYPT, info.type)

    def agree(
        self, info: KeyInfo, peer: PublicKeyTypes, new: NewKey, salt: bytes, context: bytes
    ) -> str:
        """ECDH/X25519 with a peer, HKDF-SHA256 into a new key of this backend."""
        raise self.unsupported(Operation.AGREE, info.type)

    def exchange(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """The raw ECDH/X25519 shared secret of `info` with `peer` (usage agree), for a caller
        that derives its own keys from it (cryptography's `exchange`). The caller owns it."""
        raise self.unsupported(Operation.AGREE, info.type, "it returns no raw shared secret")

    def derive(self, info: KeyInfo, new: NewKey, salt: bytes, context: bytes) -> str:
        """HKDF-SHA256 from this key into a new key of this backend."""
        raise self.unsupported(Operation.DERIVE, info.type)

    def wrap(self, info: KeyInfo, target: KeyInfo) -> bytes:
        """Wrap an exportable key of this backend under this key."""
        raise self.unsupported(Operation.WRAP, info.type)

    def unwrap(self, info: KeyInfo, blob: bytes, new: NewKey) -> str:
        """Unwrap a blob into a new key of this backend."""
        raise self.unsupported(Operation.UNWRAP, info.type)

    @abc.abstractmethod
    def delete(self, info: KeyInfo) -> None:
        """Destroy the key. Deleting a key that is already gone is not an error."""

    def random(self, n: int) -> bytes:
        raise self.unsupported("random", None)


@runtime_checkable
class MonotonicCounter(Protocol):
    """A backend that keeps counters that only ever go up, outside the data dir (a TPM's NV
    counters): what lets the vault tell its store was rolled back (docs/storage.md)."""

    def counter_read(self, label: str) -> int | None:
        """The counter for `label`, or None when there is none yet."""
        ...

    def counter_advance(self, label: str, at_least: int) -> int:
        """Make the counter for `label` (on first use) and raise it until it is at least
        `at_least`; return its value. It never goes down."""
        ...


@runtime_checkable
class KeyInventory(Protocol):
    """A device backend that can list the keys it created for the catalog, so that a key
    left by a crash between making it and writing its catalog row can be found
    (`strongroom doctor`) and removed (`doctor --repair`). Keys other programs made are
    never listed."""

    def owned_keys(self) -> Mapping[str, str]:
        """{handle: a description for a person (kind, label, token)} of every key this
        backend created for a catalog row, found on the device now."""
        ...

    def remove_owned(self, handle: str) -> None:
        """Destroy one such key (refusing a handle that is not one)."""
        ...


@runtime_checkable
class Sealer(Protocol):
    """Seals a secret to this hardware, so only it can unseal it (vault key slots)."""

    def seal(self, secret: memoryview, label: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return JSON-ready slot parameters that `unseal` can use later."""
        ...

    def unseal(self, params: Mapping[str, Any], out: memoryview) -> None:
        """Write the sealed secret into `out`; AuthenticationFailed if refused."""
        ...


@runtime_checkable
class Attester(Protocol):
    """Proves that a key lives in this hardware."""

    def attest(self, info: KeyInfo, nonce: bytes) -> dict[str, Any]:
        """Return an attestation statement a relying party can verify."""
        ...


@runtime_checkable
class CertificateStore(Protocol):
    """Keeps a key's certificate in the device beside the key, where other tools look for
    it (a PKCS#11 CKO_CERTIFICATE object, a PIV slot's certificate). The keystore has
    checked that the leaf's public key is the key's; the catalog keeps the whole chain."""

    def store_certificate(
        self, info: KeyInfo, chain: Sequence[x509.Certificate]
    ) -> Mapping[str, str]:
        """Write the leaf (`chain[0]`) beside the key, replacing one written before. Returns
        attributes for the keystore to record on the key's version in the catalog (how a PIV
        key is still known once the certificate that named it is replaced), or {}."""
        ...

    def stored_certificate(self, info: KeyInfo) -> x509.Certificate | None:
        """The certificate the device holds for the key, or None."""
        ...


@runtime_checkable
class AttestationVerifier(Protocol):
    """Checks an Attester's statements with no device at hand (a static method on the class).

    `strongroom attest verify` finds the class by the statement's `backend_type`.
    """

    @staticmethod
    def verify_attestation(
        statement: Mapping[str, Any],
        nonce: bytes | None,
        trusted_signer: PublicKeyTypes | None,
        expected_public: PublicKeyTypes | None,
    ) -> dict[str, Any]:
        """Return what the statement proves, or raise AttestationInvalid saying why not."""
        ...


@runtime_checkable
class SeedProcedures(Protocol):
    """BIP39 and SLIP-0010 procedures that keep seeds inside the backend."""

    def bip39_generate(self, new: NewKey, words: int, passphrase: str) -> tuple[str, str]:
        """Store a new BIP39 seed; return (handle, mnemonic) — the mnemonic is shown once."""
        ...

    def bip39_recover(self, new: NewKey, mnemonic: str, passphrase: str) -> str:
        """Store the seed of an existing mnemonic; return the handle."""
        ...

    def slip10_derive(self, seed: KeyInfo, path: str, new: NewKey) -> str:
        """Derive an ed25519 or secp256k1 key from a seed key into a new key."""
        ...


@runtime_checkable
class VaultControl(Protocol):
    """The software vault's own commands: `strongroom vault ...`."""

    def initialize(self) -> None:
        """Create a new, empty vault; refuse if one exists."""
        ...

    def vault_status(self) -> dict[str, Any]:
        """Path, lock state, key slots and counts (no secrets)."""
        ...

    def lock(self) -> None:
        """Wipe the master key and every key from memory."""
        ...

    def unlock(self, method: str | None = None) -> str:
        """Open the vault with `method` (or the configured ones); return the method that worked."""
        ...

    def enroll(self, method: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Add a key slot for `method`; return its public description."""
        ...

    def unenroll(self, slot_id: str) -> None:
        """Remove a key slot; refuses to remove the last one."""
        ...

    def change_passphrase(self, new_passphrase: str) -> None:
        """Re-wrap the master key under a new passphrase; the old one stops working."""
        ...

    def backup(self, destination: Path) -> None:
        """Write a snapshot of the vault (format 3) that the same unlock methods open."""
        ...

    def verify_store(self) -> dict[str, Any]:
        """Check every record against the vault's manifest; SnapshotTampered if one was
        removed, added, replaced or edited (docs/storage.md). Returns counts, no secrets."""
        ...

    def restore(self, source: Path) -> list[KeyInfo]:
        """Replace the vault with a backup (after checking it opens); return its keys."""
        ...

    def enroll_threshold(self, policy: Policy, exclusive: bool = False) -> dict[str, Any]:
        """Add a key slot that opens only when `policy` is met (k of n methods, or groups);
        with `exclusive`, remove every other slot but recovery shares in the same commit."""
        ...

    def recovery_shares(
        self,
        threshold_k: int,
        shares: int,
        passphrase: str = "",
        groups: list[tuple[int, int]] | None = None,
        group_threshold: int = 1,
    ) -> list[list[str]]:
        """Replace the recovery key slot; return its new SLIP-39 mnemonics, one list per group."""
        ...

    def recover(self, mnemonics: list[str], passphrase: str = "") -> str:
        """Open the vault with SLIP-39 recovery shares; return the recovery slot's id."""
        ...
