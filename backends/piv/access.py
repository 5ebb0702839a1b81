"""PIV access control: verifying the PIN and authenticating with the management key.

`PivAccess` is a mixin of `PivBackend`. The PIN is sent once per value: a value the card
refused is remembered (as an HMAC under a per-process key, never the PIN itself) and not
sent again, so Strongroom never spends the card's retry counter on a PIN it knows is wrong.
Management-key authentication is mutual (SP 800-73-4 GENERAL AUTHENTICATE, witness then
challenge): the card proves that it holds the key too.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from strongroom.errors import AuthenticationFailed, DeviceLocked, InvalidArgument
from strongroom.secrets import SecretSource

from .card import (
    MGMT_KEY_REF,
    SW_BLOCKED,
    SW_OK,
    SW_SECURITY,
    SW_WRONG_P1P2,
    PcscCard,
    StatusError,
    find_tag,
    tlv,
)

T = TypeVar("T")

MGMT_ALGS: dict[str, tuple[int, int]] = {  # name: (PIV algorithm id, key length)
    "3des": (0x03, 24),
    "aes128": (0x08, 16),
    "aes192": (0x0A, 24),
    "aes256": (0x0C, 32),
}
DEFAULT_MANAGEMENT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")


class PivAccess:
    """Mixin of `PivBackend`: the PIN and the management key."""

    # Set by PivBackend.__init__.
    pin: SecretSource
    management_key: SecretSource | None
    mgmt_type: str
    _pin_ok: bool
    _rejected: set[bytes]
    _fingerprint_key: bytes

    if TYPE_CHECKING:  # PivBackend's

        def _run(self, fn: Callable[[PcscCard], T]) -> T: ...

    def _verify_pin(self, card: PcscCard) -> None:
        """VERIFY once; a refusal is final for this PIN value (never sent again)."""
        pin = self.pin.get()
        raw = pin.encode("utf-8")
        if not 1 <= len(raw) <= 8:
            raise InvalidArgument("a PIV PIN is 6 to 8 characters (at most 8 bytes)")
        block = bytearray(raw + b"\xff" * (8 - len(raw)))
        try:
            mark = hmac.new(self._fingerprint_key, block, hashlib.sha256).digest()
            if mark in self._rejected:
                raise AuthenticationFailed(
                    "the PIV card already refused this PIN; Strongroom does not send it again "
                    "(fix the pin setting, then run again)"
                )
            sw = card.verify(bytes(block))
        finally:
            block[:] = b"\0" * len(block)
        if sw == SW_OK:
            self._pin_ok = True
            return
        self._pin_ok = False
        if sw == SW_BLOCKED or sw == 0x63C0:
            raise DeviceLocked(
                "the PIV card's PIN is blocked; unblock it with the PUK "
                "(e.g. `ykman piv access unblock-pin`) or reset the PIV application"
            )
        if sw >> 4 == 0x63C:
            self._rejected.add(mark)
            raise AuthenticationFailed("the PIV card refused the PIN", sw & 0x0F)
        if sw == 0x6A80:
            raise InvalidArgument("the PIV card refused the PIN's format (6 to 8 characters)")
        raise StatusError(sw, "VERIFY")

    def pin_tries_left(self) -> int | None:
        """The PIN retry counter as the card reports it (None: already verified)."""

        def read(card: PcscCard) -> int | None:
            sw = card.verify(None)
            if sw == SW_OK:
                return None
            if sw == SW_BLOCKED:
                return 0
            if sw >> 4 == 0x63C:
                return sw & 0x0F
            raise StatusError(sw, "VERIFY (status)")

        return self._run(read)

    def _mgmt_key(self) -> bytearray:
        if self.management_key is None:
            return bytearray(DEFAULT_MANAGEMENT_KEY)
        text = self.management_key.get().strip()
        try:
            key = bytearray(binascii.unhexlify(text))
        except (binascii.Error, ValueError):
            raise InvalidArgument("the PIV management key must be given in hex") from None
        if len(key) not in (16, 24, 32):
            raise InvalidArgument("a PIV management key is 16, 24 or 32 bytes (32-64 hex digits)")
        return key

    def _mgmt_auth(self, card: PcscCard) -> None:
        """Mutual authentication with the management key (9B): the card proves it too."""
        key = self._mgmt_key()
        try:
            if self.mgmt_type != "auto":
                names = [self.mgmt_type]
            else:
                names = {16: ["aes128"], 24: ["3des", "aes192"], 32: ["aes256"]}[len(key)]
            for name in names:
                alg, length = MGMT_ALGS[name]
                if len(key) != length:
                    raise InvalidArgument(f"a {name} management key is {length} bytes")
                answer, sw = card.general_authenticate(alg, MGMT_KEY_REF, tlv(0x80, b""))
                if sw == SW_WRONG_P1P2 and name != names[-1]:
                    continue  # the card's management key is of another algorithm
                if sw != SW_OK:
                    raise StatusError(sw, "management key authentication")
                block = _mgmt_cipher(name, key, False, _tag(answer, 0x80))
                challenge = os.urandom(len(block))
                answer, sw = card.general_authenticate(
                    alg, MGMT_KEY_REF, tlv(0x80, block) + tlv(0x81, challenge)
                )
                if sw == SW_SECURITY:
                    raise AuthenticationFailed("the PIV card refused the management key")
                if sw != SW_OK:
                    raise StatusError(sw, "management key authentication")
                expected = _mgmt_cipher(name, key, True, challenge)
                if not hmac.compare_digest(_tag(answer, 0x82), expected):
                    raise AuthenticationFailed(
                        "the PIV card did not prove that it holds the management key"
                    )
                return
        finally:
            key[:] = b"\0" * len(key)


def _tag(template: bytes, tag: int) -> bytes:
    try:
        return find_tag(template, tag)
    except ValueError:
        raise StatusError(0x6A80, f"GENERAL AUTHENTICATE (no tag {tag:X} in the answer)") from None


def _mgmt_cipher(name: str, key: bytearray, encrypt: bool, block: bytes) -> bytes:
    algorithm = TripleDES(bytes(key)) if name == "3des" else algorithms.AES(bytes(key))
    cipher = Cipher(algorithm, modes.ECB())  # noqa: S305 - one block, as SP 800-73-4 specifies
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(block) + ctx.finalize()
