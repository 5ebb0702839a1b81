"""The audit chain in the database of a shared store (docs/audit.md, "In the database";
docs/cluster.md): every node appends to one linear hash chain, one record per transaction
under the chain's advisory lock; `strongroom audit verify` checks all of it from the
database and names a row deleted or edited there. On the real PostgreSQL cluster of
tests/emulators/pg_support.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config
from cryptography.hazmat.primitives.asymmetric import ed25519
from pg_support import verify_store_chain

import strongroom
from strongroom.audit import chain_records, verify_chain
from strongroom.audit.log import GENESIS, line_hash
from strongroom.errors import AuditUnavailable, StorageError
from strongroom.store_chain import open_chain

CORRUPT = 9


def node(tmp_path: Path, name: str, url: str, extra: str = "") -> Path:
    (tmp_path / name).mkdir()
    cfg = write_vault_config(tmp_path / name, store_url=url)
    if extra:
        cfg.write_text(cfg.read_text().replace("[keystore]\n", f"[keystore]\n{extra}\n", 1))
    return cfg


@pytest.fixture
def cluster(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Path, Path]:
    """A database with a vault, and two nodes' configs on it (data dirs of their own)."""
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    a, b = node(tmp_path, "a", url), node(tmp_path, "b", url)
    with strongroom.open(a) as ks:
        ks.vault_control().initialize()
    return url, a, b


def sql(url: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(statement.replace("?", "%s"), args)  # type: ignore[arg-type]
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def test_two_nodes_write_one_chain_that_verifies_from_the_database(
    cluster: tuple[str, Path, Path],
) -> None:
    url, a, b = cluster
    with strongroom.open(a) as ka, strongroom.open(b) as kb:
        ka.generate("k", "ed25519")
        kb.sign("k", b"on b")
        ka.audit_checkpoint()  # signed on a over records of both nodes
        kb.sign("k", b"on b again")
        kb.audit_checkpoint()
        public = kb.audit_public_key()
        actors = {ka.audit.actor, kb.audit.actor}
    assert isinstance(public, ed25519.Ed25519PublicKey)
    rows = sql(url, "SELECT seq, line FROM audit_chain ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    prev = GENESIS
    for seq, line in rows:  # one chain: each row names the hash of the row before
        rec = json.loads(line)
        assert (rec["seq"], rec["prev"]) == (seq, prev)
        prev = line_hash(line.encode())
    assert {json.loads(r[1])["actor"] for r in rows} == actors  # both nodes wrote
    assert not any((cfg.parent / "data" / "audit.jsonl").exists() for cfg in (a, b))
    chain = open_chain(url)
    try:
        report = verify_chain(chain, public)
        assert report.ok, report.first_bad
        assert (report.records, report.checkpoints_verified) == (len(rows), 2)
        assert report.unsigned_tail == 0
        assert [r["seq"] for r in chain_records(chain, since_seq=2, limit=3)] == [3, 4, 5]
    finally:
        chain.close()
    done = run_cli(b, "--json", "audit", "verify")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] and out["records"] == len(rows) and out["checkpoints_verified"] == 2
    assert "audit_chain in" in out["path"] and "host=" in out["path"]
    listed = run_cli(a, "--json", "audit", "list", "--since", str(len(rows) - 1))
    assert [r["seq"] for r in json.loads(listed.stdout)] == [len(rows)]


def test_concurrent_appends_from_two_nodes_keep_one_linear_chain(
    cluster: tuple[str, Path, Path],
) -> None:
    url, a, b = cluster
    per_node = 60
    with strongroom.open(a) as ka, strongroom.open(b) as kb:
        ka.generate("k", "ed25519")
        errors: list[BaseException] = []

        def load(ks: Any) -> None:
            try:
                for i in range(per_node):
                    ks.sign("k", b"%d" % i)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=load, args=(ks,)) for ks in (ka, kb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        public = ka.audit_public_key()
    report = verify_store_chain(url, public)
    assert report.ok, report.first_bad
    signs = [json.loads(r[0]) for r in sql(url, "SELECT line FROM audit_chain")]
    assert sum(1 for r in signs if r["op"] == "sign") == 2 * per_node


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("delete", "record seq 6 is missing (deleted)"),
        ("edit", "record altered"),
        ("swap", "out of order"),
        ("rechained", "checkpoint signature does not verify"),
    ],
)
def test_a_row_deleted_or_edited_in_the_database_is_reported(
    cluster: tuple[str, Path, Path], change: str, words: str
) -> None:
    url, a, b = cluster
    with strongroom.open(a) as ka, strongroom.open(b) as kb:
        ka.generate("k", "ed25519")
        for i in range(4):
            kb.sign("k", b"%d" % i)
        ka.audit_checkpoint()
    if change == "delete":
        sql(url, "DELETE FROM audit_chain WHERE seq = 6")
    elif change == "edit":
        sql(
            url,
            'UPDATE audit_chain SET line = replace(line, \'"op":"sign"\', '
            '\'"op":"verify"\') WHERE seq = 6',
        )
    elif change == "swap":
        line6, line7 = (
            r[0] for r in sql(url, "SELECT line FROM audit_chain WHERE seq IN (6, 7) ORDER BY seq")
        )
        sql(url, "UPDATE audit_chain SET line = ? WHERE seq = 6", line7)
        sql(url, "UPDATE audit_chain SET line = ? WHERE seq = 7", line6)
    else:  # someone with the database rewrites a record and fixes every hash after it
        rows = sql(url, "SELECT seq, line FROM audit_chain ORDER BY seq")
        prev = GENESIS
        for seq, line in rows:
            rec = json.loads(line)
            if seq == 6:  # a sign by b (1-2: vault_initialize, 3-4: generate)
                rec["key"] = "someone-elses"
            rec["prev"] = prev
            # a checkpoint's signature cannot be remade without the key: it stays as it was
            new = json.dumps(rec, separators=(",", ":"))
            sql(url, "UPDATE audit_chain SET line = ? WHERE seq = ?", new, seq)
            prev = line_hash(new.encode())
    done = run_cli(a, "--json", "audit", "verify")
    assert done.returncode == CORRUPT, (done.stdout, done.stderr)
    out = json.loads(done.stdout)
    assert not out["ok"] and words in out["first_bad"]["reason"], out["first_bad"]


