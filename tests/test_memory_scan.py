"""Proof that a running vault keeps no key in readable process memory.

A child process imports a known Ed25519 seed, AES key and ECDSA P-256 private key, each
from a bytearray it wipes at once, then signs and encrypts with them. This process then
reads every readable mapping of the child through /proc/PID/maps and /proc/PID/mem and
counts copies of each secret. Unreadable regions (memfd_secret) count as clean. A secret
the child deliberately leaves in a plain bytearray must be found: the positive control.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from strongroom import memory

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import strongroom

    fd = int(sys argv_fd)
    def read_exact(n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            got += os.readv(fd, [view[got:]])
        view.release()
        return buf

    ed_seed, aes_key, ec_scalar, control = (read_exact(32) for _ in range(4))
    os.close(fd)
    with strongroom.open(sys.argv[1]) as ks:
        ks.import_key("ed", "ed25519", ed_seed, format="raw")
        ks.import_key("aes", "aes-256", aes_key, format="raw")
        ks.import_key("ec", "ecdsa-p256", ec_scalar, format="raw")
        for buf in (ed_seed, aes_key, ec_scalar):
            buf[:] = bytes(32)
        for i in range(20):
            message = b"message %d" % i
            ks.verify("ed", message, ks.sign("ed", message))
            ks.verify("ec", message, ks.sign("ec", message))
            assert ks.decrypt("aes", ks.encrypt("aes", message)) == message
        print("ready", flush=True)
        sys.stdin.readline()
    """
).replace("sys argv_fd", "sys.argv[2]")


def _scan(pid: int, needles: dict[str, bytes]) -> tuple[dict[str, int], int, int]:
    """Count each needle (and its byte-reversed form) in every readable mapping of `pid`."""
    counts = dict.fromkeys(needles, 0)
    read_bytes = unreadable = 0
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            assert m
            start, end, perms = int(m[1], 16), int(m[2], 16), m[3]
            if "[vsyscall]" in line or "[vvar" in line:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                unreadable += end - start  # memfd_secret, or a vanished mapping
                continue
            read_bytes += len(data)
            for name, needle in needles.items():
                counts[name] += data.count(needle) + data.count(needle[::-1])
            del perms
    return counts, read_bytes, unreadable


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc")
@pytest.mark.parametrize("secretmem", ["on", "off"])
def test_no_key_in_process_memory(tmp_path: Path, secretmem: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root (or CAP_SYS_PTRACE)")
    cfg = tmp_path / "strongroom.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp_path / "data"}"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:SCAN_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    secret_values = {
        name: secrets.token_bytes(32) for name in ("ed25519", "aes", "ecdsa", "control")
    }
    env = dict(os.environ, SCAN_PASS="memory scan passphrase")
    if secretmem == "off":
        env["STRONGROOM_NO_SECRETMEM"] = "1"
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cfg), str(read_end)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        pass_fds=(read_end,),
    )
    os.close(read_end)
    try:
        os.write(write_end, b"".join(secret_values.values()))
        os.close(write_end)
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", "the child failed to start"
        counts, read_bytes, unreadable = _scan(child.pid, secret_values)
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=30)
    assert read_bytes > 10_000_000, "the scan read almost nothing: it proves nothing"
    assert counts["control"] >= 1, "positive control: the scanner must find the planted secret"
    leaks = {name: n for name, n in counts.items() if name != "control" and n}
    assert not leaks, f"copies of secrets found in process memory: {leaks}"
    assert child.returncode == 0
    if secretmem == "on" and memory.memlock_status().secretmem_available:
        assert unreadable > 0, "guarded pages should be memfd_secret, unreadable from outside"
