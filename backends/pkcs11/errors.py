"""python-pkcs11's exceptions (one class per CKR code) turned into Strongroom's errors.

Messages name the backend, the token, the operation and the CKR code, never a PIN or key
bytes. The original exception stays attached as `__cause__` (`raise ... from e`).
"""

from __future__ import annotations

from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    PolicyViolation,
    StorageError,
    StrongroomError,
    UnsupportedOperation,
)

try:
    from pkcs11 import exceptions as p11
except ImportError:  # pragma: no cover - availability() reports the missing package
    p11 = None  # type: ignore[assignment]

# Operations whose input is a ciphertext or wrapped key: a refusal there means the data is
# damaged or was made under another key (SoftHSM reports a failed GCM tag as CKR_GENERAL_ERROR).
INTEGRITY_OPERATIONS = frozenset({"decrypt", "unwrap", "unseal"})
# Operations that write the token's storage: a failure there is the token not saving
# (SoftHSM2 answers CKR_GENERAL_ERROR when its token directory is read-only or full).
STORING_OPERATIONS = frozenset({"generate", "import", "derive", "agree", "delete"})
# python-pkcs11 has no class for CKR_KEY_FUNCTION_NOT_PERMITTED; it raises PKCS11Error.
_KEY_FUNCTION_NOT_PERMITTED = "Unmapped error code 0x68"


def translate(
    error: Exception,
    backend: str,
    operation: str,
    key_type: str | None,
    token: str,
) -> StrongroomError:
    """The Strongroom error for a python-pkcs11 exception raised during `operation`."""
    if p11 is None or isinstance(error, StrongroomError):  # pragma: no cover - defensive
        return error if isinstance(error, StrongroomError) else StrongroomError(str(error))
    code = type(error).__name__
    if str(error) == _KEY_FUNCTION_NOT_PERMITTED:
        code = "CKR_KEY_FUNCTION_NOT_PERMITTED"
    if isinstance(error, p11.PinIncorrect | p11.PinInvalid | p11.PinLenRange):
        return AuthenticationFailed(f"wrong PIN for token {token!r} (backend {backend!r})")
    if isinstance(error, p11.PinLocked):
        return DeviceLocked(
            f"the user PIN of token {token!r} is locked; a security officer must unblock it"
        )
    if isinstance(error, p11.PinExpired):
        return AuthenticationFailed(f"the PIN of token {token!r} has expired; change it first")
    if isinstance(error, p11.UserNotLoggedIn):
        return AuthenticationFailed(
            f"token {token!r} is not logged in (it may have been reset); reopen the keystore"
        )
    if isinstance(
        error,
        p11.MechanismInvalid
        | p11.MechanismParamInvalid
        | p11.FunctionNotSupported
        | p11.KeyTypeInconsistent,
    ):
        detail = f"token {token!r} refused it ({code})"
        return UnsupportedOperation(backend, operation, key_type, detail)
    if isinstance(error, p11.KeyUnextractable | p11.KeyNotWrappable) or (
        code == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    ):
        return PolicyViolation(
            f"the key's attributes on token {token!r} forbid {operation} ({code})"
        )
    if operation in STORING_OPERATIONS and isinstance(
        error, p11.GeneralError | p11.FunctionFailed | p11.DeviceMemory
    ):
        return StorageError(
            f"token {token!r} could not save the change during {operation} ({code}): its "
            "storage may be full or read-only (for SoftHSM2, the token directory)"
        )
    if isinstance(
        error,
        p11.DeviceRemoved
        | p11.TokenNotPresent
        | p11.DeviceError
        | p11.SessionHandleInvalid
        | p11.SessionClosed
        | p11.SessionCount
        | p11.DeviceMemory,
    ):
        return BackendUnavailable(backend, f"token {token!r} failed during {operation}: {code}")
    if operation in INTEGRITY_OPERATIONS and isinstance(
        error,
        p11.GeneralError
        | p11.FunctionFailed
        | p11.EncryptedDataInvalid
        | p11.EncryptedDataLenRange
        | p11.WrappedKeyInvalid
        | p11.WrappedKeyLenRange
        | p11.DataInvalid
        | p11.DataLenRange,
    ):
        return IntegrityError(
            f"the {operation} input failed its integrity check: wrong key or damaged data"
        )
    if isinstance(
        error,
        p11.DataInvalid
        | p11.DataLenRange
        | p11.TemplateInconsistent
        | p11.TemplateIncomplete
        | p11.ArgumentsBad,
    ):
        return InvalidArgument(f"token {token!r} refused the {operation} request ({code})")
    return StrongroomError(f"PKCS#11 {operation} failed on token {token!r}: {code}")
