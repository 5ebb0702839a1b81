"""Guarded memory: the protections are checked against the kernel, not just the API.

Faults (guard pages, no-access between operations, read-only views) are provoked in
child processes that must die with SIGSEGV; /proc/self/maps, /proc/self/smaps and
/proc/self/mem show the page protections, mlock, MADV_DONTDUMP and the wipe.

The inner pages are memfd_secret where the kernel has it and anonymous memory otherwise.
Tests whose observations differ between the two take the `backing` fixture and run once
per backing (tests/test_native_secretmem.py has what only memfd_secret does).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import logging
import mmap
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from nobody_support import run_as_nobody, skip_unless_root_with_setpriv, unprivileged_tree

from strongroom import _native
from strongroom import memory as memory_module
from strongroom.errors import GuardedMemoryError, InvalidArgument
from strongroom.memory import (
    MAX_SIZE,
    Guarded,
    constant_time_equal,
    memlock_status,
    page_size,
    scrub_bytes,
    wipe,
)

SECRET = b"correct horse battery staple"
PAGE = mmap.PAGESIZE

# Every child disables core dumps first (also exercising disable_core_dumps): the SIGSEGVs
# these tests provoke on purpose must not leave core files behind.
# expect_backing() checks that a buffer took the backing the parent chose for the child
# (through STRONGROOM_NO_SECRETMEM, see child_env()).
CHILD_PRELUDE = """\
import ctypes, os, sys
from strongroom import _native
from strongroom.memory import Guarded, disable_core_dumps
disable_core_dumps()
def expect_backing(g):
    want = _native.secretmem_available() and os.environ.get("STRONGROOM_NO_SECRETMEM") != "1"
    assert g._buf.secret == want, ("backing", g._buf.secret, want)
def damage(address):  # the same as damage_byte() below, for the child
    ctypes.memset(address, ctypes.string_at(address, 1)[0] ^ 0xFF, 1)
"""

SECRETMEM = _native.secretmem_available()
NO_SECRETMEM_ENV = "STRONGROOM_NO_SECRETMEM"


@pytest.fixture(params=["secretmem", "anonymous"])
def backing(request: pytest.FixtureRequest) -> Iterator[str]:
    """Back new buffers with memfd_secret or with anonymous memory, for this test only."""
    if request.param == "secretmem" and not SECRETMEM:
        pytest.skip("memfd_secret is not available on this kernel")
    was = _native.secretmem_enabled()
    _native.set_secretmem(request.param == "secretmem")
    try:
        yield request.param
    finally:
        _native.set_secretmem(was)


def child_env(backing: str) -> dict[str, str]:
    """The environment for a child process whose buffers must take `backing`."""
    env = {k: v for k, v in os.environ.items() if k != NO_SECRETMEM_ENV}
    if backing == "anonymous":
        env[NO_SECRETMEM_ENV] = "1"
    return env


def is_secret(g: Guarded) -> bool:
    """Whether `g` is backed by memfd_secret (asked of the native object: Guarded may not say)."""
    return bool(g._buf.secret)


def expect_backing(g: Guarded, backing: str) -> None:
    assert is_secret(g) == (backing == "secretmem")


def prot(backing: str, rwx: str) -> str:
    """The /proc/self/maps permissions of the inner pages: memfd_secret pages are shared."""
    return rwx + ("s" if backing == "secretmem" else "p")


def run_child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def assert_segfault(code: str, backing: str | None = None) -> None:
    """The child must reach the marker line and then die of SIGSEGV, not of anything else."""
    proc = run_child(code, None if backing is None else child_env(backing))
    assert "about-to-fault" in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr)


def mapping_at(address: int) -> tuple[int, int, str] | None:
    """(start, end, perms) of the mapping in this process that contains `address`."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return lo, hi, perms
    return None


def perms_at(address: int) -> str | None:
    found = mapping_at(address)
    return None if found is None else found[2]


def inner_start_of(address: int) -> int:
    """Start of the inner pages: the mapping holding the data (the guard pages are separate)."""
    found = mapping_at(address)
    assert found is not None
    return found[0]


