"""The KMIP object store: a kmip.sqlite of the first slice (no `extra` column) opens and
keeps its objects; new objects keep their extra facts; a key whose object cannot be
written is deleted again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from kmip_support import CREATE_AES, attr, request

import strongroom
from strongroom.kmip import ttlv
from strongroom.kmip.operations import Access, Session
from strongroom.kmip.store import KmipObject, ObjectStore
from strongroom.kmip.tags import (
    CryptographicAlgorithm,
    ObjectType,
    Operation,
    ResultStatus,
    State,
    Tag,
)
from strongroom.kmip.ttlv import Item, Type, structure

PAIR = [
    structure(
        Tag.COMMON_TEMPLATE_ATTRIBUTE,
        attr("Cryptographic Algorithm", Item(0, Type.ENUMERATION, CryptographicAlgorithm.EC)),
        attr("Cryptographic Length", Item(0, Type.INTEGER, 256)),
    )
]


def test_a_first_slice_store_gains_the_extra_column(tmp_path: Path) -> None:
    path = tmp_path / "kmip.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE objects (tenant TEXT NOT NULL, uid TEXT NOT NULL, object_type INTEGER "
        "NOT NULL, state INTEGER NOT NULL, dates TEXT NOT NULL, attributes TEXT NOT NULL, "
        "PRIMARY KEY (tenant, uid))"
    )
    db.execute("INSERT INTO objects VALUES ('acme', 'kmip-old', 2, 2, '{}', '{}')")
    db.commit()
    db.close()
    store = ObjectStore(path)
    try:
        old = store.get("acme", "kmip-old")
        assert old is not None and old.state is State.ACTIVE and old.extra == {}
        new = KmipObject("kmip-new", ObjectType.PUBLIC_KEY, extra={"der": "3000", "format": 5})
        store.put("acme", new)
        assert store.get("acme", "kmip-new") == new
        assert [o.uid for o in store.all("acme")] == ["kmip-old", "kmip-new"]
    finally:
        store.close()


class _FullStore(ObjectStore):
    """An object store whose writes fail (a full disk): a stand-in for this one test."""

    def put(self, tenant: str, obj: KmipObject) -> None:
        raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize(
    "seed",
    [(Operation.CREATE, CREATE_AES), (Operation.CREATE_KEY_PAIR, PAIR)],
    ids=["create", "pair"],
)
def test_a_failed_object_write_leaves_no_key_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: tuple[Operation, list[Item]]
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    with strongroom.open(write_vault_config(tmp_path)) as ks:
        view = ks.in_namespace("acme")
        store = _FullStore(tmp_path / "kmip.sqlite")
        access = Access("acme", "acme:test", lambda _p, _u: True)
        session = Session(view, store, access, None, view.audited)
        answer = ttlv.decode(session.handle(request(seed)))
        (item,) = answer.all(Tag.BATCH_ITEM)
        assert item.int_of(Tag.RESULT_STATUS) == ResultStatus.OPERATION_FAILED
        assert view.keys() == [] and store.all("acme") == []
        store.close()
