"""AddAttribute, ModifyAttribute, DeleteAttribute (KMIP 1.x), ReKey and ReKeyKeyPair over
`strongroom serve --kmip`: raw TTLV (VMware's batch, then its `x-` attributes) and PyKMIP
0.11.0's client (ModifyAttribute, DeleteAttribute, ReKey)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kmip_support import (
    CREATE_AES,
    KmipService,
    attr,
    exchange,
    ok,
    pykmip,
    request,
    results,
    start_kmip,
    tls,
)
from server_support import Pki, make_pki
from test_kmip_asymmetric import activate, attributes, create_pair, get, key_block, one, reason
from test_kmip_server import run_pykmip

from strongroom.kmip.tags import (
    CryptographicAlgorithm,
    LinkType,
    NameType,
    ObjectType,
    Operation,
    QueryFunction,
    ResultReason,
    State,
    Tag,
)
from strongroom.kmip.ttlv import Item, Type, structure

TEXT, INT, ENUM = Type.TEXT_STRING, Type.INTEGER, Type.ENUMERATION


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-attr-pki"))


@pytest.fixture(scope="module")
def kmip(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmipService]:
    svc = start_kmip(
        tmp_path_factory.mktemp("kmip-attr"),
        pki,
        "read,generate,export,manage,delete,encrypt,decrypt,sign,verify",
    )
    yield svc
    assert svc.stop() == 0


def uid_item(uid: str) -> Item:
    return Item(Tag.UNIQUE_IDENTIFIER, TEXT, uid)


def name_value(text: str) -> Item:
    return structure(
        0,
        Item(Tag.NAME_VALUE, TEXT, text),
        Item(Tag.NAME_TYPE, ENUM, NameType.UNINTERPRETED_TEXT_STRING),
    )


def indexed(name: str, value: Item, index: int) -> Item:
    a = attr(name, value)
    assert isinstance(a.value, list)
    a.value.insert(1, Item(Tag.ATTRIBUTE_INDEX, INT, index))
    return a


def create_aes(kmip: KmipService, pki: Pki) -> str:
    uid = ok(one(kmip, pki, Operation.CREATE, CREATE_AES)).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid
    return uid


def test_vmware_batch_then_custom_attributes(kmip: KmipService, pki: Pki) -> None:
    """VMware's calls: one batch of DiscoverVersions, Query and Create; then GetAttributes
    and AddAttribute with `x-` attributes, which come back with their indices."""
    with tls(kmip, pki) as conn:
        versions, query, created = results(
            exchange(
                conn,
                request(
                    (Operation.DISCOVER_VERSIONS, []),
                    (
                        Operation.QUERY,
                        [
                            Item(Tag.QUERY_FUNCTION, ENUM, QueryFunction.OPERATIONS),
                            Item(Tag.QUERY_FUNCTION, ENUM, QueryFunction.OBJECTS),
                        ],
                    ),
                    (Operation.CREATE, CREATE_AES),
                ),
            )
        )
        ops = {i.value for i in ok(query).all(Tag.OPERATION)}
        assert {Operation.ADD_ATTRIBUTE, Operation.REKEY, Operation.SIGN} <= ops
        assert ok(versions).find(Tag.PROTOCOL_VERSION) is not None
        uid = ok(created).text_of(Tag.UNIQUE_IDENTIFIER)
        assert uid
        uid_i = uid_item(uid)
        answers = results(
            exchange(
                conn,
                request(
                    (
                        Operation.ADD_ATTRIBUTE,
                        [uid_i, attr("x-Vendor-KeyId", Item(0, TEXT, "vm-disk-1"))],
                    ),
                    (
                        Operation.ADD_ATTRIBUTE,
                        [uid_i, attr("x-Vendor-KeyId", Item(0, TEXT, "vm-disk-2"))],
                    ),
                    (
                        Operation.GET_ATTRIBUTES,
                        [uid_i, Item(Tag.ATTRIBUTE_NAME, TEXT, "x-Vendor-KeyId")],
                    ),
                ),
            )
        )
    first, second, got = (ok(a) for a in answers)
    assert first.need(Tag.ATTRIBUTE).int_of(Tag.ATTRIBUTE_INDEX) == 0
    assert second.need(Tag.ATTRIBUTE).int_of(Tag.ATTRIBUTE_INDEX) == 1
    values = [
        (a.int_of(Tag.ATTRIBUTE_INDEX), a.need(Tag.ATTRIBUTE_VALUE).value)
        for a in got.all(Tag.ATTRIBUTE)
    ]
    assert values == [(0, "vm-disk-1"), (1, "vm-disk-2")]


def test_attribute_changes_are_typed_and_audited(kmip: KmipService, pki: Pki) -> None:
    uid = create_aes(kmip, pki)
    u = uid_item(uid)
    added = one(kmip, pki, Operation.ADD_ATTRIBUTE, [u, attr("Name", name_value("first"))])
    assert ok(added).need(Tag.ATTRIBUTE).int_of(Tag.ATTRIBUTE_INDEX) == 0
    modified = ok(
        one(kmip, pki, Operation.MODIFY_ATTRIBUTE, [u, indexed("Name", name_value("renamed"), 0)])
    )
    assert modified.need(Tag.ATTRIBUTE).need(Tag.ATTRIBUTE_VALUE).text_of(Tag.NAME_VALUE) == (
        "renamed"
    )
    found = ok(
        one(
            kmip,
            pki,
            Operation.LOCATE,
            [attr("Name", name_value("renamed"))],
        )
    )
    assert [i.value for i in found.all(Tag.UNIQUE_IDENTIFIER)] == [uid]
    refused = {
        "a server attribute": one(
            kmip,
            pki,
            Operation.ADD_ATTRIBUTE,
            [u, attr("Cryptographic Length", Item(0, INT, 128))],
        ),
        "an index out of bounds": one(
            kmip, pki, Operation.MODIFY_ATTRIBUTE, [u, indexed("Name", name_value("x"), 3)]
        ),
        "an absent attribute": one(
            kmip,
            pki,
            Operation.DELETE_ATTRIBUTE,
            [u, Item(Tag.ATTRIBUTE_NAME, TEXT, "Object Group")],
        ),
        "an undeletable attribute": one(
            kmip, pki, Operation.DELETE_ATTRIBUTE, [u, Item(Tag.ATTRIBUTE_NAME, TEXT, "State")]
        ),
        "an index on AddAttribute": one(
            kmip, pki, Operation.ADD_ATTRIBUTE, [u, indexed("Name", name_value("y"), 0)]
        ),
    }
    assert {k: reason(v) for k, v in refused.items()} == {
        "a server attribute": ResultReason.INVALID_FIELD,
        "an index out of bounds": ResultReason.INDEX_OUT_OF_BOUNDS,
        "an absent attribute": ResultReason.ITEM_NOT_FOUND,
        "an undeletable attribute": ResultReason.INVALID_FIELD,
        "an index on AddAttribute": ResultReason.INVALID_FIELD,
    }
    deleted = ok(
        one(kmip, pki, Operation.DELETE_ATTRIBUTE, [u, Item(Tag.ATTRIBUTE_NAME, TEXT, "Name")])
    )
    assert deleted.need(Tag.ATTRIBUTE).need(Tag.ATTRIBUTE_VALUE).text_of(Tag.NAME_VALUE) == (
        "renamed"
    )
    assert "Name" not in attributes(kmip, pki, uid)
    log = kmip.config.parent / "data" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    mine = [
        (r["op"], r["actor"], r.get("attribute")) for r in records if r.get("key") == f"acme/{uid}"
    ]
    assert ("kmip_add_attribute", "acme:kmip", "Name") in mine
    assert ("kmip_modify_attribute", "acme:kmip", "Name") in mine
    assert ("kmip_delete_attribute", "acme:kmip", "Name") in mine


def links(found: dict[str, list[Item]]) -> dict[int | None, str | None]:
    return {
        link.int_of(Tag.LINK_TYPE): link.text_of(Tag.LINKED_OBJECT_IDENTIFIER)
        for link in found.get("Link", [])
    }


def test_rekey_makes_a_linked_successor(kmip: KmipService, pki: Pki) -> None:
    """ReKey of an Active AES key: a new key, Active, with the old one's name and group; the
    two link to each other; both decrypt what each encrypted (different keys)."""
    uid = create_aes(kmip, pki)
    u = uid_item(uid)
    ok(one(kmip, pki, Operation.ADD_ATTRIBUTE, [u, attr("Name", name_value("tde-master"))]))
    ok(one(kmip, pki, Operation.ADD_ATTRIBUTE, [u, attr("Object Group", Item(0, TEXT, "tde"))]))
    activate(kmip, pki, uid)
    new = ok(one(kmip, pki, Operation.REKEY, [u])).text_of(Tag.UNIQUE_IDENTIFIER)
    assert new and new != uid
    old_a, new_a = attributes(kmip, pki, uid), attributes(kmip, pki, new)
    assert links(old_a) == {LinkType.REPLACEMENT_OBJECT_LINK: new}
    assert links(new_a) == {LinkType.REPLACED_OBJECT_LINK: uid}
    assert "Name" not in old_a and new_a["Name"][0].text_of(Tag.NAME_VALUE) == "tde-master"
    assert new_a["Object Group"][0].value == "tde" and old_a["Object Group"][0].value == "tde"
    assert new_a["State"][0].value == State.ACTIVE
    old_key = key_block(get(kmip, pki, uid), Tag.SYMMETRIC_KEY)[1]
    new_key = key_block(get(kmip, pki, new), Tag.SYMMETRIC_KEY)[1]
    assert len(new_key) == 32 and new_key != old_key
    later = ok(
        one(kmip, pki, Operation.REKEY, [uid_item(new), Item(Tag.OFFSET, Type.INTERVAL, 3600)])
    ).text_of(Tag.UNIQUE_IDENTIFIER)
    assert later
    assert attributes(kmip, pki, later)["State"][0].value == State.PRE_ACTIVE
    refused = one(
        kmip,
        pki,
        Operation.REKEY,
        [
            uid_item(later),
            structure(
                Tag.TEMPLATE_ATTRIBUTE,
                attr("Cryptographic Length", Item(0, INT, 128)),
            ),
        ],
    )
    assert reason(refused) == ResultReason.INVALID_FIELD


def test_rekey_key_pair(kmip: KmipService, pki: Pki) -> None:
    private, public = create_pair(kmip, pki, CryptographicAlgorithm.ECDSA, 256)
    answer = ok(
        one(
            kmip,
            pki,
            Operation.REKEY_KEY_PAIR,
            [Item(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER, TEXT, private)],
        )
    )
    new_private = answer.text_of(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER)
    new_public = answer.text_of(Tag.PUBLIC_KEY_UNIQUE_IDENTIFIER)
    assert new_private and new_public
    assert links(attributes(kmip, pki, new_private)) == {
        LinkType.REPLACED_OBJECT_LINK: private,
        LinkType.PUBLIC_KEY_LINK: new_public,
    }
    assert links(attributes(kmip, pki, new_public)) == {
        LinkType.REPLACED_OBJECT_LINK: public,
        LinkType.PRIVATE_KEY_LINK: new_private,
    }
    assert links(attributes(kmip, pki, public))[LinkType.REPLACEMENT_OBJECT_LINK] == new_public
    new_spki = key_block(get(kmip, pki, new_public), Tag.PUBLIC_KEY)[1]
    assert new_spki != key_block(get(kmip, pki, public), Tag.PUBLIC_KEY)[1]
    aes = create_aes(kmip, pki)
    refused = one(
        kmip, pki, Operation.REKEY_KEY_PAIR, [Item(Tag.PRIVATE_KEY_UNIQUE_IDENTIFIER, TEXT, aes)]
    )
    assert reason(refused) == ResultReason.INVALID_FIELD
    assert attributes(kmip, pki, aes)["Object Type"][0].value == ObjectType.SYMMETRIC_KEY


def test_modify_delete_and_rekey_with_pykmip(kmip: KmipService, pki: Pki) -> None:
    """PyKMIP's client: ModifyAttribute and DeleteAttribute of a Name (as its own integration
    test does, on an AES-256 key), then ReKey."""
    out = run_pykmip(
        pykmip(),
        kmip,
        pki,
        """
