"""The assertion structure that `sign` returns for FIDO keys, and its verifier.

A FIDO authenticator never signs caller data directly: getAssertion signs
`authenticatorData ‖ SHA-256(clientDataJSON)`. Strongroom therefore turns the message into
the WebAuthn challenge and returns everything a verifier needs, as one canonical CBOR map
(CTAP2 canonical encoding):

    {
      "v": 1,
      "rawId": <credential id, bytes>,
      "authenticatorData": <bytes: rpIdHash ‖ flags ‖ signCount ‖ extensions>,
      "clientDataJSON": <bytes: {"type":"webauthn.get","challenge":...,"origin":...}>,
      "signature": <bytes: DER ECDSA (ES256) or raw 64-byte Ed25519 (EdDSA)>,
    }

with `challenge = SHA-256(message)` (base64url in the client data) and
`origin = "https://" + rp_id`. The client data hash, the value the authenticator saw, is
`SHA-256(clientDataJSON)`. The field names are those of WebAuthn's AuthenticationResponse,
so `to_webauthn()` hands the same assertion to any WebAuthn server library.

Credentials made for an OpenSSH application (an RP ID `ssh:` or `ssh:NAME`, the backend's
`rp_id`) sign the way OpenSSH's security-key keys do, so that `sshd` and `ssh-keygen -Y
verify` check them: the client data hash the authenticator signs is `SHA-256(message)`
itself, and `clientDataJSON` is empty. The signed bytes are then
`authenticatorData ‖ SHA-256(message)`, which is OpenSSH's
`SHA-256(application) ‖ flags ‖ counter ‖ SHA-256(message)` when the authenticator data
has no extensions (PROTOCOL.u2f).

`verify_assertion` checks, in order: the encoding, the credential id, the client data type,
challenge and origin, the RP ID hash, the user-present flag (and user-verified when the key
requires it), then the signature. Any failure raises cryptography's `InvalidSignature`.
It does not track the signature counter; a relying party that wants clone detection keeps
the last `counter` itself.

This module needs python-fido2 (for CBOR and COSE keys).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from fido2 import cbor
from fido2.cose import ES256, CoseKey, EdDSA
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import (
    AuthenticationResponse,
    AuthenticatorAssertionResponse,
    AuthenticatorData,
    CollectedClientData,
)

VERSION = 1
GET = "webauthn.get"
CREATE = "webauthn.create"
SSH_APPLICATION_PREFIX = "ssh:"


def is_ssh_application(rp_id: str) -> bool:
    """Whether credentials for `rp_id` are OpenSSH security-key keys (`ssh:`, `ssh:NAME`)."""
    return rp_id.startswith(SSH_APPLICATION_PREFIX)


def challenge_for(message: bytes) -> bytes:
    """The WebAuthn challenge that stands for `message`: SHA-256(message)."""
    return hashlib.sha256(message).digest()


def origin_for(rp_id: str) -> str:
    return f"https://{rp_id}"


def client_data(kind: str, challenge: bytes, rp_id: str) -> bytes:
    """The client data JSON a browser would make for this RP (same key order as WebAuthn)."""
    return json.dumps(
        {
            "type": kind,
            "challenge": websafe_encode(challenge),
            "origin": origin_for(rp_id),
            "crossOrigin": False,
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class Assertion:
    """One FIDO assertion, as `sign` returns it (encoded) and `verify` reads it."""

    credential_id: bytes
    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes

    @property
    def client_data_hash(self) -> bytes:
        return hashlib.sha256(self.client_data_json).digest()

    @property
    def signed_data(self) -> bytes:
        """What the authenticator signed: authenticatorData ‖ SHA-256(clientDataJSON)."""
        return self.authenticator_data + self.client_data_hash

    def encode(self) -> bytes:
        return cbor.encode(
            {
                "v": VERSION,
                "rawId": self.credential_id,
                "authenticatorData": self.authenticator_data,
                "clientDataJSON": self.client_data_json,
                "signature": self.signature,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Assertion:
        """Parse an encoded assertion; ValueError if it is not one (or not canonical)."""
        try:
            doc = cbor.decode(bytes(data))
        except Exception as e:  # fido2's decoder raises several types on garbage
            raise ValueError("not a CBOR-encoded assertion") from e
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("not a version 1 assertion")
        if cbor.encode(doc) != bytes(data):
            raise ValueError("the assertion is not canonically encoded")
        fields = ("rawId", "authenticatorData", "clientDataJSON", "signature")
        if set(doc) != {"v", *fields} or not all(isinstance(doc[f], bytes) for f in fields):
            raise ValueError("the assertion has missing or extra fields")
        return cls(doc["rawId"], doc["authenticatorData"], doc["clientDataJSON"], doc["signature"])

    def to_webauthn(self) -> AuthenticationResponse:
        """The same assertion as WebAuthn's AuthenticationResponse (for Fido2Server & co.)."""
        return AuthenticationResponse(
            raw_id=self.credential_id,
            response=AuthenticatorAssertionResponse(
                client_data=CollectedClientData(self.client_data_json),
                authenticator_data=AuthenticatorData(self.authenticator_data),
                signature=self.signature,
            ),
        )


