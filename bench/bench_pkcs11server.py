"""PKCS#11 server benchmark, run by hand (never in CI): `python bench/bench_pkcs11server.py`.

ECDSA P-256 signatures per second with python-pkcs11, the same application code on two
modules, interleaved call by call (each call timed; median per round, median of rounds) so
machine noise hits both alike:

1. p11-kit-client.so into `strongroom pkcs11-server -D` (its own process, as an application
   reaches it), onto a key of the keystore's pkcs11 backend on SoftHSM2;
2. SoftHSM2 itself (libsofthsm2.so), onto a P-256 key of the same token.

Both sign a 32-byte digest with CKM_ECDSA (C_SignInit + C_Sign). Target: the server within
2x of SoftHSM2 directly. The server's share is the RPC round trip between two processes,
p11-kit's encoding, the keystore's checks and audit record, and the pkcs11 backend's own
call into SoftHSM2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PIN = "bench-pin-1234"
STRONGROOM = Path(sys.executable).parent / "strongroom"
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TARGET = 2.0


def make_token(tmp: Path) -> None:
    """A fresh SoftHSM2 token labelled `bench`; sets SOFTHSM2_CONF for this process (and
    so for the server it starts)."""
    out = subprocess.run(
        ["bash", str(ROOT / "softhsm-config" / "init-token.sh"), str(tmp / "hsm"), "bench"],
        env={**os.environ, "SOFTHSM_PIN": PIN},
        capture_output=True,
        text=True,
        check=True,
    )
    os.environ["SOFTHSM2_CONF"] = out.stdout.strip().split("=", 1)[1]


def write_config(tmp: Path, module: str, audit: str) -> Path:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "{audit}"\norder = ["hsm", "vault"]\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{module}"\ntoken = "bench"\n'
        'pin = "env:BENCH_HSM_PIN"\n'
        '[pkcs11_server]\nlabel = "strongroom"\nkeys = ["bench-*"]\npin = "env:BENCH_P11_PIN"\n'
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    os.environ["BENCH_HSM_PIN"] = PIN
    os.environ["BENCH_P11_PIN"] = PIN
    return cfg


def start_server(cfg: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(STRONGROOM), "--config", str(cfg), "pkcs11-server", "-D", "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("P11_KIT_SERVER_ADDRESS="):
        raise RuntimeError("the server did not start")
    os.environ["P11_KIT_SERVER_ADDRESS"] = line.split("=", 1)[1].split(";", 1)[0]
    return proc


def bench(through: Any, direct: Any, rounds: int, n: int) -> dict[str, float]:
    from pkcs11 import Mechanism

    digest = os.urandom(32)
    for _ in range(200):  # warm both paths
        through.sign(digest, mechanism=Mechanism.ECDSA)
        direct.sign(digest, mechanism=Mechanism.ECDSA)
    clock = time.perf_counter_ns
    server_medians, direct_medians = [], []
    for _ in range(rounds):
        a, b = [], []
        for _ in range(n):
            t0 = clock()
            through.sign(digest, mechanism=Mechanism.ECDSA)
            t1 = clock()
            direct.sign(digest, mechanism=Mechanism.ECDSA)
            t2 = clock()
            a.append(t1 - t0)
            b.append(t2 - t1)
        server_medians.append(statistics.median(a) / 1000)
        direct_medians.append(statistics.median(b) / 1000)
    server_us, direct_us = statistics.median(server_medians), statistics.median(direct_medians)
    return {"server_us": server_us, "direct_us": direct_us, "ratio": server_us / direct_us}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="/usr/lib/softhsm/libsofthsm2.so")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=1000, help="signatures per round and side")
    parser.add_argument("--audit", default="file", choices=["file", "log", "off"])
    args = parser.parse_args()
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    import strongroom

    with tempfile.TemporaryDirectory(prefix="sr-bench-p11-") as tmp:
        make_token(Path(tmp))
        cfg = write_config(Path(tmp), args.module, args.audit)
        with strongroom.open(cfg) as ks:
            ks.vault_control().initialize()
            ks.generate("bench-p256", "ecdsa-p256", backend="hsm")
        server = start_server(cfg, Path(tmp) / "p11" / "p11.sock")
        try:
            remote = pkcs11.lib(CLIENT_MODULE).get_token(token_label="strongroom")
            local = pkcs11.lib(args.module).get_token(token_label="bench")
            with remote.open(user_pin=PIN) as rs, local.open(user_pin=PIN, rw=True) as ls:
                through = rs.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench-p256")
                params = ls.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True,
                )
                _, direct = params.generate_keypair()  # a session key on the same token
                result = bench(through, direct, args.rounds, args.n)
        finally:
            server.terminate()
            server.wait(timeout=30)
    verdict = "ok" if result["ratio"] <= TARGET else "OVER TARGET"
    print(
        f"ECDSA P-256 (CKM_ECDSA) with python-pkcs11, {args.rounds} interleaved rounds of "
        f"{args.n} (audit={args.audit}):"
    )
    print(
        f"  p11-kit-client.so -> strongroom pkcs11-server -> SoftHSM2  "
        f"{result['server_us']:8.1f} us/op  {1e6 / result['server_us']:7.0f}/s"
    )
    print(
        f"  SoftHSM2 directly                                          "
        f"{result['direct_us']:8.1f} us/op  {1e6 / result['direct_us']:7.0f}/s"
    )
    print(f"  ratio {result['ratio']:.3f}x  (target <= {TARGET}x: {verdict})")
    return 0 if result["ratio"] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