from kmip.pie import client
from kmip.core import enums
from kmip.core.factories import attributes
f = attributes.AttributeFactory()
with client.ProxyKmipClient(config="strongroom") as c:
    uid = c.create(enums.CryptographicAlgorithm.AES, 256, name="mysql-master-key")
    got = c.get_attributes(uid, ["Name"])[1]
    assert got[0].attribute_index.value == 0
    assert got[0].attribute_value.name_value.value == "mysql-master-key"
    same, changed = c.modify_attribute(
        unique_identifier=uid,
        attribute=f.create_attribute(enums.AttributeType.NAME, "New Name", index=0))
    assert same == uid and changed.attribute_value.name_value.value == "New Name"
    assert c.get_attributes(uid, ["Name"])[1][0].attribute_value.name_value.value == "New Name"
    same, gone = c.delete_attribute(unique_identifier=uid, attribute_name="Name",
                                    attribute_index=0)
    assert gone.attribute_value.name_value.value == "New Name"
    assert c.get_attributes(uid, ["Name"])[1] == []
    c.activate(uid)
    new = c.rekey(uid=uid)
    assert new != uid and len(c.get(new).value) == 32
print("done")
""",
    )
    assert out.strip() == "done"


def test_percona_mysql_flow_with_pykmip(kmip: KmipService, pki: Pki) -> None:
    """Percona Server for MySQL's keyring_kmip calls: Register a key with a Name and an
    Object Group, Activate; Locate by Object Group, Get and GetAttributes(Name); Revoke
    and Destroy."""
    out = run_pykmip(
        pykmip(),
        kmip,
        pki,
        """
