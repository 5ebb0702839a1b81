"""Guarded memory for secrets: the only Python module that calls `strongroom._native`'s
guarded-memory functions (its other callers: audit.py's record writer and the vault's key
operations, OpenSSL on guarded memory; tests/test_layers.py checks that list).

A :class:`Guarded` holds key material outside the Python heap, in its own mapping with a
guard page on each side, a random canary in front of the data, the pages locked in RAM
(``mlock``), left out of core dumps (``MADV_DONTDUMP``) and zeroed in forked children
(``MADV_WIPEONFORK``). Between operations the pages are not accessible at all, so a
dangling view or a stray pointer crashes the process instead of reading the secret.

Access is one operation at a time::

    with Guarded.from_buffer(key_bytes) as key:
        with key.read() as view:      # read-only memoryview, valid inside the block only
            mac = hmac_sha256(view, message)

Rules for callers:

* Do not keep the view, a slice of it, or anything exported from it past the ``with``
  block. Exiting the block releases the view and makes the memory inaccessible again; a
  view that escaped makes the exit raise :class:`~strongroom.errors.GuardedMemoryError`
  and touching it afterwards kills the process with SIGSEGV (by design: fail closed).
* ``read()`` and ``write()`` nest and may run in several threads at once; the memory stays
  accessible until the last of them exits, and stays writable while any ``write()`` runs.
* :func:`scrub_bytes` zeroes a ``bytes`` object in place. Use it only on a ``bytes`` that
  you alone hold (e.g. one a library just returned), never on literals or shared values.

The process-wide parts (purge, memlock status, memfd_secret switch, core dumps) are in
memory_process.py; this module exports them too, so callers import only `strongroom.memory`.

Nothing in this module ever logs or formats secret bytes.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import AbstractContextManager, suppress
from types import TracebackType
from typing import Final, NoReturn, SupportsIndex

from nacl._sodium import ffi as _sodium_ffi
from nacl._sodium import lib as _sodium_lib

from . import _native
from .errors import GuardedMemoryError, InvalidArgument
from .memory_process import (
    MemlockStatus,
    _live,
    add_purge_hook,
    disable_core_dumps,
    install_purge_handlers,
    memlock_status,
    page_size,
    purge,
    use_secretmem,
)
from .memory_process import _purge_hooks as _purge_hooks  # re-exported: tests remove hooks

__all__ = [
    "MAX_SIZE",
    "Guarded",
    "MemlockStatus",
    "add_purge_hook",
    "install_purge_handlers",
    "purge",
    "use_secretmem",
    "Coffer",
    "KeyedPool",
    "constant_time_equal",
    "disable_core_dumps",
    "memlock_status",
    "page_size",
    "scrub_bytes",
    "wipe",
]

MAX_SIZE: Final = 64 * 1024 * 1024
"""Largest guarded buffer, in bytes (the native layer refuses more)."""

_NO_ACCESS: Final = 0
_READ_ONLY: Final = 1
_READ_WRITE: Final = 2

_log = logging.getLogger("strongroom.memory")
_UNLOCKED_WARNING: Final = (
    "mlock failed: RLIMIT_MEMLOCK budget exhausted; secrets may be swapped. "
    "See `strongroom doctor`."
)
_warned_unlocked = False
_warn_lock = threading.Lock()


def _warn_once_if_unlocked(mlocked: bool) -> None:
    """Log one warning per process the first time a buffer could not be locked in RAM."""
    global _warned_unlocked
    if mlocked or _warned_unlocked:
        return
    with _warn_lock:
        if _warned_unlocked:
            return
        _warned_unlocked = True
    _log.warning(_UNLOCKED_WARNING)


class Guarded:
    """A secret buffer in guarded memory: guard pages, canary, mlock, no access between uses."""

    __slots__ = ("__weakref__", "_buf", "_lock", "_readers", "_writers")

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if not 1 <= size <= MAX_SIZE:
            raise InvalidArgument(f"guarded memory size must be 1..{MAX_SIZE} bytes, not {size}")
        try:
            self._buf = _native.GuardedBuffer(size)
        except OSError as exc:
            raise GuardedMemoryError(f"could not map guarded memory: {exc.strerror}") from exc
        self._lock = threading.Lock()
        self._readers = 0
        self._writers = 0
        _live.add(self)
        _warn_once_if_unlocked(self.mlocked)

    @classmethod
    def from_buffer(cls, data: bytes | bytearray | memoryview) -> Guarded:
        """Copy `data` into new guarded memory. The source is NOT wiped: that is the caller's."""
        with memoryview(data) as src, src.cast("B") as flat:
            if flat.nbytes == 0:
                raise InvalidArgument("guarded memory needs at least one byte")
            guarded = cls(flat.nbytes)
            try:
                with guarded.write() as dst:
                    dst[:] = flat
            except BaseException:
                guarded.close()
                raise
        return guarded

    @property
    def size(self) -> int:
        """Number of secret bytes."""
        return int(self._buf.size)

    @property
    def mlocked(self) -> bool:
        """True while the pages are locked in RAM (False after close or if mlock failed)."""
        return bool(self._buf.mlocked)

    @property
    def secret(self) -> bool:
        """True while the pages are memfd_secret: out of the direct map, unreadable via /proc."""
        return bool(self._buf.secret)

    @property
    def closed(self) -> bool:
        """True once the memory has been wiped and released."""
        return bool(self._buf.closed)

    @property
    def address(self) -> int:
        """Address of the first secret byte. For tests and diagnostics only."""
        return int(self._buf.address)

    def _set_mode_locked(self) -> None:
        """Give the pages the access the running operations need. Caller holds `_lock`."""
        want = _READ_WRITE if self._writers else _READ_ONLY if self._readers else _NO_ACCESS
        if self._buf.closed or self._buf.mode == want:
            return
        try:
            self._buf.protect(want)
        except OSError as exc:
            raise GuardedMemoryError(
                f"could not change protection of guarded memory: {exc.strerror}"
            ) from exc

    def _leave_locked(self, write: bool) -> None:
        if write:
            self._writers -= 1
        else:
            self._readers -= 1
        self._set_mode_locked()

    def _enter(self, write: bool) -> tuple[memoryview, memoryview | None]:
        buf = self._buf
        with self._lock:
            if buf.closed:
                raise GuardedMemoryError("guarded memory is closed")
            if write:
                self._writers += 1
            else:
                self._readers += 1
            try:
                self._set_mode_locked()
                view = memoryview(buf)
            except BaseException:
                self._leave_locked(write)
                raise
        # Inside a write() the pages are writable, so a nested read() gets a read-only alias.
        read_only = None if write or view.readonly else view.toreadonly()
        return view, read_only

    def _exit(
        self, write: bool, view: memoryview, read_only: memoryview | None, raising: bool = True
    ) -> None:
        # release() refuses (BufferError) while something exported from the view is alive;
        # either way the export count below tells whether anything escaped.
        for v in (read_only, view):
            if v is not None:
                with suppress(BufferError):
                    v.release()
        with self._lock:
            self._leave_locked(write)
            # Each running operation holds exactly one export of the buffer.
            escaped = self._buf.exports > self._readers + self._writers
        if escaped and raising:  # never mask the exception already unwinding the operation
            raise GuardedMemoryError("a view of guarded memory escaped its operation")

    def read(self) -> AbstractContextManager[memoryview]:
        """A read-only view for one operation; the memory is inaccessible again afterwards."""
        return _Access(self, False)

    def write(self) -> AbstractContextManager[memoryview]:
        """A read-write view for one operation; the memory is inaccessible again afterwards."""
        return _Access(self, True)

    def close(self) -> None:
        """Check the canary, wipe, unlock and unmap. Idempotent.

        Raises GuardedMemoryError if the canary was damaged (after wiping) or if a read() or
        write() is still running. If a view escaped, the pages are wiped and made inaccessible
        now and unmapped when the last view is released.
        """
        with self._lock:
            if self._readers or self._writers:
                raise GuardedMemoryError("cannot close guarded memory during a read() or write()")
            try:
                self._buf.close()
            except _native.CanaryError:
                raise GuardedMemoryError(
                    "guarded memory canary damaged: possible buffer overflow"
                ) from None

    def __enter__(self) -> Guarded:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Guarded size={self.size}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("guarded memory cannot be pickled or copied")


