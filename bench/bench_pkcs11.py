"""PKCS#11 benchmarks against SoftHSM2, run by hand (never in CI): `python bench/bench_pkcs11.py`.

Makes its own throwaway token (softhsm-config/init-token.sh in a temp dir, private
SOFTHSM2_CONF), then:

1. ECDSA P-256 signing through `Keystore.sign` (catalog lookup, usage check, audit line,
   host SHA-256, C_Sign, DER encoding) against raw python-pkcs11 signing with the same key
   (host SHA-256 + `key.sign(..., mechanism=ECDSA)` in a session of its own), in the same
   run, interleaved call by call (each call timed; median per round, median of rounds) so
   machine noise hits both alike. Target: at most 1.15x.
   `Pkcs11Backend.sign` alone is timed in the same loop, to tell the backend's share of
   the overhead from the Keystore's (catalog lookup, usage check, audit line).
2. Keystore signing from two threads against one thread: the throughput ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_support import PIN, make_token


def make_keystore(tmp: Path, module: str, audit: str) -> object:
    import strongroom

    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "{audit}"\norder = ["hsm", "vault"]\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{module}"\ntoken = "bench"\n'
        'pin = "env:BENCH_HSM_PIN"\n'
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    os.environ["BENCH_HSM_PIN"] = PIN
    return strongroom.open(cfg)


def bench_sign(ks: object, rounds: int, n: int) -> dict[str, float]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    from strongroom.keystore import Keystore

    assert isinstance(ks, Keystore)
    info = ks.generate("bench-p256", "ecdsa-p256", backend="hsm")
    message = os.urandom(64)
    ks.verify("bench-p256", message, ks.sign("bench-p256", message))
    # Raw python-pkcs11 on the same key: the same loaded module (pkcs11.lib returns the
    # object Strongroom registered), a session of its own, logged in already (one login
    # per process and token).
    lib = pkcs11.lib(os.environ["BENCH_MODULE"])
    session = lib.get_token(token_label="bench").open()
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(info.handle[3:]))

    def raw() -> bytes:
        return bytes(key.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))

    def ours() -> bytes:
        return ks.sign("bench-p256", message)

    backend = ks.backend("hsm")

    def backend_only() -> bytes:  # the backend without the Keystore (catalog, audit) around it
        return backend.sign(info, message, None)

    for _ in range(200):  # warm both paths (object lookups, session pool)
        raw()
        ours()
    # Interleaved call by call, each timed alone; the median of each round, then the median
    # over rounds. Other load on the machine then hits both sides alike.
    clock = time.perf_counter_ns
    ks_medians, raw_medians, backend_medians = [], [], []
    for _ in range(rounds):
        a, b, c = [], [], []
        for _ in range(n):
            t0 = clock()
            ours()
            t1 = clock()
            raw()
            t2 = clock()
            backend_only()
            t3 = clock()
            a.append(t1 - t0)
            b.append(t2 - t1)
            c.append(t3 - t2)
        ks_medians.append(statistics.median(a) / 1000)
        raw_medians.append(statistics.median(b) / 1000)
        backend_medians.append(statistics.median(c) / 1000)
    session.close()
    ks_us, raw_us = statistics.median(ks_medians), statistics.median(raw_medians)
    backend_us = statistics.median(backend_medians)
    return {
        "keystore_us": ks_us,
        "raw_us": raw_us,
        "backend_us": backend_us,
        "ratio": ks_us / raw_us,
        "backend_ratio": backend_us / raw_us,
    }


def bench_threads(ks: object, n: int, rounds: int) -> dict[str, float]:
    from strongroom.keystore import Keystore

    assert isinstance(ks, Keystore)
    message = os.urandom(64)

    def run(threads: int) -> float:
        barrier = threading.Barrier(threads + 1)

        def work() -> None:
            barrier.wait()
            for _ in range(n):
                ks.sign("bench-p256", message)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in pool:
            t.join()
        return threads * n / (time.perf_counter() - start)

    one, two = [], []
    for _ in range(rounds):
        one.append(run(1))
        two.append(run(2))
    a, b = statistics.median(one), statistics.median(two)
    return {"one_thread_per_s": a, "two_threads_per_s": b, "scaling": b / a}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="/usr/lib/softhsm/libsofthsm2.so")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("-n", type=int, default=1000, help="signatures per round and side")
    parser.add_argument("--audit", default="file", choices=["file", "log", "off"])
    args = parser.parse_args()
    os.environ["BENCH_MODULE"] = args.module
    with tempfile.TemporaryDirectory(prefix="sr-bench-pkcs11-") as tmp:
        make_token(Path(tmp))
        ks = make_keystore(Path(tmp), args.module, args.audit)
        try:
            sign = bench_sign(ks, args.rounds, args.n)
            threads = bench_threads(ks, args.n * 2, max(3, args.rounds // 3))
        finally:
            ks.close()  # type: ignore[attr-defined]
    print(
        f"ECDSA P-256 sign, SoftHSM2, {args.rounds} interleaved rounds of {args.n}"
        f" (audit={args.audit}):"
    )
    print(f"  Keystore.sign       {sign['keystore_us']:8.1f} us/op")
    print(
        f"  Pkcs11Backend.sign  {sign['backend_us']:8.1f} us/op  ({sign['backend_ratio']:.3f}x raw)"
    )
    print(f"  raw python-pkcs11   {sign['raw_us']:8.1f} us/op")
    verdict = "ok" if sign["ratio"] <= 1.15 else "OVER TARGET"
    print(f"  ratio               {sign['ratio']:8.3f}x  (target <= 1.15x: {verdict})")
    print("Keystore.sign throughput, one thread vs two:")
    print(f"  1 thread            {threads['one_thread_per_s']:8.0f} sig/s")
    print(f"  2 threads           {threads['two_threads_per_s']:8.0f} sig/s")
    print(f"  scaling             {threads['scaling']:8.2f}x")
    return 0 if sign["ratio"] <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
