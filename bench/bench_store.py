"""Store benchmarks, run by hand (never in CI): `python bench/bench_store.py`.

The vault keeps one row per key version in the keystore's SQLite store (docs/storage.md),
so a key change costs the same however many keys the vault holds, and opening reads the
header and counts rows instead of decrypting every key. Measured, in one run:

1. 500 Ed25519 `Keystore.generate` calls (each its own transaction, audit on) in an empty
   vault and in the same vault at 20,000 keys. Target: at most 1.3x.
2. Open plus first signature (`strongroom.open`, unlock, `sign`) at 0, 10,000 and 100,000
   keys, median of 5 fresh opens each, with the cheapest KDF the vault allows (8 MiB, one
   pass) so that the KDF does not hide the store's share. Target: at most 1.5x.
   (With the default KDF, 64 MiB and 3 passes, the open costs more, the same at every size.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import strongroom

DATA = b"benchmark data"


def write_config(root: Path) -> Path:
    cfg = root / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{root / "data"}"\naudit = "file"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    return cfg


def populate(ks: strongroom.Keystore, prefix: str, n: int, chunk: int = 5000) -> None:
    done = 0
    while done < n:
        with ks.batch():
            for i in range(done, min(n, done + chunk)):
                ks.generate(f"{prefix}{i}", "ed25519")
        done = min(n, done + chunk)


def generates(ks: strongroom.Keystore, prefix: str, n: int = 500) -> float:
    start = time.perf_counter()
    for i in range(n):
        ks.generate(f"{prefix}{i}", "ed25519")
    return time.perf_counter() - start


def open_and_sign(cfg: Path, times: int = 5) -> float:
    runs = []
    for _ in range(times):
        start = time.perf_counter()
        with strongroom.open(cfg) as ks:
            ks.sign("probe", DATA)
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp))
        with strongroom.open(cfg) as ks:
            ks.generate("probe", "ed25519")
        open_at = {0: open_and_sign(cfg)}
        with strongroom.open(cfg) as ks:
            empty = generates(ks, "e")
            for name in (k.name for k in ks.keys() if k.name.startswith("e")):
                ks.delete(name)
            populate(ks, "k", 10_000)
        open_at[10_000] = open_and_sign(cfg)
        with strongroom.open(cfg) as ks:
            populate(ks, "m", 10_000)
            at_20k = generates(ks, "f")
            populate(ks, "n", max(0, args.large - 20_500))
        large = len(strongroom.open(cfg).keys()) - 1
        open_at[large] = open_and_sign(cfg)
    print("| benchmark | empty vault | larger vault | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| 500 Ed25519 generates | {empty:.2f} s | {at_20k:.2f} s (20,000 keys) | "
        f"{at_20k / empty:.2f}x | ≤ 1.3x |"
    )
    for size in (10_000, large):
        print(
            f"| open + first sign | {open_at[0] * 1000:.0f} ms | {open_at[size] * 1000:.0f} ms "
            f"({size:,} keys) | {open_at[size] / open_at[0]:.2f}x | ≤ 1.5x |"
        )


if __name__ == "__main__":
    main()
