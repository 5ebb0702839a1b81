"""Slow and greedy clients cannot starve the service (issue 16, defect 1).

Found: `strongroom serve` never timed out a connection that sent part of a request head, so
about RLIMIT_NOFILE such connections, unauthenticated, on TLS or the Unix socket, denied
service to everyone. Now a head and a body each have a deadline (408, then closed), idle
connections close, and open connections are capped per peer and in total (503 at once).
Every wait below is a bound on a hang, not a measurement.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import Pki, Service, make_pki, start_service, write_service_config

PARTIAL_HEAD = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: "
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
PER_PEER = 6


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("limits-pki"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("limits")
    cfg = write_service_config(
        root,
        pki,
        "head_timeout = 1.5\nbody_timeout = 1.5\nkeepalive_timeout = 1.5\n"
        f"max_connections_per_peer = {PER_PEER}\n",
    )
    svc = start_service(cfg)
    yield svc
    svc.stop()


def unix(service: Service) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)  # a bound on a hang: the deadlines are 1.5 s
    s.connect(str(service.socket))
    return s


def answer(s: socket.socket) -> bytes:
    """Everything until the service closes the connection."""
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def healthy(service: Service) -> None:
    with unix(service) as s:
        s.sendall(HEALTH)
        assert answer(s).startswith(b"HTTP/1.1 200"), "a good client is served"


def test_a_partial_head_gets_408_and_the_connection_is_closed(service: Service) -> None:
    with unix(service) as s:
        s.sendall(PARTIAL_HEAD)
        reply = answer(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert b"RequestTimeout" in reply
    healthy(service)


def test_a_silent_connection_and_a_slow_body_are_closed(service: Service) -> None:
    with unix(service) as s:  # sends nothing at all
        assert answer(s).startswith(b"HTTP/1.1 408")
    with unix(service) as s:  # a body that never comes
        s.sendall(
            b"POST /v1/keys HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{"
        )
        reply = answer(s)  # the service may answer (here 401: no token) before the body:
        assert reply.count(b"HTTP/1.1 ") == 1, reply  # then the deadline only closes it
        assert reply.startswith((b"HTTP/1.1 401", b"HTTP/1.1 408")), reply[:80]


def test_an_idle_keep_alive_connection_is_closed(service: Service) -> None:
    with unix(service) as s:
        s.sendall(HEALTH.replace(b"Connection: close\r\n", b""))
        reply = b""
        while b"\r\n\r\n" not in reply:  # the head, then as much body as it announces
            reply += s.recv(4096)
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:])
        while len(body) < int(fields[b"content-length"]):
            body += s.recv(4096)
        assert answer(s) == b"", "closed after keepalive_timeout, with nothing more"


def test_one_peer_cannot_hold_more_than_its_share(service: Service) -> None:
    slow = [unix(service) for _ in range(PER_PEER)]
    try:
        for s in slow:
            s.sendall(PARTIAL_HEAD)
        with unix(service) as extra:  # one more from the same peer (this user id)
            reply = answer(extra)
        assert reply.startswith(b"HTTP/1.1 503"), reply[:80]
        assert b"TooManyConnections" in reply
        for s in slow:  # the deadline frees them, and with them the peer's share
            assert answer(s).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()
    healthy(service)


def test_a_partial_head_over_tls_gets_408(service: Service, pki: Pki) -> None:
    host, port = service.https.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(PARTIAL_HEAD)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_the_limits_are_config_keys(tmp_path: Path) -> None:
    from strongroom import config
    from strongroom.errors import ConfigError

    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nhead_timeout = 0\n")
    with pytest.raises(ConfigError, match="head_timeout"):
        config.load(cfg)
    cfg.write_text("[server]\nmax_connections = 100\nmax_connections_per_peer = 10\n")
    loaded = config.load(cfg).server
    assert (loaded.max_connections, loaded.max_connections_per_peer) == (100, 10)
