"""The PIV card emulator itself (tests/emulators/piv_card.py): status words, chaining, state.

Most of these drive `PivCard.transmit` directly (a unit test of the test support); the last
one goes through pcscd with plain pyscard, so chaining is checked on the real transport.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pcsc_support
import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from piv_card import (
    ALG_3DES,
    ALG_AES192,
    ALG_P256,
    DEFAULT_MGMT_KEY,
    DEFAULT_PIN,
    DEFAULT_PUK,
    PivCard,
)

from strongroom.backends.piv.card import find_tag, parse_tlv, tlv


def pad(pin: str) -> bytes:
    return pin.encode() + b"\xff" * (8 - len(pin))


def send(card: PivCard, apdu: str | bytes) -> tuple[bytes, int]:
    raw = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
    out = card.transmit(raw)
    return out[:-2], int.from_bytes(out[-2:], "big")


def apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: bool = False) -> bytes:
    out = bytes([cla, ins, p1, p2])
    if data:
        out += bytes([len(data)]) + data
    return out + (b"\x00" if le else b"")


def ecb(alg: int, key: bytes, block: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(TripleDES(key) if alg == ALG_3DES else algorithms.AES(key), modes.ECB())
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(block) + ctx.finalize()


def mgmt_auth(card: PivCard, alg: int = ALG_3DES, key: bytes = DEFAULT_MGMT_KEY) -> int:
    out, sw = send(card, apdu(0, 0x87, alg, 0x9B, tlv(0x7C, tlv(0x80, b"")), True))
    assert sw == 0x9000
    witness = ecb(alg, key, find_tag(find_tag(out, 0x7C), 0x80), False)
    challenge = os.urandom(len(witness))
    body = tlv(0x7C, tlv(0x80, witness) + tlv(0x81, challenge))
    out, sw = send(card, apdu(0, 0x87, alg, 0x9B, body, True))
    if sw == 0x9000:
        assert find_tag(find_tag(out, 0x7C), 0x82) == ecb(alg, key, challenge, True)
    return sw


def test_select_answers_the_application_property_template() -> None:
    card = PivCard()
    out, sw = send(card, "00A4040009A00000030800001000" + "00")
    assert sw == 0x9000
    apt = find_tag(out, 0x61)
    assert find_tag(apt, 0x4F) == bytes.fromhex("000010000100")
    assert find_tag(find_tag(apt, 0x79), 0x4F) == bytes.fromhex("A000000308")
    algs = [v[0] for t, v in parse_tlv(find_tag(apt, 0xAC)) if t == 0x80]
    assert {0x07, 0x11, 0x14} <= set(algs)
    assert send(card, "00A4040007A0000006472F0001")[1] == 0x6A82  # FIDO: not here
    assert send(card, "00A4040005A000000308")[1] == 0x9000  # right-truncated AID
    assert send(card, "00FD000000")[1] == 0x6D00
    assert send(card, "80CB3FFF035C017E")[1] == 0x6E00
    assert card.atr[1] == 0x8B and card.atr[-1] == _tck(card.atr)


def _tck(atr: bytes) -> int:
    x = 0
    for b in atr[1:-1]:
        x ^= b
    return x


def test_verify_counts_down_blocks_and_reports_without_spending() -> None:
    card = PivCard()
    assert send(card, "00200080")[1] == 0x63C3
    assert send(card, apdu(0, 0x20, 0, 0x80, pad("654321")))[1] == 0x63C2
    assert send(card, "00200080")[1] == 0x63C2  # the status query spends nothing
    assert send(card, apdu(0, 0x20, 0, 0x80, b"12"))[1] == 0x6A80
    assert send(card, apdu(0, 0x20, 0, 0x80, pad(DEFAULT_PIN)))[1] == 0x9000
    assert send(card, "00200080")[1] == 0x9000
    send(card, "00A4040005A000000308")
    assert send(card, "00200080")[1] == 0x9000  # re-SELECT keeps the PIN state
    assert send(card, "0020FF80")[1] == 0x9000
    assert send(card, "00200080")[1] == 0x63C3  # P1 FF: forgotten; tries were reset
    for left in (2, 1, 0):
        assert send(card, apdu(0, 0x20, 0, 0x80, pad("000000")))[1] == 0x63C0 | left
    assert send(card, apdu(0, 0x20, 0, 0x80, pad(DEFAULT_PIN)))[1] == 0x6983
    assert send(card, "00200080")[1] == 0x6983
    # RESET RETRY COUNTER with the PUK unblocks it with a new PIN
    body = pad(DEFAULT_PUK) + pad("24681357")
    assert send(card, apdu(0, 0x2C, 0, 0x80, body))[1] == 0x9000
    assert send(card, apdu(0, 0x20, 0, 0x80, pad("24681357")))[1] == 0x9000


def test_change_reference_data() -> None:
    card = PivCard()
    assert send(card, apdu(0, 0x24, 0, 0x80, pad("999999") + pad("112233")))[1] == 0x63C2
    assert send(card, apdu(0, 0x24, 0, 0x80, pad(DEFAULT_PIN) + pad("112233")))[1] == 0x9000
    assert send(card, apdu(0, 0x20, 0, 0x80, pad("112233")))[1] == 0x9000
    assert send(card, apdu(0, 0x24, 0, 0x80, b"short"))[1] == 0x6A80


@pytest.mark.parametrize(
    ("alg", "key"), [(ALG_3DES, DEFAULT_MGMT_KEY), (ALG_AES192, bytes(range(24)))]
)
def test_management_key_authentication(alg: int, key: bytes) -> None:
    card = PivCard(mgmt_alg=alg, mgmt_key=key)
    put = apdu(0, 0xDB, 0x3F, 0xFF, tlv(0x5C, bytes.fromhex("5FC105")) + tlv(0x53, b"\x70\x00"))
    assert send(card, put)[1] == 0x6982  # not yet
    other = ALG_AES192 if alg == ALG_3DES else ALG_3DES
    assert send(card, apdu(0, 0x87, other, 0x9B, tlv(0x7C, tlv(0x80, b"")), True))[1] == 0x6A86
    assert mgmt_auth(card, alg, bytes(len(key))) == 0x6982  # wrong key
    assert mgmt_auth(card, alg, key) == 0x9000
    assert send(card, put)[1] == 0x9000
    # external authentication (one way) works too
    card.reset()
    out, sw = send(card, apdu(0, 0x87, alg, 0x9B, tlv(0x7C, tlv(0x81, b"")), True))
    assert sw == 0x9000
    challenge = find_tag(find_tag(out, 0x7C), 0x81)
    response = tlv(0x7C, tlv(0x82, ecb(alg, key, challenge, True)))
    assert send(card, apdu(0, 0x87, alg, 0x9B, response))[1] == 0x9000
    assert card.mgmt_authenticated


def test_generate_sign_ecdh_and_status_words() -> None:
    card = PivCard()
    gen = apdu(0, 0x47, 0, 0x9A, tlv(0xAC, tlv(0x80, bytes([ALG_P256]))), True)
    assert send(card, gen)[1] == 0x6982
    mgmt_auth(card)
    assert send(card, apdu(0, 0x47, 0, 0x9B, tlv(0xAC, tlv(0x80, b"\x11")), True))[1] == 0x6A86
    assert send(card, apdu(0, 0x47, 0, 0x9A, tlv(0xAC, tlv(0x80, b"\x05")), True))[1] == 0x6A80
    out, sw = send(card, gen)
    assert sw == 0x9000
    point = find_tag(find_tag(out, 0x7F49), 0x86)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"m")
    d = digest.finalize()
    sign = apdu(0, 0x87, ALG_P256, 0x9A, tlv(0x7C, tlv(0x82, b"") + tlv(0x81, d)), True)
    assert send(card, sign)[1] == 0x6982  # PIN first
    send(card, apdu(0, 0x20, 0, 0x80, pad(DEFAULT_PIN)))
    out, sw = send(card, sign)
    assert sw == 0x9000
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    public.verify(find_tag(find_tag(out, 0x7C), 0x82), d, ec.ECDSA(Prehashed(hashes.SHA256())))
    wrong_alg = apdu(0, 0x87, 0x07, 0x9A, tlv(0x7C, tlv(0x82, b"") + tlv(0x81, d)), True)
    assert send(card, wrong_alg)[1] == 0x6A80
    empty_slot = apdu(0, 0x87, ALG_P256, 0x9C, tlv(0x7C, tlv(0x82, b"") + tlv(0x81, d)), True)
    assert send(card, empty_slot)[1] == 0x6A88
    peer = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    peer_point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    ecdh = apdu(0, 0x87, ALG_P256, 0x9A, tlv(0x7C, tlv(0x82, b"") + tlv(0x85, peer_point)), True)
    out, sw = send(card, ecdh)
    assert sw == 0x9000
    assert find_tag(find_tag(out, 0x7C), 0x82) == peer.exchange(ec.ECDH(), public)
    bad_point = tlv(0x7C, tlv(0x82, b"") + tlv(0x85, b"\x04" + b"\x01" * 64))
    assert send(card, apdu(0, 0x87, ALG_P256, 0x9A, bad_point, True))[1] == 0x6A80
    assert send(card, "00CB3FFF055C035FC10A00")[1] == 0x6A82  # absent object
    assert send(card, "00CB3FFF055C035FFFFF00")[1] == 0x6A82  # unknown object
    assert send(card, "00CB3FFE055C035FC10200")[1] == 0x6A86
    card.reset()
    assert send(card, "00CB3FFF055C035FC10900")[1] == 0x6982  # printed information: PIN
    send(card, apdu(0, 0x20, 0, 0x80, pad(DEFAULT_PIN)))
    assert send(card, "00CB3FFF055C035FC10900")[1] == 0x6A82  # allowed now, but absent


def test_chaining_get_response_and_le() -> None:
    card = PivCard()
    mgmt_auth(card)
    cert = os.urandom(700)
    body = tlv(0x5C, bytes.fromhex("5FC105")) + tlv(0x53, tlv(0x70, cert) + tlv(0x71, b"\x00"))
    parts = [body[i : i + 255] for i in range(0, len(body), 255)]
    for part in parts[:-1]:
        assert send(card, apdu(0x10, 0xDB, 0x3F, 0xFF, part))[1] == 0x9000
    assert send(card, apdu(0x00, 0xDB, 0x3F, 0xFF, parts[-1]))[1] == 0x9000
    out, sw = send(card, "00CB3FFF055C035FC10508")  # Le 8: never more than Le
    assert len(out) == 8 and sw >> 8 == 0x61
    whole = b""
    out, sw = send(card, "00CB3FFF055C035FC10500")
    whole += out
    while sw >> 8 == 0x61:
        assert len(out) <= 256
        out, sw = send(card, bytes([0, 0xC0, 0, 0, sw & 0xFF]))
        whole += out
    assert sw == 0x9000
    assert find_tag(find_tag(whole, 0x53), 0x70) == cert
    assert send(card, "00C0000000")[1] == 0x6985  # nothing pending
    # a chain broken by another command is refused
    send(card, apdu(0x10, 0xDB, 0x3F, 0xFF, parts[0]))
    assert send(card, apdu(0x00, 0x87, 0x03, 0x9B, tlv(0x7C, tlv(0x80, b""))))[1] == 0x6883


def test_state_survives_reset_and_is_kept_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    card = PivCard(path)
    mgmt_auth(card)
    gen = apdu(0, 0x47, 0, 0x9D, tlv(0xAC, tlv(0x80, bytes([ALG_P256]))), True)
    assert send(card, gen)[1] == 0x9000
    send(card, apdu(0, 0x20, 0, 0x80, pad("000000")))
    card.power_off()
    card.power_on()
    assert not card.mgmt_authenticated and not card.pin_verified
    assert card.pin_tries == 2 and 0x9D in card.state.keys
    again = PivCard(path)
    assert again.pin_tries == 2
    assert again.chuid_guid() == card.chuid_guid()
    assert again.state.keys[0x9D].private_numbers() == card.state.keys[0x9D].private_numbers()


def test_emulator_through_pcscd_with_pyscard(tmp_path: Path) -> None:
    missing = pcsc_support.pcsc_available()
    if missing:
        pytest.skip(missing)
    from smartcard.System import readers

    card = PivCard()
    with pcsc_support.ensure_pcscd(tmp_path) as service:
        with service.serve(card, pcsc_support.PIV_SLOT) as link:
            reader = next(r for r in readers() if str(r) == link.reader.name)
            connection = reader.createConnection()
            connection.connect()
            try:
                _, sw1, sw2 = connection.transmit(list(bytes.fromhex("00A4040005A000000308")))
                assert (sw1, sw2) == (0x90, 0x00)
                data, sw1, sw2 = connection.transmit(list(bytes.fromhex("00CB3FFF035C017E00")))
                assert (sw1, sw2) == (0x90, 0x00)
                assert bytes(data).startswith(bytes.fromhex("7E124F0BA0000003080000100001"))
                _, sw1, sw2 = connection.transmit([0x00, 0x20, 0x00, 0x80])
                assert (sw1, sw2) == (0x63, 0xC3)
            finally:
                connection.disconnect()
                connection.release()
            assert link.error is None
        gc.collect()
