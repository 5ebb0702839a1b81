"""Keys in a PKCS#11 token: SoftHSM2 in CI; YubiHSM, Luna, CloudHSM or nShield in production.

New keys are token objects, sensitive, with a random CKA_ID and the key name as
CKA_LABEL; they are extractable only when created exportable. Signing hashes on the host
and signs the digest (CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS), so one mechanism per
key type is enough and tokens without CKM_ECDSA_SHA256 (SoftHSM2) work. docs/pkcs11.md
describes the configuration, attributes, mechanisms and the vault key-slot format.

AES key wrap (wrap.py) and the vault key-slot `Sealer` (sealer.py) are mixins of
`Pkcs11Backend`, each in its own module.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom import algorithms
from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, ExistingKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.memory import scrub_bytes, wipe
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import keys
from .errors import translate
from .keys import _EC_TYPES, _ID_PREFIX, _LABEL_PREFIX, _RSA_TYPES, _SECRET_TYPES
from .sealer import Pkcs11Sealer
from .token import (
    IMPORT_ERROR,
    Module,
    PooledSession,
    SessionPool,
    find_token,
    is_broken_session,
    load_module,
    login,
    logout,
    missing_module_reason,
    module_environment,
    pin_tag,
    token_labels,
    with_public_session,
)
from .wrap import Pkcs11Wrap

if IMPORT_ERROR is None:
    from pkcs11 import (
        KDF,
        MGF,
        Attribute,
        GCMParams,
        Mechanism,
        ObjectClass,
        PKCS11Error,
    )
    from pkcs11 import KeyType as P11KeyType
    from pkcs11 import exceptions as p11

T = TypeVar("T")

DEFAULT_MAX_SESSIONS = 4
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the portable shape of a variable name

# (key type, operation) → the mechanisms the token must offer for it. Verification and
# RSA encryption run on the host with the public key, so they need none.
_REQUIREMENTS: dict[Capability, tuple[str, ...]] = {}
for _t in _EC_TYPES:
    _REQUIREMENTS.update(
        {
            (_t, Operation.GENERATE): ("EC_KEY_PAIR_GEN",),
            (_t, Operation.SIGN): ("ECDSA",),
            (_t, Operation.VERIFY): ("ECDSA",),
            (_t, Operation.AGREE): ("ECDH1_DERIVE",),
            (_t, Operation.DELETE): (),
        }
    )
_REQUIREMENTS.update(
    {
        (KeyType.ED25519, Operation.GENERATE): ("EC_EDWARDS_KEY_PAIR_GEN",),
        (KeyType.ED25519, Operation.SIGN): ("EDDSA",),
        (KeyType.ED25519, Operation.VERIFY): ("EDDSA",),
        (KeyType.ED25519, Operation.DELETE): (),
    }
)
for _t in _RSA_TYPES:
    _REQUIREMENTS.update(
        {
            (_t, Operation.GENERATE): ("RSA_PKCS_KEY_PAIR_GEN",),
            (_t, Operation.SIGN): ("RSA_PKCS",),
            (_t, Operation.VERIFY): ("RSA_PKCS",),
            (_t, Operation.ENCRYPT): ("RSA_PKCS_OAEP",),
            (_t, Operation.DECRYPT): ("RSA_PKCS_OAEP",),
            (_t, Operation.DELETE): (),
        }
    )
_REQUIREMENTS.update(
    {
        (KeyType.AES_256, Operation.GENERATE): ("AES_KEY_GEN",),
        (KeyType.AES_256, Operation.IMPORT): (),
        (KeyType.AES_256, Operation.ENCRYPT): ("AES_GCM",),
        (KeyType.AES_256, Operation.DECRYPT): ("AES_GCM",),
        (KeyType.AES_256, Operation.WRAP): ("AES_KEY_WRAP_PAD",),
        (KeyType.AES_256, Operation.UNWRAP): ("AES_KEY_WRAP_PAD",),
        (KeyType.AES_256, Operation.DELETE): (),
        (KeyType.HMAC_SHA256, Operation.GENERATE): ("GENERIC_SECRET_KEY_GEN",),
        (KeyType.HMAC_SHA256, Operation.IMPORT): (),
        (KeyType.HMAC_SHA256, Operation.SIGN): ("SHA256_HMAC",),
        (KeyType.HMAC_SHA256, Operation.VERIFY): ("SHA256_HMAC",),
        (KeyType.HMAC_SHA256, Operation.DELETE): (),
    }
)
_STATIC_CAPABILITIES = frozenset(_REQUIREMENTS)


_OAEP: Any = None  # (SHA-256, MGF1-SHA-256, no label) once python-pkcs11 is known present
_OAEP_SHA1: Any = None  # for tokens such as SoftHSM2 whose OAEP takes SHA-1 only
if IMPORT_ERROR is None:
    _OAEP = (Mechanism.SHA256, MGF.SHA256, None)
    _OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)


def _mechanism_value(name: str) -> int:
    return int(getattr(Mechanism, name))


class Pkcs11Backend(Pkcs11Wrap, Pkcs11Sealer, Backend):
    """Keys in a PKCS#11 token, found by label, with one login shared by a session pool."""

    type_name = "pkcs11"
    random_needs_open = False
    config_keys = {
        "module": ConfigKey(
            str, "path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so"
        ),
        "token": ConfigKey(str, "label of the token (tokens are found by label, never by slot)"),
        "pin": ConfigKey(
            (str, list),
            "the user PIN: env:NAME, file:PATH or prompt",
            ["env:STRONGROOM_HSM_PIN", "prompt"],
            secret=True,
        ),
        "max_sessions": ConfigKey(
            int, "most sessions open at once (one per concurrent operation)", DEFAULT_MAX_SESSIONS
        ),
        "env": ConfigKey(
            dict,
            "environment variables for the module, set before it is loaded, e.g. "
            '{ SOFTHSM2_CONF = "/path/softhsm2.conf" }',
        ),
        "env_override": ConfigKey(
            bool, "true: env's values replace ones exported in the environment", False
        ),
    }

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        s = context.settings
        module = s.get("module")
        if not module:
            raise context.config_error(
                "is required: the path of the PKCS#11 module (.so) of your HSM", "module"
            )
        token = s.get("token")
        if not token:
            raise context.config_error("is required: the label of the token", "token")
        self.module_path = str(Path(str(module)).expanduser())
        self.token_label = str(token)
        self.max_sessions = int(s.get("max_sessions", DEFAULT_MAX_SESSIONS))
        if not 1 <= self.max_sessions <= 256:
            raise context.config_error("must be from 1 to 256", "max_sessions")
        self.env = _module_env(s.get("env"), context)
        self.env_override = bool(s.get("env_override", False))
        self._env_kept: tuple[str, ...] = ()
        self.pin = context.secret("pin", f"PIN for token {self.token_label!r}: ")
        self._lock = threading.RLock()
        self._module: Module | None = None
        self._token: Any = None
        self._pool: SessionPool | None = None
        self._mechanisms: frozenset[int] | None = None
        self._capabilities: frozenset[Capability] | None = None
        self._oaep_variants: tuple[str, ...] | None = None
        self._publics: dict[str, PublicKeyTypes] = {}
        self._refused: set[bytes] = set()

    def __repr__(self) -> str:
        return (
            f"<Pkcs11Backend {self.name!r} module={self.module_path!r} "
            f"token={self.token_label!r} open={self._pool is not None}>"
        )

    # -- discovery -----------------------------------------------------------------------------
    def availability(self) -> str | None:
        """PKCS#11: C_Initialize (once), C_GetSlotList and C_GetTokenInfo: is the token there?"""
        if self._pool is not None:
            return None
        try:
            self._connect()
        except BackendUnavailable as e:
            return e.reason
        return None

    def _connect(self) -> tuple[Module, Any]:
        """Load the module and find the token; BackendUnavailable with a reason if not."""
        if IMPORT_ERROR is not None:
            raise BackendUnavailable(
                self.name,
                f"python-pkcs11 is not installed ({IMPORT_ERROR}); "
                "pip install 'strongroom[pkcs11]'",
            )
        if not os.path.isfile(self.module_path):
            raise BackendUnavailable(self.name, missing_module_reason(self.module_path))
        env, self._env_kept = module_environment(self.env, self.env_override)
        try:
            module = load_module(self.module_path, env)
        except BackendUnavailable as e:
            raise BackendUnavailable(self.name, e.reason) from None
        except (OSError, PKCS11Error) as e:
            raise BackendUnavailable(
                self.name,
                f"cannot load {self.module_path} as a PKCS#11 module: {e}{self._env_note()}",
            ) from e
        try:
            token = find_token(module, self.token_label)
        except BackendUnavailable as e:
            raise BackendUnavailable(self.name, e.reason) from None
        except PKCS11Error as e:
            raise BackendUnavailable(
                self.name, f"{self.module_path} failed to list its tokens: {type(e).__name__}"
            ) from e
        if token is None:
            present = ", ".join(repr(label) for label in token_labels(module)) or "none"
            raise BackendUnavailable(
                self.name,
                f"no token labelled {self.token_label!r} in {self.module_path} "
                f"(tokens present: {present}); initialise one (for SoftHSM2: softhsm2-util "
                f"--init-token --free --label {self.token_label}) or correct `token`"
                f"{self._env_note()}",
            )
        with self._lock:
            self._module = module
            if self._pool is None:
                self._token = token
        return module, token

    def _env_note(self) -> str:
        """Why the module may see other settings than the config's `env`, for a message."""
        if not self._env_kept:
            return ""
        names = ", ".join(self._env_kept)
        return (
            f"; note: {names} exported in the environment was used instead of the value in "
            "`env` (unset it, or set env_override = true)"
        )

    def capabilities(self) -> frozenset[Capability]:
        """PKCS#11: C_GetMechanismList (once): what this token can do, by mechanism."""
        caps = self._capabilities
        if caps is not None:
            return caps
        mechanisms = self._mechanism_set()
        if mechanisms is None:  # not reachable now: claim what we could do; open() will say why not
            return _STATIC_CAPABILITIES
        found = {
            cap
            for cap, needs in _REQUIREMENTS.items()
            if all(_mechanism_value(n) in mechanisms for n in needs)
        }
        if (KeyType.RSA_2048, Operation.DECRYPT) in found and not self.rsa_encrypt_algorithms():
            found -= {(t, op) for t in _RSA_TYPES for op in (Operation.ENCRYPT, Operation.DECRYPT)}
        caps = frozenset(found)
        self._capabilities = caps
        return caps

    def rsa_encrypt_algorithms(self) -> tuple[str, ...]:
        """Which OAEP variants this token decrypts: SoftHSM2 takes SHA-1 only.

        PKCS#11: C_GenerateKeyPair (a throwaway 1024-bit session key pair, no login needed),
        then per variant C_Encrypt and C_Decrypt with CKM_RSA_PKCS_OAEP (SHA-256 and
        MGF1-SHA-256, SHA-1 and MGF1-SHA-1; no label), once per backend. The keystore records
        the first with each RSA key that may encrypt, so encrypt and decrypt agree.
        """
        if self._oaep_variants is not None:
            return self._oaep_variants
        if not self._has("RSA_PKCS_OAEP"):
            return ()
        try:
            module, token = self._connect()
        except BackendUnavailable:
            return algorithms.RSA_ENCRYPT_ALGORITHMS  # not cached: asked again once it is back

        def probe(session: Any) -> tuple[str, ...]:
            public, private = session.generate_keypair(
                P11KeyType.RSA,
                1024,
                store=False,
                capabilities=0,
                public_template={Attribute.ENCRYPT: True, Attribute.PRIVATE: False},
                private_template={Attribute.DECRYPT: True, Attribute.PRIVATE: False},
            )
            works = []
            try:
                for name, params in (("oaep-sha256", _OAEP), ("oaep-sha1", _OAEP_SHA1)):
                    try:
                        ct = public.encrypt(
                            b"probe", mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                        )
                        pt = private.decrypt(
                            ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                        )
                    except (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid):
                        continue
                    if bytes(pt) == b"probe":
                        works.append(name)
            finally:
                public.destroy()
                private.destroy()
            return tuple(works)

        try:
            found = tuple(with_public_session(module, token, probe))
        except PKCS11Error:  # the token would not make the probe key: assume the standard one
            found = ("oaep-sha256",)
        self._oaep_variants = found
        return found

    def _mechanism_set(self) -> frozenset[int] | None:
        """PKCS#11: C_GetMechanismList, once."""
        if self._mechanisms is not None:
            return self._mechanisms
        try:
            _, token = self._connect()
            found = frozenset(int(m) for m in token.slot.get_mechanisms())
        except (BackendUnavailable, PKCS11Error):
            return None
        self._mechanisms = found
        return found

    def _serial(self) -> str:
        return bytes(self._token.serial).decode("ascii", "replace").strip()

    def _has(self, mechanism: str) -> bool:
        mechanisms = self._mechanism_set()
        return mechanisms is None or _mechanism_value(mechanism) in mechanisms

    def status(self) -> dict[str, Any]:
        """From C_GetTokenInfo (already read): serial, manufacturer, model; and the pool."""
        out: dict[str, Any] = {"module": self.module_path, "token": self.token_label}
        token, module, pool = self._token, self._module, self._pool
        if token is not None:
            out.update(
                serial=self._serial(),
                manufacturer=str(token.manufacturer_id),
                model=str(token.model),
            )
        if module is not None:
            out["concurrent_calls"] = module.concurrent
        if self.env:
            # Where each variable's value came from; never the values (they may be secrets).
            out["env"] = {
                name: "environment" if name in self._env_kept else "config" for name in self.env
            }
        out["logged_in"] = pool is not None
        if pool is not None:
            out["sessions"] = pool.stats()
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """PKCS#11: C_OpenSession + C_Login(CKU_USER) once per process and token.

        A refused PIN is remembered (as a keyed hash) and never sent to the token again by
        this backend: fix the PIN and reopen the keystore.
        """
        with self._lock:
            if self._pool is not None:
                return
            module, token = self._connect()
            pin = bytearray(self.pin.get().encode("utf-8"))
            try:
                tag = pin_tag(pin)
                if tag in self._refused:
                    raise AuthenticationFailed(
                        f"token {self.token_label!r} already refused this PIN; it is not tried "
                        "again: correct the PIN and reopen the keystore"
                    )
                try:
                    login(self.name, module, token, self.token_label, pin, tag)
                except AuthenticationFailed:
                    self._refused.add(tag)
                    raise
            finally:
                wipe(pin)
            self._pool = SessionPool(module, token, self.max_sessions)
            self._mechanism_set()

    def close(self) -> None:
        """PKCS#11: C_CloseSession for the pool, then C_Logout when no other user remains."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._publics.clear()
            if pool is None:
                return
            try:
                pool.close()
            finally:
                if self._module is not None:
                    logout(self._module, self._token)

    def _require_pool(self) -> SessionPool:
        pool = self._pool
        if pool is None:
            self.open()
            pool = self._pool
            assert pool is not None
        return pool

    # -- object lookup -------------------------------------------------------------------------
    def _template(self, handle: str) -> dict[Any, Any]:
        if handle.startswith(_ID_PREFIX):
            return {Attribute.ID: bytes.fromhex(handle[len(_ID_PREFIX) :])}
        if handle.startswith(_LABEL_PREFIX):
            return {Attribute.LABEL: handle[len(_LABEL_PREFIX) :]}
        raise StrongroomError(f"backend {self.name!r} cannot read the key handle {handle!r}")

    def _find(self, session: Any, info: KeyInfo, klass: Any) -> Any:
        """PKCS#11: C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal."""
        template = self._template(info.handle)
        template[Attribute.CLASS] = klass
        found = list(session.get_objects(template))
        if not found:
            raise KeyNotFound(info.name, info.namespace)
        if len(found) > 1:
            raise StrongroomError(
                f"{len(found)} objects on token {self.token_label!r} match key {info.name!r}"
            )
        return found[0]

    def _object(self, pooled: PooledSession, info: KeyInfo, klass: Any) -> Any:
        key = (info.handle, klass)
        obj = pooled.objects.get(key)
        if obj is None:
            obj = self._find(pooled.session, info, klass)
            pooled.objects[key] = obj
        return obj

    def _with_key(self, info: KeyInfo, klass: Any, operation: str, action: Callable[[Any], T]) -> T:
        """Run `action(key object)` in a pooled session; re-find the object once if stale.

        The hot path: one pooled session, one dict lookup for the cached key object.
        """
        pool = self._pool or self._require_pool()
        pooled = pool.take()
        broken = False
        try:
            obj = pooled.objects.get((info.handle, klass))
            if obj is None:
                obj = self._object(pooled, info, klass)
            try:
                return action(obj)
            except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                pooled.objects.pop((info.handle, klass), None)
                return action(self._object(pooled, info, klass))
        except PKCS11Error as e:
            broken = is_broken_session(e)
            raise self._error(e, operation, info.type) from e
        finally:
            pool.give_back(pooled, broken)

    def _with_session(
        self, operation: str, key_type: KeyType | None, action: Callable[[PooledSession], T]
    ) -> T:
        pool = self._pool or self._require_pool()
        try:
            with pool.loan() as pooled:
                return action(pooled)
        except PKCS11Error as e:
            raise self._error(e, operation, key_type) from e

    def _error(self, e: Exception, operation: str, key_type: KeyType | None) -> StrongroomError:
        return translate(
            e, self.name, operation, key_type.value if key_type else None, self.token_label
        )

    def _need(self, mechanism: str, operation: str, key_type: KeyType) -> None:
        if not self._has(mechanism):
            raise self.unsupported(
                operation, key_type, f"token {self.token_label!r} has no CKM_{mechanism}"
            )

    # -- templates -----------------------------------------------------------------------------
    def _new_id(self) -> bytes:
        return os.urandom(16)

    @staticmethod
    def _private_flags(info: KeyInfo) -> dict[Any, Any]:
        usage = info.usage
        return {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: info.exportable,
            Attribute.SIGN: Usage.SIGN in usage,
            Attribute.DECRYPT: Usage.DECRYPT in usage,
            Attribute.UNWRAP: Usage.UNWRAP in usage,
            Attribute.DERIVE: Usage.AGREE in usage,
        }

    @staticmethod
    def _public_flags(info: KeyInfo) -> dict[Any, Any]:
        usage = info.usage
        return {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: Usage.VERIFY in usage or Usage.SIGN in usage,
            Attribute.ENCRYPT: Usage.ENCRYPT in usage,
            Attribute.WRAP: Usage.WRAP in usage,
        }

    @staticmethod
    def _secret_flags(info: KeyInfo) -> dict[Any, Any]:
        usage = info.usage
        return {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: info.exportable,
            Attribute.ENCRYPT: Usage.ENCRYPT in usage,
            Attribute.DECRYPT: Usage.DECRYPT in usage,
            Attribute.WRAP: Usage.WRAP in usage,
            Attribute.UNWRAP: Usage.UNWRAP in usage,
            Attribute.SIGN: Usage.SIGN in usage,
            Attribute.VERIFY: Usage.VERIFY in usage,
            Attribute.DERIVE: False,
        }

    # -- key creation --------------------------------------------------------------------------
    def generate(self, new: NewKey) -> str:
        """PKCS#11: C_GenerateKeyPair (CKM_EC_KEY_PAIR_GEN, CKM_EC_EDWARDS_KEY_PAIR_GEN,
        CKM_RSA_PKCS_KEY_PAIR_GEN) or C_GenerateKey (CKM_AES_KEY_GEN, CKM_GENERIC_SECRET_KEY_GEN).
        """
        info = new.info
        t = info.type
        if (t, Operation.GENERATE) not in self.capabilities():
            raise self.unsupported(Operation.GENERATE, t, self._missing(t, Operation.GENERATE))
        key_id = self._new_id()
        label = info.name

        def make(pooled: PooledSession) -> None:
            session = pooled.session
            if t in _SECRET_TYPES:
                key_type = P11KeyType.AES if t is KeyType.AES_256 else P11KeyType.GENERIC_SECRET
                session.generate_key(
                    key_type,
                    keys.SYMMETRIC_SIZE * 8,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=0,
                    template=self._secret_flags(info),
                )
                return
            public = self._public_flags(info)
            private = self._private_flags(info)
            if t in _EC_TYPES:
                public[Attribute.EC_PARAMS] = keys.EC_PARAMS[t]
                session.generate_keypair(
                    P11KeyType.EC,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=0,
                    mechanism=Mechanism.EC_KEY_PAIR_GEN,
                    public_template=public,
                    private_template=private,
                )
            elif t is KeyType.ED25519:
                public[Attribute.EC_PARAMS] = keys.ED25519_PARAMS
                session.generate_keypair(
                    P11KeyType.EC_EDWARDS,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=0,
                    public_template=public,
                    private_template=private,
                )
            else:
                session.generate_keypair(
                    P11KeyType.RSA,
                    keys.RSA_BITS[t],
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=0,
                    public_template=public,
                    private_template=private,
                )

        self._with_session("generate", t, make)
        return _ID_PREFIX + key_id.hex()

    def unsupported(
        self, op: Operation | str, key_type: KeyType | None, detail: str = ""
    ) -> UnsupportedOperation:
        """As Backend.unsupported, naming the mechanisms the token lacks when that is why."""
        if not detail and key_type is not None and isinstance(op, Operation):
            if (key_type, op) in _REQUIREMENTS:
                detail = self._missing(key_type, op)
        return super().unsupported(op, key_type, detail)

    def _no_oaep(self) -> str:
        if not self._has("RSA_PKCS_OAEP"):
            return f"token {self.token_label!r} has no CKM_RSA_PKCS_OAEP"
        variants = self.rsa_encrypt_algorithms()
        if not variants:
            return (
                f"token {self.token_label!r} decrypts CKM_RSA_PKCS_OAEP with neither "
                "SHA-256 nor SHA-1"
            )
        if variants == ("oaep-sha1",):
            return (
                f"token {self.token_label!r} takes CKM_RSA_PKCS_OAEP only with SHA-1; "
                "encrypt and decrypt with algorithm oaep-sha1 (CLI: --algorithm oaep-sha1)"
            )
        return f"token {self.token_label!r} decrypts RSA-OAEP only as {', '.join(variants)}"

    def _missing(self, key_type: KeyType, op: Operation) -> str:
        needs = _REQUIREMENTS.get((key_type, op))
        if needs is None:
            return "the pkcs11 backend does not offer it"
        names = ", ".join(f"CKM_{n}" for n in needs if not self._has(n))
        if names:
            return f"token {self.token_label!r} lacks {names}"
        if key_type in _RSA_TYPES and op in (Operation.ENCRYPT, Operation.DECRYPT):
            return self._no_oaep()
        return ""

    def import_key(self, new: NewKey, material: memoryview, fmt: str) -> str:
        """PKCS#11: C_CreateObject (CKO_SECRET_KEY with CKA_VALUE), for aes-256 and hmac-sha256.

        Other types move in through `unwrap`, so their private half never passes the host
        unencrypted.
        """
        t = new.info.type
        if t not in _SECRET_TYPES:
            raise self.unsupported(
                Operation.IMPORT,
                t,
                "import aes-256 or hmac-sha256 raw; move other keys in with unwrap",
            )
        if fmt not in ("auto", "raw"):
            raise InvalidArgument(f"{t.value} keys are imported raw, not {fmt}")
        if len(material) != keys.SYMMETRIC_SIZE:
            raise InvalidArgument(f"a {t.value} key is {keys.SYMMETRIC_SIZE} bytes")
        value = bytes(material)
        try:
            return self._create_secret(new, value, "import")
        finally:
            scrub_bytes(value)

    def _create_secret(self, new: NewKey, value: bytes, operation: str) -> str:
        """PKCS#11: C_CreateObject of a secret key holding `value`."""
        info = new.info
        key_id = self._new_id()
        template = self._secret_flags(info)
        template.update(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: P11KeyType.AES
                if info.type is KeyType.AES_256
                else P11KeyType.GENERIC_SECRET,
                Attribute.ID: key_id,
                Attribute.LABEL: info.name,
                Attribute.VALUE: value,
            }
        )
        self._with_session(operation, info.type, lambda p: p.session.create_object(template))
        return _ID_PREFIX + key_id.hex()

    # -- public keys ---------------------------------------------------------------------------
    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        """PKCS#11: C_FindObjects + C_GetAttributeValue (CKA_EC_POINT, or CKA_MODULUS and
        CKA_PUBLIC_EXPONENT) of the public key object; cached."""
        cached = self._publics.get(info.handle)
        if cached is not None:
            return cached
        if not info.type.is_asymmetric:
            raise InvalidArgument(
                f"key {info.name!r} is a {info.type.value} key and has no public key"
            )
        public = self._with_session(
            "public_key", info.type, lambda p: self._read_public(p.session, info)
        )
        self._publics[info.handle] = public
        return public

    def _read_public(self, session: Any, info: KeyInfo) -> PublicKeyTypes:
        t = info.type
        template = self._template(info.handle)
        template[Attribute.CLASS] = ObjectClass.PUBLIC_KEY
        found = list(session.get_objects(template))
        source = found[0] if len(found) == 1 else None
        if source is None:  # RSA private keys carry the public numbers too
            source = self._find(session, info, ObjectClass.PRIVATE_KEY)
        if t in _RSA_TYPES:
            public: PublicKeyTypes = keys.rsa_public(
                source[Attribute.MODULUS], source[Attribute.PUBLIC_EXPONENT]
            )
        else:
            try:
                point = source[Attribute.EC_POINT]
            except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
                raise UnsupportedOperation(
                    self.name,
                    "public_key",
                    t.value,
                    f"token {self.token_label!r} holds no public key object for {info.name!r}",
                ) from None
            public = (
                keys.ed25519_public(point) if t is KeyType.ED25519 else keys.ec_public(t, point)
            )
        if not algorithms.public_key_matches(t, public):
            raise StrongroomError(f"the token's key {info.name!r} is not a {t.value} key")
        return public

    # -- signatures ----------------------------------------------------------------------------
    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        """PKCS#11: C_SignInit/C_Sign with CKM_EDDSA or CKM_SHA256_HMAC over the data; ECDSA
        and RSA hash on the host and go through `sign_digest`."""
        t = info.type
        if t is KeyType.ECDSA_P256 or t is KeyType.ECDSA_P384 or t in _RSA_TYPES:
            hasher = hashlib.sha384 if t is KeyType.ECDSA_P384 else hashlib.sha256
            return self.sign_digest(info, hasher(data).digest(), algorithm)
        if t is KeyType.ED25519:
            return self._with_key(
                info,
                ObjectClass.PRIVATE_KEY,
                "sign",
                lambda key: bytes(key.sign(data, mechanism=Mechanism.EDDSA)),
            )
        if t is KeyType.HMAC_SHA256:
            return self._with_key(
                info,
                ObjectClass.SECRET_KEY,
                "sign",
                lambda key: bytes(key.sign(data, mechanism=Mechanism.SHA256_HMAC)),
            )
        raise self.unsupported(Operation.SIGN, t)

    def sign_digest(self, info: KeyInfo, digest: bytes, algorithm: str | None) -> bytes:
        """PKCS#11: C_SignInit/C_Sign with CKM_ECDSA over a SHA-256/384 digest (DER out),
        CKM_RSA_PKCS over a SHA-256 DigestInfo, or CKM_RSA_PKCS_PSS (SHA-256, MGF1-SHA-256,
        salt 32) over a SHA-256 digest."""
        t = info.type
        if t is KeyType.ECDSA_P256 or t is KeyType.ECDSA_P384:
            raw = self._with_key(
                info,
                ObjectClass.PRIVATE_KEY,
                "sign",
                lambda key: key.sign(digest, mechanism=Mechanism.ECDSA),
            )
            return keys.ecdsa_der(raw)
        if t in _RSA_TYPES:
            if algorithm == "pss":
                self._need("RSA_PKCS_PSS", "sign", t)
                param = (Mechanism.SHA256, MGF.SHA256, 32)
                return self._with_key(
                    info,
                    ObjectClass.PRIVATE_KEY,
                    "sign",
                    lambda key: bytes(
                        key.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=param)
                    ),
                )
            algorithms.rsa_padding(algorithm)
            block = keys.SHA256_DIGEST_INFO + digest
            return self._with_key(
                info,
                ObjectClass.PRIVATE_KEY,
                "sign",
                lambda key: bytes(key.sign(block, mechanism=Mechanism.RSA_PKCS)),
            )
        raise self.unsupported(Operation.SIGN, t)

    def verify(self, info: KeyInfo, data: bytes, signature: bytes, algorithm: str | None) -> None:
        """PKCS#11: C_VerifyInit/C_Verify with CKM_SHA256_HMAC (the token compares the tag);
        signatures with the public key on the host."""
        if info.type is not KeyType.HMAC_SHA256:
            return super().verify(info, data, signature, algorithm)
        if not self._with_key(
            info,
            ObjectClass.SECRET_KEY,
            "verify",
            lambda key: bool(key.verify(data, signature, mechanism=Mechanism.SHA256_HMAC)),
        ):
            raise InvalidSignature()

    # -- encryption ----------------------------------------------------------------------------
    def encrypt(self, info: KeyInfo, plaintext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """PKCS#11: C_EncryptInit/C_Encrypt with CKM_AES_GCM (random 96-bit nonce from the host,
        128-bit tag); the result is nonce ‖ ciphertext ‖ tag."""
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.ENCRYPT, info.type)
        if algorithm == algorithms.AES_KEY_WRAP:
            return self._wrap_secret(info, plaintext)
        _no_algorithm(algorithm)
        nonce = os.urandom(keys.GCM_NONCE)
        params = GCMParams(nonce, aad or None)
        ct = self._with_key(
            info,
            ObjectClass.SECRET_KEY,
            "encrypt",
            lambda key: bytes(
                key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            ),
        )
        return nonce + ct

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """PKCS#11: C_DecryptInit/C_Decrypt with CKM_AES_GCM, or CKM_RSA_PKCS_OAEP (SHA-256 and
        MGF1-SHA-256, or SHA-1 and MGF1-SHA-1 with algorithm="oaep-sha1"; no label). A failed
        tag or padding is an IntegrityError."""
        t = info.type
        if t is KeyType.AES_256 and algorithm == algorithms.AES_KEY_WRAP:
            return self._unwrap_secret(info, ciphertext)
        if t not in _RSA_TYPES:
            _no_algorithm(algorithm)
        if t is KeyType.AES_256:
            if len(ciphertext) < keys.GCM_NONCE + keys.GCM_TAG:
                raise IntegrityError("ciphertext is too short to be AES-GCM output")
            params = GCMParams(ciphertext[: keys.GCM_NONCE], aad or None)
            body = ciphertext[keys.GCM_NONCE :]
            return self._with_key(
                info,
                ObjectClass.SECRET_KEY,
                "decrypt",
                lambda key: bytes(
                    key.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                ),
            )
        if t in _RSA_TYPES:
            variant = algorithms.check_rsa_encrypt_algorithm(algorithm)
            if variant not in self.rsa_encrypt_algorithms():
                raise self.unsupported(Operation.DECRYPT, t, self._no_oaep())
            params = _OAEP_SHA1 if variant == "oaep-sha1" else _OAEP
            try:
                return self._with_key(
                    info,
                    ObjectClass.PRIVATE_KEY,
                    "decrypt",
                    lambda key: bytes(
                        key.decrypt(
                            ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                        )
                    ),
                )
            except InvalidArgument:  # CKR_ARGUMENTS_BAD: the token refused the OAEP parameters
                raise self.unsupported(Operation.DECRYPT, t, self._no_oaep()) from None
        raise self.unsupported(Operation.DECRYPT, t)

    # -- agreement -----------------------------------------------------------------------------
    def agree(
        self, info: KeyInfo, peer: PublicKeyTypes, new: NewKey, salt: bytes, context: bytes
    ) -> str:
        """PKCS#11: C_DeriveKey with CKM_ECDH1_DERIVE (CKD_NULL) into a session object read once
        with C_GetAttributeValue and destroyed (C_DestroyObject); HKDF-SHA256 on the host; then
        C_CreateObject for the new key.

        SoftHSM2 has no HKDF mechanism, so the shared secret and the derived key pass through
        host memory for a moment (docs/pkcs11.md). The result equals HKDF-SHA256 over the ECDH
        secret, as every Strongroom backend computes it.
        """
        t = info.type
        if t not in _EC_TYPES:
            raise self.unsupported(Operation.AGREE, t)
        if new.info.type not in _SECRET_TYPES:
            raise self.unsupported(
                Operation.AGREE, new.info.type, "agreement here makes aes-256 or hmac-sha256 keys"
            )
        self._need("ECDH1_DERIVE", "agree", t)
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise InvalidArgument("ECDH needs an EC peer public key")
        shared = self._ecdh(info, keys.uncompressed_point(peer))
        try:
            okm = HKDF(hashes.SHA256(), keys.SYMMETRIC_SIZE, salt or None, context).derive(shared)
        finally:
            scrub_bytes(shared)
        try:
            return self._create_secret(new, okm, "agree")
        finally:
            scrub_bytes(okm)

    def _ecdh(self, info: KeyInfo, point: bytes) -> bytes:
        size = keys.COORDINATE_SIZE[info.type]

        def derive(key: Any) -> bytes:
            shared = key.derive_key(
                P11KeyType.GENERIC_SECRET,
                size * 8,
                store=False,
                capabilities=0,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, point),
                template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
            )
            try:
                return bytes(shared[Attribute.VALUE])
            finally:
                shared.destroy()

        return self._with_key(info, ObjectClass.PRIVATE_KEY, "agree", derive)

    # -- adopt, delete, random -----------------------------------------------------------------
    def adopt(self, ref: Mapping[str, str]) -> ExistingKey:
        """PKCS#11: C_FindObjects by CKA_LABEL and/or CKA_ID, then C_GetAttributeValue for the
        key type and its CKA_SIGN/CKA_DECRYPT/... flags. Nothing is copied or changed."""
        unknown = set(ref) - {"label", "id"}
        if unknown or not ref:
            raise InvalidArgument("a pkcs11 key is found by label, id, or both")
        template: dict[Any, Any] = {}
        if "label" in ref:
            template[Attribute.LABEL] = ref["label"]
        if "id" in ref:
            try:
                template[Attribute.ID] = bytes.fromhex(ref["id"])
            except ValueError:
                raise InvalidArgument("--id must be hex, e.g. 01 or a1b2c3") from None
        what = " and ".join(f"{k} {v!r}" for k, v in sorted(ref.items()))
        return self._with_session("adopt", None, lambda p: self._inspect(p.session, template, what))

    def _inspect(self, session: Any, template: dict[Any, Any], what: str) -> ExistingKey:
        found = []
        for klass in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
            found += list(session.get_objects({**template, Attribute.CLASS: klass}))
        if not found:
            raise InvalidArgument(
                f"token {self.token_label!r} has no private or secret key with {what}"
            )
        if len(found) > 1:
            raise InvalidArgument(
                f"{len(found)} keys on token {self.token_label!r} match {what}; give --id too"
            )
        obj = found[0]
        attrs = obj.get_attributes(
            [
                Attribute.CLASS,
                Attribute.KEY_TYPE,
                Attribute.ID,
                Attribute.LABEL,
                Attribute.EXTRACTABLE,
                Attribute.SIGN,
                Attribute.DECRYPT,
                Attribute.DERIVE,
                Attribute.UNWRAP,
            ]
        )
        key_type = self._type_of(obj, attrs)
        key_id = bytes(attrs.get(Attribute.ID) or b"")
        label = str(attrs.get(Attribute.LABEL) or "")
        klass = attrs.get(Attribute.CLASS)
        if key_id:
            same = list(session.get_objects({Attribute.ID: key_id, Attribute.CLASS: klass}))
            if len(same) != 1:
                raise InvalidArgument(
                    f"{len(same)} keys on token {self.token_label!r} share id {key_id.hex()}; "
                    "give them unique ids first"
                )
            handle = _ID_PREFIX + key_id.hex()
        elif label:
            handle = _LABEL_PREFIX + label
        else:
            raise InvalidArgument("the key has neither an id nor a label to find it by")
        usage = self._usage_of(obj, key_type, attrs)
        info = KeyInfo(
            name=label or key_id.hex(), type=key_type, backend=self.name, usage=usage, handle=handle
        )
        if key_type.is_asymmetric:
            self._publics[handle] = self._read_public(session, info)
        attributes = {"token": self.token_label}
        if key_id:
            attributes["id"] = key_id.hex()
        if label:
            attributes["label"] = label
        return ExistingKey(
            handle, key_type, usage, bool(attrs.get(Attribute.EXTRACTABLE)), attributes
        )

    def _type_of(self, obj: Any, attrs: dict[Any, Any]) -> KeyType:
        kt = attrs.get(Attribute.KEY_TYPE)
        found: KeyType | None = None
        if kt == P11KeyType.EC:
            found = keys.ec_type_of(bytes(obj[Attribute.EC_PARAMS]))
        elif kt == P11KeyType.EC_EDWARDS:
            found = (
                KeyType.ED25519 if keys.is_ed25519_params(bytes(obj[Attribute.EC_PARAMS])) else None
            )
        elif kt == P11KeyType.RSA:
            found = keys.rsa_type_of(len(bytes(obj[Attribute.MODULUS]).lstrip(b"\0")) * 8)
        elif kt == P11KeyType.AES:
            found = KeyType.AES_256 if int(obj[Attribute.VALUE_LEN]) == 32 else None
        elif kt in (P11KeyType.GENERIC_SECRET, P11KeyType.SHA256_HMAC):
            found = KeyType.HMAC_SHA256 if int(obj[Attribute.VALUE_LEN]) >= 32 else None
        if found is None:
            raise UnsupportedOperation(
                self.name, "adopt", None, f"Strongroom has no key type for this token key ({kt!r})"
            )
        return found

    @staticmethod
    def _usage_of(obj: Any, key_type: KeyType, attrs: dict[Any, Any]) -> frozenset[Usage]:
        usage: set[Usage] = set()
        if attrs.get(Attribute.SIGN):
            usage |= {Usage.SIGN, Usage.VERIFY}
        if attrs.get(Attribute.DECRYPT):
            usage |= {Usage.DECRYPT, Usage.ENCRYPT} if key_type.is_asymmetric else {Usage.DECRYPT}
        if attrs.get(Attribute.DERIVE) and key_type in _EC_TYPES:
            usage.add(Usage.AGREE)
        if attrs.get(Attribute.UNWRAP):
            usage.add(Usage.UNWRAP)
        if not key_type.is_asymmetric:
            extra = obj.get_attributes([Attribute.ENCRYPT, Attribute.WRAP, Attribute.VERIFY])
            if extra.get(Attribute.ENCRYPT):
                usage.add(Usage.ENCRYPT)
            if extra.get(Attribute.WRAP):
                usage.add(Usage.WRAP)
            if extra.get(Attribute.VERIFY):
                usage.add(Usage.VERIFY)
        return frozenset(usage & key_type.allowed_usage)

    def delete(self, info: KeyInfo) -> None:
        """PKCS#11: C_FindObjects + C_DestroyObject for each of the key's objects (private,
        public or secret). A key already gone is not an error."""

        def run(pooled: PooledSession) -> None:
            template = self._template(info.handle)
            for klass in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY):
                for obj in list(pooled.session.get_objects({**template, Attribute.CLASS: klass})):
                    obj.destroy()

        try:
            self._with_session("delete", info.type, run)
        finally:
            self._publics.pop(info.handle, None)
            pool = self._pool
            if pool is not None:
                pool.forget(info.handle)

    def random(self, n: int) -> bytes:
        """PKCS#11: C_GenerateRandom (no login needed)."""
        pool = self._pool
        if pool is not None:
            return self._with_session(
                "random", None, lambda p: bytes(p.session.generate_random(n * 8))
            )
        module, token = self._connect()
        try:
            return bytes(with_public_session(module, token, lambda s: s.generate_random(n * 8)))
        except PKCS11Error as e:
            raise self._error(e, "random", None) from e


def _module_env(value: Any, context: BackendContext) -> dict[str, str]:
    """The `env` table, checked: variable names to string values."""
    if value is None:
        return {}
    env: dict[str, str] = {}
    for name, item in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise context.config_error(
                f"{name!r} is not an environment variable name (letters, digits and _)", "env"
            )
        if not isinstance(item, str):
            raise context.config_error(f"{name} must be a string, as every value in env", "env")
        if "\0" in item:
            raise context.config_error(f"{name} must not contain a NUL character", "env")
        env[name] = item
    return env


def _no_algorithm(algorithm: str | None) -> None:
    if algorithm is not None:
        raise InvalidArgument(
            f"the pkcs11 backend picks the cipher from the key type; got {algorithm!r}"
        )
