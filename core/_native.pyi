# Type stub for the C extension built from native/guarded.c, native/auditline.c and
# native/keyops.c: strongroom.memory, strongroom.audit and backends/vault/keyops.py import it.

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

# native/keyops.c: the vault's EC/RSA keys on the system libcrypto. `curve` indexes
# (P-256, P-384, secp256k1). Secret outputs go into `out` (a writable guarded view);
# malformed keys raise ValueError, whose message never quotes key bytes.
def keyops_secure_heap() -> int:
    """CRYPTO_secure_malloc_init's result: 1 locked, 2 not locked, 0 no secure heap."""

def ec_pkcs8_size(curve: int, /) -> int: ...
def ec_import(curve: int, data: Buffer, raw: bool, out: Buffer, /) -> bytes:
    """Raw scalar or PKCS#8/SEC1 DER, checked, as PKCS#8 into `out`; the public point."""

def ec_generate(curve: int, out: Buffer, /) -> bytes: ...
def ec_sign(curve: int, material: Buffer, digest: Buffer, /) -> bytes:
    """ECDSA over `digest`: the DER signature."""

def ec_ecdh(curve: int, material: Buffer, peer_point: Buffer, out: Buffer, /) -> None: ...
def ec_scalar(curve: int, material: Buffer, /) -> bytes: ...
def rsa_import(data: Buffer, out: Buffer, /) -> tuple[int, bytes, bytes]:
    """PKCS#8/PKCS#1 DER, checked, as PKCS#8 into `out`: (length, n, e)."""

def rsa_generate(bits: int, out: Buffer, /) -> tuple[int, bytes, bytes]: ...
def rsa_sign(material: Buffer, digest: Buffer, mode: int, /) -> bytes:
    """Mode 0: PKCS#1 v1.5 over a SHA-256 or SHA-512 digest (by its length); 1: PSS over
    SHA-256; 2: PKCS#1 v1.5 padding (block type 1) of `digest` as given, a DigestInfo the
    caller built (at most the key's size - 11 bytes)."""

def rsa_decrypt(material: Buffer, ciphertext: Buffer, sha1: bool, /) -> bytes:
    """RSA-OAEP with MGF1 on SHA-256 (or SHA-1); ValueError if it fails."""

def pkcs8_25519(data: Buffer, x25519: bool, out: Buffer, /) -> None: ...
def pem_to_der(pem: Buffer, out: Buffer, /) -> int: ...
def der_to_pem(der: Buffer, label: str, /) -> bytes: ...
