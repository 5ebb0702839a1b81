"""Crash safety: SIGKILL a process at random points while it generates, imports, rotates and
deletes vault keys, 100 times on the SQLite store (docs/storage.md) and 25 times on
PostgreSQL (a node killed mid-request, docs/cluster.md).

Each child announces an operation before it starts it and after it returns. After every
kill the store must open, and:

- every operation the child saw return holds: its key is there, at its version, and works
  (or is gone, for a delete);
- the operation in flight landed whole or not at all;
- the catalog and the vault agree exactly: every catalog version has its vault record and
  every vault record its catalog version (they commit in one transaction), and the vault's
  manifest matches its rows.
"""

from __future__ import annotations

import os
import random
import signal
import traceback
from pathlib import Path

import pytest
from conftest import store_sql
from kill_support import apply_change, kill_after_progress

import strongroom

MAX_ACKS = 4  # the kill waits for 1 to 4 acknowledged changes (progress, not time) ...
MAX_WAIT = 0.010  # ... then up to this many seconds: a point inside the next change
DATA = b"crash test"


def _child(cfg: Path, round_no: int, seed: int, w: int) -> None:
    """Forked child: unlock, say ready, then change keys forever, announcing each change."""
    code = 1
    rng = random.Random(seed)
    try:
        ks = strongroom.open(cfg)
        ks.vault.unlock()  # type: ignore[attr-defined]
        names = sorted(k.name for k in ks.keys())
        os.write(w, b"R\n")
        n = 0
        while True:
            op = rng.choice(("generate", "import", "rotate", "delete") if names else ("generate",))
            if op in ("generate", "import"):
                name = f"{op[0]}{round_no}-{n}"
                n += 1
            else:
                name = rng.choice(names)
            if op == "delete" and len(names) < 4:
                op = "rotate"
            os.write(w, f"B {op} {name}\n".encode())
            if op == "generate":
                ks.generate(name, "ed25519")
                names.append(name)
            elif op == "import":
                ks.import_key(name, "ed25519", os.urandom(32), format="raw")
                names.append(name)
            elif op == "rotate":
                ks.rotate(name)
            else:
                ks.delete(name)
                names.remove(name)
            os.write(w, b"E\n")
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # never run pytest's teardown in the child


def _agreement(cfg: Path) -> dict[str, int]:
    """{name: primary version}, after checking that catalog versions and vault rows match."""
    versions = set(store_sql(cfg, "SELECT namespace, name, version, handle FROM key_versions"))
    rows = set(store_sql(cfg, "SELECT namespace, name, version, record_id FROM vault_records"))
    primaries = dict(store_sql(cfg, "SELECT name, version FROM keys"))
    assert versions == rows, (
        f"catalog only: {sorted(versions - rows)[:5]}; vault only: {sorted(rows - versions)[:5]}"
    )
    return {str(k): int(v) for k, v in primaries.items()}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, vault_config: Path) -> tuple[Path, int]:
    """The vault config, its store the parameter's, and the rounds to run on it."""
    if request.param == "sqlite":
        return vault_config, 100
    url = request.getfixturevalue("pg_cluster").new_database()
    text = vault_config.read_text()
    vault_config.write_text(
        text.replace("[backends.vault]", f'[store]\nurl = "{url}"\n\n[backends.vault]')
    )
    return vault_config, 25


def test_sigkill_during_rounds_of_key_changes(store_config: tuple[Path, int]) -> None:
    vault_config, rounds = store_config
    sqlite = "[store]" not in vault_config.read_text()
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    data_dir = vault_config.parent / "data"
    with strongroom.open(vault_config) as ks:
        for i in range(4):
            ks.generate(f"base{i}", "ed25519")
    model = _agreement(vault_config)
    in_flight_landed = finished = 0

    for round_no in range(rounds):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            _child(vault_config, round_no, rng.getrandbits(32), w)
        os.close(w)
        try:
            lines, status = kill_after_progress(pid, r, rng, MAX_ACKS, MAX_WAIT)
        finally:
            os.close(r)
        assert lines[:1] == ["R"], f"round {round_no}: the child died before it was ready"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"round {round_no}: the child ended on its own (status {status})"
        )
        where = f"round {round_no} (seed {seed})"
        pending: tuple[str, str] | None = None
        for line in lines:
            if line.startswith("B "):
                _, op, name = line.split()
                pending = (op, name)
            elif line == "E" and pending is not None:
                apply_change(model, *pending)
                pending = None
                finished += 1
        actual = _agreement(vault_config)
        if pending is not None:  # landed whole, or not at all
            op, name = pending
            after = dict(model)
            apply_change(after, op, name)
            assert actual in (model, after), f"{where}: {op} {name} left a half state"
            in_flight_landed += actual == after != model
            model = actual
        assert actual == model, f"{where}: the store differs from what the child was told"
        if round_no % 10 == 9 or pending is not None:
            with strongroom.open(vault_config) as ks:
                ks.vault.verify_store()  # type: ignore[attr-defined]
                if pending is not None and pending[1] in model:
                    name = pending[1]
                    ks.verify(name, DATA, ks.sign(name, DATA))
        if sqlite:
            assert (data_dir / "catalog.sqlite").stat().st_mode & 0o777 == 0o600

    assert finished >= rounds, "the kills waited for progress, so changes were acknowledged"
    with strongroom.open(vault_config) as ks:
        ks.vault.verify_store()  # type: ignore[attr-defined]
        for name in sorted(model):
            ks.verify(name, DATA, ks.sign(name, DATA))
            assert ks.info(name).version == model[name]
    print(
        f"seed {seed}: {len(model)} keys, {finished} changes acknowledged, "
        f"{in_flight_landed} landed unacknowledged"
    )