import os
from kmip.pie import client
from kmip.core import attributes as cattributes, enums, objects as cobjects, secrets
from kmip.core.factories import attributes
f = attributes.AttributeFactory()
material = os.urandom(32)
with client.ProxyKmipClient(config="strongroom") as c:
    key = secrets.SymmetricKey(cobjects.KeyBlock(
        key_format_type=cobjects.KeyFormatType(enums.KeyFormatType.RAW),
        key_value=cobjects.KeyValue(cobjects.KeyMaterial(material)),
        cryptographic_algorithm=cattributes.CryptographicAlgorithm(
            enums.CryptographicAlgorithm.AES),
        cryptographic_length=cattributes.CryptographicLength(256)))
    template = cobjects.TemplateAttribute(attributes=[
        f.create_attribute(enums.AttributeType.NAME, "percona_binlog_1"),
        f.create_attribute(enums.AttributeType.OBJECT_GROUP, "percona-group"),
    ])
    result = c.proxy.register(enums.ObjectType.SYMMETRIC_KEY, template, key)
    assert result.result_status.value == enums.ResultStatus.SUCCESS, result.result_message
    uid = result.uuid
    c.activate(uid)
    by_group = [f.create_attribute(enums.AttributeType.OBJECT_GROUP, "percona-group")]
    assert c.locate(attributes=by_group) == [uid]
    assert c.get(uid).value == material
    names = c.get_attributes(uid, ["Name"])[1]
    assert [n.attribute_value.name_value.value for n in names] == ["percona_binlog_1"]
    c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
    c.destroy(uid)
    assert c.locate(attributes=by_group) == []
