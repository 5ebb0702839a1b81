"""The vault snapshot through the Python API: every kind of damage gets its own typed error,
the file on disk is never changed by a failed open, and writers in two keystores never lose
each other's keys."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    run_cli,
    snapshot_path,
    write_vault_config,
)

import strongroom
from strongroom import (
    AuthenticationFailed,
    SnapshotCorrupt,
    SnapshotTampered,
    SnapshotTruncated,
    SnapshotVersionError,
    StrongroomError,
)

DATA = b"snapshot test data"
KEYS = {"ed": "ed25519", "aes": "aes-256", "p256": "ecdsa-p256"}
PREFIX = struct.Struct(">8sHI")  # magic, version, header length
PLEN = struct.Struct(">Q")
CORRUPT_EXIT = 9


def vault_records(ks: strongroom.Keystore) -> list[strongroom.KeyInfo]:
    records: list[strongroom.KeyInfo] = ks.vault.records()  # type: ignore[attr-defined]
    return records


def strip_store(data_dir: Path) -> None:
    """Remove the vault's rows from the store, leaving its catalog: a data dir as a vault from
    before the store left it, once a snapshot file is put beside it."""
    db = sqlite3.connect(data_dir / "catalog.sqlite")
    with db:
        db.execute("DELETE FROM vault_records")
        db.execute("DELETE FROM vault_headers")
    db.close()


@pytest.fixture(scope="module")
def good_vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose vault (three keys) is a snapshot file not yet moved into the store:
    opening it migrates it, so each kind of damage to the file is met on that path; tests
    copy the dir."""
    root = tmp_path_factory.mktemp("good-vault")
    cfg = write_vault_config(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
        with strongroom.open(cfg) as ks:
            for name, key_type in KEYS.items():
                ks.generate(name, key_type)
            ks.vault.backup(snapshot_path(cfg))  # type: ignore[attr-defined]
    strip_store(root / "data")
    return root / "data"


@pytest.fixture
def vault_copy(good_vault: Path, vault_config: Path) -> Path:
    """A private copy of the good vault at vault_config's data dir; returns the snapshot path."""
    shutil.copytree(good_vault, vault_config.parent / "data")
    return snapshot_path(vault_config)


class Layout:
    """Offsets inside a snapshot file."""

    def __init__(self, data: bytes) -> None:
        magic, self.version, self.hlen = PREFIX.unpack_from(data)
        assert magic == b"SRVAULT\x00"
        self.header_start = PREFIX.size
        self.header_end = PREFIX.size + self.hlen
        (self.plen,) = PLEN.unpack_from(data, self.header_end)
        self.payload_start = self.header_end + PLEN.size
        self.payload_end = self.payload_start + self.plen
        assert len(data) == self.payload_end + 32
        self.header = json.loads(data[self.header_start : self.header_end])


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x20
    return bytes(b)


def rechecksum(body: bytes) -> bytes:
    """What an attacker does: recompute the (unkeyed) checksum over the changed body."""
    return body + hashlib.sha256(body).digest()


def with_header(data: bytes, header: dict[str, object] | bytes) -> bytes:
    """Replace the header (lengths fixed up, checksum recomputed)."""
    lay = Layout(data)
    raw = (
        header
        if isinstance(header, bytes)
        else json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    )
    body = (
        PREFIX.pack(b"SRVAULT\x00", lay.version, len(raw))
        + raw
        + data[lay.header_end : lay.payload_end]
    )
    return rechecksum(body)


def open_and_use(cfg_path: Path) -> None:
    with strongroom.open(cfg_path) as ks:
        ks.sign("ed", DATA)


def assert_refused(
    snap: Path, vault_config: Path, bad: bytes, expected: type[StrongroomError], *fragments: str
) -> StrongroomError:
    """Write `bad` as the snapshot; opening must raise exactly `expected` and change nothing."""
    snap.write_bytes(bad)
    names = sorted(p.name for p in snap.parent.iterdir())
    with pytest.raises(StrongroomError) as info:
        open_and_use(vault_config)
    e = info.value
    assert type(e) is expected, f"{type(e).__name__}: {e}"
    for fragment in fragments:
        assert fragment in str(e), str(e)
    assert VAULT_PASSPHRASE not in str(e)
    assert snap.read_bytes() == bad  # the file on disk is untouched
    assert sorted(p.name for p in snap.parent.iterdir()) == names  # no temp files left
    return e


def test_good_copy_opens(vault_copy: Path, vault_config: Path) -> None:
    with strongroom.open(vault_config) as ks:
        assert sorted(r.name for r in vault_records(ks)) == sorted(KEYS)
        sig = ks.sign("ed", DATA)
        ks.verify("ed", DATA, sig)


def test_wrong_passphrase(
    vault_copy: Path, vault_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = vault_copy.read_bytes()
    monkeypatch.setenv(VAULT_PASS_ENV, "Tr0ub4dor&3 wrong")
    e = assert_refused(vault_copy, vault_config, good, AuthenticationFailed, "passphrase")
    assert "Tr0ub4dor" not in str(e) and "Tr0ub4dor" not in repr(e.args)
    assert not isinstance(e, SnapshotCorrupt)
    # every later attempt fails the same way and the file stays the same
    with pytest.raises(AuthenticationFailed):
        open_and_use(vault_config)
    assert vault_copy.read_bytes() == good
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    open_and_use(vault_config)


def truncation_points(lay: Layout, size: int) -> dict[str, int]:
    return {
        "empty": 0,
        "inside-magic": 4,
        "inside-version": 9,
        "inside-header-length": 12,
        "header-start": lay.header_start,
        "inside-header": lay.header_start + lay.hlen // 2,
        "inside-payload-length": lay.header_end + 3,
        "payload-start": lay.payload_start,
        "inside-payload": lay.payload_start + lay.plen // 2,
        "missing-checksum": lay.payload_end,
        "half-checksum": lay.payload_end + 16,
        "last-byte-missing": size - 1,
    }


def test_truncated_at_every_region(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    lay = Layout(good)
    for where, cut in truncation_points(lay, len(good)).items():
        e = assert_refused(vault_copy, vault_config, good[:cut], SnapshotTruncated, "truncated")
        assert isinstance(e, SnapshotCorrupt), where
        assert str(vault_copy) in str(e)


@pytest.mark.parametrize(
    "region",
    ["header", "header-first", "payload", "payload-last", "checksum", "payload-length-low-byte"],
)
def test_one_flipped_byte_is_tampering(vault_copy: Path, vault_config: Path, region: str) -> None:
    good = vault_copy.read_bytes()
    lay = Layout(good)
    index = {
        "header": lay.header_start + lay.hlen // 2,
        "header-first": lay.header_start,
        "payload": lay.payload_start + lay.plen // 2,
        "payload-last": lay.payload_end - 1,
        "checksum": len(good) - 1,
        "payload-length-low-byte": lay.header_end + PLEN.size - 1,  # length shrinks by 32
    }[region]
    bad = flip(good, index) if region != "payload-length-low-byte" else _shrink_plen(good, lay)
    e = assert_refused(vault_copy, vault_config, bad, SnapshotTampered)
    assert isinstance(e, SnapshotCorrupt)
    assert str(vault_copy) in str(e)
    if region != "payload-length-low-byte":
        assert "checksum" in str(e)


def _shrink_plen(good: bytes, lay: Layout) -> bytes:
    """A payload length 32 too small: the file then has data after its end."""
    b = bytearray(good)
    PLEN.pack_into(b, lay.header_end, lay.plen - 32)
    return bytes(b)


def test_data_after_the_end_is_tampering(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    assert_refused(vault_copy, vault_config, good + b"\x00", SnapshotTampered, "after its end")


def test_implausible_header_length(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    bad = bytearray(good)
    struct.pack_into(">I", bad, 10, 0xFFFFFFF0)
    assert_refused(vault_copy, vault_config, bytes(bad), SnapshotTampered, "header length")


def test_bad_magic(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    for bad in (b"NOTVAULT" + good[8:], b"SRVAULT\x01" + good[8:], b"hello", b"\x00" * 100):
        e = assert_refused(vault_copy, vault_config, bad, SnapshotCorrupt, "bad magic")
        assert str(vault_copy) in str(e)


@pytest.mark.parametrize("version", [4, 0, 0xFFFF])
def test_unknown_versions(vault_copy: Path, vault_config: Path, version: int) -> None:
    good = vault_copy.read_bytes()
    bad = bytearray(good)
    struct.pack_into(">H", bad, 8, version)
    for data in (bytes(bad), rechecksum(bytes(bad)[:-32])):  # with and without a fixed checksum
        e = assert_refused(vault_copy, vault_config, data, SnapshotVersionError)
        assert isinstance(e, SnapshotCorrupt)
        assert isinstance(e, SnapshotVersionError) and e.version == version
        assert str(version) in str(e)
        if version > 1:
            assert "newer" in str(e)
        else:
            assert "newer" not in str(e)


def test_attacker_recomputes_the_checksum_over_a_changed_payload(
    vault_copy: Path, vault_config: Path
) -> None:
    good = vault_copy.read_bytes()
    lay = Layout(good)
    for index in (lay.payload_start, lay.payload_start + lay.plen // 2, lay.payload_end - 1):
        bad = rechecksum(flip(good, index)[:-32])
        assert_refused(vault_copy, vault_config, bad, SnapshotTampered, "failed authentication")


def test_attacker_changes_the_header_and_recomputes_the_checksum(
    vault_copy: Path, vault_config: Path
) -> None:
    """The header is the AEAD's associated data: any change to it fails authentication."""
    good = vault_copy.read_bytes()
    header = Layout(good).header
    rolled_back = dict(header, generation=int(header["generation"]) - 1)
    assert_refused(
        vault_copy,
        vault_config,
        with_header(good, rolled_back),
        SnapshotTampered,
        "failed authentication",
    )
    extra = dict(header, note="x")
    assert_refused(
        vault_copy,
        vault_config,
        with_header(good, extra),
        SnapshotTampered,
        "failed authentication",
    )


def test_attacker_header_that_is_not_json(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    assert_refused(
        vault_copy, vault_config, with_header(good, b"{not json"), SnapshotTampered, "header"
    )
    assert_refused(
        vault_copy, vault_config, with_header(good, b"[1,2]"), SnapshotTampered, "header"
    )


def test_attacker_removes_every_key_slot(vault_copy: Path, vault_config: Path) -> None:
    good = vault_copy.read_bytes()
    header = dict(Layout(good).header, slots=[])
    assert_refused(
        vault_copy, vault_config, with_header(good, header), SnapshotTampered, "key slots"
    )


def test_attacker_edits_a_key_slot(vault_copy: Path, vault_config: Path) -> None:
    """A changed slot no longer unwraps the master key. Cryptographically this cannot be told
    apart from a wrong passphrase (both are a failed unwrap), so it is AuthenticationFailed."""
    good = vault_copy.read_bytes()
    header = Layout(good).header
    slot = dict(header["slots"][0], id="evil0000")
    bad = with_header(good, dict(header, slots=[slot]))
    assert_refused(vault_copy, vault_config, bad, AuthenticationFailed)


def test_a_backup_with_damage_is_refused_and_the_vault_is_unchanged(
    vault_copy: Path, vault_config: Path, tmp_path: Path
) -> None:
    from strongroom.keystore import vault_restore

    open_and_use(vault_config)  # moves the vault into the store
    good_file = tmp_path / "good.snap"
    with strongroom.open(vault_config) as ks:
        ks.vault.backup(good_file)  # type: ignore[attr-defined]
    good = good_file.read_bytes()
    backup = tmp_path / "backup.snap"
    cases: list[tuple[bytes, type[StrongroomError]]] = [
        (good[:100], SnapshotTruncated),
        (flip(good, len(good) // 2), SnapshotTampered),
        (b"NOTVAULT" + good[8:], SnapshotCorrupt),
    ]
    for bad, expected in cases:
        backup.write_bytes(bad)
        with strongroom.open(vault_config) as ks:
            with pytest.raises(StrongroomError) as info:
                vault_restore(ks, backup)
            assert type(info.value) is expected
            assert str(backup) in str(info.value)
        assert names_on_disk(vault_config) == (set(KEYS), set(KEYS))
        assert backup.read_bytes() == bad
    open_and_use(vault_config)


# -- two writers ----------------------------------------------------------------------------------
def names_on_disk(cfg: Path) -> tuple[set[str], set[str]]:
    with strongroom.open(cfg) as ks:
        return {r.name for r in vault_records(ks)}, {k.name for k in ks.keys()}


def test_two_keystores_in_one_process_keep_each_others_keys(vault_config: Path) -> None:
    ks1 = strongroom.open(vault_config)
    ks2 = strongroom.open(vault_config)
    try:
        assert ks1.vault is not ks2.vault
        ks1.generate("a1", "ed25519")
        ks2.generate("b1", "ed25519")  # b's vault loaded before a1 existed; it must reload
        ks1.generate("a2", "aes-256")
        ks2.generate("b2", "ecdsa-p256")
        ks2.delete("a1")
        # each sees the other's keys, with working material
        ks1.verify("b2", DATA, ks1.sign("b2", DATA))
        ks2.verify("b1", DATA, ks2.sign("b1", DATA))
        assert ks2.decrypt("a2", ks1.encrypt("a2", DATA)) == DATA
    finally:
        ks1.close()
        ks2.close()
    records, catalog = names_on_disk(vault_config)
    assert records == {"a2", "b1", "b2"}
    assert catalog == records


def _child_generates(cfg: Path, prefix: str, count: int) -> None:
    """Runs in a forked child; never returns."""
    code = 1
    try:
        with strongroom.open(cfg) as ks:
            for i in range(count):
                ks.generate(f"{prefix}{i}", "ed25519")
        code = 0
    finally:
        os._exit(code)


def test_two_processes_writing_at_once_lose_nothing(vault_config: Path) -> None:
    with strongroom.open(vault_config) as ks:
        ks.generate("first", "ed25519")
    count = 12
    pids = []
    for prefix in ("p", "q"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            _child_generates(vault_config, prefix, count)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    records, catalog = names_on_disk(vault_config)
    expected = {"first"} | {f"{p}{i}" for p in "pq" for i in range(count)}
    assert records == expected
    assert catalog == expected
    with strongroom.open(vault_config) as ks:
        for name in ("p0", f"q{count - 1}"):
            ks.verify(name, DATA, ks.sign(name, DATA))


def test_restore_brings_keys_back(vault_copy: Path, vault_config: Path, tmp_path: Path) -> None:
    from strongroom.keystore import vault_restore

    backup = tmp_path / "b.snap"
    with strongroom.open(vault_config) as ks:
        pub = ks.public_key("ed")
        ks.vault.backup(backup)  # type: ignore[attr-defined]
        ks.delete("ed")
        ks.generate("new", "ed25519")
    with strongroom.open(vault_config) as ks:
        report = vault_restore(ks, backup)
        assert report["added"] == ["ed"] and report["removed"] == ["new"]
        pub.verify(ks.sign("ed", DATA), DATA)  # type: ignore[union-attr,call-arg]
    records, catalog = names_on_disk(vault_config)
    assert records == catalog == set(KEYS)


# -- hostile headers: every number bounded before use, found by an adversarial run --------------
HOSTILE_SLOT_FIELDS = [
    {"ops": 10**9},  # hours of Argon2id
    {"ops": 17},
    {"ops": 0},
    {"mem": 1 << 60},  # OverflowError / MemoryError
    {"mem": 5 << 30},
    {"mem": 1024},
    {"ops": float("inf")},  # written as Infinity: OverflowError in int()
    {"mem": float("nan")},
    {"ops": "3"},
    {"ops": True},
    {"ops": 3.0},
    {"kdf": "argon2i13"},
    {"salt": None},
]


@pytest.mark.parametrize("fields", HOSTILE_SLOT_FIELDS, ids=[str(f) for f in HOSTILE_SLOT_FIELDS])
def test_a_key_slot_asking_for_a_hostile_kdf_is_tampering(
    vault_copy: Path, vault_config: Path, fields: dict[str, object]
) -> None:
    good = vault_copy.read_bytes()
    header = Layout(good).header
    slot = dict(header["slots"][0], **fields)
    bad = with_header(good, dict(header, slots=[slot]))
    assert_refused(vault_copy, vault_config, bad, SnapshotTampered, "is damaged")


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError
        b'{"vault_id":"x","generation":Infinity,"slots":[]}',
        b'{"vault_id":"x","generation":-1,"slots":[]}',
        b'{"vault_id":7,"generation":1,"slots":[]}',
        b'{"vault_id":"x","generation":1,"slots":{}}',
        b'{"vault_id":"x","generation":1,"slots":[1]}',
        b'{"vault_id":"x","generation":1,"slots":[{"method":null}]}',
        b"\xff\xfe",
    ],
    ids=["deep", "infinity", "negative", "id", "slots", "slot", "method", "utf8"],
)
def test_a_malformed_header_is_tampering(vault_copy: Path, vault_config: Path, raw: bytes) -> None:
    good = vault_copy.read_bytes()
    assert_refused(
        vault_copy, vault_config, with_header(good, raw), SnapshotTampered, "header is not valid"
    )


def test_restoring_a_backup_with_a_hostile_kdf_is_refused(
    vault_copy: Path, vault_config: Path, tmp_path: Path
) -> None:
    good = vault_copy.read_bytes()
    header = Layout(good).header
    slot = dict(header["slots"][0], ops=10**9, mem=1 << 60)
    backup = tmp_path / "backup.snap"
    backup.write_bytes(with_header(good, dict(header, slots=[slot])))
    r = run_cli(vault_config, "vault", "restore", str(backup))
    assert r.returncode == CORRUPT_EXIT, r.stderr
    assert r.stderr.count("\n") == 1 and "is damaged" in r.stderr, r.stderr
    assert vault_copy.read_bytes() == good
    open_and_use(vault_config)


def test_unlock_stays_interruptible_during_a_costly_kdf(
    vault_copy: Path, vault_config: Path
) -> None:
    """The most a slot may ask for (16 passes over 4 GiB) takes minutes: SIGTERM must still
    end the process at once, not when Argon2id is done (Python runs signal handlers only
    between bytecodes of the main thread, so the derivation runs in a worker thread)."""
    good = vault_copy.read_bytes()
    header = Layout(good).header
    slot = dict(header["slots"][0], ops=16, mem=4 << 30)
    vault_copy.write_bytes(with_header(good, dict(header, slots=[slot])))
    env = dict(os.environ, STRONGROOM_CONFIG=str(vault_config))
    env[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    child = subprocess.Popen(
        [str(STRONGROOM_BIN), "key", "sign", "ed"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        status = Path(f"/proc/{child.pid}/status")
        for _ in range(600):  # until Argon2id has touched 256 MiB (at most a minute)
            rss = next(
                (
                    int(x.split()[1])
                    for x in status.read_text().splitlines()
                    if x.startswith("VmRSS")
                ),
                0,
            )
            if rss > 256 * 1024 or child.poll() is not None:
                break
            time.sleep(0.1)
        assert child.poll() is None, "the derivation ended before it could be interrupted"
        # Aimed at the derivation's thread: kill(2) with a thread's id is still directed at
        # the process, but the kernel hands it to that thread if it does not block it.
        workers = [int(t) for t in os.listdir(f"/proc/{child.pid}/task") if int(t) != child.pid]
        assert workers, "the derivation should run in a worker thread"
        for tid in workers:
            os.kill(tid, signal.SIGTERM)
        # A margin of seconds against a derivation of minutes: only an ignored signal fails.
        assert child.wait(timeout=30) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert vault_copy.read_bytes() != good  # the tampered file is left as it was