def smaps_at(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that contains `address`."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping header line
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= address < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    assert fields, f"no mapping contains {address:#x}"
    return fields


def peek(address: int, n: int) -> bytes:
    """Read memory whatever its protection (/proc/self/mem ignores PROT_NONE)."""
    with open("/proc/self/mem", "rb", buffering=0) as f:
        f.seek(address)
        return f.read(n)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def peek_guarded(g: Guarded, address: int, n: int) -> bytes:
    """Read `n` bytes of `g`'s inner pages whatever their protection.

    /proc/self/mem cannot read memfd_secret pages (EIO), so for those the pages are made
    readable for the moment of the read, then inaccessible again.
    """
    if not is_secret(g):
        return peek(address, n)
    start = address & ~(PAGE - 1)
    length = (address + n - start + PAGE - 1) & ~(PAGE - 1)
    assert _libc.mprotect(start, length, mmap.PROT_READ) == 0, ctypes.get_errno()
    try:
        return ctypes.string_at(address, n)
    finally:
        assert _libc.mprotect(start, length, 0) == 0, ctypes.get_errno()


def damage_byte(address: int) -> None:
    """Give the (accessible) byte at `address` a value it did not have.

    The canary is random per process, so writing a fixed value (say 0x41) leaves it intact
    whenever that byte of the canary already is 0x41: one process in 256, and the canary
    tests then failed as if flaky. Flipping every bit always changes the byte.
    """
    ctypes.memset(address, ctypes.string_at(address, 1)[0] ^ 0xFF, 1)


def has_cap_ipc_lock() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 14))  # CAP_IPC_LOCK = 14
    return False


# ---- the API ----------------------------------------------------------------------------


def test_round_trip_and_idempotent_close(backing: str) -> None:
    g = Guarded.from_buffer(SECRET)
    expect_backing(g, backing)
    assert g.mlocked or backing == "anonymous"  # the kernel locks memfd_secret pages
    assert g.size == len(SECRET)
    assert not g.closed
    with g.read() as view:
        assert bytes(view) == SECRET
        assert view.readonly
        assert view.nbytes == len(SECRET)
    g.close()
    assert g.closed
    assert not is_secret(g) and not g.mlocked
    g.close()  # no-op
    assert g.closed
    with pytest.raises(GuardedMemoryError):
        with g.read():
            pass


def test_new_buffer_is_zeroed_and_write_then_read(backing: str) -> None:
    with Guarded(100) as g:
        expect_backing(g, backing)
        with g.read() as view:
            assert bytes(view) == bytes(100)
        with g.write() as view:
            assert not view.readonly
            view[:] = bytes(range(100))
        with g.read() as view:
            assert bytes(view) == bytes(range(100))
    assert g.closed


def test_from_buffer_accepts_buffers_and_does_not_wipe_source() -> None:
    source = bytearray(SECRET)
    for data in (source, memoryview(source), bytes(source), memoryview(source)[4:9]):
        with Guarded.from_buffer(data) as g, g.read() as view:
            assert bytes(view) == bytes(data)
    assert source == SECRET
    with Guarded.from_buffer(memoryview(bytes(range(8))).cast("I")) as g:  # multi-byte items
        assert g.size == 8
    with pytest.raises(InvalidArgument):
        Guarded.from_buffer(b"")


@pytest.mark.parametrize("size", [0, -1, MAX_SIZE + 1])
def test_bad_sizes_are_value_errors(size: int) -> None:
    with pytest.raises(ValueError):
        Guarded(size)
    with pytest.raises(ValueError):
        _native.GuardedBuffer(size)


def test_size_must_be_an_int() -> None:
    with pytest.raises(TypeError):
        Guarded(True)
    with pytest.raises(TypeError):
        Guarded("32")  # type: ignore[arg-type]


def test_largest_size_works(backing: str) -> None:
    with Guarded(MAX_SIZE) as g, g.write() as view:
        expect_backing(g, backing)
        view[0] = 6
        view[-1] = 7


def test_repr_and_pickling_never_show_contents() -> None:
    with Guarded.from_buffer(SECRET) as g:
        assert repr(g) == f"<Guarded size={len(SECRET)}>"
        with pytest.raises(TypeError):
            pickle.dumps(g)
        with pytest.raises(TypeError):
            copy.copy(g)
        with pytest.raises(TypeError):
            pickle.dumps(g._buf)


def test_view_is_released_after_the_operation() -> None:
    with Guarded.from_buffer(SECRET) as g:
        with g.read() as view:
            with pytest.raises(TypeError):
                view[0] = 0  # read-only view
        with pytest.raises(ValueError, match="released"):
            bytes(view)


