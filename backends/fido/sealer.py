"""The `Sealer` of the FIDO2 backend: vault key slots on a security key's hmac-secret.

`FidoSealer` is a mixin of `FidoBackend`. Enrolling a slot makes a credential with the
hmac-secret extension for it; the vault master key is sealed (XChaCha20-Poly1305) under
HKDF of the authenticator's hmac-secret output, with the slot's own fields as associated
data. Unsealing first checks that the key holds the slot's credential (no PIN, no touch).
docs/fido.md describes the slot format (`strongroom vault enroll fido`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from strongroom import sodium
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.secrets import SecretSource
from strongroom.types import KeyType, Operation

from .handles import UV_CHOICES, b64u, unb64u

if TYPE_CHECKING:
    from .session import Session

SLOT_KIND = "fido2-hmac-secret"


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"option {name} takes true or false, not {value!r}")


class FidoSealer:
    """Mixin of `FidoBackend`: `seal` and `unseal` for vault key slots."""

    if TYPE_CHECKING:  # FidoBackend's, and Backend's
        rp_id: str
        user_verification: str
        pin: SecretSource
        _lock: threading.RLock

        def unsupported(
            self, op: Operation | str, key_type: KeyType | None, detail: str = ""
        ) -> UnsupportedOperation: ...
        def _connect(self) -> Session: ...
        def _token_for(
            self, session: Session, uv: bool, permission: Any, rp_id: str
        ) -> bytes | None: ...
        def _hmac_secret_key(
            self,
            rp_id: str,
            credential_id: bytes,
            salt: bytes,
            info: bytes,
            *,
            uv: bool,
            up: bool,
            what: str,
        ) -> contextlib.AbstractContextManager[memoryview]: ...

    def seal(self, secret: memoryview, label: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Make a credential with hmac-secret for this slot and wrap `secret` under
        HKDF(hmac-secret output, salt): two touches (make, then assert), and the PIN if the
        slot requires it. Options: pin (bool), user_verification, touch (bool)."""
        from .session import PERMISSION

        known = {"pin", "user_verification", "touch"}
        unknown = set(options) - known
        if unknown:
            raise InvalidArgument(
                f"a FIDO2 key slot takes options {', '.join(sorted(known))}; "
                f"not {', '.join(sorted(unknown))}"
            )
        policy = str(options.get("user_verification", self.user_verification))
        if policy not in UV_CHOICES:
            raise InvalidArgument(f"user_verification must be one of {', '.join(UV_CHOICES)}")
        if "pin" in options and _flag(options["pin"], "pin"):
            policy = "required"
        up = _flag(options.get("touch", True), "touch")
        with self._lock:
            session = self._connect()
            if not session.hmac_secret:
                raise self.unsupported(
                    "seal", None, f"{session.description} has no hmac-secret extension"
                )
            uv = policy == "required" or (
                policy == "preferred" and session.pin_set and self.pin.available()
            )
            alg = -7 if -7 in session.algorithms else min(session.algorithms)
            cdj_hash = hashlib.sha256(os.urandom(32)).digest()
            token = self._token_for(session, uv, PERMISSION.MAKE_CREDENTIAL, self.rp_id)
            response = session.make_credential(
                cdj_hash,
                self.rp_id,
                {"id": hashlib.sha256(label.encode()).digest()[:16], "name": label},
                alg,
                resident=False,
                hmac_secret=True,
                token=token,
            )
            cred = response.auth_data.credential_data
            if cred is None or not (response.auth_data.extensions or {}).get("hmac-secret"):
                raise StrongroomError("the security key did not make an hmac-secret credential")
            params: dict[str, Any] = {
                "kind": SLOT_KIND,
                "version": 1,
                "rp_id": self.rp_id,
                "credential_id": b64u(bytes(cred.credential_id)),
                "salt": b64u(os.urandom(32)),
                "uv": uv,
                "up": up,
                "label": label,
                "aaguid": bytes(cred.aaguid).hex(),
                "kdf": "hkdf-sha256",
                "aead": "xchacha20poly1305-ietf",
            }
        with self._slot_key(params, "enrolling the vault slot") as kek:
            params["wrapped"] = b64u(sodium.seal(kek, secret, _slot_aad(params)))
        return params

    def unseal(self, params: Mapping[str, Any], out: memoryview) -> None:
        """Check that this key holds the slot's credential (no PIN, no touch), then the PIN
        if the slot needs it, a touch, hmac-secret, HKDF, and unwrap into `out`."""
        try:
            if params.get("kind") != SLOT_KIND or params.get("version") != 1:
                raise ValueError("not a FIDO2 slot")
            rp_id = str(params["rp_id"])
            credential_id = unb64u(str(params["credential_id"]))
            wrapped = unb64u(str(params["wrapped"]))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError("the vault key slot for the FIDO2 key is damaged") from None
        with self._lock:
            session = self._connect()
            if not session.holds(rp_id, credential_id):
                raise AuthenticationFailed(
                    f"{session.description} is not the security key this vault slot was "
                    "enrolled with"
                )
            with self._slot_key(params, "unlocking the vault") as kek:
                try:
                    sodium.open_into(kek, wrapped, _slot_aad(params), out)
                except IntegrityError:
                    raise AuthenticationFailed(
                        "the security key's secret does not open this vault slot"
                    ) from None

    def _slot_key(
        self, params: Mapping[str, Any], what: str
    ) -> contextlib.AbstractContextManager[memoryview]:
        return self._hmac_secret_key(
            str(params["rp_id"]),
            unb64u(str(params["credential_id"])),
            unb64u(str(params["salt"])),
            b"strongroom vault slot\x00" + str(params["label"]).encode(),
            uv=bool(params["uv"]),
            up=bool(params["up"]),
            what=what,
        )


def _slot_aad(params: Mapping[str, Any]) -> bytes:
    fields = {k: v for k, v in params.items() if k != "wrapped"}
    return b"strongroom-fido-slot|" + json.dumps(fields, sort_keys=True).encode()
