"""The guarded-memory runtime: coffers, keyed pools, purge on exit and signals, and the
bound on locked memory however many keys the vault holds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from nobody_support import NOBODY, skip_unless_root_with_setpriv

import strongroom
from strongroom import memory
from strongroom.backends.vault import VaultBackend
from strongroom.errors import GuardedMemoryError, InvalidArgument
from strongroom.types import KeyInfo

TESTS = Path(__file__).parent


def _block_bytes(coffer: memory.Coffer) -> bytes:
    with coffer._block.read() as view:
        return bytes(view[:64])


def test_coffer_round_trip_and_rekey_on_every_use() -> None:
    key = os.urandom(32)
    with memory.Coffer(key) as coffer:
        shards = _block_bytes(coffer)
        assert key not in shards
        out = memory.Guarded(32)
        for _ in range(3):
            with out.write() as view:
                coffer.open_into(view)
                assert bytes(view) == key
            now = _block_bytes(coffer)
            assert now[:32] != shards[:32] and now[32:] != shards[32:]  # both shards changed
            shards = now
        coffer.rekey()
        assert _block_bytes(coffer) != shards
        with out.write() as view:
            coffer.open_into(view)
            assert bytes(view) == key
        out.close()
    assert coffer.closed
    with pytest.raises(InvalidArgument):
        memory.Coffer(b"short")


def test_coffer_is_rekeyed_by_the_timer() -> None:
    with memory.Coffer.random() as coffer:
        before = _block_bytes(coffer)
        # The wait ends at the first rekey (about REKEY_INTERVAL); the bound only stops a hang
        # and is far beyond what a loaded machine can delay a daemon thread.
        deadline = time.monotonic() + 60 * memory.REKEY_INTERVAL
        while _block_bytes(coffer) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _block_bytes(coffer) != before


def test_keyed_pool_gives_the_key_and_wipes_scratch() -> None:
    key = os.urandom(32)
    coffer = memory.Coffer(key)
    pool = memory.KeyedPool(coffer, keep=2)
    with pool.borrow(100) as (k, scratch):
        assert bytes(k) == key and len(scratch) == 100
        scratch[:] = b"\xaa" * 100
        page = pool._idle[0] if pool._idle else None
    assert page is None  # the page was out on loan, now back
    page = pool._idle[0]
    with page.read() as view:
        assert b"\xaa" * 16 not in bytes(view)  # scratch wiped
        assert key not in bytes(view)  # only shards at rest
    with pool.borrow(pool.capacity + 10) as (k, scratch):  # larger than a page: its own buffer
        assert bytes(k) == key and len(scratch) == pool.capacity + 10
    with pool.borrow(10), pool.borrow(10), pool.borrow(10):
        pass
    assert len(pool._idle) == 2  # keeps at most `keep` idle pages
    pool.close()
    coffer.close()
    with pytest.raises(GuardedMemoryError):
        pool.borrow(1)


def test_purge_closes_idle_buffers_but_not_busy_ones() -> None:
    idle = memory.Guarded.from_buffer(b"idle secret")
    busy = memory.Guarded.from_buffer(b"busy secret")
    seen: list[int] = []
    memory.add_purge_hook(seen.append)
    try:
        with busy.read() as view:
            assert memory.purge() >= 1
            assert idle.closed and not busy.closed
            assert bytes(view) == b"busy secret"
    finally:
        memory._purge_hooks.remove(seen.append)
    assert seen and seen[-1] >= 1
    busy.close()


SIGTERM_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import strongroom
    from strongroom import memory

    ks = strongroom.open(sys.argv[1])
    ks.generate("k", "ed25519")
    ks.sign("k", b"unlock the vault")
    state = ks.vault._state
    watched = [state.master, state.record_key]
    addresses = [c._block.address for c in watched]

    def report(count):
        mem = os.open("/proc/self/mem", os.O_RDONLY)
        for coffer, address in zip(watched, addresses):
            try:
                os.pread(mem, 32, address)
                gone = False
            except OSError:
                gone = True
            print("coffer", coffer.closed, gone, flush=True)
        print("purged", count, flush=True)

    memory.add_purge_hook(report)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _vault_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "strongroom.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp_path / "data"}"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:RUNTIME_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    return cfg


def test_sigterm_wipes_the_coffers_before_exit(tmp_path: Path) -> None:
    cfg = _vault_config(tmp_path)
    env = dict(os.environ, RUNTIME_PASS="p", STRONGROOM_NO_SECRETMEM="1")
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(cfg)], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGTERM)
    try:
        raw, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGTERM  # still dies of SIGTERM
    out = raw.decode()
    lines = out.splitlines()
    assert lines.count("coffer True True") == 2, out  # closed, and unmapped: gone
    assert lines[-1].startswith("purged ") and int(lines[-1].split()[1]) >= 3


def _locked() -> int:
    return memory.memlock_status().locked_bytes


def test_locked_memory_does_not_grow_with_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(TESTS))
    import bulk_vault

    monkeypatch.setenv("RUNTIME_PASS", "p")
    cfg = _vault_config(tmp_path)
    with strongroom.open(cfg) as ks:
        vault = ks.vault
        assert isinstance(vault, VaultBackend)
        vault.open()
        empty = _locked()
        bulk_vault.add_aes_keys(vault, 100_000)
    baseline = _locked()
    with strongroom.open(cfg) as ks:
        vault = ks.vault
        assert isinstance(vault, VaultBackend)
        infos: list[KeyInfo] = vault.records()
        assert len(infos) == 100_000
        peak = 0
        for info in random.sample(infos, 1000):
            ct = vault.encrypt(info, b"x", b"", None)
            assert vault.decrypt(info, ct, b"", None) == b"x"
            peak = max(peak, _locked())
        held = peak - baseline
    assert peak < 1 << 20, f"{peak} bytes locked while using a 100,000-key vault"
    # an unlocked vault locks the same few pages whether it holds no keys or 100,000
    assert held <= empty - baseline + 8 * memory.page_size()


UNPRIVILEGED_CHILD = textwrap.dedent(
    """
    import json, os, random, resource, site, sys
    site.addsitedir(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))
    assert os.getuid() == 65534
    import strongroom, bulk_vault
    from strongroom import memory
    with strongroom.open(sys.argv[3]) as ks:
        bulk_vault.add_aes_keys(ks.vault, 20_000)
    with strongroom.open(sys.argv[3]) as ks:
        vault = ks.vault
        infos = vault.records()
        for info in random.sample(infos, 500):
            assert vault.decrypt(info, vault.encrypt(info, b"x", b"", None), b"", None) == b"x"
        status = memory.memlock_status()
        print(json.dumps({"keys": len(infos), "locked": status.locked_bytes,
                          "failures": status.mlock_failures, "soft": status.soft_limit}))
    """
)


def test_20000_keys_under_an_8_mib_memlock_limit_unprivileged() -> None:
    with tempfile.TemporaryDirectory(prefix="strongroom-nobody-") as tmp:
        os.chown(tmp, 65534, 65534)
        _run_unprivileged(Path(tmp))


def _run_unprivileged(tmp_path: Path) -> None:
    skip_unless_root_with_setpriv()
    python = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    if not os.path.exists(python):
        pytest.skip(f"{python} is needed: the venv's base interpreter is not readable by uid 65534")
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
    cfg = _vault_config(tmp_path)
    for path in (tmp_path, cfg):
        os.chown(path, 65534, 65534)
    probe = subprocess.run(
        [*NOBODY, python, "-S", "-s", "-c",
         f"import site; site.addsitedir({site_packages!r}); import strongroom"],
        capture_output=True,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot import this checkout: {probe.stderr[-300:]!r}")
    proc = subprocess.run(
        [*NOBODY, python, "-S", "-s", "-c",
         UNPRIVILEGED_CHILD, site_packages, str(TESTS), str(cfg)],
        env={"PATH": "/usr/bin:/bin", "RUNTIME_PASS": "p", "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["keys"] == 20_000
    assert result["soft"] == 8 << 20
    assert result["failures"] == 0  # the budget was never exhausted
    assert 0 < result["locked"] < 1 << 20


SIGINT_CHILD = textwrap.dedent(
    """
    import signal, sys, threading
    import strongroom
    from strongroom.errors import GuardedMemoryError

    # A shell without job control starts background jobs with SIGINT ignored, and Python
    # keeps an inherited SIG_IGN: restore the interactive default this test is about.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ks = strongroom.open(sys.argv[1])
    ks.generate("k", "ed25519")
    stop = False

    def worker():
        while not stop:
            try:
                ks.sign("k", b"busy")
            except GuardedMemoryError:
                return  # purged under us: a clean error, never a crash

    t = threading.Thread(target=worker)
    t.start()
    print("ready", flush=True)
    try:
        while True:
            ks.sign("k", b"busy")
    except KeyboardInterrupt:
        stop = True
        t.join()
        print("interrupted", flush=True)
    """
)


@pytest.mark.parametrize("attempt", range(6))
def test_sigint_during_operations_purges_without_crashing(tmp_path: Path, attempt: int) -> None:
    cfg = _vault_config(tmp_path)
    env = dict(os.environ, RUNTIME_PASS="p")
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, str(cfg)], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    time.sleep(0.02 + attempt * 0.05)
    child.send_signal(signal.SIGINT)
    try:
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, out
    assert b"interrupted" in out
