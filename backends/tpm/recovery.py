"""What a TPM error means to the context, and the recovery from what dead clients and TPM
resets leave behind: part of the device layer, split out of context.py along its banners
(docs/decisions.md, "Modules split along their banners").

- `is_tcti_error`: the link broke (the ESAPI context is unusable: `_DeviceLock` in
  context.py forgets it); `forgot_our_objects`: a TPM reset dropped our handles
  (`TpmContext.run` and `after_reset` start again, once);
- `has_resource_manager`, `Peers` and `reclaim_orphans`: with no resource manager (swtpm,
  /dev/tpm0), what a killed Strongroom process left loaded stays in the TPM's few slots
  until a reset; the live processes share a lock file, and one that is alone flushes the
  rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_HT, TPM2_RC, TSS2_RC

TCTI_LAYER = 0x000A0000  # TSS2_RC layer of TCTI errors: the TPM could not be reached


def is_tcti_error(e: TSS2_Exception) -> bool:
    """The TPM could not be reached, or the link broke mid-command; the ESAPI context's
    state is unknown after it (an ESAPI call cut off by a dead link leaves the context
    waiting for a response, and every later call on it fails with BAD_SEQUENCE)."""
    return (int(e.rc) & 0x00FF0000) == TCTI_LAYER or int(e.rc) in _BROKEN_CONTEXT


_BROKEN_CONTEXT = frozenset(
    {
        TSS2_RC.ESYS_RC_BAD_SEQUENCE,
        TSS2_RC.ESYS_RC_IO_ERROR,
        TSS2_RC.ESYS_RC_MALFORMED_RESPONSE,
        TSS2_RC.ESYS_RC_INSUFFICIENT_RESPONSE,
    }
)


def error_code(e: TSS2_Exception) -> int:
    return int(e.error)


_STALE = frozenset(range(TPM2_RC.REFERENCE_H0, TPM2_RC.REFERENCE_S0 + 7)) | {TPM2_RC.HANDLE}


def forgot_our_objects(e: TSS2_Exception) -> bool:
    """The TPM no longer knows a handle we hold, or was never started after a power cycle:
    what a TPM reset (_TPM_Init, TPM2_Startup(CLEAR)) does to a long-lived client."""
    return not is_tcti_error(e) and (error_code(e) in _STALE or error_code(e) == TPM2_RC.INITIALIZE)


def has_resource_manager(tcti: str) -> bool:
    """Whether a resource manager stands between us and the TPM (the kernel's /dev/tpmrm*,
    tpm2-abrmd): it flushes what a dead client left loaded, and other clients' objects are
    invisible to us. Direct TCTIs (swtpm, mssim, /dev/tpm0) have none."""
    kind, _, conf = tcti.partition(":")
    if kind in ("swtpm", "mssim"):
        return False
    if kind == "device":
        return os.path.basename(conf or "/dev/tpmrm0").startswith("tpmrm")
    return True  # tabrmd, or a TCTI we do not know: never touch others' objects there


class Peers:
    """The Strongroom processes using one TPM with no resource manager: each holds a shared
    flock on one lock file per TCTI while its context is open. A process that can take the
    lock exclusively is the only live one, so any transient object or session it does not
    hold was left by a process that died (no resource manager flushes it): it may go."""

    def __init__(self, tcti: str) -> None:
        digest = hashlib.sha256(tcti.encode()).hexdigest()[:16]
        self.path = os.path.join(tempfile.gettempdir(), f"strongroom-tpm-{digest}.lock")
        self._fd: int | None = None

    def join(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:  # cannot coordinate: then never reclaim (alone() stays False)
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd

    def alone(self) -> bool:
        """Take the lock exclusively if no other live process holds it; `share()` after."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def leave(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def reclaim_orphans(
    esys: ESAPI, peers: Peers, held: Iterable[ESYS_TR], handles: Callable[[int], list[int]]
) -> int:
    """Flush the transient objects and loaded sessions of Strongroom processes that died
    (killed clients of a TPM with no resource manager leave them loaded until a TPM
    reset, and the TPM has about three slots). Only when no other Strongroom process
    uses this TPM now (`Peers.alone`); the handles in `held` (ours) are kept. `handles(first)`
    lists the TPM's handles of one kind from `first` (TPM2_GetCapability). Returns how
    many went."""
    if not peers.alone():
        return 0
    try:
        ours = {int(esys.tr_get_tpm_handle(tr)) for tr in held}
        flushed = 0
        for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
            for handle in handles(int(kind) << 24):
                if int(handle) in ours:
                    continue
                try:
                    esys.flush_context(esys.tr_from_tpmpublic(int(handle)))
                except TSS2_Exception as e:
                    if is_tcti_error(e):
                        raise
                    continue  # gone meanwhile, or not flushable: not ours to insist
                flushed += 1
        return flushed
    finally:
        peers.share()