class _Access:
    """The context manager behind `Guarded.read()`/`write()` (a class: it is on the hot path)."""

    __slots__ = ("_guarded", "_read_only", "_view", "_write")

    def __init__(self, guarded: Guarded, write: bool) -> None:
        self._guarded = guarded
        self._write = write
        self._view: memoryview | None = None
        self._read_only: memoryview | None = None

    def __enter__(self) -> memoryview:
        self._view, self._read_only = self._guarded._enter(self._write)
        return self._view if self._read_only is None else self._read_only

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        view, self._view = self._view, None
        if view is not None:
            self._guarded._exit(self._write, view, self._read_only, raising=exc_type is None)
        self._read_only = None


KEY_SIZE: Final = 32
REKEY_INTERVAL: Final = 1.0
"""Seconds between background re-randomisations of every coffer's shards."""


def _hash_into(out: memoryview, data: memoryview) -> None:
    """BLAKE2b-256 of `data` into `out`, both in guarded memory (libsodium, no copies)."""
    _sodium_lib.crypto_generichash_blake2b_salt_personal(
        _sodium_ffi.from_buffer(out, require_writable=True), len(out),
        _sodium_ffi.from_buffer(data), len(data), _sodium_ffi.NULL, 0,
        _sodium_ffi.NULL, _sodium_ffi.NULL,
    )  # fmt: skip


