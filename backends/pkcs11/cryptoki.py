"""The few Cryptoki calls that python-pkcs11 makes in a way we cannot use, made through ctypes.

- **C_Initialize.** python-pkcs11 calls it with NULL arguments. To a module that means
  "this application never calls me from two threads at once", and SoftHSM2 then turns its
  internal locks off: two threads signing at once crashed it in our tests. We initialise
  the module first with `CKF_OS_LOCKING_OK`, from python-pkcs11's own `initialize` hook.
- **C_Login / C_Logout.** python-pkcs11's `Token.open(user_pin=...)` opens a session and
  then logs in; when the PIN is wrong it raises and the session is never closed. We log in
  on a session we already hold, so a refused PIN leaks nothing.

The calls go through the module's own `C_GetFunctionList` table, as PKCS#11 intends.
`ctypes.CDLL` on the path python-pkcs11 loaded returns the same, already loaded, library.
"""

from __future__ import annotations

import ctypes
from typing import Any

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG

CKF_OS_LOCKING_OK = 0x00000002
CKU_USER = 1

CKR_OK = 0x000
CKR_HOST_MEMORY = 0x002
CKR_GENERAL_ERROR = 0x005
CKR_FUNCTION_FAILED = 0x006
CKR_ARGUMENTS_BAD = 0x007
CKR_CANT_LOCK = 0x00A
CKR_DEVICE_ERROR = 0x030
CKR_DEVICE_MEMORY = 0x031
CKR_DEVICE_REMOVED = 0x032
CKR_FUNCTION_CANCELED = 0x050
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_INVALID = 0x0A1
CKR_PIN_LEN_RANGE = 0x0A2
CKR_PIN_EXPIRED = 0x0A3
CKR_PIN_LOCKED = 0x0A4
CKR_SESSION_CLOSED = 0x0B0
CKR_SESSION_HANDLE_INVALID = 0x0B3
CKR_TOKEN_NOT_PRESENT = 0x0E0
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKR_USER_PIN_NOT_INITIALIZED = 0x102
CKR_USER_ANOTHER_ALREADY_LOGGED_IN = 0x104
CKR_USER_TOO_MANY_TYPES = 0x105
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

RV_NAMES = {
    value: name for name, value in globals().items() if name.startswith("CKR_") and name != "CKR_OK"
}


def rv_name(rv: int) -> str:
    """`CKR_PIN_INCORRECT (0xa0)`, or the bare number for codes this module does not name."""
    name = RV_NAMES.get(rv)
    return f"{name} ({rv:#x})" if name else f"CKR {rv:#x}"


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


# CK_FUNCTION_LIST, up to C_Logout: the table's layout is fixed by the standard.
_LEADING_FUNCTIONS = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
)


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", _Version)] + [(name, ctypes.c_void_p) for name in _LEADING_FUNCTIONS]


class _InitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


_InitializeFn = ctypes.CFUNCTYPE(CK_RV, ctypes.POINTER(_InitializeArgs))
_LoginFn = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_void_p, CK_ULONG)
_LogoutFn = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)


class Cryptoki:
    """C_Initialize, C_Login and C_Logout of one loaded PKCS#11 module."""

    def __init__(self, path: str) -> None:
        """Load (or find the already loaded) module; OSError if it cannot be loaded."""
        self._dll = ctypes.CDLL(path)
        try:
            get_function_list = self._dll.C_GetFunctionList
        except AttributeError:
            raise OSError("it has no C_GetFunctionList, so it is not a PKCS#11 module") from None
        get_function_list.restype = CK_RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        table = ctypes.POINTER(_FunctionList)()
        rv = get_function_list(ctypes.byref(table))
        if rv != CKR_OK or not table:
            raise OSError(f"C_GetFunctionList failed: {rv_name(rv)}")
        functions = table.contents
        self._functions = functions  # keeps the table's owner alive with the pointers
        self._initialize: Any = _InitializeFn(functions.C_Initialize)
        self._login: Any = _LoginFn(functions.C_Login)
        self._logout: Any = _LogoutFn(functions.C_Logout)

    def initialize_os_locking(self) -> int:
        """PKCS#11: C_Initialize with CKF_OS_LOCKING_OK. Returns the CKR code."""
        args = _InitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return int(self._initialize(ctypes.byref(args)))

    def login_user(self, session_handle: int, pin: bytearray) -> int:
        """PKCS#11: C_Login(CKU_USER). Returns the CKR code; the caller wipes `pin`."""
        size = len(pin)
        buffer = (ctypes.c_char * max(size, 1)).from_buffer(pin if size else bytearray(1))
        return int(self._login(session_handle, CKU_USER, ctypes.addressof(buffer), size))

    def logout(self, session_handle: int) -> int:
        """PKCS#11: C_Logout. Returns the CKR code."""
        return int(self._logout(session_handle))
