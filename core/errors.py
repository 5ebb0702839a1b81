"""Strongroom's exceptions: one root, one small class per failure a caller can act on.

No message ever contains secret material: messages name keys, backends, files and
operations, never key bytes, passphrases or PINs.

The classes carry no exit code or HTTP status: each face maps them in one table keyed by
class (the CLI's `EXIT_CODES`, the service's statuses), the most specific class first.
"""

from __future__ import annotations


class StrongroomError(Exception):
    """Root of every error Strongroom raises on purpose."""


class KeyNotFound(StrongroomError, KeyError):
    """No key of that name in this namespace."""

    def __init__(self, name: str, namespace: str = "default") -> None:
        self.name = name
        self.namespace = namespace
        where = "" if namespace == "default" else f" in namespace {namespace!r}"
        super().__init__(f"no key named {name!r}{where}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class KeyExists(StrongroomError):
    """A key of that name already exists in this namespace."""

    def __init__(self, name: str, namespace: str = "default") -> None:
        self.name = name
        self.namespace = namespace
        where = "" if namespace == "default" else f" in namespace {namespace!r}"
        super().__init__(f"a key named {name!r} already exists{where}")


class UnsupportedOperation(StrongroomError):
    """The backend cannot do this operation with this key type."""

    def __init__(
        self, backend: str, operation: str, key_type: str | None, detail: str = ""
    ) -> None:
        self.backend = backend
        self.operation = str(operation)
        self.key_type = str(key_type) if key_type is not None else None
        what = f"{self.operation} with {self.key_type}" if key_type else self.operation
        msg = f"backend {backend!r} does not support {what}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class BackendUnavailable(StrongroomError):
    """The backend's library, device or service cannot be used; the reason says what to do."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend {backend!r} is unavailable: {reason}")


class AuthenticationFailed(StrongroomError):
    """A passphrase, PIN or other secret was wrong. Never retried automatically."""

    def __init__(self, message: str, retries_left: int | None = None) -> None:
        self.retries_left = retries_left
        if retries_left is not None:
            message = f"{message} ({retries_left} tries left)"
        super().__init__(message)


class PresenceTimeout(AuthenticationFailed):
    """Nobody touched the security key (or card) within the time allowed."""


class WrongPin(AuthenticationFailed):
    """A device refused the PIN (a FIDO authenticator's PIN_INVALID); `retries_left` says
    how many tries remain. The backend remembers the refused PIN and never sends it again."""


class DeviceLocked(StrongroomError):
    """The device or vault refuses all attempts until it is reset or unlocked."""


class PolicyViolation(StrongroomError):
    """The key's usage or a policy forbids this operation."""


class SnapshotCorrupt(StrongroomError):
    """A vault snapshot is damaged: truncated, tampered with, or of an unknown format."""


class SnapshotTruncated(SnapshotCorrupt):
    """The snapshot file ends early."""


class SnapshotTampered(SnapshotCorrupt):
    """The snapshot's contents fail their integrity check."""


class RollbackDetected(SnapshotTampered):
    """The vault's store is older than its TPM counter says: a copy of the database from
    before later changes was put back (docs/storage.md, `rollback_counter`)."""


class SnapshotVersionError(SnapshotCorrupt):
    """The snapshot's format version is not one this Strongroom reads."""

    def __init__(self, message: str, version: int) -> None:
        self.version = version
        super().__init__(message)


class AttestationInvalid(StrongroomError):
    """An attestation statement does not prove what it claims; the message says which check."""


class InvalidArgument(StrongroomError, ValueError):
    """A caller passed a value that cannot be right."""


class CertificateMismatch(InvalidArgument):
    """A certificate whose public key is not the key's it is to be kept with, or a chain
    whose certificates do not issue one another."""


class ConfigError(StrongroomError):
    """The configuration file is wrong; the message names the file, line and key."""

    def __init__(
        self, message: str, path: str | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        where = path or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        if key:
            where = f"{where}: {key}"
        super().__init__(f"{where}: {message}")


class GuardedMemoryError(StrongroomError):
    """Guarded memory was damaged (a canary overwritten) or could not be set up."""


class IntegrityError(StrongroomError):
    """A ciphertext or wrapped key failed authentication: wrong key, or tampered data."""


class ThresholdNotMet(AuthenticationFailed):
    """Too few of a threshold key slot's methods succeeded to open the vault.

    `failed` maps each method (member name) that was tried and failed to the reason,
    `opened` lists those that succeeded, and `needed` is how many more must succeed.
    """

    def __init__(
        self, message: str, failed: dict[str, str], opened: list[str], needed: int
    ) -> None:
        self.failed = dict(failed)
        self.opened = list(opened)
        self.needed = needed
        super().__init__(message)


class StorageError(StrongroomError):
    """The data directory (or another file Strongroom writes) cannot be written or read: the
    disk is full, the file system read-only, a quota or file size limit reached, or the
    permissions wrong. The message names the path and the cause. Nothing was reported done
    that was not saved."""


class AuditUnavailable(StrongroomError):
    """The audit record of an operation could not be written, so the operation is refused:
    its result (a signature, a plaintext) is not returned."""


# -- key lifecycle and envelope encryption (docs/lifecycle.md, docs/envelope.md) --------------
class KeyDisabled(PolicyViolation):
    """The key is disabled (`key enable` turns it back on), or scheduled for deletion."""


class VersionRetired(PolicyViolation):
    """The data names a key version below the key's min_decryption_version, or one that is gone."""


class DataFormatError(IntegrityError):
    """Versioned or enveloped data is not in a format (or format version) this Strongroom reads."""


class DataTruncated(IntegrityError):
    """An encrypted stream ends before its final chunk: it was cut short."""


# -- the catalog, and the key custody service (docs/server.md) -------------------------------
class CatalogError(StrongroomError):
    """The catalog file cannot be used (newer schema, or not a catalog)."""


class NotPermitted(PolicyViolation):
    """The identity is known, but no policy allows this operation (HTTP 403)."""


class TenantNotFound(StrongroomError):
    """No tenant, identity or policy by that name."""


class VaultLocked(DeviceLocked):
    """The service's vault was locked by an admin (HTTP 423)."""


class RateLimited(StrongroomError):
    """Too many requests from this identity (HTTP 429)."""


class RequestTooLarge(InvalidArgument):
    """The request is over the service's max_request_bytes (HTTP 413)."""


# -- the SSH agent (docs/ssh-agent.md) ---------------------------------------------------------
class AgentMessageError(InvalidArgument):
    """An SSH agent message is malformed, truncated, too large or of an unknown kind: the
    agent answers SSH_AGENT_FAILURE (or closes the connection) and serves on."""


# -- the PKCS#11 server (docs/pkcs11-server.md) ------------------------------------------------
class Pkcs11MessageError(InvalidArgument):
    """A p11-kit RPC message is malformed, truncated, too large, too deeply nested or does
    not carry its call's signature: the server answers CKR_DEVICE_ERROR (or closes the
    connection, for a frame it cannot read) and serves on."""


# -- the KMIP server (docs/kmip.md) ------------------------------------------------------------
class KmipMessageError(InvalidArgument):
    """A KMIP TTLV message is malformed, truncated, too large, too deeply nested, has too many
    items or an unknown item type: the server answers with a KMIP error (or closes the
    connection, for a message it cannot frame) and serves on."""
