"""The operations fuzzed: well-formed KMIP requests (CreateKeyPair, Register of each object
type, Get in each format, Sign, MAC, the attribute operations, ReKey, RNGRetrieve) with
their items changed structurally (another type, another value, dropped, duplicated, an
unknown enumeration). Every answer must be a KMIP response whose failures are typed: never
the "internal error" a bug in an operation gives (Session._one catches it, but it must not
happen). In process, over a vault keystore, one Session for the whole run.

SR_FUZZ_EXAMPLES=20000 runs longer (as tests/test_fuzz.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kmip_support import CREATE_AES, attr, registered_key, request

import strongroom
from strongroom.kmip import ttlv
from strongroom.kmip.operations import Access, Session
from strongroom.kmip.store import ObjectStore
from strongroom.kmip.tags import (
    CertificateType,
    CryptographicAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    ObjectType,
    Operation,
    PaddingMethod,
    ResultStatus,
    Tag,
)
from strongroom.kmip.ttlv import Item, Type, structure

EXAMPLES = int(os.environ.get("SR_FUZZ_EXAMPLES", "500"))  # cheap: in process, no I/O wait
ENUM, INT, TEXT, BYTES = Type.ENUMERATION, Type.INTEGER, Type.TEXT_STRING, Type.BYTE_STRING
_EC = ec.generate_private_key(ec.SECP256R1())
_PKCS8 = _EC.private_bytes(
    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
_SPKI = _EC.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
UID = "kmip-00000000000000000000000000000001"  # the pair made before the run


def _uid(uid: str = UID) -> Item:
    return Item(Tag.UNIQUE_IDENTIFIER, TEXT, uid)


def _pair() -> list[Item]:
    return [
        structure(
            Tag.COMMON_TEMPLATE_ATTRIBUTE,
            attr("Cryptographic Algorithm", Item(0, ENUM, CryptographicAlgorithm.EC)),
            attr("Cryptographic Length", Item(0, INT, 256)),
            attr("Cryptographic Usage Mask", Item(0, INT, 3)),
        ),
        structure(Tag.PRIVATE_KEY_TEMPLATE_ATTRIBUTE, attr("x-a", Item(0, TEXT, "b"))),
        structure(Tag.PUBLIC_KEY_TEMPLATE_ATTRIBUTE),
    ]


SEEDS: list[tuple[Operation, list[Item]]] = [
    (Operation.CREATE_KEY_PAIR, _pair()),
    (Operation.CREATE, CREATE_AES),
    (
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.PRIVATE_KEY),
            registered_key(
                Tag.PRIVATE_KEY, KeyFormatType.PKCS_8, _PKCS8, CryptographicAlgorithm.ECDSA, 256
            ),
        ],
    ),
    (
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.PUBLIC_KEY),
            registered_key(
                Tag.PUBLIC_KEY, KeyFormatType.X_509, _SPKI, CryptographicAlgorithm.ECDSA, 256
            ),
        ],
    ),
    (
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.CERTIFICATE),
            structure(
                Tag.CERTIFICATE,
                Item(Tag.CERTIFICATE_TYPE, ENUM, CertificateType.X_509),
                Item(Tag.CERTIFICATE_VALUE, BYTES, _SPKI),
            ),
        ],
    ),
    (
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.SECRET_DATA),
            structure(
                Tag.SECRET_DATA,
                Item(Tag.SECRET_DATA_TYPE, ENUM, 1),
                structure(
                    Tag.KEY_BLOCK,
                    Item(Tag.KEY_FORMAT_TYPE, ENUM, KeyFormatType.OPAQUE),
                    structure(Tag.KEY_VALUE, Item(Tag.KEY_MATERIAL, BYTES, b"pw")),
                ),
            ),
        ],
    ),
    (
        Operation.REGISTER,
        [
            Item(Tag.OBJECT_TYPE, ENUM, ObjectType.OPAQUE_OBJECT),
            structure(
                Tag.OPAQUE_OBJECT,
                Item(Tag.OPAQUE_DATA_TYPE, ENUM, 0x80000000),
                Item(Tag.OPAQUE_DATA_VALUE, BYTES, b"blob"),
            ),
        ],
    ),
    (Operation.GET, [_uid(), Item(Tag.KEY_FORMAT_TYPE, ENUM, KeyFormatType.EC_PRIVATE_KEY)]),
    (
        Operation.SIGN,
        [
            _uid(),
            Item(Tag.DATA, BYTES, b"m"),
            structure(
                Tag.CRYPTOGRAPHIC_PARAMETERS,
                Item(Tag.HASHING_ALGORITHM, ENUM, HashingAlgorithm.SHA_256),
                Item(Tag.PADDING_METHOD, ENUM, PaddingMethod.NONE),
            ),
        ],
    ),
    (
        Operation.SIGNATURE_VERIFY,
        [_uid(), Item(Tag.DATA, BYTES, b"m"), Item(Tag.SIGNATURE_DATA, BYTES, b"\x30\x06")],
    ),
    (Operation.MAC, [_uid(), Item(Tag.DATA, BYTES, b"m")]),
    (Operation.ADD_ATTRIBUTE, [_uid(), attr("x-k", Item(0, TEXT, "v"))]),
    (
        Operation.MODIFY_ATTRIBUTE,
        [
            _uid(),
            structure(
                Tag.ATTRIBUTE,
                Item(Tag.ATTRIBUTE_NAME, TEXT, "x-a"),
                Item(Tag.ATTRIBUTE_INDEX, INT, 0),
                Item(Tag.ATTRIBUTE_VALUE, TEXT, "c"),
            ),
        ],
    ),
    (Operation.DELETE_ATTRIBUTE, [_uid(), Item(Tag.ATTRIBUTE_NAME, TEXT, "x-k")]),
    (Operation.REKEY_KEY_PAIR, [Item(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER, TEXT, UID)]),
    (Operation.RNG_RETRIEVE, [Item(Tag.DATA_LENGTH, INT, 8)]),
    (Operation.LOCATE, [attr("Cryptographic Algorithm", Item(0, ENUM, 6))]),
    (Operation.ENCRYPT, [_uid(), Item(Tag.DATA, BYTES, b"m")]),
]

_VALUES = st.one_of(
    st.integers(-(2**31), 2**31 - 1).map(lambda v: (INT, v)),
    st.integers(0, 2**32 - 1).map(lambda v: (ENUM, v)),
    st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 0x37, 0x80000000, 2**32 - 1]).map(lambda v: (ENUM, v)),
    st.text(max_size=8).map(lambda v: (TEXT, v)),
    st.binary(max_size=40).map(lambda v: (BYTES, v)),
    st.booleans().map(lambda v: (Type.BOOLEAN, v)),
    st.just((Type.DATE_TIME, datetime(2001, 1, 1, tzinfo=UTC))),
    st.just((Type.STRUCTURE, [])),
)


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    op, payload = draw(st.sampled_from(SEEDS))
    message = ttlv.decode(request((op, payload)))  # a fresh tree to change
    nodes: list[Item] = []

    def walk(item: Item) -> None:
        if item.type is Type.STRUCTURE:
            assert isinstance(item.value, list)
            for child in item.value:
                nodes.append(child)
                walk(child)

    payload_item = message.items[1].need(Tag.REQUEST_PAYLOAD)
    walk(payload_item)
    for _ in range(draw(st.integers(1, 3))):
        if not nodes:
            break
        target = draw(st.sampled_from(nodes))
        kind = draw(st.sampled_from(["value", "drop", "dup", "tag"]))
        parent = next(
            (n for n in [payload_item, *nodes] if n.type is Type.STRUCTURE and target in n.items),
            None,
        )
        if kind == "value":
            target.type, target.value = draw(_VALUES)
        elif kind == "tag":
            target.tag = draw(st.sampled_from([int(t) for t in Tag]))
        elif parent is not None and kind == "drop":
            parent.items.remove(target)
        elif parent is not None:
            parent.items.append(Item(target.tag, target.type, target.value))
    return ttlv.encode(message)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("kmip-fuzz")
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    ks = strongroom.open(write_vault_config(root))
    view = ks.in_namespace("acme")
    store = ObjectStore(Path(root) / "kmip.sqlite")
    access = Access("acme", "acme:fuzz", lambda _p, _u: True, lambda _p: True)
    s = Session(view, store, access, None, view.audited)
    made = s.handle(request((Operation.CREATE_KEY_PAIR, _pair())))
    private = ttlv.decode(made).items[1].need(Tag.RESPONSE_PAYLOAD)
    uid = private.text_of(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER)
    assert uid is not None
    for _op, seed in SEEDS:  # the seeds name the pair made here
        for item in seed:
            if item.tag in (Tag.UNIQUE_IDENTIFIER, Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER):
                item.value = uid
    yield s
    store.close()
    ks.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
@given(body=mutated_request())
def test_kmip_operations_answer_typed_errors(session: Session, body: bytes) -> None:
    answer = ttlv.decode(session.handle(body))
    assert answer.tag == Tag.RESPONSE_MESSAGE
    for item in answer.all(Tag.BATCH_ITEM):
        if item.int_of(Tag.RESULT_STATUS) != ResultStatus.SUCCESS:
            assert item.text_of(Tag.RESULT_MESSAGE) != "internal error", ttlv.decode(body)
