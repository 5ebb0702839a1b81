"""`strongroom serve --kmip-only`: KMIP without the HTTP service, with its connection cap and
idle timeout, and what it keeps across a restart."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator

import pytest
from conftest import STRONGROOM_BIN
from kmip_support import (
    CREATE_AES,
    KmipService,
    exchange,
    ok,
    request,
    results,
    run_kmip,
    start_kmip,
    tls,
)
from server_support import Pki, make_pki, service_env

from strongroom.kmip.tags import ObjectType, Operation, Tag
from strongroom.kmip.ttlv import Item, Type

CAP = 2


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kmip-alone-pki"))


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[KmipService]:
    svc = start_kmip(
        tmp_path_factory.mktemp("kmip-alone"),
        pki,
        "read,generate,manage,delete,encrypt,decrypt",
        extra=f"\n[kmip]\nmax_connections = {CAP}\nidle_timeout = 1.0\n",
        args=("--kmip-only",),
    )
    yield svc
    assert svc.stop() == 0


def closed(conn: ssl.SSLSocket) -> bool:
    """Whether the server closed the connection (a 30-second bound on a hang, not a timing)."""
    conn.settimeout(30)
    try:
        return conn.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True


def test_it_serves_kmip_alone(alone: KmipService) -> None:
    assert "kmip://" in alone.banner and "unix:" not in alone.banner
    assert "https://" not in alone.banner
    assert not (alone.config.parent / "serve.sock").exists()


def test_connections_over_the_cap_are_closed(alone: KmipService, pki: Pki) -> None:
    held = [tls(alone, pki) for _ in range(CAP)]
    try:
        for conn in held:  # each one served, so each one counted
            ok(results(exchange(conn, request((Operation.DISCOVER_VERSIONS, []))))[0])
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            extra = tls(alone, pki)
            extra.sendall(request((Operation.DISCOVER_VERSIONS, [])))
            if closed(extra):
                raise ConnectionError("closed at accept")
    finally:
        for conn in held:
            conn.close()


def test_an_idle_connection_is_closed(alone: KmipService, pki: Pki) -> None:
    with tls(alone, pki) as conn:
        ok(results(exchange(conn, request((Operation.DISCOVER_VERSIONS, []))))[0])
        assert closed(conn)  # idle_timeout = 1 s: the server ends it, we only wait


def test_objects_outlive_a_restart(alone: KmipService, pki: Pki) -> None:
    with tls(alone, pki) as conn:
        uid = ok(results(exchange(conn, request((Operation.CREATE, CREATE_AES))))[0]).text_of(
            Tag.UNIQUE_IDENTIFIER
        )
    assert alone.stop() == 0
    again = run_kmip(alone.config, ("--kmip-only",))
    alone.process, alone.port = again.process, again.port
    by_type = [
        Item(
            Tag.ATTRIBUTE,
            Type.STRUCTURE,
            [
                Item(Tag.ATTRIBUTE_NAME, Type.TEXT_STRING, "Object Type"),
                Item(Tag.ATTRIBUTE_VALUE, Type.ENUMERATION, ObjectType.SYMMETRIC_KEY),
            ],
        )
    ]
    with tls(alone, pki) as conn:
        found = ok(results(exchange(conn, request((Operation.LOCATE, by_type))))[0])
    assert uid in [i.value for i in found.all(Tag.UNIQUE_IDENTIFIER)]


def test_kmip_only_refuses_http_options(alone: KmipService) -> None:
    done = subprocess.run(
        [
            str(STRONGROOM_BIN),
            "--config",
            str(alone.config),
            "serve",
            "--kmip-only",
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        env=service_env(),
        timeout=60,
    )
    assert done.returncode == 2 and "--kmip-only serves no HTTP" in done.stderr
