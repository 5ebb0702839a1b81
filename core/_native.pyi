# Type stub for the C extension built from native/guarded.c and native/auditline.c:
# strongroom.memory and strongroom.audit import it.

from typing_extensions import Buffer

class CanaryError(RuntimeError): ...

class GuardedBuffer:
    def __init__(self, size: int) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def address(self) -> int: ...
    @property
    def mlocked(self) -> bool:
        """Locked in RAM: by mlock, or by the kernel for memfd_secret. False once closed."""
    @property
    def secret(self) -> bool:
        """Backed by memfd_secret (out of the kernel's direct map). False once closed and in
        a forked child, which has no mapping there (MADV_DONTFORK)."""
    @property
    def closed(self) -> bool: ...
    @property
    def mode(self) -> int: ...
    @property
    def exports(self) -> int: ...
    def protect(self, mode: int) -> None: ...
    def close(self) -> None: ...
    def __buffer__(self, flags: int) -> memoryview: ...

def page_size() -> int: ...
def memlock_limit() -> tuple[int, int]: ...
def locked_bytes() -> int:
    """RLIMIT_MEMLOCK budget held by guarded buffers: mlocked plus memfd_secret bytes."""

def secret_bytes() -> int:
    """The memfd_secret part of locked_bytes()."""

def mlock_failures() -> int: ...
def secretmem_available() -> bool:
    """The kernel offers memfd_secret (probed once; a refusal later also turns it off)."""

def secretmem_enabled() -> bool:
    """New buffers try memfd_secret when available (STRONGROOM_NO_SECRETMEM, set_secretmem)."""

def set_secretmem(enabled: bool) -> None: ...
def xor_into(out: Buffer, a: Buffer, b: Buffer) -> None:
    """out[i] = a[i] ^ b[i]; ValueError unless the three lengths are equal."""

def disable_core_dumps() -> None: ...
def scrub(obj: bytes | bytearray) -> None: ...
def wipe(buffer: bytearray | memoryview) -> None: ...
def compare(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool: ...
def audit_append(
    fd: int,
    expected_size: int,
    seq: int,
    head: str,
    key: bytes,
    payload: Buffer | None,
    tail: str,
    prev: str,
    /,
) -> tuple[int, str] | None: ...
