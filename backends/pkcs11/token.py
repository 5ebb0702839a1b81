"""The connection to one token: the loaded module, the process-wide login, the session pool.

PKCS#11 keeps one login state per application and token: once any session logs in, every
session of the process is logged in, and `C_Logout` on any of them logs them all out. So
logins are kept here per (module, token serial) and shared by every backend instance of
the process that uses that token, counted, and ended when the last one closes. Each
backend has its own pool of sessions, opened without a PIN after the login exists.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    StrongroomError,
)

from . import cryptoki
from .cryptoki import Cryptoki, rv_name

try:
    import pkcs11
    from pkcs11 import _pkcs11
    from pkcs11 import exceptions as p11

    IMPORT_ERROR: str | None = None
except ImportError as _e:  # pragma: no cover - exercised only without python-pkcs11
    IMPORT_ERROR = str(_e)

# Session errors after which the session is thrown away instead of going back to the pool.
_BROKEN_SESSION_ERRORS: tuple[type[BaseException], ...] = ()
if IMPORT_ERROR is None:
    _BROKEN_SESSION_ERRORS = (
        p11.SessionHandleInvalid,
        p11.SessionClosed,
        p11.DeviceRemoved,
        p11.TokenNotPresent,
        p11.DeviceError,
    )

# Debian packages that ship common PKCS#11 modules, for "not found; install X" reasons.
_MODULE_PACKAGES = {
    "libsofthsm2.so": "softhsm2",
    "opensc-pkcs11.so": "opensc-pkcs11",
    "libykcs11.so": "ykcs11",
    "libtpm2_pkcs11.so": "libtpm2-pkcs11-1",
}


def missing_module_reason(path: str) -> str:
    """What to do when the module file is missing."""
    base = os.path.basename(path)
    package = _MODULE_PACKAGES.get(base)
    fix = (
        f"install {package} (apt-get install {package})"
        if package
        else "install your HSM vendor's PKCS#11 module or correct `module`"
    )
    return f"{base} not found at {path}; {fix}"


@dataclass
class Module:
    """One PKCS#11 library loaded into this process."""

    path: str
    lib: Any
    cryptoki: Cryptoki
    concurrent: bool
    """True when we initialised it with CKF_OS_LOCKING_OK, so threads may call it at once."""
    serial: threading.RLock | None
    """Held around every call when the module was initialised by someone else without locking."""
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The process environment when it was loaded, which is what its C_Initialize read.
    Kept out of the repr: the environment may hold secrets."""


_MODULES: dict[str, Module] = {}
_MODULES_LOCK = threading.Lock()
_CRYPTOKI: dict[str, Cryptoki] = {}  # by the path our lib objects were made with
_INIT_RESULT: dict[str, int] = {}


def _lib_class() -> type:
    """A python-pkcs11 `lib` whose C_Initialize asks the module for OS locking."""

    class OsLockingLib(_pkcs11.lib):
        def initialize(self) -> None:
            """PKCS#11: C_Initialize(CKF_OS_LOCKING_OK), instead of python-pkcs11's NULL."""
            rv = _CRYPTOKI[self.so].initialize_os_locking()
            _INIT_RESULT[self.so] = rv
            if rv not in (cryptoki.CKR_OK, cryptoki.CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise p11.PKCS11Error(f"C_Initialize failed: {rv_name(rv)}")

    return OsLockingLib


# Variables Strongroom put into os.environ from a backend's `env`, so that a later backend
# can tell them from values the user exported.
_ENV_FROM_CONFIG: dict[str, str] = {}


def module_environment(
    env: Mapping[str, str], override: bool
) -> tuple[dict[str, str], tuple[str, ...]]:
    """The values of a backend's `env` to have in force when its module loads, and the names
    whose value exported by the user is kept instead of the config's (unless `override`).

    Empty counts as not exported, and so does a value that an earlier backend's `env` set.
    """
    wanted: dict[str, str] = {}
    kept: list[str] = []
    for name, value in env.items():
        current = os.environ.get(name)
        exported = bool(current) and _ENV_FROM_CONFIG.get(name) != current
        if exported and not override and current != value:
            assert current is not None
            wanted[name] = current
            kept.append(name)
        else:
            wanted[name] = value
    return wanted, tuple(kept)


def load_module(path: str, env: Mapping[str, str] | None = None) -> Module:
    """Load `path` once per process, with `env` (from `module_environment`) set in os.environ
    first: a module reads its environment in C_Initialize (SoftHSM2: SOFTHSM2_CONF) and
    perhaps later, so the values stay set for the life of the process.

    OSError or PKCS11Error if it is not a usable module; BackendUnavailable if it was loaded
    already with other values of `env`, which it would never see.
    """
    real = os.path.realpath(path)
    env = env or {}
    with _MODULES_LOCK:
        module = _MODULES.get(real)
        if module is not None:
            differ = sorted(n for n, v in env.items() if module.environment.get(n) != v)
            if differ:
                # Names only: the values may be secrets.
                raise BackendUnavailable(
                    "pkcs11",
                    f"{path} is already loaded in this process with another value of "
                    f"{', '.join(differ)}, and a module reads its environment once, when "
                    "it is initialised; give every backend that uses this module the same "
                    "`env`, or use a separate process",
                )
            return module
        for name, value in env.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
                _ENV_FROM_CONFIG[name] = value
        api = Cryptoki(real)
        loaded: dict[str, Any] = getattr(pkcs11, "_loaded", {})
        lib = loaded.get(path) or loaded.get(real)
        if lib is not None:
            # Someone in this process already loaded it through pkcs11.lib(), which passes
            # C_Initialize no locking flags: we must not call it from two threads at once.
            concurrent = False
        else:
            _CRYPTOKI[real] = api
            lib = _lib_class()(real)
            concurrent = _INIT_RESULT.pop(real, -1) == cryptoki.CKR_OK
            # Later pkcs11.lib(path) calls in this process get this object instead of
            # failing with CKR_CRYPTOKI_ALREADY_INITIALIZED.
            loaded.setdefault(real, lib)
            loaded.setdefault(path, lib)
        module = Module(
            real,
            lib,
            api,
            concurrent,
            None if concurrent else threading.RLock(),
            dict(os.environ),
        )
        _MODULES[real] = module
        return module


def find_token(module: Module, label: str) -> Any:
    """PKCS#11: C_GetSlotList/C_GetTokenInfo; the one token labelled `label`, else None.

    Raises BackendUnavailable when two tokens carry the label.
    """
    found = list(module.lib.get_tokens(token_label=label))
    if len(found) > 1:
        raise BackendUnavailable(
            "pkcs11", f"{len(found)} tokens are labelled {label!r}; give each a unique label"
        )
    return found[0] if found else None


def token_labels(module: Module) -> list[str]:
    """Labels of every present token (for error messages)."""
    try:
        return sorted(str(t.label) for t in module.lib.get_tokens())
    except Exception:  # only for a hint in a message
        return []


# -- the process-wide login ------------------------------------------------------------------
@dataclass
class _Login:
    anchor: Any  # the python-pkcs11 session C_Login was called on; kept open while in use
    pin_tag: bytes
    users: int
    owned: bool  # False when someone else in the process had already logged in


_LOGINS: dict[tuple[str, bytes], _Login] = {}
_LOGINS_LOCK = threading.Lock()
_TAG_KEY = os.urandom(32)


def pin_tag(pin: bytes | bytearray) -> bytes:
    """A keyed hash of a PIN, to compare PINs without keeping one (key: random per process)."""
    return hmac.new(_TAG_KEY, pin, hashlib.sha256).digest()


def login(
    backend: str, module: Module, token: Any, label: str, pin: bytearray, pin_hash: bytes
) -> None:
    """PKCS#11: C_OpenSession + C_Login(CKU_USER), or join this process's existing login.

    Never retries: one call is at most one C_Login. The caller wipes `pin`.
    """
    key = (module.path, bytes(token.serial))
    with _LOGINS_LOCK:
        existing = _LOGINS.get(key)
        if existing is not None:
            if not hmac.compare_digest(existing.pin_tag, pin_hash):
                # The token accepted another PIN for this process, so this one is wrong;
                # refuse without spending one of the token's PIN tries.
                raise AuthenticationFailed(f"wrong PIN for token {label!r} (backend {backend!r})")
            existing.users += 1
            return
        flags = int(token.flags)
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            raise _locked(label)
        if not flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED:
            raise BackendUnavailable(
                backend, f"token {label!r} has no user PIN yet; a security officer must set one"
            )
        with _serial(module):
            anchor = token.open(rw=True)
            try:
                rv = module.cryptoki.login_user(int(anchor.handle), pin)
            except BaseException:
                anchor.close()
                raise
        if rv in (cryptoki.CKR_OK, cryptoki.CKR_USER_ALREADY_LOGGED_IN):
            _LOGINS[key] = _Login(anchor, pin_hash, 1, rv == cryptoki.CKR_OK)
            return
        anchor.close()
    raise _login_error(backend, module, label, rv)


def logout(module: Module, token: Any) -> None:
    """Leave the shared login; the last user's leaving calls PKCS#11 C_Logout."""
    key = (module.path, bytes(token.serial))
    with _LOGINS_LOCK:
        entry = _LOGINS.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users > 0:
            return
        del _LOGINS[key]
        with _serial(module):
            try:
                if entry.owned:
                    module.cryptoki.logout(int(entry.anchor.handle))
            finally:
                entry.anchor.close()


def _locked(label: str) -> DeviceLocked:
    return DeviceLocked(
        f"the user PIN of token {label!r} is locked; a security officer must unblock it "
        "(pkcs11-tool --init-pin --login --login-type so)"
    )


def _login_error(backend: str, module: Module, label: str, rv: int) -> StrongroomError:
    if rv == cryptoki.CKR_PIN_LOCKED:
        return _locked(label)
    if rv in (cryptoki.CKR_PIN_INCORRECT, cryptoki.CKR_PIN_INVALID, cryptoki.CKR_PIN_LEN_RANGE):
        left: int | None = None
        note = ""
        fresh = find_token(module, label)
        flags = int(fresh.flags) if fresh is not None else 0
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            return _locked(label)
        if flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY:
            left = 1
        elif flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW:
            note = "; the token reports earlier failed tries (CKF_USER_PIN_COUNT_LOW)"
        return AuthenticationFailed(
            f"wrong PIN for token {label!r} (backend {backend!r}, {rv_name(rv)}){note}", left
        )
    if rv == cryptoki.CKR_PIN_EXPIRED:
        return AuthenticationFailed(f"the PIN of token {label!r} has expired; change it first")
    if rv == cryptoki.CKR_USER_PIN_NOT_INITIALIZED:
        return BackendUnavailable(backend, f"token {label!r} has no user PIN yet")
    if rv in (
        cryptoki.CKR_TOKEN_NOT_PRESENT,
        cryptoki.CKR_DEVICE_REMOVED,
        cryptoki.CKR_DEVICE_ERROR,
        cryptoki.CKR_SESSION_HANDLE_INVALID,
    ):
        return BackendUnavailable(backend, f"token {label!r} failed at login: {rv_name(rv)}")
    if rv == cryptoki.CKR_USER_ANOTHER_ALREADY_LOGGED_IN:
        return AuthenticationFailed(
            f"token {label!r} is logged in as the security officer in this process"
        )
    return StrongroomError(f"C_Login on token {label!r} failed: {rv_name(rv)}")


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def _serial(module: Module) -> threading.RLock | _NoLock:
    return module.serial if module.serial is not None else _NO_LOCK


# -- the session pool ---------------------------------------------------------------------------
class PooledSession:
    """One open session and the key objects already found in it (object lookups cost a
    C_FindObjects and several C_GetAttributeValue calls; signing with a cached object does not).
    """

    __slots__ = ("objects", "session")

    def __init__(self, session: Any) -> None:
        self.session = session
        self.objects: dict[tuple[str, Any], Any] = {}


class SessionPool:
    """Up to `size` R/W sessions, each used by one thread at a time; opened on demand.

    `take` and `give_back` are on every operation, so their common case takes no lock:
    `list.pop` and `list.append` are atomic in CPython. Only a thread that finds no idle
    session takes the condition, to open one or to wait.
    """

    def __init__(self, module: Module, token: Any, size: int, wait_seconds: float = 30.0) -> None:
        self._module = module
        self._token = token
        self._size = size
        self._wait = wait_seconds
        self._serial = module.serial
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[PooledSession] = []
        self._all: list[PooledSession] = []
        self._opening = 0
        self._waiting = 0
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"open": len(self._all), "idle": len(self._idle), "max": self._size}

    def loan(self) -> _Loan:
        """`with pool.loan() as ps:` one session for the length of the block."""
        return _Loan(self)

    def take(self) -> PooledSession:
        """A session for this thread alone, until `give_back`."""
        try:
            pooled = self._idle.pop()
        except IndexError:
            pooled = self._take_slow()
        if self._closed:
            self._idle.append(pooled)
            self._drain()
            raise StrongroomError("the PKCS#11 backend is closed")
        if self._serial is not None:
            self._serial.acquire()
        return pooled

    def _take_slow(self) -> PooledSession:
        with self._cond:
            self._waiting += 1  # before looking, so a give_back that misses us notifies
            try:
                while True:
                    if self._closed:
                        raise StrongroomError("the PKCS#11 backend is closed")
                    if self._idle:
                        return self._idle.pop()
                    if len(self._all) + self._opening < self._size:
                        self._opening += 1
                        break
                    if not self._cond.wait(self._wait):
                        raise BackendUnavailable(
                            "pkcs11",
                            f"all {self._size} sessions stayed busy for {self._wait:.0f} s",
                        )
            finally:
                self._waiting -= 1
        try:
            with _serial(self._module):
                pooled = PooledSession(self._token.open(rw=True))
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._opening -= 1
            self._all.append(pooled)
        return pooled

    def give_back(self, pooled: PooledSession, broken: bool) -> None:
        """Return a session from `take`; a broken one is closed instead."""
        if self._serial is not None:
            self._serial.release()
        if broken or self._closed:
            with self._cond:
                if pooled in self._all:
                    self._all.remove(pooled)
                self._cond.notify()
            _close_quietly(self._module, pooled)
            return
        self._idle.append(pooled)
        if self._waiting:
            with self._cond:
                self._cond.notify()
        if self._closed:  # close() ran meanwhile and did not see this one
            self._drain()

    def forget(self, handle: str) -> None:
        """Drop cached objects of a key (after it is deleted) from every session."""
        with self._cond:
            sessions = list(self._all)
        for pooled in sessions:
            for key in [k for k in pooled.objects if k[0] == handle]:
                pooled.objects.pop(key, None)

    def close(self) -> None:
        """PKCS#11: C_CloseSession for every idle session; busy ones close when returned."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._drain()

    def _drain(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            for pooled in idle:
                if pooled in self._all:
                    self._all.remove(pooled)
        for pooled in idle:
            _close_quietly(self._module, pooled)


def _close_quietly(module: Module, pooled: PooledSession) -> None:
    pooled.objects.clear()
    try:
        with _serial(module):
            pooled.session.close()
    except Exception:  # a dead session cannot be closed twice; nothing else to do
        return


def is_broken_session(error: BaseException) -> bool:
    """True for errors after which a session must not be used again."""
    return isinstance(error, _BROKEN_SESSION_ERRORS)


class _Loan:
    """`with` form of take/give_back."""

    __slots__ = ("_pool", "_pooled")

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool

    def __enter__(self) -> PooledSession:
        self._pooled = self._pool.take()
        return self._pooled

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        broken = exc_type is not None and issubclass(exc_type, _BROKEN_SESSION_ERRORS)
        self._pool.give_back(self._pooled, broken)


def with_public_session(module: Module, token: Any, action: Callable[[Any], Any]) -> Any:
    """Run `action(session)` in a short-lived session that is not logged in."""
    with _serial(module):
        session = token.open()
        try:
            return action(session)
        finally:
            session.close()
