"""Envelope encryption throughput, run by hand (never in CI): `python bench/bench_envelope.py`.

Compares `Keystore.encrypt_stream` / `decrypt_stream` (vault KEK: data key wrapped once,
header, HKDF, then AES-256-GCM STREAM chunks read from a stream and written to a sink) with
`cryptography`'s raw `AESGCM.encrypt` / `decrypt` over the same chunks of the same size, in
the same run, in interleaved rounds; reports medians in MB/s and the ratio.
Target: at least 70% of the raw throughput.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import strongroom
from strongroom import envelope


class Sink:
    """Discards what it is given (both sides write to one like it)."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def make_keystore(tmp: Path) -> strongroom.Keystore:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "file"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    return strongroom.open(cfg)


def raw_encrypt(key: AESGCM, chunks: list[memoryview], sink: Sink) -> None:
    prefix = os.urandom(7)
    last = len(chunks) - 1
    for i, c in enumerate(chunks):
        sink.write(key.encrypt(prefix + struct.pack(">IB", i, i == last), c, None))


def raw_decrypt(key: AESGCM, prefix: bytes, sealed: list[bytes], sink: Sink) -> None:
    last = len(sealed) - 1
    for i, c in enumerate(sealed):
        sink.write(key.decrypt(prefix + struct.pack(">IB", i, i == last), c, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="data per round (MiB)")
    ap.add_argument("--chunk", type=int, default=envelope.DEFAULT_CHUNK)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.mib << 20
    data = os.urandom(size)
    view = memoryview(data)
    chunks = [view[i : i + args.chunk] for i in range(0, size, args.chunk)]
    raw_key = AESGCM(AESGCM.generate_key(256))
    prefix = os.urandom(7)
    last = len(chunks) - 1
    sealed = [
        raw_key.encrypt(prefix + struct.pack(">IB", i, i == last), c, None)
        for i, c in enumerate(chunks)
    ]
    with tempfile.TemporaryDirectory() as tmp, make_keystore(Path(tmp)) as ks:
        ks.generate("bench-kek", "aes-256")
        blob = io.BytesIO()
        ks.encrypt_stream("bench-kek", io.BytesIO(data), blob, chunk_size=args.chunk)
        enveloped = blob.getvalue()
        del blob
        check = io.BytesIO()
        ks.decrypt_stream(io.BytesIO(enveloped), check)
        assert check.getvalue() == data
        del check
        results: dict[str, list[float]] = {k: [] for k in ("enc", "raw_enc", "dec", "raw_dec")}

        def timed(key: str, fn: object) -> None:
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            results[key].append(size / (time.perf_counter() - start) / 1e6)

        for _ in range(args.rounds):
            timed(
                "enc",
                lambda: ks.encrypt_stream(
                    "bench-kek", io.BytesIO(data), Sink(), chunk_size=args.chunk
                ),
            )
            timed("raw_enc", lambda: raw_encrypt(raw_key, chunks, Sink()))
            timed("dec", lambda: ks.decrypt_stream(io.BytesIO(enveloped), Sink()))
            timed("raw_dec", lambda: raw_decrypt(raw_key, prefix, sealed, Sink()))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.mib} MiB per round, {args.chunk}-byte chunks, {args.rounds} rounds (median)")
    print(f"{'':10} {'envelope':>12} {'raw AESGCM':>12} {'ratio':>7}")
    for op, ours, theirs in (("encrypt", "enc", "raw_enc"), ("decrypt", "dec", "raw_dec")):
        ratio = med[ours] / med[theirs]
        print(f"{op:10} {med[ours]:9.0f} MB/s {med[theirs]:9.0f} MB/s {ratio:6.0%}")


if __name__ == "__main__":
    main()