def _random_into(out: memoryview) -> None:
    _sodium_lib.randombytes(_sodium_ffi.from_buffer(out, require_writable=True), len(out))


# A shard block: left ‖ right ‖ scratch for H(right). key = left XOR BLAKE2b(right).
_SHARDS: Final = 3 * KEY_SIZE


def _split(block: memoryview, key: memoryview) -> None:
    """Store `key` as fresh shards in block[0:96]."""
    left, right, tmp = block[0:32], block[32:64], block[64:96]
    try:
        _random_into(right)
        _hash_into(tmp, right)
        _native.xor_into(left, key, tmp)
        _native.wipe(tmp)
    finally:  # even when a signal's exception unwinds through here: no view may linger
        for view in (left, right, tmp):
            view.release()


def _join(block: memoryview, key: memoryview) -> None:
    """Write the key held in block[0:96] into `key`, then re-randomise the shards.

    One cffi pointer into the block serves both hashes and the new random shard: this runs
    on every vault operation, and each crossing into cffi costs time.
    """
    p = _sodium_ffi.from_buffer(block, require_writable=True)
    left, tmp = block[0:32], block[64:96]
    try:
        hash_ = _sodium_lib.crypto_generichash_blake2b_salt_personal
        null = _sodium_ffi.NULL
        hash_(p + 64, KEY_SIZE, p + 32, KEY_SIZE, null, 0, null, null)  # tmp = H(right)
        _native.xor_into(key, left, tmp)  # key = left ^ H(right)
        _sodium_lib.randombytes(p + 32, KEY_SIZE)  # a new right shard
        hash_(p + 64, KEY_SIZE, p + 32, KEY_SIZE, null, 0, null, null)
        _native.xor_into(left, key, tmp)  # left = key ^ H(new right)
        _native.wipe(tmp)
    finally:  # a signal's exception must not leave the pointer or a view behind
        left.release()
        tmp.release()
        _sodium_ffi.release(p)


