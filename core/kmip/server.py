"""The KMIP listener: TCP with TLS 1.2+ and mutual TLS, one thread per connection.

The client's certificate names its identity (`tenant cert`, as the HTTP service does); a
certificate that is not enrolled, or an admin's, is refused at the first message; the
certificate is checked again before every message, so an identity revoked (or its policies
changed) while a connection is open is refused from its next message on. Each
message is framed by its 8-byte header; one over `limits.max_bytes` closes the connection,
a bad message inside a frame gets a KMIP error response. A connection idle longer than
`idle_timeout` closes; past `max_connections` a new one is closed at accept. Nothing a
client sends can stop the server or touch another connection.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..api import KeyAPI
from ..audit import current_principal
from ..errors import AuthenticationFailed, KmipMessageError
from ..service.tenants import Identity, Permission, TenantStore
from . import ttlv
from .operations import Access, Auditor, Session
from .store import ObjectStore

log = logging.getLogger("strongroom.kmip")
DEFAULT_PORT = 5696


@dataclass(frozen=True)
class KmipSettings:
    listen: tuple[str, int]
    backend: str | None = None
    max_connections: int = 256
    idle_timeout: float = 120.0
    limits: ttlv.Limits = ttlv.DEFAULT_LIMITS


class KmipServer:
    """Serves KMIP on `settings.listen` until `shutdown()`."""

    def __init__(
        self,
        settings: KmipSettings,
        tls: ssl.SSLContext,
        tenants: TenantStore,
        view: Callable[[str], KeyAPI],
        store: ObjectStore,
        audited: Callable[[str], Auditor],
    ) -> None:
        """`view(tenant)` is the tenant's KeyAPI; `audited(tenant)` records in the same audit
        log what KMIP does without a KeyAPI call (public keys, certificates)."""
        if tls.verify_mode != ssl.CERT_REQUIRED:
            raise AuthenticationFailed("KMIP is served only with mutual TLS (tls_client_ca)")
        self.settings, self.tls, self.tenants, self.view, self.store = (
            settings,
            tls,
            tenants,
            view,
            store,
        )
        self.audited = audited
        host, port = settings.listen
        self._sock = socket.create_server((host, port), backlog=128)
        self.address = self._sock.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self._stopping = threading.Event()
        self._open: dict[socket.socket, threading.Thread] = {}
        """Each connection being served, and its thread (for a clean close)."""
        self._open_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            for fd, _ in poller.poll():
                if fd == self._wake_r.fileno():
                    return
                try:
                    conn, _addr = self._sock.accept()
                except OSError as e:
                    log.warning("cannot accept a KMIP client now: %s", e.strerror)
                    continue
                if not self._slots.acquire(blocking=False):
                    log.warning("too many KMIP clients: one refused")
                    conn.close()
                    continue
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="kmip-client", daemon=True
                )
                with self._open_lock:
                    self._open[conn] = thread
                try:
                    thread.start()
                except RuntimeError:
                    with self._open_lock:
                        del self._open[conn]
                    self._slots.release()
                    conn.close()

    def shutdown(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let each connection finish the message it is answering (up to
        `timeout` seconds in all), then close: the keystore may be closed after this."""
        self.shutdown()
        self._sock.close()
        with self._open_lock:
            open_now = list(self._open.items())
        for conn, _thread in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # the next read ends; an answer in flight is sent
        for _conn, thread in open_now:
            thread.join(timeout / max(1, len(open_now)))
        self._wake_r.close()
        self._wake_w.close()

    # -- one connection ------------------------------------------------------------------------
    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(self.settings.idle_timeout)
            with self.tls.wrap_socket(raw, server_side=True) as conn:
                der = conn.getpeercert(binary_form=True)
                if der is None:
                    return
                opened = self._session(der)
                if opened is None:
                    return
                session, identity = opened
                token = current_principal.set(session.access.principal)
                try:
                    while not self._stopping.is_set():
                        message = self._read(conn)
                        if message is None:
                            return
                        if not self._still(der, identity):
                            return
                        conn.sendall(session.handle(message, self.settings.limits))
                finally:
                    current_principal.reset(token)
        except (OSError, ssl.SSLError, KmipMessageError) as e:  # gone, too slow, or unframeable
            log.info("closed a KMIP connection: %s", type(e).__name__)
        finally:
            with contextlib.suppress(OSError):
                raw.close()
            with self._open_lock:
                self._open.pop(raw, None)
            self._slots.release()

    def _still(self, der: bytes, identity: Identity) -> bool:
        """Whether the certificate still names `identity`, checked before each message: one
        change-stamp query, and the tenant store drops its cached identities and policies
        when any process or node changed them, so a revoked identity or permission is
        refused from the next message on, on an open connection as on a new one."""
        try:
            now = self.tenants.authenticate_certificate(der)
        except AuthenticationFailed:
            log.warning("closed a KMIP connection: its certificate was revoked")
            return False
        if now != identity:
            log.warning("closed a KMIP connection: its certificate names another identity now")
            return False
        return True

    def _session(self, der: bytes) -> tuple[Session, Identity] | None:
        try:
            identity = self.tenants.authenticate_certificate(der)
        except AuthenticationFailed:
            log.warning("refused a KMIP client: its certificate is not enrolled")
            return None
        tenant = identity.tenant
        if tenant is None:
            log.warning("refused a KMIP client: an admin holds no keys")
            return None
        access = Access(
            tenant,
            identity.principal,
            self._may(identity),
            lambda permission: self.tenants.may(identity, Permission(permission)),
        )
        session = Session(
            self.view(tenant), self.store, access, self.settings.backend, self.audited(tenant)
        )
        return session, identity

    def _may(self, identity: Identity) -> Callable[[str, str], bool]:
        def may(permission: str, uid: str) -> bool:
            return Permission(permission) in self.tenants.permissions_on(identity, uid)

        return may

    def _read(self, conn: ssl.SSLSocket) -> bytes | None:
        """One framed message; None at a clean end of the connection."""
        head = _recv_exact(conn, ttlv.HEADER, allow_eof=True)
        if head is None:
            return None
        length = ttlv.message_length(head)
        if length > self.settings.limits.max_bytes:
            raise KmipMessageError("a KMIP message is over the size limit")
        body = _recv_exact(conn, length - ttlv.HEADER, allow_eof=False)
        assert body is not None
        return head + body


def _recv_exact(conn: ssl.SSLSocket, n: int, *, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 65536))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise KmipMessageError("the connection ended inside a message")
        buf += chunk
    return bytes(buf)


def kmip_tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """TLS 1.2+, a client certificate required and checked against `client_ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


__all__ = ["DEFAULT_PORT", "KmipServer", "KmipSettings", "kmip_tls_context"]
