"""The PKCS#11 module a client sees: slots and tokens (one per configured key set),
sessions, login, objects and the operations, one `Connection` per client.

Every key operation is a `KeyAPI` call (a `Keystore` in process, a `RemoteKeystore`
against `strongroom serve`), so each is usage-checked and audited there; this module only
translates PKCS#11's calls and formats. Sessions, object handles and operations live in
the client's `Connection`: another client cannot see or use them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..algorithms import DIGEST_INFO_PREFIXES, RSA_PKCS1V15_RAW
from ..api import KeyAPI
from ..errors import (
    AuthenticationFailed,
    BackendUnavailable,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
)
from ..types import KeyInfo, KeyType, Usage
from . import ck, wire
from .objects import EC_PARAMS, GCM_BACKENDS, SENSITIVE, Obj, key_objects

log = logging.getLogger("strongroom.pkcs11server")

Reply = tuple[Any, ...]
"""A call's reply values, in its reply signature's order."""
MAX_SESSIONS = 256
"""Sessions one client may hold open."""
MAX_RANDOM = 1 << 20
"""The most bytes one C_GenerateRandom returns."""
MAX_PIN = 256
MANUFACTURER = "Strongroom"
VERSION = (0, 1)


@dataclass(frozen=True)
class TokenSpec:
    """One slot and its token: a label and the glob patterns of the keys it holds."""

    label: str
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """What the server offers: `[pkcs11_server]` in the config, or the command line."""

    tokens: tuple[TokenSpec, ...]
    pin: str = field(repr=False, default="")
    """The PIN C_Login checks (compared in constant time; never logged)."""
    backend: str | None = None
    """Where C_GenerateKey and C_GenerateKeyPair make keys (None: the keystore's order)."""
    login: Callable[[str], KeyAPI] | None = field(default=None, repr=False)
    """Against `strongroom serve`: C_Login's PIN is a tenant's API token, and this opens a
    client of the service with it, whose token's policy then decides what the client may
    do. Set, `pin` is not used."""
    allow_destroy: bool = False
    """Whether C_DestroyObject deletes a key (`KeyAPI.schedule_deletion`: after the
    keystore's deletion_wait, at once without one); False: CKR_ACTION_PROHIBITED."""


@dataclass
class Operation:
    """A sign, verify, encrypt or decrypt in progress in one session."""

    kind: str
    key: Obj
    mechanism: wire.Mechanism
    api: KeyAPI
    """The key API the operation runs on (a logged-in tenant's, against the service)."""
    data: bytearray = field(default_factory=bytearray, repr=False)
    result: bytes | None = field(default=None, repr=False)
    """A result computed for a length query, returned by the next call."""


@dataclass
class Session:
    slot: int
    rw: bool
    find: list[int] | None = None
    ops: dict[str, Operation] = field(default_factory=dict)


class CkError(Exception):
    """A call fails with this CK_RV."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"CK_RV 0x{rv:x}")
        self.rv = rv


SIGN_MECHANISMS = {
    ck.CKM_ECDSA: None,
    ck.CKM_ECDSA_SHA1: "sha1",
    ck.CKM_ECDSA_SHA224: "sha224",
    ck.CKM_ECDSA_SHA256: "sha256",
    ck.CKM_ECDSA_SHA384: "sha384",
    ck.CKM_ECDSA_SHA512: "sha512",
}
RSA_SIGN = (
    ck.CKM_RSA_PKCS,
    ck.CKM_SHA256_RSA_PKCS,
    ck.CKM_SHA384_RSA_PKCS,
    ck.CKM_SHA512_RSA_PKCS,
    ck.CKM_RSA_PKCS_PSS,
    ck.CKM_SHA256_RSA_PKCS_PSS,
)
RSA_HASHED = {ck.CKM_SHA384_RSA_PKCS: "sha384", ck.CKM_SHA512_RSA_PKCS: "sha512"}
"""PKCS#1 v1.5 in a hash the keystore's own algorithms do not name (or name only for a
whole message): the server hashes and builds the DigestInfo, the keystore signs that
block (pkcs1v15-raw), as for a client's CKM_RSA_PKCS."""
# (min key size, max key size, flags) of each mechanism served (C_GetMechanismInfo).
MECHANISMS: dict[int, tuple[int, int, int]] = {
    **{
        m: (256, 384, ck.CKF_SIGN | ck.CKF_VERIFY | ck.CKF_EC_F_P | ck.CKF_EC_NAMEDCURVE
            | ck.CKF_EC_UNCOMPRESS)
        for m in SIGN_MECHANISMS
    },
    **{m: (2048, 4096, ck.CKF_SIGN | ck.CKF_VERIFY) for m in RSA_SIGN},
    ck.CKM_RSA_PKCS_OAEP: (2048, 4096, ck.CKF_ENCRYPT | ck.CKF_DECRYPT),
    ck.CKM_EDDSA: (255, 255, ck.CKF_SIGN | ck.CKF_VERIFY),
    ck.CKM_SHA256_HMAC: (256, 256, ck.CKF_SIGN | ck.CKF_VERIFY),
    ck.CKM_AES_GCM: (32, 32, ck.CKF_DECRYPT),
    ck.CKM_EC_KEY_PAIR_GEN: (256, 384, ck.CKF_GENERATE_KEY_PAIR | ck.CKF_EC_F_P
                             | ck.CKF_EC_NAMEDCURVE | ck.CKF_EC_UNCOMPRESS),
    ck.CKM_RSA_PKCS_KEY_PAIR_GEN: (2048, 4096, ck.CKF_GENERATE_KEY_PAIR),
    ck.CKM_EC_EDWARDS_KEY_PAIR_GEN: (255, 255, ck.CKF_GENERATE_KEY_PAIR),
    ck.CKM_AES_KEY_GEN: (32, 32, ck.CKF_GENERATE),
    ck.CKM_GENERIC_SECRET_KEY_GEN: (256, 256, ck.CKF_GENERATE),
}  # fmt: skip
GCM_IV = 12
GCM_TAG_BITS = 128
"""What CKM_AES_GCM decrypts: the keystore's AES-256 ciphertext is nonce(12) ‖ ct ‖ tag(16)
in the backends that use GCM (the vault, pkcs11), so a 96-bit IV and a 128-bit tag."""
KEY_PAIR_GEN = {
    ck.CKM_EC_KEY_PAIR_GEN,
    ck.CKM_RSA_PKCS_KEY_PAIR_GEN,
    ck.CKM_EC_EDWARDS_KEY_PAIR_GEN,
}
KEY_GEN = {ck.CKM_AES_KEY_GEN, ck.CKM_GENERIC_SECRET_KEY_GEN}
RSA_BITS = {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}
CURVES = {params: t for t, params in EC_PARAMS.items() if t is not KeyType.ED25519}
ED25519_NAMES = (EC_PARAMS[KeyType.ED25519], b"\x13\x0cedwards25519", b"\x13\x07Ed25519")
"""CKA_EC_PARAMS of an Ed25519 key: the OID, or the printableString PKCS #11 3.0 names."""

