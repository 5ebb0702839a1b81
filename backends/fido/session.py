"""One open authenticator, spoken to through python-fido2's `Ctap2`.

Every method names the CTAP2 command it sends. CTAP status codes become Strongroom errors
here (`raise_for`), so the backend never sees a `CtapError`:

| CTAP status                                  | Strongroom error                             |
|----------------------------------------------|----------------------------------------------|
| PIN_INVALID                                  | AuthenticationFailed, with the retries left  |
| PIN_BLOCKED                                  | DeviceLocked (reset the key)                  |
| PIN_AUTH_BLOCKED                             | DeviceLocked (unplug and replug the key)      |
| OPERATION_DENIED                             | AuthenticationFailed (the touch was refused)  |
| USER_ACTION_TIMEOUT, ACTION_TIMEOUT, and our | PresenceTimeout                               |
| own deadline (KEEPALIVE_CANCEL)              |                                              |
| NO_CREDENTIALS                               | AuthenticationFailed (not the key that made   |
|                                              | this credential)                             |
| PUAT_REQUIRED, PIN_NOT_SET, PIN_AUTH_INVALID | AuthenticationFailed                          |
| UNSUPPORTED_ALGORITHM, UNSUPPORTED_OPTION    | UnsupportedOperation                          |
| anything else                                | StrongroomError naming the code               |

A failure of the transport (unplugged key, pcscd gone) is BackendUnavailable. Nothing here
ever retries a command that carries a PIN.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2.base import AssertionResponse, AttestationResponse, Ctap2
from fido2.ctap2.credman import CredentialManagement
from fido2.ctap2.pin import ClientPin, PinProtocol, PinProtocolV1, PinProtocolV2
from fido2.webauthn import PublicKeyCredentialDescriptor, PublicKeyCredentialType

from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    PresenceTimeout,
    StrongroomError,
    UnsupportedOperation,
    WrongPin,
)
from strongroom.memory import scrub_bytes

ERR = CtapError.ERR
TOUCH_PROMPT = "touch your security key"
PERMISSION = ClientPin.PERMISSION


class Deadline(threading.Event):
    """An Event that also counts as set once `seconds` have passed (no timer thread).

    python-fido2's transports poll the event they are given while they wait (HID between
    keep-alive packets, PC/SC between status updates) and cancel the request when it is set.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._at = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._at

    def is_set(self) -> bool:
        return super().is_set() or self.expired

    def wait(self, timeout: float | None = None) -> bool:
        left = max(0.0, self._at - time.monotonic())
        super().wait(left if timeout is None else min(timeout, left))
        return self.is_set()


def _ignore_keepalive(status: int) -> None:
    """The touch was announced already."""


