"""Several `strongroom serve` nodes on one PostgreSQL, run by hand (never in CI):
`python bench/bench_cluster.py` (issue 21, docs/cluster.md).

Ed25519 signs per second, and generate + rotate pairs per second, through 1, 2 and 3 nodes
on one database (a private cluster, as the tests start it: tests/emulators/pg_support.py),
and through a single node on the embedded SQLite store. Each node is its own
`strongroom serve` process on a Unix socket; `--clients` client processes per node each
loop on their own `strongroom.connect` client for `--seconds`. Every node writes its audit
records (the chain in the database; on SQLite the file), as in production.

On a machine with few cores the nodes, the clients and PostgreSQL share them: more nodes
add processes, not cores, so the figures say what the coordination costs, not how far a
cluster of real machines scales.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import strongroom
from strongroom.service.tenants import Permission, open_tenants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "emulators"))
from pg_support import start_cluster  # the tests' private cluster

PASS_ENV = "BENCH_CLUSTER_PASS"
STRONGROOM_BIN = Path(sys.executable).with_name("strongroom")


def write_config(directory: Path, url: str | None) -> Path:
    directory.mkdir(parents=True)
    store = f'[store]\nurl = "{url}"\n' if url else ""
    cfg = directory / "node.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{directory / "data"}"\naudit = "file"\n{store}'
        '[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{PASS_ENV}"\nkdf_memory_kib = 8192\nkdf_iterations = 1\n'
        f'[server]\nsocket = "{directory / "serve.sock"}"\nrate_limit = 0\n'
    )
    return cfg


def start_node(cfg: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(STRONGROOM_BIN), "--config", str(cfg), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"serving on (unix:\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1).rstrip(",")
    raise RuntimeError(f"a node did not start (exit {proc.wait()})")


def client(url: str, token: str, what: str, seconds: float, tag: str, out: Any) -> None:
    done = 0
    with strongroom.connect(url, token=token) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if what == "sign":
                c.sign("k", b"benchmark data")
            else:
                c.generate(f"{tag}-{done}", "ed25519")
                c.rotate(f"{tag}-{done}")
            done += 1
    out.put(done)


def measure(urls: list[str], token: str, what: str, clients: int, seconds: float) -> float:
    out: Any = mp.Queue()
    procs = [
        mp.Process(target=client, args=(url, token, what, seconds, f"{what}-{i}-{j}", out))
        for i, url in enumerate(urls)
        for j in range(clients)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / (time.monotonic() - start)


def run(label: str, url: str | None, nodes: int, clients: int, seconds: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="strongroom-bench-cluster-"))
    configs = [write_config(root / f"n{i}", url) for i in range(nodes)]
    with strongroom.open(configs[0]) as ks:
        ks.vault_control().initialize()
    tenants = open_tenants(strongroom.config.load(configs[0]))
    try:
        tenants.create_tenant("bench")
        token = tenants.issue_token("bench", "app")
        tenants.grant("bench", "app", "*", [Permission.SIGN, Permission.GENERATE,
                                             Permission.MANAGE, Permission.READ])  # fmt: skip
    finally:
        tenants.close()
    running = [start_node(cfg) for cfg in configs]
    try:
        urls = [u for _, u in running]
        with strongroom.connect(urls[0], token=token) as c:
            c.generate("k", "ed25519")
        signs = measure(urls, token, "sign", clients, seconds)
        pairs = measure(urls, token, "rotate", clients, seconds)
    finally:
        for proc, _ in running:
            proc.terminate()
            proc.wait(60)
    print(f"{label:<22} {signs:>10,.0f} {pairs:>14,.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes per node")
    args = parser.parse_args()
    os.environ[PASS_ENV] = "benchmark passphrase"
    print(f"{os.cpu_count()} cores; {args.clients} client process(es) per node, "
          f"{args.seconds:g} s each")  # fmt: skip
    print(f"{'':<22} {'signs/s':>10} {'gen+rotate/s':>14}")
    cluster = start_cluster()
    try:
        run("SQLite, 1 node", None, 1, args.clients, args.seconds)
        for n in (1, 2, 3):
            run(f"PostgreSQL, {n} node(s)", cluster.new_database(), n, args.clients, args.seconds)
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    main()