OAEP_VARIANTS = {
    (ck.CKM_SHA256, ck.CKG_MGF1_SHA256): "oaep-sha256",
    (ck.CKM_SHA_1, ck.CKG_MGF1_SHA1): "oaep-sha1",
}
"""CKM_RSA_PKCS_OAEP's (hash, MGF) pairs served, as the keystore's algorithm names."""

MECHANISM_FLAGS = {
    "sign": ck.CKF_SIGN,
    "verify": ck.CKF_VERIFY,
    "encrypt": ck.CKF_ENCRYPT,
    "decrypt": ck.CKF_DECRYPT,
}


def _ck_error(e: Exception) -> int:
    """The CK_RV for a keystore error (never its message: that stays in the log)."""
    if isinstance(e, KeyNotFound):
        return ck.CKR_KEY_HANDLE_INVALID
    if isinstance(e, IntegrityError):
        return ck.CKR_ENCRYPTED_DATA_INVALID
    if isinstance(e, PolicyViolation):
        return ck.CKR_KEY_FUNCTION_NOT_PERMITTED
    if isinstance(e, UnsupportedOperation):
        return ck.CKR_MECHANISM_INVALID
    if isinstance(e, InvalidArgument):
        return ck.CKR_DATA_INVALID
    if isinstance(e, BackendUnavailable):
        return ck.CKR_DEVICE_ERROR
    return ck.CKR_FUNCTION_FAILED


