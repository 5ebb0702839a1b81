"""Key attestation statements (TPM2_Certify) and their verifier.

A statement is JSON. The verifier needs no TPM and no TSS: it parses the TPM
structures itself (`structures.py`). It checks that

1. the attestation key (AK) is a restricted signing key fixed to a TPM, so the TPM
   signs with it only data it produced itself (TPM_GENERATED_VALUE);
2. the signature over the TPMS_ATTEST verifies with the AK;
3. the TPMS_ATTEST is a TPM2_Certify statement, by that AK (qualifiedSigner);
4. its extraData is the nonce;
5. the certified Name is the Name of the key's public area in the statement, and
   that area is a key that cannot leave the TPM (fixedTPM, fixedParent);
6. optionally, that the AK is the one the relying party trusts and the key is the
   public key it expects.

Without step 6's AK, a statement proves only that *some* TPM-shaped signer made it;
trust in the AK comes from pinning it at enrolment (or from an EK certificate and
TPM2_ActivateCredential, which this version does not do). See docs/tpm.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from strongroom.errors import AttestationInvalid

from . import structures as st

FORMAT = "tpm2-certify"
VERSION = 1
AK_DESCRIPTION = "restricted ECDSA P-256 signing primary, endorsement hierarchy"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(public: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, hex: how a person compares attestation keys."""
    return hashlib.sha256(_spki(public)).hexdigest()


def make_statement(
    key_name: str,
    key_type: str,
    nonce: bytes,
    attest: bytes,
    signature: bytes,
    key_area: bytes,
    ak_area: bytes,
) -> dict[str, Any]:
    """A JSON-ready statement from TPM2_Certify's output and the two public areas."""
    ak = st.parse_public(ak_area).public_key()
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": {"name": key_name, "type": key_type, "public_area": _b64(key_area)},
        "nonce": nonce.hex(),
        "certify_info": _b64(attest),
        "signature": _b64(signature),
        "attestation_key": {
            "description": AK_DESCRIPTION,
            "public_area": _b64(ak_area),
            "public_key": _spki_pem(ak),
            "fingerprint": fingerprint(ak),
        },
    }


def _spki_pem(public: PublicKeyTypes) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _field(statement: Mapping[str, Any], *path: str) -> Any:
    node: Any = statement
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise AttestationInvalid(f"the statement has no {'.'.join(path)}")
        node = node[part]
    return node


