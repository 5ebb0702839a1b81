"""SSH agent benchmarks, run by hand (never in CI): `python bench/bench_sshagent.py`.

Signatures through `strongroom ssh-agent -D` (its own process, as ssh would reach it: a
SIGN_REQUEST on its Unix socket, the reply read back) against `Keystore.sign` in this
process, with the same key and the same audit log, interleaved call by call (each call
timed; median per round, median of rounds) so machine noise hits both alike:

1. vault Ed25519: target at most 2x;
2. SoftHSM2 ECDSA P-256 (a throwaway token, softhsm-config/init-token.sh): target 1.2x.

The agent's share is the socket round trip, the message codec, the key lookup by blob, the
policy check and, for ECDSA, re-encoding the DER signature as SSH's mpint pair. Two more
figures split it: the agent's own work (`Agent.handle` against `Keystore.sign` in this
process, interleaved, so no socket), and a round trip that does no work (an unknown message
type, answered SSH_AGENT_FAILURE) right after the previous one and after a busy gap like
the in-process signature that separates two agent calls above.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import PIN, make_token

STRONGROOM = Path(sys.executable).parent / "strongroom"


def write_config(tmp: Path, module: str, audit: str) -> Path:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "{audit}"\norder = ["vault"]\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:BENCH_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{module}"\ntoken = "bench"\n'
        'pin = "env:BENCH_HSM_PIN"\n'
    )
    os.environ["BENCH_PASS"] = "benchmark passphrase"
    os.environ["BENCH_HSM_PIN"] = PIN
    return cfg


class Client:
    """A minimal agent client: one SIGN_REQUEST, its reply read whole."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def sign(self, blob: bytes, data: bytes) -> bytes:
        body = b"\x0d" + struct.pack(">I", len(blob)) + blob
        body += struct.pack(">I", len(data)) + data + b"\0\0\0\0"
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        head = self._exact(4)
        reply = self._exact(struct.unpack(">I", head)[0])
        if reply[:1] != b"\x0e":
            raise RuntimeError("the agent refused to sign")
        return reply

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise RuntimeError("the agent closed the connection")
            out += chunk
        return out


def start_agent(cfg: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            str(STRONGROOM),
            "--config",
            str(cfg),
            "ssh-agent",
            "-D",
            "-a",
            str(sock),
            "--keys",
            "bench-*",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"SSH_AUTH_SOCK="):
        raise RuntimeError("the agent did not start")
    return proc


def bench(ks: object, client: Client, name: str, rounds: int, n: int) -> dict[str, float]:
    from strongroom.keystore import Keystore
    from strongroom.sshagent.keys import key_blob

    assert isinstance(ks, Keystore)
    blob = key_blob(ks.public_key(name))
    message = os.urandom(64)
    for _ in range(200):  # warm both paths
        client.sign(blob, message)
        ks.sign(name, message)
    clock = time.perf_counter_ns
    agent_medians, ks_medians = [], []
    for _ in range(rounds):
        a, b = [], []
        for _ in range(n):
            t0 = clock()
            client.sign(blob, message)
            t1 = clock()
            ks.sign(name, message)
            t2 = clock()
            a.append(t1 - t0)
            b.append(t2 - t1)
        agent_medians.append(statistics.median(a) / 1000)
        ks_medians.append(statistics.median(b) / 1000)
    agent_us, ks_us = statistics.median(agent_medians), statistics.median(ks_medians)
    return {"agent_us": agent_us, "keystore_us": ks_us, "ratio": agent_us / ks_us}


def own_work(ks: object, name: str, rounds: int, n: int) -> float:
    """Median over rounds of median(Agent.handle) - median(Keystore.sign), in us: what the
    agent adds to a signature besides the socket."""
    from strongroom.keystore import Keystore
    from strongroom.sshagent import Agent, AgentSettings, Peer
    from strongroom.sshagent.keys import key_blob

    assert isinstance(ks, Keystore)
    agent = Agent(ks, AgentSettings(patterns=("bench-*",)))
    peer = Peer(os.getpid(), os.getuid())
    blob = key_blob(ks.public_key(name))
    message = os.urandom(64)
    body = b"\x0d" + struct.pack(">I", len(blob)) + blob
    body += struct.pack(">I", len(message)) + message + b"\0\0\0\0"
    for _ in range(200):
        agent.handle(body, peer)
        ks.sign(name, message)
    clock = time.perf_counter_ns
    differences = []
    for _ in range(rounds):
        a, b = [], []
        for _ in range(n):
            t0 = clock()
            agent.handle(body, peer)
            t1 = clock()
            ks.sign(name, message)
            t2 = clock()
            a.append(t1 - t0)
            b.append(t2 - t1)
        differences.append((statistics.median(a) - statistics.median(b)) / 1000)
    return statistics.median(differences)


def null_round_trip(client: Client, gap_us: int, n: int) -> float:
    """Median us of a round trip that does no work (an unknown message type), each after
    `gap_us` of busy waiting in this process (0: back to back)."""
    clock = time.perf_counter_ns
    frame = struct.pack(">IB", 1, 0xFE)
    times = []
    for _ in range(n):
        if gap_us:
            until = clock() + gap_us * 1000
            while clock() < until:
                pass
        t0 = clock()
        client.sock.sendall(frame)
        head = client._exact(4)
        client._exact(struct.unpack(">I", head)[0])
        times.append(clock() - t0)
    return statistics.median(times) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="/usr/lib/softhsm/libsofthsm2.so")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=1000, help="signatures per round and side")
    parser.add_argument("--audit", default="file", choices=["file", "log", "off"])
    args = parser.parse_args()
    import strongroom

    targets = {"bench-ed25519": 2.0, "bench-p256": 1.2}
    results = {}
    with tempfile.TemporaryDirectory(prefix="sr-bench-agent-") as tmp:
        make_token(Path(tmp))
        cfg = write_config(Path(tmp), args.module, args.audit)
        with strongroom.open(cfg) as ks:
            ks.vault_control().initialize()
            ks.generate("bench-ed25519", "ed25519", backend="vault")
            ks.generate("bench-p256", "ecdsa-p256", backend="hsm")
        agent = start_agent(cfg, Path(tmp) / "agent.sock")
        try:
            client = Client(Path(tmp) / "agent.sock")
            with strongroom.open(cfg) as ks:
                for name in targets:
                    results[name] = bench(ks, client, name, args.rounds, args.n)
                    results[name]["own_us"] = own_work(ks, name, args.rounds, args.n)
                gaps = {gap: null_round_trip(client, gap, args.n) for gap in (0, 300)}
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    print(
        f"Signatures through the agent's socket vs Keystore.sign in process, {args.rounds}"
        f" interleaved rounds of {args.n} (audit={args.audit}):"
    )
    ok = True
    for name, r in results.items():
        verdict = "ok" if r["ratio"] <= targets[name] else "OVER TARGET"
        ok = ok and r["ratio"] <= targets[name]
        print(f"  {name}")
        print(f"    ssh-agent socket   {r['agent_us']:8.1f} us/op")
        print(f"    Keystore.sign      {r['keystore_us']:8.1f} us/op")
        print(f"    ratio              {r['ratio']:8.3f}x  (target <= {targets[name]}x: {verdict})")
        print(f"    agent's own work   {r['own_us']:8.1f} us/op  (Agent.handle - Keystore.sign)")
    print("  a round trip that does no work")
    for gap, us in gaps.items():
        print(f"    after {gap:4d} us busy   {us:8.1f} us")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
