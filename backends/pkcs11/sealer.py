"""The `Sealer` of a PKCS#11 token: vault key slots sealed under a token AES key.

`Pkcs11Sealer` is a mixin of `Pkcs11Backend`. Each seal makes a new token AES-256 key
(sensitive, never extractable, encrypt/decrypt only) and encrypts the secret with AES-GCM
under it; the associated data binds the slot to the vault label, the token's serial and the
key's CKA_ID. docs/pkcs11.md describes the slot format.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    UnsupportedOperation,
)
from strongroom.memory import scrub_bytes
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import keys
from .keys import _ID_PREFIX
from .token import IMPORT_ERROR, PooledSession, SessionPool

if IMPORT_ERROR is None:
    from pkcs11 import Attribute, GCMParams, Mechanism, ObjectClass
    from pkcs11 import KeyType as P11KeyType

T = TypeVar("T")

SEAL_FORMAT = "pkcs11-aes-gcm/v1"


class Pkcs11Sealer:
    """Mixin of `Pkcs11Backend`: `seal` and `unseal` for vault key slots."""

    if TYPE_CHECKING:  # Pkcs11Backend's, and Backend's
        name: str
        _publics: dict[str, PublicKeyTypes]

        def unsupported(
            self, op: Operation | str, key_type: KeyType | None, detail: str = ""
        ) -> UnsupportedOperation: ...
        def _need(self, mechanism: str, operation: str, key_type: KeyType) -> None: ...
        def _object(self, pooled: PooledSession, info: KeyInfo, klass: Any) -> Any: ...
        def _with_key(
            self, info: KeyInfo, klass: Any, operation: str, action: Callable[[Any], T]
        ) -> T: ...
        def _with_session(
            self, operation: str, key_type: KeyType | None, action: Callable[[PooledSession], T]
        ) -> T: ...

        token_label: str

        def _serial(self) -> str: ...
        def _require_pool(self) -> SessionPool: ...

    def seal(self, secret: memoryview, label: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """PKCS#11: C_GenerateKey (CKM_AES_KEY_GEN: a token AES-256 key, sensitive, never
        extractable, encrypt/decrypt only), then C_Encrypt with CKM_AES_GCM under it.

        The slot records the token, the key's CKA_ID, the nonce and the ciphertext; the
        associated data binds it to `label` (the vault's id).
        """
        if options:
            raise InvalidArgument(f"the pkcs11 key slot takes no options (got {sorted(options)})")
        self._need("AES_KEY_GEN", "seal", KeyType.AES_256)
        self._need("AES_GCM", "seal", KeyType.AES_256)
        key_id = os.urandom(16)  # not marked: a vault key slot, not a catalog key, holds it
        nonce = os.urandom(keys.GCM_NONCE)
        serial = self._serial()
        aad = _seal_aad(label, serial, key_id.hex())
        plain = bytes(secret)

        def run(pooled: PooledSession) -> bytes:
            key = pooled.session.generate_key(
                P11KeyType.AES,
                256,
                id=key_id,
                label=f"strongroom-seal/{label}",
                store=True,
                capabilities=0,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
            try:
                return bytes(
                    key.encrypt(
                        plain, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
                    )
                )
            except BaseException:
                key.destroy()
                raise

        try:
            ct = self._with_session("seal", KeyType.AES_256, run)
        finally:
            scrub_bytes(plain)
        return {
            "format": SEAL_FORMAT,
            "label": label,
            "token": self.token_label,
            "token_serial": serial,
            "key_id": key_id.hex(),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ct).decode(),
        }

    def unseal(self, params: Mapping[str, Any], out: memoryview) -> None:
        """PKCS#11: C_FindObjects (the slot's CKA_ID) and C_Decrypt with CKM_AES_GCM."""
        try:
            if params.get("format") != SEAL_FORMAT:
                raise ValueError("format")
            key_id = bytes.fromhex(str(params["key_id"]))
            nonce = base64.b64decode(str(params["nonce"]), validate=True)
            ct = base64.b64decode(str(params["ciphertext"]), validate=True)
            serial = str(params["token_serial"])
            aad = _seal_aad(str(params["label"]), serial, key_id.hex())
        except (KeyError, ValueError, TypeError):
            raise IntegrityError("the pkcs11 vault key slot is malformed") from None
        self._require_pool()
        mine = self._serial()
        if serial != mine:
            raise AuthenticationFailed(
                f"this vault key slot was sealed by token serial {serial}, "
                f"but backend {self.name!r} is token serial {mine}"
            )
        slot_key = KeyInfo(
            name=f"vault key slot {key_id.hex()}",
            type=KeyType.AES_256,
            backend=self.name,
            usage=frozenset({Usage.DECRYPT}),
            handle=_ID_PREFIX + key_id.hex(),
        )
        try:
            plain = self._with_key(
                slot_key,
                ObjectClass.SECRET_KEY,
                "unseal",
                lambda key: bytes(
                    key.decrypt(
                        ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
                    )
                ),
            )
        except KeyNotFound:
            raise AuthenticationFailed(
                f"token {self.token_label!r} no longer holds the key of this vault key slot "
                f"(CKA_ID {key_id.hex()})"
            ) from None
        try:
            if len(plain) != len(out):
                raise IntegrityError("the pkcs11 vault key slot holds a secret of the wrong size")
            out[:] = plain
        finally:
            scrub_bytes(plain)


def _seal_aad(label: str, serial: str, key_id: str) -> bytes:
    """What the slot's AES-GCM tag also covers: the format, the vault label, the token, the key."""
    return f"strongroom-seal|{SEAL_FORMAT}|{label}|{serial}|{key_id}".encode()
