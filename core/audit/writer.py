"""Audit events: who did what, with which key, and the result. Never a secret.

Sinks: `file` appends hash-chained JSON lines to `audit.jsonl` in the data dir (format
and checks in `log.py`, docs/audit.md), `log` sends events to the
`strongroom.audit` logger, `off` drops them.

Writing a `file` record: take the process's lock and an exclusive `flock` on the log,
compare the file's size with the size after this process's last record (equal: the
cached tail seq and hash are current; else read the tail from the file), write the
record with one `write(2)` on an O_APPEND descriptor, release. A failed or short write
is cut back off (`ftruncate` to the old size) and raises AuditUnavailable, which the
Keystore lets through instead of the operation's result.

The common case (this process wrote the tail) is one call into the native extension,
`_native.audit_append` (native/auditline.c): the same flock, size check, write and
cut-back, with the input's HMAC, the line and its chain hash made in C. Everything else
(another writer appended, a torn tail, a checkpoint) is the Python path, `_append`.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from base64 import b64encode
from collections.abc import Callable
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from .. import _native
from ..errors import AuditUnavailable, StorageError
from .log import (
    CHECKPOINT_OP,
    GENESIS,
    INPUT_PREFIX,
    KEY_CREATED_OP,
    SHRANK_OP,
    ChainLog,
    checkpoint_message,
    find_tail,
    input_hmac,
    key_path_for,
    open_key,
)
from .signer import CheckpointSignature, CheckpointSigner

AuditEvent = dict[str, Any]
logger = logging.getLogger("strongroom.audit")

current_principal: ContextVar[str | None] = ContextVar("strongroom_principal", default=None)
"""Who the current operation is done for, when that is not this process's user: a server
sets it per request (a tenant's identity), and the event records it as `actor`."""

current_requester: ContextVar[str | None] = ContextVar("strongroom_requester_note", default=None)
"""Who a client says it asks on behalf of (`strongroom.api.requester`, sent in a header): a
server sets it per request, and the event records it as `requester`, beside the `actor`
it never replaces."""

DEFAULT_CHECKPOINT_EVERY = 1000


def default_actor() -> str:
    """The OS user, host and process: who this process acts for."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry for this uid: still audit by number
        user = f"uid:{os.getuid()}"
    return f"{user}@{socket.gethostname()}[{os.getpid()}]"


class Audit:
    """Records one event per keystore operation."""

    def __init__(
        self,
        mode: str,
        path: Path | None,
        actor: str | None = None,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        chain: ChainLog | None = None,
    ) -> None:
        """`chain`: with mode `file`, the records go to this chain in the store's database
        (shared by every node) instead of the file at `path`; `path` still says where the
        HMAC key is (beside it). The writer closes the chain when it is closed."""
        self.mode = mode
        self.chain = chain if mode == "file" else None
        self._chain_closed = False
        self.path = path
        self.actor = actor or default_actor()
        self._actor_json = json.dumps(self.actor)
        self._fixed: dict[tuple[str | None, str, str | None, str | None, str], str] = {}
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.listeners: list[Callable[[AuditEvent], None]] = []
        self.signer: CheckpointSigner | None = None
        """Signs checkpoints; the Keystore sets its own (`CheckpointSigner`) once it has
        made this writer. None: no checkpoints are written."""
        self.checkpoint_every = checkpoint_every
        self._key: bytes | None = None
        self._mac: _Hmac | None = None
        # The chain's tail as this process last saw it: valid while the file's size is
        # still `_size` (no other process appended since).
        self._seq = 0
        self._hash = GENESIS
        self._size = -1
        self._newline = b""
        self._since_checkpoint = 0
        # The record count at which to try the next automatic checkpoint (never when 0).
        self._checkpoint_due = checkpoint_every or 1 << 62
        self._checkpointing = False
        made_key = False
        if mode in ("file", "log") and path is not None:
            self._key, made_key = open_key(key_path_for(path), create=True)
            self._mac = _Hmac(self._key)
        if self.chain is not None:
            # A node's own HMAC key: a new node joining a chain others wrote is no sign of a
            # lost key, so no KEY_CREATED record here (docs/audit.md, "In the database").
            _OPEN.add(self)
        elif mode == "file" and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise AuditUnavailable(f"cannot open the audit log {path}: {e.strerror}") from None
            _OPEN.add(self)
            if made_key and os.lseek(self._fd, 0, os.SEEK_END) > 0:
                # The key of a log that has records was lost: say so in the chain, since
                # the inputs recorded before this point can no longer be matched.
                try:
                    self.record(KEY_CREATED_OP, key_path_for(path).name, "ok")
                except BaseException:
                    self.close()
                    raise

    def _after_fork(self) -> None:
        """In a forked child: a descriptor of its own (a `flock` is held per open file, so a
        shared one would not keep parent and child apart), a fresh lock, no cached tail."""
        self._lock = threading.Lock()
        self._size = -1
        self._since_checkpoint = 0
        self._checkpoint_due = self.checkpoint_every or 1 << 62
        if self._fd is not None and self.path is not None:
            old, self._fd = self._fd, None
            try:
                os.close(old)
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except OSError:  # every record then fails: AuditUnavailable, no silent loss
                self._fd = None

    def hmac(self, data: bytes | bytearray | memoryview) -> str:
        """How `data` appears in this log: `hmac-sha256:<hex>` under the log's secret key."""
        if self._key is None:
            raise AuditUnavailable("this audit sink keeps no HMAC key (audit = off)")
        return input_hmac(self._key, data)

    def record(
        self,
        operation: str,
        key: str | None,
        result: str,
        backend: str | None = None,
        payload: bytes | bytearray | memoryview | None = None,
        **detail: Any,
    ) -> None:
        """Append one event. `payload` (the operation's input) is recorded only as a salted
        HMAC; `detail` must hold only non-secret facts (types, sizes, names)."""
        principal = current_principal.get()
        note = current_requester.get()
        if note is not None:
            detail["requester"] = note
        mac = None
        if payload is not None and type(payload) is not bytes:
            view = memoryview(payload)
            if not view.c_contiguous:  # a strided or Fortran-ordered view: hash its bytes
                payload = view.tobytes()
        if self.listeners or self.mode == "log":
            if payload is not None and self._mac is not None:
                mac = self._mac.hex(payload)
            event: AuditEvent = {
                "time": time.time(),
                "actor": self.actor if principal is None else principal,
                "op": operation,
                "key": key,
                "backend": backend,
                "result": result,
                **detail,
            }
            if mac is not None:
                event["input"] = INPUT_PREFIX + mac
            for listener in self.listeners:
                listener(event)
            if self.mode == "log":
                logger.info("%s", json.dumps(event, sort_keys=True))
        if self.mode != "file":
            return
        if self.chain is not None and self._fd is None:
            if mac is None and payload is not None and self._mac is not None:
                mac = self._mac.hex(payload)
            fixed = self._fixed.get((principal, operation, key, backend, result))
            if fixed is None:
                fixed = self._fixed_json(principal, operation, key, backend, result)
            body = f'"time":{_time():.6f},{fixed}'
            if mac is not None:
                body += f',"input":"{INPUT_PREFIX}{mac}"'
            for name, value in detail.items():
                body += f",{_encode_str(name)}:{_encode_value(value)}"
            try:
                self._append_chain(body)
            except StorageError:
                if result != StorageError.__name__:
                    raise
                # The operation failed because the store is unreachable, and the chain lives
                # in that store: it returns nothing, so its own StorageError stands.
                logger.warning("could not record a failed %s: the store is unreachable", operation)
                return
            if self._since_checkpoint >= self._checkpoint_due and not self._checkpointing:
                self._auto_checkpoint()
            return
        # Built by hand: this runs on every operation and json.dumps of a dict is slow. The
        # fields after the time repeat from call to call, so their JSON is cached.
        fixed = self._fixed.get((principal, operation, key, backend, result))
        if fixed is None:
            fixed = self._fixed_json(principal, operation, key, backend, result)
        tail = ""
        for name, value in detail.items():
            if type(value) is int and name in _PLAIN_NAMES:
                tail += f',"{name}":{value}'
            else:
                tail += f",{_encode_str(name)}:{_encode_value(value)}"
        # The common case in one native call (this process wrote the tail): flock, check the
        # file's size, HMAC the input, write the line, hash it, unlock (native/auditline.c).
        # Anything else (another writer appended, a torn tail) goes through _append.
        done = None
        with self._lock:
            fd = self._fd
            if fd is not None and not self._newline and self._key is not None:
                try:
                    done = _audit_append(
                        fd,
                        self._size,
                        self._seq + 1,
                        fixed,
                        self._key,
                        payload,
                        tail,
                        self._hash,
                    )
                except OSError as e:
                    self._size = -1  # the next record re-reads the tail
                    raise AuditUnavailable(
                        f"cannot write the audit log {self.path}: {e.strerror or e}"
                    ) from e
                if done is not None:
                    self._seq += 1
                    self._size, self._hash = done
                    self._since_checkpoint += 1
        if done is None:
            if mac is None and payload is not None and self._mac is not None:
                mac = self._mac.hex(payload)
            body = f'"time":{_time():.6f},{fixed}'
            if mac is not None:
                body += f',"input":"{INPUT_PREFIX}{mac}"'
            self._append(body + tail)
        if self._since_checkpoint >= self._checkpoint_due and not self._checkpointing:
            self._auto_checkpoint()

    def _fixed_json(
        self,
        principal: str | None,
        operation: str,
        key: str | None,
        backend: str | None,
        result: str,
    ) -> str:
        """The record's fields after the time, as JSON; remembered (up to 4096 of them)."""
        actor = self._actor_json if principal is None else _encode_str(principal)
        fixed = (
            f'"actor":{actor},"op":{_encode_str(operation)},'
            f'"key":{"null" if key is None else _encode_str(key)},'
            f'"backend":{"null" if backend is None else _encode_str(backend)},'
            f'"result":{_encode_str(result)}'
        )
        if len(self._fixed) >= 4096:
            self._fixed.clear()
        self._fixed[(principal, operation, key, backend, result)] = fixed
        return fixed

    def _count_written(self, checkpoint: bool) -> None:
        """Once a record is written: after a checkpoint the count starts again (the next
        one due after checkpoint_every records), else one more record since the last."""
        if checkpoint:
            self._since_checkpoint = 0
            self._checkpoint_due = self.checkpoint_every or 1 << 62
        else:
            self._since_checkpoint += 1

    # -- the chain -----------------------------------------------------------------------------
    def _append_chain(self, body: str, checkpoint: bool = False) -> dict[str, Any] | None:
        """Append one record to the chain in the database (core/store_chain.py: atomic
        across every node); the chain fields are filled in there. A record that lands right
        after a tail older than the newest record this process wrote finds the chain cut:
        that is recorded next, as the file writer does."""
        chain = self.chain
        assert chain is not None
        if self._chain_closed:  # the store would reconnect: refuse, as a closed file does
            raise AuditUnavailable(f"the audit chain in {chain.location} is closed")
        signed: dict[str, Any] | None = None

        def build(seq: int, prev: str) -> str:
            nonlocal signed
            assert self.signer is not None
            cp = self.signer.sign(checkpoint_message(seq, prev))
            signed = {"seq": seq + 1, "covers": seq, "chain": prev}
            return f'{{"seq":{seq + 1},{_checkpoint_body(cp, seq, self.actor)},"prev":"{prev}"}}'

        with self._lock:
            try:
                seq, digest = chain.append(build) if checkpoint else chain.append_body(body)
                if seq - 1 < self._seq:  # the tail we wrote on is older than our own last
                    found, expected = seq - 1, self._seq
                    seq, digest = chain.append_body(
                        f'"time":{time.time():.6f},"actor":{self._actor_json},'
                        f'"op":"{SHRANK_OP}","key":null,"backend":null,"result":"detected",'
                        f'"expected_seq":{expected},"found_seq":{found}'
                    )
            except StorageError as e:
                # The store that holds the chain is unreachable: a StorageError as for any
                # use of it (a service answers 503 with Retry-After); the operation is
                # refused all the same, before it acts or before its result is returned.
                raise StorageError(f"cannot write the audit chain: {e}") from None
            self._seq, self._hash = seq, digest
            self._count_written(checkpoint)
            return signed

    def _append(self, body: str, checkpoint: bool = False) -> dict[str, Any] | None:
        """Write one record under the file lock; the chain fields are filled in here."""
        if self.chain is not None:
            return self._append_chain(body, checkpoint)
        with self._lock:
            fd = self._fd
            if fd is None:
                raise AuditUnavailable(f"the audit log {self.path} is closed")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                raise AuditUnavailable(
                    f"cannot lock the audit log {self.path}: {e.strerror}"
                ) from e
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                if size != self._size:
                    known_seq, known_size = self._seq, self._size
                    self._seq, self._hash, ends_nl = find_tail(
                        lambda n, off: os.pread(fd, n, off), size
                    )
                    self._newline = b"" if ends_nl else b"\n"
                    if size < known_size or self._seq < known_seq:
                        # Cut or rewritten under a running writer: say so, in the chain.
                        size = self._write(
                            fd,
                            size,
                            f'"time":{time.time():.6f},"actor":{self._actor_json},'
                            f'"op":"{SHRANK_OP}","key":null,"backend":null,'
                            f'"result":"detected","expected_seq":{known_seq},'
                            f'"found_seq":{self._seq},"expected_bytes":{known_size},'
                            f'"found_bytes":{size}',
                        )
                signed: dict[str, Any] | None = None
                if checkpoint:
                    assert self.signer is not None
                    cp = self.signer.sign(checkpoint_message(self._seq, self._hash))
                    body = _checkpoint_body(cp, self._seq, self.actor)
                    signed = {"seq": self._seq + 1, "covers": self._seq, "chain": self._hash}
                self._write(fd, size, body)
                self._count_written(checkpoint)
                return signed
            finally:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:  # closing the descriptor releases it anyway
                    pass

    def _write(self, fd: int, size: int, body: str) -> int:
        """Append the record `body` after the tail (lock held); return the new file size."""
        seq = self._seq + 1
        line = f'{{"seq":{seq},{body},"prev":"{self._hash}"}}'.encode()
        data = self._newline + line + b"\n"
        try:
            written = os.write(fd, data)
        except OSError as e:
            self._cut_back(fd, size)
            raise AuditUnavailable(f"cannot write the audit log {self.path}: {e.strerror}") from e
        if written != len(data):
            self._cut_back(fd, size)
            raise AuditUnavailable(
                f"cannot write the audit log {self.path}: short write "
                f"({written} of {len(data)} bytes; disk full or file size limit)"
            )
        h = _SHA256.copy()
        h.update(line)
        self._seq, self._hash = seq, h.hexdigest()
        self._size = size + written
        self._newline = b""
        return self._size

    def _cut_back(self, fd: int, size: int) -> None:
        """Remove a partly written record (we hold the lock: nothing else was appended)."""
        self._size = -1
        try:
            os.ftruncate(fd, size)
        except OSError:  # the next writer (or verify) treats the stub as a torn line
            pass

    def checkpoint(self, force: bool = True, create: bool = True) -> dict[str, Any] | None:
        """Append a checkpoint signed by the signing key; return seq, covers and chain hash.

        With `force` the signing key's backend is opened when needed; otherwise nothing is
        written unless it is open already. With `create` the signing key is made if it does
        not exist yet; otherwise nothing is written then. None when nothing was written.
        """
        if self.mode != "file" or self.signer is None:
            return None
        if not self.signer.ready(force):
            return None
        self._checkpointing = True
        try:
            if self.signer.info(create=False) is None:  # made outside the file lock, audited
                if not create:
                    return None
                info = self.signer.info(create=True)
                assert info is not None  # create=True makes it or raises
                self.record("generate", f"{info.namespace}/{info.name}", "ok", info.backend)
            return self._append("", checkpoint=True)
        finally:
            self._checkpointing = False

    def _auto_checkpoint(self) -> None:
        done = None
        try:
            done = self.checkpoint(force=False)
        except Exception as e:  # the operation's record is written; a later one retries
            logger.warning("audit checkpoint failed: %s: %s", type(e).__name__, e)
        # Not now (backend not open, no signer, a failure): try again N records later.
        step = self.checkpoint_every or 1 << 62
        self._checkpoint_due = step if done is not None else self._since_checkpoint + step

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self.chain is not None and not self._chain_closed:
                self._chain_closed = True
                self.chain.close()

    @property
    def pending(self) -> int:
        """Records this process wrote since its last checkpoint."""
        return self._since_checkpoint


_OPEN: weakref.WeakSet[Audit] = weakref.WeakSet()


def _reopen_after_fork() -> None:
    for audit in list(_OPEN):
        audit._after_fork()


os.register_at_fork(after_in_child=_reopen_after_fork)

_time = time.time
_audit_append = _native.audit_append
_SHA256 = hashlib.sha256()
"""Copied per record: cheaper than a new hash object (about 0.4 us less)."""


class _Hmac:
    """HMAC-SHA256 (RFC 2104) with the padded-key hash states made once: per input, two
    copies and updates instead of a fresh HMAC object (about 3 us less per record)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.sha256(key).digest()
        block = block.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def hex(self, data: bytes | bytearray | memoryview) -> str:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def __repr__(self) -> str:
        return "<_Hmac (key hidden)>"


def _checkpoint_body(cp: CheckpointSignature, covers: int, actor: str) -> str:
    return (
        f'"time":{time.time():.6f},"actor":{json.dumps(actor)},"op":"{CHECKPOINT_OP}",'
        f'"key":{_js(cp.key)},"backend":{_js(cp.backend)},"result":"ok",'
        f'"covers":{covers},"alg":{_js(cp.alg)},"signer":"{cp.signer}",'
        f'"sig":"{b64encode(cp.sig).decode()}"'
    )


def _encode_value(value: Any) -> str:
    """A detail value as JSON: integers, booleans and null as such, anything else a string."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return _encode_str(str(value))


_PLAIN_NAMES = frozenset({"size", "version", "status", "suppressed", "wait_seconds"})
"""Detail names written as they are (ASCII identifiers: no JSON escaping needed)."""


def _js(value: str | None) -> str:
    return "null" if value is None else _encode_str(value)


_encode_str = encode_basestring_ascii

__all__ = ["Audit", "AuditEvent", "current_principal", "current_requester", "default_actor"]
