"""A PIV card emulator (NIST SP 800-73-4) for the tests, served on a vpcd reader.

It has the `VirtualCard` shape of tests/emulators/pcsc_support.py, so

    with ensure_pcscd(tmp) as pcsc, pcsc.serve(PivCard(), PIV_SLOT) as link: ...

puts it in the PIV reader slot, where pyscard, Strongroom's PIV backend and OpenSC's PIV
driver (`PIV-II`) all find it through pcscd.

What it answers (SP 800-73-4 part 2 unless noted):

* SELECT of the PIV AID (`A0 00 00 03 08`, right-truncated or full) with the Application
  Property Template; any other AID is `6A82`. The PIV application stays selected after a
  failed SELECT, and re-selecting it keeps the PIN state (OpenSC re-selects often).
* VERIFY `00 20 00 80` (8 bytes, PIN padded with FF): `9000`, `63Cx` with the tries left,
  `6983` when blocked; with no data it reports the status without spending a try; `P1 FF`
  resets the PIN state.
* CHANGE REFERENCE DATA `00 24 00 80|81` and RESET RETRY COUNTER `00 2C 00 80` (with the PUK).
* GENERAL AUTHENTICATE `00 87`: management-key (9B) mutual and external authentication with
  3DES (`03`), AES-128 (`08`), AES-192 (`0A`) or AES-256 (`0C`); signing / raw RSA with
  `7C { 82 00, 81 data }`; ECDH with `7C { 82 00, 85 point }`.
* GENERATE ASYMMETRIC KEY PAIR `00 47 00 slot` with `AC { 80 alg }` for RSA-2048 (`07`),
  P-256 (`11`) and P-384 (`14`), after management-key authentication.
* GET DATA `00 CB 3F FF` / PUT DATA `00 DB 3F FF` of the data objects (CHUID, CCC,
  Discovery `7E`, the certificates of 9A/9C/9D/9E and the retired slots, ...). PUT DATA of an
  empty `53 00` deletes an object (as YubiKeys do).
* Command chaining (CLA `10`), response chaining (`61xx` + GET RESPONSE `00 C0`), never more
  than Le bytes in one response.
* PIN policy per slot as a YubiKey's defaults: 9A, 9D and the retired slots need the PIN once
  per session, 9C before every use ("always"), 9E never.

State (keys, objects, PIN and PUK and their counters, the management key) survives power
off and reset; only the session state (PIN verified, management key authenticated, pending
responses) is cleared. With `path`, the state is also kept in a JSON file and read back.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PIV_AID = bytes.fromhex("A000000308000010000100")
DEFAULT_PIN = "123456"
DEFAULT_PUK = "12345678"
DEFAULT_MGMT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")

ALG_3DES, ALG_AES128, ALG_AES192, ALG_AES256 = 0x03, 0x08, 0x0A, 0x0C
ALG_RSA2048, ALG_P256, ALG_P384 = 0x07, 0x11, 0x14
MGMT_KEY_REF = 0x9B
PIN_REF, PUK_REF = 0x80, 0x81

KEY_SLOTS = (0x9A, 0x9C, 0x9D, 0x9E, *range(0x82, 0x96))
CERT_OBJECTS = {
    0x9A: 0x5FC105,
    0x9C: 0x5FC10A,
    0x9D: 0x5FC10B,
    0x9E: 0x5FC101,
    **{0x82 + i: 0x5FC10D + i for i in range(20)},
}
DATA_OBJECTS = frozenset(
    {
        0x5FC107,  # CCC
        0x5FC102,  # CHUID
        0x5FC103,  # fingerprints
        0x5FC106,  # security object
        0x5FC108,  # facial image
        0x5FC109,  # printed information
        0x5FC10C,  # key history
        0x5FC121,  # iris
        0x5FC122,  # biometric group template
        0x5FC123,  # SM certificate signer
        0x5FC124,  # pairing code reference data
        *CERT_OBJECTS.values(),
    }
)
DISCOVERY_TAG = 0x7E
PIN_PROTECTED_OBJECTS = frozenset({0x5FC103, 0x5FC108, 0x5FC109, 0x5FC121})
"""Fingerprints, facial image, printed information, iris: readable after VERIFY only."""
_PIN_ALWAYS, _PIN_NEVER = frozenset({0x9C}), frozenset({0x9E})
_MAX_TRIES = 3
_CURVES: dict[int, ec.EllipticCurve] = {ALG_P256: ec.SECP256R1(), ALG_P384: ec.SECP384R1()}


class ApduError(Exception):
    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


def _tlv(tag: int, value: bytes) -> bytes:
    tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8 or 1, "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag_bytes + length + value


def _parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """BER-TLV with 1-3 byte tags; ApduError 6A80 on malformed input."""
    out = []
    i = 0
    try:
        while i < len(data):
            tag = data[i]
            i += 1
            if tag & 0x1F == 0x1F:
                while True:
                    tag = (tag << 8) | data[i]
                    i += 1
                    if not data[i - 1] & 0x80:
                        break
            n = data[i]
            i += 1
            if n == 0x81:
                n = data[i]
                i += 1
            elif n == 0x82:
                n = int.from_bytes(data[i : i + 2], "big")
                i += 2
            elif n > 0x82:
                raise ApduError(0x6A80)
            if i + n > len(data):
                raise ApduError(0x6A80)
            out.append((tag, data[i : i + n]))
            i += n
    except IndexError:
        raise ApduError(0x6A80) from None
    return out


def _pad_pin(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\xff" * (8 - len(raw))


@dataclass
class CardState:
    """What the card keeps across resets (and in `path`, if given)."""

    pin: bytes = field(default_factory=lambda: _pad_pin(DEFAULT_PIN))
    puk: bytes = field(default_factory=lambda: _pad_pin(DEFAULT_PUK))
    pin_tries: int = _MAX_TRIES
    puk_tries: int = _MAX_TRIES
    mgmt_alg: int = ALG_3DES
    mgmt_key: bytes = DEFAULT_MGMT_KEY
    keys: dict[int, Any] = field(default_factory=dict)
    objects: dict[int, bytes] = field(default_factory=dict)


class PivCard:
    """A PIV card. Thread-safe; every method may be called from the vpcd thread."""

    # TS 3B, T0 8B (TD1 follows, 11 historical bytes), TD1 01 (T=1), historical bytes:
    # compact-TLV 80, tag F length 9 = the PIV AID (OpenSC's "PIV_II_HIST" match), then TCK.
    _ATR_BODY = bytes.fromhex("3B8B0180F9A00000030800001000")

    def __init__(
        self,
        path: Path | None = None,
        *,
        mgmt_alg: int = ALG_3DES,
        mgmt_key: bytes = DEFAULT_MGMT_KEY,
        label: str = "Strongroom PIV test card",
    ) -> None:
        tck = 0
        for b in self._ATR_BODY[1:]:
            tck ^= b
        self.atr = self._ATR_BODY + bytes([tck])
        self.path = path
        self.label = label
        self._lock = threading.Lock()
        self.powered = True
        self.apdus: list[bytes] = []
        """Every command APDU received (for tests that check what a client sent)."""
        if path is not None and path.exists():
            self.state = self._load(path)
        else:
            self.state = CardState(mgmt_alg=mgmt_alg, mgmt_key=mgmt_key)
            guid = os.urandom(16)
            fascn = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")
            chuid = _tlv(0x30, fascn) + _tlv(0x34, guid) + _tlv(0x35, b"20991231")
            chuid += _tlv(0x3E, b"") + _tlv(0xFE, b"")
            self.state.objects[0x5FC102] = _tlv(0x53, chuid)
            ccc = (
                _tlv(0xF0, bytes.fromhex("A00000011603") + guid[:15])
                + _tlv(0xF1, b"\x21")
                + _tlv(0xF2, b"\x21")
                + _tlv(0xF3, b"")
                + _tlv(0xF4, b"\x00")
                + _tlv(0xF5, b"\x10")
                + _tlv(0xF6, b"")
                + _tlv(0xF7, b"")
                + _tlv(0xFA, b"")
                + _tlv(0xFB, b"")
                + _tlv(0xFC, b"")
                + _tlv(0xFD, b"")
                + _tlv(0xFE, b"")
            )
            self.state.objects[0x5FC107] = _tlv(0x53, ccc)
            self._save()
        self._reset_session()

    # -- VirtualCard ---------------------------------------------------------------------------
    def power_on(self) -> None:
        with self._lock:
            self.powered = True
            self._reset_session()

    def power_off(self) -> None:
        with self._lock:
            self.powered = False
            self._reset_session()

    def reset(self) -> None:
        with self._lock:
            self._reset_session()

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            self.apdus.append(bytes(apdu))
            try:
                data, le = self._dispatch(bytes(apdu))
            except ApduError as e:
                self._pending = b""
                return e.sw.to_bytes(2, "big")
            return self._respond(data, le)

    # -- session -------------------------------------------------------------------------------
    def _reset_session(self) -> None:
        self.pin_verified = False
        self.mgmt_authenticated = False
        self._witness: bytes | None = None
        self._challenge: bytes | None = None
        self._chain: tuple[int, int, int, bytes] | None = None
        self._pending = b""

    @property
    def pin_tries(self) -> int:
        return self.state.pin_tries

    def chuid_guid(self) -> bytes:
        body = dict(_parse_tlv(dict(_parse_tlv(self.state.objects[0x5FC102]))[0x53]))
        return body[0x34]

    # -- APDU framing --------------------------------------------------------------------------
    def _respond(self, data: bytes, le: int | None) -> bytes:
        limit = 256 if le is None else le
        if len(data) <= limit:
            self._pending = b""
            return data + b"\x90\x00"
        self._pending = data[limit:]
        rest = len(self._pending)
        return data[:limit] + bytes([0x61, rest if rest < 256 else 0])

    def _dispatch(self, apdu: bytes) -> tuple[bytes, int | None]:
        if len(apdu) < 4:
            raise ApduError(0x6700)
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[4:]
        data = b""
        le: int | None = None
        if len(body) == 1:
            le = body[0] or 256
        elif len(body) > 1:
            lc = body[0]
            if lc == 0:  # extended length: this card does not announce it
                raise ApduError(0x6700)
            data = body[1 : 1 + lc]
            if len(body) == 1 + lc + 1:
                le = body[1 + lc] or 256
            elif len(body) != 1 + lc:
                raise ApduError(0x6700)
        if cla not in (0x00, 0x10):
            raise ApduError(0x6E00)
        if not self.powered:
            raise ApduError(0x6F00)
        if ins == 0xC0:  # GET RESPONSE
            if not self._pending:
                raise ApduError(0x6985)
            pending = self._pending
            self._pending = b""
            return pending, le
        self._pending = b""
        if cla & 0x10:
            if ins not in (0x87, 0xDB, 0x24, 0x47):
                raise ApduError(0x6884)  # command chaining not supported for this INS
            if self._chain is not None and self._chain[:3] != (ins, p1, p2):
                self._chain = None
                raise ApduError(0x6883)
            prior = self._chain[3] if self._chain else b""
            self._chain = (ins, p1, p2, prior + data)
            return b"", None
        if self._chain is not None:
            chained = self._chain
            self._chain = None
            if chained[:3] != (ins, p1, p2):
                raise ApduError(0x6883)
            data = chained[3] + data
        handler = {
            0xA4: self._select,
            0x20: self._verify,
            0x24: self._change_reference,
            0x2C: self._reset_retry_counter,
            0x87: self._general_authenticate,
            0x47: self._generate,
            0xCB: self._get_data,
            0xDB: self._put_data,
        }.get(ins)
        if handler is None:
            raise ApduError(0x6D00)
        return handler(p1, p2, data), le

    # -- commands ------------------------------------------------------------------------------
    def _select(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x04:
            raise ApduError(0x6A86)
        if len(data) < 5 or not PIV_AID.startswith(data):
            raise ApduError(0x6A82)
        algs = b"".join(
            _tlv(0x80, bytes([a])) for a in (ALG_3DES, ALG_AES192, ALG_RSA2048, ALG_P256, ALG_P384)
        )
        apt = (
            _tlv(0x4F, PIV_AID[5:])
            + _tlv(0x79, _tlv(0x4F, PIV_AID[:5]))
            + _tlv(0x50, self.label.encode())
            + _tlv(0xAC, algs + _tlv(0x06, b"\x00"))
        )
        return _tlv(0x61, apt)

    def _pin_status(self) -> None:
        if self.state.pin_tries == 0:
            raise ApduError(0x6983)

    def _check_pin_format(self, block: bytes) -> None:
        raw = block.rstrip(b"\xff")
        if len(block) != 8 or not 6 <= len(raw) <= 8 or b"\xff" in raw:
            raise ApduError(0x6A80)

    def _verify(self, p1: int, p2: int, data: bytes) -> bytes:
        if p2 != PIN_REF:
            raise ApduError(0x6A88 if p2 in (0x00, 0x81, 0x96, 0x98) else 0x6A86)
        if p1 == 0xFF:
            if data:
                raise ApduError(0x6A80)
            self.pin_verified = False
            return b""
        if p1 != 0x00:
            raise ApduError(0x6A86)
        if not data:
            if self.pin_verified:
                return b""
            self._pin_status()
            raise ApduError(0x63C0 | self.state.pin_tries)
        self._check_pin_format(data)
        self._pin_status()
        if data == self.state.pin:
            self.state.pin_tries = _MAX_TRIES
            self.pin_verified = True
            self._save()
            return b""
        self.state.pin_tries -= 1
        self.pin_verified = False
        self._save()
        raise ApduError(0x63C0 | self.state.pin_tries)

    def _change_reference(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00 or p2 not in (PIN_REF, PUK_REF):
            raise ApduError(0x6A86)
        if len(data) != 16:
            raise ApduError(0x6A80)
        old, new = data[:8], data[8:]
        self._check_pin_format(old)
        self._check_pin_format(new)
        attr = "pin" if p2 == PIN_REF else "puk"
        tries_attr = f"{attr}_tries"
        if getattr(self.state, tries_attr) == 0:
            raise ApduError(0x6983)
        if old != getattr(self.state, attr):
            left = getattr(self.state, tries_attr) - 1
            setattr(self.state, tries_attr, left)
            self._save()
            raise ApduError(0x63C0 | left)
        setattr(self.state, attr, new)
        setattr(self.state, tries_attr, _MAX_TRIES)
        self._save()
        return b""

    def _reset_retry_counter(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00 or p2 != PIN_REF:
            raise ApduError(0x6A86)
        if len(data) != 16:
            raise ApduError(0x6A80)
        puk, new = data[:8], data[8:]
        self._check_pin_format(new)
        if self.state.puk_tries == 0:
            raise ApduError(0x6983)
        if puk != self.state.puk:
            self.state.puk_tries -= 1
            self._save()
            raise ApduError(0x63C0 | self.state.puk_tries)
        self.state.puk_tries = _MAX_TRIES
        self.state.pin = new
        self.state.pin_tries = _MAX_TRIES
        self._save()
        return b""

    def _mgmt_cipher(self, block: bytes, encrypt: bool) -> bytes:
        alg = (
            TripleDES(self.state.mgmt_key)
            if self.state.mgmt_alg == ALG_3DES
            else algorithms.AES(self.state.mgmt_key)
        )
        cipher = Cipher(alg, modes.ECB())  # one block, as SP 800-73-4 specifies
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        return ctx.update(block) + ctx.finalize()

    def _general_authenticate(self, p1: int, p2: int, data: bytes) -> bytes:
        outer = _parse_tlv(data)
        if len(outer) != 1 or outer[0][0] != 0x7C:
            raise ApduError(0x6A80)
        items = _parse_tlv(outer[0][1])
        tags = dict(items)
        if p2 == MGMT_KEY_REF:
            return self._mgmt_auth(p1, tags)
        if p2 not in KEY_SLOTS:
            raise ApduError(0x6A86)
        key = self.state.keys.get(p2)
        if key is None:
            raise ApduError(0x6A88)
        if p1 != _alg_of(key):
            raise ApduError(0x6A80)
        if tags.get(0x82) != b"":
            raise ApduError(0x6A80)
        if p2 not in _PIN_NEVER:
            if not self.pin_verified:
                raise ApduError(0x6982)
            if p2 in _PIN_ALWAYS:
                self.pin_verified = False
        if 0x81 in tags:
            return _tlv(0x7C, _tlv(0x82, _private_op(key, tags[0x81])))
        if 0x85 in tags:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ApduError(0x6A80)
            try:
                peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, tags[0x85])
            except ValueError:
                raise ApduError(0x6A80) from None
            return _tlv(0x7C, _tlv(0x82, key.exchange(ec.ECDH(), peer)))
        raise ApduError(0x6A80)

    def _mgmt_auth(self, p1: int, tags: dict[int, bytes]) -> bytes:
        if p1 != self.state.mgmt_alg:
            raise ApduError(0x6A86)
        size = 8 if self.state.mgmt_alg == ALG_3DES else 16
        if tags.get(0x80) == b"" and len(tags) == 1:  # mutual auth, step 1: the witness
            self._witness = os.urandom(size)
            self.mgmt_authenticated = False
            return _tlv(0x7C, _tlv(0x80, self._mgmt_cipher(self._witness, True)))
        if 0x80 in tags and 0x81 in tags:  # mutual auth, step 2
            witness, self._witness = self._witness, None
            if witness is None or tags[0x80] != witness or len(tags[0x81]) != size:
                self.mgmt_authenticated = False
                raise ApduError(0x6982)
            self.mgmt_authenticated = True
            return _tlv(0x7C, _tlv(0x82, self._mgmt_cipher(tags[0x81], True)))
        if tags.get(0x81) == b"" and len(tags) == 1:  # external auth, step 1: a challenge
            self._challenge = os.urandom(size)
            self.mgmt_authenticated = False
            return _tlv(0x7C, _tlv(0x81, self._challenge))
        if 0x82 in tags and len(tags) == 1 and tags[0x82]:  # external auth, step 2
            challenge, self._challenge = self._challenge, None
            if challenge is None or self._mgmt_cipher(challenge, True) != tags[0x82]:
                self.mgmt_authenticated = False
                raise ApduError(0x6982)
            self.mgmt_authenticated = True
            return b""
        raise ApduError(0x6A80)

    def _generate(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00 or p2 not in KEY_SLOTS:
            raise ApduError(0x6A86)
        if not self.mgmt_authenticated:
            raise ApduError(0x6982)
        outer = dict(_parse_tlv(data))
        if 0xAC not in outer:
            raise ApduError(0x6A80)
        control = dict(_parse_tlv(outer[0xAC]))
        alg = control.get(0x80, b"")
        if len(alg) != 1:
            raise ApduError(0x6A80)
        if alg[0] == ALG_RSA2048:
            key: Any = rsa.generate_private_key(65537, 2048)
            numbers = key.public_key().public_numbers()
            body = _tlv(0x81, numbers.n.to_bytes(256, "big")) + _tlv(0x82, b"\x01\x00\x01")
        elif alg[0] in _CURVES:
            key = ec.generate_private_key(_CURVES[alg[0]])
            point = key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            body = _tlv(0x86, point)
        else:
            raise ApduError(0x6A80)
        self.state.keys[p2] = key
        self._save()
        return _tlv(0x7F49, body)

    def _object_tag(self, p1: int, p2: int, data: bytes) -> tuple[int, bytes]:
        if (p1, p2) != (0x3F, 0xFF):
            raise ApduError(0x6A86)
        items = _parse_tlv(data)
        if not items or items[0][0] != 0x5C or not 1 <= len(items[0][1]) <= 3:
            raise ApduError(0x6A80)
        return int.from_bytes(items[0][1], "big"), data[2 + len(items[0][1]) :]

    def _get_data(self, p1: int, p2: int, data: bytes) -> bytes:
        tag, rest = self._object_tag(p1, p2, data)
        if rest:
            raise ApduError(0x6A80)
        if tag == DISCOVERY_TAG:
            policy = _tlv(0x5F2F, b"\x40\x00")  # PIV application PIN only
            return _tlv(0x7E, _tlv(0x4F, PIV_AID) + policy)
        if tag not in DATA_OBJECTS:
            raise ApduError(0x6A82)
        if tag in PIN_PROTECTED_OBJECTS and not self.pin_verified:
            raise ApduError(0x6982)
        value = self.state.objects.get(tag)
        if value is None:
            raise ApduError(0x6A82)
        return value

    def _put_data(self, p1: int, p2: int, data: bytes) -> bytes:
        tag, rest = self._object_tag(p1, p2, data)
        if not self.mgmt_authenticated:
            raise ApduError(0x6982)
        if tag not in DATA_OBJECTS:
            raise ApduError(0x6A82 if tag != DISCOVERY_TAG else 0x6982)
        items = _parse_tlv(rest)
        if len(items) != 1 or items[0][0] != 0x53:
            raise ApduError(0x6A80)
        if items[0][1] == b"":
            self.state.objects.pop(tag, None)
        else:
            self.state.objects[tag] = rest
        self._save()
        return b""

    # -- persistence -----------------------------------------------------------------------------
    def _save(self) -> None:
        if self.path is None:
            return
        s = self.state
        doc = {
            "pin": s.pin.hex(),
            "puk": s.puk.hex(),
            "pin_tries": s.pin_tries,
            "puk_tries": s.puk_tries,
            "mgmt_alg": s.mgmt_alg,
            "mgmt_key": s.mgmt_key.hex(),
            "keys": {
                f"{slot:02x}": key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
                for slot, key in s.keys.items()
            },
            "objects": {f"{t:06x}": v.hex() for t, v in s.objects.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.path)

    @staticmethod
    def _load(path: Path) -> CardState:
        doc = json.loads(path.read_text())
        return CardState(
            pin=bytes.fromhex(doc["pin"]),
            puk=bytes.fromhex(doc["puk"]),
            pin_tries=doc["pin_tries"],
            puk_tries=doc["puk_tries"],
            mgmt_alg=doc["mgmt_alg"],
            mgmt_key=bytes.fromhex(doc["mgmt_key"]),
            keys={
                int(slot, 16): serialization.load_pem_private_key(pem.encode(), None)
                for slot, pem in doc["keys"].items()
            },
            objects={int(t, 16): bytes.fromhex(v) for t, v in doc["objects"].items()},
        )


def _alg_of(key: Any) -> int:
    if isinstance(key, rsa.RSAPrivateKey):
        return ALG_RSA2048
    return ALG_P256 if isinstance(key.curve, ec.SECP256R1) else ALG_P384


def _private_op(key: Any, data: bytes) -> bytes:
    """Sign a hash (ECDSA, DER out) or do the raw RSA private-key operation on a block."""
    if isinstance(key, rsa.RSAPrivateKey):
        if len(data) != 256:
            raise ApduError(0x6A80)
        n = key.public_key().public_numbers().n
        m = int.from_bytes(data, "big")
        if m >= n:
            raise ApduError(0x6A80)
        p = key.private_numbers()
        m1 = pow(m, p.dmp1, p.p)
        m2 = pow(m, p.dmq1, p.q)
        h = (p.iqmp * (m1 - m2)) % p.p
        return (m2 + h * p.q).to_bytes(256, "big")
    size = (key.curve.key_size + 7) // 8
    if not data or len(data) > size:
        raise ApduError(0x6A80)
    from cryptography.hazmat.primitives import hashes

    digest = hashes.SHA256() if size == 32 else hashes.SHA384()
    return bytes(key.sign(data.rjust(size, b"\0"), ec.ECDSA(Prehashed(digest))))


__all__ = [
    "ALG_3DES",
    "ALG_AES128",
    "ALG_AES192",
    "ALG_AES256",
    "ALG_P256",
    "ALG_P384",
    "ALG_RSA2048",
    "CERT_OBJECTS",
    "DEFAULT_MGMT_KEY",
    "DEFAULT_PIN",
    "DEFAULT_PUK",
    "KEY_SLOTS",
    "PIV_AID",
    "PivCard",
]
