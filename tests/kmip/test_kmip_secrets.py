"""Secret Data and Opaque Objects over `strongroom serve --kmip`: each is a `secret` in the
vault (sealed like every key), Get needs `export`; raw TTLV for the edges and PyKMIP
0.11.0's client for MongoDB's flow (Register Secret Data, Activate, Get)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from kmip_support import (
    KmipService,
    attr,
    cli,
    exchange,
    ok,
    pykmip,
    request,
    results,
    start_kmip,
    tls,
)
from server_support import Pki, make_pki
from test_kmip_asymmetric import attributes, get, one, reason
from test_kmip_server import run_pykmip

from strongroom.kmip.tags import KeyFormatType, ObjectType, Operation, ResultReason, Tag
from strongroom.kmip.ttlv import Item, Type, structure

ENUM, BYTES, INT, TEXT = Type.ENUMERATION, Type.BYTE_STRING, Type.INTEGER, Type.TEXT_STRING
PASSWORD, OPAQUE_NONE = 0x01, 0x80000000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-secret-pki"))


@pytest.fixture(scope="module")
def kmip(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmipService]:
    svc = start_kmip(
        tmp_path_factory.mktemp("kmip-secret"), pki, "read,generate,export,manage,delete"
    )
    yield svc
    assert svc.stop() == 0


def secret_data(material: bytes, fmt: int = KeyFormatType.OPAQUE) -> list[Item]:
    return [
        Item(Tag.OBJECT_TYPE, ENUM, ObjectType.SECRET_DATA),
        structure(
            Tag.TEMPLATE_ATTRIBUTE,
            attr("Cryptographic Usage Mask", Item(0, INT, 0x02)),
            attr("Object Group", Item(0, TEXT, "passwords")),
        ),
        structure(
            Tag.SECRET_DATA,
            Item(Tag.SECRET_DATA_TYPE, ENUM, PASSWORD),
            structure(
                Tag.KEY_BLOCK,
                Item(Tag.KEY_FORMAT_TYPE, ENUM, fmt),
                structure(Tag.KEY_VALUE, Item(Tag.KEY_MATERIAL, BYTES, material)),
            ),
        ),
    ]


def opaque(value: bytes) -> list[Item]:
    return [
        Item(Tag.OBJECT_TYPE, ENUM, ObjectType.OPAQUE_OBJECT),
        structure(
            Tag.OPAQUE_OBJECT,
            Item(Tag.OPAQUE_DATA_TYPE, ENUM, OPAQUE_NONE),
            Item(Tag.OPAQUE_DATA_VALUE, BYTES, value),
        ),
    ]


def test_secret_data_and_opaque_objects_round_trip(kmip: KmipService, pki: Pki) -> None:
    """Up to 64 KiB each, the same bytes back, the usage mask kept as given; nothing of the
    secret in the data dir in clear; too large or empty is Invalid Field."""
    password = b"peek-a-boo!!" + os.urandom(8)
    blob = os.urandom(64 * 1024)
    uid = ok(one(kmip, pki, Operation.REGISTER, secret_data(password))).text_of(
        Tag.UNIQUE_IDENTIFIER
    )
    big = ok(one(kmip, pki, Operation.REGISTER, opaque(blob))).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid and big
    got = ok(get(kmip, pki, uid)).need(Tag.SECRET_DATA)
    assert got.int_of(Tag.SECRET_DATA_TYPE) == PASSWORD
    block = got.need(Tag.KEY_BLOCK)
    assert block.int_of(Tag.KEY_FORMAT_TYPE) == KeyFormatType.OPAQUE
    assert block.need(Tag.KEY_VALUE).bytes_of(Tag.KEY_MATERIAL) == password
    found = attributes(kmip, pki, uid)
    assert found["Object Type"][0].value == ObjectType.SECRET_DATA
    assert found["Cryptographic Usage Mask"][0].value == 0x02
    assert found["Object Group"][0].value == "passwords"
    assert "Cryptographic Algorithm" not in found
    got_opaque = ok(get(kmip, pki, big)).need(Tag.OPAQUE_OBJECT)
    assert got_opaque.int_of(Tag.OPAQUE_DATA_TYPE) == OPAQUE_NONE
    assert got_opaque.bytes_of(Tag.OPAQUE_DATA_VALUE) == blob
    for too in (opaque(blob + b"!"), opaque(b""), secret_data(b"")):
        assert reason(one(kmip, pki, Operation.REGISTER, too)) == ResultReason.INVALID_FIELD
    wrong_format = one(kmip, pki, Operation.REGISTER, secret_data(b"x", KeyFormatType.PKCS_8))
    assert reason(wrong_format) == ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED
    for path in (kmip.config.parent / "data").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert password not in data and blob[:32] not in data, path
    log = (kmip.config.parent / "data" / "audit.jsonl").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    mine = [(r["op"], r["actor"], r["result"]) for r in records if r.get("key") == f"acme/{uid}"]
    assert ("import", "acme:kmip", "ok") in mine and ("export", "acme:kmip", "ok") in mine


def test_secrets_need_export(kmip: KmipService, pki: Pki) -> None:
    uid = ok(one(kmip, pki, Operation.REGISTER, secret_data(b"only for export"))).text_of(
        Tag.UNIQUE_IDENTIFIER
    )
    assert uid
    cli(kmip.config, "tenant", "cert", "acme", "reader", "--cert", str(pki.stranger_cert))
    cli(kmip.config, "policy", "grant", "acme", "reader", "--keys", "*", "--permissions", "read")
    with tls(kmip, pki, pki.stranger_cert, pki.stranger_key) as conn:
        denied, listed = results(
            exchange(
                conn,
                request(
                    (Operation.GET, [Item(Tag.UNIQUE_IDENTIFIER, TEXT, uid)]),
                    (Operation.GET_ATTRIBUTES, [Item(Tag.UNIQUE_IDENTIFIER, TEXT, uid)]),
                ),
            )
        )
    assert reason(denied) == ResultReason.PERMISSION_DENIED
    ok(listed)


def test_mongodb_flow_secret_data_with_pykmip(kmip: KmipService, pki: Pki) -> None:
    """MongoDB's KMIP calls (its default mode): Register a 96-byte master key as Secret Data,
    Activate it, Get it back, then Revoke and Destroy."""
    out = run_pykmip(
        pykmip(),
        kmip,
        pki,
        """
import os
from kmip.pie import client, objects
from kmip.core import enums
master = os.urandom(96)
with client.ProxyKmipClient(config="strongroom") as c:
    uid = c.register(objects.SecretData(master, enums.SecretDataType.SEED, name="mongodb-cmk"))
    c.activate(uid)
    got = c.get(uid)
    assert isinstance(got, objects.SecretData) and got.value == master
    assert got.data_type == enums.SecretDataType.SEED
    c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
    c.destroy(uid)
print("done")
""",
    )
    assert out.strip() == "done"