print("done")
""",
    )
    assert out.strip() == "done"


def test_a_future_activation_date_makes_the_object_active_when_it_comes(
    kmip: KmipService, pki: Pki
) -> None:
    """An object made with an Activation Date ahead is Pre-Active (Encrypt refused) until
    that date; once it has passed, the object is Active when next loaded (GetAttributes,
    Locate by State, Encrypt), and stays so (stored)."""
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
    template = [
        CREATE_AES[0],
        structure(
            Tag.TEMPLATE_ATTRIBUTE,
            *CREATE_AES[1].all(Tag.ATTRIBUTE),
            attr("Activation Date", Item(0, Type.DATE_TIME, soon)),
        ),
    ]
    data = Item(Tag.DATA, Type.BYTE_STRING, b"not yet")
    with tls(kmip, pki) as conn:
        created, early = results(
            exchange(conn, request((Operation.CREATE, template), (Operation.ENCRYPT, [data])))
        )
    uid = ok(created).text_of(Tag.UNIQUE_IDENTIFIER)
    assert uid
    assert reason(early) == ResultReason.ILLEGAL_OPERATION
    while datetime.now(UTC) <= soon:  # the server's clock is this machine's
        time.sleep(0.25)
    (state,) = attributes(kmip, pki, uid)["State"]
    assert state.value == State.ACTIVE
    located = ok(one(kmip, pki, Operation.LOCATE, [attr("State", Item(0, ENUM, State.ACTIVE))]))
    assert uid in [i.value for i in located.all(Tag.UNIQUE_IDENTIFIER)]
    ok(one(kmip, pki, Operation.ENCRYPT, [uid_item(uid), data]))
