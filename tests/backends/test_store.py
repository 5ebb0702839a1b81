"""The vault in the keystore's transactional store (docs/storage.md): one row per key version,
written with its catalog rows in one transaction; every row, the header and the manifest
authenticated, so a row that is edited, swapped, copied, removed or rolled back is reported
as tampering; a vault from before the store is moved into it on first unlock, its file kept.

Every test runs twice: on the embedded SQLite store and on PostgreSQL (the session's private
cluster, tests/emulators/pg_support.py; a database per test), the same SQL reaching behind
the keystore's back into either."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, store_sql, write_vault_config

import strongroom
from strongroom import KeyExists, SnapshotTampered, SnapshotVersionError
from strongroom.keystore import Keystore

DATA = b"store test data"
VECTORS = Path(__file__).parent.parent / "vectors"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_config(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path], Path]:
    """Writes a vault config in a directory, its store the parameter's: SQLite in the
    directory's data dir, or a new PostgreSQL database."""
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    if request.param == "sqlite":
        return write_vault_config
    cluster = request.getfixturevalue("pg_cluster")
    return lambda directory: write_vault_config(directory, store_url=cluster.new_database())


@pytest.fixture
def vault_config(
    make_config: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    path = make_config(tmp_path)
    monkeypatch.setenv("STRONGROOM_CONFIG", str(path))
    return path


def sql(cfg: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    """Run `statement` (`?` placeholders) on the store of config `cfg`, behind its back."""
    return store_sql(cfg, statement, *args)


def row_of(cfg: Path, name: str) -> tuple[object, ...]:
    (row,) = sql(cfg, "SELECT * FROM vault_records WHERE name=?", name)
    return row


@pytest.fixture
def ks(vault_config: Path) -> Iterator[Keystore]:
    with strongroom.open(vault_config) as keystore:
        keystore.generate("a", "ed25519")
        keystore.generate("b", "ed25519")
        keystore.generate("c", "aes-256")
        yield keystore


def reopen_and_sign(cfg: Path, name: str = "a") -> None:
    with strongroom.open(cfg) as ks:
        ks.verify(name, DATA, ks.sign(name, DATA))


# -- one transaction, constant rows ---------------------------------------------------------
def test_a_key_change_writes_the_same_rows_however_many_keys_there_are(
    ks: Keystore,
) -> None:
    def changes(action: str, name: str) -> int:
        before = ks.catalog.store.changes
        if action == "generate":
            ks.generate(name, "ed25519")
        elif action == "rotate":
            ks.rotate(name)
        else:
            ks.delete(name)
        return ks.catalog.store.changes - before

    small = [changes("generate", "s1"), changes("rotate", "s1"), changes("delete", "s1")]
    with ks.batch():
        for i in range(60):
            ks.generate(f"bulk{i}", "ed25519")
    large = [changes("generate", "l1"), changes("rotate", "l1"), changes("delete", "l1")]
    assert small == large
    # a vault row and the header, and the catalog's row or two; the delete removes both
    # versions of s1 (two rows and two header updates, three catalog rows)
    assert small == [4, 4, 7], small


def test_a_batch_commits_together_or_not_at_all(ks: Keystore, vault_config: Path) -> None:
    rows_before = sql(vault_config, "SELECT COUNT(*) FROM vault_records")[0][0]
    with pytest.raises(KeyExists), ks.batch():
        ks.generate("x1", "ed25519")
        ks.import_key("x2", "ed25519", bytes(range(32)), format="raw")
        ks.generate("a", "ed25519")  # taken: the whole batch rolls back
    assert not ks.catalog.exists("default", "x1") and not ks.catalog.exists("default", "x2")
    assert sql(vault_config, "SELECT COUNT(*) FROM vault_records")[0][0] == rows_before
    with ks.batch():
        ks.generate("y1", "ed25519")
        ks.generate("y2", "ed25519")
    ks.close()
    reopen_and_sign(vault_config, "y2")
    with strongroom.open(vault_config) as again:
        again.vault.verify_store()  # type: ignore[attr-defined]


# -- tampering --------------------------------------------------------------------------------
def test_an_edited_row_is_tampering(ks: Keystore, vault_config: Path) -> None:
    ks.close()
    sql(
        vault_config,
        "UPDATE vault_records SET meta=replace(meta, 'sign', 'encrypt') WHERE name='a'",
    )
    with strongroom.open(vault_config) as again, pytest.raises(SnapshotTampered, match="edited"):
        again.sign("a", DATA)
    reopen_and_sign(vault_config, "b")  # the other rows are unharmed


def test_swapped_sealed_material_is_tampering(ks: Keystore, vault_config: Path) -> None:
    ks.close()
    a, b = row_of(vault_config, "a"), row_of(vault_config, "b")
    # columns: backend, record_id, namespace, name, version, type, meta, public, sealed, mac
    sql(vault_config, "UPDATE vault_records SET sealed=? WHERE name='a'", b[8])
    sql(vault_config, "UPDATE vault_records SET sealed=? WHERE name='b'", a[8])
    with strongroom.open(vault_config) as again:
        for name in ("a", "b"):
            with pytest.raises(SnapshotTampered):
                again.sign(name, DATA)


def test_a_catalog_entry_pointed_at_another_key_is_tampering(
    ks: Keystore, vault_config: Path
) -> None:
    ks.close()
    b_handle = sql(vault_config, "SELECT handle FROM keys WHERE name='b'")[0][0]
    sql(vault_config, "UPDATE keys SET handle=? WHERE name='a'", b_handle)
    sql(vault_config, "UPDATE key_versions SET handle=? WHERE name='a'", b_handle)
    with strongroom.open(vault_config) as again:
        with pytest.raises(SnapshotTampered, match="catalog was modified"):
            again.sign("a", DATA)


def test_a_row_copied_from_another_vault_is_tampering(
    ks: Keystore, vault_config: Path, tmp_path: Path, make_config: Callable[[Path], Path]
) -> None:
    ks.close()
    (tmp_path / "other").mkdir()
    other_cfg = make_config(tmp_path / "other")
    with strongroom.open(other_cfg) as other:
        other.generate("a", "ed25519")
    foreign = row_of(other_cfg, "a")
    sql(vault_config, "DELETE FROM vault_records WHERE name='a'")
    sql(vault_config, f"INSERT INTO vault_records VALUES ({','.join('?' * 10)})", *foreign)
    sql(vault_config, "UPDATE keys SET handle=? WHERE name='a'", foreign[1])
    sql(vault_config, "UPDATE key_versions SET handle=? WHERE name='a'", foreign[1])
    with strongroom.open(vault_config) as again, pytest.raises(SnapshotTampered):
        again.sign("a", DATA)


def test_a_removed_row_is_found_at_open(ks: Keystore, vault_config: Path) -> None:
    ks.close()
    sql(vault_config, "DELETE FROM vault_records WHERE name='c'")
    sql(vault_config, "DELETE FROM keys WHERE name='c'")
    sql(vault_config, "DELETE FROM key_versions WHERE name='c'")
    with pytest.raises(SnapshotTampered, match="removed or added"):
        reopen_and_sign(vault_config)


def test_a_rolled_back_header_is_found_at_open(ks: Keystore, vault_config: Path) -> None:
    (old_header,) = sql(vault_config, "SELECT * FROM vault_headers")
    ks.generate("d", "ed25519")
    ks.close()
    sql(vault_config, "DELETE FROM vault_headers")
    sql(vault_config, "INSERT INTO vault_headers VALUES (?,?,?,?,?)", *old_header)
    with pytest.raises(SnapshotTampered):
        reopen_and_sign(vault_config)


def test_a_resurrected_row_in_place_of_a_removed_one_is_found_by_verify(
    ks: Keystore, vault_config: Path, tmp_path: Path
) -> None:
    """Same number of rows, every one with a good MAC: only the manifest's hash sees it."""
    deleted = row_of(vault_config, "c")
    ks.delete("c")
    ks.generate("d", "ed25519")
    ks.close()
    sql(vault_config, "DELETE FROM vault_records WHERE name='d'")
    sql(vault_config, f"INSERT INTO vault_records VALUES ({','.join('?' * 10)})", *deleted)
    with strongroom.open(vault_config) as again:
        again.sign("a", DATA)  # the count matches, so it opens
        with pytest.raises(SnapshotTampered, match="does not match its manifest"):
            again.vault.verify_store()  # type: ignore[attr-defined]
        with pytest.raises(SnapshotTampered, match="not writing a backup"):
            again.vault.backup(tmp_path / "b.snap")  # type: ignore[attr-defined]
    assert not (tmp_path / "b.snap").exists()


def test_edited_key_slots_are_tampering(ks: Keystore, vault_config: Path) -> None:
    ks.close()
    (slots,) = sql(vault_config, "SELECT slots FROM vault_headers")[0]
    sql(vault_config, "UPDATE vault_headers SET slots=?", str(slots).replace(",", ", "))
    with pytest.raises(SnapshotTampered, match="key slots or manifest"):
        reopen_and_sign(vault_config)


def test_a_newer_store_format_is_refused(ks: Keystore, vault_config: Path) -> None:
    ks.close()
    sql(vault_config, "UPDATE vault_headers SET format=2")
    with pytest.raises(SnapshotVersionError, match="upgrade Strongroom"):
        reopen_and_sign(vault_config)


# -- migration and backups ----------------------------------------------------------------------
def test_a_vault_file_from_before_the_store_is_moved_in_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_config: Callable[[Path], Path]
) -> None:
    """tests/vectors/vault-v1.snapshot (format 1, from before the store) holds an Ed25519 key
    imported from the bytes 0..31; its record is sealed again for the store."""
    cfg = make_config(tmp_path)
    monkeypatch.setenv(VAULT_PASS_ENV, "an old vault, made by Strongroom before format 2")
    data = tmp_path / "data"
    data.mkdir()
    old = data / "vault.snapshot"
    shutil.copy(VECTORS / "vault-v1.snapshot", old)
    original = old.read_bytes()
    with strongroom.open(cfg) as ks:
        assert ks.vault.vault_status()["migrates_on_unlock"] is True  # type: ignore[attr-defined]
        (rec,) = ks.vault.records()  # type: ignore[attr-defined]
        assert not old.exists()
        assert (data / "vault.snapshot.migrated").read_bytes() == original
        ks.catalog.add(replace(rec, backend="vault"))  # the old install's catalog row
        sig = ks.sign("old-signer", b"made before threshold slots")
        assert sig.hex().startswith("4b1939cbcb773b91")  # Ed25519 is deterministic
        ks.vault.verify_store()  # type: ignore[attr-defined]
    with strongroom.open(cfg) as ks:  # from the store now
        assert ks.sign("old-signer", b"made before threshold slots") == sig


def test_a_backup_restores_into_a_fresh_data_dir(
    ks: Keystore, tmp_path: Path, make_config: Callable[[Path], Path]
) -> None:
    backup = tmp_path / "vault.backup"
    sig = ks.sign("a", DATA)
    ks.rotate("a")
    ks.vault.backup(backup)  # type: ignore[attr-defined]
    assert backup.read_bytes()[8:10] == b"\x00\x03"
    from strongroom.keystore import vault_restore

    (tmp_path / "elsewhere").mkdir()
    cfg = make_config(tmp_path / "elsewhere")
    with strongroom.open(cfg) as other:
        report = vault_restore(other, backup)
        assert report["keys"] == 4 and sorted(report["added"]) == ["a", "b", "c"]
        assert [v.version for v in other.versions("a")] == [1, 2]
        other.verify("a", DATA, sig, version=1)
        records = other.vault.records()  # type: ignore[attr-defined]
        assert sorted((r.name, r.version) for r in records) == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("c", 1),
        ]
        other.vault.verify_store()  # type: ignore[attr-defined]
        ks.public_key("a", version=1).verify(sig, DATA)  # type: ignore[union-attr,call-arg]


def test_a_manifest_with_an_oversized_hash_is_tampering(ks: Keystore, vault_config: Path) -> None:
    """Found by the store's fuzz target: a 400-byte MuHash value raised OverflowError."""
    import base64
    import json

    ks.close()
    (manifest,) = sql(vault_config, "SELECT manifest FROM vault_headers")[0]
    doc = json.loads(str(manifest))
    doc["num"] = base64.b64encode(b"\x01" * 400).decode()
    sql(vault_config, "UPDATE vault_headers SET manifest=?", json.dumps(doc))
    with pytest.raises(SnapshotTampered, match="bad manifest"):
        reopen_and_sign(vault_config)
