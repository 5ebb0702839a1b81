"""Keys found on a PKCS#11 token rather than made for a catalog row: `key adopt` (a key
Strongroom did not create, found by label or id) and the inventory `strongroom doctor` uses
(keys Strongroom created whose catalog row a crash never wrote).

`Pkcs11Adopt` is a mixin of `Pkcs11Backend`. Adopting reads the key's type and its
CKA_SIGN/CKA_DECRYPT/... flags (the usage the catalog row may narrow, never widen) and
changes nothing on the token; the handle is the key's CKA_ID when that is unique, its
label otherwise. The inventory lists only keys whose CKA_ID carries `keys.OWNED_ID_MARK`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom.backend import BackendContext, ExistingKey
from strongroom.errors import InvalidArgument, UnsupportedOperation
from strongroom.types import KeyInfo, KeyType, Usage

from . import keys
from .keys import _EC_TYPES, _ID_PREFIX, _LABEL_PREFIX
from .token import IMPORT_ERROR, PooledSession

if IMPORT_ERROR is None:
    from pkcs11 import Attribute, ObjectClass
    from pkcs11 import KeyType as P11KeyType

T = TypeVar("T")


class Pkcs11Adopt:
    """Mixin of `Pkcs11Backend`: `adopt`."""

    if TYPE_CHECKING:  # Pkcs11Backend's, and Backend's
        name: str
        token_label: str
        _publics: dict[str, PublicKeyTypes]
        _pool: Any
        context: BackendContext

        def _with_session(
            self, operation: str, key_type: KeyType | None, action: Callable[[PooledSession], T]
        ) -> T: ...
        def _read_public(self, session: Any, info: KeyInfo) -> PublicKeyTypes: ...

    def owned_keys(self) -> dict[str, str]:
        """PKCS#11: C_FindObjects over private and secret keys, keeping those whose CKA_ID
        carries Strongroom's mark and this keystore's store id: {handle: what the key is, for
        a person to judge}."""
        prefix = self._owned_prefix()

        def run(pooled: PooledSession) -> dict[str, str]:
            found: dict[str, str] = {}
            for klass, kind in (
                (ObjectClass.PRIVATE_KEY, "private key"),
                (ObjectClass.SECRET_KEY, "secret key"),
            ):
                for obj in pooled.session.get_objects({Attribute.CLASS: klass}):
                    key_id = bytes(obj[Attribute.ID] or b"")
                    if key_id.startswith(prefix):
                        label = obj[Attribute.LABEL]
                        found[_ID_PREFIX + key_id.hex()] = (
                            f"{kind} {label!r} on token {self.token_label!r}"
                        )
            return found

        return self._with_session("list keys", None, run)

    def _owned_prefix(self) -> bytes:
        owner = self.context.owner
        if not owner:
            raise UnsupportedOperation(self.name, "list keys", None, "it was built without a store")
        return keys.OWNED_ID_MARK + owner

    def remove_owned(self, handle: str) -> None:
        """PKCS#11: C_DestroyObject of every object (key halves, certificate) with the
        handle's CKA_ID, which must carry Strongroom's mark (a key another program made is
        never removed this way)."""
        if not handle.startswith(_ID_PREFIX):
            raise InvalidArgument(f"{handle!r} is not a key Strongroom created")
        try:
            key_id = bytes.fromhex(handle[len(_ID_PREFIX) :])
        except ValueError:
            raise InvalidArgument(f"{handle!r} is not a key Strongroom created") from None
        if not key_id.startswith(self._owned_prefix()):
            raise InvalidArgument(f"{handle!r} is not a key this keystore created")

        def run(pooled: PooledSession) -> None:
            for obj in list(pooled.session.get_objects({Attribute.ID: key_id})):
                obj.destroy()

        try:
            self._with_session("remove", None, run)
        finally:
            self._publics.pop(handle, None)
            if self._pool is not None:
                self._pool.forget(handle)

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
