"""Serving the app: `strongroom serve` runs `App` under uvicorn on a Unix socket and on TCP
with TLS.

uvicorn's httptools protocol gets a subclass of ours (caps on the request head, deadlines,
connection limits, the ASGI TLS extension); the Unix socket is bound with its mode set
before anyone can connect; one process serves both listeners and signs periodic audit
checkpoints. At SIGTERM or SIGINT in-flight requests finish, then the vault is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ..audit.log import CHECKPOINT_OP, parse_record
from ..config import Config, ServerConfig
from ..errors import BackendUnavailable, InvalidArgument, StrongroomError
from ..keystore import Keystore
from ..kmip.server import KmipServer, KmipSettings, kmip_tls_context
from ..kmip.store import ObjectStore
from ..store import open_store
from ..store_lease import Grant, Lease, LeaseLost, open_lease
from .app import App, log
from .tenants import ImportAudit, TenantStore, open_tenants

# -- serving -----------------------------------------------------------------------------------
MAX_HEAD_BYTES = 16 * 1024
"""The request line and headers together: larger is refused with 431 before it is buffered."""


class _HeadTooLarge(Exception):
    """Raised in the HTTP parser's callbacks to stop parsing a head over MAX_HEAD_BYTES."""


class _ConnectionLimits:
    """Open connections, counted in total and per peer, against the service's caps."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self.open = 0
        self.by_peer: dict[object, int] = {}

    def admit(self, peer: object) -> bool:
        if self.open >= self.total or self.by_peer.get(peer, 0) >= self.per_peer:
            return False
        self.open += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        return True

    def release(self, peer: object) -> None:
        self.open -= 1
        left = self.by_peer[peer] - 1
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]


def _peer_of(transport: Any) -> object:
    """Who a connection is from: its IP address over TCP; its user id on the Unix socket
    (SO_PEERCRED), since any number of processes of one user are one peer there."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and name:
        return ("ip", name[0])
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return ("uid", struct.unpack("3i", cred)[1])
    return ("unknown", None)