def test_protections_follow_operations(backing: str) -> None:
    with Guarded.from_buffer(SECRET) as g:
        expect_backing(g, backing)
        assert perms_at(g.address) == prot(backing, "---")
        with g.read():
            assert perms_at(g.address) == prot(backing, "r--")
        assert perms_at(g.address) == prot(backing, "---")
        with g.write():
            assert perms_at(g.address) == prot(backing, "rw-")
        assert perms_at(g.address) == prot(backing, "---")


def test_nested_operations(backing: str) -> None:
    with Guarded.from_buffer(SECRET) as g:
        expect_backing(g, backing)
        with g.read() as outer:
            with g.read() as inner:
                assert bytes(inner) == SECRET
            assert perms_at(g.address) == prot(backing, "r--")
            with g.write() as w:  # upgrade inside a read
                assert perms_at(g.address) == prot(backing, "rw-")
                w[0:7] = b"CORRECT"
            assert perms_at(g.address) == prot(backing, "r--")
            assert bytes(outer[:7]) == b"CORRECT"  # the outer view still works
        assert perms_at(g.address) == prot(backing, "---")
        with g.write() as w:
            with g.read() as r:
                assert r.readonly  # a read inside a write is still read-only...
                assert perms_at(g.address) == prot(backing, "rw-")
            w[0:7] = b"correct"  # ...and does not take write access from the outer write
        assert perms_at(g.address) == prot(backing, "---")
        with g.read() as r:
            assert bytes(r) == SECRET


def test_concurrent_readers_keep_access_until_the_last_exits(backing: str) -> None:
    g = Guarded.from_buffer(SECRET)
    expect_backing(g, backing)
    entered, first_done = threading.Event(), threading.Event()
    seen: list[bytes] = []

    def second_reader() -> None:
        with g.read() as view:
            entered.set()
            first_done.wait(10)
            seen.append(bytes(view))  # would SIGSEGV if the first reader had revoked access

    t = threading.Thread(target=second_reader)
    with g.read():
        t.start()
        assert entered.wait(10)
    first_done.set()
    t.join(10)
    assert seen == [SECRET]
    assert perms_at(g.address) == prot(backing, "---")
    g.close()


def test_an_exception_inside_an_operation_still_revokes_access(backing: str) -> None:
    with Guarded.from_buffer(SECRET) as g:
        expect_backing(g, backing)
        with pytest.raises(KeyError, match="boom"):
            with g.write():
                raise KeyError("boom")
        assert perms_at(g.address) == prot(backing, "---")
        with g.read() as view:
            assert bytes(view) == SECRET


def test_close_during_an_operation_is_refused() -> None:
    g = Guarded.from_buffer(SECRET)
    with g.read() as view:
        with pytest.raises(GuardedMemoryError):
            g.close()
        assert bytes(view) == SECRET
    g.close()


def test_native_buffer_protocol_rules(backing: str) -> None:
    b = _native.GuardedBuffer(16)
    assert b.secret == (backing == "secretmem")
    with pytest.raises(BufferError, match="not accessible"):
        memoryview(b)
    b.protect(1)
    with memoryview(b) as v:
        assert v.readonly and b.exports == 1
    assert b.exports == 0
    with pytest.raises(TypeError, match="read-write"):
        wipe(b)  # type: ignore[arg-type]  # a writable view is refused in read-only mode
    b.protect(2)
    wipe(b)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        b.protect(3)
    b.close()
    with pytest.raises(BufferError, match="closed"):
        memoryview(b)
    with pytest.raises(ValueError):
        b.protect(1)


# ---- faults: these must kill the process -------------------------------------------------


def test_memory_is_inaccessible_between_operations(backing: str) -> None:
    assert_segfault(
        """
        g = Guarded.from_buffer(b"secret!")
        expect_backing(g)
        with g.read() as v:
            assert bytes(v) == b"secret!"
        print("about-to-fault", flush=True)
        ctypes.string_at(g.address, 1)
        """,
        backing,
    )


def test_read_only_operation_cannot_write(backing: str) -> None:
    assert_segfault(
        """
        g = Guarded.from_buffer(b"secret!")
        expect_backing(g)
        with g.read():
            print("about-to-fault", flush=True)
            ctypes.memset(g.address, 0x41, 1)
        """,
        backing,
    )


