"""The PC/SC link to a PIV card and the SP 800-73-4 APDUs the backend sends.

pyscard's low-level `smartcard.scard` module is used directly (one call per APDU, no
observer machinery): connect in shared mode, T=1 or T=0, SELECT the PIV application, then
command APDUs with chaining (CLA 10, 255-byte parts) and response chaining (`61xx` →
GET RESPONSE). Nothing here knows about catalog keys; the backend does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

PIV_AID = bytes.fromhex("A000000308")
INS_VERIFY, INS_CHANGE_REFERENCE, INS_RESET_RETRY = 0x20, 0x24, 0x2C
INS_GENERAL_AUTHENTICATE, INS_GENERATE, INS_GET_DATA, INS_PUT_DATA = 0x87, 0x47, 0xCB, 0xDB
PIN_REF, PUK_REF, MGMT_KEY_REF = 0x80, 0x81, 0x9B

SW_OK = 0x9000
SW_SECURITY = 0x6982
SW_BLOCKED = 0x6983
SW_NOT_FOUND = 0x6A82
SW_WRONG_DATA = 0x6A80
SW_WRONG_P1P2 = 0x6A86
SW_REF_NOT_FOUND = 0x6A88
SW_INS_UNKNOWN = 0x6D00

_CHUNK = 255


class CardGone(Exception):
    """The card, the reader or pcscd went away; the message says which."""


class CardReset(Exception):
    """Another program reset the card: the session (PIN state, selection) is lost."""


class StatusError(Exception):
    """The card answered a status word other than 9000."""

    def __init__(self, sw: int, what: str) -> None:
        self.sw = sw
        self.what = what
        super().__init__(f"{what}: the card answered {sw:04X}")


def tlv(tag: int, value: bytes) -> bytes:
    """BER-TLV with a 1-3 byte tag and a definite length."""
    n = len(value)
    if tag < 0x100 and n < 0x80:
        return bytes((tag, n)) + value
    tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8 or 1, "big")
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag_bytes + length + value


def parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """Parse a run of BER-TLVs; ValueError if malformed."""
    out: list[tuple[int, bytes]] = []
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
                raise ValueError("unsupported TLV length")
            if i + n > len(data):
                raise ValueError("TLV runs past the end")
            out.append((tag, data[i : i + n]))
            i += n
    except IndexError:
        raise ValueError("TLV runs past the end") from None
    return out


def find_tag(data: bytes, tag: int) -> bytes:
    """The value of the first TLV with `tag` in a run of TLVs; ValueError if absent."""
    if len(data) >= 2 and data[0] == tag and data[1] < 0x80 and tag < 0x100:
        if len(data) >= 2 + data[1]:  # the common case: a one-byte tag first, short length
            return data[2 : 2 + data[1]]
    for t, v in parse_tlv(data):
        if t == tag:
            return v
    raise ValueError(f"tag {tag:X} missing")


@dataclass
class Reader:
    name: str


def scard_module() -> Any:
    """pyscard's low-level module, imported on first use (the backend imports without it)."""
    from smartcard import scard

    return scard


