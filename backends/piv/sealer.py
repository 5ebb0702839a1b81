"""The `Sealer` of the PIV backend: the vault master key sealed to the card's 9D key.

`PivSealer` is a mixin of `PivBackend`. Sealing is ECDH between a fresh ephemeral key and
the card's key-management key (slot 9D, made with its certificate if the slot is empty),
HKDF-SHA256 and XChaCha20-Poly1305; it needs only the 9D public key. Unsealing checks that
the card's 9D key is the one the slot names, then runs the ECDH on the card, with its PIN.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom import sodium
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    UnsupportedOperation,
)
from strongroom.types import KeyType, Operation

from .card import PcscCard
from .slots import ALG_P256, ALG_P384, SEALER_SLOT, VAULT_KEY_NAME, _slot_name, parse_slot

T = TypeVar("T")

SEALED_FORMAT = "strongroom-piv-ecdh"
_SEAL_INFO = b"strongroom piv vault slot v1\x00"


class PivSealer:
    """Mixin of `PivBackend`: `seal` and `unseal` for vault key slots."""

    if TYPE_CHECKING:  # PivBackend's, PivCertificates' and Backend's

        def unsupported(
            self, op: Operation | str, key_type: KeyType | None, detail: str = ""
        ) -> UnsupportedOperation: ...
        def _run(self, fn: Callable[[PcscCard], T]) -> T: ...
        def _run_held(self, fn: Callable[[PcscCard], T]) -> T: ...
        def _cert(self, card: PcscCard, slot: int) -> x509.Certificate | None: ...
        def _private_op(
            self, card: PcscCard, slot: int, alg: int, data: bytes, tag: int = 0x81
        ) -> bytes: ...
        def _generate_in(
            self, card: PcscCard, slot: int, key_type: KeyType, name: str, usage: frozenset[str]
        ) -> x509.Certificate: ...

    def _sealer_public(self, card: PcscCard, create: bool) -> ec.EllipticCurvePublicKey:
        cert = self._cert(card, SEALER_SLOT)
        if cert is None:
            if not create:
                raise AuthenticationFailed(
                    "the PIV card holds no key in slot 9d; this is not the card the vault slot "
                    "was sealed to"
                )
            cert = self._generate_in(
                card, SEALER_SLOT, KeyType.ECDSA_P256, VAULT_KEY_NAME, frozenset({"agree"})
            )
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise self.unsupported(
                "seal", None, "slot 9d of the PIV card holds an RSA key; ECDH needs an EC key"
            )
        return public

    def seal(self, secret: memoryview, label: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """ECDH between a fresh ephemeral key and the card's 9D key (made, with its
        certificate, if 9D is empty), HKDF-SHA256, XChaCha20-Poly1305 around `secret`.
        Sealing needs only the 9D public key; unsealing needs the card and its PIN."""
        unknown = set(options) - {"pin"}
        if unknown:
            raise InvalidArgument(
                f"a PIV card slot takes no options {', '.join(sorted(unknown))} (the card's PIN "
                "is always needed to unseal)"
            )

        def find(card: PcscCard) -> tuple[ec.EllipticCurvePublicKey, bytes | None]:
            return self._sealer_public(card, create=True), card.chuid_guid()

        card_public, guid = self._run_held(find)
        ephemeral = ec.generate_private_key(card_public.curve)
        shared = ephemeral.exchange(ec.ECDH(), card_public)
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        params: dict[str, Any] = {
            "format": SEALED_FORMAT,
            "version": 1,
            "label": label,
            "slot": _slot_name(SEALER_SLOT),
            "curve": card_public.curve.name,
            "card_key": _fingerprint(card_public),
            "card_guid": guid.hex() if guid else None,
            "ephemeral": base64.b64encode(point).decode(),
            "salt": base64.b64encode(os.urandom(32)).decode(),
            "kdf": "hkdf-sha256",
            "aead": "xchacha20poly1305-ietf",
        }
        kek = self._kek(shared, params)
        try:
            with memoryview(kek) as view:
                params["wrapped"] = base64.b64encode(
                    sodium.seal(view, secret, _slot_aad(params))
                ).decode()
        finally:
            kek[:] = b"\0" * len(kek)
        return params

    def unseal(self, params: Mapping[str, Any], out: memoryview) -> None:
        """Check the card's 9D key is the slot's, VERIFY the PIN, ECDH on the card with the
        stored ephemeral point, HKDF, and open the wrapped master key into `out`."""
        try:
            if params.get("format") != SEALED_FORMAT or params.get("version") != 1:
                raise ValueError("format")
            slot = parse_slot(str(params["slot"]))
            point = base64.b64decode(str(params["ephemeral"]), validate=True)
            wrapped = base64.b64decode(str(params["wrapped"]), validate=True)
            base64.b64decode(str(params["salt"]), validate=True)
            card_key = str(params["card_key"])
        except (KeyError, ValueError, TypeError, binascii.Error, InvalidArgument):
            raise IntegrityError("the PIV key slot of the vault is malformed") from None

        def agree(card: PcscCard) -> bytes:
            cert = self._cert(card, slot)
            public = cert.public_key() if cert is not None else None
            if (
                not isinstance(public, ec.EllipticCurvePublicKey)
                or _fingerprint(public) != card_key
            ):
                raise AuthenticationFailed(
                    f"the PIV card in {card.reader!r} is not the card this vault slot was "
                    f"sealed to (its slot {_slot_name(slot)} key differs)"
                )
            alg = ALG_P256 if public.curve.key_size == 256 else ALG_P384
            return self._private_op(card, slot, alg, point, tag=0x85)

        shared = self._run(agree)
        kek = self._kek(shared, params)
        try:
            with memoryview(kek) as view:
                sodium.open_into(view, wrapped, _slot_aad(params), out)
        except IntegrityError:
            raise AuthenticationFailed("the PIV card's key does not open this vault slot") from None
        finally:
            kek[:] = b"\0" * len(kek)

    @staticmethod
    def _kek(shared: bytes, params: Mapping[str, Any]) -> bytearray:
        kek = bytearray(32)
        salt = base64.b64decode(str(params["salt"]))
        HKDF(hashes.SHA256(), 32, salt, _SEAL_INFO + str(params["label"]).encode()).derive_into(
            shared, kek
        )
        _scrub(shared)
        return kek


def _fingerprint(public: PublicKeyTypes) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _slot_aad(params: Mapping[str, Any]) -> bytes:
    import json

    fields = {k: v for k, v in params.items() if k != "wrapped"}
    return b"strongroom-piv-slot|" + json.dumps(fields, sort_keys=True).encode()


def _scrub(b: bytes) -> None:
    try:
        from strongroom.memory import scrub_bytes
    except ImportError:  # pragma: no cover - the native extension is missing
        return
    scrub_bytes(b)
