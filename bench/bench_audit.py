"""Audit log benchmarks, run by hand (never in CI): `python bench/bench_audit.py`.

1. One `file` audit record (`Audit.record`: HMAC of a 64-byte input, flock, tail check,
   one write, chain hash) against the raw work it cannot avoid, a `write(2)` of a line of
   the same size on an O_APPEND descriptor, in the same run, interleaved call by call
   (each call timed; median per round, median of rounds). Also timed in the same loop:
   the record without an input (no HMAC), `flock` + write + unlock, and with
   `--baseline FILE` an older `core/audit.py` (e.g. `git show 2d00b6d:core/audit.py`,
   the unchained JSON-lines writer) for a before/after figure.
2. Vault Ed25519 `Keystore.sign` with `audit = "file"` against the same keystore with the
   audit sink swapped for `off`, interleaved: the audit record's share of a signature.
3. Two processes appending to one log at once against one process appending as many
   records: records per second, and the chain verified afterwards.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import strongroom
from strongroom.audit import Audit, verify_log

MESSAGE = os.urandom(64)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, n: int) -> dict[str, float]:
    """Median over rounds of the median per-call time (us) of each function, interleaved."""
    clock = time.perf_counter_ns
    for fn in fns.values():  # warm up
        for _ in range(200):
            fn()
    medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        per: dict[str, list[int]] = {k: [] for k in fns}
        for _ in range(n):
            for name, fn in fns.items():
                t0 = clock()
                fn()
                per[name].append(clock() - t0)
        for name in fns:
            medians[name].append(statistics.median(per[name]) / 1000)
    return {k: statistics.median(v) for k, v in medians.items()}


def load_baseline(path: str) -> Any:
    """The `audit` module of an older checkout, loaded from its file."""
    spec = importlib.util.spec_from_file_location("audit_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BaselineSink:
    """An older `Audit` behind the current `record` signature (it took no input)."""

    pending = 0

    def __init__(self, old: Any) -> None:
        self._old = old

    def record(
        self, op: str, key: Any, result: str, backend: Any = None, payload: Any = None, **d: Any
    ) -> None:
        self._old.record(op, key, result, backend, **d)

    def close(self) -> None:
        self._old.close()


def bench_record(tmp: Path, rounds: int, n: int, baseline: str | None) -> dict[str, float]:
    audit = Audit("file", tmp / "audit.jsonl", "bench")
    fd = os.open(tmp / "raw.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    audit.record("sign", "bench-key", "ok", "hsm", MESSAGE, size=64)
    line = (tmp / "audit.jsonl").read_bytes().splitlines(keepends=True)[-1]

    def locked_write() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        fcntl.flock(fd, fcntl.LOCK_UN)

    fns: dict[str, Callable[[], Any]] = {
        "raw write": lambda: os.write(fd, line),
        "flock + write": locked_write,
        "record": lambda: audit.record("sign", "bench-key", "ok", "hsm", MESSAGE, size=64),
        "record, no input": lambda: audit.record("sign", "bench-key", "ok", "hsm", size=64),
    }
    if baseline:
        old = load_baseline(baseline).Audit("file", tmp / "baseline.jsonl", "bench")
        fns["baseline record"] = lambda: old.record("sign", "bench-key", "ok", "hsm", size=64)
    out = interleaved(fns, rounds, n)
    audit.close()
    os.close(fd)
    assert verify_log(tmp / "audit.jsonl").ok
    return out


def bench_keystore(tmp: Path, rounds: int, n: int, baseline: str | None) -> dict[str, float]:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "file"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    with strongroom.open(cfg) as ks:
        ks.generate("bench-ed25519", "ed25519")
        sinks: dict[str, Any] = {"audit=file": ks.audit, "audit=off": Audit("off", None)}
        if baseline:
            old = load_baseline(baseline).Audit("file", tmp / "baseline-ks.jsonl", "bench")
            sinks["baseline file"] = _BaselineSink(old)
        mine = ks.audit

        def with_sink(sink: Any) -> Callable[[], Any]:
            def sign() -> bytes:
                ks.audit = sink
                return ks.sign("bench-ed25519", MESSAGE)

            return sign

        out = interleaved({k: with_sink(v) for k, v in sinks.items()}, rounds, n)
        ks.audit = mine
    return out


def _writer(path: str, n: int) -> None:
    audit = Audit("file", Path(path), f"writer-{os.getpid()}")
    for _ in range(n):
        audit.record("sign", "bench-key", "ok", "hsm", MESSAGE, size=64)
    audit.close()


def bench_processes(tmp: Path, n: int) -> dict[str, float]:
    out = {}
    for procs in (1, 2):
        path = tmp / f"procs{procs}.jsonl"
        Audit("file", path, "setup").close()  # make the HMAC key first
        start = time.perf_counter()
        ps = [
            multiprocessing.Process(target=_writer, args=(str(path), n // procs))
            for _ in range(procs)
        ]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        out[f"{procs} process(es)"] = n / (time.perf_counter() - start)
        report = verify_log(path)
        assert report.ok and report.records == n, report
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--baseline", metavar="FILE", help="an older core/audit.py to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_record(Path(tmp), args.rounds, args.n, args.baseline)
        print(f"audit record, interleaved ({args.rounds} rounds of {args.n}), median per call:")
        for name, us in r.items():
            print(f"  {name:18s} {us:6.2f} us   {us / r['raw write']:.2f}x raw write")
        k = bench_keystore(Path(tmp), args.rounds, args.n // 5, args.baseline)
        print("vault Ed25519 Keystore.sign, 64-byte message, one keystore, sink swapped:")
        for name, us in k.items():
            print(f"  {name:18s} {us:6.2f} us   +{us - k['audit=off']:5.2f} us over audit=off")
        p = bench_processes(Path(tmp), 40_000)
        print("appending 40,000 records to one log (chain verified after):")
        for name, rate in p.items():
            print(f"  {name:18s} {rate:8.0f} records/s")


if __name__ == "__main__":
    main()
