"""A software CTAP 2.1 authenticator: test support for the FIDO2 backend (not shipped).

These machines have no `/dev/uhid`, and no usable software authenticator is on PyPI, so the
tests bring their own. It follows the CTAP 2.1 specification (FIDO Alliance, "Client to
Authenticator Protocol v2.1") closely enough that python-fido2's own `Ctap2` and
`Fido2Client` drive it unchanged:

* getInfo, makeCredential (packed self-attestation), getAssertion (with `up=false`
  pre-flight, allow lists, discoverable credentials and getNextAssertion), selection, reset;
* ES256 and EdDSA credentials, resident or not, with credProtect;
* hmac-secret (and so WebAuthn PRF): two CredRandom values per credential, with and without
  user verification, salts encrypted under the PIN/UV protocol 2 shared secret;
* clientPIN protocol 2: getPINRetries, getKeyAgreement, setPIN, changePIN, getPinToken and
  getPinUvAuthTokenUsingPinWithPermissions, with a persistent retry counter (8), the
  "three wrong in a row, power-cycle me" block (PIN_AUTH_BLOCKED) and the blocked state
  (PIN_BLOCKED); tokens lose their mc/ga permissions once an operation has used them with
  user presence, as CTAP 2.1 says;
* credentialManagement getCredsMetadata and deleteCredential;
* a user-presence hook, so a test can refuse the touch or not touch at all (the device then
  answers USER_ACTION_TIMEOUT, or KEEPALIVE_CANCEL when the platform cancels);
* everything that outlives a power cycle (credentials, PIN hash, retries, counters) in a JSON
  state file, rewritten atomically after each change. Private keys are in that file in the
  clear: this is a test fixture, not a place for real keys.

Two front ends share one `SoftAuthenticator`:

* `SoftCtapDevice`, a `fido2.ctap.CtapDevice` for in-process use (CTAPHID CBOR messages,
  with keep-alive callbacks while it waits for a touch), which `open_with_authenticator`
  passes to `Keystore(device_factories=...)`;
* `FidoCard`, the same authenticator as an ISO 7816 card (FIDO AID `A0000006472F0001`,
  NFCCTAP_MSG `80 10` with command chaining, NFCCTAP_GETRESPONSE `80 11` status updates
  and cancel, `61xx` + GET RESPONSE for long answers), which
  `tests/emulators/pcsc_support.py` serves on a vpcd reader so that
  `fido2.pcsc.CtapPcscDevice` finds it through a real pcscd.

Not implemented: built-in UV (there is no fingerprint), PIN/UV protocol 1, enterprise
attestation, largeBlobs, authenticatorConfig, the PIN token usage timers, and the 10-second
window for reset after power-up.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fido2 import cbor
from fido2.cose import ES256, CoseKey, EdDSA
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.ctap2.pin import PinProtocolV2
from fido2.hid import CAPABILITY, CTAPHID
from fido2.server import Fido2Server
from fido2.utils import websafe_encode
from fido2.webauthn import (
    Aaguid,
    AttestationObject,
    AttestedCredentialData,
    AuthenticatorData,
    CollectedClientData,
    PublicKeyCredentialRpEntity,
    RegistrationResponse,
)

from strongroom.backends.fido.assertion import Assertion, challenge_for

if TYPE_CHECKING:
    from strongroom.keystore import Keystore

ERR = CtapError.ERR
FLAG = AuthenticatorData.FLAG

AAGUID = Aaguid(bytes.fromhex("5374726f6e67726f6f6d2d736f667431"))  # "Strongroom-soft1"
FIDO_AID = bytes.fromhex("A0000006472F0001")
MAX_PIN_RETRIES = 8
MAX_MSG_SIZE = 2048
MAX_CREDS_IN_LIST = 8
MAX_CRED_ID_LENGTH = 128

# CTAP command bytes
MAKE_CREDENTIAL = 0x01
GET_ASSERTION = 0x02
GET_INFO = 0x04
CLIENT_PIN = 0x06
RESET = 0x07
GET_NEXT_ASSERTION = 0x08
CREDENTIAL_MGMT = 0x0A
SELECTION = 0x0B

# pinUvAuthToken permissions
PERM_MC = 0x01
PERM_GA = 0x02
PERM_CM = 0x04

SUPPORTED_ALGS = (ES256.ALGORITHM, EdDSA.ALGORITHM)


class Presence(enum.Enum):
    """What the person at the authenticator does when it asks for a touch."""

    TOUCH = "touch"
    REFUSE = "refuse"  # e.g. a "deny" button: OPERATION_DENIED at once
    IGNORE = "ignore"  # nobody touches: USER_ACTION_TIMEOUT after `up_timeout`


PresenceHook = Callable[[str], "Presence | bool | None"]
"""hook(command name) → Presence (or True = touch, False = refuse, None = ignore)."""


class _Fail(Exception):
    """Ends a command with a CTAP status code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_loaded_keys: dict[str, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = {}


@dataclass
class StoredCredential:
    """One credential as the authenticator keeps it (the state file holds these)."""

    credential_id: str  # b64
    rp_id: str
    user_id: str  # b64
    user_name: str
    alg: int
    private_key: str  # b64 PKCS#8 DER
    resident: bool
    cred_protect: int = 1
    cred_random: str | None = None  # b64: CredRandomWithoutUV ‖ CredRandomWithUV
    sign_count: int = 0
    created: float = 0.0

    @property
    def raw_id(self) -> bytes:
        return _unb64(self.credential_id)

    def private(self) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        cached = _loaded_keys.get(self.private_key)
        if cached is None:
            key = serialization.load_der_private_key(_unb64(self.private_key), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
            cached = _loaded_keys[self.private_key] = key
        return cached

    def cose_public(self) -> CoseKey:
        public = self.private().public_key()
        if self.alg == ES256.ALGORITHM:
            return ES256.from_cryptography_key(public)
        return EdDSA.from_cryptography_key(public)

    def sign(self, message: bytes) -> bytes:
        key = self.private()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        return key.sign(message)


@dataclass
class _State:
    """What survives a power cycle."""

    credentials: dict[str, StoredCredential]
    pin_hash: str | None = None  # hex of LEFT(SHA-256(PIN), 16)
    pin_retries: int = MAX_PIN_RETRIES
    min_pin_length: int = 4

    def to_json(self) -> dict[str, Any]:
        return {
            "credentials": [dict(vars(c)) for c in self.credentials.values()],
            "pin_hash": self.pin_hash,
            "pin_retries": self.pin_retries,
            "min_pin_length": self.min_pin_length,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> _State:
        creds = [StoredCredential(**c) for c in doc.get("credentials", [])]
        return cls(
            credentials={c.credential_id: c for c in creds},
            pin_hash=doc.get("pin_hash"),
            pin_retries=int(doc.get("pin_retries", MAX_PIN_RETRIES)),
            min_pin_length=int(doc.get("min_pin_length", 4)),
        )


@dataclass
class _PendingAssertions:
    """getNextAssertion state: the remaining credentials of the last getAssertion."""

    rp_id: str
    client_data_hash: bytes
    flags: int
    remaining: list[str]
    extensions: dict[str, Any] | None


def _always_touch(command: str) -> Presence:
    return Presence.TOUCH


class SoftAuthenticator:
    """The CTAP 2.1 logic. `process(request) → response` speaks CTAP CBOR messages."""

    def __init__(
        self,
        state_file: Path | str | None = None,
        *,
        presence: PresenceHook | None = None,
        up_timeout: float = 2.0,
        transports: tuple[str, ...] = ("usb",),
        aaguid: bytes = AAGUID,
        extensions: tuple[str, ...] = ("credProtect", "hmac-secret"),
        algorithms: tuple[int, ...] = SUPPORTED_ALGS,
    ) -> None:
        self.state_file = Path(state_file) if state_file is not None else None
        self.presence: PresenceHook = presence or _always_touch
        self.up_timeout = up_timeout
        self.transports = list(transports)
        self.aaguid = Aaguid(aaguid)
        self.extensions = list(extensions)
        self.algorithms = list(algorithms)
        self._protocol = PinProtocolV2()
        self._lock = threading.RLock()
        self.touch_requests = 0
        """How many times the authenticator asked for a touch (tests read this)."""
        self.commands: list[str] = []
        """Names of the commands processed, in order (tests read this)."""
        self.state = self._load()
        self.power_cycle()

    # -- persistence -------------------------------------------------------------------------
    def _load(self) -> _State:
        if self.state_file is not None and self.state_file.exists():
            return _State.from_json(json.loads(self.state_file.read_text("utf-8")))
        return _State(credentials={})

    def _save(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state.to_json(), separators=(",", ":")), "utf-8")
        os.replace(tmp, self.state_file)

    # -- runtime state: what a power cycle resets ------------------------------------------------
    def power_cycle(self) -> None:
        """As if unplugged and plugged in again: new key agreement key and token, blocks lifted."""
        with self._lock:
            self._key_agreement = ec.generate_private_key(ec.SECP256R1())
            self._token = os.urandom(32)
            self._token_permissions = 0
            self._token_rp_id: str | None = None
            self._token_in_use = False
            self._consecutive_mismatches = 0
            self._pending: _PendingAssertions | None = None

    def _reset_token(self) -> None:
        self._token = os.urandom(32)
        self._token_permissions = 0
        self._token_rp_id = None
        self._token_in_use = False

    # -- test conveniences ------------------------------------------------------------------------
    def set_pin_directly(self, pin: str) -> None:
        """Set the PIN without a client (test setup); resets the retry counter."""
        with self._lock:
            self.state.pin_hash = _sha256(pin.encode())[:16].hex()
            self.state.pin_retries = MAX_PIN_RETRIES
            self._save()

    @property
    def pin_retries(self) -> int:
        return self.state.pin_retries

    def credential(self, credential_id: bytes) -> StoredCredential | None:
        return self.state.credentials.get(_b64(credential_id))

    # -- the CTAP message layer ----------------------------------------------------------------
    def process(
        self,
        request: bytes,
        event: threading.Event | None = None,
        on_keepalive: Callable[[int], None] | None = None,
    ) -> bytes:
        """One CTAP2 message: command byte + CBOR in, status byte + CBOR out."""
        if not request:
            return bytes([ERR.INVALID_LENGTH])
        if len(request) > MAX_MSG_SIZE:
            return bytes([ERR.REQUEST_TOO_LARGE])
        command, body = request[0], request[1:]
        handler = self._handlers().get(command)
        if handler is None:
            return bytes([ERR.INVALID_COMMAND])
        try:
            params: Any = cbor.decode(body) if body else {}
        except Exception:
            return bytes([ERR.INVALID_CBOR])
        if not isinstance(params, dict):
            return bytes([ERR.CBOR_UNEXPECTED_TYPE])
        with self._lock:
            self.commands.append(handler.__name__.lstrip("_"))
            try:
                result = handler(params, event, on_keepalive)
            except _Fail as f:
                return bytes([f.code])
            except (KeyError, TypeError, ValueError, AttributeError):
                return bytes([ERR.INVALID_PARAMETER])
        return b"\0" + (cbor.encode(result) if result is not None else b"")

    def _handlers(self) -> dict[int, Callable[..., dict[Any, Any] | None]]:
        return {
            GET_INFO: self._get_info,
            MAKE_CREDENTIAL: self._make_credential,
            GET_ASSERTION: self._get_assertion,
            GET_NEXT_ASSERTION: self._get_next_assertion,
            CLIENT_PIN: self._client_pin,
            RESET: self._reset,
            CREDENTIAL_MGMT: self._credential_management,
            SELECTION: self._selection,
        }

    # -- user presence -------------------------------------------------------------------------
    def _collect_presence(
        self,
        command: str,
        event: threading.Event | None,
        on_keepalive: Callable[[int], None] | None,
    ) -> None:
        self.touch_requests += 1
        if on_keepalive is not None:
            on_keepalive(STATUS.UPNEEDED)
        answer = self.presence(command)
        if answer is True or answer is Presence.TOUCH:
            if event is not None and event.is_set():
                raise _Fail(ERR.KEEPALIVE_CANCEL)
            return
        if answer is False or answer is Presence.REFUSE:
            raise _Fail(ERR.OPERATION_DENIED)
        deadline = time.monotonic() + self.up_timeout
        while (left := deadline - time.monotonic()) > 0:
            if event is not None:
                if event.wait(min(left, 0.02)):
                    raise _Fail(ERR.KEEPALIVE_CANCEL)
            else:
                time.sleep(min(left, 0.02))
        raise _Fail(ERR.USER_ACTION_TIMEOUT)

    # -- getInfo ---------------------------------------------------------------------------------
    def _get_info(self, params: dict[int, Any], *_: Any) -> dict[int, Any]:
        return {
            0x01: ["FIDO_2_0", "FIDO_2_1"],
            0x02: list(self.extensions),
            0x03: bytes(self.aaguid),
            0x04: {
                "rk": True,
                "up": True,
                "plat": False,
                "clientPin": self.state.pin_hash is not None,
                "credMgmt": True,
                "pinUvAuthToken": True,
                "makeCredUvNotRqd": True,
            },
            0x05: MAX_MSG_SIZE,
            0x06: [2],
            0x07: MAX_CREDS_IN_LIST,
            0x08: MAX_CRED_ID_LENGTH,
            0x09: list(self.transports),
            0x0A: [{"alg": alg, "type": "public-key"} for alg in self.algorithms],
            0x0D: self.state.min_pin_length,
            0x0E: 1,
        }

    # -- pinUvAuth helpers -----------------------------------------------------------------------
    def _check_protocol(self, params: dict[int, Any], key: int) -> None:
        if key not in params:
            raise _Fail(ERR.MISSING_PARAMETER)
        if params[key] != 2:
            raise _Fail(ERR.INVALID_PARAMETER)

    def _verify_token(
        self, message: bytes, param: bytes, permission: int, rp_id: str | None
    ) -> None:
        expected = self._protocol.authenticate(self._token, message)
        if not self._token_in_use or not hmac.compare_digest(expected, bytes(param)):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        if not self._token_permissions & permission:
            raise _Fail(ERR.PIN_AUTH_INVALID)
        if rp_id is not None:
            if self._token_rp_id is None:
                self._token_rp_id = rp_id
            elif self._token_rp_id != rp_id:
                raise _Fail(ERR.PIN_AUTH_INVALID)

    def _zero_length_pin_auth(
        self, event: threading.Event | None, on_keepalive: Callable[[int], None] | None
    ) -> None:
        """A zero-length pinUvAuthParam: the platform asks the person to pick this device."""
        self._collect_presence("select", event, on_keepalive)
        raise _Fail(ERR.PIN_INVALID if self.state.pin_hash is not None else ERR.PIN_NOT_SET)

    def _shared_secret(self, peer: Mapping[int, Any]) -> bytes:
        """ECDH with the platform's key agreement key, then protocol 2's KDF."""
        try:
            if peer[1] != 2 or peer[-1] != 1:
                raise _Fail(ERR.INVALID_PARAMETER)
            x = int.from_bytes(peer[-2], "big")
            y = int.from_bytes(peer[-3], "big")
            public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (KeyError, TypeError, ValueError):
            raise _Fail(ERR.INVALID_PARAMETER) from None
        z = self._key_agreement.exchange(ec.ECDH(), public)
        return bytes(self._protocol.kdf(z))

    def _key_agreement_cose(self) -> dict[int, Any]:
        numbers = self._key_agreement.public_key().public_numbers()
        return {
            1: 2,
            3: -25,
            -1: 1,
            -2: numbers.x.to_bytes(32, "big"),
            -3: numbers.y.to_bytes(32, "big"),
        }

    # -- makeCredential --------------------------------------------------------------------------
    def _make_credential(
        self,
        params: dict[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[int], None] | None,
    ) -> dict[int, Any]:
        pin_auth = params.get(8)
        if pin_auth is not None and len(pin_auth) == 0:
            self._zero_length_pin_auth(event, on_keepalive)
        if pin_auth is not None:
            self._check_protocol(params, 9)
        for required in (1, 2, 3, 4):
            if required not in params:
                raise _Fail(ERR.MISSING_PARAMETER)
        client_data_hash: bytes = params[1]
        rp: Mapping[str, Any] = params[2]
        user: Mapping[str, Any] = params[3]
        if not isinstance(client_data_hash, bytes) or not isinstance(rp, dict):
            raise _Fail(ERR.CBOR_UNEXPECTED_TYPE)
        if not isinstance(user, dict) or not isinstance(user.get("id"), bytes):
            raise _Fail(ERR.CBOR_UNEXPECTED_TYPE)
        rp_id = rp.get("id")
        if not isinstance(rp_id, str):
            raise _Fail(ERR.MISSING_PARAMETER)
        alg = None
        for cred_param in params[4]:
            if cred_param.get("type") == "public-key" and cred_param.get("alg") in self.algorithms:
                alg = int(cred_param["alg"])
                break
        if alg is None:
            raise _Fail(ERR.UNSUPPORTED_ALGORITHM)
        options: Mapping[str, Any] = params.get(7) or {}
        rk = bool(options.get("rk", False))
        if options.get("up") is False:
            raise _Fail(ERR.INVALID_OPTION)
        if options.get("uv"):
            raise _Fail(ERR.INVALID_OPTION)  # no built-in user verification here
        uv = False
        if pin_auth is not None:
            self._verify_token(client_data_hash, pin_auth, PERM_MC, rp_id)
            uv = True
        elif self.state.pin_hash is not None and rk:
            raise _Fail(ERR.PUAT_REQUIRED)

        extensions_in: Mapping[str, Any] = params.get(6) or {}
        cred_protect = int(extensions_in.get("credProtect", 1) or 1)
        if cred_protect not in (1, 2, 3):
            raise _Fail(ERR.INVALID_OPTION)
        want_hmac = extensions_in.get("hmac-secret") is True and "hmac-secret" in self.extensions

        for descriptor in params.get(5) or []:
            existing = self.state.credentials.get(_b64(bytes(descriptor.get("id", b""))))
            if existing is not None and existing.rp_id == rp_id:
                if existing.cred_protect == 3 and not uv:
                    continue
                self._collect_presence("makeCredential", event, on_keepalive)
                raise _Fail(ERR.CREDENTIAL_EXCLUDED)

        self._collect_presence("makeCredential", event, on_keepalive)
        if pin_auth is not None:
            self._token_permissions &= ~(PERM_MC | PERM_GA)

        private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if alg == ES256.ALGORITHM:
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        credential_id = os.urandom(32)
        stored = StoredCredential(
            credential_id=_b64(credential_id),
            rp_id=rp_id,
            user_id=_b64(user["id"]),
            user_name=str(user.get("name", "")),
            alg=alg,
            private_key=_b64(der),
            resident=rk,
            cred_protect=cred_protect,
            cred_random=_b64(os.urandom(64)) if want_hmac else None,
            created=time.time(),
        )
        if rk:  # one discoverable credential per (rp, user): a new one replaces the old
            for key, other in list(self.state.credentials.items()):
                if other.resident and other.rp_id == rp_id and other.user_id == stored.user_id:
                    del self.state.credentials[key]
        self.state.credentials[stored.credential_id] = stored
        self._save()

        extensions_out: dict[str, Any] = {}
        if want_hmac:
            extensions_out["hmac-secret"] = True
        if "credProtect" in extensions_in:
            extensions_out["credProtect"] = cred_protect
        flags = FLAG.UP | FLAG.AT | (FLAG.UV if uv else 0) | (FLAG.ED if extensions_out else 0)
        auth_data = AuthenticatorData.create(
            _sha256(rp_id.encode()),
            FLAG(flags),
            0,
            AttestedCredentialData.create(self.aaguid, credential_id, stored.cose_public()),
            extensions_out or None,
        )
        signature = stored.sign(bytes(auth_data) + client_data_hash)  # self attestation
        return {1: "packed", 2: bytes(auth_data), 3: {"alg": alg, "sig": signature}}

    # -- getAssertion ----------------------------------------------------------------------------
    def _visible(self, cred: StoredCredential, uv: bool, allow_list: bool) -> bool:
        if cred.cred_protect == 3:
            return uv
        if cred.cred_protect == 2:
            return uv or allow_list
        return True

    def _get_assertion(
        self,
        params: dict[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[int], None] | None,
    ) -> dict[int, Any]:
        pin_auth = params.get(6)
        if pin_auth is not None and len(pin_auth) == 0:
            self._zero_length_pin_auth(event, on_keepalive)
        if pin_auth is not None:
            self._check_protocol(params, 7)
        if 1 not in params or 2 not in params:
            raise _Fail(ERR.MISSING_PARAMETER)
        rp_id: str = params[1]
        client_data_hash: bytes = params[2]
        if not isinstance(rp_id, str) or not isinstance(client_data_hash, bytes):
            raise _Fail(ERR.CBOR_UNEXPECTED_TYPE)
        options: Mapping[str, Any] = params.get(5) or {}
        if "rk" in options:
            raise _Fail(ERR.UNSUPPORTED_OPTION)
        if options.get("uv"):
            raise _Fail(ERR.INVALID_OPTION)
        up = options.get("up", True) is not False
        uv = False
        if pin_auth is not None:
            self._verify_token(client_data_hash, pin_auth, PERM_GA, rp_id)
            uv = True

        allow_list = params.get(3) or []
        if allow_list:
            matches = []
            for descriptor in allow_list:
                cred = self.state.credentials.get(_b64(bytes(descriptor.get("id", b""))))
                if cred is not None and cred.rp_id == rp_id and self._visible(cred, uv, True):
                    matches.append(cred)
            matches = matches[:1]  # with an allow list, one assertion is returned
        else:
            matches = [
                c
                for c in self.state.credentials.values()
                if c.resident and c.rp_id == rp_id and self._visible(c, uv, False)
            ]
            matches.sort(key=lambda c: c.created, reverse=True)
        if not matches:
            raise _Fail(ERR.NO_CREDENTIALS)

        if up:
            self._collect_presence("getAssertion", event, on_keepalive)
            if pin_auth is not None:
                self._token_permissions &= ~(PERM_MC | PERM_GA)

        extensions_in: Mapping[str, Any] = params.get(4) or {}
        first = matches[0]
        flags = (FLAG.UP if up else 0) | (FLAG.UV if uv else 0)
        response = self._assertion(first, rp_id, client_data_hash, flags, extensions_in, uv)
        if len(matches) > 1:
            response[5] = len(matches)
            self._pending = _PendingAssertions(
                rp_id,
                client_data_hash,
                flags,
                [c.credential_id for c in matches[1:]],
                dict(extensions_in) if extensions_in else None,
            )
        else:
            self._pending = None
        return response

    def _assertion(
        self,
        cred: StoredCredential,
        rp_id: str,
        client_data_hash: bytes,
        flags: int,
        extensions_in: Mapping[str, Any],
        uv: bool,
    ) -> dict[int, Any]:
        extensions_out: dict[str, Any] = {}
        hmac_in = extensions_in.get("hmac-secret")
        if hmac_in is not None and "hmac-secret" in self.extensions:
            output = self._hmac_secret(cred, hmac_in, uv)
            if output is not None:
                extensions_out["hmac-secret"] = output
        cred.sign_count += 1
        self._save()
        auth_data = AuthenticatorData.create(
            _sha256(rp_id.encode()),
            FLAG(flags | (FLAG.ED if extensions_out else 0)),
            cred.sign_count,
            b"",
            extensions_out or None,
        )
        response: dict[int, Any] = {
            1: {"id": cred.raw_id, "type": "public-key"},
            2: bytes(auth_data),
            3: cred.sign(bytes(auth_data) + client_data_hash),
        }
        if cred.resident:
            response[4] = {"id": _unb64(cred.user_id)}
            if uv:
                response[4]["name"] = cred.user_name
        return response

    def _hmac_secret(
        self, cred: StoredCredential, ext: Mapping[int, Any], uv: bool
    ) -> bytes | None:
        if not isinstance(ext, dict) or any(k not in ext for k in (1, 2, 3)):
            raise _Fail(ERR.MISSING_PARAMETER)
        if ext.get(4, 1) != 2:
            raise _Fail(ERR.INVALID_PARAMETER)
        shared = self._shared_secret(ext[1])
        salt_enc, salt_auth = bytes(ext[2]), bytes(ext[3])
        if not hmac.compare_digest(self._protocol.authenticate(shared, salt_enc), salt_auth):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        if len(salt_enc) not in (16 + 32, 16 + 64):
            raise _Fail(ERR.INVALID_LENGTH)
        salts = self._protocol.decrypt(shared, salt_enc)
        if cred.cred_random is None:
            return None
        cred_random = _unb64(cred.cred_random)
        key = cred_random[32:] if uv else cred_random[:32]
        outputs = b"".join(
            hmac.new(key, salts[i : i + 32], hashlib.sha256).digest()
            for i in range(0, len(salts), 32)
        )
        return bytes(self._protocol.encrypt(shared, outputs))

    def _get_next_assertion(self, params: dict[int, Any], *_: Any) -> dict[int, Any]:
        pending = self._pending
        if pending is None or not pending.remaining:
            raise _Fail(ERR.NOT_ALLOWED)
        cred = self.state.credentials.get(pending.remaining.pop(0))
        if cred is None:
            raise _Fail(ERR.NOT_ALLOWED)
        return self._assertion(
            cred,
            pending.rp_id,
            pending.client_data_hash,
            pending.flags,
            {},  # extensions apply to the first assertion only in this authenticator
            bool(pending.flags & FLAG.UV),
        )

    # -- clientPIN -------------------------------------------------------------------------------
    def _client_pin(self, params: dict[int, Any], *_: Any) -> dict[int, Any] | None:
        self._check_protocol(params, 1)
        sub = params.get(2)
        if sub == 0x01:  # getPINRetries
            return {3: self.state.pin_retries}
        if sub == 0x02:  # getKeyAgreement
            return {1: self._key_agreement_cose()}
        if sub == 0x03:
            return self._set_pin(params)
        if sub == 0x04:
            return self._change_pin(params)
        if sub in (0x05, 0x09):
            return self._get_pin_token(params, legacy=sub == 0x05)
        if sub in (0x06, 0x07):
            raise _Fail(ERR.INVALID_SUBCOMMAND)  # no built-in UV
        if sub is None:
            raise _Fail(ERR.MISSING_PARAMETER)
        raise _Fail(ERR.INVALID_SUBCOMMAND)

    def _decrypt_new_pin(self, shared: bytes, new_pin_enc: bytes) -> str:
        if len(new_pin_enc) != 16 + 64:
            raise _Fail(ERR.INVALID_PARAMETER)
        padded = self._protocol.decrypt(shared, new_pin_enc)
        pin = padded.split(b"\0", 1)[0]
        try:
            text = pin.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fail(ERR.PIN_POLICY_VIOLATION) from None
        if len(text) < self.state.min_pin_length or len(pin) > 63:
            raise _Fail(ERR.PIN_POLICY_VIOLATION)
        return text

    def _set_pin(self, params: dict[int, Any]) -> None:
        for required in (3, 4, 5):
            if required not in params:
                raise _Fail(ERR.MISSING_PARAMETER)
        if self.state.pin_hash is not None:
            raise _Fail(ERR.NOT_ALLOWED)
        shared = self._shared_secret(params[3])
        new_pin_enc = bytes(params[5])
        if not hmac.compare_digest(self._protocol.authenticate(shared, new_pin_enc), params[4]):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        pin = self._decrypt_new_pin(shared, new_pin_enc)
        self.state.pin_hash = _sha256(pin.encode())[:16].hex()
        self.state.pin_retries = MAX_PIN_RETRIES
        self._save()
        return None

    def _check_pin_hash(self, shared: bytes, pin_hash_enc: bytes) -> None:
        """The PIN check of CTAP 2.1 §6.5.5.5: retries are spent before the comparison."""
        if self.state.pin_retries <= 0:
            raise _Fail(ERR.PIN_BLOCKED)
        if self._consecutive_mismatches >= 3:
            raise _Fail(ERR.PIN_AUTH_BLOCKED)
        self.state.pin_retries -= 1
        self._save()
        if len(pin_hash_enc) != 32:
            raise _Fail(ERR.INVALID_PARAMETER)
        pin_hash = self._protocol.decrypt(shared, pin_hash_enc)
        assert self.state.pin_hash is not None
        if not hmac.compare_digest(pin_hash, bytes.fromhex(self.state.pin_hash)):
            self._key_agreement = ec.generate_private_key(ec.SECP256R1())
            self._consecutive_mismatches += 1
            if self.state.pin_retries <= 0:
                raise _Fail(ERR.PIN_BLOCKED)
            if self._consecutive_mismatches >= 3:
                raise _Fail(ERR.PIN_AUTH_BLOCKED)
            raise _Fail(ERR.PIN_INVALID)
        self._consecutive_mismatches = 0
        self.state.pin_retries = MAX_PIN_RETRIES
        self._save()

    def _change_pin(self, params: dict[int, Any]) -> None:
        for required in (3, 4, 5, 6):
            if required not in params:
                raise _Fail(ERR.MISSING_PARAMETER)
        if self.state.pin_hash is None:
            raise _Fail(ERR.PIN_NOT_SET)
        shared = self._shared_secret(params[3])
        new_pin_enc, pin_hash_enc = bytes(params[5]), bytes(params[6])
        expected = self._protocol.authenticate(shared, new_pin_enc + pin_hash_enc)
        if not hmac.compare_digest(expected, params[4]):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        self._check_pin_hash(shared, pin_hash_enc)
        pin = self._decrypt_new_pin(shared, new_pin_enc)
        self.state.pin_hash = _sha256(pin.encode())[:16].hex()
        self._save()
        self._reset_token()
        return None

    def _get_pin_token(self, params: dict[int, Any], legacy: bool) -> dict[int, Any]:
        for required in (3, 6):
            if required not in params:
                raise _Fail(ERR.MISSING_PARAMETER)
        if legacy:
            if 9 in params or 10 in params:
                raise _Fail(ERR.INVALID_PARAMETER)
            permissions = PERM_MC | PERM_GA
        else:
            permissions = int(params.get(9, 0))
            if not permissions:
                raise _Fail(ERR.MISSING_PARAMETER)
            if permissions & ~0x3F:
                raise _Fail(ERR.UNAUTHORIZED_PERMISSION)
        if self.state.pin_hash is None:
            raise _Fail(ERR.PIN_NOT_SET)
        shared = self._shared_secret(params[3])
        self._check_pin_hash(shared, bytes(params[6]))
        self._reset_token()
        self._token_permissions = permissions
        self._token_rp_id = params.get(10)
        self._token_in_use = True
        return {2: bytes(self._protocol.encrypt(shared, self._token))}

    # -- reset, selection, credential management ----------------------------------------------
    def _reset(
        self,
        params: dict[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[int], None] | None,
    ) -> None:
        self._collect_presence("reset", event, on_keepalive)
        self.state = _State(credentials={})
        self._save()
        self.power_cycle()
        return None

    def _selection(
        self,
        params: dict[int, Any],
        event: threading.Event | None,
        on_keepalive: Callable[[int], None] | None,
    ) -> None:
        self._collect_presence("selection", event, on_keepalive)
        return None

    def _credential_management(self, params: dict[int, Any], *_: Any) -> dict[int, Any] | None:
        sub = params.get(1)
        if sub is None:
            raise _Fail(ERR.MISSING_PARAMETER)
        sub_params = params.get(2)
        if 4 not in params:
            raise _Fail(ERR.PUAT_REQUIRED)
        self._check_protocol(params, 3)
        message = bytes([sub]) + (cbor.encode(sub_params) if sub_params is not None else b"")
        self._verify_token(message, params[4], PERM_CM, None)
        if sub == 0x01:  # getCredsMetadata
            resident = sum(1 for c in self.state.credentials.values() if c.resident)
            return {1: resident, 2: max(0, 100 - resident)}
        if sub == 0x06:  # deleteCredential
            if not isinstance(sub_params, dict) or 2 not in sub_params:
                raise _Fail(ERR.MISSING_PARAMETER)
            key = _b64(bytes(sub_params[2].get("id", b"")))
            if key not in self.state.credentials:
                raise _Fail(ERR.NO_CREDENTIALS)
            del self.state.credentials[key]
            self._save()
            return None
        raise _Fail(ERR.INVALID_SUBCOMMAND)


class SoftCtapDevice(CtapDevice):
    """The authenticator as a `fido2.ctap.CtapDevice`, for in-process use (like USB HID)."""

    def __init__(self, authenticator: SoftAuthenticator) -> None:
        self.authenticator = authenticator
        self.closed = False

    @property
    def capabilities(self) -> int:
        return CAPABILITY.CBOR | CAPABILITY.NMSG

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: threading.Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        if cmd == CTAPHID.CBOR:
            return self.authenticator.process(data, event, on_keepalive)  # type: ignore[arg-type]
        if cmd == CTAPHID.PING:
            return data
        raise CtapError(ERR.INVALID_COMMAND)

    def close(self) -> None:
        self.closed = True

    @classmethod
    def list_devices(cls) -> Iterator[SoftCtapDevice]:
        return iter(())

    def __repr__(self) -> str:
        return "SoftCtapDevice()"


def _atr(historical: bytes) -> bytes:
    """An ATR offering T=1, with `historical` bytes and the right check byte."""
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + historical
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes([tck])


SW_OK = b"\x90\x00"
SW_NOT_FOUND = b"\x6a\x82"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"
SW_CLA_NOT_SUPPORTED = b"\x6e\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_CONDITIONS = b"\x69\x85"
SW_UPDATE = b"\x91\x00"


class FidoCard:
    """The authenticator as an ISO 7816-4 card with the FIDO applet (CTAP 2.1 §11.3, NFC)."""

    atr = _atr(b"\x80\x73\xc0\x21\xc0\x57\x59\x75\x62\x69\x4b\x65\x79")

    def __init__(self, authenticator: SoftAuthenticator) -> None:
        self.authenticator = authenticator
        self._lock = threading.Lock()
        self.power_on()

    # vpcd control messages
    def power_on(self) -> None:
        self._chain = b""
        self._out = b""
        self._selected = False
        self._worker: threading.Thread | None = None
        self._result: bytes | None = None
        self._cancel = threading.Event()
        self._waiting_for_touch = False

    def power_off(self) -> None:
        self._cancel.set()
        self.power_on()

    def reset(self) -> None:
        self.power_off()

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            return self._transmit(apdu)

    # APDU handling
    def _transmit(self, apdu: bytes) -> bytes:
        if len(apdu) < 4:
            return SW_WRONG_LENGTH
        cla, ins, p1, _p2 = apdu[:4]
        try:
            data, le = _parse_body(apdu[4:])
        except ValueError:
            return SW_WRONG_LENGTH
        if cla & 0x10:  # command chaining: more to come
            self._chain += data
            return SW_OK
        data, self._chain = self._chain + data, b""
        if ins == 0xC0 and cla & 0x80 == 0:  # GET RESPONSE
            return self._send(b"", le, continued=True)
        if ins == 0xA4 and cla & 0x80 == 0:
            if p1 == 0x04 and data == FIDO_AID:
                self._selected = True
                return self._send(b"FIDO_2_0", le)
            return SW_NOT_FOUND
        if not self._selected:
            return SW_CONDITIONS
        if cla & 0x80 and ins == 0x10:  # NFCCTAP_MSG
            return self._ctap_msg(data, le, status_updates=bool(p1 & 0x80))
        if cla & 0x80 and ins == 0x11:  # NFCCTAP_GETRESPONSE
            if p1 == 0x11:
                self._cancel.set()
            return self._poll(le)
        if cla & 0x80 == 0 and ins in (0x01, 0x02, 0x03):
            return SW_INS_NOT_SUPPORTED  # no CTAP1/U2F
        if cla not in (0x00, 0x80):
            return SW_CLA_NOT_SUPPORTED
        return SW_INS_NOT_SUPPORTED

    def _send(self, payload: bytes, le: int, continued: bool = False) -> bytes:
        """Answer with at most `le` bytes; the rest waits for GET RESPONSE (61xx)."""
        if continued:
            payload = self._out
        limit = le or 256
        chunk, self._out = payload[:limit], payload[limit:]
        if self._out:
            return chunk + bytes([0x61, min(len(self._out), 256) & 0xFF])
        return chunk + SW_OK

    def _ctap_msg(self, request: bytes, le: int, status_updates: bool) -> bytes:
        if self._worker is not None and self._worker.is_alive():
            return SW_CONDITIONS
        self._cancel = threading.Event()
        self._result = None
        self._waiting_for_touch = False
        if not status_updates:
            return self._send(self.authenticator.process(request, self._cancel), le)

        def keepalive(status: int) -> None:
            self._waiting_for_touch = status == STATUS.UPNEEDED

        def work() -> None:
            self._result = self.authenticator.process(request, self._cancel, keepalive)

        self._worker = threading.Thread(target=work, name="fido-card", daemon=True)
        self._worker.start()
        return self._poll(le)

    def _poll(self, le: int) -> bytes:
        worker = self._worker
        if worker is None:
            return SW_CONDITIONS
        worker.join(0.1)
        if worker.is_alive():
            status = STATUS.UPNEEDED if self._waiting_for_touch else STATUS.PROCESSING
            return bytes([status]) + SW_UPDATE
        self._worker = None
        result, self._result = self._result or b"\x7f", None
        return self._send(result, le)


def _parse_body(body: bytes) -> tuple[bytes, int]:
    """(data, Le) of an APDU body in short or extended form."""
    if not body:
        return b"", 0
    if len(body) == 1:
        return b"", body[0]
    if body[0] == 0 and len(body) >= 3:  # extended
        lc = int.from_bytes(body[1:3], "big")
        if len(body) == 3:
            return b"", lc  # extended Le only
        data = body[3 : 3 + lc]
        rest = body[3 + lc :]
        if len(data) != lc or len(rest) not in (0, 2):
            raise ValueError("bad extended APDU")
        return data, int.from_bytes(rest, "big") if rest else 0
    lc = body[0]
    data = body[1 : 1 + lc]
    rest = body[1 + lc :]
    if len(data) != lc or len(rest) > 1:
        raise ValueError("bad short APDU")
    return data, rest[0] if rest else 0


# -- Keystore configs and verification for the FIDO backend tests -------------------------------
FIDO_PIN_ENV = "SR_TEST_FIDO_PIN"
FIDO_VAULT_PASS_ENV = "SR_TEST_FIDO_VAULT_PASS"
FIDO_VAULT_PASS = "fido vault passphrase 42"


def write_fido_config(
    directory: Path,
    device: str = "auto",
    *,
    fido_extra: str = "",
    vault_extra: str = "",
    name: str = "strongroom.toml",
) -> Path:
    """A config with a cheap-KDF vault and a `fido` backend on `device` (PIN from the env)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(
        "[keystore]\n"
        f'data_dir = "{directory / "data"}"\n'
        'order = ["fido", "vault"]\n'
        "\n"
        "[backends.vault]\n"
        'type = "vault"\n'
        f'passphrase = "env:{FIDO_VAULT_PASS_ENV}"\n'
        "kdf_memory_kib = 8192\n"
        "kdf_iterations = 1\n"
        f"{vault_extra}\n"
        "[backends.fido]\n"
        'type = "fido"\n'
        f'device = "{device}"\n'
        f'pin = "env:{FIDO_PIN_ENV}"\n'
        + ("" if "touch_timeout" in fido_extra else "touch_timeout = 5\n")
        + f"{fido_extra}\n",
        encoding="utf-8",
    )
    return path


RP_ID = "strongroom.local"


def open_with_authenticator(
    authenticator: SoftAuthenticator, config: Path, *, backend: str = "fido", **options: Any
) -> Keystore:
    """`strongroom.open(config)`, with `authenticator` as the device of the `backend` fido
    backend: passed in as its `device_factory`, whatever its `device` setting says."""
    from strongroom import config as config_mod
    from strongroom.keystore import Keystore

    return Keystore(
        config_mod.load(config),
        device_factories={backend: lambda: SoftCtapDevice(authenticator)},
        **options,
    )


def server_verify(ks: Keystore, name: str, data: bytes, signature: bytes) -> None:
    """python-fido2's Fido2Server checks the registration, then the assertion over `data`."""
    backend = ks.backend("fido")
    registration = backend.registration(ks.info(name))  # type: ignore[attr-defined]
    server = Fido2Server(PublicKeyCredentialRpEntity(id=RP_ID, name="Strongroom"))
    client_data = CollectedClientData(registration["clientDataJSON"])
    attestation = AttestationObject(registration["attestationObject"])
    auth_data = server.register_complete(
        {"challenge": websafe_encode(client_data.challenge), "user_verification": None},
        RegistrationResponse(
            raw_id=attestation.auth_data.credential_data.credential_id,  # type: ignore[union-attr]
            response={  # type: ignore[arg-type]
                "clientDataJSON": client_data,
                "attestationObject": attestation,
            },
        ),
    )
    credential = auth_data.credential_data
    assert credential is not None
    assertion = Assertion.decode(signature)
    try:
        server.authenticate_complete(
            {"challenge": websafe_encode(challenge_for(data)), "user_verification": None},
            [credential],
            assertion.to_webauthn(),
        )
    except ValueError as e:
        raise InvalidSignature(str(e)) from None


__all__ = [
    "AAGUID",
    "FIDO_AID",
    "FIDO_PIN_ENV",
    "FIDO_VAULT_PASS",
    "FIDO_VAULT_PASS_ENV",
    "MAX_PIN_RETRIES",
    "RP_ID",
    "FidoCard",
    "Presence",
    "SoftAuthenticator",
    "SoftCtapDevice",
    "StoredCredential",
    "server_verify",
    "write_fido_config",
]
