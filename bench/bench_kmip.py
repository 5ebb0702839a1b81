"""KMIP benchmark, run by hand (never in CI): `python bench/bench_kmip.py` (issue 19).

Get and Encrypt operations per second over one mutual-TLS connection: `strongroom serve
--kmip` (vault keys) against PyKMIP 0.11.0's own server on the same machine, with the same
client (PyKMIP's ProxyKmipClient, from requirements/pykmip-tests.txt, installed as the KMIP
tests install it). Each server runs as its own process. Measured in interleaved rounds, the
median reported:

- Get of an AES-256 key (Raw), sequential on one connection;
- Encrypt of 64 bytes with AES-CBC, PKCS5 padding and a random IV from the server (MongoDB's
  delegated mode), sequential on one connection.

Target (issue 19): at least as fast as PyKMIP's server; aim for 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("tests", "tests/emulators", "tests/kmip"):
    sys.path.insert(0, str(ROOT / sub))

from kmip_support import pykmip, pykmip_conf, start_kmip  # noqa: E402
from server_support import make_pki  # noqa: E402

CLIENT = r"""
import sys, time, json
from kmip.pie import client
from kmip.core import enums
section, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
params = {"cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
          "block_cipher_mode": enums.BlockCipherMode.CBC,
          "padding_method": enums.PaddingMethod.PKCS5, "random_iv": True}
with client.ProxyKmipClient(config=section) as c:
    uid = c.create(enums.CryptographicAlgorithm.AES, 256, cryptographic_usage_mask=[
        enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])
    c.activate(uid)
    data = bytes(64)
    out = {"get": [], "encrypt": []}
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            c.get(uid)
        out["get"].append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(n):
            c.encrypt(data, uid=uid, cryptographic_parameters=params)
        out["encrypt"].append(n / (time.perf_counter() - t))
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="operations per round (default 300)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    home = pykmip()
    lib = home / "lib"
    with tempfile.TemporaryDirectory(prefix="bench-kmip-") as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        (root / "strongroom").mkdir()
        ours = start_kmip(root / "strongroom", pki, "read,generate,export,manage,encrypt,decrypt")
        port = free_port()
        (root / "policies").mkdir()
        server_conf = root / "pykmip-server.conf"
        server_conf.write_text(
            "[server]\n"
            f"hostname=127.0.0.1\nport={port}\n"
            f"certificate_path={pki.server_cert}\nkey_path={pki.server_key}\nca_path={pki.ca}\n"
            "auth_suite=TLS1.2\n"
            f"policy_path={root / 'policies'}\n"
            "enable_tls_client_auth=False\n"  # our test client certificates carry no EKU
            "logging_level=WARNING\n"
            f"database_path={root / 'pykmip.db'}\n"
        )
        theirs = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from kmip.services.server.server import main; main()",
                "-f",
                str(server_conf),
                "-l",
                str(root / "pykmip.log"),
            ],
            env={**os.environ, "PYTHONPATH": str(lib)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            conf_home = pykmip_conf(root / "home", ours, pki, "strongroom")
            conf = conf_home / ".pykmip" / "pykmip.conf"
            text = conf.read_text()
            conf.write_text(
                text
                + text.replace("[strongroom]", "[pykmip]").replace(
                    f"port={ours.port}", f"port={port}"
                )
            )
            env = {**os.environ, "HOME": str(conf_home), "PYTHONPATH": str(lib)}
            results: dict[str, dict[str, list[float]]] = {"strongroom": {}, "pykmip": {}}
            for _ in range(args.rounds):  # interleaved: one round of each, in turn
                for section in ("strongroom", "pykmip"):
                    done = subprocess.run(
                        [sys.executable, "-c", CLIENT, section, str(args.n), "1"],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if done.returncode != 0:
                        print(done.stderr[-2000:], file=sys.stderr)
                        return 1
                    got = json.loads(done.stdout)
                    for op, rates in got.items():
                        results[section].setdefault(op, []).extend(rates)
            print(f"{'operation':<10} {'Strongroom':>12} {'PyKMIP':>12} {'ratio':>7}")
            for op in ("get", "encrypt"):
                a = statistics.median(results["strongroom"][op])
                b = statistics.median(results["pykmip"][op])
                print(f"{op:<10} {a:>10.0f}/s {b:>10.0f}/s {a / b:>6.2f}x")
        finally:
            theirs.terminate()
            theirs.wait(30)
            ours.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
