"""The few TPM 2.0 wire structures Strongroom reads itself, in plain Python.

Attestation statements are checked by relying parties that may have no TSS
installed, so the verifier parses `TPMT_PUBLIC`, `TPMS_ATTEST` and
`TPMT_SIGNATURE` here (TPM 2.0 Library, Part 2) instead of through tpm2-pytss.
The backend uses the same code to turn a key's public area into a `cryptography`
public key, without a round trip to the TPM.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_HMAC = 0x0005
ALG_AES = 0x0006
ALG_KEYEDHASH = 0x0008
ALG_XOR = 0x000A
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_SYMCIPHER = 0x0025

ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004
ECC_NIST_P521 = 0x0005

# TPMA_OBJECT bits
FIXED_TPM = 1 << 1
ST_CLEAR = 1 << 2
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
NO_DA = 1 << 10
ENCRYPTED_DUPLICATION = 1 << 11
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18

TPM_GENERATED_VALUE = 0xFF544347
ST_ATTEST_CERTIFY = 0x8017
RH_OWNER = 0x40000001
RH_ENDORSEMENT = 0x4000000B

_ATTRIBUTE_NAMES = {
    FIXED_TPM: "fixedTPM",
    ST_CLEAR: "stClear",
    FIXED_PARENT: "fixedParent",
    SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin",
    USER_WITH_AUTH: "userWithAuth",
    ADMIN_WITH_POLICY: "adminWithPolicy",
    NO_DA: "noDA",
    ENCRYPTED_DUPLICATION: "encryptedDuplication",
    RESTRICTED: "restricted",
    DECRYPT: "decrypt",
    SIGN_ENCRYPT: "sign",
}
_HASHES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
_CURVES: dict[int, ec.EllipticCurve] = {
    ECC_NIST_P256: ec.SECP256R1(),
    ECC_NIST_P384: ec.SECP384R1(),
    ECC_NIST_P521: ec.SECP521R1(),
}


class StructureError(ValueError):
    """Bytes that are not the TPM structure they claim to be."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StructureError("the structure ends early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        """A TPM2B: a 16-bit size, then that many bytes."""
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StructureError("the structure has trailing bytes")


def hash_name(alg: int) -> str:
    try:
        return _HASHES[alg]
    except KeyError:
        raise StructureError(f"unknown hash algorithm 0x{alg:04x}") from None


