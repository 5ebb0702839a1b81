"""`strongroom --server URL pkcs11-server -D`: the command itself, as a client of
`strongroom serve` with a tenant's token, under pkcs11-tool through p11-kit-client.so; the
signature checked by openssl, and the service's audit record naming the tenant."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STRONGROOM_BIN
from server_support import Service, Tenancy, first_line, service_env, tenants_service

import strongroom
from strongroom import algorithms
from strongroom.errors import KeyNotFound

CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
PIN = "5151-test"

pytestmark = pytest.mark.skipif(
    not CLIENT_MODULE.exists(), reason="p11-kit-client.so (p11-kit-modules) is not installed"
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Tenancy]]:
    with tenants_service(tmp_path_factory.mktemp("pkcs11server-service")) as running:
        yield running


def start_server(
    svc: Service, tmp_path: Path, token: str | None, *, pin: bool, allow_destroy: bool = False
) -> tuple[subprocess.Popen[str], str]:
    """`strongroom --server UNIX pkcs11-server -D` with the server's own API token `token`
    (or none), and [pkcs11_server] pin set (or not: then C_Login takes an API token);
    the process and its address, once it is listening."""
    config = tmp_path / "p11.toml"
    config.write_text(
        f'[keystore]\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[pkcs11_server]\nlabel = "acme"\nkeys = ["signing-*"]\n'
        + ('pin = "env:SR_TEST_P11_PIN"\n' if pin else "")
        + ("allow_destroy = true\n" if allow_destroy else "")
    )
    sock = Path(tempfile.mkdtemp(prefix="sr-p11-svc-")) / "p11.sock"
    env = {**service_env(), "SR_TEST_P11_PIN": PIN}
    if token is not None:
        env["STRONGROOM_TOKEN"] = token
    server = subprocess.Popen(
        [str(STRONGROOM_BIN), "--config", str(config), "--server", svc.unix,
         "pkcs11-server", "-D", "--socket", str(sock)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = first_line(server)
    if line is None:
        server.kill()
        pytest.fail("the server did not start")
    address = f"unix:path={sock}"
    assert line == f"P11_KIT_SERVER_ADDRESS={address}; export P11_KIT_SERVER_ADDRESS;\n"
    return server, address


def sign_records(svc: Service) -> list[dict[str, object]]:
    records = [
        json.loads(line)
        for line in (svc.config.parent / "data" / "audit.jsonl").read_text().splitlines()
    ]
    return [r for r in records if r.get("op") == "sign" and r.get("key") == "acme/signing-p256"]


def test_the_server_serves_a_tenants_keys_through_the_service(
    service: tuple[Service, Tenancy], tmp_path: Path
) -> None:
    svc, tenancy = service
    with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
        app.generate("signing-p256", "ecdsa-p256")
        app.generate("other-p256", "ecdsa-p256")  # matches no pattern: never offered
        (tmp_path / "pub.pem").write_bytes(
            algorithms.encode_public(app.public_key("signing-p256"), "pem")
        )
    server, address = start_server(svc, tmp_path, tenancy.acme_signer, pin=True)
    try:
        client_env = {**os.environ, "P11_KIT_SERVER_ADDRESS": address}

        def tool(*args: str) -> str:
            done = subprocess.run(
                ["pkcs11-tool", "--module", str(CLIENT_MODULE), *args],
                env=client_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "token label        : acme" in tool("--list-slots")
        listed = tool("--login", "--pin", PIN, "--list-objects")
        assert "label:      signing-p256" in listed and "other-p256" not in listed
        data = tmp_path / "data.bin"
        data.write_bytes(b"signed through the service\n")
        digest = subprocess.run(
            ["openssl", "dgst", "-sha256", "-binary", str(data)], capture_output=True, check=True
        ).stdout
        (tmp_path / "digest").write_bytes(digest)
        tool("--login", "--pin", PIN, "--sign", "-m", "ECDSA", "--id", b"signing-p256".hex(),
             "-i", "digest", "-o", "sig", "--signature-format", "openssl")  # fmt: skip
        verified = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig",
             str(data)],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr
        # the signer's token may not make keys: the service refuses, the client is told
        made = subprocess.run(
            ["pkcs11-tool", "--module", str(CLIENT_MODULE), "--login", "--pin", PIN,
             "--keypairgen", "--key-type", "EC:prime256v1", "--label", "signing-new"],
            env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert made.returncode != 0
        assert "CKR_" in made.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    signs = sign_records(svc)
    assert signs and signs[-1]["result"] == "ok", signs[-1:]
    assert signs[-1]["actor"] == "acme:signer"  # the tenant's identity acted
    assert signs[-1]["prehashed"] is True  # CKM_ECDSA signs the client's digest


def test_the_pin_is_a_tenants_api_token(service: tuple[Service, Tenancy], tmp_path: Path) -> None:
    """Without [pkcs11_server] pin and without a token of its own, the server shows nothing
    before C_Login; C_Login's PIN is an API token, a client of the service is opened with
    it, and that token's tenant and policy decide what the application sees and does."""
    svc, tenancy = service
    with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
        if all(info.name != "signing-p256" for info in app.keys()):
            app.generate("signing-p256", "ecdsa-p256")
        (tmp_path / "pub.pem").write_bytes(
            algorithms.encode_public(app.public_key("signing-p256"), "pem")
        )
    server, address = start_server(svc, tmp_path, None, pin=False)
    client_env = {**os.environ, "P11_KIT_SERVER_ADDRESS": address}

    def tool(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["pkcs11-tool", "--module", str(CLIENT_MODULE), *args],
            env=client_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    try:
        assert "signing-p256" not in tool("--list-objects").stdout  # nothing before login
        listed = tool("--login", "--pin", tenancy.acme_signer, "--list-objects").stdout
        assert "label:      signing-p256" in listed and "Private Key Object" in listed
        wrong = tool("--login", "--pin", "not-a-token", "--list-objects", ok=False)
        assert wrong.returncode != 0 and "CKR_PIN_INCORRECT" in wrong.stderr
        # another tenant's token sees its own namespace: no acme key
        other = tool("--login", "--pin", tenancy.globex_app, "--list-objects").stdout
        assert "signing-p256" not in other
        (tmp_path / "digest").write_bytes(b"\x05" * 32)
        tool("--login", "--pin", tenancy.acme_signer, "--sign", "-m", "ECDSA",
             "--id", b"signing-p256".hex(), "-i", "digest", "-o", "sig",
             "--signature-format", "openssl")  # fmt: skip
        verified = subprocess.run(
            ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-in", "digest",
             "-sigfile", "sig"],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.stderr is not None
    log = server.stderr.read()
    assert tenancy.acme_signer not in log and tenancy.globex_app not in log
    signs = sign_records(svc)
    assert signs[-1]["actor"] == "acme:signer" and signs[-1]["result"] == "ok"


def test_a_logout_ends_the_tenants_object_handles(service: tuple[Service, Tenancy]) -> None:
    """Tenant A logs in and finds its objects, logs out, and tenant B logs in on the same
    connection: A's handles are CKR_OBJECT_HANDLE_INVALID to B, private and public alike,
    and B's own search does not return them."""
    import struct

    from strongroom.pkcs11server import Connection, Settings, TokenSpec, ck, wire

    svc, tenancy = service
    with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
        if all(info.name != "signing-p256" for info in app.keys()):
            app.generate("signing-p256", "ecdsa-p256")
    with strongroom.connect(svc.unix, token=tenancy.globex_app) as globex:
        assert not [i for i in globex.keys() if i.name.startswith("signing-")]

    def u(v: int) -> bytes:
        return struct.pack(">Q", v)

    def ay(data: bytes) -> bytes:
        return b"\x01" + wire.byte_array(data)

    def rv(reply: bytes) -> int:
        return 0 if reply[:4] != b"\0\0\0\0" else int(struct.unpack(">Q", reply[-8:])[0])

    def found(conn: Connection) -> tuple[int, ...]:
        assert rv(conn.handle(wire.request("C_FindObjectsInit", u(1), struct.pack(">I", 0)))) == 0
        reply = conn.handle(wire.request("C_FindObjects", u(1), struct.pack(">I", 16)))
        conn.handle(wire.request("C_FindObjectsFinal", u(1)))
        count = struct.unpack(">I", reply[11:15])[0]
        return struct.unpack(f">{count}Q", reply[15:])

    settings = Settings(
        (TokenSpec("acme", ("signing-*",)),),
        login=lambda token: strongroom.connect(svc.unix, token=token),
    )
    conn = Connection(None, settings, 2)
    try:
        for body in (
            wire.request("C_Initialize", ay(wire.HANDSHAKE), b"\x00", ay(b"")),
            wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)),
            wire.request("C_Login", u(1), u(ck.CKU_USER), ay(tenancy.acme_signer.encode())),
        ):
            assert rv(conn.handle(body)) == 0
        handles = found(conn)
        assert len(handles) == 2  # signing-p256's private and public objects
        assert rv(conn.handle(wire.request("C_Logout", u(1)))) == 0
        login = wire.request("C_Login", u(1), u(ck.CKU_USER), ay(tenancy.globex_app.encode()))
        assert rv(conn.handle(login)) == 0
        query = struct.pack(">I", 1) + struct.pack(">II", ck.CKA_LABEL, 64)
        for handle in handles:
            reply = conn.handle(wire.request("C_GetAttributeValue", u(1), u(handle), query))
            assert rv(reply) == ck.CKR_OBJECT_HANDLE_INVALID
        assert not set(found(conn)) & set(handles)
    finally:
        conn.close()


def test_allow_destroy_reaches_the_command(
    service: tuple[Service, Tenancy], tmp_path: Path
) -> None:
    """`[pkcs11_server] allow_destroy` through `strongroom pkcs11-server`: without it
    --delete-object is refused and the key stays; with it the tenant's key is deleted
    through the service (which has no deletion_wait: at once)."""
    svc, tenancy = service
    with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
        app.generate("signing-doomed", "ecdsa-p256")
    client_env = {**os.environ, "P11_KIT_SERVER_ADDRESS": ""}
    delete = ["pkcs11-tool", "--module", str(CLIENT_MODULE), "--login", "--pin",
              tenancy.acme_app, "--delete-object", "--type", "privkey", "--label",
              "signing-doomed"]  # fmt: skip
    for allow in (False, True):
        server, address = start_server(svc, tmp_path, None, pin=False, allow_destroy=allow)
        try:
            client_env["P11_KIT_SERVER_ADDRESS"] = address
            done = subprocess.run(delete, env=client_env, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
        assert (done.returncode == 0) == allow, done.stderr
        with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
            if allow:
                with pytest.raises(KeyNotFound):
                    app.info("signing-doomed")
            else:
                assert app.info("signing-doomed").delete_after is None
