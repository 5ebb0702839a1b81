"""The audit log's format, and reading and verifying it (docs/audit.md).

One JSON object per line. Every record carries `seq` (1, 2, 3, ...) and `prev`, the hex
SHA-256 of the previous record's line (its bytes without the newline; 64 zeros before the
first record): a hash chain. Now and then a `checkpoint` record signs (`covers`, `prev`),
that is the whole chain up to it, with a keystore key kept in the reserved namespace
`_audit`. Inputs (the data given to sign, verify, encrypt, decrypt) appear only as
`hmac-sha256:<hex>` under a secret per-log key that is not in the log.

This module reads and checks logs; `writer.Audit` writes them, and `signer.CheckpointSigner`
states what signs its checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .. import strictjson
from ..errors import AuditUnavailable, IntegrityError, InvalidArgument, StrongroomError
from ..types import KeyType

GENESIS = "0" * 64
"""`prev` of the first record."""
CHECKPOINT_OP = "checkpoint"
KEY_CREATED_OP = "audit_key_created"
"""Written when a writer has to make the HMAC key of a log that already has records."""
SHRANK_OP = "audit_log_shrank"
"""Written by a writer that finds the log shorter than it left it (records were cut)."""
AUDIT_NAMESPACE = "_audit"
"""The reserved catalog namespace of the checkpoint signing key: no Keystore opened on a
user namespace can reach it, so nobody can make it sign anything but checkpoints."""
DEFAULT_SIGNING_KEY = "checkpoints"
CHECKPOINT_CONTEXT = b"strongroom-audit-checkpoint-v1\n"
INPUT_PREFIX = "hmac-sha256:"
KEY_BYTES = 32


class ChainLog(Protocol):
    """The log kept in the store's database instead of a file, one line a row, appended
    one at a time across every node (`strongroom.store_chain.ChainTable`; docs/audit.md,
    "In the database"). Database trouble raises StorageError."""

    location: str

    def append(self, build: Callable[[int, str], str]) -> tuple[int, str]:
        """Append `build(tail_seq, tail_hash)` as the next record, atomically with reading
        the tail; return its (seq, hash)."""
        ...

    def append_body(self, body: str) -> tuple[int, str]:
        """Append `{"seq":N,<body>,"prev":"<tail hash>"}` as the next record in one go (the
        tail read and the insert atomic); return its (seq, hash)."""
        ...

    def tail(self) -> tuple[int, str]: ...

    def lines(self, since: int = 0, limit: int | None = None) -> list[bytes]:
        """The records' lines after seq `since`, in seq order."""
        ...

    def close(self) -> None: ...


# -- hashing -----------------------------------------------------------------------------------
def line_hash(line: bytes) -> str:
    """The chain hash of one record: SHA-256 of its line without the newline, in hex."""
    return hashlib.sha256(line).hexdigest()


def checkpoint_message(covers: int, chain: str) -> bytes:
    """What a checkpoint signs: a fixed context, the last covered seq and that record's hash."""
    return CHECKPOINT_CONTEXT + f"{covers}\n{chain}\n".encode()


def fingerprint(public: PublicKeyTypes) -> str:
    """SHA-256 of the public key's SubjectPublicKeyInfo DER, in hex."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def key_path_for(log: Path) -> Path:
    """Where the HMAC key of the log `log` lives: `audit.jsonl` -> `audit.key`, same dir."""
    return log.with_name(log.stem + ".key")


def load_key(path: Path, create: bool) -> bytes:
    """The log's secret HMAC key (32 random bytes, mode 600); made on first use if `create`."""
    return open_key(path, create)[0]


