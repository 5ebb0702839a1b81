"""Key pairs, private and public keys, certificates, Sign/SignatureVerify, MAC/MACVerify and
RNGRetrieve over `strongroom serve --kmip`: raw TTLV for what we check byte by byte, and
PyKMIP 0.11.0's client for the flows real clients run (Veeam's RSA-2048 pair)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from conftest import STRONGROOM_BIN
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from kmip_support import (
    KmipService,
    attr,
    cli,
    exchange,
    ok,
    pykmip,
    registered_key,
    request,
    results,
    start_kmip,
    tls,
)
from server_support import Pki, make_pki, service_env
from test_kmip_server import run_pykmip

from strongroom.kmip.tags import (
    CertificateType,
    CryptographicAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    LinkType,
    ObjectType,
    Operation,
    PaddingMethod,
    ResultReason,
    State,
    Tag,
    UsageMask,
    ValidityIndicator,
)
from strongroom.kmip.ttlv import Item, Type, structure

ENUM, INT, TEXT, BYTES = Type.ENUMERATION, Type.INTEGER, Type.TEXT_STRING, Type.BYTE_STRING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-asym-pki"))


@pytest.fixture(scope="module")
def kmip(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmipService]:
    svc = start_kmip(
        tmp_path_factory.mktemp("kmip-asym"),
        pki,
        "read,generate,export,manage,delete,sign,verify,random,encrypt,decrypt",
    )
    yield svc
    assert svc.stop() == 0


def uid_item(uid: str, tag: int = Tag.UNIQUE_IDENTIFIER) -> Item:
    return Item(tag, TEXT, uid)


def one(kmip: KmipService, pki: Pki, op: Operation, payload: list[Item]) -> Item:
    """The one batch item of a one-operation request (success or not)."""
    with tls(kmip, pki) as conn:
        (item,) = results(exchange(conn, request((op, payload))))
    return item


def reason(item: Item) -> int | None:
    return item.int_of(Tag.RESULT_REASON)


def create_pair(
    kmip: KmipService,
    pki: Pki,
    algorithm: int,
    length: int,
    mask: int = UsageMask.SIGN | UsageMask.VERIFY,
) -> tuple[str, str]:
    out = ok(
        one(
            kmip,
            pki,
            Operation.CREATE_KEY_PAIR,
            [
                structure(
                    Tag.COMMON_TEMPLATE_ATTRIBUTE,
                    attr("Cryptographic Algorithm", Item(0, ENUM, algorithm)),
                    attr("Cryptographic Length", Item(0, INT, length)),
                ),
                structure(
                    Tag.PRIVATE_KEY_TEMPLATE_ATTRIBUTE,
                    attr("Cryptographic Usage Mask", Item(0, INT, mask & ~UsageMask.VERIFY)),
                    attr("x-owner", Item(0, TEXT, "private half")),
                ),
                structure(
                    Tag.PUBLIC_KEY_TEMPLATE_ATTRIBUTE,
                    attr("Cryptographic Usage Mask", Item(0, INT, mask & UsageMask.VERIFY)),
                ),
            ],
        )
    )
    private, public = (
        out.text_of(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER),
        out.text_of(Tag.PUBLIC_KEY_UNIQUE_IDENTIFIER),
    )
    assert private and public and private != public
    return private, public


def attributes(kmip: KmipService, pki: Pki, uid: str) -> dict[str, list[Item]]:
    out = ok(one(kmip, pki, Operation.GET_ATTRIBUTES, [uid_item(uid)]))
    found: dict[str, list[Item]] = {}
    for a in out.all(Tag.ATTRIBUTE):
        found.setdefault(a.text_of(Tag.ATTRIBUTE_NAME) or "", []).append(
            a.need(Tag.ATTRIBUTE_VALUE)
        )
    return found


def get(kmip: KmipService, pki: Pki, uid: str, fmt: int | None = None) -> Item:
    payload = [uid_item(uid)]
    if fmt is not None:
        payload.append(Item(Tag.KEY_FORMAT_TYPE, ENUM, fmt))
    return one(kmip, pki, Operation.GET, payload)


def key_block(item: Item, tag: int) -> tuple[int | None, bytes]:
    block = ok(item).need(tag).need(Tag.KEY_BLOCK)
    material = block.need(Tag.KEY_VALUE).bytes_of(Tag.KEY_MATERIAL)
    assert material is not None
    return block.int_of(Tag.KEY_FORMAT_TYPE), material


def activate(kmip: KmipService, pki: Pki, *uids: str) -> None:
    for uid in uids:
        ok(one(kmip, pki, Operation.ACTIVATE, [uid_item(uid)]))


def register_certificate(kmip: KmipService, pki: Pki, der: bytes) -> Item:
    """Register an X.509 certificate (its DER); the batch item, success or not."""
    return one(
        kmip,
        pki,
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.CERTIFICATE),
            structure(
                Tag.CERTIFICATE,
                Item(Tag.CERTIFICATE_TYPE, ENUM, CertificateType.X_509),
                Item(Tag.CERTIFICATE_VALUE, BYTES, der),
            ),
        ],
    )


def register_key(
    kmip: KmipService,
    pki: Pki,
    object_type: ObjectType,
    tag: int,
    fmt: int,
    material: bytes,
    algorithm: int,
    length: int,
    mask: int = 0,
) -> Item:
    template = (
        [structure(Tag.TEMPLATE_ATTRIBUTE, attr("Cryptographic Usage Mask", Item(0, INT, mask)))]
        if mask
        else []
    )
    return one(
        kmip,
        pki,
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, object_type),
            *template,
            registered_key(tag, fmt, material, algorithm, length),
        ],
    )


def test_create_key_pair_ec_links_both_halves(kmip: KmipService, pki: Pki) -> None:
    """An EC P-256 pair: linked both ways, the private key in PKCS#8 by default and in SEC1
    on request (not PKCS#1: that is RSA's), the public key in X.509, and the two match."""
    private, public = create_pair(kmip, pki, CryptographicAlgorithm.EC, 256)
    pa, ua = attributes(kmip, pki, private), attributes(kmip, pki, public)
    assert pa["Object Type"][0].value == ObjectType.PRIVATE_KEY
    assert ua["Object Type"][0].value == ObjectType.PUBLIC_KEY
    for found, link_type, other in (
        (pa, LinkType.PUBLIC_KEY_LINK, public),
        (ua, LinkType.PRIVATE_KEY_LINK, private),
    ):
        (link,) = found["Link"]
        assert link.int_of(Tag.LINK_TYPE) == link_type
        assert link.text_of(Tag.LINKED_OBJECT_IDENTIFIER) == other
        assert found["Cryptographic Algorithm"][0].value == CryptographicAlgorithm.ECDSA
        assert found["Cryptographic Length"][0].value == 256
    assert pa["x-owner"][0].value == "private half" and "x-owner" not in ua
    assert ua["Cryptographic Usage Mask"][0].value == UsageMask.VERIFY
    fmt, der = key_block(get(kmip, pki, private), Tag.PRIVATE_KEY)
    assert fmt == KeyFormatType.PKCS_8
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    fmt, spki = key_block(get(kmip, pki, public), Tag.PUBLIC_KEY)
    assert fmt == KeyFormatType.X_509
    assert spki == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _fmt, sec1 = key_block(get(kmip, pki, private, KeyFormatType.EC_PRIVATE_KEY), Tag.PRIVATE_KEY)
    assert sec1 == key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    refused = get(kmip, pki, private, KeyFormatType.PKCS_1)
    assert reason(refused) == ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED


def test_create_key_pair_rsa_3072_in_pkcs1(kmip: KmipService, pki: Pki) -> None:
    private, public = create_pair(
        kmip, pki, CryptographicAlgorithm.RSA, 3072, UsageMask.SIGN | UsageMask.DECRYPT
    )
    _fmt, der = key_block(get(kmip, pki, private, KeyFormatType.PKCS_1), Tag.PRIVATE_KEY)
    key = serialization.load_der_private_key(der, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert der.startswith(b"\x30\x82") and der[4:7] == b"\x02\x01\x00" and der[7] == 0x02
    _fmt, pkcs1 = key_block(get(kmip, pki, public, KeyFormatType.PKCS_1), Tag.PUBLIC_KEY)
    assert pkcs1 == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )


def test_create_key_pair_refuses_what_is_not_served(kmip: KmipService, pki: Pki) -> None:
    for algorithm, length in (
        (CryptographicAlgorithm.RSA, 1024),
        (CryptographicAlgorithm.EC, 521),
        (CryptographicAlgorithm.AES, 256),
    ):
        item = one(
            kmip,
            pki,
            Operation.CREATE_KEY_PAIR,
            [
                structure(
                    Tag.COMMON_TEMPLATE_ATTRIBUTE,
                    attr("Cryptographic Algorithm", Item(0, ENUM, algorithm)),
                    attr("Cryptographic Length", Item(0, INT, length)),
                )
            ],
        )
        assert reason(item) in (ResultReason.FEATURE_NOT_SUPPORTED, ResultReason.INVALID_FIELD)
        assert item.text_of(Tag.RESULT_MESSAGE)
    # a usage mask of the wrong type (found by tests/kmip/test_kmip_fuzz.py): refused before
    # any key is made, so no key is left behind without its object
    log = kmip.config.parent / "data" / "audit.jsonl"

    def generated() -> int:
        lines = log.read_text().splitlines()
        return sum(json.loads(line)["op"] == "generate" for line in lines if line.strip())

    before = generated()
    bad_mask = one(
        kmip,
        pki,
        Operation.CREATE_KEY_PAIR,
        [
            structure(
                Tag.COMMON_TEMPLATE_ATTRIBUTE,
                attr("Cryptographic Algorithm", Item(0, ENUM, CryptographicAlgorithm.EC)),
                attr("Cryptographic Length", Item(0, INT, 256)),
            ),
            structure(
                Tag.PUBLIC_KEY_TEMPLATE_ATTRIBUTE,
                attr("Cryptographic Usage Mask", Item(0, BYTES, b"\x02")),
            ),
        ],
    )
    assert reason(bad_mask) == ResultReason.INVALID_FIELD
    assert generated() == before


def test_register_private_keys_pkcs1_and_pkcs8(kmip: KmipService, pki: Pki) -> None:
    """A key registered in PKCS#1 comes back in the same bytes; asked for PKCS#8, it is
    the same key in PKCS#8. An EC P-384 key in PKCS#8 likewise. Wrong lengths are refused."""
    rsa_key = rsa.generate_private_key(65537, 2048)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    uid = ok(
        register_key(
            kmip,
            pki,
            ObjectType.PRIVATE_KEY,
            Tag.PRIVATE_KEY,
            KeyFormatType.PKCS_1,
            pkcs1,
            CryptographicAlgorithm.RSA,
            2048,
        )
    ).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid
    assert key_block(get(kmip, pki, uid), Tag.PRIVATE_KEY) == (KeyFormatType.PKCS_1, pkcs1)
    _fmt, pkcs8 = key_block(get(kmip, pki, uid, KeyFormatType.PKCS_8), Tag.PRIVATE_KEY)
    assert pkcs8 == rsa_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ec8 = ec_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_uid = ok(
        register_key(
            kmip,
            pki,
            ObjectType.PRIVATE_KEY,
            Tag.PRIVATE_KEY,
            KeyFormatType.PKCS_8,
            ec8,
            CryptographicAlgorithm.ECDSA,
            384,
        )
    ).text_of(Tag.UNIQUE_IDENTIFIER)
    assert ec_uid and key_block(get(kmip, pki, ec_uid), Tag.PRIVATE_KEY)[1] == ec8
    wrong = register_key(
        kmip,
        pki,
        ObjectType.PRIVATE_KEY,
        Tag.PRIVATE_KEY,
        KeyFormatType.PKCS_8,
        ec8,
        CryptographicAlgorithm.ECDSA,
        256,
    )
    assert reason(wrong) not in (None, ResultReason.GENERAL_FAILURE)
    garbage = register_key(
        kmip,
        pki,
        ObjectType.PRIVATE_KEY,
        Tag.PRIVATE_KEY,
        KeyFormatType.PKCS_8,
        b"\x04\x03abc",
        CryptographicAlgorithm.RSA,
        2048,
    )
    assert reason(garbage) == ResultReason.INVALID_FIELD


def self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmip test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_public_keys_and_certificates_are_read_not_exported(kmip: KmipService, pki: Pki) -> None:
    """An identity with `read` alone gets a public key and a certificate, not a private key;
    registering them is audited with the actor."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_uid = ok(
        register_key(
            kmip,
            pki,
            ObjectType.PUBLIC_KEY,
            Tag.PUBLIC_KEY,
            KeyFormatType.X_509,
            spki,
            CryptographicAlgorithm.ECDSA,
            256,
        )
    ).text_of(Tag.UNIQUE_IDENTIFIER)
    der = self_signed(key)
    cert_uid = ok(register_certificate(kmip, pki, der)).text_of(Tag.UNIQUE_IDENTIFIER)
    assert public_uid and cert_uid
    private_uid, _ = create_pair(kmip, pki, CryptographicAlgorithm.EC, 256)
    bad_cert = register_certificate(kmip, pki, der[:-5])
    assert reason(bad_cert) == ResultReason.INVALID_FIELD
    cli(kmip.config, "tenant", "cert", "acme", "reader", "--cert", str(pki.stranger_cert))
    cli(kmip.config, "policy", "grant", "acme", "reader", "--keys", "*", "--permissions", "read")
    with tls(kmip, pki, pki.stranger_cert, pki.stranger_key) as conn:
        answer = results(
            exchange(
                conn,
                request(
                    (Operation.GET, [uid_item(public_uid)]),
                    (Operation.GET, [uid_item(cert_uid)]),
                    (Operation.GET, [uid_item(private_uid)]),
                    (Operation.SIGN, [uid_item(private_uid), Item(Tag.DATA, BYTES, b"x")]),
                    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 16)]),
                ),
            )
        )
    assert key_block(answer[0], Tag.PUBLIC_KEY)[1] == spki
    cert = ok(answer[1]).need(Tag.CERTIFICATE)
    assert cert.bytes_of(Tag.CERTIFICATE_VALUE) == der
    assert [reason(i) for i in answer[2:]] == [ResultReason.PERMISSION_DENIED] * 3
    log = kmip.config.parent / "data" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    mine = [
        (r["op"], r["actor"], r["result"]) for r in records if r.get("key") == f"acme/{cert_uid}"
    ]
    assert ("kmip_register", "acme:kmip", "ok") in mine
    assert ("kmip_get", "acme:reader", "ok") in mine


def sign(
    kmip: KmipService, pki: Pki, uid: str, data: bytes, params: list[Item] | None = None
) -> Item:
    payload = [uid_item(uid), Item(Tag.DATA, BYTES, data)]
    if params is not None:
        payload.append(structure(Tag.CRYPTOGRAPHIC_PARAMETERS, *params))
    return one(kmip, pki, Operation.SIGN, payload)


def verify(
    kmip: KmipService, pki: Pki, uid: str, data: bytes, sig: bytes, params: list[Item] | None = None
) -> int | None:
    payload = [uid_item(uid), Item(Tag.DATA, BYTES, data), Item(Tag.SIGNATURE_DATA, BYTES, sig)]
    if params is not None:
        payload.append(structure(Tag.CRYPTOGRAPHIC_PARAMETERS, *params))
    return ok(one(kmip, pki, Operation.SIGNATURE_VERIFY, payload)).int_of(Tag.VALIDITY_INDICATOR)


def public_of(kmip: KmipService, pki: Pki, uid: str) -> object:
    return serialization.load_der_public_key(key_block(get(kmip, pki, uid), Tag.PUBLIC_KEY)[1])


def test_sign_and_verify_ecdsa_ed25519_rsa(kmip: KmipService, pki: Pki) -> None:
    """Signatures the server makes check with `cryptography` against the public key it gives;
    SignatureVerify with the public key object (checked here) and with the private key (the
    keystore's verify) says Valid, and Invalid for a changed message."""
    message = b"the quick brown fox"
    cases = [
        (
            CryptographicAlgorithm.EC,
            384,
            [Item(Tag.HASHING_ALGORITHM, ENUM, HashingAlgorithm.SHA_384)],
        ),
        (CryptographicAlgorithm.ED25519, 255, None),
        (
            CryptographicAlgorithm.RSA,
            2048,
            [
                Item(Tag.PADDING_METHOD, ENUM, PaddingMethod.PKCS1V15),
                Item(Tag.HASHING_ALGORITHM, ENUM, HashingAlgorithm.SHA_512),
            ],
        ),
    ]
    for algorithm, length, params in cases:
        private, public = create_pair(kmip, pki, algorithm, length)
        unactivated = sign(kmip, pki, private, message, params)
        assert reason(unactivated) == ResultReason.ILLEGAL_OPERATION
        activate(kmip, pki, private, public)
        signature = ok(sign(kmip, pki, private, message, params)).bytes_of(Tag.SIGNATURE_DATA)
        assert signature
        key = public_of(kmip, pki, public)
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA512())
        for uid in (public, private):
            assert verify(kmip, pki, uid, message, signature, params) == ValidityIndicator.VALID
            assert verify(kmip, pki, uid, message + b"!", signature, params) == (
                ValidityIndicator.INVALID
            )
    # a hash the key does not sign with: a typed refusal, not a signature with another hash
    private, public = create_pair(kmip, pki, CryptographicAlgorithm.ECDSA, 256)
    activate(kmip, pki, private)
    sha1 = [Item(Tag.HASHING_ALGORITHM, ENUM, HashingAlgorithm.SHA_1)]
    assert reason(sign(kmip, pki, private, message, sha1)) == ResultReason.FEATURE_NOT_SUPPORTED
    assert reason(sign(kmip, pki, public, message)) == ResultReason.INVALID_FIELD


def test_mac_and_mac_verify_with_hmac_sha256(kmip: KmipService, pki: Pki) -> None:
    secret = os.urandom(32)
    uid = ok(
        register_key(
            kmip,
            pki,
            ObjectType.SYMMETRIC_KEY,
            Tag.SYMMETRIC_KEY,
            KeyFormatType.RAW,
            secret,
            CryptographicAlgorithm.HMAC_SHA256,
            256,
            UsageMask.MAC_GENERATE | UsageMask.MAC_VERIFY,
        )
    ).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid
    mask = attributes(kmip, pki, uid)["Cryptographic Usage Mask"][0].value
    assert isinstance(mask, int) and mask & UsageMask.MAC_GENERATE and mask & UsageMask.MAC_VERIFY
    activate(kmip, pki, uid)
    data = b"message to authenticate"
    out = ok(one(kmip, pki, Operation.MAC, [uid_item(uid), Item(Tag.DATA, BYTES, data)]))
    tag = out.bytes_of(Tag.MAC_DATA)
    assert tag == hmac.new(secret, data, hashlib.sha256).digest()
    for mac, expected in ((tag, ValidityIndicator.VALID), (bytes(32), ValidityIndicator.INVALID)):
        answer = ok(
            one(
                kmip,
                pki,
                Operation.MAC_VERIFY,
                [uid_item(uid), Item(Tag.DATA, BYTES, data), Item(Tag.MAC_DATA, BYTES, mac)],
            )
        )
        assert answer.int_of(Tag.VALIDITY_INDICATOR) == expected
    aes = one(
        kmip,
        pki,
        Operation.CREATE,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.SYMMETRIC_KEY),
            structure(
                Tag.TEMPLATE_ATTRIBUTE,
                attr("Cryptographic Algorithm", Item(0, ENUM, CryptographicAlgorithm.AES)),
                attr("Cryptographic Length", Item(0, INT, 128)),
            ),
        ],
    )
    assert reason(aes) == ResultReason.FEATURE_NOT_SUPPORTED
    assert "AES-256" in (aes.text_of(Tag.RESULT_MESSAGE) or "")


