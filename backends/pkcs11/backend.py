"""Keys in a PKCS#11 token: SoftHSM2 in CI; YubiHSM, Luna, CloudHSM or nShield in production.

New keys are token objects, sensitive, with a random CKA_ID and the key name as
CKA_LABEL; they are extractable only when created exportable. Signing hashes on the host
and signs the digest (CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS), so one mechanism per
key type is enough and tokens without CKM_ECDSA_SHA256 (SoftHSM2) work. docs/pkcs11.md
describes the configuration, attributes, mechanisms and the vault key-slot format.

Mixins of `Pkcs11Backend`, each in its own module: discovery (discovery.py: the module, the
token, capabilities), key creation (keygen.py), `key adopt` (adopt.py), AES key wrap
(wrap.py) and the vault key-slot `Sealer` (sealer.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom import algorithms
from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.memory import scrub_bytes, wipe
from strongroom.types import KeyInfo, KeyType, Operation

from . import keys
from .adopt import Pkcs11Adopt
from .discovery import _OAEP, _OAEP_SHA1, _REQUIREMENTS, Pkcs11Discovery
from .errors import translate
from .keygen import Pkcs11KeyCreation
from .keys import _EC_TYPES, _ID_PREFIX, _LABEL_PREFIX, _RSA_TYPES, _SECRET_TYPES
from .sealer import Pkcs11Sealer
from .token import (
    IMPORT_ERROR,
    Module,
    PooledSession,
    SessionPool,
    is_broken_session,
    login,
    logout,
    pin_tag,
    with_public_session,
)
from .wrap import Pkcs11Wrap

if IMPORT_ERROR is None:
    from pkcs11 import (
        KDF,
        MGF,
        Attribute,
        CertificateType,
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


class Pkcs11Backend(
    Pkcs11Discovery, Pkcs11KeyCreation, Pkcs11Adopt, Pkcs11Wrap, Pkcs11Sealer, Backend
):
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

    def unsupported(
        self, op: Operation | str, key_type: KeyType | None, detail: str = ""
    ) -> UnsupportedOperation:
        """As Backend.unsupported, naming the mechanisms the token lacks when that is why."""
        if not detail and key_type is not None and isinstance(op, Operation):
            if (key_type, op) in _REQUIREMENTS:
                detail = self._missing(key_type, op)
        return super().unsupported(op, key_type, detail)

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
            hasher = hashlib.new(algorithms.hash_name(t, algorithm), data)
            return self.sign_digest(info, hasher.digest(), algorithm)
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
        CKM_RSA_PKCS over a SHA-256 (pkcs1v15) or SHA-512 (pkcs1v15-sha512) DigestInfo or
        the caller's own (pkcs1v15-raw), or
        CKM_RSA_PKCS_PSS (SHA-256, MGF1-SHA-256, salt 32) over a SHA-256 digest.

        RSA PKCS#1 v1.5 is the raw CKM_RSA_PKCS over a DigestInfo made here rather than
        CKM_SHA256_RSA_PKCS/CKM_SHA512_RSA_PKCS, so that a digest the caller made
        (`prehashed`) and a message hashed here take one path and give one signature."""
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
            if algorithm == algorithms.RSA_PKCS1V15_RAW:
                block = digest  # the caller's DigestInfo, as given
            else:
                algorithms.rsa_padding(algorithm)
                prefix = (
                    keys.SHA512_DIGEST_INFO
                    if algorithm == algorithms.RSA_PKCS1V15_SHA512
                    else keys.SHA256_DIGEST_INFO
                )
                block = prefix + digest
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
        if algorithm == algorithms.AES_CBC_PAD:  # iv ‖ ct, CKM_AES_CBC_PAD in the token
            _no_aad_for_cbc(aad)
            iv = os.urandom(algorithms.CBC_IV)
            return iv + self._with_key(
                info,
                ObjectClass.SECRET_KEY,
                "encrypt",
                lambda key: bytes(
                    key.encrypt(plaintext, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
                ),
            )
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
        if t is KeyType.AES_256 and algorithm == algorithms.AES_CBC_PAD:
            _no_aad_for_cbc(aad)
            iv, body = ciphertext[: algorithms.CBC_IV], ciphertext[algorithms.CBC_IV :]
            if not body or len(body) % 16:
                raise IntegrityError("ciphertext is not AES-CBC output (IV and whole blocks)")
            return self._with_key(
                info,
                ObjectClass.SECRET_KEY,
                "decrypt",
                lambda key: bytes(
                    key.decrypt(body, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
                ),
            )
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
    def exchange(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """PKCS#11: C_DeriveKey with CKM_ECDH1_DERIVE into a session object, read once with
        C_GetAttributeValue and destroyed: the raw secret, for the caller."""
        if info.type not in _EC_TYPES:
            raise self.unsupported(Operation.AGREE, info.type)
        self._need("ECDH1_DERIVE", "agree", info.type)
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise InvalidArgument("ECDH needs an EC peer public key")
        return self._ecdh(info, keys.uncompressed_point(peer))  # the caller's now

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

    # -- delete, random ------------------------------------------------------------------------
    def delete(self, info: KeyInfo) -> None:
        """PKCS#11: C_FindObjects + C_DestroyObject for each of the key's objects (private,
        public or secret). A key already gone is not an error."""

        def run(pooled: PooledSession) -> None:
            template = self._template(info.handle)
            for klass in (
                ObjectClass.PRIVATE_KEY,
                ObjectClass.PUBLIC_KEY,
                ObjectClass.SECRET_KEY,
                ObjectClass.CERTIFICATE,  # one `store_certificate` wrote beside the key
            ):
                for obj in list(pooled.session.get_objects({**template, Attribute.CLASS: klass})):
                    obj.destroy()

        try:
            self._with_session("delete", info.type, run)
        finally:
            self._publics.pop(info.handle, None)
            pool = self._pool
            if pool is not None:
                pool.forget(info.handle)

    # -- certificates (CertificateStore) --------------------------------------------------------
    def store_certificate(
        self, info: KeyInfo, chain: Sequence[x509.Certificate]
    ) -> Mapping[str, str]:
        """PKCS#11: C_DestroyObject of the key's old CKO_CERTIFICATE, then C_CreateObject of
        a CKC_X_509 token object with the private key's CKA_ID and CKA_LABEL, so tools that
        pair certificates with keys by CKA_ID (pkcs11-tool, OpenSC, p11-kit) find it."""
        leaf = chain[0]
        serial = leaf.serial_number.to_bytes((leaf.serial_number.bit_length() + 8) // 8, "big")

        def run(pooled: PooledSession) -> None:
            session = pooled.session
            private = self._find(session, info, ObjectClass.PRIVATE_KEY)
            key_id, label = private[Attribute.ID], private[Attribute.LABEL]
            old = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: key_id}
            for obj in list(session.get_objects(old)):
                obj.destroy()
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.ID: key_id,
                    Attribute.LABEL: label,
                    Attribute.SUBJECT: leaf.subject.public_bytes(),
                    Attribute.ISSUER: leaf.issuer.public_bytes(),
                    Attribute.SERIAL_NUMBER: keys.der_integer(serial),
                    Attribute.VALUE: leaf.public_bytes(serialization.Encoding.DER),
                }
            )

        self._with_session("store_certificate", info.type, run)
        return {}  # the key's CKA_ID finds it, whatever the certificate says

    def stored_certificate(self, info: KeyInfo) -> x509.Certificate | None:
        """PKCS#11: C_FindObjects for a CKO_CERTIFICATE with the key's CKA_ID (or label),
        C_GetAttributeValue(CKA_VALUE)."""

        def run(pooled: PooledSession) -> bytes | None:
            template = {**self._template(info.handle), Attribute.CLASS: ObjectClass.CERTIFICATE}
            found = list(pooled.session.get_objects(template))
            return bytes(found[0][Attribute.VALUE]) if len(found) == 1 else None

        der = self._with_session("stored_certificate", info.type, run)
        if der is None:
            return None
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError:
            raise StrongroomError(
                f"the certificate beside key {info.name!r} on token {self.token_label!r} is "
                "not a valid X.509 certificate"
            ) from None

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


def _no_aad_for_cbc(aad: bytes) -> None:
    if aad:
        raise InvalidArgument("AES-CBC takes no associated data")


def _no_algorithm(algorithm: str | None) -> None:
    if algorithm is not None:
        raise InvalidArgument(
            f"the pkcs11 backend picks the cipher from the key type; got {algorithm!r}"
        )
