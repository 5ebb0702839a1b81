"""The native layer's memfd_secret backing, its memlock budget, and xor_into.

What only memfd_secret gives: the pages are out of the kernel's direct map, so not even
/proc/self/mem can read them (EIO), and a forked child has no mapping there at all. The
budget test runs as uid 65534 under an 8 MiB RLIMIT_MEMLOCK: past the budget a secret
mapping must not be attempted (it could crash on first touch), so buffers fall back to
anonymous memory instead. tests/test_memory.py runs the common guarantees on both backings.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from nobody_support import run_as_nobody, skip_unless_root_with_setpriv, unprivileged_tree

from strongroom import _native

PAGE = mmap.PAGESIZE
SECRET = b"correct horse battery staple"

needs_secretmem = pytest.mark.skipif(
    not _native.secretmem_available(),
    reason="memfd_secret(2) is not available here (ENOSYS, or refused with EINVAL/EPERM), "
    "so guarded buffers use the anonymous mmap + mlock fallback",
)

# Children use the native module only, so they do not depend on the Python layer.
CHILD_PRELUDE = """\
import ctypes, os, sys
from strongroom import _native
_native.disable_core_dumps()  # the SIGSEGVs provoked on purpose must not leave core files
"""


@pytest.fixture(autouse=True)
def secretmem_enabled() -> Iterator[None]:
    """Buffers made here try memfd_secret, whatever STRONGROOM_NO_SECRETMEM says."""
    was = _native.secretmem_enabled()
    _native.set_secretmem(True)
    try:
        yield
    finally:
        _native.set_secretmem(was)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STRONGROOM_NO_SECRETMEM"}


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


def read_proc_mem(address: int, n: int) -> bytes:
    with open("/proc/self/mem", "rb", buffering=0) as f:
        f.seek(address)
        return f.read(n)


def mapping_at(address: int) -> tuple[int, int, str] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return lo, hi, perms
    return None


def filled(size: int, data: bytes) -> _native.GuardedBuffer:
    """A secret buffer holding `data`, left read-only."""
    b = _native.GuardedBuffer(size)
    b.protect(2)
    with memoryview(b) as v:
        v[:] = data
    b.protect(1)
    return b


# ---- memfd_secret ------------------------------------------------------------------------


@needs_secretmem
def test_enabled_buffers_are_secret_and_disabled_ones_are_not() -> None:
    before, secret_before = _native.locked_bytes(), _native.secret_bytes()
    b = _native.GuardedBuffer(32)
    assert b.secret and b.mlocked
    assert _native.secret_bytes() == secret_before + PAGE
    assert _native.locked_bytes() == before + PAGE  # secret memory spends the memlock budget
    found = mapping_at(b.address)
    assert found is not None and found[2] == "---s"  # a shared mapping of the secretmem file
    _native.set_secretmem(False)
    assert not _native.secretmem_enabled()
    assert _native.secretmem_available()  # what the kernel offers does not change
    a = _native.GuardedBuffer(32)
    assert not a.secret
    a.close()
    b.close()
    assert not b.secret and not b.mlocked
    assert (_native.locked_bytes(), _native.secret_bytes()) == (before, secret_before)


@needs_secretmem
def test_proc_self_mem_cannot_read_secret_pages_but_the_buffer_can() -> None:
    b = filled(len(SECRET), SECRET)
    try:
        with memoryview(b) as v:  # inside protect(1): readable through the buffer protocol
            assert bytes(v) == SECRET
        for mode in (1, 2, 0):
            b.protect(mode)
            with pytest.raises(OSError) as err:
                read_proc_mem(b.address, len(SECRET))
            assert err.value.errno == errno.EIO
    finally:
        b.close()
    # Positive control: the same read of an anonymous buffer does see the bytes, so the EIO
    # above is the secret mapping's doing, not a bad address.
    _native.set_secretmem(False)
    a = filled(len(SECRET), SECRET)
    try:
        assert not a.secret
        assert read_proc_mem(a.address, len(SECRET)) == SECRET
    finally:
        a.close()


@needs_secretmem
@pytest.mark.parametrize("side", ["before", "after"])
def test_guard_pages_still_fault(side: str) -> None:
    proc = run_child(
        f"""
        b = _native.GuardedBuffer(100)
        assert b.secret
        inner_start = None
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= b.address < hi:
                inner_start = lo
        assert inner_start is not None and inner_start < b.address
        b.protect(2)
        ctypes.memset(b.address, 0x41, 100)  # the data
        # The first canary byte, flipped (a fixed value would match the random canary 1 in 256).
        ctypes.memset(inner_start, ctypes.string_at(inner_start, 1)[0] ^ 0xFF, 1)
        print("about-to-fault", flush=True)
        if {side!r} == "before":
            ctypes.string_at(inner_start - 1, 1)
        else:
            ctypes.string_at(b.address + b.size, 1)
        """
    )
    assert "about-to-fault" in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


@needs_secretmem
def test_no_access_between_operations_faults() -> None:
    proc = run_child(
        """
        b = _native.GuardedBuffer(32)
        assert b.secret
        b.protect(1)
        ctypes.string_at(b.address, 32)
        b.protect(0)
        print("about-to-fault", flush=True)
        ctypes.string_at(b.address, 1)
        """
    )
    assert "about-to-fault" in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


@needs_secretmem
@pytest.mark.parametrize("where", ["just-before-data", "start-of-slack"])
def test_canary_detects_damage(where: str) -> None:
    b = filled(len(SECRET), SECRET)
    assert b.secret
    found = mapping_at(b.address)
    assert found is not None
    target = b.address - 1 if where == "just-before-data" else found[0]
    b.protect(2)
    # Flipped, not set to a fixed value: the canary is random, and a fixed value would leave
    # it intact in one process out of 256.
    ctypes.memset(target, ctypes.string_at(target, 1)[0] ^ 0xFF, 1)
    b.protect(0)
    with pytest.raises(_native.CanaryError):
        b.close()
    assert b.closed
    assert mapping_at(b.address) is None  # wiped and unmapped all the same
    b.close()  # reported once


@needs_secretmem
def test_canary_intact_after_filling_the_data() -> None:
    for size in (1, 16, PAGE - 16, PAGE - 15, PAGE, PAGE + 1):
        b = filled(size, b"\xff" * size)
        assert b.secret
        b.close()


@needs_secretmem
def test_close_with_a_view_exported_wipes_and_unmaps_on_release() -> None:
    b = filled(len(SECRET), SECRET)
    view = memoryview(b)
    b.close()
    assert b.closed and b.secret  # still mapped (PROT_NONE) under the view
    view.release()
    assert not b.secret
    assert mapping_at(b.address) is None


@needs_secretmem
def test_forked_child_has_no_mapping() -> None:
    # Subprocess of a subprocess: the middle process forks, so pytest itself never does.
    # The buffer is readable (mode 1) when it forks, so only a missing mapping makes the
    # grandchild's read fault.
    proc = run_child(
        """
        secret = b"parent-only-secret"
        b = _native.GuardedBuffer(len(secret))
        assert b.secret
        b.protect(2)
        ctypes.memmove(b.address, secret, len(secret))
        b.protect(1)
        pid = os.fork()
        if pid == 0:
            try:
                assert not b.secret and not b.mlocked
                assert _native.locked_bytes() == 0 and _native.secret_bytes() == 0
                try:
                    b.protect(2)
                    os._exit(3)
                except OSError as e:
                    assert "not inherited by fork" in e.strerror, e
                try:
                    memoryview(b)
                    os._exit(4)
                except BufferError:
                    pass
                print("about-to-fault", flush=True)
                ctypes.string_at(b.address, 1)
            except BaseException as e:
                print("grandchild:", repr(e), file=sys.stderr, flush=True)
            os._exit(1)  # never pytest's teardown: the touch above should have killed us
        _, status = os.waitpid(pid, 0)
        print("grandchild", os.waitstatus_to_exitcode(status), flush=True)
        with memoryview(b) as v:
            print("parent-intact", bytes(v) == secret, flush=True)
        b.close()
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert "about-to-fault" in lines, (proc.stdout, proc.stderr)
    assert f"grandchild {-signal.SIGSEGV}" in lines, (proc.stdout, proc.stderr)
    assert "parent-intact True" in lines