class PcscCard:
    """One connection to the card in a reader, with the PIV application selected."""

    def __init__(self, reader_setting: str) -> None:
        self.reader_setting = reader_setting
        self.reader = ""
        self._scard = scard_module()
        self._context: Any = None
        self._handle: Any = None
        self._protocol: Any = None
        self._transactions = 0

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        """Find the reader, connect, SELECT the PIV application. CardGone when impossible."""
        sc = self._scard
        rc, context = sc.SCardEstablishContext(sc.SCARD_SCOPE_USER)
        if rc != sc.SCARD_S_SUCCESS:
            raise CardGone(
                f"cannot reach pcscd ({self._message(rc)}); install and start pcscd "
                "(Debian package pcscd)"
            )
        self._context = context
        try:
            rc, readers = sc.SCardListReaders(context, [])
            if rc == sc.SCARD_E_NO_READERS_AVAILABLE or (rc == sc.SCARD_S_SUCCESS and not readers):
                raise CardGone("no smart-card reader is connected")
            if rc != sc.SCARD_S_SUCCESS:
                raise CardGone(f"cannot list smart-card readers ({self._message(rc)})")
            wanted = self.reader_setting
            candidates = list(readers) if wanted == "auto" else [r for r in readers if wanted in r]
            if not candidates:
                raise CardGone(f"no reader name contains {wanted!r}; readers: {', '.join(readers)}")
            notes: list[str] = []
            for name in candidates:
                note = self._try_reader(name)
                if note is None:
                    return
                notes.append(f"{name}: {note}")
            raise CardGone("no PIV card found (" + "; ".join(notes) + ")")
        except BaseException:
            self.close()
            raise

    def _try_reader(self, name: str) -> str | None:
        sc = self._scard
        rc, handle, protocol = sc.SCardConnect(
            self._context,
            name,
            sc.SCARD_SHARE_SHARED,
            sc.SCARD_PROTOCOL_T1 | sc.SCARD_PROTOCOL_T0,
        )
        if rc != sc.SCARD_S_SUCCESS:
            return (
                "no card"
                if rc in (sc.SCARD_E_NO_SMARTCARD, sc.SCARD_W_REMOVED_CARD)
                else (self._message(rc))
            )
        self._handle, self._protocol, self.reader = handle, protocol, name
        try:
            self.select()
        except (StatusError, CardGone, CardReset) as e:
            self._disconnect()
            return f"no PIV application ({e})"
        return None

    def select(self) -> bytes:
        """SELECT the PIV application; returns its Application Property Template."""
        return self.command(0x00, 0xA4, 0x04, 0x00, PIV_AID, what="SELECT PIV")

    def _disconnect(self) -> None:
        if self._handle is not None:
            sc = self._scard
            sc.SCardDisconnect(self._handle, sc.SCARD_LEAVE_CARD)
            self._handle = None

    def close(self) -> None:
        self._disconnect()
        if self._context is not None:
            self._scard.SCardReleaseContext(self._context)
            self._context = None

    @property
    def connected(self) -> bool:
        return self._handle is not None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the card for a sequence of APDUs (SCardBeginTransaction), so that no other
        program's commands come between, e.g., VERIFY and the signature it allows, or the
        two steps of management-key authentication. Nested use holds it once."""
        sc = self._scard
        if self._transactions:
            self._transactions += 1
            try:
                yield
            finally:
                self._transactions -= 1
            return
        if self._handle is None:
            raise CardGone("not connected to the card")
        rc = sc.SCardBeginTransaction(self._handle)
        if rc != sc.SCARD_S_SUCCESS:
            self._fail(rc)
        self._transactions = 1
        try:
            yield
        finally:
            self._transactions = 0
            if self._handle is not None:
                sc.SCardEndTransaction(self._handle, sc.SCARD_LEAVE_CARD)

    def _message(self, rc: int) -> str:
        try:
            return str(self._scard.SCardGetErrorMessage(rc)).strip().rstrip(".")
        except Exception:  # pragma: no cover - pyscard always has a message
            return f"PC/SC error {rc:#x}"

    # -- APDUs ------------------------------------------------------------------------------------
    def transmit(self, apdu: bytes) -> tuple[bytes, int]:
        sc = self._scard
        if self._handle is None:
            raise CardGone("not connected to the card")
        rc, response = sc.SCardTransmit(self._handle, self._protocol, list(apdu))
        if rc != sc.SCARD_S_SUCCESS:
            self._fail(rc)
        if len(response) < 2:
            raise CardGone(f"the card in {self.reader!r} sent a malformed answer")
        return bytes(response[:-2]), (response[-2] << 8) | response[-1]

    def _fail(self, rc: int) -> NoReturn:
        sc = self._scard
        if rc == sc.SCARD_W_RESET_CARD:
            raise CardReset("the card was reset by another program")
        self._disconnect()
        if rc in (sc.SCARD_W_REMOVED_CARD, sc.SCARD_E_NO_SMARTCARD):
            raise CardGone(f"the card was removed from {self.reader!r}")
        if rc in (sc.SCARD_E_READER_UNAVAILABLE, sc.SCARD_E_UNKNOWN_READER):
            raise CardGone(f"the reader {self.reader!r} went away")
        if rc == sc.SCARD_E_NO_SERVICE:
            raise CardGone("pcscd stopped")
        raise CardGone(f"talking to the card in {self.reader!r} failed ({self._message(rc)})")

    def exchange(
        self, cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: bool = True
    ) -> tuple[bytes, int]:
        """Send one command (chained if over 255 bytes), collect a chained answer."""
        while len(data) > _CHUNK:
            part, data = data[:_CHUNK], data[_CHUNK:]
            _, sw = self.transmit(bytes([cla | 0x10, ins, p1, p2, len(part)]) + part)
            if sw != SW_OK:
                return b"", sw
        apdu = bytes([cla, ins, p1, p2])
        if data:
            apdu += bytes([len(data)]) + data
        if le:
            apdu += b"\x00"
        out, sw = self.transmit(apdu)
        while sw >> 8 == 0x61:
            more, sw = self.transmit(bytes([0x00, 0xC0, 0x00, 0x00, sw & 0xFF]))
            out += more
        return out, sw

    def command(
        self, cla: int, ins: int, p1: int, p2: int, data: bytes = b"", *, what: str
    ) -> bytes:
        """`exchange`, raising StatusError unless the card answers 9000."""
        out, sw = self.exchange(cla, ins, p1, p2, data)
        if sw != SW_OK:
            raise StatusError(sw, what)
        return out

    # -- PIV commands ---------------------------------------------------------------------------
    def verify(self, pin_block: bytes | None) -> int:
        """VERIFY the PIV application PIN (None: ask the status); returns the status word."""
        _, sw = self.exchange(0x00, INS_VERIFY, 0x00, PIN_REF, pin_block or b"", le=False)
        return sw

    def get_data(self, tag: int) -> bytes | None:
        """GET DATA of an object: its contents (inside tag 53), or None if absent."""
        tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
        out, sw = self.exchange(0x00, INS_GET_DATA, 0x3F, 0xFF, tlv(0x5C, tag_bytes))
        if sw in (SW_NOT_FOUND, SW_REF_NOT_FOUND):
            return None
        if sw != SW_OK:
            raise StatusError(sw, f"GET DATA {tag:X}")
        try:
            items = parse_tlv(out)
        except ValueError:
            raise StatusError(SW_WRONG_DATA, f"GET DATA {tag:X} (malformed object)") from None
        if len(items) != 1 or items[0][0] != 0x53:
            raise StatusError(SW_WRONG_DATA, f"GET DATA {tag:X} (not a 53 object)")
        return items[0][1] or None

    def put_data(self, tag: int, contents: bytes) -> None:
        tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
        body = tlv(0x5C, tag_bytes) + tlv(0x53, contents)
        _, sw = self.exchange(0x00, INS_PUT_DATA, 0x3F, 0xFF, body, le=False)
        if sw != SW_OK:
            raise StatusError(sw, f"PUT DATA {tag:X}")

    def general_authenticate(self, alg: int, key_ref: int, template: bytes) -> tuple[bytes, int]:
        """GENERAL AUTHENTICATE with a 7C template; returns (inner template, status word)."""
        out, sw = self.exchange(0x00, INS_GENERAL_AUTHENTICATE, alg, key_ref, tlv(0x7C, template))
        if sw != SW_OK:
            return b"", sw
        try:
            return find_tag(out, 0x7C), sw
        except ValueError:
            raise StatusError(SW_WRONG_DATA, "GENERAL AUTHENTICATE (malformed answer)") from None

    def generate(self, slot: int, alg: int) -> bytes:
        """GENERATE ASYMMETRIC KEY PAIR; returns the contents of the 7F49 public key template."""
        out = self.command(
            0x00, INS_GENERATE, 0x00, slot, tlv(0xAC, tlv(0x80, bytes([alg]))), what="GENERATE"
        )
        try:
            return find_tag(out, 0x7F49)
        except ValueError:
            raise StatusError(SW_WRONG_DATA, "GENERATE (malformed public key)") from None

    def chuid_guid(self) -> bytes | None:
        """The GUID of the Card Holder Unique Identifier (the card's identity), if any."""
        try:
            chuid = self.get_data(0x5FC102)
        except StatusError:
            return None
        if chuid is None:
            return None
        try:
            return find_tag(chuid, 0x34)
        except ValueError:
            return None


__all__ = [
    "CardGone",
    "CardReset",
    "PcscCard",
    "StatusError",
    "find_tag",
    "parse_tlv",
    "tlv",
]
