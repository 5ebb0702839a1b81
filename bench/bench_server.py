"""Custody service benchmark, run by hand (never in CI): `python bench/bench_server.py`.

Vault Ed25519 signing over the service's Unix socket against in-process `Keystore.sign`
on the same key (issue 8). Target: over 2,000 signatures/s through the service.

The service runs as its own process (`strongroom --config CFG serve`, uvicorn), so client
and server do not share a GIL. Measured, each for a fixed duration:

1. in-process `Keystore.sign` (the tenant's namespace view, as the service uses it);
2. one client, `strongroom.connect("unix:...")` (`RemoteKeystore.sign`, sync httpx),
   sequential: rate, p50, p99 and the ratio to in-process;
3. N client processes, each with its own `strongroom.connect` client, signing in a loop;
4. one process, httpx `AsyncClient` on the socket with C requests in flight (the same
   request the client library sends; there is no async `RemoteKeystore`);
5. diagnostic: a minimal raw HTTP/1.1 client on the socket, sequential, to separate the
   service's cost from the client library's.

Latencies are per request as the caller sees them, wall clock. Server CPU per signature
comes from /proc/PID/stat (Linux), client CPU from `process_time` in the client(s).
The service is stopped with SIGTERM at the end and must exit 0 and remove its socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import strongroom
from strongroom.service.tenants import Permission, TenantStore

PASS_ENV = "BENCH_SERVER_PASS"
TENANT, IDENTITY, KEY = "bench", "app", "bench-ed25519"
MESSAGE = bytes(range(64))
STRONGROOM_BIN = Path(sys.executable).with_name("strongroom")


def write_config(tmp: Path) -> Path:
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp / "data"}"\naudit = "file"\n'
        '[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{PASS_ENV}"\nkdf_memory_kib = 8192\nkdf_iterations = 1\n'
        f'[server]\nsocket = "{tmp / "serve.sock"}"\nrate_limit = 0\n'
    )
    return cfg


def setup(cfg: Path) -> tuple[str, bytes]:
    """Initialise the vault, make the tenant, token and key; return (token, public key)."""
    with strongroom.open(cfg) as ks:
        ks.vault_control().initialize()
        data_dir = ks.config.data_dir
    store = TenantStore(data_dir / "tenants.sqlite")
    try:
        store.create_tenant(TENANT)
        token = store.issue_token(TENANT, IDENTITY)
        store.grant(TENANT, IDENTITY, "*", [Permission.SIGN, Permission.VERIFY, Permission.READ])
    finally:
        store.close()
    from cryptography.hazmat.primitives import serialization

    with strongroom.open(cfg) as ks:
        view = ks.in_namespace(TENANT)
        view.generate(KEY, "ed25519")
        public = view.public_key(KEY).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return token, public


def summarise(lat_ns: list[int], elapsed: float) -> dict[str, float]:
    lat = sorted(lat_ns)
    n = len(lat)
    return {
        "n": n,
        "rate": n / elapsed,
        "p50": lat[n // 2] / 1000,
        "p99": lat[min(n - 1, (n * 99) // 100)] / 1000,
        "mean": sum(lat) / n / 1000,
    }


def timed_loop(fn: Any, duration: float) -> tuple[list[int], float]:
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    start = clock()
    deadline = start + int(duration * 1e9)
    t = start
    while t < deadline:
        fn()
        now = clock()
        append(now - t)
        t = now
    return lat, (t - start) / 1e9


def bench_in_process(cfg: Path, duration: float) -> dict[str, float]:
    with strongroom.open(cfg) as ks:
        view = ks.in_namespace(TENANT)
        for _ in range(200):
            view.sign(KEY, MESSAGE)
        lat, elapsed = timed_loop(lambda: view.sign(KEY, MESSAGE), duration)
    return summarise(lat, elapsed)


def start_service(cfg: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("STRONGROOM_SERVER", None)
    env.pop("STRONGROOM_TOKEN", None)
    proc = subprocess.Popen(
        [str(STRONGROOM_BIN), "--config", str(cfg), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"strongroom serve exited {proc.returncode}:\n{log.read_text()}")
        if sock.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(sock))
                return proc
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise SystemExit(f"strongroom serve did not start:\n{log.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_service(proc: subprocess.Popen[bytes], sock: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SystemExit("strongroom serve did not exit on SIGTERM") from None
    if code != 0 or sock.exists():
        raise SystemExit(f"strongroom serve exited {code}; socket left: {sock.exists()}")
    return code


def bench_sequential(url: str, token: str, duration: float) -> dict[str, float]:
    with strongroom.connect(url, token=token) as remote:
        for _ in range(200):
            remote.sign(KEY, MESSAGE)
        cpu = time.process_time()
        lat, elapsed = timed_loop(lambda: remote.sign(KEY, MESSAGE), duration)
        cpu = time.process_time() - cpu
    r = summarise(lat, elapsed)
    r["client_cpu"] = cpu / r["n"] * 1e6
    return r


def bench_raw(sock: Path, token: str, duration: float) -> dict[str, float]:
    """Diagnostic: the same request from a minimal HTTP/1.1 client (one `sendall`, parse
    Content-Length), to show what the service can do without the client library's cost."""
    body = json.dumps({"data": base64.b64encode(MESSAGE).decode()}).encode()
    request = (
        f"POST /v1/keys/{KEY}/sign HTTP/1.1\r\nhost: strongroom\r\n"
        f"authorization: Bearer {token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(sock))

    def one() -> bytes:
        conn.sendall(request)
        buf = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                raise SystemExit("the service closed the connection")
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                break
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"sign failed: {head!r}")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        return base64.b64decode(json.loads(rest)["signature"])

    try:
        for _ in range(200):
            one()
        cpu = time.process_time()
        lat, elapsed = timed_loop(one, duration)
        cpu = time.process_time() - cpu
    finally:
        conn.close()
    r = summarise(lat, elapsed)
    r["client_cpu"] = cpu / r["n"] * 1e6
    return r