def test_rng_retrieve(kmip: KmipService, pki: Pki) -> None:
    with tls(kmip, pki) as conn:
        a, b, zero, big = results(
            exchange(
                conn,
                request(
                    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 48)]),
                    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 48)]),
                    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 0)]),
                    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 1 << 20)]),
                ),
            )
        )
    first, second = ok(a).bytes_of(Tag.DATA), ok(b).bytes_of(Tag.DATA)
    assert first and second and len(first) == 48 and first != second
    assert reason(zero) == reason(big) == ResultReason.INVALID_FIELD


def test_veeam_flow_rsa_2048_pair_with_pykmip(kmip: KmipService, pki: Pki) -> None:
    """Veeam's calls through PyKMIP's client: CreateKeyPair RSA-2048, Get both halves,
    Activate, Sign (PKCS#1 v1.5, SHA-256) and SignatureVerify, then Revoke and Destroy."""
    out = run_pykmip(
        pykmip(),
        kmip,
        pki,
        """
from kmip.pie import client, objects
from kmip.core import enums
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
with client.ProxyKmipClient(config="strongroom") as c:
    public_uid, private_uid = c.create_key_pair(
        enums.CryptographicAlgorithm.RSA, 2048, private_name="veeam-backup-key",
        public_usage_mask=[enums.CryptographicUsageMask.VERIFY],
        private_usage_mask=[enums.CryptographicUsageMask.SIGN])
    public = c.get(public_uid)
    private = c.get(private_uid)
    assert isinstance(public, objects.PublicKey) and isinstance(private, objects.PrivateKey)
    assert public.cryptographic_length == private.cryptographic_length == 2048
    c.activate(private_uid)
    c.activate(public_uid)
    params = {"padding_method": enums.PaddingMethod.PKCS1v15,
              "cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
              "hashing_algorithm": enums.HashingAlgorithm.SHA_256}
    sig = c.sign(b"backup chain 42", uid=private_uid, cryptographic_parameters=params)
    key = serialization.load_der_public_key(public.value)
    key.verify(sig, b"backup chain 42", padding.PKCS1v15(), hashes.SHA256())
    assert c.signature_verify(b"backup chain 42", sig, uid=public_uid,
        cryptographic_parameters=params) == enums.ValidityIndicator.VALID
    assert c.signature_verify(b"backup chain 43", sig, uid=public_uid,
        cryptographic_parameters=params) == enums.ValidityIndicator.INVALID
    for uid in (public_uid, private_uid):
        c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        c.destroy(uid)
print("done")
""",
    )
    assert out.strip() == "done"


