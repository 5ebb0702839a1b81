"""libsodium through PyNaCl's cffi handle, on pointers into guarded memory.

PyNaCl's public functions take and return `bytes`, which would leave copies of
secrets in Python memory. Its cffi `lib` takes pointers, so key material can stay
in guarded buffers. Backends use libsodium only through this module (the vault for its
keys and snapshot, the FIDO2 and PIV key slots to wrap the vault's master key); besides
it, only `strongroom.memory` (its own BLAKE2b and random fill) touches `ffi`/`lib`. It
sits in core, in the runtime layer next to `memory`, so that no backend imports another.
"""

from __future__ import annotations

import signal
import threading

from nacl._sodium import ffi, lib

from .errors import IntegrityError, InvalidArgument, StrongroomError
from .memory import Guarded

Buffer = bytes | bytearray | memoryview

XNONCE = 24
TAG = 16
ED25519_SK = 64
ED25519_PK = 32
X25519 = 32


def _ptr(buf: Buffer) -> object:
    return ffi.from_buffer(buf)


def _wptr(buf: memoryview) -> object:
    return ffi.from_buffer(buf, require_writable=True)


def random_into(out: memoryview) -> None:
    """Fill `out` from libsodium's CSPRNG."""
    lib.randombytes(_wptr(out), len(out))


def random_bytes(n: int) -> bytes:
    out = bytearray(n)
    lib.randombytes(ffi.from_buffer(out), n)
    return bytes(out)


def seal(key: memoryview, plaintext: Buffer, aad: bytes) -> bytes:
    """XChaCha20-Poly1305: returns nonce ‖ ciphertext ‖ tag."""
    nonce = random_bytes(XNONCE)
    out = bytearray(len(plaintext) + TAG)
    clen = ffi.new("unsigned long long *")
    rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out),
        clen,
        _ptr(plaintext),
        len(plaintext),
        aad,
        len(aad),
        ffi.NULL,
        nonce,
        _ptr(key),
    )
    if rc != 0:  # pragma: no cover - libsodium does not fail here
        raise RuntimeError("crypto_aead_xchacha20poly1305_ietf_encrypt failed")
    return nonce + bytes(out)


def open_into(key: memoryview, blob: bytes, aad: bytes, out: memoryview) -> None:
    """Decrypt `seal`'s output straight into `out`; IntegrityError if it fails to authenticate."""
    if len(blob) < XNONCE + TAG or len(out) != len(blob) - XNONCE - TAG:
        raise IntegrityError("sealed data has the wrong length")
    nonce, ct = blob[:XNONCE], blob[XNONCE:]
    mlen = ffi.new("unsigned long long *")
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        _wptr(out), mlen, ffi.NULL, ct, len(ct), aad, len(aad), nonce, _ptr(key)
    )
    if rc != 0:
        raise IntegrityError("sealed data failed authentication")


def opened_length(blob: bytes) -> int:
    return len(blob) - XNONCE - TAG


def keyed_hash_into(
    key: memoryview, personal: bytes, out: memoryview, message: bytes = b""
) -> None:
    """BLAKE2b keyed with `key` and personalised with `personal`, over `message`: with no
    message a KDF for subkeys, with one a MAC (the vault's record and manifest MACs)."""
    if len(personal) != 16:
        raise ValueError("personal must be 16 bytes")
    rc = lib.crypto_generichash_blake2b_salt_personal(
        _wptr(out),
        len(out),
        message if message else ffi.NULL,
        len(message),
        _ptr(key),
        len(key),
        ffi.NULL,
        personal,
    )
    if rc != 0:  # pragma: no cover
        raise RuntimeError("crypto_generichash_blake2b_salt_personal failed")


_ASYNC_SIGNALS = signal.valid_signals() - {
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
}
"""Signals a worker thread blocks so that they reach the main thread: all but the faults the
thread's own instructions raise."""


def argon2id_into(out: memoryview, passphrase: bytes, salt: bytes, ops: int, mem: int) -> None:
    """Argon2id (libsodium crypto_pwhash) into guarded memory.

    It runs in a worker thread (cffi releases the GIL) while this thread waits: Python runs
    signal handlers only in the main thread between bytecodes, so a long derivation called
    directly would hold off SIGTERM and Ctrl-C until it ended. The worker writes into a
    guarded buffer of its own, so that when the wait is interrupted it can finish into memory
    that is still mapped and close it itself.
    """
    if len(salt) != 16:
        raise InvalidArgument("the Argon2id salt must be 16 bytes")
    scratch = Guarded(len(out))
    lock = threading.Lock()
    state: dict[str, int | bool | None] = {"rc": None, "abandoned": False}

    def derive() -> None:
        # A process-directed signal goes to any thread that does not block it. Delivered
        # here, it would interrupt nothing: the main thread would sleep on in join() until
        # the derivation ended. Blocked here, the kernel must deliver it to the main thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        with scratch.write() as target:
            rc = lib.crypto_pwhash(
                _wptr(target),
                len(target),
                passphrase,
                len(passphrase),
                salt,
                ops,
                mem,
                lib.crypto_pwhash_alg_argon2id13(),
            )
        with lock:
            state["rc"] = rc
            if state["abandoned"]:
                scratch.close()

    worker = threading.Thread(target=derive, name="strongroom-argon2id", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            # In slices: a signal that another thread of the process received (one that does
            # not block it) wakes no one, and its Python handler waits for this thread to run
            # bytecode again.
            worker.join(0.1)
    except BaseException:  # a signal handler raised (Ctrl-C): leave the buffer to the worker
        with lock:
            if state["rc"] is None:
                state["abandoned"] = True
            else:
                scratch.close()
        raise
    try:
        if state["rc"] != 0:
            raise StrongroomError(f"Argon2id could not allocate {mem >> 20} MiB of memory")
        with scratch.read() as derived:
            out[:] = derived
    finally:
        scratch.close()


def ed25519_keypair_from_seed(seed: memoryview, sk_out: memoryview) -> bytes:
    """crypto_sign_seed_keypair: writes the 64-byte secret key, returns the public key."""
    pk = ffi.new("unsigned char[]", ED25519_PK)
    lib.crypto_sign_seed_keypair(pk, _wptr(sk_out), _ptr(seed))
    return bytes(ffi.buffer(pk, ED25519_PK))


def ed25519_sign(sk: memoryview, message: bytes) -> bytes:
    """crypto_sign on the 64-byte secret key; returns the detached 64-byte signature."""
    sm = ffi.new("unsigned char[]", len(message) + 64)
    smlen = ffi.new("unsigned long long *")
    lib.crypto_sign(sm, smlen, message, len(message), _ptr(sk))
    return bytes(ffi.buffer(sm, 64))


def x25519_public(sk: memoryview) -> bytes:
    pk = ffi.new("unsigned char[]", X25519)
    lib.crypto_scalarmult_base(pk, _ptr(sk))
    return bytes(ffi.buffer(pk, X25519))


def x25519_into(sk: memoryview, peer: bytes, out: memoryview) -> None:
    """X25519 shared secret into `out`; refuses low-order peer points (all-zero result)."""
    if lib.crypto_scalarmult(_wptr(out), _ptr(sk), peer) != 0:
        raise InvalidArgument("the peer X25519 public key is a low-order point")


def memzero(buf: memoryview | bytearray) -> None:
    lib.sodium_memzero(ffi.from_buffer(buf, require_writable=True), len(buf))
