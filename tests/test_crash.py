"""Crash safety: SIGKILL a process at random points while it commits snapshots, 100 times.

After every kill the snapshot must open, with either the contents before the interrupted
commit or after it: the vault holds exactly the keys the child reported as generated, or
one more (the commit landed, the report did not), and never loses an older key.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
import traceback
from pathlib import Path

import strongroom

ROUNDS = 100
MAX_WAIT = 0.030  # seconds between the child being ready and the kill
COUNT = struct.Struct(">I")


def _child(cfg: Path, round_no: int, w: int) -> None:
    """Forked child: unlock, say ready, then generate keys forever, reporting each one."""
    code = 1
    try:
        ks = strongroom.open(cfg)
        ks.vault.unlock()  # type: ignore[attr-defined]
        os.write(w, b"R")
        n = 0
        while True:
            ks.generate(f"c{round_no}-{n}", "ed25519")
            n += 1
            os.write(w, COUNT.pack(n))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # never run pytest's teardown in the child


def _read_all(r: int) -> bytes:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _on_disk(cfg: Path) -> tuple[set[str], set[str]]:
    """(names in the vault's own records, names in the catalog), from fresh objects."""
    with strongroom.open(cfg) as ks:
        records = {r.name for r in ks.vault.records()}  # type: ignore[attr-defined]
        return records, {k.name for k in ks.keys()}


def test_sigkill_during_100_snapshot_writes(vault_config: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    with strongroom.open(vault_config) as ks:
        ks.generate("base", "ed25519")
    known, _ = _on_disk(vault_config)
    assert known == {"base"}
    snap = vault_config.parent / "data" / "vault.snapshot"
    landed_unreported = 0
    total_reported = 0

    for round_no in range(ROUNDS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            _child(vault_config, round_no, w)
        os.close(w)
        try:
            ready = os.read(r, 1)
            assert ready == b"R", f"round {round_no}: the child died before it was ready"
            time.sleep(rng.uniform(0, MAX_WAIT))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            rest = _read_all(r)
        finally:
            os.close(r)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"round {round_no}: the child ended on its own (status {status})"
        )
        whole = len(rest) - len(rest) % COUNT.size
        reported = COUNT.unpack(rest[whole - COUNT.size : whole])[0] if whole else 0
        total_reported += reported

        where = f"round {round_no} (seed {seed}, reported {reported})"
        records, catalog = _on_disk(vault_config)  # must open: old or new contents
        assert known <= records, f"{where}: lost keys {sorted(known - records)}"
        new = records - known
        assert len(new) in (reported, reported + 1), f"{where}: {len(new)} new records"
        assert new == {f"c{round_no}-{i}" for i in range(len(new))}, where
        # the catalog row is written after the vault commit, so it may lag by one, never lead
        assert catalog <= records, f"{where}: catalog rows without keys"
        assert len(records - catalog) <= round_no + 1
        landed_unreported += len(new) - reported
        known = records
        assert snap.stat().st_mode & 0o777 == 0o600

    assert total_reported > ROUNDS // 4, "the kills came too early to hit any writes"

    # temp files of killed writers are cleaned up by the next commit, and every key works
    with strongroom.open(vault_config) as ks:
        ks.generate("after", "ed25519")
        for name in sorted(known)[:: max(1, len(known) // 20)]:
            if name in {k.name for k in ks.keys()}:
                ks.verify(name, b"x", ks.sign(name, b"x"))
    leftovers = [p.name for p in snap.parent.iterdir() if ".tmp." in p.name]
    assert leftovers == []
    print(f"seed {seed}: {len(known)} keys, {landed_unreported} commits landed unreported")