@needs_secretmem
def test_forked_child_can_close_its_copy() -> None:
    proc = run_child(
        """
        b = _native.GuardedBuffer(32)
        assert b.secret
        pid = os.fork()
        if pid == 0:
            try:
                b.close()  # no canary to check, nothing of the parent's to wipe or unmap
                ok = b.closed
            except BaseException as e:
                print("grandchild:", repr(e), file=sys.stderr, flush=True)
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        b.protect(1)
        print(os.waitstatus_to_exitcode(status), bytes(memoryview(b)) == bytes(32), flush=True)
        b.close()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "True"]
    assert proc.stderr == ""


@needs_secretmem
def test_no_free_file_descriptor_falls_back_for_that_buffer_only() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # memfd_secret gets EMFILE
    try:
        b = _native.GuardedBuffer(32)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    c = _native.GuardedBuffer(32)
    try:
        assert not b.secret
        assert c.secret  # a transient failure does not turn memfd_secret off
        assert _native.secretmem_available()
    finally:
        b.close()
        c.close()


@needs_secretmem
@pytest.mark.parametrize(("value", "enabled"), [("1", False), ("yes", False), ("0", True)])
def test_environment_variable_turns_secretmem_off(value: str, enabled: bool) -> None:
    env = {**child_env(), "STRONGROOM_NO_SECRETMEM": value}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from strongroom import _native as n; b = n.GuardedBuffer(8); "
            "print(n.secretmem_available(), n.secretmem_enabled(), b.secret, b.mlocked)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(enabled), str(enabled), "True"]


# ---- the memlock budget, as an unprivileged user ------------------------------------------

LIMIT = 8 << 20

BUDGET_CHILD = f"""\
import json, resource
resource.setrlimit(resource.RLIMIT_MEMLOCK, ({LIMIT}, {LIMIT}))
with open("/proc/self/status") as f:
    caps = [int(line.split()[1], 16) for line in f if line.startswith("CapEff:")][0]
assert os.getuid() == 65534 and caps == 0, (os.getuid(), caps)
assert _native.secretmem_available() and _native.secretmem_enabled()

def make(i):
    b = _native.GuardedBuffer(32)  # one inner page each: 3000 of them are 12 MiB
    b.protect(2)
    with memoryview(b) as v:
        v[:] = i.to_bytes(4, "big") * 8
    b.protect(0)
    return b

def check(i, b):
    b.protect(1)
    with memoryview(b) as v:
        assert bytes(v) == i.to_bytes(4, "big") * 8, i
    b.protect(0)

bufs = [make(i) for i in range(3000)]
secret = [b.secret for b in bufs]
mlocked = [b.mlocked for b in bufs]
during = (_native.locked_bytes(), _native.secret_bytes(), _native.mlock_failures())
for i, b in enumerate(bufs):
    check(i, b)
# Closing secret buffers gives the budget back to new ones.
for b in bufs[:10]:
    b.close()
again = [make(i) for i in range(10)]
for i, b in enumerate(again):
    check(i, b)
again_secret = sum(b.secret for b in again)
for b in bufs + again:
    b.close()
after = (_native.locked_bytes(), _native.secret_bytes())
# Anonymous mlocked memory and secret memory share one budget.
_native.set_secretmem(False)
anon = [_native.GuardedBuffer(32) for _ in range(1000)]
anon_locked = sum(b.mlocked for b in anon)
_native.set_secretmem(True)
mixed = [_native.GuardedBuffer(32) for _ in range(2000)]
mixed_secret = [b.secret for b in mixed]
for b in anon + mixed:
    b.close()
print(json.dumps({{"secret": secret, "mlocked": mlocked, "during": during, "after": after,
                  "again_secret": again_secret, "anon_locked": anon_locked,
                  "mixed_secret": mixed_secret}}))
"""


def _prefix_length(flags: list[bool]) -> int:
    """How many leading entries are True; asserts that all the others are False."""
    n = flags.index(False) if False in flags else len(flags)
    assert not any(flags[n:]), "a buffer after the first fallback was secret again"
    return n


@needs_secretmem
def test_unprivileged_budget_falls_back_instead_of_crashing() -> None:
    skip_unless_root_with_setpriv()
    with tempfile.TemporaryDirectory(prefix="strongroom-secretmem-") as tmp:
        tree = unprivileged_tree(Path(tmp))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = run_as_nobody(tmp, env, "import strongroom._native", CHILD_PRELUDE + BUDGET_CHILD)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # SIGBUS would be -7
    result = json.loads(proc.stdout)
    budget_pages = LIMIT // PAGE
    n_secret = _prefix_length(result["secret"])
    assert 0 < n_secret <= budget_pages  # the first ones secret, then fallback for good
    assert n_secret > budget_pages // 2  # nothing else should have eaten the budget
    # The fallbacks find the budget spent: mlock fails, counted, and they carry on unlocked.
    assert result["mlocked"] == [True] * n_secret + [False] * (3000 - n_secret)
    locked, secret_bytes, failures = result["during"]
    assert secret_bytes == locked == n_secret * PAGE <= LIMIT
    assert failures == 3000 - n_secret
    assert result["after"] == [0, 0]
    assert result["again_secret"] == 10
    assert result["anon_locked"] == 1000
    n_mixed = _prefix_length(result["mixed_secret"])
    assert 0 < n_mixed <= budget_pages - 1000


# ---- xor_into ----------------------------------------------------------------------------


def test_xor_into() -> None:
    a = bytes(range(32))
    b = bytes(range(100, 132))
    out = bytearray(32)
    _native.xor_into(out, a, b)
    assert out == bytes(x ^ y for x, y in zip(a, b, strict=True))
    _native.xor_into(out, out, b)  # out may be one of the inputs
    assert out == a
    mv = memoryview(bytearray(64))[16:48]
    _native.xor_into(mv, bytearray(a), memoryview(b))
    assert bytes(mv) == bytes(x ^ y for x, y in zip(a, b, strict=True))
    _native.xor_into(bytearray(), b"", b"")  # empty is fine


def test_xor_into_guarded_buffers() -> None:
    left, right = os.urandom(32), os.urandom(32)
    gl, gr, key = filled(32, left), filled(32, right), _native.GuardedBuffer(32)
    try:
        key.protect(2)
        _native.xor_into(key, gl, gr)
        key.protect(1)
        with memoryview(key) as v:
            assert bytes(v) == bytes(x ^ y for x, y in zip(left, right, strict=True))
        assert (key.exports, gl.exports, gr.exports) == (0, 0, 0)  # views released
    finally:
        for g in (gl, gr, key):
            g.close()


def test_xor_into_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="equal length"):
        _native.xor_into(bytearray(32), bytes(32), bytes(31))
    with pytest.raises(ValueError, match="equal length"):
        _native.xor_into(bytearray(31), bytes(32), bytes(32))
    with pytest.raises(TypeError):
        _native.xor_into(bytes(32), bytes(32), bytes(32))  # out must be writable
    with pytest.raises(TypeError):
        _native.xor_into(bytearray(3), "abc", b"abc")  # type: ignore[arg-type]
    b = _native.GuardedBuffer(32)
    try:
        b.protect(1)
        with pytest.raises(TypeError):
            _native.xor_into(b, bytes(32), bytes(32))  # read-only: no writable view
        b.protect(2)
        with pytest.raises(TypeError):
            _native.xor_into(b, bytes(32), "not a buffer")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            _native.xor_into(b, bytes(31), bytes(32))
        assert b.exports == 0  # every view taken before the error was released
    finally:
        b.close()
