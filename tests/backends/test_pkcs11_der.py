"""CKM_ECDSA's raw r‖s to DER: our encoder against cryptography's, on edge cases too."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from strongroom.backends.pkcs11.keys import ecdsa_der
from strongroom.errors import StrongroomError


@pytest.mark.parametrize("size", [32, 48, 66])
def test_matches_cryptography(size: int) -> None:
    rng = random.Random(size)
    for _ in range(3000):
        r, s = bytearray(os.urandom(size)), bytearray(os.urandom(size))
        if rng.random() < 0.3:  # leading zero bytes, up to all of them
            k = rng.randint(1, size)
            r[:k] = bytes(k)
        if rng.random() < 0.5:  # high bit set: needs a 0x00 pad
            s[0] |= 0x80
        expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        assert ecdsa_der(bytes(r + s)) == expected


def test_rejects_odd_or_empty() -> None:
    for raw in (b"", b"\x01" * 63):
        with pytest.raises(StrongroomError):
            ecdsa_der(raw)