class Coffer:
    """A 32-byte key held Boojum-style: two shards in guarded memory, key = left XOR H(right).

    Neither shard alone says anything about the key. Both are re-randomised on every use
    and every `REKEY_INTERVAL` seconds, so a memory image taken at one moment and another
    taken later never combine. The key itself exists only inside the caller's guarded
    buffer, for one operation.
    """

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        with memoryview(key) as view:
            if view.nbytes != KEY_SIZE:
                raise InvalidArgument(f"a coffer holds a {KEY_SIZE}-byte key")
            self._block = Guarded(_SHARDS + KEY_SIZE)
            self._lock = threading.Lock()
            with self._block.write() as block:
                _split(block, view.cast("B"))
        _rekeyer.register(self)

    @classmethod
    def random(cls) -> Coffer:
        """A coffer holding a new random key."""
        with Guarded(KEY_SIZE) as fresh:
            with fresh.write() as key:
                _random_into(key)
            with fresh.read() as key:
                return cls(key)

    def open_into(self, out: memoryview) -> None:
        """Write the key into `out` (guarded memory, please) and re-randomise the shards."""
        with self._lock, self._block.write() as block:
            _join(block, out)

    def rekey(self) -> None:
        """Re-randomise the shards without handing the key out."""
        with self._lock:
            if self._block.closed:
                return
            with self._block.write() as block:
                key = block[_SHARDS:]
                try:
                    _join(block, key)
                finally:
                    _native.wipe(key)
                    key.release()

    @property
    def closed(self) -> bool:
        return self._block.closed

    def close(self) -> None:
        with self._lock:
            self._block.close()

    def __enter__(self) -> Coffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Coffer {'closed' if self.closed else 'open'}>"