def _client_proc(url: str, token: str, duration: float, ready: Any, go: Any, out: Any) -> None:
    with strongroom.connect(url, token=token) as remote:
        for _ in range(100):
            remote.sign(KEY, MESSAGE)
        ready.put(os.getpid())
        go.wait()
        cpu = time.process_time()
        lat, elapsed = timed_loop(lambda: remote.sign(KEY, MESSAGE), duration)
        cpu = time.process_time() - cpu
    out.put((lat, elapsed, cpu))


def bench_processes(url: str, token: str, n: int, duration: float) -> dict[str, float]:
    """`n` spawned processes, each with its own `strongroom.connect` client, started together."""
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_client_proc, args=(url, token, duration, ready, go, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()

    def collect(q: Any, timeout: float) -> list[Any]:
        got: list[Any] = []
        give_up = time.monotonic() + timeout
        while len(got) < n:
            try:
                got.append(q.get(timeout=0.5))
            except queue.Empty:
                if time.monotonic() > give_up or any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.terminate()
                    raise SystemExit("a client process failed") from None
        return got

    try:
        collect(ready, 60)
        go.set()
        results = collect(out, duration + 60)
    finally:
        for p in procs:
            p.join(10)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit("a client process exited non-zero")
    r = summarise([x for lat, _, _ in results for x in lat], max(e for _, e, _ in results))
    r["rate"] = sum(len(lat) / e for lat, e, _ in results)
    r["client_cpu"] = sum(c for _, _, c in results) / r["n"] * 1e6
    return r


async def _async_run(sock: str, token: str, concurrency: int, duration: float) -> Any:
    import httpx

    body = {"data": base64.b64encode(MESSAGE).decode()}
    path = f"/v1/keys/{KEY}/sign"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits),
        base_url="http://strongroom",
        headers={"authorization": f"Bearer {token}"},
    ) as client:

        async def one() -> None:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                raise SystemExit(f"sign failed: {r.status_code} {r.text}")
            base64.b64decode(r.json()["signature"])

        await asyncio.gather(*(one() for _ in range(concurrency * 20)))  # warm-up
        clock = time.perf_counter_ns
        deadline = clock() + int(duration * 1e9)
        lat: list[int] = []

        async def worker() -> None:
            while (t := clock()) < deadline:
                await one()
                lat.append(clock() - t)

        cpu = time.process_time()
        start = clock()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, (clock() - start) / 1e9, time.process_time() - cpu


