"""The FIDO2 backend: credentials on a security key, assertions, hmac-secret and vault slots.

Key types `fido-es256` and `fido-eddsa` are credentials the authenticator makes
(makeCredential); the catalog keeps their handle (credential id, registration, public key).

* `sign` is getAssertion with the challenge SHA-256(message); it returns the assertion
  structure described in `assertion.py` and docs/fido.md, not a raw signature.
* `verify` checks that structure against the credential's public key (no device needed
  beyond the backend being available).
* `derive` (hmac-secret, the CTAP side of WebAuthn PRF) makes an `aes-256` key-encryption
  key that is never stored: each use asks the authenticator for the 32-byte hmac-secret
  output, derives the key with HKDF in guarded memory, uses it once and wipes it.
* As a `Sealer` (sealer.py), the backend protects the vault master key: `strongroom vault
  enroll fido`.

The user is asked to touch the key through `BackendContext.presence` ("touch your security
key"), and for the PIN through the `pin` secret reference. A wrong PIN is never sent twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    IntegrityError,
    InvalidArgument,
    StrongroomError,
    WrongPin,
)
from strongroom.memory import Guarded
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import devices
from .handles import (
    CREDENTIAL_PREFIX,
    DERIVED_PREFIX,
    UV_CHOICES,
    CredentialHandle,
    DerivedHandle,
)
from .sealer import FidoSealer

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("strongroom.fido")

ALGORITHMS = {KeyType.FIDO_ES256: -7, KeyType.FIDO_EDDSA: -8}
GCM_NONCE = 12
_PROBE_RETRY_S = 2.0
_RP_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|ssh:[A-Za-z0-9._-]*")
"""A domain name (the WebAuthn RP ID), or an OpenSSH application: `ssh:` or `ssh:NAME`."""
_PRF_PREFIX = b"WebAuthn PRF\x00"


def prf_salt(salt: bytes) -> bytes:
    """The hmac-secret salt for a caller's salt: WebAuthn PRF's SHA-256("WebAuthn PRF" 0 salt).

    So the 32 bytes Strongroom derives from a credential are exactly what a browser's
    `prf: {eval: {first: salt}}` gives for the same credential and RP ID.
    """
    return hashlib.sha256(_PRF_PREFIX + salt).digest()


def _capabilities(algorithms: set[int], hmac_secret: bool) -> frozenset[Capability]:
    caps: set[Capability] = set()
    for key_type, alg in ALGORITHMS.items():
        if alg not in algorithms:
            continue
        caps |= {
            (key_type, Operation.GENERATE),
            (key_type, Operation.SIGN),
            (key_type, Operation.VERIFY),
            (key_type, Operation.DELETE),
        }
        if hmac_secret:
            caps.add((key_type, Operation.DERIVE))
    if hmac_secret:
        caps |= {
            (KeyType.AES_256, Operation.ENCRYPT),
            (KeyType.AES_256, Operation.DECRYPT),
            (KeyType.AES_256, Operation.DELETE),
        }
    return frozenset(caps)


_ALL_CAPABILITIES = _capabilities(set(ALGORITHMS.values()), True)


class FidoBackend(FidoSealer, Backend):
    """A FIDO2/CTAP2 security key: USB HID, NFC/PC/SC, or the tests' software authenticator."""

    type_name = "fido"
    config_keys = {
        "device": ConfigKey(
            str, "auto, a HID path such as /dev/hidraw0, pcsc or pcsc:READER", "auto"
        ),
        "rp_id": ConfigKey(
            str, "the relying party ID credentials are made for", "strongroom.local"
        ),
        "pin": ConfigKey(
            (str, list), "the security key PIN: env:NAME, file:PATH or prompt", secret=True
        ),
        "user_verification": ConfigKey(
            str,
            "PIN use: discouraged, preferred (when a PIN is set and given) or required",
            "preferred",
        ),
        "resident_key": ConfigKey(bool, "make discoverable (resident) credentials", False),
        "touch_timeout": ConfigKey((int, float), "seconds to wait for a touch", 30),
        "require_touch": ConfigKey(
            bool, "derived keys need a touch on every use (vault slots: see --no-touch)", True
        ),
    }

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        s = context.settings
        self.device_setting = str(s.get("device", "auto"))
        if not devices.valid_setting(self.device_setting):
            raise context.config_error(
                "must be auto, a HID path (/dev/hidrawN), pcsc or pcsc:READER", "device"
            )
        self.rp_id = str(s.get("rp_id", "strongroom.local"))
        if not _RP_ID.fullmatch(self.rp_id):
            raise context.config_error(
                "must be a domain name such as strongroom.local, or an OpenSSH application "
                "(ssh: or ssh:NAME) for keys that ssh-agent serves",
                "rp_id",
            )
        self.user_verification = str(s.get("user_verification", "preferred"))
        if self.user_verification not in UV_CHOICES:
            raise context.config_error(
                f"must be one of {', '.join(UV_CHOICES)}", "user_verification"
            )
        self.resident_key = bool(s.get("resident_key", False))
        self.touch_timeout = float(s.get("touch_timeout", 30))
        if not self.touch_timeout > 0:
            raise context.config_error("must be more than 0 seconds", "touch_timeout")
        self.require_touch = bool(s.get("require_touch", True))
        self.pin = context.secret("pin", "Security key PIN: ")
        self._session: Session | None = None
        self._unavailable: tuple[float, str] | None = None
        self._lock = threading.RLock()
        self._credentials: dict[str, CredentialHandle] = {}
        self._publics: dict[str, PublicKeyTypes] = {}
        self._pin_guard_key = os.urandom(32)
        self._refused_pin: tuple[bytes, int | None] | None = None

    # -- discovery ---------------------------------------------------------------------------
    def availability(self) -> str | None:
        if self._session is not None and not self._session.broken:
            return None
        try:
            import fido2  # noqa: F401
        except ImportError:
            return "python-fido2 is not installed; pip install 'strongroom[fido]'"
        failed = self._unavailable
        if failed is not None and time.monotonic() - failed[0] < _PROBE_RETRY_S:
            return failed[1]
        try:
            self._connect()
        except BackendUnavailable as e:
            self._unavailable = (time.monotonic(), e.reason)
            return e.reason
        return None

    def capabilities(self) -> frozenset[Capability]:
        session = self._session
        if session is None:
            return _ALL_CAPABILITIES
        return _capabilities(session.algorithms, session.hmac_secret)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device_setting,
            "rp_id": self.rp_id,
            "user_verification": self.user_verification,
        }
        session = self._session
        if session is not None:
            out.update(
                connected=session.description,
                aaguid=session.aaguid,
                versions=session.versions,
                extensions=sorted(session.extensions),
                pin_set=session.pin_set,
            )
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def _connect(self) -> Session:
        with self._lock:
            session = self._session
            if session is not None and not session.broken:
                return session
            if session is not None:
                session.close()
                self._session = None
            from .session import Session

            try:
                factory = self.context.device_factory
                if factory is not None:  # a device passed in by code (the tests)
                    device, description = devices.from_factory(factory)
                else:
                    device, description = devices.open_device(self.device_setting)
            except devices.NoDevice as e:
                raise BackendUnavailable(self.name, str(e)) from None
            self._session = Session(
                device, description, self.name, self.context.presence, self.touch_timeout
            )
            self._unavailable = None
            return self._session

    def open(self) -> None:
        self._connect()

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            if session is not None:
                session.close()
            self._credentials.clear()
            self._publics.clear()

    # -- helpers -------------------------------------------------------------------------------
    def _credential(self, info: KeyInfo) -> CredentialHandle:
        cached = self._credentials.get(info.handle)
        if cached is None:
            cached = CredentialHandle.decode(info.handle)
            self._credentials[info.handle] = cached
        return cached

    def _wants_uv(self, session: Session, required: bool) -> bool:
        """Whether to verify the user (send the PIN) for one operation."""
        if required or self.user_verification == "required":
            return True
        if self.user_verification == "discouraged":
            return False
        return session.pin_set and self.pin.available()

    def _pin_token(self, session: Session, permission: Any, rp_id: str) -> bytes:
        """One PIN check on the authenticator. A PIN it refused is never sent again."""
        if not session.pin_set:
            session.refresh()
        if not session.pin_set:
            raise AuthenticationFailed(
                "user verification is required but the security key has no PIN; set one first "
                "(for example with the key vendor's tool or `fido2-token -S`)"
            )
        pin = self.pin.get()
        fingerprint = hmac.new(self._pin_guard_key, pin.encode(), hashlib.sha256).digest()
        refused = self._refused_pin
        if refused is not None and hmac.compare_digest(refused[0], fingerprint):
            raise AuthenticationFailed(
                "wrong security key PIN (the key refused this PIN before; it is not sent again)",
                retries_left=refused[1],
            )
        try:
            token = session.pin_token(pin, permission, rp_id)
        except WrongPin as e:
            self._refused_pin = (fingerprint, e.retries_left)
            raise
        self._refused_pin = None
        return token

    def _token_for(self, session: Session, uv: bool, permission: Any, rp_id: str) -> bytes | None:
        return self._pin_token(session, permission, rp_id) if uv else None

    @contextlib.contextmanager
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
    ) -> Iterator[memoryview]:
        """HKDF-SHA256(hmac-secret(PRF salt), salt, info) in guarded memory, for one block."""
        from .session import PERMISSION

        with self._lock:
            session = self._connect()
            token = self._token_for(session, uv, PERMISSION.GET_ASSERTION, rp_id)
            with Guarded(32) as secret, Guarded(32) as key:
                with secret.write() as out:
                    session.hmac_secret_into(
                        what, rp_id, credential_id, prf_salt(salt), out, up=up, token=token
                    )
                with secret.read() as ikm, key.write() as k:
                    HKDF(hashes.SHA256(), 32, salt, info).derive_into(ikm, k)
                with key.read() as k:
                    yield k

    # -- Backend: keys -------------------------------------------------------------------------
    def generate(self, new: NewKey) -> str:
        """CTAP2 authenticatorMakeCredential (ES256 or EdDSA; hmac-secret with derive usage)."""
        from fido2.webauthn import AttestationObject

        from .assertion import CREATE, client_data
        from .session import PERMISSION

        info = new.info
        alg = ALGORITHMS.get(info.type)
        if alg is None:
            raise self.unsupported(Operation.GENERATE, info.type)
        with self._lock:
            session = self._connect()
            if alg not in session.algorithms:
                raise self.unsupported(Operation.GENERATE, info.type, "the key lacks it")
            wants_hmac = Usage.DERIVE in info.usage
            if wants_hmac and not session.hmac_secret:
                raise self.unsupported(
                    Operation.DERIVE, info.type, "the security key has no hmac-secret extension"
                )
            uv_required = self.user_verification == "required"
            token = self._token_for(
                session,
                self._wants_uv(session, uv_required),
                PERMISSION.MAKE_CREDENTIAL,
                self.rp_id,
            )
            cdj = client_data(CREATE, os.urandom(32), self.rp_id)
            user = {
                "id": hashlib.sha256(f"{info.namespace}/{info.name}".encode()).digest()[:16],
                "name": f"{info.namespace}/{info.name}",
                "displayName": info.name,
            }
            response = session.make_credential(
                hashlib.sha256(cdj).digest(),
                self.rp_id,
                user,
                alg,
                resident=self.resident_key,
                hmac_secret=wants_hmac,
                token=token,
            )
        auth_data = response.auth_data
        cred = auth_data.credential_data
        if cred is None or auth_data.rp_id_hash != hashlib.sha256(self.rp_id.encode()).digest():
            raise StrongroomError("the security key answered makeCredential with bad data")
        if cred.public_key.get(3) != alg:
            raise StrongroomError("the security key made a credential of another algorithm")
        if wants_hmac and not (auth_data.extensions or {}).get("hmac-secret"):
            raise self.unsupported(
                Operation.DERIVE, info.type, "the security key did not enable hmac-secret"
            )
        attestation = AttestationObject.create(response.fmt, auth_data, response.att_stmt)
        handle = CredentialHandle(
            rp_id=self.rp_id,
            credential_id=bytes(cred.credential_id),
            alg=alg,
            resident=self.resident_key,
            hmac_secret=wants_hmac,
            uv_required=uv_required,
            attestation_object=bytes(attestation),
            client_data_json=cdj,
        )
        return handle.encode()

    def registration(self, info: KeyInfo) -> dict[str, bytes]:
        """The WebAuthn registration of a credential: attestationObject and clientDataJSON."""
        handle = self._credential(info)
        return {
            "attestationObject": handle.attestation_object,
            "clientDataJSON": handle.client_data_json,
        }

    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        cached = self._publics.get(info.handle)
        if cached is not None:
            return cached
        if not info.type.is_fido:
            raise InvalidArgument(f"key {info.name!r} is a {info.type.value} key: no public key")
        from fido2.webauthn import AttestationObject

        from .assertion import cose_to_public

        handle = self._credential(info)
        cred = AttestationObject(handle.attestation_object).auth_data.credential_data
        if cred is None:
            raise InvalidArgument(f"the catalog entry of key {info.name!r} has no public key")
        public = cose_to_public(cred.public_key)
        self._publics[info.handle] = public
        return public

    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        """CTAP2 authenticatorGetAssertion (a touch) over challenge SHA-256(data).

        Returns the encoded assertion structure (assertion.py), not a raw signature.
        """
        if not info.type.is_fido:
            raise self.unsupported(Operation.SIGN, info.type)
        from .assertion import GET, Assertion, challenge_for, client_data, is_ssh_application
        from .session import PERMISSION

        handle = self._credential(info)
        if is_ssh_application(handle.rp_id):
            # OpenSSH's security-key signature: the authenticator signs SHA-256(data) as
            # the client data hash, with no client data (assertion.py).
            cdj = b""
            client_data_hash = hashlib.sha256(data).digest()
        else:
            cdj = client_data(GET, challenge_for(data), handle.rp_id)
            client_data_hash = hashlib.sha256(cdj).digest()
        with self._lock:
            session = self._connect()
            token = self._token_for(
                session,
                self._wants_uv(session, handle.uv_required),
                PERMISSION.GET_ASSERTION,
                handle.rp_id,
            )
            response = session.get_assertion(
                f"signing with key {info.name!r}",
                handle.rp_id,
                client_data_hash,
                handle.credential_id,
                token=token,
            )
        returned = response.credential.get("id", handle.credential_id)
        if returned != handle.credential_id:
            raise StrongroomError("the security key answered with another credential")
        return Assertion(
            handle.credential_id, bytes(response.auth_data), cdj, bytes(response.signature)
        ).encode()

    def verify(self, info: KeyInfo, data: bytes, signature: bytes, algorithm: str | None) -> None:
        """Check an assertion structure from `sign`: client data, RP ID hash, flags and
        signature (no device needed)."""
        if not info.type.is_fido:
            return super().verify(info, data, signature, algorithm)
        from .assertion import verify_assertion

        handle = self._credential(info)
        verify_assertion(
            self.public_key(info),
            handle.rp_id,
            data,
            signature,
            credential_id=handle.credential_id,
            require_uv=handle.uv_required,
        )

    def derive(self, info: KeyInfo, new: NewKey, salt: bytes, context: bytes) -> str:
        """hmac-secret (WebAuthn PRF) → HKDF-SHA256 → an aes-256 key that is never stored.

        The derivation runs once now (a touch, and the PIN when user verification applies),
        so a credential without hmac-secret or a wrong PIN fails here and not at first use.
        """
        if not info.type.is_fido:
            raise self.unsupported(Operation.DERIVE, info.type)
        if new.info.type is not KeyType.AES_256:
            raise self.unsupported(
                Operation.DERIVE,
                new.info.type,
                "a FIDO credential derives aes-256 key-encryption keys only",
            )
        handle = self._credential(info)
        if not handle.hmac_secret:
            raise InvalidArgument(
                f"key {info.name!r} was made without hmac-secret; create it with derive usage"
            )
        with self._lock:
            uv = self._wants_uv(self._connect(), handle.uv_required)
        derived = DerivedHandle(
            handle.rp_id, handle.credential_id, bytes(salt), bytes(context), uv, self.require_touch
        )
        with self._derived_key(derived, f"deriving from key {info.name!r}"):
            pass
        return derived.encode()

    def _derived_key(
        self, derived: DerivedHandle, what: str
    ) -> contextlib.AbstractContextManager[memoryview]:
        return self._hmac_secret_key(
            derived.rp_id,
            derived.credential_id,
            derived.salt,
            b"strongroom fido kek\x00" + derived.info,
            uv=derived.uv,
            up=derived.up,
            what=what,
        )

    def _derived(self, info: KeyInfo, op: Operation) -> DerivedHandle:
        if info.type is not KeyType.AES_256 or not info.handle.startswith(DERIVED_PREFIX):
            raise self.unsupported(op, info.type)
        return DerivedHandle.decode(info.handle)

    def encrypt(self, info: KeyInfo, plaintext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """AES-256-GCM under the derived key: nonce(12) ‖ ciphertext ‖ tag (as the vault)."""
        derived = self._derived(info, Operation.ENCRYPT)
        if algorithm is not None:
            raise InvalidArgument(f"a derived key is AES-256-GCM; got algorithm {algorithm!r}")
        nonce = os.urandom(GCM_NONCE)
        with self._derived_key(derived, f"encrypting with key {info.name!r}") as key:
            return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        derived = self._derived(info, Operation.DECRYPT)
        if algorithm is not None:
            raise InvalidArgument(f"a derived key is AES-256-GCM; got algorithm {algorithm!r}")
        if len(ciphertext) < GCM_NONCE + 16:
            raise IntegrityError("ciphertext is too short to be AES-GCM output")
        with self._derived_key(derived, f"decrypting with key {info.name!r}") as key:
            try:
                return AESGCM(key).decrypt(ciphertext[:GCM_NONCE], ciphertext[GCM_NONCE:], aad)
            except InvalidTag:
                raise IntegrityError(
                    "decryption failed: the data was altered, or this is not the security key "
                    "(or PIN setting) the key was derived with"
                ) from None

    def delete(self, info: KeyInfo) -> None:
        """Forget the key. A discoverable credential is also deleted from the security key
        (CTAP2 credentialManagement deleteCredential, which needs the PIN)."""
        self._publics.pop(info.handle, None)
        if not info.handle.startswith(CREDENTIAL_PREFIX):
            return
        handle = self._credential(info)
        self._credentials.pop(info.handle, None)
        if not handle.resident:
            return  # the key keeps nothing for a non-discoverable credential
        from .session import PERMISSION

        with self._lock:
            session = self._connect()
            if not (session.credential_management and session.pin_set and self.pin.available()):
                log.warning(
                    "key %r is a discoverable credential; it stays on the security key until "
                    "removed with the key's own tool (deleting it needs the PIN)",
                    info.name,
                )
                return
            token = self._pin_token(session, PERMISSION.CREDENTIAL_MGMT, handle.rp_id)
            session.delete_credential(token, handle.credential_id)


__all__ = ["FidoBackend", "prf_salt"]