def _bytes(statement: Mapping[str, Any], *path: str) -> bytes:
    value = _field(statement, *path)
    if not isinstance(value, str):
        raise AttestationInvalid(f"the statement's {'.'.join(path)} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationInvalid(f"the statement's {'.'.join(path)} is not valid base64") from None


def _verify_signature(ak: PublicKeyTypes, signature: st.Signature, data: bytes) -> None:
    chosen = {st.ALG_SHA256: hashes.SHA256(), st.ALG_SHA384: hashes.SHA384()}.get(
        signature.hash_alg
    )
    if chosen is None:
        raise AttestationInvalid("the attestation signature uses an unsupported hash")
    try:
        if isinstance(ak, ec.EllipticCurvePublicKey) and signature.algorithm == st.ALG_ECDSA:
            ak.verify(signature.value, data, ec.ECDSA(chosen))
        elif isinstance(ak, rsa.RSAPublicKey) and signature.algorithm == st.ALG_RSASSA:
            ak.verify(signature.value, data, padding.PKCS1v15(), chosen)
        elif isinstance(ak, rsa.RSAPublicKey) and signature.algorithm == st.ALG_RSAPSS:
            pss = padding.PSS(padding.MGF1(chosen), padding.PSS.AUTO)
            ak.verify(signature.value, data, pss, chosen)
        else:
            raise AttestationInvalid("the signature algorithm does not match the attestation key")
    except InvalidSignature:
        raise AttestationInvalid(
            "the attestation signature does not verify with the attestation key"
        ) from None


def verify_statement(
    statement: Mapping[str, Any],
    nonce: bytes | None = None,
    trusted_signer: PublicKeyTypes | None = None,
    expected_public: PublicKeyTypes | None = None,
) -> dict[str, Any]:
    """Check a statement; return what it proves, or raise AttestationInvalid saying why not."""
    if statement.get("format") != FORMAT or statement.get("version") != VERSION:
        raise AttestationInvalid(
            f"not a {FORMAT} version {VERSION} statement "
            f"(format {statement.get('format')!r}, version {statement.get('version')!r})"
        )
    try:
        ak_area = st.parse_public(_bytes(statement, "attestation_key", "public_area"))
        key_area = st.parse_public(_bytes(statement, "key", "public_area"))
        info = st.parse_certify(_bytes(statement, "certify_info"))
        signature = st.parse_signature(_bytes(statement, "signature"))
        ak = ak_area.public_key()
        asymmetric = key_area.type in (st.ALG_ECC, st.ALG_RSA)
        key_public = key_area.public_key() if asymmetric else None
        # Names hash the public areas with their own nameAlg, which the statement chooses.
        ak_qualified_name = st.qualified_name_of_primary(st.RH_ENDORSEMENT, ak_area)
        key_name = key_area.name
    except st.StructureError as e:
        raise AttestationInvalid(f"the statement is malformed: {e}") from None
    except (ValueError, TypeError, OverflowError):  # e.g. a point not on its curve
        raise AttestationInvalid("the statement is malformed: a public area is not a key") from None

    needed = st.RESTRICTED | st.SIGN_ENCRYPT | st.FIXED_TPM
    if ak_area.attributes & needed != needed:
        raise AttestationInvalid(
            "the attestation key is not a restricted signing key fixed to a TPM "
            f"(attributes: {', '.join(ak_area.attribute_names())})"
        )
    if trusted_signer is not None and _spki(trusted_signer) != _spki(ak):
        raise AttestationInvalid(
            f"the statement was signed by attestation key {fingerprint(ak)}, "
            f"not the trusted one {fingerprint(trusted_signer)}"
        )
    _verify_signature(ak, signature, _bytes(statement, "certify_info"))

    if info.qualified_signer != ak_qualified_name:
        raise AttestationInvalid(
            "the TPMS_ATTEST names a different signer than the attestation key"
        )
    claimed = _field(statement, "nonce")
    if not isinstance(claimed, str) or not hmac.compare_digest(
        claimed.lower().encode("utf-8", "replace"), info.extra_data.hex().encode()
    ):
        raise AttestationInvalid("the statement's nonce is not the one the TPM certified")
    if nonce is not None and not hmac.compare_digest(bytes(nonce), info.extra_data):
        raise AttestationInvalid("the TPM certified a different nonce than the one expected")
    if info.name != key_name:
        raise AttestationInvalid(
            "the certified Name does not match the key's public area "
            f"(certified {info.name.hex()}, public area {key_name.hex()})"
        )
    if not (key_area.has(st.FIXED_TPM) and key_area.has(st.FIXED_PARENT)):
        raise AttestationInvalid(
            "the certified key can leave its TPM (fixedTPM or fixedParent is clear)"
        )
    if expected_public is not None and (
        key_public is None or _spki(expected_public) != _spki(key_public)
    ):
        raise AttestationInvalid("the certified key is not the expected public key")
    key = _field(statement, "key")
    return {
        "valid": True,
        "key": key.get("name"),
        "key_type": key.get("type"),
        "key_public_key": None if key_public is None else _spki_pem(key_public),
        "tpm_name": key_name.hex(),
        "key_attributes": key_area.attribute_names(),
        "generated_in_tpm": key_area.has(st.SENSITIVE_DATA_ORIGIN),
        "attestation_key": fingerprint(ak),
        "attestation_key_trusted": trusted_signer is not None,
        "nonce_checked": nonce is not None,
        "expected_key_checked": expected_public is not None,
        "firmware_version": f"0x{info.firmware_version:016x}",
        "reset_count": info.reset_count,
        "restart_count": info.restart_count,
    }
