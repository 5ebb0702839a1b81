"""Guarded memory at the level of the whole process: purging every idle buffer, and the
process settings guarded memory depends on.

`purge` wipes and unmaps every guarded buffer not in use (on demand, at exit, on SIGTERM
and SIGINT once `install_purge_handlers` ran); `memlock_status` reports RLIMIT_MEMLOCK and
what guarded memory locks of it; `use_secretmem` switches memfd_secret for new buffers;
`disable_core_dumps` and `page_size` are the process's core-dump setting and page size.
`strongroom.memory` exports all of them: import them from there.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from . import _native
from .errors import GuardedMemoryError


class _Buffer(Protocol):
    """What `purge` uses of a live `Guarded` (memory.py, which registers each in `_live`)."""

    _readers: int
    _writers: int

    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class MemlockStatus:
    """RLIMIT_MEMLOCK and what this process's guarded memory uses of it."""

    soft_limit: int | None
    """Soft limit in bytes; None means unlimited."""
    hard_limit: int | None
    """Hard limit in bytes; None means unlimited."""
    locked_bytes: int
    """Bytes currently locked by guarded memory in this process (mlock + memfd_secret)."""
    mlock_failures: int
    """How many guarded buffers could not be locked since the process started."""
    secret_bytes: int = 0
    """Of `locked_bytes`, those in memfd_secret pages (outside the kernel's direct map)."""
    secretmem_available: bool = False
    """Whether this kernel offers memfd_secret."""
    secretmem_enabled: bool = False
    """Whether guarded buffers use it (off with STRONGROOM_NO_SECRETMEM=1)."""


def memlock_status() -> MemlockStatus:
    """How much memory may be locked, how much is, and how often locking failed."""
    soft, hard = _native.memlock_limit()
    return MemlockStatus(
        soft_limit=None if soft < 0 else int(soft),
        hard_limit=None if hard < 0 else int(hard),
        locked_bytes=int(_native.locked_bytes()),
        mlock_failures=int(_native.mlock_failures()),
        secret_bytes=int(_native.secret_bytes()),
        secretmem_available=bool(_native.secretmem_available()),
        secretmem_enabled=bool(_native.secretmem_enabled()),
    )


def use_secretmem(enabled: bool) -> None:
    """Turn memfd_secret on or off for guarded buffers made from now on."""
    _native.set_secretmem(enabled)


# -- purge ---------------------------------------------------------------------------------------
_live: weakref.WeakSet[_Buffer] = weakref.WeakSet()
_purge_hooks: list[Callable[[int], None]] = []
_handlers_installed = False


def add_purge_hook(hook: Callable[[int], None]) -> None:
    """Call `hook(count)` after every purge, with the number of buffers it closed."""
    _purge_hooks.append(hook)


def purge() -> int:
    """Wipe and unmap every guarded buffer not in use right now; return how many.

    Coffers and key pools are guarded buffers, so after a purge the keys they held are
    gone from this process: anything that needs them raises GuardedMemoryError. Buffers
    in use by a running operation are left to that operation, which closes them as it
    unwinds.
    """
    closed = 0
    for guarded in list(_live):
        if guarded.closed or guarded._readers or guarded._writers:
            continue
        with suppress(GuardedMemoryError, OSError):
            guarded.close()
            closed += 1
    for hook in list(_purge_hooks):
        with suppress(Exception):
            hook(closed)
    return closed


def install_purge_handlers() -> None:
    """Purge on SIGTERM, SIGINT and at exit, where the application has not taken them.

    SIGTERM: purge, then die of SIGTERM as before. SIGINT: purge, then raise
    KeyboardInterrupt as before. A handler the application installed is left alone.
    Only the main thread can install signal handlers; elsewhere only the exit hook is set.
    """
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(purge)
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigterm(signum: int, frame: object) -> None:
    purge()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_sigint(signum: int, frame: object) -> None:
    purge()
    raise KeyboardInterrupt


def disable_core_dumps() -> None:
    """Set RLIMIT_CORE to 0 and make the process non-dumpable. Raises OSError on failure."""
    _native.disable_core_dumps()


def page_size() -> int:
    """The system page size in bytes."""
    return int(_native.page_size())