class Connection:
    """One client's module state: initialised or not, logged in or not, its sessions,
    object handles and operations. Not shared between clients, so not locked."""

    def __init__(self, ks: KeyAPI | None, settings: Settings, version: int = 0) -> None:
        self.ks = ks
        """The key API for what is visible before C_Login (None: nothing is)."""
        self._logins: dict[int, KeyAPI] = {}
        """Per slot: the client of the service that C_Login opened with a tenant's token."""
        self.settings = settings
        self.version = version
        self.initialized = False
        self.logged_in: set[int] = set()
        self.sessions: dict[int, Session] = {}
        self._next_session = 1
        self.objects: dict[int, Obj] = {}
        self._handles: dict[tuple[int, str, int, int], int] = {}
        self._next_handle = 1
        self._backend_types: dict[int, dict[str, str]] = {}
        self._calls: dict[str, Callable[..., tuple[Any, ...]]] = {
            name: getattr(self, name) for name, _, _ in wire.CALLS if hasattr(self, name)
        }

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, body: bytes) -> bytes:
        """One request body → its reply body (an ERROR reply for a CK_RV other than OK)."""
        try:
            call = wire.decode(body, self.version)
        except wire.UnknownMechanism as e:  # the frame was read whole: the stream is in step
            served = e.call in self._calls
            return wire.error(ck.CKR_MECHANISM_INVALID if served else ck.CKR_FUNCTION_NOT_SUPPORTED)
        except StrongroomError as e:
            log.info("a malformed request: %s", e)
            return wire.error(ck.CKR_DEVICE_ERROR)
        method = self._calls.get(call.name)
        if method is None:
            return wire.error(ck.CKR_FUNCTION_NOT_SUPPORTED)
        if not self.initialized and call.name != "C_Initialize":
            return wire.error(ck.CKR_CRYPTOKI_NOT_INITIALIZED)
        try:
            values = method(*call.args)
        except CkError as e:
            return wire.error(e.rv)
        except InvalidSignature:
            return wire.error(ck.CKR_SIGNATURE_INVALID)
        except StrongroomError as e:
            log.info("%s failed: %s", call.name, type(e).__name__)
            return wire.error(_ck_error(e))
        except Exception as e:  # a bug must not end the client's connection
            # The type only: a message may carry a key's or a request's bytes.
            log.error("%s failed unexpectedly: %s", call.name, type(e).__name__)
            return wire.error(ck.CKR_FUNCTION_FAILED)
        return wire.reply(call.call_id, *values)

    # -- general ----------------------------------------------------------------------------------
    def C_Initialize(self, handshake: wire.ByteArray, present: int, reserved: Any) -> Reply:
        if handshake.data != wire.HANDSHAKE:
            raise CkError(ck.CKR_GENERAL_ERROR)
        if self.initialized:
            raise CkError(ck.CKR_CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True
        return ()

    def C_Finalize(self) -> Reply:
        self.initialized = False
        self.sessions.clear()
        self.close()
        return ()

    def close(self) -> None:
        """End every login (a client that goes away without C_Finalize too)."""
        for slot in list(self.logged_in):
            self._end_login(slot)

    def _end_login(self, slot: int) -> None:
        """Log the slot's user out: what the login showed goes with it. Its sessions'
        operations and searches end, and the handles of its private objects become
        invalid (PKCS #11 C_Logout); after a tenant's login (C_Login with an API token)
        every object handle of the slot does, as all it showed was that tenant's. A
        handle is never reused, so a later login cannot reach an object through it."""
        tenant = slot in self._logins
        for session in self.sessions.values():
            if session.slot == slot:
                session.ops.clear()
                session.find = None
        for ident, handle in list(self._handles.items()):
            obj = self.objects.get(handle)
            if ident[0] == slot and (tenant or obj is None or obj.private):
                del self._handles[ident]
                self.objects.pop(handle, None)
        self.logged_in.discard(slot)
        self._backend_types.pop(slot, None)
        api = self._logins.pop(slot, None)
        if api is not None:
            try:
                api.close()
            except StrongroomError as e:  # pragma: no cover - closing a client
                log.info("closing a login's client: %s", type(e).__name__)

    def _api(self, slot: int) -> KeyAPI:
        """The key API for the slot: its login's, else the server's own."""
        api = self._logins.get(slot, self.ks)
        if api is None:
            raise CkError(ck.CKR_USER_NOT_LOGGED_IN)
        return api

    def C_GetInfo(self) -> Reply:
        return (
            (2, 40),
            wire.padded(MANUFACTURER, 32),
            0,
            wire.padded("Strongroom keystore", 32),
            VERSION,
        )

    def C_GetSlotList(self, token_present: int, count: int) -> Reply:
        slots = tuple(range(len(self.settings.tokens)))
        return (self._ulongs(slots, count),)

    @staticmethod
    def _ulongs(values: tuple[int, ...], room: int) -> wire.Out:
        if room < len(values):  # a length query, or a buffer too small
            return wire.Out(None, len(values))
        return wire.Out(values, len(values))

    def _token(self, slot: int) -> TokenSpec:
        if not 0 <= slot < len(self.settings.tokens):
            raise CkError(ck.CKR_SLOT_ID_INVALID)
        return self.settings.tokens[slot]

    def C_GetSlotInfo(self, slot: int) -> Reply:
        token = self._token(slot)
        return (
            wire.padded(f"Strongroom {token.label}", 64),
            wire.padded(MANUFACTURER, 32),
            ck.CKF_TOKEN_PRESENT,
            VERSION,
            VERSION,
        )

    def C_GetTokenInfo(self, slot: int) -> Reply:
        token = self._token(slot)
        flags = (
            ck.CKF_RNG | ck.CKF_LOGIN_REQUIRED | ck.CKF_USER_PIN_INITIALIZED
            | ck.CKF_TOKEN_INITIALIZED
        )  # fmt: skip
        mine = [s for s in self.sessions.values() if s.slot == slot]
        return (
            wire.padded(token.label, 32),
            wire.padded(MANUFACTURER, 32),
            wire.padded("keystore", 16),
            wire.padded(f"{slot:016d}", 16),
            flags,
            MAX_SESSIONS,
            len(mine),
            MAX_SESSIONS,
            sum(1 for s in mine if s.rw),
            MAX_PIN,
            1,
            ck.UNAVAILABLE,
            ck.UNAVAILABLE,
            ck.UNAVAILABLE,
            ck.UNAVAILABLE,
            VERSION,
            VERSION,
            wire.padded("", 16),
        )

    def C_GetMechanismList(self, slot: int, count: int) -> Reply:
        self._token(slot)
        return (self._ulongs(tuple(MECHANISMS), count),)

    def C_GetMechanismInfo(self, slot: int, mechanism: int) -> Reply:
        self._token(slot)
        if mechanism not in MECHANISMS:
            raise CkError(ck.CKR_MECHANISM_INVALID)
        return MECHANISMS[mechanism]

    # -- sessions and login -----------------------------------------------------------------------
    def C_OpenSession(self, slot: int, flags: int) -> Reply:
        self._token(slot)
        if not flags & ck.CKF_SERIAL_SESSION:
            raise CkError(ck.CKR_SESSION_PARALLEL_NOT_SUPPORTED)
        if len(self.sessions) >= MAX_SESSIONS:
            raise CkError(ck.CKR_SESSION_COUNT)
        handle = self._next_session
        self._next_session += 1
        self.sessions[handle] = Session(slot, bool(flags & ck.CKF_RW_SESSION))
        return (handle,)

    def _session(self, handle: int) -> Session:
        session = self.sessions.get(handle)
        if session is None:
            raise CkError(ck.CKR_SESSION_HANDLE_INVALID)
        return session

    def C_CloseSession(self, handle: int) -> Reply:
        session = self._session(handle)
        del self.sessions[handle]
        if not any(s.slot == session.slot for s in self.sessions.values()):
            self._end_login(session.slot)  # the last session closes the login too
        return ()

    def C_CloseAllSessions(self, slot: int) -> Reply:
        self._token(slot)
        for handle in [h for h, s in self.sessions.items() if s.slot == slot]:
            del self.sessions[handle]
        self._end_login(slot)
        return ()

    def C_GetSessionInfo(self, handle: int) -> Reply:
        session = self._session(handle)
        user = session.slot in self.logged_in
        state = (
            (ck.CKS_RW_USER_FUNCTIONS if user else ck.CKS_RW_PUBLIC_SESSION)
            if session.rw
            else (ck.CKS_RO_USER_FUNCTIONS if user else ck.CKS_RO_PUBLIC_SESSION)
        )
        flags = ck.CKF_SERIAL_SESSION | (ck.CKF_RW_SESSION if session.rw else 0)
        return (session.slot, state, flags, 0)

    def C_Login(self, handle: int, user: int, pin: wire.ByteArray) -> Reply:
        session = self._session(handle)
        if user == ck.CKU_CONTEXT_SPECIFIC:
            raise CkError(ck.CKR_OPERATION_NOT_INITIALIZED)
        if user != ck.CKU_USER:
            raise CkError(ck.CKR_USER_TYPE_INVALID)  # there is no security officer here
        if session.slot in self.logged_in:
            raise CkError(ck.CKR_USER_ALREADY_LOGGED_IN)
        given = pin.data or b""
        if self.settings.login is not None:
            self._logins[session.slot] = self._tenant_login(session.slot, given)
        elif not self.settings.pin or not hmac.compare_digest(given, self.settings.pin.encode()):
            log.warning("a wrong PIN for token %s", self._token(session.slot).label)
            raise CkError(ck.CKR_PIN_INCORRECT)
        self.logged_in.add(session.slot)
        return ()

    def _tenant_login(self, slot: int, token: bytes) -> KeyAPI:
        """A client of the service with the API token given as the PIN, once the service
        has accepted it (a wrong token is CKR_PIN_INCORRECT; the token is never logged)."""
        assert self.settings.login is not None
        try:
            text = token.decode()
        except UnicodeDecodeError:
            raise CkError(ck.CKR_PIN_INCORRECT) from None
        if not text or len(text) > MAX_PIN:
            raise CkError(ck.CKR_PIN_INCORRECT)
        try:
            api = self.settings.login(text)
        except StrongroomError as e:
            log.info("C_Login: no client of the service: %s", type(e).__name__)
            raise CkError(ck.CKR_DEVICE_ERROR) from None
        try:
            api.keys()  # the service checks the token
        except AuthenticationFailed:
            api.close()
            log.warning("a wrong API token for token %s", self._token(slot).label)
            raise CkError(ck.CKR_PIN_INCORRECT) from None
        except StrongroomError as e:
            api.close()
            log.info("C_Login: the service answered %s", type(e).__name__)
            raise CkError(ck.CKR_DEVICE_ERROR) from None
        return api

    def C_Logout(self, handle: int) -> Reply:
        session = self._session(handle)
        if session.slot not in self.logged_in:
            raise CkError(ck.CKR_USER_NOT_LOGGED_IN)
        self._end_login(session.slot)
        return ()

    # -- objects ----------------------------------------------------------------------------------
    def _keys(self, slot: int) -> tuple[KeyAPI | None, list[KeyInfo]]:
        patterns = self._token(slot).patterns
        api = self._logins.get(slot, self.ks)
        if api is None:  # against the service without a token of its own: nothing yet
            return None, []
        return api, [  # a key scheduled for deletion does no work: it is not shown
            info
            for info in api.keys()
            if info.delete_after is None
            and any(fnmatch.fnmatchcase(info.name, p) for p in patterns)
        ]

    def _visible(self, slot: int) -> list[int]:
        """Refresh the slot's objects from the keystore; the handles of those this client
        may see now (private objects only after login)."""
        out: list[int] = []
        user = slot in self.logged_in
        api, infos = self._keys(slot)
        for info in infos:
            assert api is not None
            try:
                objects = key_objects(api, info, self._gcm(slot, api, info))
            except StrongroomError as e:  # one unreachable backend hides its keys only
                log.info("key %s left out: %s", info.name, type(e).__name__)
                continue
            seen: dict[int, int] = {}
            for obj in objects:
                index = seen.get(obj.klass, 0)
                seen[obj.klass] = index + 1
                handle = self._handle(slot, obj, index)
                if user or not obj.private:
                    out.append(handle)
        return out

    def _gcm(self, slot: int, api: KeyAPI, info: KeyInfo) -> bool:
        """Whether the key's backend makes AES-256 ciphertexts as AES-GCM (GCM_BACKENDS),
        by its type in `KeyAPI.backends()` (asked once per slot and login; if it cannot be
        asked, no key decrypts CKM_AES_GCM, and every key is still offered)."""
        types = self._backend_types.get(slot)
        if types is None:
            try:
                types = {b.name: b.type for b in api.backends()}
            except StrongroomError as e:
                log.info("the backends' types are unknown: %s", type(e).__name__)
                types = {}
            self._backend_types[slot] = types
        return types.get(info.backend or "") in GCM_BACKENDS

    def _handle(self, slot: int, obj: Obj, index: int) -> int:
        ident = (slot, obj.key, obj.klass, index)
        handle = self._handles.get(ident)
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
            self._handles[ident] = handle
        self.objects[handle] = obj
        return handle

    def _object(self, session: Session, handle: int) -> Obj:
        obj = self.objects.get(handle)
        if obj is None or (obj.private and session.slot not in self.logged_in):
            raise CkError(ck.CKR_OBJECT_HANDLE_INVALID)
        if not any(k[0] == session.slot for k, h in self._handles.items() if h == handle):
            raise CkError(ck.CKR_OBJECT_HANDLE_INVALID)
        return obj

    def C_FindObjectsInit(self, handle: int, template: tuple[wire.Attribute, ...]) -> Reply:
        session = self._session(handle)
        if session.find is not None:
            raise CkError(ck.CKR_OPERATION_ACTIVE)
        want = {a.type: a.value for a in template if a.valid}
        session.find = [h for h in self._visible(session.slot) if self.objects[h].matches(want)]
        return ()

    def C_FindObjects(self, handle: int, room: int) -> Reply:
        session = self._session(handle)
        if session.find is None:
            raise CkError(ck.CKR_OPERATION_NOT_INITIALIZED)
        found, session.find = session.find[:room], session.find[room:]
        return (wire.Out(tuple(found), len(found)),)

    def C_FindObjectsFinal(self, handle: int) -> Reply:
        session = self._session(handle)
        if session.find is None:
            raise CkError(ck.CKR_OPERATION_NOT_INITIALIZED)
        session.find = None
        return ()

    def C_GetAttributeValue(
        self, handle: int, obj_handle: int, template: tuple[wire.AttributeQuery, ...]
    ) -> Reply:
        obj = self._object(self._session(handle), obj_handle)
        rv = ck.CKR_OK
        out = []
        for query in template:
            value = obj.attrs.get(query.type)
            if value is None:
                rv = rv or ck.CKR_ATTRIBUTE_TYPE_INVALID
                out.append(wire.attribute(query.type, None, None))
                continue
            if value is SENSITIVE:
                rv = rv or ck.CKR_ATTRIBUTE_SENSITIVE
                out.append(wire.attribute(query.type, None, None))
                continue
            length = wire.attribute_length(query.type, value)
            if query.length == 0:  # the client asks for the length
                out.append(wire.attribute(query.type, None, length))
            elif query.length < length:
                rv = rv or ck.CKR_BUFFER_TOO_SMALL
                out.append(wire.attribute(query.type, None, None))
            else:
                out.append(wire.attribute(query.type, value, length))
        return (tuple(out), rv)

    # -- sign and verify --------------------------------------------------------------------------
    def _begin(self, kind: str, handle: int, mech: wire.Mechanism, key: int) -> Reply:
        session = self._session(handle)
        if mech.type is None:  # the NULL mechanism cancels the operation
            session.ops.pop(kind, None)
            return ()
        if kind in session.ops:
            raise CkError(ck.CKR_OPERATION_ACTIVE)
        if mech.type not in MECHANISMS:
            raise CkError(ck.CKR_MECHANISM_INVALID)
        obj = self._object(session, key)
        flag = {
            "sign": ck.CKA_SIGN,
            "verify": ck.CKA_VERIFY,
            "encrypt": ck.CKA_ENCRYPT,
            "decrypt": ck.CKA_DECRYPT,
        }[kind]
        if not obj.attrs.get(flag):
            raise CkError(ck.CKR_KEY_FUNCTION_NOT_PERMITTED)
        if not MECHANISMS[mech.type][2] & MECHANISM_FLAGS[kind]:
            raise CkError(ck.CKR_MECHANISM_INVALID)  # e.g. CKM_AES_GCM to encrypt
        self._check_mechanism(obj, mech)
        session.ops[kind] = Operation(kind, obj, mech, self._api(session.slot))
        return ()

    def _check_mechanism(self, obj: Obj, mech: wire.Mechanism) -> None:
        key_type = obj.attrs.get(ck.CKA_KEY_TYPE)
        m = mech.type
        ok = (
            (m in SIGN_MECHANISMS and key_type == ck.CKK_EC)
            or (m in RSA_SIGN and key_type == ck.CKK_RSA)
            or (m == ck.CKM_RSA_PKCS_OAEP and key_type == ck.CKK_RSA)
            or (m == ck.CKM_EDDSA and key_type == ck.CKK_EC_EDWARDS)
            or (m == ck.CKM_SHA256_HMAC and key_type == ck.CKK_SHA256_HMAC)
            or (m == ck.CKM_AES_GCM and key_type == ck.CKK_AES)
        )
        if not ok:
            raise CkError(ck.CKR_KEY_TYPE_INCONSISTENT)
        if m == ck.CKM_AES_GCM:
            p = mech.params
            if not obj.gcm:  # a TPM's AES-256 is CFB + HMAC, not GCM
                raise CkError(ck.CKR_MECHANISM_INVALID)
            if not isinstance(p, dict) or len(p["iv"]) != GCM_IV or p["tag_bits"] != GCM_TAG_BITS:
                raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
            return
        if m in (ck.CKM_RSA_PKCS_PSS, ck.CKM_SHA256_RSA_PKCS_PSS):
            p = mech.params
            if p != {"hash": ck.CKM_SHA256, "mgf": ck.CKG_MGF1_SHA256, "salt": 32}:
                raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
        elif m == ck.CKM_RSA_PKCS_OAEP:
            p = mech.params
            if not isinstance(p, dict) or p.get("label"):
                raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
            variant = OAEP_VARIANTS.get((p["hash"], p["mgf"]))
            if variant is None or variant not in obj.oaep:
                raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
        elif mech.params not in (None, b""):
            raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)

    def _op(self, handle: int, kind: str) -> tuple[Session, Operation]:
        session = self._session(handle)
        op = session.ops.get(kind)
        if op is None:
            raise CkError(ck.CKR_OPERATION_NOT_INITIALIZED)
        return session, op

    def _data(self, value: wire.ByteArray) -> bytes:
        if value.data is None:
            if value.length:
                raise CkError(ck.CKR_ARGUMENTS_BAD)
            return b""
        return value.data

    def C_SignInit(self, handle: int, mech: wire.Mechanism, key: int) -> Reply:
        return self._begin("sign", handle, mech, key)

    def C_Sign(self, handle: int, data: wire.ByteArray, room: int) -> Reply:
        session, op = self._op(handle, "sign")
        if op.result is None:  # a repeat after a length query carries the same data
            op.data = bytearray(self._data(data))
        return (self._finish(session, op, room, self._sign),)

    def C_SignUpdate(self, handle: int, data: wire.ByteArray) -> Reply:
        _, op = self._op(handle, "sign")
        self._append(op, self._data(data))
        return ()

    def C_SignFinal(self, handle: int, room: int) -> Reply:
        session, op = self._op(handle, "sign")
        return (self._finish(session, op, room, self._sign),)

    @staticmethod
    def _append(op: Operation, data: bytes) -> None:
        if len(op.data) + len(data) > wire.MAX_BODY:
            raise CkError(ck.CKR_DATA_LEN_RANGE)
        op.data += data

    def _finish(
        self, session: Session, op: Operation, room: int, compute: Callable[[Operation], bytes]
    ) -> wire.Out:
        """Compute once (a length query keeps the result for the next call), then return it
        when the client's buffer holds it, ending the operation."""
        if op.result is None:
            try:
                op.result = compute(op)
            except BaseException:
                session.ops.pop(op.kind, None)  # a failed operation ends (PKCS #11 5.2)
                raise
        if room < len(op.result):
            return wire.Out(None, len(op.result))
        session.ops.pop(op.kind, None)
        return wire.Out(op.result, len(op.result))

    def _sign(self, op: Operation) -> bytes:
        m = op.mechanism.type
        name = op.key.key
        data = bytes(op.data)
        if m in SIGN_MECHANISMS:
            digest, size = self._ec_digest(op, data)
            der = op.api.sign(name, digest, prehashed=True)
            r, s = decode_dss_signature(der)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if m == ck.CKM_RSA_PKCS:  # the client's DigestInfo, padded as given
            self._check_block(op, data)
            return op.api.sign(name, data, RSA_PKCS1V15_RAW, prehashed=True)
        if m == ck.CKM_SHA256_RSA_PKCS:
            return op.api.sign(name, data, "pkcs1v15")
        if m in RSA_HASHED:
            return op.api.sign(name, _digest_info(m, data), RSA_PKCS1V15_RAW, prehashed=True)
        if m == ck.CKM_RSA_PKCS_PSS:
            if len(data) != 32:
                raise CkError(ck.CKR_DATA_LEN_RANGE)
            return op.api.sign(name, data, "pss", prehashed=True)
        if m == ck.CKM_SHA256_RSA_PKCS_PSS:
            return op.api.sign(name, data, "pss")
        if m == ck.CKM_EDDSA:
            return op.api.sign(name, data)
        if m == ck.CKM_SHA256_HMAC:
            return op.api.mac(name, data)
        raise CkError(ck.CKR_MECHANISM_INVALID)  # pragma: no cover - checked at init

    @staticmethod
    def _check_block(op: Operation, data: bytes) -> None:
        """CKM_RSA_PKCS takes 1 to k - 11 bytes (PKCS #11 2.40, 2.1.6)."""
        room = int(op.key.attrs[ck.CKA_MODULUS_BITS]) // 8 - 11
        if not 1 <= len(data) <= room:
            raise CkError(ck.CKR_DATA_LEN_RANGE)

    @staticmethod
    def _ec_digest(op: Operation, data: bytes) -> tuple[bytes, int]:
        """The digest the keystore signs, and the curve's size in bytes. CKM_ECDSA takes a
        hash of any length: ECDSA uses its leftmost bits up to the order's size, so a
        longer one is cut and a shorter one zero-extended on the left (the same integer)."""
        m = op.mechanism.type
        params = op.key.attrs[ck.CKA_EC_PARAMS]
        size = 48 if params == bytes.fromhex("06052b81040022") else 32
        hash_name = SIGN_MECHANISMS[m] if m is not None else None
        digest = hashlib.new(hash_name, data).digest() if hash_name else data
        if not digest or len(digest) > 64:
            raise CkError(ck.CKR_DATA_LEN_RANGE)
        digest = digest[:size].rjust(size, b"\x00")
        return digest, size

    def C_VerifyInit(self, handle: int, mech: wire.Mechanism, key: int) -> Reply:
        return self._begin("verify", handle, mech, key)

    def C_Verify(self, handle: int, data: wire.ByteArray, signature: wire.ByteArray) -> Reply:
        session, op = self._op(handle, "verify")
        op.data += self._data(data)
        session.ops.pop("verify", None)
        self._verify(op, self._data(signature))
        return ()

    def C_VerifyUpdate(self, handle: int, data: wire.ByteArray) -> Reply:
        _, op = self._op(handle, "verify")
        self._append(op, self._data(data))
        return ()

    def C_VerifyFinal(self, handle: int, signature: wire.ByteArray) -> Reply:
        session, op = self._op(handle, "verify")
        session.ops.pop("verify", None)
        self._verify(op, self._data(signature))
        return ()

    def _verify(self, op: Operation, signature: bytes) -> None:
        m = op.mechanism.type
        name = op.key.key
        data = bytes(op.data)
        if m in SIGN_MECHANISMS:
            digest, size = self._ec_digest(op, data)
            if len(signature) != 2 * size:
                raise CkError(ck.CKR_SIGNATURE_LEN_RANGE)
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            op.api.verify(name, digest, encode_dss_signature(r, s), prehashed=True)
        elif m == ck.CKM_RSA_PKCS:
            self._check_block(op, data)
            op.api.verify(name, data, signature, RSA_PKCS1V15_RAW, prehashed=True)
        elif m == ck.CKM_SHA256_RSA_PKCS:
            op.api.verify(name, data, signature, "pkcs1v15")
        elif m in RSA_HASHED:
            block = _digest_info(m, data)
            op.api.verify(name, block, signature, RSA_PKCS1V15_RAW, prehashed=True)
        elif m == ck.CKM_RSA_PKCS_PSS:
            op.api.verify(name, data, signature, "pss", prehashed=True)
        elif m == ck.CKM_SHA256_RSA_PKCS_PSS:
            op.api.verify(name, data, signature, "pss")
        elif m == ck.CKM_EDDSA:
            op.api.verify(name, data, signature)
        elif m == ck.CKM_SHA256_HMAC:
            if not hmac.compare_digest(op.api.mac(name, data), signature):
                raise CkError(ck.CKR_SIGNATURE_INVALID)

    # -- encrypt and decrypt ----------------------------------------------------------------------
    # Multi-part calls gather the input and answer at Final (RSA is one block anyway, and
    # GCM releases no plaintext before the tag is checked); an Update returns no output.
    def C_EncryptInit(self, handle: int, mech: wire.Mechanism, key: int) -> Reply:
        return self._begin("encrypt", handle, mech, key)

    def C_Encrypt(self, handle: int, data: wire.ByteArray, room: int) -> Reply:
        session, op = self._op(handle, "encrypt")
        if op.result is None:
            op.data = bytearray(self._data(data))
        return (self._finish(session, op, room, self._encrypt),)

    def C_EncryptUpdate(self, handle: int, data: wire.ByteArray, room: int) -> Reply:
        _, op = self._op(handle, "encrypt")
        self._append(op, self._data(data))
        return (wire.Out(b"", 0),)

    def C_EncryptFinal(self, handle: int, room: int) -> Reply:
        session, op = self._op(handle, "encrypt")
        return (self._finish(session, op, room, self._encrypt),)

    def _encrypt(self, op: Operation) -> bytes:
        """RSA-OAEP to the public key (the keystore encrypts on the host)."""
        params = op.mechanism.params
        algorithm = OAEP_VARIANTS[(params["hash"], params["mgf"])]
        digest = 32 if algorithm == "oaep-sha256" else 20
        if len(op.data) > int(op.key.attrs[ck.CKA_MODULUS_BITS]) // 8 - 2 * digest - 2:
            raise CkError(ck.CKR_DATA_LEN_RANGE)
        return op.api.encrypt(op.key.key, bytes(op.data), algorithm=algorithm)

    def C_DecryptInit(self, handle: int, mech: wire.Mechanism, key: int) -> Reply:
        return self._begin("decrypt", handle, mech, key)

    def C_Decrypt(self, handle: int, data: wire.ByteArray, room: int) -> Reply:
        session, op = self._op(handle, "decrypt")
        if op.result is None:
            op.data = bytearray(self._data(data))
        return (self._finish(session, op, room, self._decrypt),)

    def C_DecryptUpdate(self, handle: int, data: wire.ByteArray, room: int) -> Reply:
        _, op = self._op(handle, "decrypt")
        self._append(op, self._data(data))
        return (wire.Out(b"", 0),)

    def C_DecryptFinal(self, handle: int, room: int) -> Reply:
        session, op = self._op(handle, "decrypt")
        return (self._finish(session, op, room, self._decrypt),)

    def _decrypt(self, op: Operation) -> bytes:
        params = op.mechanism.params
        try:
            if op.mechanism.type == ck.CKM_AES_GCM:  # the client's IV, then ct ‖ tag
                ciphertext = params["iv"] + bytes(op.data)
                return op.api.decrypt(op.key.key, ciphertext, params["aad"])
            algorithm = OAEP_VARIANTS[(params["hash"], params["mgf"])]
            return op.api.decrypt(op.key.key, bytes(op.data), algorithm=algorithm)
        except (InvalidArgument, IntegrityError, ValueError):
            raise CkError(ck.CKR_ENCRYPTED_DATA_INVALID) from None

    # -- random -----------------------------------------------------------------------------------
    def C_GenerateRandom(self, handle: int, room: int) -> Reply:
        self._session(handle)
        if room > MAX_RANDOM:
            raise CkError(ck.CKR_DATA_LEN_RANGE)
        api = self._api(self._session(handle).slot)
        return (wire.Out(api.random(room) if room else b"", room),)

    def C_SeedRandom(self, handle: int, seed: wire.ByteArray) -> Reply:
        self._session(handle)
        raise CkError(ck.CKR_RANDOM_SEED_NOT_SUPPORTED)

    # -- making and destroying keys ---------------------------------------------------------------
    def _writer(self, handle: int) -> Session:
        """A session that may change the token: read-write, its user logged in."""
        session = self._session(handle)
        if session.slot not in self.logged_in:
            raise CkError(ck.CKR_USER_NOT_LOGGED_IN)
        if not session.rw:
            raise CkError(ck.CKR_SESSION_READ_ONLY)
        return session

    def C_GenerateKeyPair(
        self,
        handle: int,
        mech: wire.Mechanism,
        public: tuple[wire.Attribute, ...],
        private: tuple[wire.Attribute, ...],
    ) -> Reply:
        session = self._writer(handle)
        if mech.type not in KEY_PAIR_GEN:
            raise CkError(ck.CKR_MECHANISM_INVALID)
        if mech.params not in (None, b""):
            raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
        pub, priv = _template(public), _template(private)
        both = {**pub, **priv}
        _check_class(pub, ck.CKO_PUBLIC_KEY)
        _check_class(priv, ck.CKO_PRIVATE_KEY)
        if mech.type == ck.CKM_RSA_PKCS_KEY_PAIR_GEN:
            key_type, ck_type = self._rsa_type(both), ck.CKK_RSA
        elif mech.type == ck.CKM_EC_KEY_PAIR_GEN:
            params = both.get(ck.CKA_EC_PARAMS)
            if params is None:
                raise CkError(ck.CKR_TEMPLATE_INCOMPLETE)
            if params not in CURVES:
                raise CkError(ck.CKR_CURVE_NOT_SUPPORTED)
            key_type, ck_type = CURVES[params], ck.CKK_EC
        else:
            params = both.get(ck.CKA_EC_PARAMS)
            if params is not None and params not in ED25519_NAMES:
                raise CkError(ck.CKR_CURVE_NOT_SUPPORTED)
            key_type, ck_type = KeyType.ED25519, ck.CKK_EC_EDWARDS
        for template in (pub, priv):
            if template.get(ck.CKA_KEY_TYPE, ck_type) != ck_type:
                raise CkError(ck.CKR_TEMPLATE_INCONSISTENT)
        flags = {
            ck.CKA_SIGN: Usage.SIGN,
            ck.CKA_DECRYPT: Usage.DECRYPT,
            ck.CKA_UNWRAP: Usage.UNWRAP,
            ck.CKA_DERIVE: Usage.AGREE,
        }
        usage = {u for a, u in flags.items() if priv.get(a)}
        public_flags = {
            ck.CKA_VERIFY: Usage.VERIFY,
            ck.CKA_ENCRYPT: Usage.ENCRYPT,
            ck.CKA_WRAP: Usage.WRAP,
        }
        usage |= {u for a, u in public_flags.items() if pub.get(a)}
        name = self._make(session, key_type, both, priv, usage)
        return (
            self._new_handle(session.slot, name, ck.CKO_PUBLIC_KEY),
            self._new_handle(session.slot, name, ck.CKO_PRIVATE_KEY),
        )

    def C_GenerateKey(
        self, handle: int, mech: wire.Mechanism, template: tuple[wire.Attribute, ...]
    ) -> Reply:
        session = self._writer(handle)
        if mech.type not in KEY_GEN:
            raise CkError(ck.CKR_MECHANISM_INVALID)
        if mech.params not in (None, b""):
            raise CkError(ck.CKR_MECHANISM_PARAM_INVALID)
        attrs = _template(template)
        _check_class(attrs, ck.CKO_SECRET_KEY)
        if attrs.get(ck.CKA_VALUE_LEN, 32) != 32:
            raise CkError(ck.CKR_KEY_SIZE_RANGE)
        if mech.type == ck.CKM_AES_KEY_GEN:
            key_type, ck_types = KeyType.AES_256, (ck.CKK_AES, ck.CKK_AES)
        else:
            key_type, ck_types = KeyType.HMAC_SHA256, (ck.CKK_SHA256_HMAC, ck.CKK_GENERIC_SECRET)
        if attrs.get(ck.CKA_KEY_TYPE, ck_types[0]) not in ck_types:
            raise CkError(ck.CKR_TEMPLATE_INCONSISTENT)
        flags = {
            ck.CKA_ENCRYPT: Usage.ENCRYPT,
            ck.CKA_DECRYPT: Usage.DECRYPT,
            ck.CKA_WRAP: Usage.WRAP,
            ck.CKA_UNWRAP: Usage.UNWRAP,
            ck.CKA_DERIVE: Usage.DERIVE,
        }
        if key_type is KeyType.HMAC_SHA256:  # an HMAC key signs and verifies by its type
            flags = {ck.CKA_SIGN: Usage.SIGN, ck.CKA_VERIFY: Usage.VERIFY}
        usage = {u for a, u in flags.items() if attrs.get(a)}
        name = self._make(session, key_type, attrs, attrs, usage)
        return (self._new_handle(session.slot, name, ck.CKO_SECRET_KEY),)

    @staticmethod
    def _rsa_type(attrs: dict[int, Any]) -> KeyType:
        bits = attrs.get(ck.CKA_MODULUS_BITS)
        if bits is None:
            raise CkError(ck.CKR_TEMPLATE_INCOMPLETE)
        if bits not in RSA_BITS:
            raise CkError(ck.CKR_KEY_SIZE_RANGE)
        exponent = attrs.get(ck.CKA_PUBLIC_EXPONENT)
        if exponent is not None and int.from_bytes(exponent, "big") != 65537:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID)  # the keystore makes e = 65537
        return RSA_BITS[bits]

    def _make(
        self,
        session: Session,
        key_type: KeyType,
        attrs: dict[int, Any],
        secret: dict[int, Any],
        usage: set[Usage],
    ) -> str:
        """Generate the key the templates describe into the configured backend; its name.

        The name is CKA_LABEL (else CKA_ID as UTF-8), and must match the token's patterns;
        a CKA_ID other than the name's bytes is refused (IDs are derived from names). The
        keystore only makes token objects that stay sensitive."""
        label, ident = attrs.get(ck.CKA_LABEL), attrs.get(ck.CKA_ID)
        raw = label if label else ident
        if not raw:
            raise CkError(ck.CKR_TEMPLATE_INCOMPLETE)
        try:
            name: str = bytes(raw).decode()
        except UnicodeDecodeError:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID) from None
        if ident and ident != raw:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID)
        patterns = self._token(session.slot).patterns
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            raise CkError(ck.CKR_TEMPLATE_INCONSISTENT)  # the token would not show it
        if attrs.get(ck.CKA_TOKEN) is False:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID)  # no session objects
        if secret.get(ck.CKA_SENSITIVE) is False:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID)
        exportable = bool(secret.get(ck.CKA_EXTRACTABLE, False))
        try:
            self._api(session.slot).generate(
                name,
                key_type,
                backend=self.settings.backend,
                usage=usage or None,
                exportable=exportable,
            )
        except KeyExists:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID) from None
        except InvalidArgument as e:
            log.info("C_Generate* refused: %s", e)
            raise CkError(ck.CKR_TEMPLATE_INCONSISTENT) from None
        return name

    def _new_handle(self, slot: int, name: str, klass: int) -> int:
        """The handle of a key's object, just made (its objects are read again)."""
        self._visible(slot)
        handle = self._handles.get((slot, name, klass, 0))
        if handle is None:  # pragma: no cover - the keystore has just made it
            raise CkError(ck.CKR_FUNCTION_FAILED)
        return handle

    def C_DestroyObject(self, handle: int, obj_handle: int) -> Reply:
        """Destroy a private or secret key object: the key itself, every version, with its
        public key object. Only with `Settings.allow_destroy`, and then as `key delete`
        does: `KeyAPI.schedule_deletion`, so after the keystore's deletion_wait (in the
        meantime the key does no work, leaves the token and `key delete --cancel` brings
        it back), at once without one. A public key or certificate object alone cannot go."""
        session = self._writer(handle)
        obj = self._object(session, obj_handle)
        if not self.settings.allow_destroy or not obj.attrs.get(ck.CKA_DESTROYABLE):
            raise CkError(ck.CKR_ACTION_PROHIBITED)
        self._api(session.slot).schedule_deletion(obj.key)
        for ident, h in list(self._handles.items()):
            if ident[1] == obj.key:
                del self._handles[ident]
                self.objects.pop(h, None)
        return ()


def _digest_info(mechanism: int, data: bytes) -> bytes:
    """The DigestInfo of `data` in the hash of an RSA_HASHED mechanism."""
    name = RSA_HASHED[mechanism]
    return DIGEST_INFO_PREFIXES[name] + hashlib.new(name, data).digest()


def _template(attributes: tuple[wire.Attribute, ...]) -> dict[int, Any]:
    """A template's attributes by type; one without a value is refused."""
    out: dict[int, Any] = {}
    for a in attributes:
        if not a.valid or a.value is None:
            raise CkError(ck.CKR_ATTRIBUTE_VALUE_INVALID)
        out[a.type] = a.value
    return out


def _check_class(attrs: dict[int, Any], klass: int) -> None:
    if attrs.get(ck.CKA_CLASS, klass) != klass:
        raise CkError(ck.CKR_TEMPLATE_INCONSISTENT)
