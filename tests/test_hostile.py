"""Hostile input found by an adversarial run, each tested the way it was found.

Every case must end in a typed error (or, for the audit log, a report naming the bad line)
and leave the keystore usable: never an untyped exception, a crash or a hang.
"""

from __future__ import annotations

import json
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
