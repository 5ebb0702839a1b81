"""Vault benchmarks, run by hand (never in CI): `python bench/bench_vault.py`.

1. Ed25519 signing through `Keystore.sign` against PyNaCl's `SigningKey.sign` on the same
   key, in the same run, interleaved so machine noise hits both alike. Target: ≤ 3x.
   ECDSA P-256 signing the same way against cryptography's `key.sign(data,
   ECDSA(SHA256()))`. Target: ≤ 1.3x.
2. `vault backup` (encode + encrypt + atomic write of the portable snapshot) and `vault
   restore` (read + decrypt + one store row per key) of 10,000 keys, KDF excluded.
   Target: under 2 s together. Per-change cost in the store: bench/bench_store.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import strongroom
from strongroom.backends.vault import VaultBackend


def make_keystore(tmp: Path) -> strongroom.Keystore:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "file"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    return strongroom.open(cfg)


def per_op(fn: object, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / n * 1e6


def bench_sign(ks: strongroom.Keystore, rounds: int, n: int) -> dict[str, float]:
    seed = bytearray(os.urandom(32))
    raw = nacl.signing.SigningKey(bytes(seed))
    ks.import_key("bench-ed25519", "ed25519", seed, format="raw")
    message = os.urandom(64)
    assert ks.sign("bench-ed25519", message) == raw.sign(message).signature
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(per_op(lambda: ks.sign("bench-ed25519", message), n))
        theirs.append(per_op(lambda: raw.sign(message), n))
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"keystore_us": a, "pynacl_us": b, "ratio": a / b}


def bench_sign_p256(ks: strongroom.Keystore, rounds: int, n: int) -> dict[str, float]:
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ks.import_key("bench-p256", "ecdsa-p256", der, format="der")
    message = os.urandom(64)
    algorithm = ec.ECDSA(hashes.SHA256())
    key.public_key().verify(ks.sign("bench-p256", message), message, algorithm)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(per_op(lambda: ks.sign("bench-p256", message), n))
        theirs.append(per_op(lambda: key.sign(message, algorithm), n))
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"keystore_us": a, "cryptography_us": b, "ratio": a / b}


def bench_snapshot(ks: strongroom.Keystore, keys: int) -> dict[str, float]:
    """`vault backup` (the portable snapshot: encode, encrypt, atomic write) and `vault
    restore` (read, decrypt, one row per key into the store) of `keys` Ed25519 keys."""
    from strongroom.keystore import vault_restore

    vault = ks.vault
    assert isinstance(vault, VaultBackend)
    with ks.batch():
        for i in range(keys):
            ks.generate(f"key-{i}", "ed25519")
    backup = vault.path.with_name("bench.backup")
    start = time.perf_counter()
    vault.backup(backup)
    commit = time.perf_counter() - start
    size = backup.stat().st_size
    start = time.perf_counter()
    report = vault_restore(ks, backup)
    load = time.perf_counter() - start
    assert report["keys"] >= keys
    return {
        "keys": keys,
        "commit_s": commit,
        "load_s": load,
        "total_s": commit + load,
        "bytes": size,
    }


def bench_locked(tmp: Path, keys: int) -> dict[str, float]:
    """Locked memory of an unlocked vault in use, empty and with `keys` keys."""
    from strongroom.memory import memlock_status

    cfg_dir = tmp / "locked"
    cfg_dir.mkdir()
    ks = make_keystore(cfg_dir)
    vault = ks.vault
    assert isinstance(vault, VaultBackend)
    vault.open()
    ks.generate("first", "aes-256")
    ks.decrypt("first", ks.encrypt("first", b"x"))
    empty = memlock_status().locked_bytes
    bench_snapshot(ks, keys)  # adds `keys` records
    ks.close()
    ks = make_keystore(cfg_dir)
    vault = ks.vault
    assert isinstance(vault, VaultBackend)
    for info in vault.records()[:1000]:
        vault.sign(info, b"x", None)
    full = memlock_status().locked_bytes
    ks.close()
    return {"empty": empty, "full": full, "per_1000": (full - empty) / keys * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--sign-only", action="store_true", help="skip the snapshot benchmarks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, make_keystore(Path(tmp)) as ks:
        s = bench_sign(ks, args.rounds, args.n)
        print("| benchmark | Strongroom | raw library | ratio | target |")
        print("|---|---|---|---|---|")
        print(
            f"| Ed25519 sign, 64-byte message | {s['keystore_us']:.1f} µs | "
            f"{s['pynacl_us']:.1f} µs (PyNaCl) | {s['ratio']:.2f}x | ≤ 3x |"
        )
        p = bench_sign_p256(ks, args.rounds, args.n)
        print(
            f"| ECDSA P-256 sign, 64-byte message | {p['keystore_us']:.1f} µs | "
            f"{p['cryptography_us']:.1f} µs (cryptography) | {p['ratio']:.2f}x | ≤ 1.3x |"
        )
        if args.sign_only:
            return
        snap = bench_snapshot(ks, args.keys)
        print(
            f"| vault backup, {snap['keys']:,} keys ({snap['bytes'] / 1e6:.1f} MB) | "
            f"{snap['commit_s'] * 1000:.0f} ms | | | |"
        )
        print(f"| vault restore, {snap['keys']:,} keys | {snap['load_s'] * 1000:.0f} ms | | | |")
        print(f"| backup + restore | {snap['total_s'] * 1000:.0f} ms | | | < 2000 ms |")
        locked = bench_locked(Path(tmp), args.keys)
        print(
            f"| locked memory, vault unlocked and in use, 1 key | {locked['empty']:.0f} B | | | |"
        )
        print(f"| locked memory, {args.keys:,} keys | {locked['full']:.0f} B | | | |")
        print(f"| locked memory per 1,000 keys | {locked['per_1000']:.0f} B | | | bounded |")


if __name__ == "__main__":
    main()
