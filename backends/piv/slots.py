"""The PIV card's key slots and algorithm ids (SP 800-73-4), shared by the backend's parts.

Which slots there are and which data object holds each slot's certificate, where new keys
go, which slots always or never need the PIN, the slot the vault sealer uses, and the PIV
algorithm ids of the key types Strongroom makes. Slot names are two hex digits (`9a`), as
in the catalog handle.
"""

from __future__ import annotations

from strongroom.errors import InvalidArgument
from strongroom.types import KeyType

RETIRED_SLOTS = tuple(range(0x82, 0x96))
SLOT_OBJECTS: dict[int, int] = {
    0x9A: 0x5FC105,
    0x9C: 0x5FC10A,
    0x9D: 0x5FC10B,
    0x9E: 0x5FC101,
    **{slot: 0x5FC10D + i for i, slot in enumerate(RETIRED_SLOTS)},
}
SIGN_ORDER = (0x9A, 0x9C, *RETIRED_SLOTS, 0x9E)
"""Where a new signing key goes: the first slot without a certificate, in this order."""
AGREE_ORDER = (0x9D, *RETIRED_SLOTS)
"""Where a new key with usage agree or decrypt goes (9D is the key-management slot)."""
SEALER_SLOT = 0x9D
KEY_HISTORY_OBJECT = 0x5FC10C
PIN_ALWAYS = frozenset({0x9C})
PIN_NEVER = frozenset({0x9E})

ALG_RSA2048, ALG_P256, ALG_P384 = 0x07, 0x11, 0x14
KEY_ALGS: dict[KeyType, int] = {
    KeyType.ECDSA_P256: ALG_P256,
    KeyType.ECDSA_P384: ALG_P384,
    KeyType.RSA_2048: ALG_RSA2048,
}
VAULT_KEY_NAME = "Strongroom vault key"


def _slot_name(slot: int) -> str:
    return f"{slot:02x}"


def parse_slot(value: str) -> int:
    try:
        slot = int(str(value), 16)
    except ValueError:
        slot = -1
    if slot not in SLOT_OBJECTS:
        raise InvalidArgument(f"{value!r} is not a PIV key slot (9a, 9c, 9d, 9e or 82 to 95)")
    return slot