def _plain_response(status: str, kind: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _protocol_class(settings: ServerConfig, limits: _ConnectionLimits) -> type:
    """uvicorn's httptools protocol with additions of ours.

    - A cap on the request line and headers (MAX_HEAD_BYTES): uvicorn's httptools protocol
      has none, and a caller could make it buffer hundreds of megabytes before any check of
      ours runs. Larger heads get 431 and the connection is closed.
    - Deadlines, so that a client that sends slowly or not at all cannot hold a connection:
      `head_timeout` for a request's line and headers (from the connection, or from the
      request's first byte), then `body_timeout` for its body; a connection past either gets
      408 and is closed. Idle connections between requests close after uvicorn's keep-alive
      timeout (`keepalive_timeout`).
    - Caps on open connections, in total and per peer (`_ConnectionLimits`): a connection
      over either gets 503 at once and is closed.
    - The ASGI TLS extension: uvicorn (0.55) does not fill `scope["extensions"]["tls"]`;
      we add the spec's `client_cert_chain` (the verified leaf, PEM) so that mutual TLS can
      name the caller. The certificate was verified by the handshake against tls_client_ca.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    response = _plain_response(
        "431 Request Header Fields Too Large",
        "RequestTooLarge",
        "the request headers are too large",
    )
    too_slow = _plain_response(
        "408 Request Timeout", "RequestTimeout", "the request was not sent in time"
    )
    too_many = _plain_response(
        "503 Service Unavailable", "TooManyConnections", "too many open connections"
    )
    head_timeout, body_timeout = settings.head_timeout, settings.body_timeout

    class StrongroomHttpProtocol(HttpToolsProtocol):
        _tls_ext: dict[str, Any] | None = None
        _in_head = True
        _head_bytes = 0
        _head_parts = 0
        _peer: object = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            peer = _peer_of(transport)
            if not limits.admit(peer):  # uvicorn never learns of it
                transport.write(too_many)
                transport.close()
                return
            self._peer = peer
            super().connection_made(transport)
            self._arm(head_timeout)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                der = ssl_object.getpeercert(binary_form=True)
                chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
                self._tls_ext = {
                    "server_cert": None,
                    "client_cert_chain": chain,
                    "client_cert_name": None,
                    "client_cert_error": None,
                    "tls_version": None,
                    "cipher_suite": None,
                }

        def data_received(self, data: bytes) -> None:
            # Two counts: the raw bytes of a head that arrives over several reads (so that
            # httptools never buffers more than the cap), and in the parser's callbacks the
            # head's parts, which also catches a whole oversized head (or several pipelined
            # ones) arriving in a single read.
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

        def _refuse_head(self) -> None:
            self._in_head = False
            self.transport.write(response)
            self.transport.close()

        def _count_head(self, size: int) -> None:
            self._head_parts += size
            if self._head_parts > MAX_HEAD_BYTES:
                # httptools turns this into a parse error, which uvicorn answers through
                # send_400_response: that is where the 431 goes out instead
                raise _HeadTooLarge

        def send_400_response(self, msg: str) -> None:
            if self._head_parts > MAX_HEAD_BYTES:
                self._refuse_head()
            else:
                super().send_400_response(msg)

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_message_begin(self) -> None:
            self._head_parts = 0
            self._arm(head_timeout)
            super().on_message_begin()
            if self._tls_ext is not None:
                self.scope["extensions"] = cast(Any, {"tls": self._tls_ext})

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._peer is None:  # refused in connection_made
                return
            limits.release(self._peer)
            self._peer = None
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                self._arm(seconds)  # we are busy answering (reads paused): not their delay
                return
            if cycle is None or not cycle.response_started:  # else it has had its answer
                self.transport.write(too_slow)
            self.transport.close()

    return StrongroomHttpProtocol


def bind_unix_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the service's Unix socket with `mode` set before anyone can connect."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # a stale socket from a service that died
        else:
            raise InvalidArgument(f"a service is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777)  # nobody can connect in the window before chmod
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise InvalidArgument(f"no group named {group!r}") from None
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def tls_context(settings: ServerConfig) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2+, client certificates checked against the CA."""
    assert settings.tls_cert is not None and settings.tls_key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            ctx.load_verify_locations(settings.tls_client_ca)
            ctx.verify_mode = (
                ssl.CERT_REQUIRED if settings.client_cert_required else ssl.CERT_OPTIONAL
            )
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the TLS certificate or key: {e}") from None
    return ctx


def serve(
    config: Config,
    settings: ServerConfig,
    *,
    ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT; then finish in-flight requests, lock the vault
    and purge guarded memory."""
    if not (_has("uvicorn") and _has("httptools")):
        raise BackendUnavailable(
            "server", "the service needs uvicorn and httptools: pip install 'strongroom[server]'"
        )
    http = settings.socket is not None or settings.listen is not None
    if not http and settings.kmip_listen is None:
        raise InvalidArgument("nothing to listen on: set [server] socket, listen or kmip_listen")
    if settings.listen is not None and (settings.tls_cert is None or settings.tls_key is None):
        raise InvalidArgument("TCP needs TLS: set [server] tls_cert and tls_key")
    ks = Keystore(config, actor="strongroom-serve")
    try:
        tenants = open_tenants(config, _import_audit(ks))
    except BaseException:
        ks.close()
        raise
    kmip = _kmip_server(config, settings, ks, tenants) if settings.kmip_listen else None
    if not http:
        assert kmip is not None
        _serve_kmip_alone(kmip, ks, tenants, ready)
        return
    app = App(ks, tenants, settings)
    lease = None
    if config.store_url is not None:  # several nodes: the singleton jobs under a lease
        try:
            lease = open_lease(config.store_url, "jobs", settings.lease_seconds)
        except BaseException:
            app.close()
            raise
    if kmip is not None:
        host, port = kmip.address
        threading.Thread(target=kmip.serve_forever, name="kmip", daemon=True).start()
        inner = ready

        def ready_both(where: list[str]) -> None:
            if inner is not None:
                inner([*where, f"kmip://{host}:{port}"])

        ready = ready_both
    loop_factory = None
    if _has("uvloop"):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(app, settings, ready, kmip, lease))
    finally:
        if lease is not None:  # closed already unless the service failed to start
            lease.close()
        if kmip is not None:  # closed already unless the service failed to start
            kmip.close(0)
            kmip.store.close()


def open_objects(config: Config) -> ObjectStore:
    """The KMIP object store of a config: in the database `[store] url` names (shared by
    every node, so an object made on one node is known on every other, and is in the
    database's backups), else `kmip.sqlite` in the data dir. A `kmip.sqlite` left in the
    data dir of a node that now has a database is moved into it (`ObjectStore.import_file`),
    as `open_tenants` does with `tenants.sqlite`."""
    legacy = config.data_dir / "kmip.sqlite"
    if config.store_url is None:
        return ObjectStore(legacy)
    store = ObjectStore(open_store(config.store_url, config.data_dir))
    try:
        if legacy.exists():
            store.import_file(legacy)
    except BaseException:
        store.close()
        raise
    return store


def _kmip_server(
    config: Config, settings: ServerConfig, ks: Keystore, tenants: TenantStore
) -> KmipServer:
    """The KMIP listener over this process's keystore: each tenant sees its namespace."""
    assert settings.kmip_listen is not None
    if settings.tls_cert is None or settings.tls_key is None or settings.tls_client_ca is None:
        raise InvalidArgument(
            "KMIP needs mutual TLS: set [server] tls_cert, tls_key and tls_client_ca"
        )
    try:
        tls = kmip_tls_context(
            str(settings.tls_cert), str(settings.tls_key), str(settings.tls_client_ca)
        )
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"cannot load the TLS certificate or key: {e}") from None
    views: dict[str, Keystore] = {}
    lock = threading.Lock()

    def view(tenant: str) -> Keystore:
        with lock:
            if tenant not in views:
                views[tenant] = ks.in_namespace(tenant)
            return views[tenant]

    kmip = config.kmip
    store = open_objects(config)
    return KmipServer(
        KmipSettings(settings.kmip_listen, kmip.backend, kmip.max_connections, kmip.idle_timeout),
        tls,
        tenants,
        view,
        store,
        lambda tenant: view(tenant).audited,
    )


def _serve_kmip_alone(
    kmip: KmipServer,
    ks: Keystore,
    tenants: TenantStore,
    ready: Callable[[list[str]], None] | None,
) -> None:
    """KMIP without the HTTP service: until SIGTERM or SIGINT, then lock up as `serve` does."""
    import signal

    def stop(_sig: int, _frame: object) -> None:
        kmip.shutdown()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        host, port = kmip.address
        if ready is not None:
            ready([f"kmip://{host}:{port}"])
        log.info("strongroom KMIP listening on %s:%d", host, port)
        kmip.serve_forever()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        kmip.close(30.0)
        kmip.store.close()
        tenants.close()
        ks.close()


FD_RESERVE = 128
"""File descriptors kept back from connections: the keystore's own files, devices, logs."""


def _connection_budget() -> int:
    """The default total cap: raise the soft RLIMIT_NOFILE to the hard one where allowed,
    and leave FD_RESERVE descriptors for everything else, so that accept() never runs out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return max(16, soft - FD_RESERVE)


async def _serve(
    app: App,
    settings: ServerConfig,
    ready: Callable[[list[str]], None] | None,
    kmip: KmipServer | None = None,
    lease: Lease | None = None,
) -> None:
    import uvicorn

    servers: list[Any] = []
    where: list[str] = []
    limits = _ConnectionLimits(
        settings.max_connections or _connection_budget(), settings.max_connections_per_peer
    )
    protocol = _protocol_class(settings, limits)  # one class: the caps span both listeners
    common: dict[str, Any] = {
        "lifespan": "off",
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "timeout_keep_alive": settings.keepalive_timeout,
        "server_header": False,
        "date_header": False,
        "limit_concurrency": limits.total + 1024,  # ours refuses first, with a clearer answer
    }
    loop_name = "uvloop" if _has("uvloop") else "asyncio"
    sockets: list[tuple[Any, socket.socket]] = []
    try:
        if settings.socket is not None:
            sock = bind_unix_socket(settings.socket, settings.socket_mode, settings.socket_group)
            cfg = uvicorn.Config(app, loop=loop_name, http=protocol, **common)
            sockets.append((uvicorn.Server(cfg), sock))
            where.append(f"unix:{settings.socket}")
        if settings.listen is not None:
            host, port = settings.listen
            ctx = tls_context(settings)
            tcp = socket.create_server((host, port), reuse_port=False, backlog=1024)
            tcp.setblocking(False)
            real_port = tcp.getsockname()[1]
            cfg = uvicorn.Config(
                app,
                loop=loop_name,
                http=protocol,
                ssl_context_factory=lambda _config, _default: ctx,
                **common,
            )
            sockets.append((uvicorn.Server(cfg), tcp))
            where.append(f"https://{host}:{real_port}")
        servers.extend(server for server, _ in sockets)
        stop = asyncio.Event()

        def on_signal() -> None:
            stop.set()

        import signal

        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
        tasks = [asyncio.create_task(_run_server(server, sock)) for server, sock in sockets]
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                for t in tasks:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
            await asyncio.sleep(0.01)
        if lease is not None:  # a shared store: the jobs of one node at a time
            tasks.append(asyncio.create_task(_singleton_jobs(app, lease, settings)))
        elif settings.audit_checkpoint_seconds > 0:
            tasks.append(asyncio.create_task(_checkpoints(app, settings.audit_checkpoint_seconds)))
        if ready is not None:
            ready(where)
        log.info("strongroom service listening on %s", ", ".join(where))
        await stop.wait()
        for server in servers:
            server.should_exit = True
        if kmip is not None:  # before the keystore closes (app.close, below)
            await asyncio.to_thread(kmip.close, settings.shutdown_timeout)
        for task in tasks[len(servers) :]:  # the checkpoint timer, or the singleton jobs
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for _, sock in sockets:
            sock.close()
        if settings.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(settings.socket)
        app.close()


# The part of what is left of the lease that a round of jobs may use before it stops
# starting work: the rest is margin for the last job's own time and a late renewal.
JOBS_LEASE_FRACTION = 0.5


async def _singleton_jobs(app: App, lease: Lease, settings: ServerConfig) -> None:
    """On a shared store (docs/cluster.md, "Singleton jobs"): every third of the lease time,
    take or renew the lease `jobs` in the database; while this node holds it, it carries
    out the scheduled deletions that are due and signs an audit checkpoint every
    `audit_checkpoint_seconds` when the chain's last record is not one. A round of jobs
    starts no new work once past half of the lease time left when it was renewed
    (`JOBS_LEASE_FRACTION`), and each deletion's transaction is fenced on the lease row
    (`Lease.fence`): a holder that was slow or frozen past its expiry, or whose lease
    another node took, makes no deletion. A node that stops renewing (killed, frozen, cut
    off from the database) loses the lease when it runs out on the database's clock, and
    the next node to ask takes the jobs over. Taking and losing the lease are audit
    records (`lease_acquired`, `lease_lost`)."""
    holding = False
    last_checkpoint = time.monotonic()

    def note(op: str) -> None:
        try:
            app.ks.audit.record(op, None, "ok", None, None, lease=lease.name, holder=lease.holder)
        except StrongroomError as e:
            log.warning("could not record %s: %s: %s", op, type(e).__name__, e)

    def jobs(grant: Grant) -> None:
        nonlocal last_checkpoint
        stop_at = grant.stop_at(JOBS_LEASE_FRACTION)

        def stop() -> bool:
            return time.monotonic() >= stop_at

        try:
            app.ks.purge_due(fence=lease.fence, stop=stop)
        except LeaseLost as e:  # the next acquire() says whether we still hold it
            log.warning("scheduled deletions stopped: %s", e)
            return
        except StrongroomError as e:  # the next round tries again
            log.warning("scheduled deletions failed: %s: %s", type(e).__name__, e)
        every = settings.audit_checkpoint_seconds
        if every > 0 and time.monotonic() - last_checkpoint >= every and not stop():
            last_checkpoint = time.monotonic()
            try:
                if not _chain_ends_signed(app.ks):
                    app.ks.audit_checkpoint()
            except StrongroomError as e:
                log.warning("periodic audit checkpoint failed: %s: %s", type(e).__name__, e)

    try:
        while True:
            grant: Grant | None
            try:
                grant = await asyncio.to_thread(lease.acquire)
            except StrongroomError as e:  # the database away: we hold nothing we can prove
                log.warning("cannot renew the jobs lease: %s: %s", type(e).__name__, e)
                grant = None
            held = grant is not None
            if held != holding:
                holding = held
                log.info("%s the singleton jobs lease", "took" if held else "lost")
                await asyncio.to_thread(note, "lease_acquired" if held else "lease_lost")
            if grant is not None:
                await asyncio.to_thread(jobs, grant)
            await asyncio.sleep(lease.seconds / 3)
    finally:
        if holding:  # a clean shutdown hands the jobs over at once
            with contextlib.suppress(StrongroomError):
                lease.release()
        lease.close()


def _import_audit(ks: Keystore) -> ImportAudit:
    """The audit records of moving this node's `tenants.sqlite` into the database."""

    def record(operation: str, /, **facts: object) -> None:
        ks.audit.record(operation, None, "ok", None, None, **facts)

    return record


def _chain_ends_signed(ks: Keystore) -> bool:
    """Whether the audit chain's last record is a checkpoint (nothing left to sign)."""
    chain = ks.audit.chain
    if chain is None:
        return ks.audit.pending == 0
    seq, _ = chain.tail()
    last = chain.lines(max(0, seq - 1), 1)
    rec = parse_record(last[0]) if last else None
    return rec is None or rec.get("op") == CHECKPOINT_OP


async def _checkpoints(app: App, every: float) -> None:
    """Sign a checkpoint every `every` seconds while records are pending, so that a cut at
    the log's end loses at most that much unsigned tail (docs/audit.md)."""
    while True:
        await asyncio.sleep(every)
        if app.ks.audit.pending:
            try:
                await asyncio.to_thread(app.ks.audit_checkpoint)
            except StrongroomError as e:  # the records stand; the next round tries again
                log.warning("periodic audit checkpoint failed: %s: %s", type(e).__name__, e)


async def _run_server(server: Any, sock: socket.socket) -> None:
    """uvicorn's Server.serve on our own socket, without its own signal handling."""
    config = server.config
    if not config.loaded:
        config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    if server.should_exit:
        return
    await server.main_loop()
    await server.shutdown(sockets=[sock])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


__all__ = ["bind_unix_socket", "serve", "tls_context"]