def open_key(path: Path, create: bool) -> tuple[bytes, bool]:
    """(key, made now). Creation is race-free between processes and threads: the key is
    written to a temp file of a random name and linked into place, so whoever loses the
    race reads the winner's key."""
    try:
        return _read_key(path), False
    except FileNotFoundError:
        if not create:
            raise InvalidArgument(f"no audit HMAC key at {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    made = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            made = True
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise AuditUnavailable(f"cannot create the audit HMAC key {path}: {e.strerror}") from None
    return _read_key(path), made


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AuditUnavailable(f"cannot read the audit HMAC key {path}: {e.strerror}") from None
    try:
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise AuditUnavailable(
            f"the audit HMAC key {path} is damaged ({len(data)} bytes, expected {KEY_BYTES})"
        )
    return data


def input_hmac(key: bytes, data: bytes | bytearray | memoryview) -> str:
    """How an input appears in the log: `hmac-sha256:` and the hex HMAC-SHA256 under `key`."""
    return INPUT_PREFIX + hmac.digest(key, data, "sha256").hex()


# -- parsing -----------------------------------------------------------------------------------
def parse_record(line: bytes) -> dict[str, Any] | None:
    """The record on `line`, or None when the line is not a chained record."""
    try:
        obj = strictjson.loads(line)
    except ValueError:
        return None
    if (
        not isinstance(obj, dict)
        or type(obj.get("seq")) is not int
        or not isinstance(obj.get("prev"), str)
    ):
        return None
    return obj


def find_tail(read: Any, size: int) -> tuple[int, str, bool]:
    """(seq, hash, ends_with_newline) of the last record in a file of `size` bytes.

    `read(n, offset)` reads bytes. Reads backwards in growing chunks. A last line without
    its newline (a write cut short) still counts when it is a whole record. A file with no
    chained record (empty, or lines from before chaining) gives (0, GENESIS).
    """
    if size == 0:
        return 0, GENESIS, True
    chunk = 8192
    while True:
        start = max(0, size - chunk)
        data = read(size - start, start)
        lines = data.split(b"\n")
        ends_nl = data.endswith(b"\n")
        if ends_nl:
            lines.pop()
        first = 0 if start == 0 else 1  # the first piece of a mid-file chunk may be partial
        for line in reversed(lines[first:]):
            rec = parse_record(line)
            if rec is not None:
                return rec["seq"], line_hash(line), ends_nl
        if start == 0:
            return 0, GENESIS, ends_nl
        chunk *= 4


# -- verifying ---------------------------------------------------------------------------------
@dataclass
class Problem:
    """The first bad record: its line (1-based), its seq when known, and what is wrong."""

    line: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.reason}"


@dataclass
class VerifyReport:
    """What `verify_log` found. `ok` is False only for evidence of tampering."""

    path: str
    ok: bool = True
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = GENESIS
    checkpoints: int = 0
    checkpoints_verified: int = 0
    last_checkpoint_seq: int | None = None
    unsigned_tail: int = 0
    signer: str | None = None
    legacy: int = 0
    torn: list[int] = field(default_factory=list)
    first_bad: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "checkpoints": self.checkpoints,
            "checkpoints_verified": self.checkpoints_verified,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "unsigned_tail": self.unsigned_tail,
            "signer": self.signer,
            "legacy": self.legacy,
            "torn_lines": list(self.torn),
            "first_bad": None
            if self.first_bad is None
            else {
                "line": self.first_bad.line,
                "seq": self.first_bad.seq,
                "reason": self.first_bad.reason,
            },
            "warnings": list(self.warnings),
        }

    def raise_if_tampered(self) -> None:
        """Raise IntegrityError (exit code 9) naming the first bad record."""
        if not self.ok:
            raise IntegrityError(f"audit log {self.path} was tampered with: {self.first_bad}")


def _lines(data: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, terminated) for each line."""
    pieces = data.split(b"\n")
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        if i == last:
            if piece:
                yield i + 1, piece, False
            return
        yield i + 1, piece, True


def verify_log(
    path: str | os.PathLike[str],
    public_key: PublicKeyTypes | None = None,
    anchor: tuple[int, str] | None = None,
) -> VerifyReport:
    """Check the chain and the checkpoints of the log at `path`; name the first bad record.

    With `public_key`, every checkpoint must be signed by that key (else it counts as
    tampering); without it, checkpoint signatures are not checked and a warning says so.
    `anchor` = (seq, hash) noted earlier from a verified log (e.g. its last checkpoint):
    the log must still hold that record unchanged, which catches a cut or rewritten tail.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the audit log {p}: {e.strerror}") from None
    return verify_data(data, str(p), public_key, anchor)


def verify_chain(
    chain: ChainLog,
    public_key: PublicKeyTypes | None = None,
    anchor: tuple[int, str] | None = None,
) -> VerifyReport:
    """`verify_log` for the chain in the database: every row, in seq order, checked as the
    lines of a file are. A row deleted is a missing seq, a row edited breaks the chain."""
    data = b"".join(line + b"\n" for line in chain.lines())
    return verify_data(data, f"audit_chain in {chain.location}", public_key, anchor)