def test_overflow_hits_the_trailing_guard_page(backing: str) -> None:
    assert_segfault(
        """
        g = Guarded(100)
        expect_backing(g)
        with g.write():
            ctypes.memset(g.address, 0x41, 100)  # the whole secret is fine
            print("about-to-fault", flush=True)
            ctypes.string_at(g.address + g.size, 1)  # one past the end is not
        """,
        backing,
    )


def test_underflow_hits_the_leading_guard_page(backing: str) -> None:
    assert_segfault(
        """
        g = Guarded(100)
        expect_backing(g)
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= g.address < hi:
                inner_start = lo
        with g.write():
            ctypes.string_at(inner_start, 1)  # first canary byte: accessible
            print("about-to-fault", flush=True)
            ctypes.string_at(inner_start - 1, 1)  # the guard page before it
        """,
        backing,
    )


def test_an_escaped_view_faults_after_the_operation(backing: str) -> None:
    assert_segfault(
        """
        from strongroom.errors import GuardedMemoryError
        g = Guarded.from_buffer(b"secret!")
        expect_backing(g)
        try:
            with g.read() as v:
                leaked = v[1:]
        except GuardedMemoryError:
            print("escape-detected", flush=True)
        print("about-to-fault", flush=True)
        bytes(leaked)
        """,
        backing,
    )


# ---- canary ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["just-before-data", "start-of-slack"])
def test_damaged_canary_is_reported_on_close(where: str, backing: str) -> None:
    g = Guarded.from_buffer(SECRET)
    expect_backing(g, backing)
    inner_start = inner_start_of(g.address)
    target = g.address - 1 if where == "just-before-data" else inner_start
    with g.write():
        damage_byte(target)
    with pytest.raises(GuardedMemoryError, match="canary damaged: possible buffer overflow"):
        g.close()
    assert g.closed
    assert perms_at(g.address) is None  # unmapped
    g.close()  # reported once, then a no-op


@pytest.mark.parametrize("size", [1, 100, PAGE - 16, PAGE - 15, PAGE, PAGE + 1, 3 * PAGE - 1])
def test_layout_data_at_the_end_with_at_least_16_canary_bytes(size: int, backing: str) -> None:
    with Guarded(size) as g:
        expect_backing(g, backing)
        found = mapping_at(g.address)
        assert found is not None
        lo, hi, _ = found
        assert g.address + size == hi  # the data ends where the trailing guard page starts
        assert 16 <= g.address - lo < 16 + PAGE
        assert lo % PAGE == 0
        assert perms_at(g.address) == prot(backing, "---")  # no access from the start
        assert perms_at(lo - 1) == "---p"  # leading guard page
        assert perms_at(hi) == "---p"  # trailing guard page


def test_filling_the_whole_secret_keeps_the_canary(backing: str) -> None:
    for size in (1, 15, 16, 17, PAGE - 16, PAGE - 15, PAGE, PAGE + 1):
        g = Guarded(size)
        expect_backing(g, backing)
        with g.write() as view:
            view[:] = b"\xff" * size
        g.close()  # no canary error


def test_damaged_canary_at_garbage_collection_warns_on_stderr(backing: str) -> None:
    proc = run_child(
        """
        import gc
        g = Guarded.from_buffer(b"do-not-print-me")
        expect_backing(g)
        with g.write():
            damage(g.address - 1)
        del g
        gc.collect()
        print("survived", flush=True)
        """,
        child_env(backing),
    )
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout
    assert proc.stderr.strip() == "strongroom: guarded buffer canary damaged"


# ---- mlock, DONTDUMP, WIPEONFORK, wiping ------------------------------------------------


