"""The tamper-evident audit log: hash chain, checkpoints, HMACed inputs, refusal, concurrency.

The vault is the real backend; signatures and hashes are also checked with openssl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import strongroom
from strongroom.audit import read_records, verify_log
from strongroom.audit.log import GENESIS, checkpoint_message, fingerprint, line_hash
from strongroom.errors import AuditUnavailable, ConfigError, IntegrityError, KeyNotFound

CORRUPT, USAGE, AUDIT_UNAVAILABLE = 9, 2, 13


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    return write_vault_config(tmp_path)


def log_of(cfg: Path) -> Path:
    return cfg.parent / "data" / "audit.jsonl"


def with_keystore_line(cfg: Path, line: str) -> Path:
    text = cfg.read_text().replace("[keystore]\n", f"[keystore]\n{line}\n", 1)
    cfg.write_text(text)
    return cfg


@pytest.fixture
def made(cfg: Path) -> tuple[Path, ed25519.Ed25519PublicKey]:
    """A log of 12 records and a checkpoint in the middle; returns (log, checkpoint key)."""
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")  # 2 records: started, ok
        for i in range(4):
            ks.sign("k", b"message %d" % i)
        ks.audit_checkpoint()  # + generate of the checkpoint key, + checkpoint
        for i in range(4):
            ks.sign("k", b"more %d" % i)
        public = ks.audit_public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    return log_of(cfg), public


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(new))


def rechain(records: list[bytes]) -> list[bytes]:
    """What an attacker with write access does after an edit: fix every seq and prev."""
    out, prev = [], GENESIS
    for seq, raw in enumerate(records, start=1):
        rec = json.loads(raw)
        rec["seq"], rec["prev"] = seq, prev
        line = json.dumps(rec, separators=(",", ":")).encode()
        prev = line_hash(line)
        out.append(line + b"\n")
    return out


# -- the chain -----------------------------------------------------------------------------------
def test_a_good_log_verifies_with_its_checkpoint_key(
    made: tuple[Path, ed25519.Ed25519PublicKey],
) -> None:
    log, public = made
    report = verify_log(log, public)
    assert report.ok and report.first_bad is None, report
    # generate (2), 4 signs, checkpoint-key generate, checkpoint, 4 signs, close checkpoint
    assert report.records == 13 and report.first_seq == 1 and report.last_seq == 13
    assert report.checkpoints == report.checkpoints_verified == 2
    assert report.last_checkpoint_seq == 13 and report.unsigned_tail == 0
    assert report.last_hash == line_hash(lines(log)[-1].rstrip(b"\n"))
    seqs = [r["seq"] for r in read_records(log, since_seq=0, limit=1000)]
    assert seqs == list(range(1, 14))
    assert [r["seq"] for r in read_records(log, since_seq=10, limit=2)] == [11, 12]
    report.raise_if_tampered()  # no-op


def test_chain_hashes_and_checkpoint_signature_check_out_with_openssl(
    made: tuple[Path, ed25519.Ed25519PublicKey], tmp_path: Path
) -> None:
    log, public = made
    raw = lines(log)
    # a record's prev is the SHA-256 of the line before, as openssl computes it
    (tmp_path / "line").write_bytes(raw[4].rstrip(b"\n"))
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r", str(tmp_path / "line")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert json.loads(raw[5])["prev"] == out
    cp = next(json.loads(x) for x in raw if json.loads(x)["op"] == "checkpoint")
    (tmp_path / "msg").write_bytes(checkpoint_message(cp["covers"], cp["prev"]))
    import base64

    (tmp_path / "sig").write_bytes(base64.b64decode(cp["sig"]))
    (tmp_path / "pub.pem").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    p = subprocess.run(
        "openssl pkeyutl -verify -pubin -inkey pub.pem -rawin -in msg -sigfile sig".split(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0 and "Signature Verified Successfully" in p.stdout, p
    assert cp["signer"] == fingerprint(public)


@pytest.mark.parametrize(
    ("change", "line", "seq", "words"),
    [
        ("edit", 5, 5, "altered"),
        ("delete", 5, 5, "missing"),
        ("reorder", 5, 6, "out of order"),
        ("insert-copy", 5, 4, "copy of line 4"),
        ("insert-forged", 5, 5, "inserted"),
        ("garbage", 5, None, "not a valid record"),
        ("junk-line", 5, None, "not a valid record (inserted)"),
        ("junk-tail", 14, None, "not a valid record"),
        ("cut-head", 1, 3, "starts at seq 3"),
    ],
)
def test_each_tampering_is_detected_and_the_first_bad_record_named(
    made: tuple[Path, ed25519.Ed25519PublicKey],
    change: str,
    line: int,
    seq: int | None,
    words: str,
) -> None:
    log, public = made
    raw = lines(log)
    if change == "edit":
        raw[4] = raw[4].replace(b'"result":"ok"', b'"result":"PolicyViolation"')
    elif change == "delete":
        del raw[4]
    elif change == "reorder":
        raw[4], raw[5] = raw[5], raw[4]
    elif change == "insert-copy":
        raw.insert(4, raw[3])
    elif change == "insert-forged":
        forged = json.loads(raw[4])  # seq 5, chained to seq 4 the way a writer would
        forged["key"] = "someone-elses"
        raw.insert(4, json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    elif change == "garbage":
        raw[4] = b'{"seq": oops\n'
    elif change == "junk-line":  # a line between two records that still chain: not a stub
        raw.insert(4, b"hello\n")
    elif change == "junk-tail":  # an unterminated last line that no writer would leave
        raw.append(b'{"seq":99,')
    elif change == "cut-head":
        del raw[:2]
    rewrite(log, raw)
    report = verify_log(log, public)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.line, report.first_bad.seq) == (line, seq), report.first_bad
    assert words in report.first_bad.reason
    with pytest.raises(IntegrityError, match=f"line {line}"):
        report.raise_if_tampered()


def test_a_rewritten_chain_is_caught_by_the_checkpoint_signature(
    made: tuple[Path, ed25519.Ed25519PublicKey],
) -> None:
    log, public = made
    raw = lines(log)
    raw[3] = raw[3].replace(b'"result":"ok"', b'"result":"KeyNotFound"')
    rewrite(log, rechain(raw))  # every prev and seq recomputed: the chain itself is whole
    report = verify_log(log, public)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.seq == 8 and "signature does not verify" in report.first_bad.reason
    # without the key only the chain is checked, and it is whole: the warning says so
    unchecked = verify_log(log, None)
    assert unchecked.ok and any("not checked" in w for w in unchecked.warnings)


def test_checkpoints_signed_by_another_key_are_rejected(
    made: tuple[Path, ed25519.Ed25519PublicKey],
) -> None:
    log, public = made
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    report = verify_log(log, other)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.seq == 8 and "another key" in report.first_bad.reason
    # an attacker re-signs every checkpoint with a key of their own: the real key says no
    import base64

    attacker = ed25519.Ed25519PrivateKey.generate()
    raw = [json.loads(x) for x in lines(log)]
    out, prev = [], GENESIS
    for rec in raw:
        rec["prev"] = prev
        if rec["op"] == "checkpoint":
            rec["signer"] = fingerprint(attacker.public_key())
            rec["sig"] = base64.b64encode(
                attacker.sign(checkpoint_message(rec["covers"], prev))
            ).decode()
        line = json.dumps(rec, separators=(",", ":")).encode()
        prev = line_hash(line)
        out.append(line + b"\n")
    rewrite(log, out)
    assert verify_log(log, attacker.public_key()).ok  # self-consistent ...
    forged = verify_log(log, public)  # ... but not under the pinned key
    assert not forged.ok and forged.first_bad is not None and forged.first_bad.seq == 8


def test_an_anchor_catches_a_cut_tail(made: tuple[Path, ed25519.Ed25519PublicKey]) -> None:
    log, public = made
    good = verify_log(log, public)
    anchor = (good.last_seq or 0, good.last_hash)
    raw = lines(log)
    rewrite(log, raw[:-3])  # the last records and the closing checkpoint removed
    cut = verify_log(log, public)
    assert cut.ok and cut.unsigned_tail == 2  # from the file alone: no evidence
    assert any("covered by no signature" in w for w in cut.warnings)
    anchored = verify_log(log, public, anchor)
    assert not anchored.ok and anchored.first_bad is not None
    assert "no longer in the log" in anchored.first_bad.reason
    # the whole log rewritten and re-chained after an edit: the anchor's hash differs
    edited = [x.replace(b'"result":"ok"', b'"result":"Nope"', 1) for x in raw]
    rewrite(log, rechain(edited))
    changed = verify_log(log, None, anchor)
    assert not changed.ok and changed.first_bad is not None
    assert (changed.first_bad.line, changed.first_bad.seq) == (13, 13)
    assert "anchored hash" in changed.first_bad.reason


def test_a_torn_write_is_reported_and_the_chain_continues_past_it(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.sign("k", b"a")
    log = log_of(cfg)
    with log.open("ab") as f:  # a crash in the middle of a record
        f.write(b'{"seq":4,"time":1.0,"actor":"x","op":"si')
    torn_line = len(lines(log))
    report = verify_log(log)
    assert report.ok and report.torn == [torn_line]
    with strongroom.open(cfg) as ks:  # the next writer starts a fresh line after the stub
        ks.sign("k", b"b")
    report = verify_log(log)
    assert report.ok and report.torn == [torn_line], report
    assert report.last_seq == 4
    assert any("cut short" in w for w in report.warnings)


def test_a_writer_that_finds_its_log_cut_records_it_in_the_chain(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        for i in range(3):
            ks.sign("k", b"%d" % i)
        log = log_of(cfg)
        raw = lines(log)
        rewrite(log, raw[:-2])  # someone removes the last two records under the writer
        ks.sign("k", b"after")
    records = read_records(log, limit=100)
    note = records[-2]
    assert note["op"] == "audit_log_shrank" and note["seq"] == 4
    assert (note["expected_seq"], note["found_seq"]) == (5, 3)
    report = verify_log(log)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.line, report.first_bad.seq) == (4, 4)
    assert "cut back" in report.first_bad.reason


def test_paging_through_a_large_log_by_seq(tmp_path: Path) -> None:
    from strongroom.audit import Audit, last_seq

    log = tmp_path / "audit.jsonl"
    assert last_seq(log) == 0 and read_records(log) == []
    audit = Audit("file", log, "pager")
    n = 3000  # about 600 KB: read_records bisects to the page instead of reading it all
    for i in range(n):
        audit.record("sign", f"key-{i}", "ok", "vault", b"%d" % i, size=i)
    audit.close()
    assert last_seq(log) == n
    for since in (0, 1, 1234, 2999, n - 10):
        page = read_records(log, since_seq=since, limit=7)
        assert [r["seq"] for r in page] == list(range(since + 1, min(since + 8, n + 1)))
        assert all(r["key"] == f"key-{r['seq'] - 1}" for r in page)
    assert read_records(log, since_seq=n) == []
    newest = read_records(log, since_seq=last_seq(log) - 3, limit=100)
    assert [r["seq"] for r in newest] == [n - 2, n - 1, n]
    with pytest.raises(strongroom.errors.InvalidArgument):
        read_records(log, limit=0)


# -- inputs as HMACs -------------------------------------------------------------------------------
def test_inputs_are_recorded_only_as_hmacs_that_an_auditor_can_match(
    cfg: Path, tmp_path: Path
) -> None:
    secret_input = b"wire 1,000,000 to account 12345"
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.generate("aes", "aes-256")
        sig = ks.sign("k", secret_input)
        ks.verify("k", secret_input, sig)
        ct = ks.encrypt("aes", secret_input)
        ks.decrypt("aes", ct)
        expected = ks.audit.hmac(secret_input)
    log = log_of(cfg)
    text = log.read_text()
    assert secret_input.decode() not in text and secret_input.hex() not in text
    assert sig.hex() not in text and ct.hex() not in text
    by_op = {r["op"]: r for r in read_records(log, limit=1000) if r["result"] == "ok"}
    assert by_op["sign"]["input"] == by_op["verify"]["input"] == by_op["encrypt"]["input"]
    assert by_op["sign"]["input"] == expected and expected.startswith("hmac-sha256:")
    assert by_op["decrypt"]["input"] != expected  # the ciphertext's HMAC, not the plaintext's
    # the salt is not in the log, and it lives mode 600 next to it
    key_file = log.with_name("audit.key")
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_bytes().hex() not in text
    # an auditor with the key computes the same value: with the CLI, and with openssl
    (tmp_path / "probe").write_bytes(secret_input)
    r = run_cli(cfg, "audit", "hash", "--in", str(tmp_path / "probe"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == expected
    hexkey = f"hexkey:{key_file.read_bytes().hex()}"
    mac = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            hexkey,
            "-r",
            str(tmp_path / "probe"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert expected == "hmac-sha256:" + mac
    # a different input does not match
    other = run_cli(cfg, "audit", "hash", input=b"wire 2,000,000 to account 12345")
    assert other.stdout.decode().strip() != expected


def test_a_lost_hmac_key_is_replaced_and_the_change_is_in_the_chain(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        old = ks.audit.hmac(b"m")
    key_file = log_of(cfg).with_name("audit.key")
    key_file.unlink()
    with strongroom.open(cfg) as ks:
        ks.sign("k", b"m")
        assert ks.audit.hmac(b"m") != old
    records = read_records(log_of(cfg), limit=10)
    assert [r["op"] for r in records] == ["generate", "generate", "audit_key_created", "sign"]
    report = verify_log(log_of(cfg))
    assert report.ok and any("new HMAC key" in w for w in report.warnings)
    # a damaged key refuses instead of being replaced silently
    key_file.write_bytes(b"short")
    with pytest.raises(AuditUnavailable, match="damaged"):
        strongroom.open(cfg)


def test_a_log_from_before_chaining_keeps_its_lines_and_the_chain_starts_after(
    cfg: Path,
) -> None:
    log = log_of(cfg)
    log.parent.mkdir(parents=True)
    old = b'{"time":1.0,"actor":"a","op":"sign","key":"k","backend":"vault","result":"ok"}\n'
    log.write_bytes(old * 2)
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
    report = verify_log(log)
    assert report.ok and report.legacy == 2 and report.first_seq == 1
    assert lines(log)[:2] == [old, old]
    raw = lines(log)
    del raw[2]  # the chain's first record: the log now starts at seq 2
    rewrite(log, raw)
    cut = verify_log(log)
    assert not cut.ok and cut.first_bad is not None and cut.first_bad.line == 3


# -- refusal --------------------------------------------------------------------------------------
def test_no_result_when_the_log_cannot_be_written(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        fd = ks.audit._fd
        assert fd is not None
        os.close(fd)  # the log is now open read-only: EBADF on write
        ks.audit._fd = os.open(log_of(cfg), os.O_RDONLY)
        with pytest.raises(AuditUnavailable, match="cannot"):
            ks.sign("k", b"x")
        with pytest.raises(AuditUnavailable):
            ks.delete("k")  # refused before it acts: the key is still there
        assert ks.info("k").name == "k"
        os.close(ks.audit._fd)
        ks.audit._fd = os.open(log_of(cfg), os.O_RDWR | os.O_APPEND)  # a writable log again
        ks.sign("k", b"x")
    assert verify_log(log_of(cfg)).ok


FULL_DISK_CHILD = textwrap.dedent(
    """
    import os, resource, sys
    import strongroom
    from strongroom.errors import AuditUnavailable
    ks = strongroom.open(sys.argv[1])
    log = sys.argv[2]
    ks.sign("k", b"warm up")
    size = os.path.getsize(log)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
    try:
        sig = ks.sign("k", b"must not be signed")
    except AuditUnavailable as e:
        print("refused:", e)
        assert os.path.getsize(log) == size, "the partial record was not cut back"
    else:
        print("SIGNED", sig.hex())
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    ks.sign("k", b"after")
    """
)


def test_a_full_file_refuses_the_signature_and_leaves_no_half_record(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
    log = log_of(cfg)
    p = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(cfg), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert "refused:" in p.stdout and "short write" in p.stdout and "SIGNED" not in p.stdout
    report = verify_log(log)
    assert report.ok and not report.torn, report
    assert [r["result"] for r in read_records(log, limit=100) if r["op"] == "sign"] == ["ok"] * 2


def test_an_unwritable_log_refuses_in_the_cli_with_one_line(cfg: Path) -> None:
    assert run_cli(cfg, "key", "generate", "k", "--type", "ed25519").returncode == 0
    log = log_of(cfg)
    log.unlink()
    log.mkdir()  # even root cannot open a directory for writing
    r = run_cli(cfg, "key", "sign", "k", input=b"data")
    assert r.returncode == AUDIT_UNAVAILABLE and r.stdout == b""
    assert r.stderr.count("\n") == 1 and "audit log" in r.stderr and "Traceback" not in r.stderr


# -- several writers ------------------------------------------------------------------------------
WRITER_CHILD = textwrap.dedent(
    """
    import sys
    import strongroom
    with strongroom.open(sys.argv[1], actor=sys.argv[2]) as ks:
        for i in range(int(sys.argv[3])):
            ks.sign("k", b"%d" % i)
    """
)


def test_two_processes_appending_keep_one_valid_chain(cfg: Path) -> None:
    with_keystore_line(cfg, "audit_checkpoint_every = 50")
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.audit_checkpoint()
        public = ks.audit_public_key()
    n = 300
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(cfg), f"writer-{i}", str(n)])
        for i in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    log = log_of(cfg)
    report = verify_log(log, public)
    assert report.ok, report.first_bad
    records = read_records(log, limit=10_000)
    signs = [r for r in records if r["op"] == "sign"]
    assert len(signs) == 2 * n
    assert {r["actor"] for r in signs} == {"writer-0", "writer-1"}
    assert report.checkpoints >= 2 * (n // 50)  # each writer signs every 50 of its records
    assert report.unsigned_tail == 0  # both closed with a checkpoint


def test_a_forked_child_and_its_parent_keep_one_chain(tmp_path: Path) -> None:
    from strongroom.audit import Audit

    log = tmp_path / "audit.jsonl"
    audit = Audit("file", log, "parent")
    audit.record("start", None, "ok")
    n = 400
    pid = os.fork()
    if pid == 0:  # the child: its own descriptor, so the flock keeps it apart from the parent
        code = 0
        try:
            for _ in range(n):
                audit.record("sign", "k", "ok", "vault", b"child")
        except BaseException:
            code = 1
        os._exit(code)
    for _ in range(n):
        audit.record("sign", "k", "ok", "vault", b"parent")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    audit.close()
    report = verify_log(log)
    assert report.ok, report.first_bad
    assert report.records == 2 * n + 1


def test_periodic_checkpoints_every_n_records(cfg: Path) -> None:
    with_keystore_line(cfg, "audit_checkpoint_every = 5")
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        for _ in range(12):
            ks.sign("k", b"x")
        public = ks.audit_public_key()
    report = verify_log(log_of(cfg), public)
    assert report.ok and report.checkpoints >= 3 and report.checkpoints_verified >= 3


def test_automatic_checkpoints_never_unlock_a_locked_vault(cfg: Path) -> None:
    with_keystore_line(cfg, "audit_checkpoint_every = 3")
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.audit_checkpoint()
        ks.vault_control().lock()
        for i in range(10):  # records from operations that do not need the vault
            ks.audit.record("app_event", None, "ok", None, None, n=i)
        assert ks.vault.status()["unlocked"] is False
    records = read_records(log_of(cfg), limit=100)
    assert [r["op"] for r in records].count("checkpoint") == 1  # only the explicit one
    assert verify_log(log_of(cfg)).ok


def test_detail_values_are_json(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.audit.record("app_event", None, "ok", None, None, yes=True, no=False, n=7, x=None)
        ks.audit.record("app_event", None, "ok", None, None, f=1.5, s='quote " and \\')
    first, second = read_records(log_of(cfg), limit=10)
    assert (first["yes"], first["no"], first["n"], first["x"]) == (True, False, 7, None)
    assert (second["f"], second["s"]) == ("1.5", 'quote " and \\')
    assert verify_log(log_of(cfg)).ok


def test_the_checkpoint_key_cannot_be_reached_from_a_user_namespace(cfg: Path) -> None:
    with strongroom.open(cfg) as ks:
        ks.audit_checkpoint()
        assert "checkpoints" not in [k.name for k in ks.keys()]
        with pytest.raises(KeyNotFound):
            ks.sign("checkpoints", checkpoint_message(1, GENESIS))
    with_keystore_line(cfg, 'namespace = "_audit"')
    with pytest.raises(ConfigError, match="reserved"):
        strongroom.open(cfg)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("audit_checkpoint_every = -1", "integer"),
        ('audit_checkpoint_every = "10"', "integer"),
        ('audit_signing_backend = "nope"', "no [backends.nope]"),
        ('audit_signing_key = "has space"', "key name"),
    ],
)
def test_bad_audit_config_is_a_config_error(cfg: Path, line: str, words: str) -> None:
    with_keystore_line(cfg, line)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        strongroom.open(cfg)


def test_audit_off_writes_nothing_and_keeps_working(cfg: Path) -> None:
    with_keystore_line(cfg, 'audit = "off"')
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.sign("k", b"x")
        assert ks.audit_checkpoint() is None
    assert not log_of(cfg).exists() and not log_of(cfg).with_name("audit.key").exists()


def test_audit_log_mode_carries_the_input_hmac(cfg: Path, caplog: pytest.LogCaptureFixture) -> None:
    with_keystore_line(cfg, 'audit = "log"')
    with caplog.at_level("INFO", logger="strongroom.audit"), strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
        ks.sign("k", b"private words")
        mac = ks.audit.hmac(b"private words")
    assert mac in caplog.text and "private words" not in caplog.text
    assert not log_of(cfg).exists()


# -- CLI ----------------------------------------------------------------------
def test_cli_verify_list_checkpoint_and_one_line_errors(cfg: Path, tmp_path: Path) -> None:
    def ok(*args: str, **kw: object) -> bytes:
        r = run_cli(cfg, *args, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, r.stderr
        return r.stdout

    ok("key", "generate", "k", "--type", "ed25519")
    ok("key", "sign", "k", input=b"data")
    out = ok("audit", "checkpoint").decode()
    assert "checkpoint seq 5 signs records 1-4" in out
    ok("audit", "public-key", "--out", str(tmp_path / "audit.pem"))
    out = ok("audit", "verify", "--public-key", str(tmp_path / "audit.pem")).decode()
    assert out.startswith("audit log OK: 5 records (seq 1-5), 1 checkpoint(s), 1 verified")
    report = json.loads(ok("--json", "audit", "verify"))
    assert report["ok"] and report["checkpoints_verified"] == 1 and report["last_seq"] == 5
    listed = json.loads(ok("--json", "audit", "list", "--since", "2", "--limit", "2"))
    assert [r["seq"] for r in listed] == [3, 4] and listed[0]["op"] == "sign"
    log = log_of(cfg)
    raw = lines(log)
    raw[2] = raw[2].replace(b'"op":"sign"', b'"op":"verify"')
    rewrite(log, raw)
    r = run_cli(cfg, "audit", "verify", "--public-key", str(tmp_path / "audit.pem"))
    assert r.returncode == CORRUPT and r.stderr.count("\n") == 1
    assert "line 3 (seq 3)" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(cfg, "--json", "audit", "verify", "--public-key", str(tmp_path / "audit.pem"))
    assert r.returncode == CORRUPT and json.loads(r.stdout)["first_bad"]["line"] == 3
    for args, code, words in [
        (("audit", "verify", "--file", str(tmp_path / "absent.jsonl")), USAGE, "cannot read"),
        (("audit", "verify", "--public-key", str(cfg)), USAGE, "not a PEM or DER"),
        (("audit", "verify", "--anchor", "3:xyz"), USAGE, "SEQ:HASH"),
        (("audit", "hash", "--file", str(tmp_path / "x.jsonl")), USAGE, "no audit HMAC key"),
    ]:
        r = run_cli(cfg, *args)
        assert r.returncode == code, (args, r)
        assert r.stderr.count("\n") == 1 and words in r.stderr and "Traceback" not in r.stderr


def test_cached_fields_and_plain_integer_details_encode_as_json_does(tmp_path: Path) -> None:
    """The hot path caches the JSON of the fixed fields and writes some integer details by
    hand; what it writes must parse to exactly what was recorded, whatever the values."""
    from strongroom.audit import Audit, current_principal

    log = tmp_path / "audit.jsonl"
    audit = Audit("file", log, 'ops "team" \u00e9')
    cases: list[dict[str, object]] = [
        {"size": 64, "version": 2, "status": 403, "suppressed": 0, "wait_seconds": 10},
        {"size": True, "version": None, "status": 'x"y', "wait_seconds": -3},
        {"size": 2**70, "other": 5, "suppressed": 12},
    ]
    try:
        for principal in (None, "acme:app", 'we"ird\n'):
            token = current_principal.set(principal)
            try:
                for detail in cases:
                    for key in (None, "k", 'a"b\\c'):
                        audit.record("sign", key, "ok", "vault", b"in", **detail)  # type: ignore[arg-type]
            finally:
                current_principal.reset(token)
    finally:
        audit.close()
    records = [json.loads(line) for line in log.read_bytes().splitlines()]
    assert len(records) == 3 * len(cases) * 3
    i = 0
    for principal in (None, "acme:app", 'we"ird\n'):
        for detail in cases:
            for key in (None, "k", 'a"b\\c'):
                r = records[i]
                i += 1
                assert r["actor"] == (principal or 'ops "team" \u00e9')
                assert (r["op"], r["key"], r["backend"], r["result"]) == (
                    "sign",
                    key,
                    "vault",
                    "ok",
                )
                for name, value in detail.items():
                    expected = (
                        value if value is None or isinstance(value, bool | int) else str(value)
                    )
                    assert r[name] == expected, (name, value, r)
    assert verify_log(log).ok


@pytest.mark.parametrize("key_len", [0, 1, 32, 64, 65, 100])
@pytest.mark.parametrize("payload_len", [0, 1, 55, 64, 1000, 300_000])
def test_native_append_matches_the_python_reference(
    tmp_path: Path, key_len: int, payload_len: int
) -> None:
    """native/auditline.c writes the line the Python path would: the same layout, the
    input as HMAC-SHA256 (checked against hmac.digest), the chain hash of the line."""
    import hashlib
    import hmac as hmac_mod
    import re

    from strongroom import _native

    path = tmp_path / "log"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        key, payload = os.urandom(key_len), os.urandom(payload_len)
        fixed, tail, prev = '"actor":"a","op":"sign","key":"k"', ',"size":5', GENESIS
        assert _native.audit_append(fd, 1, 1, fixed, key, payload, tail, prev) is None  # size
        assert path.read_bytes() == b""
        size, digest = _native.audit_append(fd, 0, 1, fixed, key, payload, tail, prev)
        line = path.read_bytes()
        assert size == len(line) and line.endswith(b"\n")
        record = line[:-1]
        assert digest == hashlib.sha256(record).hexdigest() == line_hash(record)
        mac = hmac_mod.digest(key, payload, "sha256").hex()
        m = re.fullmatch(
            rb'\{"seq":1,"time":(\d+\.\d{6}),"actor":"a","op":"sign","key":"k",'
            rb'"input":"hmac-sha256:([0-9a-f]{64})","size":5,"prev":"([0-9a-f]{64})"\}',
            record,
        )
        assert m is not None, record
        assert m.group(2).decode() == mac and m.group(3).decode() == prev
        assert abs(float(m.group(1)) - __import__("time").time()) < 60
        # without a payload there is no input field; the next record chains to this one
        size2, _ = _native.audit_append(fd, size, 2, fixed, key, None, "", digest)
        second = path.read_bytes()[size:]
        assert b'"input"' not in second and second.endswith(f'"prev":"{digest}"}}\n'.encode())
        assert size2 == size + len(second)
    finally:
        os.close(fd)


def test_a_payload_that_is_not_one_buffer_is_recorded_as_its_bytes(tmp_path: Path) -> None:
    from strongroom.audit import Audit
    from strongroom.audit.log import input_hmac, key_path_for, load_key

    log = tmp_path / "audit.jsonl"
    audit = Audit("file", log, "me")
    data = bytearray(range(64))
    strided = memoryview(data)[::2]  # not contiguous: no C function takes it as it is
    audit.record("sign", "k", "ok", "vault", strided, size=32)
    audit.record("sign", "k", "ok", "vault", bytes(strided), size=32)
    audit.close()
    first, second = (json.loads(line) for line in log.read_bytes().splitlines())
    key = load_key(key_path_for(log), create=False)
    assert first["input"] == second["input"] == input_hmac(key, bytes(strided))
    assert verify_log(log).ok


def test_a_signal_interrupts_the_wait_for_another_writers_lock(tmp_path: Path) -> None:
    """While another open file holds the log's flock, the native append waits without the
    GIL; a signal's Python handler still runs during that wait, and nothing is written."""
    import fcntl
    import signal
    import threading

    from strongroom.audit import Audit

    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm()

    log = tmp_path / "audit.jsonl"
    audit = Audit("file", log, "me")
    audit.record("sign", "k", "ok", "vault", b"first", size=5)
    before = log.read_bytes()
    other = os.open(log, os.O_RDWR)
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        # Only against a hang: if the handler waited for the lock, the watchdog's unlock would
        # let "second" be written before the Alarm, and the log check below fails. No
        # assertion on how long the handler took (a loaded machine may take seconds).
        watchdog = threading.Timer(120, fcntl.flock, (other, fcntl.LOCK_UN))
        watchdog.start()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(Alarm):
                audit.record("sign", "k", "ok", "vault", b"second", size=6)
        finally:
            watchdog.cancel()
        assert log.read_bytes() == before  # interrupted while another writer held the lock
        fcntl.flock(other, fcntl.LOCK_UN)
        audit.record("sign", "k", "ok", "vault", b"third", size=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(other)
        audit.close()
    assert verify_log(log).ok and verify_log(log).records == 2


def test_the_record_time_does_not_follow_the_locale(tmp_path: Path) -> None:
    """printf's %f takes its decimal point from LC_NUMERIC; the native append must not.
    The test compiles a German locale (decimal comma) with localedef into tmp_path."""
    import shutil

    locales = tmp_path / "locales"
    locales.mkdir()
    made = shutil.which("localedef") and subprocess.run(
        ["localedef", "-i", "de_DE", "-f", "UTF-8", str(locales / "de_DE.UTF-8")],
        capture_output=True,
    )
    if not made or made.returncode != 0:
        pytest.skip("localedef cannot make de_DE.UTF-8 here")
    script = textwrap.dedent(
        """
        import locale, pathlib, sys
        locale.setlocale(locale.LC_ALL, "de_DE.UTF-8")
        assert locale.localeconv()["decimal_point"] == ","
        from strongroom.audit import Audit
        a = Audit("file", pathlib.Path(sys.argv[1]), "me")
        a.record("sign", "k", "ok", "vault", b"x", size=1)
        a.close()
        """
    )
    log = tmp_path / "audit.jsonl"
    env = {**os.environ, "LOCPATH": str(locales)}
    subprocess.run([sys.executable, "-c", script, str(log)], check=True, env=env)
    record = json.loads(log.read_bytes().splitlines()[0])
    assert isinstance(record["time"], float)
    assert verify_log(log).ok


def test_audited_writes_a_started_record_first_only_when_asked_to(cfg: Path) -> None:
    """`Keystore.audited(write_ahead=True)` records `started` before the operation acts (so an
    unwritable log refuses it first); without it only the result is recorded. The keystore's
    own list of write-ahead operations does not name the callers' operations."""
    with strongroom.open(cfg) as ks:
        with ks.audited("tenant_create", None, write_ahead=True, tenant="t1"):
            pass
        with ks.audited("tenant_create", None, tenant="t2"):
            pass
        with pytest.raises(KeyNotFound), ks.audited("app_change", "k", write_ahead=True):
            raise KeyNotFound("k")
    records = [(r["op"], r.get("tenant"), r["key"], r["result"]) for r in read_records(log_of(cfg))]
    assert records[-5:] == [
        ("tenant_create", "t1", None, "started"),
        ("tenant_create", "t1", None, "ok"),
        ("tenant_create", "t2", None, "ok"),
        ("app_change", None, "k", "started"),
        ("app_change", None, "k", "KeyNotFound"),
    ]
