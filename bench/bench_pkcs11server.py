"""PKCS#11 server benchmark, run by hand (never in CI): `python bench/bench_pkcs11server.py`.

ECDSA P-256 signatures per second with python-pkcs11, the same application code on two
modules, interleaved call by call (each call timed; median per round, median of rounds) so
machine noise hits both alike:

1. p11-kit-client.so into `strongroom pkcs11-server -D` (its own process, as an application
   reaches it), onto a key of the keystore's pkcs11 backend on SoftHSM2, against SoftHSM2
   itself (libsofthsm2.so) onto a P-256 key of the same token. Target: within 2x.
2. With --tpm: the server onto a key of the keystore's tpm backend on a swtpm, against
   tpm2-pkcs11 (Debian libtpm2-pkcs11-1) onto a P-256 key of a second swtpm, started the
   same way (two, so that the calls can interleave: swtpm serves one connection at a time,
   and without a resource manager two programs' loaded objects would evict each other).
   Target: at least as fast as tpm2-pkcs11 (ratio <= 1).

Each side signs a 32-byte digest with CKM_ECDSA (C_SignInit + C_Sign). The server's share
is the RPC round trips between two processes, p11-kit's encoding, the keystore's checks
and audit record, and the backend's own call into its device.
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

from bench_support import PIN, ROOT, make_token

STRONGROOM = Path(sys.executable).parent / "strongroom"
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TPM2_PKCS11 = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
TARGETS = {"SoftHSM2": 2.0, "TPM": 1.0}


def start_swtpm(state: Path) -> str:
    """A fresh swtpm (swtpm/start.sh); its TCTI string."""
    subprocess.run(
        ["bash", str(ROOT / "swtpm" / "start.sh"), str(state)], check=True, capture_output=True
    )
    return (state / "tcti").read_text().strip()


def stop_swtpm(state: Path) -> None:
    subprocess.run(["bash", str(ROOT / "swtpm" / "stop.sh"), str(state)], capture_output=True)


def write_config(tmp: Path, module: str, audit: str, tcti: str | None) -> Path:
    cfg = tmp / "bench.toml"
    tpm = f'[backends.tpm]\ntype = "tpm"\ntcti = "{tcti}"\n' if tcti else ""
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "{audit}"\norder = ["hsm", "vault"]\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{module}"\ntoken = "bench"\n'
        'pin = "env:BENCH_HSM_PIN"\n'
        f"{tpm}"
        '[pkcs11_server]\nlabel = "strongroom"\nkeys = ["bench-*"]\npin = "env:BENCH_P11_PIN"\n'
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    os.environ["BENCH_HSM_PIN"] = PIN
    os.environ["BENCH_P11_PIN"] = PIN
    return cfg


def tpm2_pkcs11_key(tcti: str, store: Path) -> Any:
    """A token of tpm2-pkcs11 on the swtpm at `tcti` (its store in `store`), made with
    pkcs11-tool (C_InitToken, C_InitPIN, C_GenerateKeyPair); the library loaded here."""
    import pkcs11
    from pkcs11 import ObjectClass

    store.mkdir()
    os.environ["TPM2_PKCS11_TCTI"] = tcti
    os.environ["TPM2_PKCS11_STORE"] = str(store)
    tool = ["pkcs11-tool", "--module", TPM2_PKCS11]
    for args in (
        ["--init-token", "--label", "tpm2bench", "--so-pin", "so-pin-1234"],
        ["--token-label", "tpm2bench", "--login", "--so-pin", "so-pin-1234", "--init-pin",
         "--pin", PIN],
        ["--token-label", "tpm2bench", "--login", "--pin", PIN, "--keypairgen", "--key-type",
         "EC:prime256v1", "--label", "bench-p256"],
    ):  # fmt: skip
        subprocess.run([*tool, *args], check=True, capture_output=True, timeout=300)
    token = pkcs11.lib(TPM2_PKCS11).get_token(token_label="tpm2bench")
    session = token.open(user_pin=PIN)
    return session, session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench-p256")


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
    for _ in range(min(200, n)):  # warm both paths
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
    parser.add_argument("--tpm-n", type=int, default=100, help="the same, for the TPM")
    parser.add_argument("--tpm", action="store_true", help="also compare with tpm2-pkcs11")
    parser.add_argument("--audit", default="file", choices=["file", "log", "off"])
    args = parser.parse_args()
    os.environ.setdefault("TSS2_LOG", "all+none")
    if args.tpm and not Path(TPM2_PKCS11).exists():
        parser.error(f"--tpm needs {TPM2_PKCS11} (Debian: apt-get install libtpm2-pkcs11-1)")
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    import strongroom

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sr-bench-p11-") as tmp_name:
        tmp = Path(tmp_name)
        make_token(tmp)
        tcti = start_swtpm(tmp / "swtpm-a") if args.tpm else None
        other = start_swtpm(tmp / "swtpm-b") if args.tpm else None
        server = None
        try:
            cfg = write_config(tmp, args.module, args.audit, tcti)
            with strongroom.open(cfg) as ks:
                ks.vault_control().initialize()
                ks.generate("bench-p256", "ecdsa-p256", backend="hsm")
                if tcti:
                    ks.generate("bench-tpm-p256", "ecdsa-p256", backend="tpm")
            server = start_server(cfg, tmp / "p11" / "p11.sock")
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
                results["SoftHSM2"] = bench(through, direct, args.rounds, args.n)
                if other:
                    session, tpm_direct = tpm2_pkcs11_key(other, tmp / "tpm2-store")
                    with session:
                        tpm_through = rs.get_key(
                            object_class=ObjectClass.PRIVATE_KEY, label="bench-tpm-p256"
                        )
                        results["TPM"] = bench(tpm_through, tpm_direct, args.rounds, args.tpm_n)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
            for name in ("swtpm-a", "swtpm-b") if args.tpm else ():
                stop_swtpm(tmp / name)
    print(
        f"ECDSA P-256 (CKM_ECDSA) with python-pkcs11, {args.rounds} interleaved rounds "
        f"(audit={args.audit}):"
    )
    direct_names = {"SoftHSM2": "SoftHSM2 directly", "TPM": "tpm2-pkcs11 on swtpm"}
    ok = True
    for name, r in results.items():
        target = TARGETS[name]
        verdict = "ok" if r["ratio"] <= target else "OVER TARGET"
        ok = ok and r["ratio"] <= target
        print(f"  {name}")
        print(
            f"    p11-kit-client.so -> strongroom pkcs11-server  "
            f"{r['server_us']:8.1f} us/op  {1e6 / r['server_us']:7.0f}/s"
        )
        print(
            f"    {direct_names[name]:<46} {r['direct_us']:8.1f} us/op  "
            f"{1e6 / r['direct_us']:7.0f}/s"
        )
        print(f"    ratio {r['ratio']:.3f}x  (target <= {target}x: {verdict})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