def digest(alg: int, data: bytes) -> bytes:
    return hashlib.new(hash_name(alg), data).digest()


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC; `raw` is its exact marshalled form."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    curve: int | None = None
    rsa_bits: int | None = None
    rsa_exponent: int | None = None
    unique: tuple[bytes, ...] = ()

    @property
    def name(self) -> bytes:
        """The TPM Name: nameAlg ‖ H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + digest(self.name_alg, self.raw)

    def has(self, attribute: int) -> bool:
        return bool(self.attributes & attribute)

    def attribute_names(self) -> list[str]:
        return [name for bit, name in _ATTRIBUTE_NAMES.items() if self.attributes & bit]

    def public_key(self) -> PublicKeyTypes:
        """The public key as a `cryptography` object (ECC and RSA areas only)."""
        if self.type == ALG_ECC:
            curve = _CURVES.get(self.curve or 0)
            if curve is None:
                raise StructureError(f"unsupported ECC curve 0x{self.curve or 0:04x}")
            x, y = (int.from_bytes(v, "big") for v in self.unique)
            try:
                return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
            except ValueError:
                raise StructureError("the public point is not on the curve") from None
        if self.type == ALG_RSA:
            exponent = self.rsa_exponent or 65537
            return rsa.RSAPublicNumbers(
                exponent, int.from_bytes(self.unique[0], "big")
            ).public_key()
        raise StructureError(f"object type 0x{self.type:04x} has no public key")


def parse_public(data: bytes) -> PublicArea:
    """Parse a marshalled TPMT_PUBLIC (ECC, RSA, keyed-hash and symmetric objects)."""
    r = _Reader(data)
    obj_type, name_alg, attributes = r.u16(), r.u16(), r.u32()
    policy = r.sized()
    curve = bits = exponent = None
    if obj_type == ALG_ECC:
        _sym_def(r)
        _scheme(r, ecdaa=True)
        curve = r.u16()
        _scheme(r)  # kdf
        unique: tuple[bytes, ...] = (r.sized(), r.sized())
    elif obj_type == ALG_RSA:
        _sym_def(r)
        _scheme(r)
        bits, exponent = r.u16(), r.u32()
        unique = (r.sized(),)
    elif obj_type == ALG_KEYEDHASH:
        scheme = r.u16()
        if scheme == ALG_HMAC:
            r.u16()
        elif scheme == ALG_XOR:
            r.u16(), r.u16()
        elif scheme != ALG_NULL:
            raise StructureError(f"unknown keyed-hash scheme 0x{scheme:04x}")
        unique = (r.sized(),)
    elif obj_type == ALG_SYMCIPHER:
        _sym_def(r)
        unique = (r.sized(),)
    else:
        raise StructureError(f"unknown object type 0x{obj_type:04x}")
    r.end()
    return PublicArea(data, obj_type, name_alg, attributes, policy, curve, bits, exponent, unique)


def parse_public_2b(data: bytes) -> PublicArea:
    """Parse a marshalled TPM2B_PUBLIC (the size-prefixed form kept in key blobs)."""
    r = _Reader(data)
    inner = r.sized()
    r.end()
    return parse_public(inner)


def _sym_def(r: _Reader) -> None:
    if r.u16() != ALG_NULL:
        r.u16(), r.u16()  # key bits, mode


def _scheme(r: _Reader, ecdaa: bool = False) -> None:
    scheme = r.u16()
    if scheme == ALG_NULL:
        return
    r.u16()  # hash
    if ecdaa and scheme == ALG_ECDAA:
        r.u16()  # count


@dataclass(frozen=True)
class CertifyInfo:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    name: bytes
    qualified_name: bytes


def parse_certify(data: bytes) -> CertifyInfo:
    r = _Reader(data)
    if r.u32() != TPM_GENERATED_VALUE:
        raise StructureError("the attestation was not generated by a TPM (bad magic)")
    if r.u16() != ST_ATTEST_CERTIFY:
        raise StructureError("the attestation is not a TPM2_Certify statement")
    signer, extra = r.sized(), r.sized()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    name, qualified = r.sized(), r.sized()
    r.end()
    return CertifyInfo(
        signer, extra, clock, resets, restarts, bool(safe), firmware, name, qualified
    )


@dataclass(frozen=True)
class Signature:
    """A parsed TPMT_SIGNATURE; `der` is the encoding `cryptography` and openssl verify."""

    algorithm: int
    hash_alg: int
    value: bytes


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (ECDSA, RSASSA, RSAPSS); it is on every sign, so
    it reads with struct directly."""
    try:
        alg, hash_alg, size = struct.unpack_from(">HHH", data, 0)
        if alg == ALG_ECDSA:
            r = data[6 : 6 + size]
            (s_size,) = struct.unpack_from(">H", data, 6 + size)
            s = data[8 + size : 8 + size + s_size]
            end = 8 + size + s_size
            value = utils.encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        elif alg in (ALG_RSASSA, ALG_RSAPSS):
            value = data[6 : 6 + size]
            end = 6 + size
        else:
            raise StructureError(f"unsupported signature algorithm 0x{alg:04x}")
    except struct.error:
        raise StructureError("the structure ends early") from None
    if end != len(data):
        raise StructureError("the signature structure has the wrong length")
    return Signature(alg, hash_alg, value)


def qualified_name_of_primary(hierarchy: int, area: PublicArea) -> bytes:
    """QN of a primary object: nameAlg ‖ H(QN(hierarchy) ‖ Name); a hierarchy's QN is its handle."""
    parent_qn = struct.pack(">I", hierarchy)
    return struct.pack(">H", area.name_alg) + digest(area.name_alg, parent_qn + area.name)