def test_pages_are_locked_and_excluded_from_core_dumps(backing: str) -> None:
    before = memlock_status().locked_bytes
    secret_before = _native.secret_bytes()
    g = Guarded.from_buffer(SECRET)
    expect_backing(g, backing)
    fields = smaps_at(g.address)
    flags = fields["VmFlags"].split()
    assert "dd" in flags  # MADV_DONTDUMP (memfd_secret: set by the kernel too)
    if backing == "secretmem":
        assert g.mlocked  # the kernel locks secret memory, whatever the capabilities
        assert "dc" in flags  # MADV_DONTFORK: a child has no mapping here
        assert "wf" not in flags  # WIPEONFORK is for private mappings only
        assert _native.secret_bytes() == secret_before + PAGE
        assert peek_guarded(g, g.address, len(SECRET)) == SECRET
        with pytest.raises(OSError) as err:
            peek(g.address, len(SECRET))  # not even the kernel's direct map has the pages
        assert err.value.errno == errno.EIO
    else:
        assert "wf" in flags  # MADV_WIPEONFORK
        assert "dc" not in flags
        assert _native.secret_bytes() == secret_before
        assert peek(g.address, len(SECRET)) == SECRET
    if has_cap_ipc_lock():
        assert g.mlocked
    if g.mlocked:
        assert "lo" in flags
        assert int(fields["Locked"].split()[0]) > 0  # faulted in at allocation
        assert memlock_status().locked_bytes >= before + PAGE
    g.close()
    assert not g.mlocked
    assert memlock_status().locked_bytes == before
    assert _native.secret_bytes() == secret_before


def test_close_with_an_escaped_view_wipes_now_and_unmaps_later(backing: str) -> None:
    g = Guarded.from_buffer(SECRET)
    expect_backing(g, backing)
    with pytest.raises(GuardedMemoryError, match="escaped"):
        with g.read() as view:
            leaked = view[2:]
    assert perms_at(g.address) == prot(backing, "---")
    assert peek_guarded(g, g.address, len(SECRET)) == SECRET  # still there: not closed yet
    g.close()
    assert g.closed
    assert perms_at(g.address) == prot(backing, "---")  # still mapped...
    assert peek_guarded(g, g.address, len(SECRET)) == bytes(len(SECRET))  # ...but wiped
    leaked.release()  # the last export goes: now it is unmapped
    assert perms_at(g.address) is None


def test_forked_child_cannot_read_and_parent_keeps_the_secret(backing: str) -> None:
    # Anonymous pages: the child sees zeros (MADV_WIPEONFORK). memfd_secret pages: the child
    # has no mapping at all (MADV_DONTFORK), so the API refuses access instead of crashing.
    proc = run_child(
        """
        from strongroom.errors import GuardedMemoryError
        g = Guarded.from_buffer(b"parent-only-secret")
        expect_backing(g)
        secret = g._buf.secret
        pid = os.fork()
        if pid == 0:
            try:
                assert not g.mlocked and not g._buf.secret
                if secret:
                    try:
                        with g.read():
                            pass
                        ok = False
                    except GuardedMemoryError as e:
                        ok = "not inherited by fork" in str(e)
                else:
                    with g.read() as v:
                        ok = bytes(v) == bytes(18)
                g.close()  # must not report the (kernel-zeroed or absent) canary as damaged
                assert g.closed
            except BaseException as e:
                print("child:", repr(e), file=sys.stderr, flush=True)
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        with g.read() as v:
            print(os.waitstatus_to_exitcode(status), bytes(v) == b"parent-only-secret")
        g.close()
        """,
        child_env(backing),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "True"]
    assert proc.stderr == ""


