"""Hostile input found by an adversarial run, each tested the way it was found.

Every case must end in a typed error (or, for the audit log, a report naming the bad line)
and leave the keystore usable: never an untyped exception, a crash or a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    in_mount_namespace,
    needs_mount_namespace,
    run_cli,
    write_vault_config,
)

import strongroom
from strongroom import strictjson
from strongroom.audit import verify_log
from strongroom.errors import IntegrityError

CORRUPT = 9
STORAGE = 14
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


STORAGE_CHILD = """
import json, os, subprocess, sys
mnt, cli = sys.argv[1], sys.argv[2]
def run(*args):
    r = subprocess.run([cli, *args], capture_output=True, text=True)
    return {"rc": r.returncode, "err": r.stderr}
def mount(*opts):
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", mnt], check=True)
mount("size=1m")
out = {"init": run("init"), "made": []}
for i in range(3):  # with room to spare
    r = run("key", "generate", f"k{i}", "--type", "ed25519")
    if r["rc"]:
        out["early"] = r
        break
    out["made"].append(f"k{i}")
st = os.statvfs(mnt)  # then fill the disk but for less than one commit needs (its WAL pages)
with open(os.path.join(mnt, "filler"), "wb") as f:
    f.write(bytes(max(0, st.f_bavail * st.f_frsize - 8 * 1024)))
for i in range(3, 10):
    r = run("key", "generate", f"k{i}", "--type", "ed25519")
    if r["rc"]:
        out["full"] = r
        break
    out["made"].append(f"k{i}")
subprocess.run(["mount", "-o", "remount,size=16m", mnt], check=True)
ends = {out["made"][0], out["made"][-1]}  # the first and the last key acknowledged
out["after"] = [run("key", "sign", k, "--out", os.devnull) for k in ends]
out["list"] = subprocess.run([cli, "--json", "key", "list"], capture_output=True, text=True).stdout
subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
out["readonly"] = run("key", "generate", "ro", "--type", "ed25519")
print(json.dumps(out))
"""


@needs_mount_namespace
def test_a_full_or_read_only_data_dir_is_a_typed_error_naming_the_path(tmp_path: Path) -> None:
    """Found: a full, read-only or size-limited data_dir gave a bare OSError. Each is now a
    StorageError (exit 14) naming the path and the cause, and no key is acknowledged that
    was not saved. The data_dir is a small tmpfs in a mount namespace of the test's own."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = tmp_path / "strongroom.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{mnt / "data"}"\n'
        f'[backends.vault]\ntype = "vault"\npassphrase = "env:{VAULT_PASS_ENV}"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    env = dict(os.environ, STRONGROOM_CONFIG=str(cfg), **{VAULT_PASS_ENV: VAULT_PASSPHRASE})
    r = in_mount_namespace(STORAGE_CHILD, str(mnt), str(STRONGROOM_BIN), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["init"]["rc"] == 0, out["init"]
    full = out["full"]
    assert full["rc"] == STORAGE, full
    assert full["err"].count("\n") == 1 and str(mnt / "data") in full["err"], full
    # the snapshot's write or SQLite's (whichever needs room first) names the cause
    causes = ("No space left on device", "database or disk is full", "disk I/O error")
    assert any(c in full["err"] for c in causes), full
    assert out["made"], "some keys fit before the disk filled"
    assert all(a["rc"] == 0 for a in out["after"]), out["after"]
    assert sorted(k["name"] for k in json.loads(out["list"])) == sorted(out["made"])
    ro = out["readonly"]
    assert ro["rc"] == STORAGE and "Read-only file system" in ro["err"], ro
    assert str(mnt / "data") in ro["err"] and ro["err"].count("\n") == 1, ro


def test_attest_verify_fails_closed_with_exit_1_on_any_statement(tmp_path: Path) -> None:
    """Found: malformed statements failed closed but as internal errors (exit 12)."""
    vector = json.loads((Path(__file__).parent / "vectors" / "tpm-attestation.json").read_text())
    broken_area = dict(vector, attestation_key=dict(vector["attestation_key"], public_area="AAAA"))
    for name, body in {
        "deep": DEEP,
        "nan": b'{"format": NaN}',
        "list": b"[1, 2]",
        "area": json.dumps(broken_area).encode(),
        "nonce": json.dumps(dict(vector, nonce="\u00e9")).encode(),
    }.items():
        (tmp_path / name).write_bytes(body)
        r = run_cli(None, "attest", "verify", "--in", str(tmp_path / name))
        assert r.returncode == 1, (name, r.stderr)
        assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr, (name, r.stderr)
    (tmp_path / "good").write_text(json.dumps(vector))
    r = run_cli(None, "attest", "verify", "--in", str(tmp_path / "good"), "--nonce",
                b"fuzz seed nonce".hex())  # fmt: skip
    assert r.returncode == 0, r.stderr
