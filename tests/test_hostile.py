"""Hostile input found by an adversarial run, each tested the way it was found.

Every case must end in a typed error (or, for the audit log, a report naming the bad line)
and leave the keystore usable: never an untyped exception, a crash or a hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config

import strongroom
from strongroom import strictjson
from strongroom.audit import verify_log
from strongroom.errors import IntegrityError

CORRUPT = 9
DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    return write_vault_config(tmp_path)


def test_strict_json_fails_only_with_value_error() -> None:
    for bad in (DEEP, b'{"a": NaN}', b"Infinity", b"-Infinity", b"\xff\xfe", b"{", b""):
        with pytest.raises(ValueError):
            strictjson.loads(bad)
    assert strictjson.loads(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert strictjson.integer(3, 1, 5) == 3
    for value in (True, 3.0, "3", 0, 6, None):
        with pytest.raises(ValueError):
            strictjson.integer(value, 1, 5)


def test_a_deeply_nested_audit_line_is_named_and_does_not_stop_the_keystore(cfg: Path) -> None:
    """Found: one such line made every audited operation fail with RecursionError (the
    service answered 500 to everything) and `audit verify` crash."""
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
    log = cfg.parent / "data" / "audit.jsonl"
    with log.open("ab") as f:
        f.write(DEEP + b"\n")
    bad_line = len(log.read_bytes().splitlines())
    with strongroom.open(cfg) as ks:
        ks.verify("k", b"still works", ks.sign("k", b"still works"))
    report = verify_log(log)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.line == bad_line, report.first_bad
    with pytest.raises(IntegrityError, match=f"line {bad_line}"):
        report.raise_if_tampered()
    r = run_cli(cfg, "audit", "verify")
    assert r.returncode == CORRUPT, r.stderr
    assert f"line {bad_line}" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_cli(cfg, "--json", "audit", "verify")
    assert r.returncode == CORRUPT
    assert json.loads(r.stdout)["first_bad"]["line"] == bad_line


def test_a_truncated_change_stamp_does_not_kill_the_process(cfg: Path) -> None:
    """Found: truncating catalog.sqlite.stamp killed every process that had the catalog open
    (SIGBUS through a shared mapping), the service included."""
    child = textwrap.dedent(
        """
        import os, sys
        import strongroom
        stamp = sys.argv[2]
        with strongroom.open(sys.argv[1]) as ks:
            ks.generate("k", "ed25519")
            for size in (0, 3, 0):
                os.truncate(stamp, size)
                ks.verify("k", b"m", ks.sign("k", b"m"))
                ks.generate(f"k{size}-{len(ks.keys())}", "ed25519")  # writers bump it again
                assert len(ks.keys()) >= 2
        print("survived")
        """
    )
    stamp = cfg.parent / "data" / "catalog.sqlite.stamp"
    r = subprocess.run(
        [sys.executable, "-c", child, str(cfg), str(stamp)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "survived"
    assert stamp.stat().st_size == 8


def test_processes_racing_on_first_use_all_get_the_one_vault(cfg: Path) -> None:
    """Found: processes starting together on a new data_dir with `create = true` failed
    with "a vault already exists" (12 of 60)."""
    child = textwrap.dedent(
        """
        import os, sys
        import strongroom
        go = sys.argv[2]
        while not os.path.exists(go):  # start together
            pass
        with strongroom.open(sys.argv[1]) as ks:
            ks.generate(f"k{os.getpid()}", "ed25519")
            print(ks.vault_control().vault_status()["vault_id"], os.getpid())
        """
    )
    go = cfg.parent / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(cfg), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    failures = [err[-600:] for p, (_, err) in zip(procs, results, strict=True) if p.returncode]
    assert not failures, failures
    lines = [out.split() for out, _ in results]
    assert len({vault_id for vault_id, _ in lines}) == 1, "every process opened the same vault"
    with strongroom.open(cfg) as ks:
        assert {k.name for k in ks.keys()} == {f"k{pid}" for _, pid in lines}