def test_destroyed_pair_halves_are_gone(kmip: KmipService, pki: Pki) -> None:
    private, public = create_pair(kmip, pki, CryptographicAlgorithm.ECDSA, 256)
    assert attributes(kmip, pki, private)["State"][0].value == State.PRE_ACTIVE
    for uid in (private, public):
        ok(one(kmip, pki, Operation.DESTROY, [uid_item(uid)]))
        assert reason(get(kmip, pki, uid)) == ResultReason.ITEM_NOT_FOUND


def test_rsa_oaep_encrypt_decrypt(kmip: KmipService, pki: Pki) -> None:
    """RSA-OAEP: Encrypt to the public key object (here) or the private key (the keystore),
    with SHA-256 by default or SHA-1; Decrypt with the private key; what `cryptography`
    encrypts to the public key decrypts; a changed ciphertext is one Cryptographic Failure."""
    private, public = create_pair(
        kmip, pki, CryptographicAlgorithm.RSA, 2048, UsageMask.ENCRYPT | UsageMask.DECRYPT
    )
    activate(kmip, pki, private, public)
    key = public_of(kmip, pki, public)
    assert isinstance(key, rsa.RSAPublicKey)
    sha1 = [
        Item(Tag.PADDING_METHOD, ENUM, PaddingMethod.OAEP),
        Item(Tag.HASHING_ALGORITHM, ENUM, HashingAlgorithm.SHA_1),
    ]

    def run(op: Operation, uid: str, data: bytes, params: list[Item] | None = None) -> Item:
        payload = [uid_item(uid), Item(Tag.DATA, BYTES, data)]
        if params is not None:
            payload.append(structure(Tag.CRYPTOGRAPHIC_PARAMETERS, *params))
        return one(kmip, pki, op, payload)

    for uid in (public, private):
        for params in (None, sha1):
            ct = ok(run(Operation.ENCRYPT, uid, b"data key 32 bytes long, exactly!", params))
            body = ct.bytes_of(Tag.DATA)
            assert body and len(body) == 256
            plain = ok(run(Operation.DECRYPT, private, body, params)).bytes_of(Tag.DATA)
            assert plain == b"data key 32 bytes long, exactly!"
    theirs = key.encrypt(
        b"from outside",
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    assert ok(run(Operation.DECRYPT, private, theirs)).bytes_of(Tag.DATA) == b"from outside"
    broken = bytes([theirs[0] ^ 1]) + theirs[1:]
    assert reason(run(Operation.DECRYPT, private, broken)) == ResultReason.CRYPTOGRAPHIC_FAILURE
    pkcs1 = [Item(Tag.PADDING_METHOD, ENUM, PaddingMethod.PKCS1V15)]
    assert reason(run(Operation.ENCRYPT, public, b"x", pkcs1)) == (
        ResultReason.FEATURE_NOT_SUPPORTED
    )
    assert reason(run(Operation.DECRYPT, public, theirs)) == ResultReason.INVALID_FIELD


def test_a_certificate_is_kept_with_its_private_key(kmip: KmipService, pki: Pki) -> None:
    """A registered certificate over a pair's public key is kept with the private key in the
    keystore (`set_certificate`: `strongroom key cert show` has it) and linked both ways with
    the public key object; one over no key of the tenant is only an object."""
    private, public = create_pair(kmip, pki, CryptographicAlgorithm.EC, 256)
    server_public = public_of(kmip, pki, public)
    assert isinstance(server_public, ec.EllipticCurvePublicKey)
    ca = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)

    def issued(common_name: str, serial: int) -> bytes:
        """A certificate from the test CA over the server-made public key."""
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
            .public_key(server_public)
            .serial_number(serial)
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .sign(ca, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )

    der = issued("db.example", 9)

    def register(value: bytes) -> str:
        uid = ok(register_certificate(kmip, pki, value)).text_of(Tag.UNIQUE_IDENTIFIER)
        assert uid
        return uid

    cert_uid = register(der)
    (link,) = attributes(kmip, pki, cert_uid)["Link"]
    assert link.int_of(Tag.LINK_TYPE) == LinkType.PUBLIC_KEY_LINK
    assert link.text_of(Tag.LINKED_OBJECT_IDENTIFIER) == public
    public_links = {
        (i.int_of(Tag.LINK_TYPE), i.text_of(Tag.LINKED_OBJECT_IDENTIFIER))
        for i in attributes(kmip, pki, public)["Link"]
    }
    assert (LinkType.CERTIFICATE_LINK, cert_uid) in public_links
    tenant_view = kmip.config.parent / "acme.toml"
    tenant_view.write_text(
        kmip.config.read_text().replace("[keystore]\n", '[keystore]\nnamespace = "acme"\n', 1)
    )
    shown = subprocess.run(
        [str(STRONGROOM_BIN), "--config", str(tenant_view), "key", "cert", "show", private],
        env=service_env(),
        capture_output=True,
        check=True,
    ).stdout
    assert x509.load_pem_x509_certificate(shown).public_bytes(serialization.Encoding.DER) == der
    log = kmip.config.parent / "data" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(
        r["op"] == "certificate_set" and r["actor"] == "acme:kmip" and r["result"] == "ok"
        for r in records
        if r.get("key") == f"acme/{private}"
    )
    lone = register(self_signed(ec.generate_private_key(ec.SECP256R1())))
    assert "Link" not in attributes(kmip, pki, lone)
    # another certificate over the same key is an object of its own: the key's chain stays
    other = issued("other.example", 10)
    register(other)
    shown = subprocess.run(
        [str(STRONGROOM_BIN), "--config", str(tenant_view), "key", "cert", "show", private],
        env=service_env(),
        capture_output=True,
        check=True,
    ).stdout
    assert x509.load_pem_x509_certificate(shown).public_bytes(serialization.Encoding.DER) == der
