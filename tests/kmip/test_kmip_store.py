"""The KMIP object store: a kmip.sqlite of the first slice (no `extra` column) opens and
keeps its objects; new objects keep their extra facts; a key whose object cannot be
written is deleted again."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from kmip_support import CREATE_AES, attr, cli, exchange, request, results, run_kmip, tls
from server_support import Pki, make_pki

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
from strongroom.store import open_store


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-store-pki"))


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


def test_objects_live_in_the_shared_store(pg_cluster: Any, tmp_path: Path, pki: Pki) -> None:
    """With `[store] url`, KMIP objects are rows of the database every node uses: an object
    made through node A is found, read and destroyed through node B, and a node's
    `kmip.sqlite` from before is moved into the database when it starts."""
    url = pg_cluster.new_database()
    nodes = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        cfg = write_vault_config(directory, store_url=url)
        with cfg.open("a", encoding="utf-8") as f:
            f.write(
                "\n[server]\n"
                f'socket = "{directory / "serve.sock"}"\n'
                'listen = "127.0.0.1:0"\n'
                f'tls_cert = "{pki.server_cert}"\n'
                f'tls_key = "{pki.server_key}"\n'
                f'tls_client_ca = "{pki.ca}"\n'
                'kmip_listen = "127.0.0.1:0"\n'
            )
        nodes.append(cfg)
    (tmp_path / "b" / "data").mkdir()
    old = ObjectStore(tmp_path / "b" / "data" / "kmip.sqlite")  # node B's file from before
    old.put("acme", KmipObject("kmip-before", ObjectType.PUBLIC_KEY, extra={"der": "3000"}))
    old.close()
    cli(nodes[0], "tenant", "create", "acme")
    cli(nodes[0], "tenant", "cert", "acme", "kmip", "--cert", str(pki.client_cert))
    cli(
        nodes[0],
        "policy",
        "grant",
        "acme",
        "kmip",
        "--keys",
        "*",
        "--permissions",
        "read,generate,delete",
    )
    a, b = run_kmip(nodes[0]), run_kmip(nodes[1])
    try:
        with tls(a, pki) as conn:
            created = results(exchange(conn, request((Operation.CREATE, CREATE_AES))))[0]
        assert created.int_of(Tag.RESULT_STATUS) == ResultStatus.SUCCESS
        uid = created.need(Tag.RESPONSE_PAYLOAD).text_of(Tag.UNIQUE_IDENTIFIER)
        assert uid
        with tls(b, pki) as conn:
            for known in (uid, "kmip-before"):
                got = results(
                    exchange(
                        conn,
                        request(
                            (
                                Operation.GET_ATTRIBUTES,
                                [Item(Tag.UNIQUE_IDENTIFIER, Type.TEXT_STRING, known)],
                            )
                        ),
                    )
                )[0]
                assert got.int_of(Tag.RESULT_STATUS) == ResultStatus.SUCCESS, known
            gone = results(
                exchange(
                    conn,
                    request(
                        (Operation.DESTROY, [Item(Tag.UNIQUE_IDENTIFIER, Type.TEXT_STRING, uid)])
                    ),
                )
            )[0]
            assert gone.int_of(Tag.RESULT_STATUS) == ResultStatus.SUCCESS
        assert not (tmp_path / "b" / "data" / "kmip.sqlite").exists()
        assert (tmp_path / "b" / "data" / "kmip.sqlite.moved").exists()
        assert not (tmp_path / "a" / "data" / "kmip.sqlite").exists()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    shared = ObjectStore(open_store(url, tmp_path / "c"))
    try:
        assert [o.uid for o in shared.all("acme")] == ["kmip-before"]
    finally:
        shared.close()