def test_a_node_that_finds_the_chain_cut_records_it(cluster: tuple[str, Path, Path]) -> None:
    url, a, _ = cluster
    with strongroom.open(a) as ks:
        ks.generate("k", "ed25519")
        for i in range(3):
            ks.sign("k", b"%d" % i)
        top = sql(url, "SELECT max(seq) FROM audit_chain")[0][0]
        sql(url, "DELETE FROM audit_chain WHERE seq > ?", top - 2)  # the last two, unseen
        ks.sign("k", b"after")
    rows = [json.loads(r[0]) for r in sql(url, "SELECT line FROM audit_chain ORDER BY seq")]
    note = rows[-1]  # right after the first record that landed on the cut tail
    assert rows[-2]["op"] == "sign" and rows[-2]["seq"] == top - 1
    assert note["op"] == "audit_log_shrank" and note["seq"] == top
    assert (note["expected_seq"], note["found_seq"]) == (top, top - 2)
    done = run_cli(a, "--json", "audit", "verify")
    assert done.returncode == CORRUPT
    assert "cut back" in json.loads(done.stdout)["first_bad"]["reason"]


def test_periodic_checkpoints_on_the_chain(
    pg_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    url = pg_cluster.new_database()
    cfg = node(tmp_path, "a", url, "audit_checkpoint_every = 5")
    with strongroom.open(cfg) as ks:
        ks.vault_control().initialize()
        ks.generate("k", "ed25519")
        for _ in range(12):
            ks.sign("k", b"x")
        public = ks.audit_public_key()
    report = verify_store_chain(url, public)
    assert report.ok and report.checkpoints >= 2 and report.checkpoints_verified >= 2


def test_postgres_down_refuses_the_operation_then_it_recovers(
    pg_cluster: Any, cluster: tuple[str, Path, Path]
) -> None:
    url, a, _ = cluster
    with strongroom.open(a) as ks:
        ks.generate("k", "ed25519")
        pg_cluster.stop("fast")
        try:
            with pytest.raises(StorageError, match="cannot read the store"):
                ks.sign("k", b"nothing may run unrecorded")
            with pytest.raises(StorageError, match="cannot write the audit chain"):
                ks.audit.record("sign", "k", "ok")  # what a signature that worked would do
            with pytest.raises(StorageError, match="cannot write the audit chain"):
                ks.generate("j", "ed25519")  # its write-ahead record: refused before it acts
        finally:
            pg_cluster.start()
        ks.sign("k", b"back")
        assert [i.name for i in ks.keys()] == ["k"]
    assert verify_store_chain(url).ok


def test_a_closed_chain_refuses_instead_of_reconnecting(cluster: tuple[str, Path, Path]) -> None:
    _, a, _ = cluster
    with strongroom.open(a) as ks:
        ks.generate("k", "ed25519")
        ks.audit.close()  # nothing may run unrecorded, as with a closed file
        with pytest.raises(AuditUnavailable, match="closed"):
            ks.sign("k", b"unrecorded")
