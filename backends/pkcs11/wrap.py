"""AES key wrap (RFC 5649) in a PKCS#11 token: `wrap`/`unwrap` of token keys and the
envelope's `aes-kwp` data-key wrap.

`Pkcs11Wrap` is a mixin of `Pkcs11Backend`: it finds keys and runs in sessions through the
backend's helpers. A key unwrapped into the token gets its public key object made here (EC
keys carry no public point, so it is recovered with ECDH against the base point and one
signature); the private half is decrypted only inside the token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from strongroom import algorithms
from strongroom.backend import NewKey
from strongroom.errors import IntegrityError, InvalidArgument, StrongroomError, UnsupportedOperation
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import keys
from .keys import _EC_TYPES, _ID_PREFIX, _RSA_TYPES, _SECRET_TYPES
from .token import IMPORT_ERROR, PooledSession

if IMPORT_ERROR is None:
    from pkcs11 import KDF, Attribute, Mechanism, ObjectClass, PKCS11Error
    from pkcs11 import KeyType as P11KeyType
    from pkcs11.constants import DEFAULT

T = TypeVar("T")


class Pkcs11Wrap:
    """Mixin of `Pkcs11Backend`: AES key wrap and unwrap with CKM_AES_KEY_WRAP_PAD."""

    if TYPE_CHECKING:  # Pkcs11Backend's, and Backend's
        name: str
        _publics: dict[str, PublicKeyTypes]

        def unsupported(
            self, op: Operation | str, key_type: KeyType | None, detail: str = ""
        ) -> UnsupportedOperation: ...
        def _need(self, mechanism: str, operation: str, key_type: KeyType) -> None: ...
        def _new_id(self) -> bytes: ...
        def _object(self, pooled: PooledSession, info: KeyInfo, klass: Any) -> Any: ...
        def _with_key(
            self, info: KeyInfo, klass: Any, operation: str, action: Callable[[Any], T]
        ) -> T: ...
        def _with_session(
            self, operation: str, key_type: KeyType | None, action: Callable[[PooledSession], T]
        ) -> T: ...
        @staticmethod
        def _private_flags(info: KeyInfo) -> dict[Any, Any]: ...
        @staticmethod
        def _public_flags(info: KeyInfo) -> dict[Any, Any]: ...
        @staticmethod
        def _secret_flags(info: KeyInfo) -> dict[Any, Any]: ...

    def _wrap_secret(self, info: KeyInfo, secret: bytes) -> bytes:
        """PKCS#11: C_CreateObject (a session secret key holding `secret`), C_WrapKey with
        CKM_AES_KEY_WRAP_PAD (RFC 5649) under the token key, C_DestroyObject.

        The envelope's `aes-kwp` data-key wrap (SoftHSM2, like many tokens, offers key wrap
        only through C_WrapKey, not C_Encrypt)."""
        self._need("AES_KEY_WRAP_PAD", "wrap", info.type)
        if not 1 <= len(secret) <= 512:
            raise InvalidArgument("AES key wrap takes a secret of 1 to 512 bytes")

        def run(kek: Any) -> bytes:
            obj = kek.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True,
                    Attribute.VALUE: secret,
                }
            )
            try:
                return bytes(kek.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            finally:
                obj.destroy()

        return self._with_key(info, ObjectClass.SECRET_KEY, "wrap", run)

    def _unwrap_secret(self, info: KeyInfo, blob: bytes) -> bytes:
        """PKCS#11: C_UnwrapKey with CKM_AES_KEY_WRAP_PAD into a session object that may be
        read, C_GetAttributeValue of its CKA_VALUE, C_DestroyObject. A blob that does not
        unwrap (another key, damage) is an IntegrityError."""
        self._need("AES_KEY_WRAP_PAD", "unwrap", info.type)
        if len(blob) < 16 or len(blob) % 8:
            raise IntegrityError("the wrapped key is not RFC 5649 output (length)")

        def run(kek: Any) -> bytes:
            obj = kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                P11KeyType.GENERIC_SECRET,
                blob,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template={
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                    Attribute.PRIVATE: True,
                },
            )
            try:
                return bytes(obj[Attribute.VALUE])
            finally:
                obj.destroy()

        return self._with_key(info, ObjectClass.SECRET_KEY, "unwrap", run)

    def wrap(self, info: KeyInfo, target: KeyInfo) -> bytes:
        """PKCS#11: C_WrapKey with CKM_AES_KEY_WRAP_PAD (RFC 5649): the raw value of a secret
        key, PKCS#8 of an EC or RSA key (the forms the vault wraps, so blobs move both ways)."""
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.WRAP, info.type)
        self._need("AES_KEY_WRAP_PAD", "wrap", info.type)
        if target.type not in (*_SECRET_TYPES, *_EC_TYPES, *_RSA_TYPES):
            raise self.unsupported(Operation.WRAP, target.type, _ED25519_WRAP)
        klass = ObjectClass.SECRET_KEY if target.type in _SECRET_TYPES else ObjectClass.PRIVATE_KEY

        def run(pooled: PooledSession) -> bytes:
            kek = self._object(pooled, info, ObjectClass.SECRET_KEY)
            key = self._object(pooled, target, klass)
            return bytes(kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD))

        return self._with_session("wrap", target.type, run)

    def unwrap(self, info: KeyInfo, blob: bytes, new: NewKey) -> str:
        """PKCS#11: C_UnwrapKey with CKM_AES_KEY_WRAP_PAD into a token object, then
        C_CreateObject for its public key object (public numbers from the private object for
        RSA; for EC, ECDH with the base point gives x(Q) and one C_Sign picks y).

        Moves an exportable key in from the vault (or anything that wraps with RFC 5649): the
        private half is decrypted only inside the token.
        """
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.UNWRAP, info.type)
        self._need("AES_KEY_WRAP_PAD", "unwrap", info.type)
        t = new.info.type
        if t not in (*_SECRET_TYPES, *_EC_TYPES, *_RSA_TYPES):
            raise self.unsupported(Operation.UNWRAP, t, _ED25519_WRAP)
        key_id = self._new_id()
        target = KeyInfo(
            name=new.info.name,
            type=t,
            backend=self.name,
            usage=new.info.usage,
            exportable=new.info.exportable,
            namespace=new.info.namespace,
            handle=_ID_PREFIX + key_id.hex(),
        )

        def run(pooled: PooledSession) -> None:
            kek = self._object(pooled, info, ObjectClass.SECRET_KEY)
            made: list[Any] = []
            try:
                self._unwrap_into(pooled.session, kek, blob, target, key_id, made)
            except BaseException:
                for obj in made:
                    try:
                        obj.destroy()
                    except PKCS11Error:
                        continue
                raise

        self._with_session("unwrap", t, run)
        return target.handle

    def _unwrap_into(
        self, session: Any, kek: Any, blob: bytes, target: KeyInfo, key_id: bytes, made: list[Any]
    ) -> None:
        t = target.type
        common = {"id": key_id, "label": target.name, "store": True, "capabilities": 0}
        if t in _SECRET_TYPES:
            # RFC 5649 output is the plaintext padded to 8 bytes, plus 8: 40 for a 32-byte key.
            # (SoftHSM2 leaves CKA_VALUE_LEN of an unwrapped key at 0, so check it here.)
            if len(blob) != keys.SYMMETRIC_SIZE + 8:
                raise InvalidArgument(f"the wrapped key is not a {t.value} key")
            key = kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                P11KeyType.AES if t is KeyType.AES_256 else P11KeyType.GENERIC_SECRET,
                blob,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                template=self._secret_flags(target),
                **common,
            )
            made.append(key)
            if int(key[Attribute.VALUE_LEN]) not in (0, keys.SYMMETRIC_SIZE):
                raise InvalidArgument(f"the wrapped key is not a {t.value} key")
            return
        private = self._private_flags(target)
        # Attributes a private key cannot have (python-pkcs11 would add them as false).
        private.update(
            {Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.VERIFY: DEFAULT}
        )
        if t in _EC_TYPES:
            # Needed once, to find the public key: ECDH with G, and one signature.
            private.update({Attribute.SIGN: True, Attribute.DERIVE: True})
        key = kek.unwrap_key(
            ObjectClass.PRIVATE_KEY,
            P11KeyType.EC if t in _EC_TYPES else P11KeyType.RSA,
            blob,
            mechanism=Mechanism.AES_KEY_WRAP_PAD,
            template=private,
            **common,
        )
        made.append(key)
        public_template = self._public_flags(target)
        public_template.update(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.ID: key_id,
                Attribute.LABEL: target.name,
            }
        )
        if t in _RSA_TYPES:
            public_template.update(
                {
                    Attribute.KEY_TYPE: P11KeyType.RSA,
                    Attribute.MODULUS: key[Attribute.MODULUS],
                    Attribute.PUBLIC_EXPONENT: key[Attribute.PUBLIC_EXPONENT],
                }
            )
            public: PublicKeyTypes = keys.rsa_public(
                public_template[Attribute.MODULUS], public_template[Attribute.PUBLIC_EXPONENT]
            )
        else:
            if bytes(key[Attribute.EC_PARAMS]) != keys.EC_PARAMS[t]:
                raise InvalidArgument(f"the wrapped key is not a {t.value} key")
            public = self._ec_public_of(key, t)
            for attribute, usage in ((Attribute.SIGN, Usage.SIGN), (Attribute.DERIVE, Usage.AGREE)):
                if usage not in target.usage:
                    key[attribute] = False
            public_template.update(
                {
                    Attribute.KEY_TYPE: P11KeyType.EC,
                    Attribute.EC_PARAMS: keys.EC_PARAMS[t],
                    Attribute.EC_POINT: keys.ec_point_attribute(public),
                }
            )
        if not algorithms.public_key_matches(t, public):
            raise InvalidArgument(f"the wrapped key is not a {t.value} key")
        made.append(session.create_object(public_template))
        self._publics[target.handle] = public

    def _ec_public_of(self, key: Any, t: KeyType) -> ec.EllipticCurvePublicKey:
        """The public point of an EC private key object that has no CKA_EC_POINT.

        PKCS#11: C_DeriveKey(CKM_ECDH1_DERIVE) with the base point G gives x(d·G), the
        public key's x-coordinate; C_Sign(CKM_ECDSA) then tells y from -y.
        """
        size = keys.COORDINATE_SIZE[t]
        shared = key.derive_key(
            P11KeyType.GENERIC_SECRET,
            size * 8,
            store=False,
            capabilities=0,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, keys.generator(t)),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        try:
            x = bytes(shared[Attribute.VALUE])  # public, not secret: x(Q)
        finally:
            shared.destroy()
        probe = os.urandom(size)
        signature = keys.ecdsa_der(key.sign(probe, mechanism=Mechanism.ECDSA))
        chosen = hashes.SHA256() if t is KeyType.ECDSA_P256 else hashes.SHA384()
        for candidate in keys.ec_public_candidates(t, x):
            try:
                candidate.verify(signature, probe, ec.ECDSA(Prehashed(chosen)))
            except InvalidSignature:
                continue
            return candidate
        raise StrongroomError("could not recover the public key of the unwrapped EC key")


_ED25519_WRAP = (
    "AES key wrap moves aes-256, hmac-sha256, EC and RSA keys; Ed25519 keys cannot be unwrapped "
    "into a PKCS#11 token from the vault's raw-seed form"
)
