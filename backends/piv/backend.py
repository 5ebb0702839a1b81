"""PIV smart cards (NIST SP 800-73-4) over PC/SC: YubiKeys, government PIV/CAC cards, Nitrokeys.

Keys live in the card's key slots (9A, 9C, 9D, 9E and the retired slots 82-95); the catalog
maps a key name to its slot (the handle is the slot as two hex digits). After generating a
key, Strongroom writes a self-signed certificate for it into the slot's data object, signed
by the card, so standard tools (OpenSC, ykman, browsers) see the key. That certificate also
marks the slot as taken, and its subject (CN = key name, O = Strongroom) tells which key it
holds, so a key is never used on, or deleted from, the wrong card.

The card does the private-key operation only: hashing, and RSA padding (PKCS#1 v1.5 or PSS),
happen on the host. The PIN is verified once per session (9C: before every signature, as
cards require), never retried by Strongroom after the card refuses it. The management key
(for generating keys and writing objects) is the card's default unless configured.

As a Sealer it wraps the vault master key under HKDF(ECDH(ephemeral key, card's 9D key)):
sealing needs only the 9D public key, unsealing the card and its PIN.

Mixins of `PivBackend`, each in its own module: the PIN and the management key in access.py
(`PivAccess`), the slots' certificates in certs.py (`PivCertificates`), the Sealer in
sealer.py (`PivSealer`). The slot numbers and algorithm ids they share are in slots.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom import algorithms as sr_algorithms
from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, ExistingKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import encoding
from .access import MGMT_ALGS, PivAccess, _tag
from .card import (
    SW_BLOCKED,
    SW_OK,
    SW_REF_NOT_FOUND,
    SW_SECURITY,
    CardGone,
    CardReset,
    PcscCard,
    StatusError,
    find_tag,
    tlv,
)
from .certs import PivCertificates, _tlvs
from .sealer import PivSealer
from .slots import (
    AGREE_ORDER,
    ALG_P256,
    ALG_RSA2048,
    KEY_ALGS,
    KEY_HISTORY_OBJECT,
    PIN_ALWAYS,
    PIN_NEVER,
    RETIRED_SLOTS,
    SIGN_ORDER,
    SLOT_OBJECTS,
    _slot_name,
    parse_slot,
)

T = TypeVar("T")

_PROBE_RETRY_S = 2.0

_CAPABILITIES: frozenset[Capability] = frozenset(
    {
        (t, op)
        for t in KEY_ALGS
        for op in (Operation.GENERATE, Operation.SIGN, Operation.VERIFY, Operation.DELETE)
    }
    | {(KeyType.RSA_2048, Operation.ENCRYPT), (KeyType.RSA_2048, Operation.DECRYPT)}
)


class PivBackend(PivAccess, PivCertificates, PivSealer, Backend):
    """Keys in a PIV card's slots, reached through pcscd."""

    type_name = "piv"
    config_keys = {
        "reader": ConfigKey(
            str, "auto (the first reader with a PIV card) or part of a name", "auto"
        ),
        "pin": ConfigKey(
            (str, list),
            "the card's PIN: env:NAME, file:PATH or prompt",
            ["env:STRONGROOM_PIV_PIN", "prompt"],
            secret=True,
        ),
        "management_key": ConfigKey(
            (str, list),
            "the management key in hex, as env:NAME, file:PATH or prompt (default: the "
            "card's factory key)",
            secret=True,
        ),
        "management_key_type": ConfigKey(
            str,
            "auto, 3des, aes128, aes192 or aes256 (auto: by length; 24 bytes: 3DES, then AES-192)",
            "auto",
        ),
        "slots": ConfigKey(
            list,
            'the slots Strongroom may put new keys in, e.g. ["9a", "82"] (default: all)',
        ),
    }

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        s = context.settings
        self.reader_setting = str(s.get("reader", "auto")) or "auto"
        self.pin = context.secret("pin", "PIV PIN: ")
        self.management_key = (
            context.secret("management_key", "PIV management key (hex): ")
            if s.get("management_key")
            else None
        )
        self.mgmt_type = str(s.get("management_key_type", "auto")).lower()
        if self.mgmt_type != "auto" and self.mgmt_type not in MGMT_ALGS:
            raise context.config_error(
                f"must be auto or one of {', '.join(MGMT_ALGS)}", "management_key_type"
            )
        slots = s.get("slots")
        if slots is None:
            self.slots = frozenset(SLOT_OBJECTS)
        else:
            try:
                self.slots = frozenset(parse_slot(str(v)) for v in slots)
            except InvalidArgument as e:
                raise context.config_error(str(e), "slots") from None
        self._lock = threading.RLock()
        self._card: PcscCard | None = None
        self._pin_ok = False
        self._rejected: set[bytes] = set()
        self._fingerprint_key = os.urandom(32)
        self._certs: dict[int, x509.Certificate | None] = {}
        self._checked_keys: dict[str, tuple[str, int, x509.Certificate]] = {}
        """handle → (key name, slot, certificate) of keys checked on the connected card."""
        self._unavailable: tuple[float, str] | None = None

    # -- discovery -------------------------------------------------------------------------------
    def availability(self) -> str | None:
        try:
            import smartcard  # noqa: F401
        except ImportError:
            return "pyscard is not installed; pip install 'strongroom[piv]'"
        with self._lock:
            if self._card is not None and self._card.connected:
                return None
            failed = self._unavailable
            if failed is not None and time.monotonic() - failed[0] < _PROBE_RETRY_S:
                return failed[1]
            try:
                self._session()
            except BackendUnavailable as e:
                self._unavailable = (time.monotonic(), e.reason)
                return e.reason
            return None

    def capabilities(self) -> frozenset[Capability]:
        return _CAPABILITIES

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reader_setting": self.reader_setting}
        with self._lock:
            if self._card is None or not self._card.connected:
                return out

            def read(card: PcscCard) -> dict[str, Any]:
                sw = card.verify(None)
                guid = card.chuid_guid()
                used = {
                    _slot_name(slot): self._subject(cert)
                    for slot in sorted(SLOT_OBJECTS)
                    if (cert := self._cert(card, slot)) is not None
                }
                return {
                    "reader": card.reader,
                    "card_guid": guid.hex() if guid else None,
                    "pin": _pin_state(sw),
                    "slots": used,
                }

            out.update(self._run(read))
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        with self._lock:
            self._session()

    def close(self) -> None:
        with self._lock:
            card, self._card = self._card, None
            self._forget_session()
            if card is not None:
                if card.connected:
                    try:  # VERIFY with P1 FF: the card forgets that the PIN was given
                        card.exchange(0x00, 0x20, 0xFF, 0x80, le=False)
                    except (CardGone, CardReset):
                        pass
                card.close()

    def _forget_session(self) -> None:
        self._pin_ok = False
        self._certs.clear()
        self._checked_keys.clear()

    def _session(self) -> PcscCard:
        card = self._card
        if card is not None and card.connected:
            return card
        if card is not None:
            card.close()
            self._card = None
        self._forget_session()
        try:
            card = PcscCard(self.reader_setting)
        except ImportError:
            raise BackendUnavailable(
                self.name, "pyscard is not installed; pip install 'strongroom[piv]'"
            ) from None
        try:
            card.connect()
        except (CardGone, CardReset) as e:
            raise BackendUnavailable(self.name, str(e)) from None
        self._card = card
        self._unavailable = None
        return card

    def _run_held(self, fn: Callable[[PcscCard], T]) -> T:
        """`_run` with the card held (a PC/SC transaction) for the whole of `fn`."""

        def held(card: PcscCard) -> T:
            with card.transaction():
                return fn(card)

        return self._run(held)

    def _run(self, fn: Callable[[PcscCard], T]) -> T:
        """Run `fn` on the card under the lock; map PC/SC failures to Strongroom errors.

        After another program reset the card the whole operation runs once more on a fresh
        connection (the PIN, known good, is given again if needed). A removed card is a
        BackendUnavailable, and the next call connects again.
        """
        with self._lock:
            for attempt in (0, 1):
                card = self._session()
                try:
                    return fn(card)
                except CardReset:
                    self._drop()
                    if attempt:
                        raise BackendUnavailable(
                            self.name, "the card keeps being reset by another program"
                        ) from None
                except CardGone as e:
                    self._drop()
                    raise BackendUnavailable(
                        self.name, f"{e}; insert the card (or reconnect the reader) and try again"
                    ) from None
                except StatusError as e:
                    raise self._status_error(e) from None
            raise AssertionError("unreachable")  # pragma: no cover

    def _drop(self) -> None:
        card, self._card = self._card, None
        self._forget_session()
        if card is not None:
            card.close()

    def _status_error(self, e: StatusError) -> StrongroomError:
        if e.sw == SW_SECURITY:
            return AuthenticationFailed(f"the PIV card refused {e.what}: security status not met")
        if e.sw == SW_BLOCKED:
            return DeviceLocked(f"the PIV card refused {e.what}: blocked")
        return StrongroomError(
            f"the PIV card in {self._card.reader if self._card else 'the reader'!r} "
            f"refused {e.what} (status {e.sw:04X})"
        )

    # -- card operations ---------------------------------------------------------------------------
    def _private_op(
        self, card: PcscCard, slot: int, alg: int, data: bytes, tag: int = 0x81
    ) -> bytes:
        """GENERAL AUTHENTICATE with the slot's key: sign a hash / raw RSA (81) or ECDH (85)."""
        template = tlv(0x82, b"") + tlv(tag, data)
        if slot in PIN_ALWAYS or (slot not in PIN_NEVER and not self._pin_ok):
            with card.transaction():  # VERIFY and the operation it allows, back to back
                self._verify_pin(card)
                answer, sw = card.general_authenticate(alg, slot, template)
        else:
            answer, sw = card.general_authenticate(alg, slot, template)
        if sw == SW_SECURITY and slot not in PIN_NEVER and slot not in PIN_ALWAYS:
            # The card forgot the PIN (another program reset or used it): give it once more.
            self._pin_ok = False
            with card.transaction():
                self._verify_pin(card)
                answer, sw = card.general_authenticate(alg, slot, template)
        if slot in PIN_ALWAYS:
            self._pin_ok = False  # the card spent the verification on this one operation
        if sw == SW_REF_NOT_FOUND:
            raise StatusError(sw, f"the key operation (slot {_slot_name(slot)} holds no key)")
        if sw != SW_OK:
            raise StatusError(sw, f"the key operation with slot {_slot_name(slot)}")
        return _tag(answer, 0x82)

    def _generate_in(
        self, card: PcscCard, slot: int, key_type: KeyType, name: str, usage: frozenset[str]
    ) -> x509.Certificate:
        self._mgmt_auth(card)
        self._certs.pop(slot, None)
        self._checked_keys.pop(_slot_name(slot), None)
        template = card.generate(slot, KEY_ALGS[key_type])
        public = _public_from_template(key_type, template)
        cert = self._write_cert(card, slot, key_type, public, name, usage)
        if slot in RETIRED_SLOTS:
            self._update_key_history(card)
        return cert

    def _update_key_history(self, card: PcscCard) -> None:
        """Keep the Key History object's count of retired keys with on-card certificates
        (tag C1) up to date, so that OpenSC and other PIV middleware look at those slots.
        SP 800-73-4 numbers them from 82 up, so the count reaches the last used retired slot.
        The off-card count (C2) and URL (F3) of an existing object are kept as they are."""
        used = [i for i, slot in enumerate(RETIRED_SLOTS) if self._cert(card, slot) is not None]
        on_card = used[-1] + 1 if used else 0
        current = card.get_data(KEY_HISTORY_OBJECT) or b""
        try:
            fields = dict(_tlvs(current))
        except ValueError:
            fields = {}
        if fields.get(0xC1) == bytes([on_card]) or (not current and on_card == 0):
            return
        body = tlv(0xC1, bytes([on_card])) + tlv(0xC2, fields.get(0xC2, b"\x00"))
        if 0xF3 in fields:
            body += tlv(0xF3, fields[0xF3])
        card.put_data(KEY_HISTORY_OBJECT, body + tlv(0xFE, b""))

    # -- key operations --------------------------------------------------------------------------
    def _check(self, key_type: KeyType, op: Operation) -> int:
        alg = KEY_ALGS.get(key_type)
        if alg is None:
            raise self.unsupported(
                op, key_type, "a PIV card holds ecdsa-p256, ecdsa-p384 and rsa-2048 keys"
            )
        return alg

    def generate(self, new: NewKey) -> str:
        """Mutual authentication with the management key, GENERATE ASYMMETRIC KEY PAIR in the
        first free slot, then a self-signed certificate (signed by the card) in its object."""
        info = new.info
        self._check(info.type, Operation.GENERATE)
        agree = bool({Usage.AGREE, Usage.DECRYPT} & info.usage)
        cert_usage = frozenset(
            word
            for word, wanted in (
                ("sign", Usage.SIGN),
                ("agree", Usage.AGREE),
                ("decrypt", Usage.DECRYPT),
            )
            if wanted in info.usage
        )
        order = [s for s in (AGREE_ORDER if agree else SIGN_ORDER) if s in self.slots]

        def make(card: PcscCard) -> str:
            for slot in order:
                if self._cert(card, slot) is None:
                    self._generate_in(card, slot, info.type, info.name, cert_usage)
                    return _slot_name(slot)
            raise UnsupportedOperation(
                self.name,
                "generate",
                info.type.value,
                "every PIV slot Strongroom may use already holds a key "
                f"({', '.join(_slot_name(s) for s in order)}); delete one first",
            )

        return self._run_held(make)

    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        """From the certificate in the slot's object (GET DATA; cached per connection)."""
        self._check(info.type, Operation.VERIFY)
        return self._run(lambda card: self._key_cert(card, info)[1].public_key())

    def certificate(self, info: KeyInfo) -> x509.Certificate:
        """The X.509 certificate in the key's slot."""
        return self._run(lambda card: self._key_cert(card, info)[1])

    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        """Hash on the host (SHA-256; SHA-384 for P-384; SHA-512 for RSA pkcs1v15-sha512),
        pad on the host for RSA, then GENERAL AUTHENTICATE; ECDSA comes back DER-encoded
        from the card."""
        digest = hashlib.new(sr_algorithms.hash_name(info.type, algorithm), data)
        return self.sign_digest(info, digest.digest(), algorithm)

    def sign_digest(self, info: KeyInfo, digest: bytes, algorithm: str | None) -> bytes:
        """GENERAL AUTHENTICATE over the caller's SHA-256 (SHA-384 for P-384, SHA-512 for
        pkcs1v15-sha512) digest, or its DigestInfo (pkcs1v15-raw), padded on the host for
        RSA."""
        alg = self._check(info.type, Operation.SIGN)
        if info.type is KeyType.RSA_2048:
            algorithm = algorithm or "pkcs1v15"
            raw = algorithm == sr_algorithms.RSA_PKCS1V15_RAW
            if not raw and algorithm not in sr_algorithms.RSA_SIGN_ALGORITHMS:
                sr_algorithms.rsa_padding(algorithm)  # raises the usual InvalidArgument
        elif algorithm is not None:
            sr_algorithms.check_sign_algorithm(info.type, algorithm)

        def op(card: PcscCard) -> bytes:
            slot, cert = self._key_cert(card, info)
            if info.type is KeyType.RSA_2048:
                public = cert.public_key()
                assert isinstance(public, rsa.RSAPublicKey)
                if algorithm == "pss":
                    block = encoding.pss_block(digest, public.key_size)
                elif algorithm == sr_algorithms.RSA_PKCS1V15_RAW:  # the caller's DigestInfo
                    block = encoding.pkcs1v15_pad(digest, public.key_size // 8)
                else:
                    block = encoding.pkcs1v15_block(digest, public.key_size // 8)
            else:
                block = digest
            return self._private_op(card, slot, alg, block)

        return self._run(op)

    def ecdh(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """The raw ECDH shared secret of an EC key (usage agree) with `peer`, computed on the
        card (GENERAL AUTHENTICATE `85`). For Python callers that need the card's ECDH
        itself: `Keystore.agree` cannot use it, since a card stores no derived key. The
        caller owns (and should wipe) the returned secret; nothing records it in the audit
        log."""
        if info.type not in (KeyType.ECDSA_P256, KeyType.ECDSA_P384):
            raise self.unsupported(Operation.AGREE, info.type)
        if Usage.AGREE not in info.usage:
            raise PolicyViolation(f"key {info.name!r} may not be used to agree")
        public = sr_algorithms.load_peer_public(info.type, peer)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

        def op(card: PcscCard) -> bytes:
            slot, _ = self._key_cert(card, info)
            return self._private_op(card, slot, KEY_ALGS[info.type], point, tag=0x85)

        return self._run(op)

    def exchange(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """The card's ECDH (GENERAL AUTHENTICATE `85`), as `ecdh`."""
        return self.ecdh(info, peer)

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """RSA-OAEP (SHA-256, or SHA-1 with oaep-sha1): the raw RSA operation on the card,
        OAEP decoding on the host. Anything that does not decode is IntegrityError."""
        if info.type is not KeyType.RSA_2048:
            raise self.unsupported(Operation.DECRYPT, info.type)
        if aad:
            raise InvalidArgument("RSA-OAEP takes no associated data")
        hash_name = (
            "sha1"
            if sr_algorithms.check_rsa_encrypt_algorithm(algorithm) == "oaep-sha1"
            else "sha256"
        )

        def op(card: PcscCard) -> bytes | None:
            slot, cert = self._key_cert(card, info)
            public = cert.public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            k = public.key_size // 8
            if (
                len(ciphertext) != k
                or int.from_bytes(ciphertext, "big") >= public.public_numbers().n
            ):
                return None
            return encoding.oaep_decode(
                self._private_op(card, slot, ALG_RSA2048, ciphertext), hash_name
            )

        plaintext = self._run(op)
        if plaintext is None:
            raise IntegrityError(
                "the ciphertext does not decrypt under this key: wrong key, or altered ciphertext"
            )
        return plaintext

    def delete(self, info: KeyInfo) -> None:
        """Overwrite the slot's private key with a fresh one (a PIV card has no delete), then
        empty the certificate object so the slot is free again."""
        slot = parse_slot(info.handle)

        def op(card: PcscCard) -> None:
            cert = self._cert(card, slot)
            if cert is None:
                return  # already gone
            if not self._holds(cert, info):
                raise InvalidArgument(
                    f"slot {_slot_name(slot)} of the PIV card in {card.reader!r} holds "
                    f"{self._subject(cert)!r}, not key {info.name!r}; nothing was deleted"
                )
            self._wipe_slot(card, slot)

        self._run_held(op)

    def _wipe_slot(self, card: PcscCard, slot: int) -> None:
        self._mgmt_auth(card)
        card.generate(slot, ALG_P256)  # the old private key is gone
        card.put_data(SLOT_OBJECTS[slot], b"")
        self._certs[slot] = None
        self._checked_keys.pop(_slot_name(slot), None)
        if slot in RETIRED_SLOTS:
            self._update_key_history(card)

    # -- KeyInventory (`strongroom doctor`) -------------------------------------------------------
    def owned_keys(self) -> dict[str, str]:
        """GET DATA of every slot's certificate object, keeping the slots whose certificate
        this keystore wrote (O = Strongroom, OU = its store id): {slot: description}."""

        def scan(card: PcscCard) -> dict[str, str]:
            found: dict[str, str] = {}
            for slot in sorted(SLOT_OBJECTS):
                try:
                    cert = self._cert(card, slot)
                except StrongroomError:  # a malformed object: not ours to judge
                    continue
                if cert is not None and self._owned(cert):
                    found[_slot_name(slot)] = (
                        f"key {self._subject(cert)!r} in slot {_slot_name(slot)} of the PIV "
                        f"card in {card.reader!r}"
                    )
            return found

        return self._run(scan)

    def remove_owned(self, handle: str) -> None:
        """Overwrite the slot's key and empty its certificate object, as delete does; only
        for a slot whose certificate this keystore wrote."""
        slot = parse_slot(handle)

        def op(card: PcscCard) -> None:
            cert = self._cert(card, slot)
            if cert is None or not self._owned(cert):
                raise InvalidArgument(f"slot {handle!r} holds no key this keystore created")
            self._wipe_slot(card, slot)

        self._run_held(op)

    def adopt(self, ref: Mapping[str, str]) -> ExistingKey:
        """A key already on the card: `id` is its slot (9a, ...), `label` its certificate's CN."""
        wanted_slot = parse_slot(ref["id"]) if "id" in ref else None
        label = ref.get("label")

        def find(card: PcscCard) -> ExistingKey:
            slots = [wanted_slot] if wanted_slot is not None else sorted(SLOT_OBJECTS)
            for slot in slots:
                cert = self._cert(card, slot)
                if cert is None or (label is not None and self._subject(cert) != label):
                    continue
                public = cert.public_key()
                key_type = _key_type_of(public)
                if key_type is None:
                    raise self.unsupported(
                        "adopt",
                        None,
                        f"slot {_slot_name(slot)} holds a key "
                        "of a type Strongroom does not use on PIV cards",
                    )
                return ExistingKey(
                    handle=_slot_name(slot),
                    type=key_type,
                    usage=frozenset({Usage.SIGN, Usage.VERIFY}),
                    attributes={"slot": _slot_name(slot), "subject": self._subject(cert)},
                )
            raise InvalidArgument(f"no PIV slot with a certificate matches {dict(ref)}")

        return self._run(find)


# -- helpers --------------------------------------------------------------------------------------
def _public_from_template(key_type: KeyType, template: bytes) -> PublicKeyTypes:
    try:
        if key_type is KeyType.RSA_2048:
            n = int.from_bytes(find_tag(template, 0x81), "big")
            e = int.from_bytes(find_tag(template, 0x82), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        curve = sr_algorithms.CURVES[key_type]
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, find_tag(template, 0x86))
    except ValueError:
        raise StatusError(0x6A80, "GENERATE (malformed public key)") from None


def _key_type_of(public: PublicKeyTypes) -> KeyType | None:
    for key_type in KEY_ALGS:
        if sr_algorithms.public_key_matches(key_type, public):
            return key_type
    return None


def _pin_state(sw: int) -> str:
    if sw == SW_OK:
        return "verified"
    if sw == SW_BLOCKED:
        return "blocked"
    if sw >> 4 == 0x63C:
        return f"{sw & 0x0F} tries left"
    return f"unknown ({sw:04X})"


__all__ = ["PivBackend", "parse_slot"]
