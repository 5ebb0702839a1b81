"""KMIP keys in a SoftHSM2 token and in swtpm (`[kmip] backend`), through
`strongroom serve --kmip`: CreateKeyPair, Sign checked with `cryptography` and
SignatureVerify, and for the token AES-256 Create with Encrypt/Decrypt (GCM, CBC-PAD). The
audit log says which backend made each key."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kmip_support import (
    CREATE_AES,
    KmipService,
    attr,
    cli,
    exchange,
    ok,
    request,
    results,
    run_kmip,
)
from kmip_support import tls as kmip_tls
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm  # noqa: F401 - the session's token fixture
from pkcs11_support import write_config as write_hsm_config
from server_support import Pki, make_pki
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import TEST_PIN, Swtpm, swtpm  # noqa: F401 - the session's swtpm fixture
from tpm_support import VAULT_PASS as TPM_VAULT_PASS
from tpm_support import VAULT_PASS_ENV as TPM_VAULT_PASS_ENV
from tpm_support import write_config as write_tpm_config

from strongroom.kmip.tags import (
    BlockCipherMode,
    CryptographicAlgorithm,
    Operation,
    PaddingMethod,
    ResultReason,
    Tag,
    UsageMask,
    ValidityIndicator,
)
from strongroom.kmip.ttlv import Item, Type, structure

BYTES, ENUM, INT, TEXT = Type.BYTE_STRING, Type.ENUMERATION, Type.INTEGER, Type.TEXT_STRING


def _serve(directory: Path, config: Path, pki: Pki, backend: str) -> KmipService:
    with config.open("a", encoding="utf-8") as f:
        f.write(
            "\n[server]\n"
            f'socket = "{directory / "serve.sock"}"\n'
            'listen = "127.0.0.1:0"\n'
            'kmip_listen = "127.0.0.1:0"\n'
            f'tls_cert = "{pki.server_cert}"\n'
            f'tls_key = "{pki.server_key}"\n'
            f'tls_client_ca = "{pki.ca}"\n'
            f'\n[kmip]\nbackend = "{backend}"\n'
        )
    cli(config, "tenant", "create", "acme")
    cli(config, "tenant", "cert", "acme", "kmip", "--cert", str(pki.client_cert))
    cli(
        config,
        "policy",
        "grant",
        "acme",
        "kmip",
        "--keys",
        "*",
        "--permissions",
        "read,generate,manage,delete,sign,verify,encrypt,decrypt",
    )
    return run_kmip(config)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-backends-pki"))


@pytest.fixture(scope="module")
def in_hsm(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    softhsm: SoftHsm,  # noqa: F811
) -> Iterator[KmipService]:
    directory = tmp_path_factory.mktemp("kmip-hsm")
    os.environ[HSM_PIN_ENV] = softhsm.pin  # for the CLI and `serve` (service_env copies it)
    svc = _serve(directory, write_hsm_config(directory, softhsm), pki, "hsm")
    yield svc
    assert svc.stop() == 0


@pytest.fixture(scope="module")
def in_tpm(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    swtpm: Swtpm,  # noqa: F811
) -> Iterator[KmipService]:
    directory = tmp_path_factory.mktemp("kmip-tpm")
    os.environ[TPM_PIN_ENV] = TEST_PIN
    os.environ[TPM_VAULT_PASS_ENV] = TPM_VAULT_PASS
    svc = _serve(directory, write_tpm_config(directory, swtpm.tcti), pki, "tpm")
    yield svc
    assert svc.stop() == 0


def _one(kmip: KmipService, pki: Pki, op: Operation, payload: list[Item]) -> Item:
    with kmip_tls(kmip, pki) as conn:
        (item,) = results(exchange(conn, request((op, payload))))
    return ok(item)


def _uid(uid: str) -> Item:
    return Item(Tag.UNIQUE_IDENTIFIER, TEXT, uid)


def _backend_of(kmip: KmipService, uid: str) -> set[str | None]:
    log = kmip.config.parent / "data" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {
        r["backend"]
        for r in records
        if r.get("key") == f"acme/{uid}" and r["op"] == "generate" and r["result"] == "ok"
    }


def _ec_pair_signs(kmip: KmipService, pki: Pki, backend: str) -> None:
    out = _one(
        kmip,
        pki,
        Operation.CREATE_KEY_PAIR,
        [
            structure(
                Tag.COMMON_TEMPLATE_ATTRIBUTE,
                attr("Cryptographic Algorithm", Item(0, ENUM, CryptographicAlgorithm.ECDSA)),
                attr("Cryptographic Length", Item(0, INT, 256)),
                attr("Cryptographic Usage Mask", Item(0, INT, UsageMask.SIGN | UsageMask.VERIFY)),
            )
        ],
    )
    private = out.text_of(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER)
    public = out.text_of(Tag.PUBLIC_KEY_UNIQUE_IDENTIFIER)
    assert private and public
    assert _backend_of(kmip, private) == {backend}
    for uid in (private, public):
        _one(kmip, pki, Operation.ACTIVATE, [_uid(uid)])
    message = b"signed inside the device"
    signature = _one(
        kmip, pki, Operation.SIGN, [_uid(private), Item(Tag.DATA, BYTES, message)]
    ).bytes_of(Tag.SIGNATURE_DATA)
    assert signature
    block = _one(kmip, pki, Operation.GET, [_uid(public)]).need(Tag.PUBLIC_KEY).need(Tag.KEY_BLOCK)
    spki = block.need(Tag.KEY_VALUE).bytes_of(Tag.KEY_MATERIAL)
    assert spki
    key = serialization.load_der_public_key(spki)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    for uid in (public, private):
        verdict = _one(
            kmip,
            pki,
            Operation.SIGNATURE_VERIFY,
            [
                _uid(uid),
                Item(Tag.DATA, BYTES, message),
                Item(Tag.SIGNATURE_DATA, BYTES, signature),
            ],
        ).int_of(Tag.VALIDITY_INDICATOR)
        assert verdict == ValidityIndicator.VALID


def test_an_ec_pair_in_softhsm2(in_hsm: KmipService, pki: Pki) -> None:
    _ec_pair_signs(in_hsm, pki, "hsm")


def test_aes_in_softhsm2_gcm_and_cbc(in_hsm: KmipService, pki: Pki) -> None:
    uid = _one(in_hsm, pki, Operation.CREATE, CREATE_AES).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid and _backend_of(in_hsm, uid) == {"hsm"}
    _one(in_hsm, pki, Operation.ACTIVATE, [_uid(uid)])
    data = b"a data key of some length" * 3
    gcm = _one(in_hsm, pki, Operation.ENCRYPT, [_uid(uid), Item(Tag.DATA, BYTES, data)])
    back = _one(
        in_hsm,
        pki,
        Operation.DECRYPT,
        [
            _uid(uid),
            Item(Tag.DATA, BYTES, gcm.bytes_of(Tag.DATA) or b""),
            Item(Tag.IV_COUNTER_NONCE, BYTES, gcm.bytes_of(Tag.IV_COUNTER_NONCE) or b""),
            Item(
                Tag.AUTHENTICATED_ENCRYPTION_TAG,
                BYTES,
                gcm.bytes_of(Tag.AUTHENTICATED_ENCRYPTION_TAG) or b"",
            ),
        ],
    )
    assert back.bytes_of(Tag.DATA) == data
    cbc = structure(
        Tag.CRYPTOGRAPHIC_PARAMETERS,
        Item(Tag.BLOCK_CIPHER_MODE, ENUM, BlockCipherMode.CBC),
        Item(Tag.PADDING_METHOD, ENUM, PaddingMethod.PKCS5),
    )
    enc = _one(in_hsm, pki, Operation.ENCRYPT, [_uid(uid), cbc, Item(Tag.DATA, BYTES, data)])
    ct = enc.bytes_of(Tag.DATA)
    assert ct and len(ct) == 80
    dec = _one(
        in_hsm,
        pki,
        Operation.DECRYPT,
        [
            _uid(uid),
            cbc,
            Item(Tag.DATA, BYTES, ct),
            Item(Tag.IV_COUNTER_NONCE, BYTES, enc.bytes_of(Tag.IV_COUNTER_NONCE) or b""),
        ],
    )
    assert dec.bytes_of(Tag.DATA) == data


def test_an_ec_pair_in_swtpm(in_tpm: KmipService, pki: Pki) -> None:
    _ec_pair_signs(in_tpm, pki, "tpm")


def test_aes_in_swtpm_is_not_passed_off_as_gcm(in_tpm: KmipService, pki: Pki) -> None:
    """A TPM's aes-256 is CFB with an HMAC: KMIP refuses GCM with it rather than answer in
    GCM's fields."""
    uid = _one(in_tpm, pki, Operation.CREATE, CREATE_AES).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid and _backend_of(in_tpm, uid) == {"tpm"}
    _one(in_tpm, pki, Operation.ACTIVATE, [_uid(uid)])
    with kmip_tls(in_tpm, pki) as conn:
        (item,) = results(
            exchange(conn, request((Operation.ENCRYPT, [_uid(uid), Item(Tag.DATA, BYTES, b"x")])))
        )
    assert item.int_of(Tag.RESULT_REASON) == ResultReason.FEATURE_NOT_SUPPORTED
    assert "TPM" in (item.text_of(Tag.RESULT_MESSAGE) or "")
