"""The TPM connection under the device: one ESAPI context behind one lock, the storage
root key, the transient-slot LRU and the salted session.

`TpmContext` keeps the slot and SRK promises of device.py's docstring, and recovers from
a lost connection (`_DeviceLock` forgets the context) and from a TPM reset
(`forgot_our_objects`, `after_reset`: one retry of the command); what the errors mean and
the reclaiming of dead clients' objects are in recovery.py. `TpmDevice` (device.py)
adds the key operations and sealing on top of it. Part of the device layer: only the
device's modules import tpm2-pytss.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_HT,
    TPM2_PT,
    TPM2_PT_FIRMWARE,
    TPM2_PT_HR,
    TPM2_RC,
    TPM2_SE,
    TPM2_SU,
    TPMA_PERMANENT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_RSA_PARMS,
    TPMS_SYMCIPHER_PARMS,
    TPMT_PUBLIC_PARMS,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from .facts import Facts, KeyRef, Lockout, StorageKeyProblem
from .recovery import (
    Peers,
    error_code,
    forgot_our_objects,
    has_resource_manager,
    is_tcti_error,
    reclaim_orphans,
)
from .templates import _NO_SYM, _SESSION_CIPHER, A, srk_template

T = TypeVar("T")

MAX_BUFFER = 1024  # TPM2B_MAX_BUFFER: the most data one TPM2_HMAC or EncryptDecrypt2 takes
_RANDOM_CHUNK = 32


class _DeviceLock:
    """The device's re-entrant lock. Leaving it with an error that broke the connection
    forgets the ESAPI context before another thread can take the lock: otherwise that
    thread ran its command on the dead context and got an untyped BAD_SEQUENCE."""

    def __init__(self, device: TpmContext) -> None:
        self._lock = threading.RLock()
        self._device = device

    def __enter__(self) -> _DeviceLock:
        self._lock.acquire()
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        try:
            if isinstance(error, TSS2_Exception) and is_tcti_error(error):
                self._device._forget()
        finally:
            self._lock.release()


class TpmContext:
    """One ESAPI context, its lock, the SRK, the loaded-key LRU and the salted session."""

    def __init__(self, tcti: str, persistent_handle: int | None, max_loaded: int | None) -> None:
        self.tcti = tcti
        self.persistent_handle = persistent_handle
        self._max_loaded_setting = max_loaded
        self.lock = _DeviceLock(self)
        self._esys: ESAPI | None = None
        self.facts: Facts | None = None
        self.srk_name = b""
        self.srk_source = ""
        self._srk: ESYS_TR | None = None  # the persistent SRK
        self._srk_context: Any = None  # saved context of the transient SRK
        self._lru: OrderedDict[str, ESYS_TR] = OrderedDict()
        self._temporaries = 0
        self._session: ESYS_TR | None = None
        self._digest = TPM2B_DIGEST()
        self.slots = 3
        self.max_loaded = 2
        self._peers = None if has_resource_manager(tcti) else Peers(tcti)
        self.reclaimed = 0  # objects and sessions of dead processes flushed (status, tests)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._esys is not None

    def open(self) -> None:
        """Connect (Esys_Initialize), read the TPM's capabilities, set up the SRK."""
        with self.lock:
            if self._esys is not None:
                return
            esys = ESAPI(self.tcti)
            self._esys = esys
            try:
                if self._peers is not None:
                    self._peers.join()
                    self._reclaim_orphans()  # what killed processes left: nothing is ours yet
                self.facts = self._probe()
                self.slots = max(2, self.facts.transient_slots)
                wanted = self._max_loaded_setting or self.slots - 1
                self.max_loaded = max(1, min(wanted, self.slots - 1))
                self._setup_srk()
            except BaseException:
                self._forget()
                raise

    def close(self) -> None:
        """Flush every loaded key, the session and the transient SRK; close the context."""
        with self.lock:
            esys = self._esys
            if esys is None:
                return
            try:
                for tr in list(self._lru.values()):
                    self._flush(tr)
                self._lru.clear()
                if self._session is not None:
                    self._flush(self._session)
                    self._session = None
                if self._srk is not None:
                    with contextlib.suppress(TSS2_Exception):
                        esys.tr_close(self._srk)
            finally:
                self._forget()

    def _forget(self) -> None:
        """Drop the context and all state tied to it (after close, or a lost connection)."""
        if self._peers is not None:
            self._peers.leave()
        esys, self._esys = self._esys, None
        self._lru.clear()
        self._session = None
        self._srk = None
        self._srk_context = None
        self._temporaries = 0
        if esys is not None:
            with contextlib.suppress(Exception):
                esys.close()

    def lost(self) -> None:
        """The connection failed: forget it; the next operation reconnects."""
        with self.lock:
            self._forget()

    def esys(self) -> ESAPI:
        if self._esys is None:
            self.open()
        assert self._esys is not None
        return self._esys

    # -- capabilities --------------------------------------------------------------------------
    def _capability(self, cap: int, first: int, count: int, every: bool = True) -> list[Any]:
        """TPM2_GetCapability; with `every`, keeps asking while the TPM says there is more."""
        esys = self._esys
        assert esys is not None
        out: list[Any] = []
        prop = first
        while True:
            try:
                more, data = esys.get_capability(cap, prop, count)
            except TSS2_Exception as e:
                if error_code(e) != TPM2_RC.INITIALIZE:
                    raise
                esys.startup(TPM2_SU.CLEAR)  # a TPM nobody has started yet
                more, data = esys.get_capability(cap, prop, count)
            d = data.data  # keep `data` alive while reading its fields
            batch: list[Any]
            if cap == TPM2_CAP.ECC_CURVES:
                batch = [int(c) for c in d.eccCurves]
            elif cap == TPM2_CAP.ALGS:
                batch = [int(a.alg) for a in d.algorithms]
            elif cap == TPM2_CAP.COMMANDS:
                batch = [int(c) & 0xFFFF for c in d.command]
            elif cap == TPM2_CAP.TPM_PROPERTIES:
                batch = [(int(p.property), int(p.value)) for p in d.tpmProperties]
            elif cap == TPM2_CAP.HANDLES:
                batch = [int(h) for h in d.handles]
            else:  # pragma: no cover - programming error
                raise ValueError(cap)
            del data, d
            out += batch
            if not every or not more or not batch:
                return out
            last = batch[-1][0] if isinstance(batch[-1], tuple) else batch[-1]
            prop = last + 1

    def _properties(self, first: int, count: int) -> dict[int, int]:
        return dict(self._capability(TPM2_CAP.TPM_PROPERTIES, first, count, every=False))

    def _probe(self) -> Facts:
        fixed = self._properties(TPM2_PT.FIXED, 64)
        vendor = fixed.get(int(TPM2_PT.MANUFACTURER), 0).to_bytes(4, "big")
        manufacturer = vendor.rstrip(b"\0 ").decode("ascii", "replace")
        fw1 = fixed.get(int(TPM2_PT_FIRMWARE.VERSION_1), 0)
        fw2 = fixed.get(int(TPM2_PT_FIRMWARE.VERSION_2), 0)
        firmware = f"{fw1:08x}.{fw2:08x}"  # vendor-defined; shown as tpm2_getcap does
        algorithms = frozenset(self._capability(TPM2_CAP.ALGS, 0, 128))
        curves = frozenset(self._capability(TPM2_CAP.ECC_CURVES, 0, 64))
        commands = frozenset(self._capability(TPM2_CAP.COMMANDS, int(TPM2_CC.FIRST), 256))
        rsa_bits = tuple(b for b in (2048, 3072, 4096) if self._rsa_ok(b, algorithms))
        aes256 = int(TPM2_ALG.AES) in algorithms and self._test(
            TPMT_PUBLIC_PARMS(
                type=TPM2_ALG.SYMCIPHER,
                parameters=TPMU_PUBLIC_PARMS(
                    symDetail=TPMS_SYMCIPHER_PARMS(
                        sym=TPMT_SYM_DEF_OBJECT(
                            algorithm=TPM2_ALG.AES,
                            keyBits=TPMU_SYM_KEY_BITS(aes=256),
                            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                        )
                    )
                ),
            )
        )
        slots = fixed.get(int(TPM2_PT_HR.TRANSIENT_MIN), 3)
        return Facts(manufacturer, firmware, curves, algorithms, commands, rsa_bits, aes256, slots)

    def _rsa_ok(self, bits: int, algorithms: frozenset[int]) -> bool:
        if int(TPM2_ALG.RSA) not in algorithms:
            return False
        return self._test(
            TPMT_PUBLIC_PARMS(
                type=TPM2_ALG.RSA,
                parameters=TPMU_PUBLIC_PARMS(
                    rsaDetail=TPMS_RSA_PARMS(
                        symmetric=_NO_SYM,
                        scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                        keyBits=bits,
                        exponent=0,
                    )
                ),
            )
        )

    def _test(self, parms: TPMT_PUBLIC_PARMS) -> bool:
        """TPM2_TestParms: True when the TPM accepts these parameters."""
        try:
            self.esys().test_parms(parms)
        except TSS2_Exception as e:
            if is_tcti_error(e):
                raise
            return False
        return True

    def lockout(self) -> Lockout:
        """TPM2_GetCapability(TPM_PT_PERMANENT, TPM_PT_LOCKOUT_*): the dictionary-attack state."""
        with self.lock:
            self.esys()
            props = self._properties(TPM2_PT.PERMANENT, 1)
            permanent = props.get(int(TPM2_PT.PERMANENT), 0)
            da = self._properties(TPM2_PT.LOCKOUT_COUNTER, 4)
            return Lockout(
                failures=da.get(int(TPM2_PT.LOCKOUT_COUNTER), 0),
                max_failures=da.get(int(TPM2_PT.MAX_AUTH_FAIL), 0),
                interval=da.get(int(TPM2_PT.LOCKOUT_INTERVAL), 0),
                recovery=da.get(int(TPM2_PT.LOCKOUT_RECOVERY), 0),
                in_lockout=bool(permanent & TPMA_PERMANENT.INLOCKOUT),
            )

    def transient_handles(self) -> list[int]:
        """TPM2_GetCapability(TPM_CAP_HANDLES): transient objects loaded right now (any client)."""
        with self.lock:
            self.esys()
            return self._capability(TPM2_CAP.HANDLES, int(TPM2_HT.TRANSIENT) << 24, 64)

    @property
    def loaded_count(self) -> int:
        return len(self._lru)

    # -- the storage root key --------------------------------------------------------------------
    def _create_srk(self) -> tuple[ESYS_TR, bytes]:
        """TPM2_CreatePrimary(owner, SRK template): the same key every time for this owner seed."""
        esys = self._esys
        assert esys is not None
        result = esys.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
        handle, public = result[0], result[1]
        name = bytes(public.get_name())
        return handle, name

    def _persistent(self, handle: int) -> ESYS_TR | None:
        found = self._capability(TPM2_CAP.HANDLES, handle, 1, every=False)
        if not found or found[0] != handle:
            return None
        esys = self._esys
        assert esys is not None
        return esys.tr_from_tpmpublic(handle)

    def _setup_srk(self) -> None:
        esys = self._esys
        assert esys is not None
        handle = self.persistent_handle
        if handle is None:
            with self._temporary(1):
                tr, self.srk_name = self._create_srk()
                try:
                    self._srk_context = esys.context_save(tr)
                finally:
                    self._flush(tr)
            self.srk_source = "transient (derived from the owner hierarchy on demand)"
            return
        existing = self._persistent(handle)
        if existing is None:
            with self._temporary(1):
                tr, _ = self._create_srk()
                try:
                    existing = esys.evict_control(ESYS_TR.OWNER, tr, handle)
                    self.srk_source = f"persistent at 0x{handle:08x} (created now)"
                except TSS2_Exception as e:
                    # Another process made it between our look and our EvictControl: use theirs.
                    if error_code(e) != TPM2_RC.NV_DEFINED:
                        raise
                    existing = self._persistent(handle)
                finally:
                    self._flush(tr)
            if existing is None:  # pragma: no cover - NV_DEFINED, yet nothing there
                raise StorageKeyProblem(f"persistent handle 0x{handle:08x} vanished")
        else:
            self.srk_source = f"persistent at 0x{handle:08x} (existing)"
        result = esys.read_public(existing)
        public, name = result[0], result[1]
        attributes = int(public.publicArea.objectAttributes)
        kind = int(public.publicArea.type)
        self.srk_name = bytes(name)
        del result, public, name
        storage = A.RESTRICTED | A.DECRYPT
        if attributes & storage != storage or attributes & A.SIGN_ENCRYPT:
            with contextlib.suppress(TSS2_Exception):
                esys.tr_close(existing)
            raise StorageKeyProblem(
                f"persistent handle 0x{handle:08x} holds an object that is not a storage key "
                f"(type 0x{kind:04x}, attributes 0x{attributes:08x}); configure a free handle "
                "or one holding an SRK"
            )
        self._srk = existing

    @contextlib.contextmanager
    def _parent(self, keep: Collection[str] = ()) -> Iterator[ESYS_TR]:
        """The SRK for one command: the persistent one, or the saved transient context.

        Either way it takes a transient slot while the command runs: a TPM copies a
        persistent object into a slot to use it.
        """
        if self._srk is not None:
            with self._temporary(1, keep):
                yield self._srk
            return
        esys = self.esys()
        with self._temporary(1, keep):
            try:
                tr = self._retry(lambda: esys.context_load(self._srk_context), keep)
            except TSS2_Exception as e:
                if is_tcti_error(e):
                    raise
                # The saved context no longer loads (TPM reset): derive the SRK again.
                tr, name = self._create_srk()
                if name != self.srk_name:  # pragma: no cover - the owner seed changed
                    self._flush(tr)
                    raise StorageKeyProblem(
                        "the TPM's storage root key changed (TPM2_Clear?); "
                        "keys made before cannot be loaded"
                    ) from None
                self._srk_context = esys.context_save(tr)
            try:
                yield tr
            finally:
                self._flush(tr)

    # -- slots ---------------------------------------------------------------------------------
    def _flush(self, tr: ESYS_TR) -> None:
        """TPM2_FlushContext, tolerating a handle the TPM already dropped."""
        esys = self._esys
        if esys is None:
            return
        with contextlib.suppress(TSS2_Exception):
            esys.flush_context(tr)

    def _evict_one(self, keep: Collection[str]) -> bool:
        for cache_id in self._lru:
            if cache_id not in keep:
                self._flush(self._lru.pop(cache_id))
                return True
        return False

    def _reserve(self, n: int, keep: Collection[str] = ()) -> None:
        """Evict least recently used keys until `n` more objects fit in the transient slots."""
        while len(self._lru) + self._temporaries + n > self.slots:
            if not self._evict_one(keep):
                raise RuntimeError("every TPM transient slot is in use by this operation")

    @contextlib.contextmanager
    def _temporary(self, n: int, keep: Collection[str] = ()) -> Iterator[None]:
        """Hold `n` slots for objects the caller loads and flushes itself."""
        self._reserve(n, keep)
        self._temporaries += n
        try:
            yield
        finally:
            self._temporaries -= n

    def _retry(self, command: Callable[[], T], keep: Collection[str]) -> T:
        """Run `command`; if the TPM is out of object or session memory, make room and retry:
        first by evicting our own least recently used keys, then (no resource manager, no
        other live Strongroom process) by flushing what dead processes left loaded."""
        try:
            return command()
        except TSS2_Exception as e:
            if error_code(e) not in (TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY):
                raise
            evicted = False
            while self._evict_one(keep):
                evicted = True
            if not evicted and not self._reclaim_orphans():
                raise
        try:
            return command()
        except TSS2_Exception as e:
            if error_code(e) not in (TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY):
                raise
            if not self._reclaim_orphans():
                raise
            return command()

    def _reclaim_orphans(self) -> int:
        """Flush what Strongroom processes that died left loaded, keeping ours
        (`recovery.reclaim_orphans`); counted in `reclaimed`. Returns how many went."""
        esys = self._esys
        if esys is None or self._peers is None:
            return 0
        held = [*self._lru.values(), *([self._session] if self._session else [])]
        flushed = reclaim_orphans(
            esys,
            self._peers,
            held,
            lambda first: self._capability(TPM2_CAP.HANDLES, first, 64),
        )
        self.reclaimed += flushed
        return flushed

    def loaded(self, ref: KeyRef, keep: Collection[str] = ()) -> ESYS_TR:
        """The key's transient handle: from the LRU, else TPM2_Load under the SRK."""
        tr = self._lru.get(ref.cache_id)
        if tr is not None:
            self._lru.move_to_end(ref.cache_id)
            return tr
        keep = {*keep, ref.cache_id}
        while len(self._lru) >= self.max_loaded and self._evict_one(keep):
            pass
        esys = self.esys()
        private = TPM2B_PRIVATE.unmarshal(ref.private)[0]
        public = TPM2B_PUBLIC.unmarshal(ref.public)[0]
        with self._temporary(1, keep), self._parent(keep) as parent:
            tr = self._retry(lambda: esys.load(parent, private, public), keep)
        self._lru[ref.cache_id] = tr
        return tr

    def unload(self, cache_id: str) -> None:
        """Flush one key from the LRU (after delete)."""
        with self.lock:
            tr = self._lru.pop(cache_id, None)
            if tr is not None:
                self._flush(tr)

    # -- sessions ------------------------------------------------------------------------------
    def _salted_session(self, keep: Collection[str], parent: ESYS_TR | None = None) -> ESYS_TR:
        """TPM2_StartAuthSession: an HMAC session salted with the SRK, AES-128-CFB, kept open."""
        if self._session is None:
            esys = self.esys()
            if parent is not None:
                self._session = self._retry(
                    lambda: esys.start_auth_session(
                        parent, ESYS_TR.NONE, TPM2_SE.HMAC, _SESSION_CIPHER, TPM2_ALG.SHA256
                    ),
                    keep,
                )
            else:
                with self._parent(keep) as srk:
                    self._session = self._retry(
                        lambda: esys.start_auth_session(
                            srk, ESYS_TR.NONE, TPM2_SE.HMAC, _SESSION_CIPHER, TPM2_ALG.SHA256
                        ),
                        keep,
                    )
        return self._session

    def _sessions(
        self, tr: ESYS_TR, ref: KeyRef, encrypt: bool, decrypt: bool, keep: Collection[str]
    ) -> tuple[ESYS_TR, ESYS_TR]:
        """(session1, session2) for a command on `tr`: password, or the salted session."""
        if ref.auth is None and not (encrypt or decrypt):
            return ESYS_TR.PASSWORD, ESYS_TR.NONE
        esys = self.esys()
        session = self._salted_session(keep)
        attributes = TPMA_SESSION.CONTINUESESSION
        if encrypt:
            attributes |= TPMA_SESSION.ENCRYPT
        if decrypt:
            attributes |= TPMA_SESSION.DECRYPT
        esys.trsess_set_attributes(session, attributes)
        if ref.auth is None:
            return ESYS_TR.PASSWORD, session
        esys.tr_set_auth(tr, ref.auth)
        return session, ESYS_TR.NONE

    def run(
        self,
        ref: KeyRef,
        command: Callable[[ESAPI, ESYS_TR, ESYS_TR, ESYS_TR], T],
        *,
        encrypt: bool = False,
        decrypt: bool = False,
        keep: Collection[str] = (),
    ) -> T:
        """Load the key (LRU) and run `command(esys, handle, session1, session2)` under the lock.

        `encrypt` asks the TPM to encrypt the response's first parameter, `decrypt` says the
        command's first parameter is sent encrypted. A PIN goes in through the salted session.
        """
        with self.lock:
            keep = {*keep, ref.cache_id}
            try:
                return self._run_once(ref, command, encrypt, decrypt, keep)
            except TSS2_Exception as e:
                if not forgot_our_objects(e):
                    raise
            # The TPM was reset under us: every loaded key and the session are gone (the
            # command failed on its handles, before doing anything). Start again, once.
            self.after_reset()
            return self._run_once(ref, command, encrypt, decrypt, keep)

    def _run_once(
        self,
        ref: KeyRef,
        command: Callable[[ESAPI, ESYS_TR, ESYS_TR, ESYS_TR], T],
        encrypt: bool,
        decrypt: bool,
        keep: Collection[str],
    ) -> T:
        tr = self.loaded(ref, keep)
        esys = self.esys()
        s1, s2 = self._sessions(tr, ref, encrypt, decrypt, keep)
        try:
            return command(esys, tr, s1, s2)
        finally:
            if ref.auth is not None:
                esys.tr_set_auth(tr, None)

    def after_reset(self) -> None:
        """Drop the handles a TPM reset invalidated: the loaded keys and the session (their
        ESAPI records only; the TPM holds nothing to flush). Start the TPM if nobody has
        since its power cycle. The persistent SRK survives a reset; a transient one is
        derived again on its next use (its saved context no longer loads)."""
        with self.lock:
            esys = self._esys
            if esys is None:
                return
            for tr in [*self._lru.values(), *([self._session] if self._session else [])]:
                with contextlib.suppress(TSS2_Exception):
                    esys.tr_close(tr)
            self._lru.clear()
            self._session = None
            self._temporaries = 0
            try:
                esys.startup(TPM2_SU.CLEAR)
            except TSS2_Exception as e:
                if error_code(e) != TPM2_RC.INITIALIZE:  # INITIALIZE: already started
                    raise