def chain_records(chain: ChainLog, since_seq: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """`read_records` for the chain in the database."""
    if not isinstance(limit, int) or limit < 1 or limit > 10_000:
        raise InvalidArgument("limit must be 1 to 10000")
    if not isinstance(since_seq, int) or since_seq < 0:
        raise InvalidArgument("since_seq must be 0 or more")
    out = [parse_record(line) for line in chain.lines(since_seq, limit)]
    return [r for r in out if r is not None]


def verify_data(
    data: bytes,
    name: str,
    public_key: PublicKeyTypes | None = None,
    anchor: tuple[int, str] | None = None,
) -> VerifyReport:
    """`verify_log` of the log's bytes; `name` says where they came from."""
    report = VerifyReport(name)
    want_fp = fingerprint(public_key) if public_key is not None else None
    report.signer = want_fp
    hashes: dict[int, tuple[str, int]] = {}  # seq -> (hash, line) of good records
    seqs_in_file: set[int] = set()
    parsed: list[tuple[int, bytes, bool, dict[str, Any] | None]] = []
    for number, line, terminated in _lines(data):
        rec = parse_record(line)
        if rec is not None:
            seqs_in_file.add(rec["seq"])
        parsed.append((number, line, terminated, rec))

    def bad(line: int, seq: int | None, reason: str) -> VerifyReport:
        report.ok = False
        report.first_bad = Problem(line, seq, reason)
        return report

    expect_seq = 1
    prev_hash = GENESIS
    prev_line = 0
    hash_before_prev = GENESIS  # hash of the good record before the last good one
    pending: list[int] = []  # unparseable lines since the last good record
    started = False
    since_checkpoint = 0
    for idx, (number, line, terminated, rec) in enumerate(parsed):
        if rec is None:
            if not started:
                try:
                    legacy = strictjson.loads(line)
                except ValueError:
                    legacy = None
                if isinstance(legacy, dict) and "seq" not in legacy:
                    report.legacy += 1
                    continue
            pending.append(number)
            continue
        seq, prev = rec["seq"], rec["prev"]
        if not started:
            started = True
            if seq != 1:
                return bad(
                    number,
                    seq,
                    f"the log starts at seq {seq}: records 1 to {seq - 1} were removed",
                )
        if seq != expect_seq or prev != prev_hash:
            if pending:
                return bad(
                    pending[0], None, "this line is not a valid record (altered or inserted)"
                )
            if seq == expect_seq:
                if prev_line == 0:
                    return bad(number, seq, "the first record does not start the chain")
                after = _next_record(parsed, idx)
                if after is not None and after["seq"] == seq and after["prev"] == prev_hash:
                    return bad(number, seq, "record inserted: it does not chain to the one before")
                return bad(
                    prev_line,
                    expect_seq - 1,
                    f"record altered: its hash is not the one record seq {seq} holds",
                )
            if seq < expect_seq:
                if line_hash(line) == prev_hash:
                    return bad(number, seq, f"record inserted: a copy of line {prev_line}")
                if seq == expect_seq - 1 and prev == hash_before_prev:
                    return bad(
                        prev_line,
                        expect_seq - 1,
                        "record inserted: the next record chains to the one before it",
                    )
                return bad(number, seq, f"out of order: seq {seq} where {expect_seq} was expected")
            if expect_seq in seqs_in_file:
                return bad(number, seq, f"out of order: seq {seq} where {expect_seq} was expected")
            gone = (
                f"record seq {expect_seq} is missing"
                if seq == expect_seq + 1
                else f"records seq {expect_seq} to {seq - 1} are missing"
            )
            return bad(number, expect_seq, f"{gone} (deleted)")
        for torn in pending:
            if not _is_stub(parsed[torn - 1][1], seq):
                return bad(torn, None, "this line is not a valid record (inserted)")
            report.torn.append(torn)
            report.warnings.append(
                f"line {torn} is a record whose write was cut short; the chain continues past it"
            )
        pending = []
        h = line_hash(line)
        if rec.get("op") == SHRANK_OP:
            return bad(
                number,
                seq,
                f"a writer found the log cut back: it expected seq {rec.get('expected_seq')}"
                f" and found seq {rec.get('found_seq')} (records removed)",
            )
        if rec.get("op") == KEY_CREATED_OP:
            report.warnings.append(
                f"line {number} (seq {seq}): a new HMAC key was made for this log; inputs "
                "recorded before it were HMACed under a key that is gone or was replaced"
            )
        if rec.get("op") == CHECKPOINT_OP:
            report.checkpoints += 1
            problem = _check_checkpoint(rec, public_key, want_fp)
            if problem is not None:
                return bad(number, seq, problem)
            if public_key is not None:
                report.checkpoints_verified += 1
            report.last_checkpoint_seq = seq
            since_checkpoint = 0
        else:
            since_checkpoint += 1
        hashes[seq] = (h, number)
        hash_before_prev = prev_hash
        prev_hash, prev_line = h, number
        report.records += 1
        report.first_seq = report.first_seq or seq
        report.last_seq = seq
        report.last_hash = h
        expect_seq += 1
        if not terminated:
            report.torn.append(number)
            report.warnings.append(
                f"line {number} (the last) has no newline: its write was cut short"
            )
    for torn in pending:
        last_line = parsed[-1][0] if parsed else 0
        unterminated = torn == last_line and not parsed[-1][2]
        if not unterminated or not _is_stub(parsed[torn - 1][1], expect_seq):
            return bad(torn, None, "this line is not a valid record (altered or appended)")
        report.torn.append(torn)
        report.warnings.append(f"line {torn} (the last) is incomplete: its write was cut short")
    report.unsigned_tail = since_checkpoint
    if report.records and since_checkpoint:
        report.warnings.append(
            f"{since_checkpoint} record(s) after the last checkpoint are covered by no "
            "signature: a cut or rewritten tail there cannot be detected from the file alone"
        )
    if public_key is None and report.checkpoints:
        report.warnings.append("checkpoint signatures were not checked: no public key given")
    if anchor is not None:
        aseq, ahash = anchor
        if aseq not in hashes:
            return bad(
                parsed[-1][0] if parsed else 0,
                aseq,
                f"the anchor record seq {aseq} is no longer in the log (its tail was cut)",
            )
        if hashes[aseq][0] != ahash.lower():
            return bad(hashes[aseq][1], aseq, f"record seq {aseq} no longer has the anchored hash")
    return report


def _is_stub(line: bytes, seq: int) -> bool:
    """Whether `line` can be the start of record `seq` cut short by a crash: what a writer
    leaves when its `write` stops early (the next writer then starts on a new line)."""
    start = b'{"seq":%d,' % seq
    return bool(line) and (line.startswith(start) or start.startswith(line))


def _next_record(
    parsed: list[tuple[int, bytes, bool, dict[str, Any] | None]], idx: int
) -> dict[str, Any] | None:
    for _, _, _, rec in parsed[idx + 1 :]:
        if rec is not None:
            return rec
    return None


def _check_checkpoint(
    rec: dict[str, Any], public_key: PublicKeyTypes | None, want_fp: str | None
) -> str | None:
    seq = rec["seq"]
    covers, sig, alg = rec.get("covers"), rec.get("sig"), rec.get("alg")
    if covers != seq - 1 or not isinstance(sig, str) or not isinstance(alg, str):
        return "malformed checkpoint"
    if public_key is None:
        return None
    if rec.get("signer") != want_fp:
        return f"checkpoint signed by another key (fingerprint {str(rec.get('signer'))[:16]}...)"
    from .. import algorithms

    try:
        algorithms.verify_signature(
            KeyType.parse(alg),
            public_key,
            checkpoint_message(covers, rec["prev"]),
            base64.b64decode(sig, validate=True),
            None,
        )
    except (InvalidSignature, StrongroomError, ValueError, TypeError):
        return "checkpoint signature does not verify: the records it covers were rewritten"
    return None


def read_records(
    path: str | os.PathLike[str], since_seq: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Up to `limit` records with seq greater than `since_seq`, oldest first.

    Lines that are not records (a write cut short) are skipped; this does not verify the
    chain (use `verify_log`).
    """
    if not isinstance(limit, int) or limit < 1 or limit > 10_000:
        raise InvalidArgument("limit must be 1 to 10000")
    if not isinstance(since_seq, int) or since_seq < 0:
        raise InvalidArgument("since_seq must be 0 or more")
    p = Path(path)
    out: list[dict[str, Any]] = []
    try:
        f = p.open("rb")
    except FileNotFoundError:
        return out
    except OSError as e:
        raise InvalidArgument(f"cannot read the audit log {p}: {e.strerror}") from None
    with f:
        if since_seq > 0:
            f.seek(_offset_before(f, since_seq))
        for line in f:
            if b'"seq":' not in line:
                continue
            rec = parse_record(line.rstrip(b"\n"))
            if rec is None or rec["seq"] <= since_seq:
                continue
            out.append(rec)
            if len(out) >= limit:
                break
    return out


def _offset_before(f: Any, seq: int) -> int:
    """A line start at or before the first record with seq > `seq`, found by bisection on
    byte offsets (seq grows along the file), so paging through a large log stays cheap.
    In a log whose order was tampered with this may start late; verify_log finds that."""
    lo, hi = 0, f.seek(0, os.SEEK_END)
    while hi - lo > 65536:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # to the next line start
        start = f.tell()
        rec = None
        while rec is None and f.tell() < hi:
            line = f.readline()
            rec = parse_record(line.rstrip(b"\n"))
        if rec is None or rec["seq"] > seq:
            hi = mid
        else:
            lo = start
    return lo


def last_seq(path: str | os.PathLike[str]) -> int:
    """The seq of the last record in the log (0 for an empty or missing log); reads only
    its tail. With `read_records(path, last_seq(path) - n)` a reader gets the newest n."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise InvalidArgument(f"cannot read the audit log {p}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        seq, _, _ = find_tail(lambda n, off: os.pread(fd, n, off), size)
        return seq
    finally:
        os.close(fd)
