"""What the catalog keeps for FIDO keys: the backend handle strings (no secrets in them).

A credential handle is `fido-cred:` and compact JSON with the RP ID, the credential id, the
COSE algorithm, whether it is discoverable, whether it was made with hmac-secret, whether
user verification is required for it, and the registration itself (the attestation object
and the client data JSON of makeCredential), from which the public key is read. A credential
id is not secret: for a non-discoverable credential it is the authenticator's wrapped key,
which only that authenticator can use.

A derived-key handle is `fido-kek:` and JSON naming the credential, the salt and info of the
derivation, and whether the hmac-secret call used user verification and user presence (the
authenticator gives a different secret with and without UV, so this is fixed at creation).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from strongroom.errors import InvalidArgument

CREDENTIAL_PREFIX = "fido-cred:"
DERIVED_PREFIX = "fido-kek:"
UV_CHOICES = ("discouraged", "preferred", "required")
"""The user-verification policies: of the backend's setting, a key's creation and a vault slot."""


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CredentialHandle:
    """A FIDO credential made by `generate` (or by `seal`, for a vault key slot)."""

    rp_id: str
    credential_id: bytes
    alg: int
    resident: bool
    hmac_secret: bool
    uv_required: bool
    attestation_object: bytes
    client_data_json: bytes

    def encode(self) -> str:
        doc = {
            "v": 1,
            "rp": self.rp_id,
            "id": b64u(self.credential_id),
            "alg": self.alg,
            "rk": self.resident,
            "hs": self.hmac_secret,
            "uvr": self.uv_required,
            "att": b64u(self.attestation_object),
            "cd": b64u(self.client_data_json),
        }
        return CREDENTIAL_PREFIX + json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, handle: str) -> CredentialHandle:
        doc = _load(handle, CREDENTIAL_PREFIX)
        try:
            return cls(
                rp_id=str(doc["rp"]),
                credential_id=unb64u(doc["id"]),
                alg=int(doc["alg"]),
                resident=bool(doc["rk"]),
                hmac_secret=bool(doc["hs"]),
                uv_required=bool(doc["uvr"]),
                attestation_object=unb64u(doc["att"]),
                client_data_json=unb64u(doc["cd"]),
            )
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument("a FIDO credential handle in the catalog is damaged") from None


@dataclass(frozen=True)
class DerivedHandle:
    """An aes-256 key-encryption key that hmac-secret re-derives on every use."""

    rp_id: str
    credential_id: bytes
    salt: bytes
    info: bytes
    uv: bool
    up: bool

    def encode(self) -> str:
        doc = {
            "v": 1,
            "rp": self.rp_id,
            "id": b64u(self.credential_id),
            "salt": b64u(self.salt),
            "info": b64u(self.info),
            "uv": self.uv,
            "up": self.up,
        }
        return DERIVED_PREFIX + json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, handle: str) -> DerivedHandle:
        doc = _load(handle, DERIVED_PREFIX)
        try:
            return cls(
                rp_id=str(doc["rp"]),
                credential_id=unb64u(doc["id"]),
                salt=unb64u(doc["salt"]),
                info=unb64u(doc["info"]),
                uv=bool(doc["uv"]),
                up=bool(doc["up"]),
            )
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument("a FIDO derived-key handle in the catalog is damaged") from None


def _load(handle: str, prefix: str) -> dict[str, Any]:
    if not handle.startswith(prefix):
        raise InvalidArgument(f"the catalog handle is not a {prefix.rstrip(':')} handle")
    try:
        doc = json.loads(handle[len(prefix) :])
    except ValueError:
        raise InvalidArgument("a FIDO handle in the catalog is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise InvalidArgument("a FIDO handle in the catalog has an unknown version")
    return doc