class KeyedPool:
    """Guarded scratch pages for one-operation plaintext, each carrying shards of one key.

    Mapping and locking a page costs tens of microseconds, so operations borrow a page
    from here. Each page holds its own Boojum shards of the pool's key (say, the vault's
    record key) beside a scratch area, so one change of protection gives an operation
    both the key and room for the plaintext it decrypts. Everything handed out is wiped
    before the page goes back. Locked memory is bounded by `keep` pages plus however many
    operations run at once, however many keys there are.
    """

    _KEY_AT: Final = _SHARDS
    _SCRATCH_AT: Final = _SHARDS + KEY_SIZE

    def __init__(self, source: Coffer, keep: int = 4) -> None:
        self._source = source
        self.capacity = page_size() - 64 - self._SCRATCH_AT
        self._keep = keep
        self._idle: list[Guarded] = []
        self._lock = threading.Lock()
        self._closed = False
        _rekeyer.register(self)

    def _new_page(self, scratch: int) -> Guarded:
        page = Guarded(self._SCRATCH_AT + scratch)
        try:
            with page.write() as block:
                key = block[self._KEY_AT : self._SCRATCH_AT]
                try:
                    self._source.open_into(key)
                    _split(block, key)
                finally:
                    _native.wipe(key)
                    key.release()
        except BaseException:
            page.close()
            raise
        return page

    def borrow(self, size: int) -> _Borrowed:
        """`with pool.borrow(n) as (key, scratch):` the key and n writable bytes, wiped after."""
        if self._closed:
            raise GuardedMemoryError("the key pool is closed")
        if size > self.capacity:
            return _Borrowed(self, self._new_page(size), size, own=True)
        with self._lock:
            page = self._idle.pop() if self._idle else None
        return _Borrowed(self, page or self._new_page(self.capacity), size, own=False)

    def _give_back(self, page: Guarded) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._keep:
                self._idle.append(page)
                return
        page.close()

    def rekey(self) -> None:
        """Re-randomise the shards of every idle page."""
        with self._lock:
            pages, self._idle = self._idle, []
        for page in pages:
            if page.closed:
                continue
            with page.write() as block:
                key = block[self._KEY_AT : self._SCRATCH_AT]
                try:
                    _join(block, key)
                finally:
                    _native.wipe(key)
                    key.release()
            self._give_back(page)

    def close(self) -> None:
        """Close every idle page (checking its canary); pages out on loan close on return."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        errors = []
        for page in idle:
            try:
                page.close()
            except GuardedMemoryError as e:
                errors.append(e)
        if errors:
            raise errors[0]


class _Borrowed:
    """One loan from a KeyedPool (a class, not a generator: it is on every operation's path).

    A page on loan belongs to one borrower only, so this drives the native buffer directly
    instead of going through Guarded's shared reader/writer bookkeeping.
    """

    __slots__ = ("_block", "_key", "_own", "_page", "_pool", "_scratch", "_size")

    def __init__(self, pool: KeyedPool, page: Guarded, size: int, own: bool) -> None:
        self._pool, self._page, self._size, self._own = pool, page, size, own
        self._block: memoryview | None = None
        self._key: memoryview | None = None
        self._scratch: memoryview | None = None

    def __enter__(self) -> tuple[memoryview, memoryview]:
        page = self._page
        buf = page._buf
        with page._lock:  # counted as a writer, so purge() leaves a page in use alone
            page._writers += 1
        try:
            buf.protect(_READ_WRITE)
        except (OSError, ValueError) as exc:
            with page._lock:
                page._writers -= 1
            raise GuardedMemoryError(f"could not open guarded memory: {exc}") from exc
        try:
            block = memoryview(buf)
            self._block = block
            key = block[KeyedPool._KEY_AT : KeyedPool._SCRATCH_AT]
            self._key = key
            _join(block, key)
            self._scratch = block[len(block) - self._size :]
        except BaseException as e:
            self.__exit__(type(e))
            raise
        return key, self._scratch

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        buf = self._page._buf
        views = (self._key, self._scratch)
        self._key = self._scratch = None
        try:
            for view in views:
                if view is not None:
                    _native.wipe(view)
                    with suppress(BufferError):
                        view.release()
            if self._block is not None:
                with suppress(BufferError):
                    self._block.release()
                self._block = None
        finally:
            buf.protect(_NO_ACCESS)
            with self._page._lock:
                self._page._writers -= 1
        if buf.exports:
            # Something still refers to the page: wipe it now, unmap it when that goes.
            self._page.close()
            if exc_type is None:  # never mask the exception already unwinding the operation
                raise GuardedMemoryError("a view of guarded memory escaped its operation")
            return
        if self._own:
            self._page.close()
        else:
            self._pool._give_back(self._page)


class _Rekeyer:
    """One daemon thread that re-randomises every live coffer and pool now and then."""

    def __init__(self) -> None:
        self._targets: weakref.WeakSet[Coffer | KeyedPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, target: Coffer | KeyedPool) -> None:
        with self._lock:
            self._targets.add(target)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="strongroom-rekey", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(REKEY_INTERVAL)
            with self._lock:
                targets = list(self._targets)
            for target in targets:
                with suppress(GuardedMemoryError):
                    target.rekey()
            del targets


_rekeyer = _Rekeyer()


def wipe(buf: bytearray | memoryview) -> None:
    """Zero a writable buffer in place (a write the compiler cannot drop)."""
    _native.wipe(buf)


def scrub_bytes(b: bytes | bytearray) -> None:
    """Zero a bytes or bytearray in place, even though bytes are immutable.

    Only for a ``bytes`` object you alone hold; lengths 0 and 1 are shared and left alone.
    For a bytearray the whole allocation is zeroed, including capacity left by shrinking.
    """
    _native.scrub(b)


def constant_time_equal(
    a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview
) -> bool:
    """Compare without revealing where the inputs differ (lengths are not secret)."""
    return bool(_native.compare(a, b))