def test_disable_core_dumps() -> None:
    proc = run_child(
        """
        import resource
        libc = ctypes.CDLL(None, use_errno=True)
        print(resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0))  # GET_DUMPABLE
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(0, 0) 0"


# ---- helpers ----------------------------------------------------------------------------


def test_scrub_bytes_zeroes_in_place() -> None:
    b = bytes(bytearray(b"secret-value-123"))  # made at run time, owned by this test alone
    hash(b)  # cache a hash of the secret...
    scrub_bytes(b)
    assert b == b"\0" * 16
    assert hash(b) == hash(bytes(16))  # ...which scrubbing must forget


def _address_of(ba: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(ba)).from_buffer(ba))


def test_scrub_bytearray_including_spare_capacity() -> None:
    ba = bytearray(b"secret-value-123" * 8)
    start = _address_of(ba)
    del ba[:16]  # CPython advances the logical start: the first 16 bytes stay behind it
    del ba[96:]  # shrinking by less than half keeps the allocation and the old tail
    assert _address_of(ba) == start + 16  # (else the test would read freed memory)
    scrub_bytes(ba)
    assert ba == bytes(96)
    assert ctypes.string_at(start, 128) == bytes(128)


def test_scrub_leaves_shared_singletons_and_refuses_other_types() -> None:
    scrub_bytes(b"")
    scrub_bytes(b"a")
    assert b"a" == bytes([97])
    with pytest.raises(TypeError):
        scrub_bytes("str")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scrub_bytes(memoryview(bytearray(4)))  # type: ignore[arg-type]


def test_wipe() -> None:
    ba = bytearray(SECRET)
    wipe(memoryview(ba)[3:9])
    assert ba == SECRET[:3] + bytes(6) + SECRET[9:]
    wipe(ba)
    assert ba == bytes(len(SECRET))
    with pytest.raises(TypeError):
        wipe(b"read-only")  # type: ignore[arg-type]


def test_constant_time_equal() -> None:
    assert constant_time_equal(b"abc", b"abc")
    assert constant_time_equal(bytearray(b"abc"), memoryview(b"abc"))
    assert constant_time_equal(b"", b"")
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"abcd")
    assert not constant_time_equal(b"\x00" * 32, b"\x00" * 31 + b"\x80")
    with pytest.raises(TypeError):
        constant_time_equal("abc", "abc")  # type: ignore[arg-type]


def test_memlock_status_and_page_size() -> None:
    st = memlock_status()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert st.soft_limit == (None if soft == resource.RLIM_INFINITY else soft)
    assert st.hard_limit == (None if hard == resource.RLIM_INFINITY else hard)
    assert st.locked_bytes >= 0
    assert st.mlock_failures >= 0
    assert page_size() == PAGE == 4096


def test_unlocked_warning_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memory_module, "_warned_unlocked", False)
    with caplog.at_level(logging.WARNING, logger="strongroom.memory"):
        memory_module._warn_once_if_unlocked(True)
        assert caplog.records == []
        for _ in range(3):
            memory_module._warn_once_if_unlocked(False)
    assert [r.getMessage() for r in caplog.records] == [
        "mlock failed: RLIMIT_MEMLOCK budget exhausted; secrets may be swapped. "
        "See `strongroom doctor`."
    ]


# ---- an unprivileged process under an 8 MiB RLIMIT_MEMLOCK -------------------------------

MEMLOCK_CHILD = """\
import json, logging, resource
resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))
with open("/proc/self/status") as f:
    caps = [int(line.split()[1], 16) for line in f if line.startswith("CapEff:")][0]
assert os.getuid() == 65534 and caps == 0, (os.getuid(), caps)
warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("strongroom.memory").addHandler(Collect())
from strongroom.memory import memlock_status
bufs = [Guarded.from_buffer(i.to_bytes(4, "big") * 8) for i in range(3000)]  # 12 MiB of pages
during = memlock_status()
unlocked = sum(not g.mlocked for g in bufs)
secret = sum(g._buf.secret for g in bufs)
for i, g in enumerate(bufs):
    with g.read() as v:
        assert bytes(v) == i.to_bytes(4, "big") * 8, i
for g in bufs:
    g.close()
print(json.dumps({"unlocked": unlocked, "secret": secret, "failures": during.mlock_failures,
                  "locked_during": during.locked_bytes, "soft": during.soft_limit,
                  "locked_after": memlock_status().locked_bytes, "warnings": warnings}))
"""


def test_unprivileged_memlock_exhaustion_degrades_gracefully() -> None:
    # The anonymous path (mlock failing past the limit); tests/test_native_secretmem.py has
    # the memfd_secret path under the same limit.
    skip_unless_root_with_setpriv()
    with tempfile.TemporaryDirectory(prefix="strongroom-memlock-") as tmp:
        tree = unprivileged_tree(Path(tmp), ("memory.py", "errors.py"))
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(tree),
            "PYTHONDONTWRITEBYTECODE": "1",
            NO_SECRETMEM_ENV: "1",
        }
        proc = run_as_nobody(tmp, env, "import strongroom.memory", CHILD_PRELUDE + MEMLOCK_CHILD)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    result = json.loads(proc.stdout)
    assert result["soft"] == 8 << 20
    assert result["secret"] == 0
    assert 0 < result["unlocked"] < 3000  # some locked, the rest degraded
    assert result["failures"] == result["unlocked"]
    assert 0 < result["locked_during"] <= 8 << 20
    assert result["locked_after"] == 0
    assert result["warnings"] == [
        "mlock failed: RLIMIT_MEMLOCK budget exhausted; secrets may be swapped. "
        "See `strongroom doctor`."
    ]
