"""TPM benchmark, run by hand (never in CI): `python bench/bench_tpm.py [--tcti T]`.

ECDSA P-256 signing through `Keystore.sign` against raw tpm2-pytss signing with the same
loaded key (the same ESYS_TR, on the same ESAPI context), in the same run, interleaved
rounds so machine noise hits both alike. Target: ≤ 1.2x.

The raw side does what a caller needs for a usable signature, like Strongroom does:
SHA-256 on the host, Esys_Sign, and DER encoding of (r, s). It is also shown without the
hashing and encoding. Without --tcti, a fresh swtpm is started with swtpm/start.sh (and
stopped with swtpm/stop.sh, which sends TPM2_Shutdown first).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

import strongroom
from strongroom.backends.tpm import TpmBackend

ROOT = Path(__file__).resolve().parent.parent


def make_keystore(tmp: Path, tcti: str) -> strongroom.Keystore:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "file"\norder = ["tpm", "vault"]\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
        f'[backends.tpm]\ntype = "tpm"\ntcti = "{tcti}"\npersistent_handle = "0x81000001"\n'
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    return strongroom.open(cfg)


def per_op(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def bench_sign(ks: strongroom.Keystore, rounds: int, n: int) -> dict[str, float]:
    from tpm2_pytss.types import TPM2B_DIGEST

    from strongroom.backends.tpm import device

    ks.generate("bench-p256", "ecdsa-p256", backend="tpm")
    message = os.urandom(64)
    public = ks.public_key("bench-p256")
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(ks.sign("bench-p256", message), message, ec.ECDSA(hashes.SHA256()))

    # The same loaded key: the ESYS_TR in the backend's LRU, on the backend's ESAPI context.
    backend = ks.backend("tpm")
    assert isinstance(backend, TpmBackend)
    dev = backend._dev()
    ref = backend._key(ks.info("bench-p256")).refs[0]
    handle = dev.loaded(ref)
    esys = dev.esys()
    scheme = device.sign_scheme("ecdsa", "sha256")
    ticket = device._NULL_TICKET

    def raw_full() -> bytes:
        digest = hashlib.sha256(message).digest()
        sig: Any = esys.sign(handle, TPM2B_DIGEST(digest), scheme, ticket)
        ecdsa = sig.signature.ecdsa
        return utils.encode_dss_signature(
            int.from_bytes(bytes(ecdsa.signatureR), "big"),
            int.from_bytes(bytes(ecdsa.signatureS), "big"),
        )

    digest = hashlib.sha256(message).digest()

    def raw_sign_only() -> object:
        return esys.sign(handle, digest, scheme, ticket)

    public.verify(raw_full(), message, ec.ECDSA(hashes.SHA256()))
    ours, full, bare, ratios, ratios_full = [], [], [], [], []
    contenders: list[Callable[[], object]] = [
        lambda: ks.sign("bench-p256", message),
        raw_full,
        raw_sign_only,
    ]
    for i in range(rounds):
        # Rotate who goes first, so no side gains from its place in the round.
        times: dict[int, float] = {}
        for j in range(3):
            k = (i + j) % 3
            times[k] = per_op(contenders[k], n)
        a, b, c = times[0], times[1], times[2]
        ours.append(a)
        full.append(b)
        bare.append(c)
        ratios.append(a / c)
        ratios_full.append(a / b)
    assert dev.loaded(ref) is handle, "the key left the LRU during the benchmark"

    # The host's share, free of TPM noise: the same calls with Esys_Sign answered at once.
    canned = esys.sign(handle, digest, scheme, ticket)
    esys.sign = lambda *args, **kwargs: canned
    try:
        host_ours = min(per_op(lambda: ks.sign("bench-p256", message), 2000) for _ in range(5))
        host_raw = min(per_op(raw_full, 2000) for _ in range(5))
    finally:
        del esys.sign
    return {
        "keystore_us": statistics.median(ours),
        "raw_us": statistics.median(full),
        "raw_sign_only_us": statistics.median(bare),
        "ratio": statistics.median(ratios_full),
        "ratio2": statistics.median(ratios),
        "host_keystore_us": host_ours,
        "host_raw_us": host_raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--tcti", help="use this TPM instead of starting a swtpm")
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "all+none")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "swtpm"
        tcti = args.tcti
        if tcti is None:
            subprocess.run(
                ["bash", str(ROOT / "swtpm" / "start.sh"), str(state)],
                check=True,
                capture_output=True,
            )
            tcti = (state / "tcti").read_text().strip()
        try:
            with make_keystore(Path(tmp), tcti) as ks:
                s = bench_sign(ks, args.rounds, args.n)
        finally:
            if args.tcti is None:
                subprocess.run(
                    ["bash", str(ROOT / "swtpm" / "stop.sh"), str(state)],
                    check=False,
                    capture_output=True,
                )
    print("| benchmark | Strongroom | raw tpm2-pytss | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| ECDSA P-256 sign, 64-byte message, `Keystore.sign` | {s['keystore_us']:.0f} µs | "
        f"{s['raw_sign_only_us']:.0f} µs (`esys.sign` alone, digest precomputed) | "
        f"{s['ratio2']:.3f}x | ≤ 1.2x |"
    )
    print(
        f"| the same, raw side hashing and DER-encoding too | {s['keystore_us']:.0f} µs | "
        f"{s['raw_us']:.0f} µs (SHA-256 + `esys.sign` + r, s fields + DER) | "
        f"{s['ratio']:.3f}x | |"
    )
    print(
        f"| host time only (Esys_Sign answered at once) | {s['host_keystore_us']:.0f} µs | "
        f"{s['host_raw_us']:.0f} µs (SHA-256 + `esys.sign` wrapper + DER) | | |"
    )
    print("\nratios are medians of per-round ratios (rounds interleaved); times are medians")


if __name__ == "__main__":
    main()