def bench_async(sock: Path, token: str, concurrency: int, duration: float) -> dict[str, float]:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    lat, elapsed, cpu = runner(_async_run(str(sock), token, concurrency, duration))
    r = summarise(lat, elapsed)
    r["client_cpu"] = cpu / r["n"] * 1e6
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--processes", default="2,4", help="client process counts")
    parser.add_argument("--async-concurrency", default="4", help="requests in flight (0: skip)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-client diagnostic")
    args = parser.parse_args()
    os.environ[PASS_ENV] = "benchmark passphrase"
    started = time.monotonic()
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="srbench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = write_config(tmp)
        sock = tmp / "serve.sock"
        token, public = setup(cfg)
        local = bench_in_process(cfg, min(args.duration, 3.0))
        proc = start_service(cfg, sock, tmp / "serve.log")
        try:
            url = f"unix:{sock}"
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            with strongroom.connect(url, token=token) as remote:
                sig = remote.sign(KEY, MESSAGE)
            Ed25519PublicKey.from_public_bytes(public).verify(sig, MESSAGE)

            def measure(label: str, fn: Any, *fargs: Any) -> None:
                cpu = cpu_seconds(proc.pid)
                r = fn(*fargs)
                # whole-run server CPU (warm-ups included) over measured requests: an upper bound
                r["server_cpu"] = (cpu_seconds(proc.pid) - cpu) / r["n"] * 1e6
                rows.append((label, r))

            measure("`connect()` client, sequential", bench_sequential, url, token, args.duration)
            for n in (int(x) for x in args.processes.split(",") if x and int(x) > 0):
                label = f"{n} client processes, one `connect()` each"
                measure(label, bench_processes, url, token, n, args.duration)
            for c in (int(x) for x in args.async_concurrency.split(",") if x and int(x) > 0):
                label = f"httpx `AsyncClient`, {c} requests in flight"
                measure(label, bench_async, sock, token, c, args.duration)
            if not args.no_raw:
                label = "diagnostic: minimal raw HTTP/1.1 client, sequential"
                measure(label, bench_raw, sock, token, args.duration)
        finally:
            code = stop_service(proc, sock)
    print(f"vault Ed25519 sign of 64 bytes; {os.cpu_count()} CPUs; {args.duration:g} s a row")
    print("| | signs/s | p50 | p99 | server CPU/sign | client CPU/sign |")
    print("|---|---|---|---|---|---|")
    print(
        f"| in-process `Keystore.sign` | {local['rate']:,.0f} | {local['p50']:.1f} µs | "
        f"{local['p99']:.1f} µs | | |"
    )
    for label, r in rows:
        print(
            f"| {label} | {r['rate']:,.0f} | {r['p50']:.0f} µs | {r['p99']:.0f} µs | "
            f"{r['server_cpu']:.0f} µs | {r['client_cpu']:.0f} µs |"
        )
    seq = rows[0][1]
    library = [r for r in rows if not r[0].startswith("diagnostic")]
    best = max(library, key=lambda r: r[1]["rate"])
    print()
    print(
        f"socket/in-process, sequential: p50 {seq['p50'] / local['p50']:.1f}x, "
        f"p99 {seq['p99'] / local['p99']:.1f}x, rate 1/{local['rate'] / seq['rate']:.1f}"
    )
    verdict = "met" if best[1]["rate"] > 2000 else "MISSED"
    print(f"best with the client library: {best[1]['rate']:,.0f} signs/s ({best[0]})")
    print(f"target > 2,000 signs/s: {verdict}")
    total = time.monotonic() - started
    print(f"service stopped by SIGTERM: exit {code}, socket removed; {total:.0f} s in all")


if __name__ == "__main__":
    main()
