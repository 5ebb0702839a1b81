"""Key versions and lifecycle on the software vault: rotation, min_decryption_version, trim,
disable/enable, scheduled deletion, rewrap, and the catalog migration from schema 1 to 2."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import (
    CATALOG_V1_SCHEMA,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    CliResult,
    run_cli,
    write_vault_config,
)
from cryptography.exceptions import InvalidSignature

import strongroom
from strongroom import lifecycle
from strongroom.backends.vault.backend import VaultBackend
from strongroom.catalog import SCHEMA_VERSION, Catalog, CatalogError
from strongroom.errors import (
    DataFormatError,
    IntegrityError,
    InvalidArgument,
    KeyDisabled,
    KeyNotFound,
    PolicyViolation,
    VersionRetired,
)
from strongroom.keystore import Keystore

POLICY, NOT_FOUND, CORRUPT, USAGE = 8, 3, 9, 2


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    return write_vault_config(tmp_path)


@pytest.fixture
def ks(config: Path) -> Iterator[Keystore]:
    with strongroom.open(config) as keystore:
        yield keystore


def vault_handles(ks: Keystore) -> set[str]:
    """The handles the vault itself holds (not what the catalog says)."""
    vault = ks.vault
    assert isinstance(vault, VaultBackend)
    return {i.handle for i in vault.records()}


# -- rotation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["aes-256", "chacha20-poly1305", "rsa-2048"])
def test_rotation_round_trips_across_versions(ks: Keystore, key_type: str) -> None:
    usage = "encrypt,decrypt" if key_type == "rsa-2048" else None
    first = ks.generate("k", key_type, usage=usage)
    assert first.version == 1
    aad = b"" if key_type == "rsa-2048" else b"ctx"
    made = {1: ks.encrypt("k", b"one", aad, envelope=True)}
    for v in (2, 3):
        info = ks.rotate("k")
        assert info.version == v and info.type.value == key_type and info.usage == first.usage
        made[v] = ks.encrypt("k", f"v{v}".encode(), aad, envelope=True)
    assert [v.version for v in ks.versions("k")] == [1, 2, 3]
    assert len({v.handle for v in ks.versions("k")}) == 3  # three distinct backend keys
    for v, ct in made.items():
        assert lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, ct, "ciphertext")[0] == v
        assert ks.decrypt("k", ct, aad, envelope=True) == (b"one" if v == 1 else f"v{v}".encode())
    # a bare ciphertext decrypts with the version it was made with, and only with that one
    bare = ks.encrypt("k", b"bare", aad)
    assert ks.decrypt("k", bare, aad) == b"bare"
    with pytest.raises(IntegrityError):
        ks.decrypt("k", bare, aad, version=2)
    # changing the version in the prefix picks another key: authentication fails
    forged = lifecycle.pack(lifecycle.CIPHERTEXT_MAGIC, 2, made[1][lifecycle.HEADER_SIZE :])
    with pytest.raises(IntegrityError):
        ks.decrypt("k", forged, aad, envelope=True)


def test_signatures_carry_their_version(ks: Keystore) -> None:
    ks.generate("s", "ed25519")
    old = ks.sign("s", b"msg", envelope=True)
    old_bare = ks.sign("s", b"msg")
    old_pub = ks.public_key("s")
    ks.rotate("s")
    assert ks.public_key("s") != old_pub
    new = ks.sign("s", b"msg", envelope=True)
    ks.verify("s", b"msg", old, envelope=True)
    ks.verify("s", b"msg", new, envelope=True)
    ks.verify("s", b"msg", old_bare, version=1)
    with pytest.raises(InvalidSignature):
        ks.verify("s", b"msg", old_bare)  # the primary is version 2 now
    with pytest.raises(InvalidSignature):
        ks.verify("s", b"other", old, envelope=True)
    with pytest.raises(DataFormatError):
        ks.verify("s", b"msg", old_bare, envelope=True)
    with pytest.raises(VersionRetired, match="no version 7"):
        ks.verify(
            "s", b"msg", lifecycle.pack(lifecycle.SIGNATURE_MAGIC, 7, old_bare), envelope=True
        )


def test_min_decryption_version_is_enforced(ks: Keystore) -> None:
    ks.generate("k", "aes-256")
    ks.generate("s", "ecdsa-p256")
    ct1 = ks.encrypt("k", b"old", envelope=True)
    sig1 = ks.sign("s", b"m", envelope=True)
    ks.rotate("k")
    ks.rotate("s")
    ct2 = ks.encrypt("k", b"new", envelope=True)
    with pytest.raises(InvalidArgument, match="above the newest"):
        ks.set_min_decryption_version("k", 3)
    info = ks.set_min_decryption_version("k", 2)
    assert info.min_decryption_version == 2
    ks.set_min_decryption_version("s", 2)
    with pytest.raises(VersionRetired, match="retired"):
        ks.decrypt("k", ct1, envelope=True)
    with pytest.raises(VersionRetired):
        ks.rewrap("k", ct1)
    with pytest.raises(VersionRetired):
        ks.verify("s", b"m", sig1, envelope=True)
    assert ks.decrypt("k", ct2, envelope=True) == b"new"
    # not destroyed yet: lowering it again brings version 1 back (as in Vault's transit)
    ks.set_min_decryption_version("k", 1)
    assert ks.decrypt("k", ct1, envelope=True) == b"old"
    # trim destroys what is below it, for good
    ks.set_min_decryption_version("k", 2)
    before = vault_handles(ks)
    old_handle = ks.versions("k")[0].handle
    assert ks.trim("k") == [1]
    assert old_handle in before and old_handle not in vault_handles(ks)
    assert [v.version for v in ks.versions("k")] == [2]
    with pytest.raises(InvalidArgument, match="trimmed"):
        ks.set_min_decryption_version("k", 1)
    with pytest.raises(VersionRetired):
        ks.decrypt("k", ct1, envelope=True)
    # a catalog reopened from disk keeps the setting
    ks.close()


def test_rewrap_moves_to_the_newest_version(ks: Keystore) -> None:
    ks.generate("k", "aes-256")
    ct1 = ks.encrypt("k", b"payload", b"aad", envelope=True)
    ks.rotate("k")
    ks.rotate("k")
    moved = ks.rewrap("k", ct1, b"aad")
    assert lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, moved, "ciphertext")[0] == 3
    with pytest.raises(IntegrityError):
        ks.rewrap("k", ct1, b"wrong aad")  # rewrap authenticates before it re-encrypts
    ks.set_min_decryption_version("k", 3)
    assert ks.decrypt("k", moved, b"aad", envelope=True) == b"payload"
    with pytest.raises(DataFormatError):
        ks.rewrap("k", b"not versioned at all")
    ops = [
        json.loads(line) for line in (ks.config.data_dir / "audit.jsonl").read_text().splitlines()
    ]
    rewraps = [o for o in ops if o.get("op") == "rewrap"]
    assert rewraps and "payload" not in json.dumps(rewraps)


def test_rotate_refuses_what_it_cannot(ks: Keystore) -> None:
    ks.generate("k", "aes-256")
    with pytest.raises(InvalidArgument, match="no backend named"):
        ks.rotate("k", backend="nope")
    with pytest.raises(KeyNotFound):
        ks.rotate("missing")
    ks.disable("k")
    with pytest.raises(KeyDisabled):
        ks.rotate("k")
    assert ks.info("k").version == 1


# -- disable, enable, deletion ------------------------------------------------------------------
def test_disable_and_enable(ks: Keystore) -> None:
    ks.generate("k", "aes-256")
    ks.generate("s", "ed25519")
    ct = ks.encrypt("k", b"x", envelope=True)
    sig = ks.sign("s", b"m")
    assert ks.disable("k").disabled and ks.disable("s").disabled
    for call in (
        lambda: ks.encrypt("k", b"x"),
        lambda: ks.decrypt("k", ct, envelope=True),
        lambda: ks.sign("s", b"m"),
        lambda: ks.verify("s", b"m", sig),
    ):
        with pytest.raises(KeyDisabled, match="disabled"):
            call()
    assert isinstance(KeyDisabled("x"), PolicyViolation)
    ks.public_key("s")  # metadata and public keys stay readable
    assert ks.info("k").to_dict()["disabled"] is True
    assert not ks.enable("k").disabled
    assert ks.decrypt("k", ct, envelope=True) == b"x"


def test_scheduled_deletion_can_be_cancelled_and_is_carried_out_when_due(
    ks: Keystore,
) -> None:
    ks.generate("keep", "aes-256")
    ks.generate("doomed", "aes-256")
    ks.rotate("doomed")
    ct = ks.encrypt("keep", b"x", envelope=True)
    info = ks.schedule_deletion("keep", timedelta(days=7))
    assert info is not None and info.delete_after is not None
    with pytest.raises(KeyDisabled, match="scheduled for deletion"):
        ks.decrypt("keep", ct, envelope=True)
    with pytest.raises(InvalidArgument, match="already scheduled"):
        ks.schedule_deletion("keep", timedelta(days=1))
    assert ks.purge_due() == []  # not due
    assert ks.cancel_deletion("keep").delete_after is None
    assert ks.decrypt("keep", ct, envelope=True) == b"x"
    with pytest.raises(InvalidArgument, match="not scheduled"):
        ks.cancel_deletion("keep")

    handles = {v.handle for v in ks.versions("doomed")}
    assert handles <= vault_handles(ks)
    ks.schedule_deletion("doomed", timedelta(seconds=1))
    assert handles <= vault_handles(ks)  # nothing destroyed during the wait
    time.sleep(1.1)
    assert [i.name for i in ks.purge_due()] == ["doomed"]
    assert not handles & vault_handles(ks)  # every version's backend key is gone
    with pytest.raises(KeyNotFound):
        ks.info("doomed")

    # a due key is also destroyed by the next attempt to use it
    ks.generate("lazy", "aes-256")
    ks.schedule_deletion("lazy", timedelta(seconds=1))
    time.sleep(1.1)
    with pytest.raises(KeyNotFound):
        ks.encrypt("lazy", b"x")
    assert "lazy" not in {k.name for k in ks.keys()}
    events = [json.loads(x) for x in (ks.config.data_dir / "audit.jsonl").read_text().splitlines()]
    carried = {
        (e["key"], e["result"])
        for e in events
        if e["op"] == "delete" and e.get("scheduled") and e["result"] != "started"
    }
    assert carried == {("doomed", "ok"), ("lazy", "ok")}


def test_configured_wait_and_zero_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    cfg = write_vault_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[keystore]\n", '[keystore]\ndeletion_wait = "30d"\n'))
    with strongroom.open(cfg) as ks:
        assert ks.config.deletion_wait == timedelta(days=30)
        ks.generate("k", "aes-256")
        info = ks.schedule_deletion("k")
        assert info is not None and info.delete_after is not None
        assert timedelta(days=29) < info.delete_after - info.created < timedelta(days=31)  # type: ignore[operator]
        ks.generate("now", "aes-256")
        assert ks.schedule_deletion("now", timedelta(0)) is None
        assert "now" not in {k.name for k in ks.keys()}
    bad = write_vault_config(tmp_path, name="bad.toml")
    bad.write_text(bad.read_text().replace("[keystore]\n", '[keystore]\ndeletion_wait = "soon"\n'))
    with pytest.raises(strongroom.ConfigError, match="deletion_wait"):
        strongroom.open(bad)


def test_parse_duration() -> None:
    assert lifecycle.parse_duration("30s") == timedelta(seconds=30)
    assert lifecycle.parse_duration("12h") == timedelta(hours=12)
    assert lifecycle.parse_duration(7) == timedelta(days=7)
    for bad in ("", "7w", "-1d", "1.5d"):
        with pytest.raises(InvalidArgument):
            lifecycle.parse_duration(bad)


# -- catalog migration (schema 1: conftest.CATALOG_V1_SCHEMA) -----------------------------------
def test_catalog_v1_is_migrated_in_place_without_losing_keys(config: Path) -> None:
    with strongroom.open(config) as ks:
        ks.generate("signer", "ecdsa-p256")
        ks.generate("aes", "aes-256", exportable=True)
        sig = ks.sign("signer", b"data")
        ct = ks.encrypt("aes", b"secret", envelope=True)
        path = ks.catalog.path
        # A schema 1 catalog lived beside a vault snapshot file (before the store).
        ks.vault.backup(path.parent / "vault.snapshot")  # type: ignore[attr-defined]
        rows = ks.catalog.store.execute(
            "SELECT namespace, name, backend, handle, type, usage, exportable, version, created, "
            "attributes FROM keys"
        ).fetchall()
    # Rebuild the catalog file exactly as schema 1 wrote it, with the same rows.
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    db = sqlite3.connect(path)
    db.executescript(CATALOG_V1_SCHEMA)
    db.executemany("INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()

    with strongroom.open(config) as ks:
        assert ks.catalog.schema_version == SCHEMA_VERSION == 4
        assert {k.name for k in ks.keys()} == {"signer", "aes"}
        aes = ks.info("aes")
        assert aes.exportable and aes.version == 1 and aes.min_decryption_version == 1
        assert not aes.disabled and aes.delete_after is None
        assert [(v.version, v.handle) for v in ks.versions("aes")] == [(1, aes.handle)]
        ks.verify("signer", b"data", sig)
        assert ks.decrypt("aes", ct, envelope=True) == b"secret"
        ks.rotate("aes")
        assert ks.decrypt("aes", ct, envelope=True) == b"secret"
    # the migration ran once; reopening changes nothing
    with strongroom.open(config) as ks:
        assert [v.version for v in ks.versions("aes")] == [1, 2]


def test_catalog_refuses_a_newer_schema_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(CATALOG_V1_SCHEMA.replace("'1'", "'5'"))
    db.close()
    with pytest.raises(CatalogError, match="schema version 5"):
        Catalog(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta").fetchone() == ("5",)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "key_versions" not in tables  # the refused migration left nothing behind
    assert "certificates" not in tables
    db.close()


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_rotation_and_lifecycle(config: Path) -> None:
    def run(*args: str, input: bytes = b"") -> CliResult:
        return run_cli(config, *args, input=input)

    def ok(*args: str, input: bytes = b"") -> CliResult:
        r = run(*args, input=input)
        assert r.returncode == 0, r.stderr
        return r

    def fails(r: CliResult, code: int, text: str) -> None:
        assert r.returncode == code, r
        assert r.stderr.count("\n") == 1 and text in r.stderr and "Traceback" not in r.stderr

    ok("key", "generate", "k", "--type", "aes-256")
    ok("key", "generate", "s", "--type", "ed25519")
    ct1 = ok("key", "encrypt", "k", input=b"first").stdout
    bare1 = ok("key", "encrypt", "k", "--raw", input=b"bare").stdout
    assert bare1[:3] != b"SRK"
    sig1 = config.parent / "sig1"
    ok("key", "sign", "s", "--envelope", "--out", str(sig1), input=b"msg")
    assert sig1.read_bytes()[:4] == lifecycle.SIGNATURE_MAGIC
    rotated = json.loads(ok("--json", "key", "rotate", "k").stdout)
    assert rotated["version"] == 2
    ok("key", "rotate", "s")
    assert ok("key", "decrypt", "k", input=ct1).stdout == b"first"
    assert ok("key", "decrypt", "k", "--raw", "--version", "1", input=bare1).stdout == b"bare"
    fails(run("key", "decrypt", "k", "--raw", input=bare1), CORRUPT, "failed authentication")
    ok("key", "verify", "s", "--envelope", "--signature", str(sig1), input=b"msg")
    versions = json.loads(ok("--json", "key", "versions", "k").stdout)
    assert [(v["version"], v["primary"]) for v in versions] == [(1, False), (2, True)]
    moved = ok("key", "rewrap", "k", input=ct1).stdout
    assert lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, moved, "ciphertext")[0] == 2
    ok("key", "config", "k", "--min-decryption-version", "2")
    fails(run("key", "decrypt", "k", input=ct1), POLICY, "retired")
    assert ok("key", "decrypt", "k", input=moved).stdout == b"first"
    assert "retired" in ok("key", "versions", "k").stdout.decode()
    fails(run("key", "config", "k", "--min-decryption-version", "5"), USAGE, "above the newest")
    # disable / enable
    ok("key", "disable", "k")
    fails(run("key", "encrypt", "k", input=b"x"), POLICY, "disabled")
    ok("key", "enable", "k")
    # scheduled deletion and cancel; the default wait (0) deletes at once
    out = ok("key", "delete", "k", "--after", "7d").stdout.decode()
    assert "will be deleted at" in out
    fails(run("key", "encrypt", "k", input=b"x"), POLICY, "scheduled for deletion")
    # not due for 7 days: purge deletes nothing and says so; the key is still there
    assert ok("key", "purge").stdout.decode() == "no deletion is due\n"
    assert json.loads(ok("--json", "key", "purge").stdout) == {"deleted": []}
    ok("key", "show", "k")
    ok("key", "delete", "--cancel", "k")
    ok("key", "encrypt", "k", input=b"x")
    fails(run("key", "delete", "k", "--now", "--cancel"), USAGE, "only one of")
    fails(run("key", "delete", "k", "--after", "soon"), USAGE, "bad waiting period")
    assert "deleted" in ok("key", "delete", "s").stdout.decode()
    fails(run("key", "show", "s"), NOT_FOUND, "no key named 's'")
    # a deletion that is due: purge carries it out and names the key
    ok("key", "generate", "gone", "--type", "aes-256")
    ok("key", "delete", "gone", "--after", "1s")
    time.sleep(1.1)
    assert ok("key", "purge").stdout.decode() == "deleted 'gone'\n"
    fails(run("key", "show", "gone"), NOT_FOUND, "no key named 'gone'")
    assert ok("key", "purge").stdout.decode() == "no deletion is due\n"
    fails(run("key", "decrypt", "k", input=b"SRK\x02\x00\x00\x00\x01xxxx"), CORRUPT, "format 2")


def test_openssl_verifies_an_old_version_signature(config: Path) -> None:
    d = config.parent
    for args in (
        ("key", "generate", "ec", "--type", "ecdsa-p256"),
        ("key", "sign", "ec", "--envelope", "--in", str(config), "--out", str(d / "sig.sr")),
        ("key", "rotate", "ec"),
        ("key", "public", "ec", "--version", "1", "--out", str(d / "v1.pem")),
        ("key", "public", "ec", "--out", str(d / "v2.pem")),
    ):
        r = run_cli(config, *args)
        assert r.returncode == 0, r.stderr
    enveloped = (d / "sig.sr").read_bytes()
    version, bare = lifecycle.unpack(lifecycle.SIGNATURE_MAGIC, enveloped, "signature")
    assert version == 1
    (d / "sig.der").write_bytes(bare)

    def openssl_verify(pub: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", pub, "-signature", "sig.der", str(config)],
            cwd=d,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

    assert openssl_verify("v1.pem").returncode == 0
    assert openssl_verify("v2.pem").returncode != 0  # the new version's key does not match


def test_vault_backup_and_restore_keep_every_version(ks: Keystore, tmp_path: Path) -> None:
    from strongroom.keystore import vault_restore

    ks.generate("k", "aes-256")
    ct1 = ks.encrypt("k", b"one", envelope=True)
    ks.rotate("k")
    ct2 = ks.encrypt("k", b"two", envelope=True)
    backup = tmp_path / "backup.snap"
    ks.vault_control().backup(backup)
    report = vault_restore(ks, backup)
    assert report == {"keys": 2, "added": [], "removed": [], "conflicts": []}
    assert ks.decrypt("k", ct1, envelope=True) == b"one"
    assert ks.decrypt("k", ct2, envelope=True) == b"two"


@pytest.mark.parametrize("curve", ["ecdsa-p256", "ecdsa-p384", "secp256k1"])
def test_raw_ec_import_stores_the_standard_pkcs8(ks: Keystore, curve: str) -> None:
    """The vault writes a raw EC import's PKCS#8 itself, in guarded memory (so no freed
    library buffer keeps the key, see test_memory_scan.py); it must be what OpenSSL makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = {
        "ecdsa-p256": ec.SECP256R1(),
        "ecdsa-p384": ec.SECP384R1(),
        "secp256k1": ec.SECP256K1(),
    }
    key = ec.generate_private_key(curves[curve])
    size = (key.curve.key_size + 7) // 8
    scalar = bytearray(key.private_numbers().private_value.to_bytes(size, "big"))
    ks.import_key("ec", curve, scalar, format="raw", exportable=True)
    want = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert ks.export_key("ec", "der") == want
    assert ks.public_key("ec") == key.public_key()
    with pytest.raises(InvalidArgument):
        ks.import_key("bad", curve, bytes(size), format="raw")  # zero is not a valid scalar