class Session:
    """An open authenticator: `Ctap2` over a `CtapDevice`, plus what the backend asks of it."""

    def __init__(
        self,
        device: CtapDevice,
        description: str,
        backend: str,
        presence: Callable[[str], None],
        touch_timeout: float,
    ) -> None:
        self.device = device
        self.description = description
        self.backend = backend
        self.presence = presence
        self.touch_timeout = touch_timeout
        self.broken = False
        try:
            self.ctap = Ctap2(device)  # CTAP2 authenticatorGetInfo
        except Exception as e:
            self.close()
            raise BackendUnavailable(
                backend, f"{description} did not answer as a CTAP2 authenticator ({e})"
            ) from None
        self.info = info = self.ctap.info
        self.aaguid = bytes(info.aaguid).hex()
        self.versions = list(info.versions)
        self.extensions = set(info.extensions)
        self.algorithms = {int(a["alg"]) for a in info.algorithms} or {-7}
        self.protocol: PinProtocol | None = None
        for proto in (PinProtocolV2, PinProtocolV1):
            if proto.VERSION in info.pin_uv_protocols:
                self.protocol = proto()
                break

    # -- facts -------------------------------------------------------------------------------
    @property
    def hmac_secret(self) -> bool:
        return "hmac-secret" in self.extensions and self.protocol is not None

    @property
    def pin_set(self) -> bool:
        return bool(self.info.options.get("clientPin"))

    @property
    def credential_management(self) -> bool:
        return CredentialManagement.is_supported(self.info)

    def refresh(self) -> None:
        """CTAP2 authenticatorGetInfo again (the PIN may have been set since we connected)."""
        try:
            self.info = self.ctap.get_info()
        except CtapError as e:
            self.raise_for(e, "reading the key's settings")
        except Exception as e:
            self.broken = True
            raise BackendUnavailable(
                self.backend, f"lost the connection to {self.description} ({e})"
            ) from None

    def close(self) -> None:
        close: Callable[..., None] = self.device.close
        try:
            try:  # PC/SC: also release the pcscd context now, not whenever GC runs
                close(release=True)
            except TypeError:
                close()
        except Exception:  # a device that is already gone cannot be closed any further
            self.broken = True

    # -- calls -------------------------------------------------------------------------------
    def _keepalive(self, status: int) -> None:
        if status == STATUS.UPNEEDED:  # a touch nobody announced (see `_call`)
            self.presence(TOUCH_PROMPT)

    def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, touch: bool = False, **kwargs: Any
    ) -> Any:
        """Run one CTAP2 command with the touch deadline; map errors (never retried).

        A command that needs a touch is announced before it is sent: not every transport
        reports "user presence needed" (an NFC tap is the touch), and the prompt must come.
        """
        deadline = Deadline(self.touch_timeout)
        keepalive: Callable[[int], None] = self._keepalive
        if touch:
            self.presence(TOUCH_PROMPT)
            keepalive = _ignore_keepalive
        try:
            return fn(*args, event=deadline, on_keepalive=keepalive, **kwargs)
        except CtapError as e:
            self.raise_for(e, what, deadline)
        except StrongroomError:
            raise
        except Exception as e:  # the transport failed: unplugged, pcscd gone, ...
            self.broken = True
            raise BackendUnavailable(
                self.backend, f"lost the connection to {self.description} during {what} ({e})"
            ) from None

    def raise_for(self, e: CtapError, what: str, deadline: Deadline | None = None) -> NoReturn:
        code = e.code
        if code == ERR.PIN_INVALID:
            retries = self.pin_retries()
            raise WrongPin("wrong security key PIN", retries_left=retries) from None
        if code == ERR.PIN_BLOCKED:
            raise DeviceLocked(
                "the security key's PIN is blocked after too many wrong tries; only a reset of "
                "the key (which erases its credentials) unblocks it"
            ) from None
        if code == ERR.PIN_AUTH_BLOCKED:
            raise DeviceLocked(
                "the security key refuses PINs after three wrong ones in a row; unplug it and "
                "plug it in again before the next try"
            ) from None
        if code == ERR.OPERATION_DENIED:
            raise AuthenticationFailed(f"{what} was refused at the security key") from None
        timed_out = code in (ERR.USER_ACTION_TIMEOUT, ERR.ACTION_TIMEOUT) or (
            code == ERR.KEEPALIVE_CANCEL and deadline is not None and deadline.expired
        )
        if timed_out:
            raise PresenceTimeout(
                f"no touch within {self.touch_timeout:g} s: {what} needs the security key to "
                f"be touched while it blinks (touch_timeout in [backends.{self.backend}])"
            ) from None
        if code == ERR.NO_CREDENTIALS:
            raise AuthenticationFailed(
                f"{self.description} does not hold the credential for {what}; use the security "
                "key it was made on"
            ) from None
        if code == ERR.PUAT_REQUIRED:
            raise AuthenticationFailed(
                f"the security key requires its PIN for {what}; configure pin in "
                f"[backends.{self.backend}]"
            ) from None
        if code == ERR.PIN_NOT_SET:
            raise AuthenticationFailed(
                "user verification was asked for but the security key has no PIN; set one"
            ) from None
        if code in (ERR.PIN_AUTH_INVALID, ERR.PIN_TOKEN_EXPIRED):
            raise AuthenticationFailed(
                f"the security key did not accept the PIN token for {what}"
            ) from None
        if code in (ERR.UNSUPPORTED_ALGORITHM, ERR.UNSUPPORTED_OPTION, ERR.INVALID_OPTION):
            raise UnsupportedOperation(self.backend, what, None, f"the key answered {code}")
        raise StrongroomError(f"the security key refused {what}: {code}") from None

    # -- PIN ---------------------------------------------------------------------------------
    def pin_retries(self) -> int | None:
        """CTAP2 clientPIN getPINRetries (spends no try)."""
        if self.protocol is None:
            return None
        try:
            return int(ClientPin(self.ctap, self.protocol).get_pin_retries()[0])
        except Exception:  # the count is a courtesy in an error message
            return None

    def pin_token(self, pin: str, permissions: ClientPin.PERMISSION, rp_id: str | None) -> bytes:
        """CTAP2 clientPIN getPinUvAuthTokenUsingPinWithPermissions (or getPinToken).

        Spends one PIN try on the authenticator if the PIN is wrong. Called once per
        operation, never again after a failure.
        """
        if self.protocol is None:
            raise UnsupportedOperation(self.backend, "PIN", None, "the key has no PIN protocol")
        try:
            return ClientPin(self.ctap, self.protocol).get_pin_token(pin, permissions, rp_id)
        except CtapError as e:
            self.raise_for(e, "the PIN check")
        except ValueError as e:  # fido2 refuses PINs shorter than 4 before sending them
            raise AuthenticationFailed(f"the security key PIN is not acceptable: {e}") from None
        except StrongroomError:
            raise
        except Exception as e:
            self.broken = True
            raise BackendUnavailable(
                self.backend, f"lost the connection to {self.description} ({e})"
            ) from None

    def pin_param(self, token: bytes | None, client_data_hash: bytes) -> dict[str, Any]:
        if token is None or self.protocol is None:
            return {}
        return {
            "pin_uv_param": self.protocol.authenticate(token, client_data_hash),
            "pin_uv_protocol": self.protocol.VERSION,
        }

    # -- credentials -------------------------------------------------------------------------
    def make_credential(
        self,
        client_data_hash: bytes,
        rp_id: str,
        user: Mapping[str, Any],
        alg: int,
        *,
        resident: bool,
        hmac_secret: bool,
        token: bytes | None,
    ) -> AttestationResponse:
        """CTAP2 authenticatorMakeCredential (asks for a touch)."""
        response: AttestationResponse = self._call(
            "creating a credential",
            self.ctap.make_credential,
            client_data_hash,
            {"id": rp_id, "name": rp_id},
            dict(user),
            [{"type": "public-key", "alg": alg}],
            None,
            {"hmac-secret": True} if hmac_secret else None,
            {"rk": True} if resident else None,
            touch=True,
            **self.pin_param(token, client_data_hash),
        )
        return response

    def get_assertion(
        self,
        what: str,
        rp_id: str,
        client_data_hash: bytes,
        credential_id: bytes,
        *,
        up: bool = True,
        token: bytes | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> AssertionResponse:
        """CTAP2 authenticatorGetAssertion for one credential (a touch when `up`)."""
        response: AssertionResponse = self._call(
            what,
            self.ctap.get_assertion,
            rp_id,
            client_data_hash,
            [{"type": "public-key", "id": credential_id}],
            extensions,
            None if up else {"up": False},
            touch=up,
            **self.pin_param(token, client_data_hash),
        )
        return response

    def holds(self, rp_id: str, credential_id: bytes) -> bool:
        """CTAP2 authenticatorGetAssertion with up=false: is the credential on this key?

        Needs no PIN and no touch, so it tells "another security key" apart before anything
        is spent.
        """
        try:
            self.get_assertion("a credential check", rp_id, b"\0" * 32, credential_id, up=False)
        except AuthenticationFailed:
            return False
        return True

    def hmac_secret_into(
        self,
        what: str,
        rp_id: str,
        credential_id: bytes,
        salt: bytes,
        out: memoryview,
        *,
        up: bool,
        token: bytes | None,
    ) -> None:
        """CTAP2 getAssertion with the hmac-secret extension: 32 bytes into `out`.

        The salt goes to the authenticator encrypted under a fresh ECDH shared secret
        (clientPIN getKeyAgreement), and the output comes back encrypted under it. The
        decrypted output is one `bytes` object that python-fido2 returns; it is copied into
        `out` (guarded memory) and zeroed at once. The shared secret is zeroed too.
        """
        protocol = self.protocol
        if protocol is None or not self.hmac_secret:
            raise UnsupportedOperation(
                self.backend, "derive", None, "the security key has no hmac-secret extension"
            )
        if len(salt) != 32 or len(out) != 32:
            raise ValueError("hmac-secret takes a 32-byte salt and gives 32 bytes")
        response = self._call(
            "getting the key agreement key",
            self.ctap.client_pin,
            protocol.VERSION,
            ClientPin.CMD.GET_KEY_AGREEMENT,
        )
        key_agreement, shared = protocol.encapsulate(response[ClientPin.RESULT.KEY_AGREEMENT])
        try:
            salt_enc = protocol.encrypt(shared, salt)
            extension = {
                "hmac-secret": {
                    1: key_agreement,
                    2: salt_enc,
                    3: protocol.authenticate(shared, salt_enc),
                    4: protocol.VERSION,
                }
            }
            assertion = self.get_assertion(
                what, rp_id, b"\0" * 32, credential_id, up=up, token=token, extensions=extension
            )
            encrypted = (assertion.auth_data.extensions or {}).get("hmac-secret")
            if not isinstance(encrypted, bytes):
                raise AuthenticationFailed(
                    "the security key gave no hmac-secret output for this credential (was it "
                    "made with derive usage?)"
                )
            output = protocol.decrypt(shared, encrypted)
            try:
                if len(output) != 32:
                    raise AuthenticationFailed("the security key's hmac-secret output is malformed")
                out[:] = output
            finally:
                scrub_bytes(output)
        finally:
            scrub_bytes(shared)

    def delete_credential(self, token: bytes, credential_id: bytes) -> None:
        """CTAP2 authenticatorCredentialManagement deleteCredential (a discoverable one)."""
        assert self.protocol is not None
        manager = CredentialManagement(self.ctap, self.protocol, token)
        try:
            descriptor = PublicKeyCredentialDescriptor(
                type=PublicKeyCredentialType.PUBLIC_KEY, id=credential_id
            )
            manager.delete_cred(descriptor)
        except CtapError as e:
            if e.code == ERR.NO_CREDENTIALS:
                return
            self.raise_for(e, "deleting the credential")
