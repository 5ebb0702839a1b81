"""The KMIP object store: a kmip.sqlite of the first slice (no `extra` column) opens and
keeps its objects; new objects keep their extra facts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from strongroom.kmip.store import KmipObject, ObjectStore
from strongroom.kmip.tags import ObjectType, State


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