def cose_to_public(cose: CoseKey) -> PublicKeyTypes:
    """A `cryptography` public key from a COSE ES256 or EdDSA key."""
    if isinstance(cose, ES256) or cose.get(3) == ES256.ALGORITHM:
        if cose.get(-1) != 1:
            raise ValueError("an ES256 key must be on P-256")
        x = int.from_bytes(cose[-2], "big")
        y = int.from_bytes(cose[-3], "big")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    if isinstance(cose, EdDSA) or cose.get(3) == EdDSA.ALGORITHM:
        if cose.get(-1) != 6:
            raise ValueError("an EdDSA key must be Ed25519")
        return ed25519.Ed25519PublicKey.from_public_bytes(cose[-2])
    raise ValueError(f"unsupported COSE algorithm {cose.get(3)!r}")


def _verify_signature(public: PublicKeyTypes, message: bytes, signature: bytes) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, message)
    else:
        raise InvalidSignature()


def verify_assertion(
    public: PublicKeyTypes | CoseKey,
    rp_id: str,
    message: bytes,
    encoded: bytes,
    *,
    credential_id: bytes | None = None,
    require_uv: bool = False,
) -> Assertion:
    """Check an encoded assertion over `message`; return it, or raise InvalidSignature."""
    if isinstance(public, CoseKey):
        try:
            public = cose_to_public(public)
        except ValueError:
            raise InvalidSignature() from None
    try:
        assertion = Assertion.decode(encoded)
        auth = AuthenticatorData(assertion.authenticator_data)
        if is_ssh_application(rp_id):
            client: dict[str, Any] = {}
            challenge = b""
        else:
            client = json.loads(assertion.client_data_json)
            challenge = websafe_decode(str(client["challenge"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidSignature() from None
    if credential_id is not None and not hmac.compare_digest(
        assertion.credential_id, credential_id
    ):
        raise InvalidSignature()
    if is_ssh_application(rp_id):  # OpenSSH's form: no client data, the message's hash
        if assertion.client_data_json:
            raise InvalidSignature()
        signed = assertion.authenticator_data + hashlib.sha256(message).digest()
    else:
        if client.get("type") != GET or client.get("origin") != origin_for(rp_id):
            raise InvalidSignature()
        if not hmac.compare_digest(challenge, challenge_for(message)):
            raise InvalidSignature()
        signed = assertion.signed_data
    if not hmac.compare_digest(auth.rp_id_hash, hashlib.sha256(rp_id.encode()).digest()):
        raise InvalidSignature()
    if not auth.is_user_present() or (require_uv and not auth.is_user_verified()):
        raise InvalidSignature()
    _verify_signature(public, signed, assertion.signature)
    return assertion


__all__ = [
    "Assertion",
    "challenge_for",
    "client_data",
    "is_ssh_application",
    "cose_to_public",
    "origin_for",
    "verify_assertion",
]