def test_two_rotations_racing_cannot_both_win(config: Path) -> None:
    """Two keystores (as two processes would) read version 1; the catalog lets only one
    record version 2 (`Keystore.rotate` then destroys the loser's new backend key)."""
    from strongroom.catalog import now
    from strongroom.errors import KeyExists
    from strongroom.types import KeyVersion

    with strongroom.open(config) as a, strongroom.open(config) as b:
        a.generate("k", "aes-256")
        assert b.info("k").version == 1
        a.catalog.add_version("default", "k", KeyVersion(2, "vault", now(), "h-a", {}))
        with pytest.raises(KeyExists):
            b.catalog.add_version("default", "k", KeyVersion(2, "vault", now(), "h-b", {}))
        assert [(v.version, v.handle) for v in b.versions("k")][-1] == (2, "h-a")
        assert b.info("k").handle == "h-a"  # b sees a's write at once (the change stamp)


def test_rotate_destroys_its_new_backend_key_when_the_catalog_refuses(
    ks: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strongroom.errors import KeyExists

    ks.generate("k", "aes-256")
    before = vault_handles(ks)

    def refuse(*args: object) -> None:  # stands in for a rotation that won the race
        raise KeyExists("k version 2")

    monkeypatch.setattr(ks.catalog, "add_version", refuse)
    with pytest.raises(KeyExists):
        ks.rotate("k")
    assert vault_handles(ks) == before  # the new version's vault key is gone again
    assert ks.info("k").version == 1
