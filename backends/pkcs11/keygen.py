"""Key creation in a PKCS#11 token: the attribute templates of new keys, `generate`, and
`import_key` of raw secret keys.

`Pkcs11KeyCreation` is a mixin of `Pkcs11Backend`. New keys are token objects, sensitive,
with a random CKA_ID and the key name as CKA_LABEL; they are extractable only when created
exportable, and each CKA_SIGN/CKA_DECRYPT/... flag follows the key's usage. The templates
are shared with unwrap (wrap.py) and agreement (`_create_secret`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from strongroom.backend import BackendContext, Capability, NewKey
from strongroom.errors import InvalidArgument, UnsupportedOperation
from strongroom.memory import scrub_bytes
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import keys
from .keys import _EC_TYPES, _ID_PREFIX, _SECRET_TYPES
from .token import IMPORT_ERROR, PooledSession

if IMPORT_ERROR is None:
    from pkcs11 import Attribute, Mechanism, ObjectClass
    from pkcs11 import KeyType as P11KeyType

T = TypeVar("T")


class Pkcs11KeyCreation:
    """Mixin of `Pkcs11Backend`: new keys' templates, `generate` and `import_key`."""

    if TYPE_CHECKING:  # Pkcs11Backend's, Pkcs11Discovery's and Backend's
        context: BackendContext

        def capabilities(self) -> frozenset[Capability]: ...
        def unsupported(
            self, op: Operation | str, key_type: KeyType | None, detail: str = ""
        ) -> UnsupportedOperation: ...
        def _missing(self, key_type: KeyType, op: Operation) -> str: ...
        def _with_session(
            self, operation: str, key_type: KeyType | None, action: Callable[[PooledSession], T]
        ) -> T: ...

    def _new_id(self) -> bytes:
        """The CKA_ID of a new catalog key: Strongroom's mark and the keystore's store id
        (`BackendContext.owner`), then ten random bytes; sixteen random bytes when the
        backend was built without a store."""
        owner = self.context.owner
        if not owner:
            return os.urandom(16)
        return keys.OWNED_ID_MARK + owner + os.urandom(10)

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
