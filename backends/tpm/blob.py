"""A TPM key as the catalog keeps it: its public and private blobs, in the handle string.

The private blob is the TPM's own TPM2B_PRIVATE, encrypted by the TPM under the
storage root key; only that TPM can load it. Blobs (not saved contexts) survive a
TPM restart or reset. Layout, with standard base64 (no ':' in it)::

    tpm2:1:<flags>:<public>:<private>[:<public>:<private>]

`flags` is `pin` when the key has an auth value (the PIN), else `-`. An `aes-256`
key has two parts: the AES key and its HMAC key (encrypt-then-MAC).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from strongroom.errors import IntegrityError

PREFIX = "tpm2"
VERSION = "1"


@dataclass(frozen=True)
class KeyBlob:
    """Public (TPM2B_PUBLIC) and private (TPM2B_PRIVATE) blobs of one or two TPM objects."""

    pin: bool
    parts: tuple[tuple[bytes, bytes], ...]

    def __repr__(self) -> str:
        return f"KeyBlob(pin={self.pin}, parts={len(self.parts)})"

    def encode(self) -> str:
        fields = [PREFIX, VERSION, "pin" if self.pin else "-"]
        for public, private in self.parts:
            fields += [base64.b64encode(public).decode(), base64.b64encode(private).decode()]
        return ":".join(fields)

    @classmethod
    def decode(cls, handle: str) -> KeyBlob:
        fields = handle.split(":")
        if len(fields) < 5 or fields[0] != PREFIX or len(fields) % 2 == 0:
            raise IntegrityError("the catalog handle is not a Strongroom TPM key blob")
        if fields[1] != VERSION:
            raise IntegrityError(f"TPM key blob version {fields[1]!r} is not one this reads")
        if fields[2] not in ("pin", "-"):
            raise IntegrityError("the TPM key blob has unknown flags")
        try:
            raw = [base64.b64decode(f, validate=True) for f in fields[3:]]
        except (binascii.Error, ValueError):
            raise IntegrityError("the TPM key blob is not valid base64") from None
        parts = tuple((raw[i], raw[i + 1]) for i in range(0, len(raw), 2))
        return cls(fields[2] == "pin", parts)
