"""TPM object templates and fixed structures, for the device (device.py re-exports the
names the backend uses).

The storage root key is the TCG template's ECC P-256 storage primary; keys are ordinary
signing, decryption or keyed-hash objects under it, with `USERWITHAUTH` so a PIN (or none)
authorizes them, and sealed objects are bound to a PCR policy. Part of the device layer:
only the device's modules import tpm2-pytss.
"""

from __future__ import annotations

from typing import Any

from tpm2_pytss.constants import (
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RH,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_KEYEDHASH_PARMS,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMS_SYMCIPHER_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_DECRYPT,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

A = TPMA_OBJECT
_KEY_BASE = A.FIXEDTPM | A.FIXEDPARENT | A.USERWITHAUTH
_SESSION_CIPHER = TPMT_SYM_DEF(
    algorithm=TPM2_ALG.AES,
    keyBits=TPMU_SYM_KEY_BITS(aes=128),
    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
)
_NO_SYM = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
_NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


def _ecc_area(attributes: int, curve: int, scheme: TPMT_ECC_SCHEME, sym: Any) -> TPMT_PUBLIC:
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attributes,
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=sym,
                scheme=scheme,
                curveID=curve,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )


def srk_template() -> TPM2B_PUBLIC:
    """The TCG Provisioning Guidance (v1.0 r1.0, 7.5.1) ECC P-256 storage root key template."""
    area = _ecc_area(
        A.FIXEDTPM
        | A.FIXEDPARENT
        | A.SENSITIVEDATAORIGIN
        | A.USERWITHAUTH
        | A.NODA
        | A.RESTRICTED
        | A.DECRYPT,
        TPM2_ECC.NIST_P256,
        TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
        TPMT_SYM_DEF_OBJECT(
            algorithm=TPM2_ALG.AES,
            keyBits=TPMU_SYM_KEY_BITS(aes=128),
            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        ),
    )
    area.unique = TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=b"\0" * 32, y=b"\0" * 32))
    return TPM2B_PUBLIC(publicArea=area)


def ak_template() -> TPM2B_PUBLIC:
    """Strongroom's attestation key: a restricted ECDSA P-256 signing primary (endorsement)."""
    area = _ecc_area(
        A.FIXEDTPM
        | A.FIXEDPARENT
        | A.SENSITIVEDATAORIGIN
        | A.USERWITHAUTH
        | A.NODA
        | A.RESTRICTED
        | A.SIGN_ENCRYPT,
        TPM2_ECC.NIST_P256,
        TPMT_ECC_SCHEME(
            scheme=TPM2_ALG.ECDSA,
            details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
        ),
        _NO_SYM,
    )
    area.unique = TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=b"\0" * 32, y=b"\0" * 32))
    return TPM2B_PUBLIC(publicArea=area)


def _key_attributes(sign: bool, decrypt: bool, pin: bool, generated: bool) -> int:
    attributes = _KEY_BASE
    if sign:
        attributes |= A.SIGN_ENCRYPT
    if decrypt:
        attributes |= A.DECRYPT
    if generated:
        attributes |= A.SENSITIVEDATAORIGIN
    if not pin:  # no auth value to guess: such keys keep working during a lockout
        attributes |= A.NODA
    return int(attributes)


def ecc_template(curve: int, sign: bool, decrypt: bool, pin: bool) -> TPM2B_PUBLIC:
    """An ECC key; scheme NULL so one key can do ECDSA (TPM2_Sign) and ECDH (TPM2_ECDH_ZGen)."""
    attributes = _key_attributes(sign, decrypt, pin, True)
    return TPM2B_PUBLIC(
        publicArea=_ecc_area(attributes, curve, TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), _NO_SYM)
    )


def rsa_template(bits: int, sign: bool, decrypt: bool, pin: bool) -> TPM2B_PUBLIC:
    """An RSA key (exponent 65537); scheme NULL: PKCS#1 v1.5, PSS and OAEP chosen per call."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_key_attributes(sign, decrypt, pin, True),
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=_NO_SYM,
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                    keyBits=bits,
                    exponent=0,
                )
            ),
        )
    )


def hmac_template(pin: bool, generated: bool) -> TPM2B_PUBLIC:
    """A keyed-hash object with the HMAC-SHA256 scheme."""
    public = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_key_attributes(True, False, pin, generated),
            parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS()),
        )
    )
    area = public.publicArea
    scheme = area.parameters.keyedHashDetail.scheme
    scheme.scheme = TPM2_ALG.HMAC
    scheme.details.hmac.hashAlg = TPM2_ALG.SHA256
    return public


def aes_template(pin: bool, generated: bool) -> TPM2B_PUBLIC:
    """An AES-256 symmetric key in CFB mode (TPM2_EncryptDecrypt2 both ways)."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.SYMCIPHER,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_key_attributes(True, True, pin, generated),
            parameters=TPMU_PUBLIC_PARMS(
                symDetail=TPMS_SYMCIPHER_PARMS(
                    sym=TPMT_SYM_DEF_OBJECT(
                        algorithm=TPM2_ALG.AES,
                        keyBits=TPMU_SYM_KEY_BITS(aes=256),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                    )
                )
            ),
        )
    )


def sealed_template(policy: bytes, pin: bool) -> TPM2B_PUBLIC:
    """A sealed data object: with a policy it needs the policy; without one, just its auth."""
    attributes = A.FIXEDTPM | A.FIXEDPARENT
    if not policy:
        attributes |= A.USERWITHAUTH
    if not pin:
        attributes |= A.NODA
    public = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=TPM2B_DIGEST(policy),
            parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS()),
        )
    )
    public.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return public


def sign_scheme(algorithm: str, hash_alg: str) -> TPMT_SIG_SCHEME:
    """A TPMT_SIG_SCHEME for "ecdsa", "rsassa" or "rsapss" with "sha256", "sha384" or
    "sha512" (and "sha1", for a DigestInfo a PKCS#11 client built)."""
    alg = {"ecdsa": TPM2_ALG.ECDSA, "rsassa": TPM2_ALG.RSASSA, "rsapss": TPM2_ALG.RSAPSS}[algorithm]
    hashed = {
        "sha1": TPM2_ALG.SHA1,
        "sha256": TPM2_ALG.SHA256,
        "sha384": TPM2_ALG.SHA384,
        "sha512": TPM2_ALG.SHA512,
    }[hash_alg]
    return TPMT_SIG_SCHEME(
        scheme=alg, details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=hashed))
    )


OAEP_SHA256 = TPMT_RSA_DECRYPT(
    scheme=TPM2_ALG.OAEP, details=TPMU_ASYM_SCHEME(oaep=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
)
CURVE_P256 = int(TPM2_ECC.NIST_P256)
CURVE_P384 = int(TPM2_ECC.NIST_P384)
