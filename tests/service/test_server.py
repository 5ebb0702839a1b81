"""The key custody service (`strongroom serve`), tested through its real stack: uvicorn in
its own process, httpx clients (`strongroom.connect`) on the Unix socket and on TLS over
loopback, and the `strongroom` CLI with --server.

The backend contract runs through `connect()` on both transports. Tenant isolation is
attempted as a hostile tenant would; policy denials, the audit trail, limits and malformed
requests, mutual TLS, a 2-process load test and graceful shutdown follow.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import multiprocessing
import os
import re
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    openssl_verify,
    run_strongroom,
    write_vault_config,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from server_support import (
    Pki,
    Service,
    Tenancy,
    init_service_data,
    make_pki,
    service_env,
    start_service,
    unix_client,
    wait_gone,
    write_service_config,
)

import strongroom
from strongroom.api import KeyAPI
from strongroom.audit import verify_log
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DataFormatError,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
    VersionRetired,
)
from strongroom.keystore import Keystore
from strongroom.service import wire
from strongroom.service.app import App
from strongroom.service.client import RemoteKeystore, VaultLocked
from strongroom.service.tenants import (
    NotPermitted,
    Permission,
    TenantStore,
    parse_permissions,
)
from strongroom.testing import BackendContract

DATA = b"custody service test data"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Pki, Tenancy]]:
    directory = tmp_path_factory.mktemp("serve")
    pki = make_pki(directory / "pki")
    config = write_service_config(directory, pki)
    tenancy = init_service_data(config, pki)
    service = start_service(config)
    try:
        yield service, pki, tenancy
    finally:
        code = service.stop()
        assert code == 0, "".join(service.stderr_lines)


@pytest.fixture(scope="module")
def service(env: tuple[Service, Pki, Tenancy]) -> Service:
    return env[0]


@pytest.fixture(scope="module")
def pki(env: tuple[Service, Pki, Tenancy]) -> Pki:
    return env[1]


@pytest.fixture(scope="module")
def tokens(env: tuple[Service, Pki, Tenancy]) -> Tenancy:
    return env[2]


def remote(service: Service, token: str | None) -> RemoteKeystore:
    return strongroom.connect(service.unix, token=token)


# -- the contract, on both transports -----------------------------------------------------------
class TestContractOverUnixSocket(BackendContract):
    @pytest.fixture
    def keystore(self, service: Service, tokens: Tenancy) -> Iterator[KeyAPI]:
        with remote(service, tokens.acme_app) as ks:
            yield ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "vault"


class TestContractOverTls(BackendContract):
    @pytest.fixture
    def keystore(self, service: Service, pki: Pki, tokens: Tenancy) -> Iterator[KeyAPI]:
        with strongroom.connect(service.https, token=tokens.globex_app, ca=pki.ca) as ks:
            yield ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "vault"


def test_socket_is_private_and_tcp_is_tls_only(service: Service, pki: Pki) -> None:
    assert stat.S_IMODE(os.stat(service.socket).st_mode) == 0o600
    assert service.https.startswith("https://127.0.0.1:")
    plain = service.https.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plaintext HTTP on the TLS port
        httpx.get(plain + "/v1/health", timeout=5)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    r = httpx.get(service.https + "/v1/health", verify=ctx, timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- mutual TLS ---------------------------------------------------------------------------------
def test_client_certificate_identifies_the_caller(service: Service, pki: Pki) -> None:
    with strongroom.connect(
        service.https, ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
    ) as ks:
        who = ks.whoami()
        assert (who["tenant"], who["name"]) == ("acme", "cert-app")
        ks.generate("mtls-key", "ecdsa-p256")
        ks.verify("mtls-key", DATA, ks.sign("mtls-key", DATA))
    # signed by the CA but never enrolled: no identity
    with (
        strongroom.connect(
            service.https, ca=pki.ca, client_cert=pki.stranger_cert, client_key=pki.stranger_key
        ) as ks,
        pytest.raises(AuthenticationFailed, match="not enrolled"),
    ):
        ks.whoami()
    # not signed by the CA: the handshake itself fails
    with (
        strongroom.connect(
            service.https, ca=pki.ca, client_cert=pki.rogue_cert, client_key=pki.rogue_key
        ) as ks,
        pytest.raises(BackendUnavailable),
    ):
        ks.whoami()


# -- tenants ------------------------------------------------------------------------------------
def raw_client(service: Service, token: str) -> httpx.Client:
    return unix_client(service, token, timeout=30)


def test_tenants_cannot_use_list_or_detect_each_others_keys(
    service: Service, tokens: Tenancy
) -> None:
    with remote(service, tokens.acme_app) as acme, remote(service, tokens.globex_app) as globex:
        acme.generate("acme-secret", "ed25519")
        acme_sig = acme.sign("acme-secret", DATA)
        assert "acme-secret" not in {k.name for k in globex.keys()}
        for attempt in (
            lambda: globex.info("acme-secret"),
            lambda: globex.sign("acme-secret", DATA),
            lambda: globex.verify("acme-secret", DATA, acme_sig),
            lambda: globex.public_key("acme-secret"),
            lambda: globex.delete("acme-secret"),
            lambda: globex.encrypt("acme-secret", DATA),
        ):
            with pytest.raises(KeyNotFound):
                attempt()
        # a name of its own does not collide with acme's, and is a different key
        globex.generate("acme-secret", "ed25519")
        own = globex.public_key("acme-secret").public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        theirs = acme.public_key("acme-secret").public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert own != theirs
        globex.delete("acme-secret")
        acme.verify("acme-secret", DATA, acme_sig)  # untouched

    # probing by hand: every answer for "theirs" is byte-identical to "absent"
    with raw_client(service, tokens.globex_app) as c:

        def probe(name: str, op: str = "sign") -> tuple[int, bytes]:
            r = c.post(f"/v1/keys/{name}/{op}", json={"data": base64.b64encode(DATA).decode()})
            return r.status_code, r.content

        absent = probe("never-existed")
        assert absent[0] == 404
        for name in (
            "acme-secret",
            "acme%2Facme-secret",
            "..%2Facme%2Facme-secret",
            "%2E%2E%2Facme%2Facme-secret",
        ):
            assert probe(name) == absent, name
        assert c.get("/v1/keys/acme-secret").content == c.get("/v1/keys/never-existed").content
        # a namespace in the body is not a way in
        r = c.post("/v1/keys", json={"name": "ns-try", "type": "ed25519", "namespace": "acme"})
        assert r.status_code == 201 and r.json()["namespace"] == "globex"


def test_policies_deny_by_default(service: Service, tokens: Tenancy) -> None:
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        app.generate("signing-1", "ecdsa-p256")
        app.generate("other-key", "ed25519")
        app.generate("signing-aes", "aes-256")
        sig = signer.sign("signing-1", DATA)
        signer.verify("signing-1", DATA, sig)
        assert {k.name for k in signer.keys()} <= {
            n for n in (k.name for k in app.keys()) if n.startswith("signing-")
        }
        assert "other-key" not in {k.name for k in signer.keys()}
        ct = app.encrypt("signing-aes", DATA)
        with pytest.raises(NotPermitted, match="may not decrypt"):
            signer.decrypt("signing-aes", ct)
        with pytest.raises(NotPermitted, match="may not generate"):
            signer.generate("signing-new", "ed25519")
        with pytest.raises(NotPermitted, match="may not generate"):  # not "no such key"
            signer.generate("elsewhere", "ed25519")
        with pytest.raises(NotPermitted, match="may not delete"):
            signer.delete("signing-1")
        with pytest.raises(NotPermitted):
            signer.random(16)
        # no permission at all on the name: the same answer as an absent key
        with pytest.raises(KeyNotFound):
            signer.sign("other-key", DATA)
        with pytest.raises(KeyNotFound):
            signer.info("other-key")
        for admin_call in (signer.tenants, signer.vault_status, signer.audit_verify):
            with pytest.raises(NotPermitted, match="admin"):
                admin_call()
        assert isinstance(NotPermitted("x"), PolicyViolation)
    with remote(service, tokens.admin) as admin, pytest.raises(NotPermitted, match="no keys"):
        admin.sign("signing-1", DATA)
    with remote(service, tokens.admin) as admin, pytest.raises(NotPermitted, match="no keys"):
        admin.namespace  # the property asks the service who the caller is


def test_tokens_bad_missing_and_revoked(service: Service, tokens: Tenancy) -> None:
    for token in (None, "srt_0123456789abcdef_nope", "not-a-token", tokens.acme_app + "x"):
        with remote(service, token) as ks, pytest.raises(AuthenticationFailed):
            ks.keys()
    with remote(service, tokens.admin) as admin:
        admin.create_tenant("shortlived")
        token = admin.issue_token("shortlived", "temp")
        admin.grant("shortlived", "temp", "*", ["generate", "read"])
        with remote(service, token) as temp:
            temp.generate("t", "ed25519")
            admin.revoke_identity("shortlived", "temp")
            with pytest.raises(AuthenticationFailed):
                temp.keys()
        assert "shortlived" in {t["name"] for t in admin.tenants()}


def test_admin_locks_and_unlocks_the_vault(service: Service, tokens: Tenancy) -> None:
    with remote(service, tokens.admin) as admin, remote(service, tokens.acme_app) as app:
        app.generate("lock-test", "ed25519")
        admin.vault_lock()
        try:
            assert admin.vault_status()["sealed_by_service"] is True
            with pytest.raises(VaultLocked):
                app.sign("lock-test", DATA)
        finally:
            assert admin.vault_unlock() != ""
        app.verify("lock-test", DATA, app.sign("lock-test", DATA))


# -- audit --------------------------------------------------------------------------------------
def audit_path(service: Service) -> Path:
    return service.config.parent / "data" / "audit.jsonl"


def test_every_use_is_audited_with_the_caller_and_tamper_is_detected(
    service: Service, tokens: Tenancy, tmp_path: Path
) -> None:
    with remote(service, tokens.acme_app) as app:
        app.generate("audited", "ed25519")
        app.sign("audited", b"secret input that must not be in the log")
    with remote(service, tokens.admin) as admin:
        records = admin.audit_records(limit=10_000)
        report = admin.audit_verify()
    signs = [r for r in records if r.get("op") == "sign" and r.get("key") == "acme/audited"]
    assert signs and signs[-1]["actor"] == "acme:app" and signs[-1]["result"] == "ok"
    assert str(signs[-1]["input"]).startswith("hmac-sha256:")
    assert report["ok"] is True and report["records"] >= len(records)
    text = audit_path(service).read_bytes()
    assert b"secret input" not in text and base64.b64encode(b"secret input") not in text

    # an edited, a deleted and a reordered record, each named by `strongroom audit verify`
    lines = text.splitlines(keepends=True)
    idx = next(i for i, line in enumerate(lines) if b'"acme/audited"' in line)
    edited = lines.copy()
    edited[idx] = edited[idx].replace(b'"acme:app"', b'"acme:eve"')
    deleted = lines[:idx] + lines[idx + 1 :]
    swapped = lines.copy()
    swapped[idx], swapped[idx + 1] = swapped[idx + 1], swapped[idx]
    for label, content in (("edited", edited), ("deleted", deleted), ("swapped", swapped)):
        copy = tmp_path / f"{label}.jsonl"
        copy.write_bytes(b"".join(content))
        assert not verify_log(copy).ok, label
        r = subprocess.run(
            [
                str(STRONGROOM_BIN),
                "--config",
                str(service.config),
                "audit",
                "verify",
                "--file",
                str(copy),
            ],
            capture_output=True,
            text=True,
            env=service_env(),
            timeout=60,
        )
        assert r.returncode == 9, (label, r.stderr)
        assert f"line {idx + 1}" in r.stderr or f"line {idx + 1}" in r.stdout, (label, r.stderr)


# -- in-process: limits, malformed requests, an audit log that cannot be written ----------------
def asgi_call(
    app: App,
    method: str,
    path: str,
    body: bytes = b"",
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
) -> tuple[int, Any]:
    """One request through the ASGI interface, as uvicorn makes it."""
    sent: list[dict[str, Any]] = []
    hdrs = list(headers or [])
    if token is not None:
        hdrs.append((b"authorization", b"Bearer " + token.encode()))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": hdrs,
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            await asyncio.sleep(3600)
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(sent[1]["body"])


@pytest.fixture
def inprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[App, str]]:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    config = write_vault_config(tmp_path)
    cfg = strongroom.config.load(config)
    cfg.server.rate_limit = 50.0
    cfg.server.rate_burst = 5
    cfg.server.max_request_bytes = 4096
    ks = Keystore(cfg)
    ks.vault_control().initialize()
    store = TenantStore(cfg.data_dir / "tenants.sqlite")
    store.create_tenant("acme")
    token = store.issue_token("acme", "app")
    store.grant("acme", "app", "*", [Permission.SIGN, Permission.GENERATE, Permission.READ])
    app = App(ks, store, cfg.server)
    try:
        yield app, token
    finally:
        app.close()


def test_malformed_requests_get_a_clear_4xx(inprocess: tuple[App, str]) -> None:
    app, token = inprocess
    app.limiter.rate = 0  # this test is about the bodies
    body = json.dumps({"name": "k", "type": "ed25519"}).encode()
    assert asgi_call(app, "POST", "/v1/keys", body, token)[0] == 201
    cases = [
        ("POST", "/v1/keys/k/sign", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/keys/k/sign", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/keys/k/sign", b'{"data": 5}', 400, "base64"),
        ("POST", "/v1/keys/k/sign", b'{"data": "%%%"}', 400, "base64"),
        ("POST", "/v1/keys/k/sign", b'{"data": "", "algorithm": 7}', 400, "string"),
        ("POST", "/v1/keys/k/sign", b'{"data": "", "envelope": "yes"}', 400, "true or false"),
        ("POST", "/v1/keys", b'{"name": "x", "type": "quantum"}', 400, "unknown key type"),
        ("POST", "/v1/keys", b'{"name": "x"}', 400, "type is required"),
        ("POST", "/v1/keys", b'{"name": "x", "type": "ed25519", "usage": "sign"}', 400, "list"),
        ("POST", "/v1/random", b'{"n": -1}', 403, "random"),
        ("PUT", "/v1/keys/k", b"", 405, "not allowed"),
        ("GET", "/v1/nothing-here", b"", 404, "no such endpoint"),
        ("POST", "/v1/keys/k/sign", b"[" * 100_000, 413, "limited"),
        ("POST", "/v1/keys/k/sign", b"[" * 4000, 400, "not valid JSON"),
    ]
    for method, path, raw, status, words in cases:
        got, payload = asgi_call(app, method, path, raw, token)
        assert got == status, (method, path, raw[:40], payload)
        assert words in payload["error"]["message"], payload
        assert "Traceback" not in json.dumps(payload)
    got, payload = asgi_call(
        app, "POST", "/v1/keys/k/sign", b"{}", token, headers=[(b"content-length", b"999999")]
    )
    assert got == 413
    got, payload = asgi_call(app, "GET", "/v1/keys/k/public", token=token, query=b"format=xml")
    assert got == 400


def test_rate_limit_is_per_identity(inprocess: tuple[App, str]) -> None:
    app, token = inprocess
    # One request per 1000 s: however slow the machine, the bucket cannot refill during the
    # burst (at 50/s a loaded machine taking 20 ms a call refilled it and never said 429).
    app.limiter.rate = 0.001
    statuses = [asgi_call(app, "GET", "/v1/keys", token=token)[0] for _ in range(12)]
    assert statuses == [200] * 5 + [429] * 7
    store: TenantStore = app.tenants
    other = store.issue_token("acme", "other")
    store.grant("acme", "other", "*", [Permission.READ])
    assert asgi_call(app, "GET", "/v1/keys", token=other)[0] == 200  # its own bucket
    app.limiter.rate = 50.0
    time.sleep(0.2)  # at least 0.2 s at 50/s: the bucket is full again
    assert asgi_call(app, "GET", "/v1/keys", token=token)[0] == 200


def test_an_unwritable_audit_log_refuses_the_operation(inprocess: tuple[App, str]) -> None:
    app, token = inprocess
    app.limiter.rate = 0
    body = json.dumps({"name": "k", "type": "ed25519"}).encode()
    assert asgi_call(app, "POST", "/v1/keys", body, token)[0] == 201
    app.ks.audit.close()  # the log is gone: nothing may run unrecorded
    status, payload = asgi_call(
        app, "POST", "/v1/keys/k/sign", json.dumps({"data": "aGk="}).encode(), token
    )
    assert status == 503 and payload["error"]["type"] == "AuditUnavailable"
    assert "signature" not in payload
    assert "/" not in payload["error"]["message"]  # no server path for a tenant


def test_tenants_see_no_server_details_and_reads_are_audited(
    service: Service, tokens: Tenancy
) -> None:
    with remote(service, tokens.acme_app) as app:
        assert all(not b.details for b in app.backends())
        app.generate("read-audited", "ed25519")
        app.info("read-audited")
        app.keys()
    with remote(service, tokens.admin) as admin:
        assert any(b.details for b in admin.backends())
        records = admin.audit_records(last=50)
    assert any(r["op"] == "info" and r["key"] == "acme/read-audited" for r in records)
    assert any(r["op"] == "list" and r["actor"] == "acme:app" for r in records)
    with remote(service, tokens.acme_app) as app:
        app.versions("read-audited")
    with remote(service, tokens.admin) as admin:
        records = admin.audit_records(last=20)
    assert any(r["op"] == "versions" and r["key"] == "acme/read-audited" for r in records)


def test_hostile_requests_get_4xx_not_500(service: Service, tokens: Tenancy) -> None:
    import socket as socketlib

    # headers too large: refused with 431 before they are buffered
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.connect(str(service.socket))
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000)
        s.settimeout(10)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 431"), head[:80]
    # found: a whole oversized head that arrived in one read got 200 (119 KB heads); a big
    # header, many small ones, or a long URL, each complete and sent at once
    heads = [
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 119_000 + b"\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 40) for i in range(2000))
        + b"\r\n",
        b"GET /v1/health?" + b"q" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for request in heads:
        with socketlib.socket(socketlib.AF_UNIX) as s:
            s.connect(str(service.socket))
            s.sendall(request)
            s.settimeout(10)
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 431"), head[:80]
    # two Authorization headers: neither counts
    with raw_client(service, tokens.acme_app) as c:
        r = c.get(
            "/v1/keys",
            headers=[
                ("authorization", f"Bearer {tokens.globex_app}"),
                ("authorization", f"Bearer {tokens.acme_app}"),
            ],
        )
        assert r.status_code == 400 and "one Authorization" in r.json()["error"]["message"]
        # a low-order X25519 peer is a bad argument, not a server error
        c.post("/v1/keys", json={"name": "x-peer", "type": "x25519", "usage": ["agree"]})
        r = c.post(
            "/v1/keys/x-peer/agree",
            json={"new_name": "x-out", "peer": base64.b64encode(bytes(32)).decode()},
        )
        assert r.status_code == 400 and "low-order" in r.json()["error"]["message"], r.text
        assert c.request("HEAD", "/v1/health").status_code == 405


def test_a_flood_of_bad_tokens_is_one_audit_record_a_second(service: Service) -> None:
    # Checked against the time the flood took, not against an assumed speed: on a loaded
    # machine 40 requests may take several seconds, and then rightly leave several records.
    time.sleep(1.05)  # a refusal window left open by an earlier test has closed
    skip = len(audit_path(service).read_bytes().splitlines())
    with raw_client(service, "srt_0123456789abcdef_flood") as c:
        start = time.monotonic()
        for _ in range(40):
            assert c.get("/v1/whoami").status_code == 401
        took = time.monotonic() - start
        time.sleep(1.05)
        assert c.get("/v1/whoami").status_code == 401
    flood = [
        json.loads(line)
        for line in audit_path(service).read_bytes().splitlines()[skip:]
        if b'"op":"whoami"' in line and b'"actor":"unauthenticated"' in line
    ]
    # The 40 left at most one record for each second they took (windows start >= 1 s apart),
    # the request after the pause one more, whose `suppressed` counts the rest of the last
    # window: every refusal is one record or counted in the next one. (The first record's
    # `suppressed`, if any, counts refusals from before this test.)
    assert 2 <= len(flood) <= int(took) + 2, (took, flood)
    assert len(flood) + sum(r.get("suppressed", 0) for r in flood[1:]) == 41, flood


def test_refusal_counts_still_pending_are_written_at_shutdown(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = write_service_config(tmp_path, pki)
    init_service_data(config, pki)
    service = start_service(config)
    with raw_client(service, "srt_0123456789abcdef_late") as c:
        for _ in range(5):
            assert c.get("/v1/whoami").status_code == 401
    assert service.stop() == 0
    records = [json.loads(line) for line in audit_path(service).read_bytes().splitlines()]
    late = [r for r in records if r["op"] == "refused_since"]
    assert [(r["actor"], r["result"], r["suppressed"]) for r in late] == [
        ("unauthenticated", "AuthenticationFailed", 4)
    ]
    assert verify_log(audit_path(service)).ok


# -- the CLI through the service ----------------------------------------------------------------
def run(
    args: list[str], token: str | None, *, config: Path | None = None, data: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    env = service_env()
    if token is not None:
        env["STRONGROOM_TOKEN"] = token
    cmd = (["--config", str(config)] if config else []) + args
    return run_strongroom(cmd, input=data, env=env, timeout=120)


def test_cli_uses_the_service(service: Service, tokens: Tenancy, tmp_path: Path) -> None:
    server = ["--server", service.unix]
    r = run([*server, "key", "generate", "cli-key", "--type", "ecdsa-p256"], tokens.acme_app)
    assert r.returncode == 0, r.stderr
    sig = run([*server, "key", "sign", "cli-key"], tokens.acme_app, data=DATA)
    assert sig.returncode == 0, sig.stderr
    (tmp_path / "sig").write_bytes(sig.stdout)
    (tmp_path / "data").write_bytes(DATA)
    pub = run([*server, "key", "public", "cli-key"], tokens.acme_app)
    (tmp_path / "pub.pem").write_bytes(pub.stdout)
    check = openssl_verify("-sha256", tmp_path, "pub.pem", "sig", "data")
    assert check.returncode == 0 and "Verified OK" in check.stdout
    ok = run(
        [*server, "key", "verify", "cli-key", "--signature", str(tmp_path / "sig")],
        tokens.acme_app,
        data=DATA,
    )
    assert ok.returncode == 0, ok.stderr
    bad = run(
        [*server, "key", "verify", "cli-key", "--signature", str(tmp_path / "sig")],
        tokens.acme_app,
        data=DATA + b"!",
    )
    assert bad.returncode == 1
    listed = run([*server, "--json", "key", "list"], tokens.acme_app)
    names = {k["name"] for k in json.loads(listed.stdout)}
    assert "cli-key" in names and all(k["namespace"] == "acme" for k in json.loads(listed.stdout))
    # errors: one line each, with the documented exit codes
    denied = run([*server, "key", "generate", "signing-x", "--type", "ed25519"], tokens.acme_signer)
    assert denied.returncode == 8 and denied.stderr.count(b"\n") == 1, denied.stderr
    missing = run([*server, "key", "sign", "nope"], tokens.acme_app, data=DATA)
    assert missing.returncode == 3 and missing.stderr.count(b"\n") == 1
    unauth = run([*server, "key", "list"], "srt_0000000000000000_bad")
    assert unauth.returncode == 4 and unauth.stderr.count(b"\n") == 1
    elsewhere = run([*server, "key", "trim", "cli-key"], tokens.acme_app)
    assert elsewhere.returncode == 5 and b"not offered through the service" in elsewhere.stderr
    assert elsewhere.stderr.count(b"\n") == 1
    # attest goes to the service, whose vault backend cannot attest: its own refusal
    vault_key = run([*server, "key", "attest", "cli-key"], tokens.acme_app)
    assert vault_key.returncode == 5 and b"backend 'vault'" in vault_key.stderr
    status = run([*server, "--json", "vault", "status"], tokens.admin)
    assert status.returncode == 0 and json.loads(status.stdout)["unlocked"] is True
    gone = run(["--server", f"unix:{tmp_path}/none.sock", "key", "list"], tokens.acme_app)
    assert gone.returncode == 6 and b"cannot reach" in gone.stderr


def test_tenant_and_policy_commands_on_the_host(tmp_path: Path) -> None:
    config = write_vault_config(tmp_path)
    r = run(["tenant", "create", "acme"], None, config=config)
    assert r.returncode == 0, r.stderr
    again = run(["tenant", "create", "acme"], None, config=config)
    assert again.returncode == 10 and again.stderr.count(b"\n") == 1
    assert run(["tenant", "create", "_x"], None, config=config).returncode == 2
    issued = run(
        [
            "--json",
            "tenant",
            "token",
            "issue",
            "acme",
            "app",
            "--grant",
            "sign,read",
            "--keys",
            "app-*",
        ],
        None,
        config=config,
    )
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)["token"]
    assert token.startswith("srt_")
    db = (tmp_path / "data" / "tenants.sqlite").read_bytes()
    assert token.encode() not in db and token.split("_", 2)[2].encode() not in db
    policies = json.loads(run(["--json", "policy", "list"], None, config=config).stdout)
    assert policies == [
        {"tenant": "acme", "identity": "app", "keys": "app-*", "permissions": ["read", "sign"]}
    ]
    assert (
        run(
            ["policy", "grant", "acme", "app", "--keys", "x", "--permissions", "fly"],
            None,
            config=config,
        ).returncode
        == 2
    )
    tenants = json.loads(run(["--json", "tenant", "list"], None, config=config).stdout)
    assert tenants[0]["name"] == "acme" and tenants[0]["identities"] == 1
    assert run(["tenant", "token", "revoke", "acme", "app"], None, config=config).returncode == 0
    assert run(["tenant", "token", "revoke", "acme", "app"], None, config=config).returncode == 3
    admin = run(["--json", "tenant", "token", "issue", "--admin", "root"], None, config=config)
    assert admin.returncode == 0 and json.loads(admin.stdout)["tenant"] is None


# -- schemathesis against the service's own OpenAPI document ------------------------------------
def schemathesis(service: Service, pki: Pki, token: str, cwd: Path, *extra: str) -> str:
    r = subprocess.run(
        [
            str(STRONGROOM_BIN.parent / "schemathesis"),
            "run",
            f"{service.https}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--tls-verify",
            str(pki.ca),
            # Every check but positive_data_acceptance, which expects any schema-valid body to
            # succeed: a schema cannot say that a PEM key must parse or a ciphertext decrypt.
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "20",
            "--phases",
            "examples,coverage,fuzzing",
            # A bound against a hang only: generating an RSA-4096 key (a case schemathesis
            # makes) searches for primes for a random time, and on a loaded machine it went
            # past the 10 s default in the five-run check.
            "--request-timeout",
            "300",
            # and the same bound for schemathesis' own response-time check, which otherwise
            # fails a response slower than 10 s: a timed assertion, on a shared machine.
            "--max-response-time",
            "300",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "Tested: 0" not in r.stdout
    return r.stdout


def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path: Path) -> None:
    """As a tenant over every operation, then as the admin over the admin operations, against
    a service of its own (the admin run creates tenants and locks the vault)."""
    pki = make_pki(tmp_path / "pki")
    config = write_service_config(tmp_path, pki)
    tenancy = init_service_data(config, pki)
    service = start_service(config)
    try:
        out = schemathesis(service, pki, tenancy.acme_app, tmp_path)
        assert "Selected: 30/30" in out or "Selected:" in out
        schemathesis(
            service,
            pki,
            tenancy.admin,
            tmp_path,
            "--include-path-regex",
            "^/v1/(tenants|policies|vault|audit|whoami|backends)",
        )
    finally:
        assert service.stop() == 0, "".join(service.stderr_lines)
    assert verify_log(audit_path(service)).ok


# -- load: 2 client processes signing at once -----------------------------------------------------
# A count, not a duration: a duration with a minimum count measured the machine's load.
SIGNATURES_PER_PROCESS = 500


def _sign_loop(url: str, token: str, count: int, out: Any) -> None:
    ok = errors = 0
    with strongroom.connect(url, token=token) as ks:
        for _ in range(count):
            try:
                sig = ks.sign("load-key", DATA)
                ok += len(sig) == 64
            except Exception:
                errors += 1
    out.put((ok, errors))


def test_two_client_processes_sign_at_once_and_the_audit_log_is_complete(
    service: Service, tokens: Tenancy
) -> None:
    with remote(service, tokens.acme_app) as app:
        app.generate("load-key", "ed25519")
    with remote(service, tokens.admin) as admin:
        before = admin.audit_records(limit=1)  # noqa: F841 - warms the path
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_sign_loop, args=(service.unix, tokens.acme_app, SIGNATURES_PER_PROCESS, q)
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    total = sum(ok for ok, _ in results)
    assert results == [(SIGNATURES_PER_PROCESS, 0)] * 2
    signed = sum(
        1
        for line in audit_path(service).read_bytes().splitlines()
        if b'"op":"sign"' in line and b'"key":"acme/load-key"' in line and b'"result":"ok"' in line
    )
    assert signed == total
    assert verify_log(audit_path(service)).ok


def test_refusals_and_admin_changes_are_in_the_audit_log(service: Service, tokens: Tenancy) -> None:
    with remote(service, tokens.acme_signer) as signer, pytest.raises(NotPermitted):
        signer.delete("signing-refused")
    with (
        remote(service, "srt_0123456789abcdef_wrong") as nobody,
        pytest.raises(AuthenticationFailed),
    ):
        nobody.keys()
    with remote(service, tokens.admin) as admin:
        admin.create_tenant("audited-tenant")
        admin.issue_token("audited-tenant", "worker")
        admin.grant("audited-tenant", "worker", "w-*", ["sign"])
        admin.revoke_policy("audited-tenant", "worker", "w-*")
        # the newest records (the load test may have written tens of thousands before these)
        records = admin.audit_records(last=500)
    denied = [r for r in records if r.get("key") == "acme/signing-refused"]
    assert denied and denied[-1]["actor"] == "acme:signer"
    assert denied[-1]["result"] == "NotPermitted" and denied[-1]["status"] == 403
    assert any(
        r["actor"] == "unauthenticated" and r["result"] == "AuthenticationFailed" for r in records
    )
    changes = [(r["op"], r["result"]) for r in records if r.get("tenant") == "audited-tenant"]
    for op in ("tenant_create", "token_issue", "policy_grant", "policy_revoke"):
        assert (op, "started") in changes and (op, "ok") in changes, (op, changes)
    text = audit_path(service).read_text()
    assert "srt_" not in text  # no token, not even a wrong one


def test_scheduled_deletion_and_agree_through_the_cli(
    service: Service, tokens: Tenancy, tmp_path: Path
) -> None:
    server = ["--server", service.unix]
    with remote(service, tokens.acme_app) as app:
        app.generate("to-schedule", "ed25519")
        app.generate("dh", "x25519", usage="agree")
    r = run([*server, "key", "delete", "to-schedule", "--after", "1h"], tokens.acme_app)
    assert r.returncode == 0 and b"will be deleted" in r.stdout, r.stderr
    with remote(service, tokens.acme_app) as app:
        assert app.info("to-schedule").delete_after is not None
        with pytest.raises(PolicyViolation, match="scheduled for deletion"):
            app.sign("to-schedule", DATA)
    r = run([*server, "key", "delete", "to-schedule", "--cancel"], tokens.acme_app)
    assert r.returncode == 0, r.stderr
    r = run([*server, "key", "delete", "to-schedule"], tokens.acme_app)  # no wait configured
    assert r.returncode == 0 and b"deleted" in r.stdout, r.stderr
    from cryptography.hazmat.primitives.asymmetric import x25519

    peer = x25519.X25519PrivateKey.generate()
    (tmp_path / "peer.pem").write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    r = run(
        [
            *server,
            "key",
            "agree",
            "dh",
            "agreed",
            "--peer",
            str(tmp_path / "peer.pem"),
            "--salt",
            "00ff",
            "--info",
            "ctx",
        ],
        tokens.acme_app,
    )
    assert r.returncode == 0, r.stderr
    with remote(service, tokens.acme_app) as app:
        ct = app.encrypt("agreed", DATA)
        assert app.decrypt("agreed", ct) == DATA


# -- graceful shutdown ---------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_requests_then_locks_and_removes_the_socket(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    config = write_service_config(tmp_path, pki, "audit_checkpoint_seconds = 0.2\n")
    tenancy = init_service_data(config, pki)
    service = start_service(config)
    result: dict[str, Any] = {}
    # the checkpoint timer signs the tail while the service runs
    with remote(service, tenancy.acme_app) as ks:
        ks.generate("timer", "ed25519")
        ks.sign("timer", DATA)
    deadline = time.monotonic() + 20
    while verify_log(audit_path(service)).unsigned_tail and time.monotonic() < deadline:
        time.sleep(0.05)
    report = verify_log(audit_path(service))
    assert report.checkpoints >= 1 and report.unsigned_tail == 0

    def slow() -> None:
        with remote(service, tenancy.acme_app) as ks:
            try:
                result["info"] = ks.generate("big", "rsa-4096")
            except Exception as e:  # pragma: no cover - reported by the assert below
                result["error"] = e

    worker = threading.Thread(target=slow)
    worker.start()
    # SIGTERM once the keystore has begun (its write-ahead audit record is there): the
    # request is in flight, and an RSA-4096 key takes a while to make
    started = b'"op":"generate","key":"acme/big","backend":null,"result":"started"'
    deadline = time.monotonic() + 30
    while started not in audit_path(service).read_bytes() and time.monotonic() < deadline:
        time.sleep(0.005)
    code = service.stop()
    worker.join(60)
    assert code == 0, "".join(service.stderr_lines)
    assert "info" in result, result
    assert wait_gone(service.socket)
    with pytest.raises(BackendUnavailable):
        remote(service, tenancy.acme_app).keys()
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    with strongroom.open(config) as ks:  # the key made during shutdown is there
        assert ks.in_namespace("acme").info("big").type.value == "rsa-4096"


def test_service_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = write_vault_config(tmp_path)
    with bad.open("a") as f:
        f.write('\n[server]\nlisten = "127.0.0.1:8443"\n')
    r = run(["serve"], None, config=bad)
    assert r.returncode == 11 and b"server.listen" in r.stderr and r.stderr.count(b"\n") == 1
    with pytest.raises(InvalidArgument):
        strongroom.config.parse_listen("nohost")


_ = ec


def test_a_secret_over_the_wire(service: Service, tokens: Tenancy) -> None:
    """A `secret` (opaque data, no usage) imported and exported raw through the service; its
    bytes stay out of the audit log."""
    secret = b"wire secret \x00\xff" * 64
    with remote(service, tokens.acme_app) as app:
        info = app.import_key("wire-secret", "secret", bytearray(secret), exportable=True)
        assert info.type.value == "secret" and info.usage == frozenset()
        assert app.export_key("wire-secret", "raw") == secret
    assert secret.hex().encode() not in audit_path(service).read_bytes()
    assert secret not in audit_path(service).read_bytes()


def test_lifecycle_import_derive_and_mac_over_the_wire(
    service: Service, tokens: Tenancy, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    with remote(service, tokens.acme_app) as app:
        info = app.import_key("imported", "ed25519", bytearray(raw))
        assert info.namespace == "acme" and info.type.value == "ed25519"
        private.public_key().verify(app.sign("imported", DATA), DATA)
        app.generate("wire-hmac", "hmac-sha256")
        tag = app.mac("wire-hmac", DATA)
        app.verify("wire-hmac", DATA, tag)
        app.generate("wire-root", "aes-256", usage="derive")
        derived = app.derive("wire-root", "wire-child", "aes-256", usage="encrypt,decrypt")
        assert derived.usage == {strongroom.Usage.ENCRYPT, strongroom.Usage.DECRYPT}
        app.generate("wire-aes", "aes-256")
        ct1 = app.encrypt("wire-aes", DATA, envelope=True)
        assert app.rotate("wire-aes").version == 2
        assert [v.version for v in app.versions("wire-aes")] == [1, 2]
        assert app.decrypt("wire-aes", ct1, envelope=True) == DATA
        app.set_min_decryption_version("wire-aes", 2)
        with pytest.raises(PolicyViolation):
            app.decrypt("wire-aes", ct1, envelope=True)
        app.disable("wire-aes")
        with pytest.raises(PolicyViolation, match="disabled"):
            app.encrypt("wire-aes", DATA)
        app.enable("wire-aes")
        app.encrypt("wire-aes", DATA)
    # the signer may neither import nor manage
    with remote(service, tokens.acme_signer) as signer:
        with pytest.raises(NotPermitted):
            signer.import_key("signing-imported", "ed25519", bytearray(raw))
        with pytest.raises(NotPermitted, match="manage"):
            signer.rotate("signing-1")
    # the key material never lands in the audit log or the service's output
    assert raw.hex().encode() not in audit_path(service).read_bytes()
    server = ["--server", service.unix]
    r = run([*server, "key", "rotate", "wire-hmac"], tokens.acme_app)
    assert r.returncode == 0, r.stderr
    r = run([*server, "--json", "key", "versions", "wire-hmac"], tokens.acme_app)
    assert r.returncode == 0, r.stderr


# -- wrap, unwrap, rewrap, attest and adopt over the wire ------------------------------------------
def test_wrap_and_unwrap_over_the_wire(service: Service, tokens: Tenancy, tmp_path: Path) -> None:
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        app.generate("signing-kek", "aes-256", usage="wrap,unwrap")
        app.generate("signing-movable", "aes-256", exportable=True)
        app.generate("signing-fixed", "aes-256")
        blob = app.wrap("signing-kek", "signing-movable")
        moved = app.unwrap("signing-kek", blob, "wire-moved", "aes-256", usage="encrypt,decrypt")
        assert moved.namespace == "acme" and moved.backend == "vault" and not moved.exportable
        ct = app.encrypt("signing-movable", DATA, aad=b"a")
        assert app.decrypt("wire-moved", ct, aad=b"a") == DATA
        exportable = app.unwrap("signing-kek", blob, "wire-moved-2", "aes-256", exportable=True)
        assert exportable.exportable
        # the typed errors of the keystore, unchanged by the wire
        with pytest.raises(PolicyViolation, match="not created exportable"):
            app.wrap("signing-kek", "signing-fixed")
        with pytest.raises(IntegrityError):
            app.unwrap("signing-kek", blob[:-1] + bytes([blob[-1] ^ 1]), "wire-broken", "aes-256")
        with pytest.raises(KeyNotFound):
            app.wrap("signing-kek", "absent")
        # the signer may read the keys but neither encrypt (wrap) nor decrypt (unwrap) with them
        with pytest.raises(NotPermitted, match="may not encrypt"):
            signer.wrap("signing-kek", "signing-movable")
        with pytest.raises(NotPermitted, match="may not decrypt"):
            signer.unwrap("signing-kek", blob, "signing-new", "aes-256")
        with pytest.raises(KeyNotFound):  # no permission at all on the name
            signer.wrap("wire-moved", "signing-movable")
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(service.socket)),
        base_url="http://s",
        headers={"authorization": f"Bearer {tokens.acme_app}"},
    ) as c:
        r = c.post("/v1/keys/signing-kek/wrap", json={})
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument"
        bad_blob = {"blob": "!", "new_name": "x", "type": "aes-256"}
        r = c.post("/v1/keys/signing-kek/unwrap", json=bad_blob)
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument"
    server = ["--server", service.unix]
    wrapped = run([*server, "key", "wrap", "signing-kek", "signing-movable"], tokens.acme_app)
    assert wrapped.returncode == 0, wrapped.stderr
    (tmp_path / "blob").write_bytes(wrapped.stdout)
    unwrapped = run(
        [*server, "key", "unwrap", "signing-kek", "cli-moved", "--type", "aes-256"],
        tokens.acme_app,
        data=wrapped.stdout,
    )
    assert unwrapped.returncode == 0, unwrapped.stderr
    denied = run([*server, "key", "wrap", "signing-kek", "signing-movable"], tokens.acme_signer)
    assert denied.returncode == 8 and denied.stderr.count(b"\n") == 1


def test_rewrap_over_the_wire(service: Service, tokens: Tenancy) -> None:
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        app.generate("signing-rewrap", "aes-256")
        old = app.encrypt("signing-rewrap", DATA, aad=b"h", envelope=True)
        app.rotate("signing-rewrap")
        new = app.rewrap("signing-rewrap", old, b"h")
        assert new != old and DATA not in new
        app.set_min_decryption_version("signing-rewrap", 2)
        assert app.decrypt("signing-rewrap", new, aad=b"h", envelope=True) == DATA
        with pytest.raises(VersionRetired):
            app.rewrap("signing-rewrap", old, b"h")
        with pytest.raises(DataFormatError):
            app.rewrap("signing-rewrap", b"not versioned", b"h")
        with pytest.raises(IntegrityError):  # rewrap authenticates before it re-encrypts
            app.rewrap("signing-rewrap", new, b"other header")
        # rewrap decrypts and encrypts: the signer may do neither
        with pytest.raises(NotPermitted, match="may not decrypt"):
            signer.rewrap("signing-rewrap", new, b"h")


def test_attest_over_the_wire(service: Service, tokens: Tenancy) -> None:
    """The service's vault cannot attest: the refusal is the backend's own, as in process.
    A TPM's statement over the wire is the contract's test_attest; here the route's checks."""
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        app.generate("signing-attest", "ecdsa-p256")
        app.generate("unreadable", "ecdsa-p256")
        with pytest.raises(UnsupportedOperation) as err:
            app.attest("signing-attest", b"nonce")
        assert (err.value.backend, err.value.operation, err.value.key_type) == (
            "vault",
            "attest",
            "ecdsa-p256",
        )
        with pytest.raises(UnsupportedOperation):  # read is enough to ask
            signer.attest("signing-attest")
        with pytest.raises(KeyNotFound):
            signer.attest("unreadable")
        with pytest.raises(KeyNotFound):
            app.attest("absent", b"nonce")
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(service.socket)),
        base_url="http://s",
        headers={"authorization": f"Bearer {tokens.acme_app}"},
    ) as c:
        r = c.post("/v1/keys/signing-attest/attest", json={"nonce": 5})
        assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument"


def test_adopt_over_the_wire(service: Service, tokens: Tenancy) -> None:
    """Adopting through the service needs `adopt` on the name, which `all` does not grant;
    the service's vault cannot adopt, so success is the contract's (tests/backends/test_pkcs11.py,
    over a service on SoftHSM2)."""
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        with pytest.raises(UnsupportedOperation) as err:
            app.adopt("wire-adopted", "vault", {"label": "x"})
        assert (err.value.backend, err.value.operation) == ("vault", "adopt")
        with pytest.raises(InvalidArgument, match="no backend named"):
            app.adopt("wire-adopted", "nowhere", {"label": "x"})
        with pytest.raises(NotPermitted, match="may not adopt"):
            signer.adopt("signing-adopted", "vault", {"label": "x"})
        assert "wire-adopted" not in {k.name for k in app.keys()}
    # `all` is every key permission but adopt: granted by name only
    assert Permission.ADOPT not in parse_permissions("all")
    assert Permission.GENERATE in parse_permissions("all")
    assert parse_permissions("adopt,read") == {Permission.ADOPT, Permission.READ}
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(service.socket)),
        base_url="http://s",
        headers={"authorization": f"Bearer {tokens.acme_app}"},
    ) as c:
        for body in ({"backend": "vault"}, {"backend": "vault", "ref": {"label": 1}}, {"ref": {}}):
            r = c.post("/v1/keys/wire-adopted/adopt", json=body)
            assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidArgument"


def test_new_operations_are_audited_as_in_process(service: Service, tokens: Tenancy) -> None:
    with remote(service, tokens.acme_app) as app:
        app.generate("audit-kek", "aes-256", usage="wrap,unwrap")
        app.generate("audit-movable", "aes-256", exportable=True)
        app.unwrap("audit-kek", app.wrap("audit-kek", "audit-movable"), "audit-moved", "aes-256")
        old = app.encrypt("audit-movable", DATA, envelope=True)
        app.rewrap("audit-movable", old)
        with pytest.raises(UnsupportedOperation):
            app.attest("audit-kek")
    with remote(service, tokens.admin) as admin:
        records = admin.audit_records(last=50)
    mine = {
        (r["op"], r["result"]): r
        for r in records
        if r.get("actor") == "acme:app" and str(r.get("key", "")).startswith("acme/audit-")
    }
    for op, result in (
        ("wrap", "ok"),
        ("unwrap", "ok"),
        ("rewrap", "ok"),
        ("attest", "UnsupportedOperation"),
    ):
        assert (op, result) in mine, (op, sorted(mine))
    assert mine[("wrap", "ok")]["key"] == "acme/audit-kek"
    assert mine[("wrap", "ok")]["target"] == "audit-movable"
    assert mine[("unwrap", "ok")]["new_key"] == "audit-moved"


def test_cli_refuses_commands_outside_the_key_api_in_one_line(
    service: Service, tokens: Tenancy
) -> None:
    server = ["--server", service.unix]
    for args in (
        ["key", "purge"],
        ["key", "bip39-recover", "seed"],
        ["audit", "checkpoint"],
        ["vault", "backup", "/nonexistent/backup"],
    ):
        r = run([*server, *args], tokens.acme_app)
        assert r.returncode == 5, (args, r.stderr)
        assert b"not offered through the service" in r.stderr and r.stderr.count(b"\n") == 1


def test_exportable_new_keys_older_public_keys_and_der_export_over_the_wire(
    service: Service, tokens: Tenancy
) -> None:
    """Parameters the client refused before KeyAPI: derive/agree exportable (needs `export`
    on the new name, as generate does), public_key(version=) and export_key der/raw."""
    with remote(service, tokens.admin) as admin:
        deriver = admin.issue_token("acme", "deriver")
        admin.grant("acme", "deriver", "dx-*", ["derive", "generate", "read"])
    with remote(service, tokens.acme_app) as app, remote(service, deriver) as limited:
        app.generate("dx-root", "aes-256", usage="derive")
        child = app.derive("dx-root", "dx-child", "aes-256", exportable=True)
        assert child.exportable
        raw = app.export_key("dx-child", "raw")
        assert len(raw) == 32
        with pytest.raises(NotPermitted, match="needs export"):
            limited.derive("dx-root", "dx-other", "aes-256", exportable=True)
        assert not limited.derive("dx-root", "dx-other", "aes-256").exportable
        peer = ec.generate_private_key(ec.SECP256R1())
        app.generate("dx-ec", "ecdsa-p256", usage="agree")
        agreed = app.agree("dx-ec", peer.public_key(), "dx-agreed", exportable=True)
        assert agreed.exportable
        app.generate("dx-signer", "ecdsa-p256", exportable=True)
        first = app.public_key("dx-signer")
        app.rotate("dx-signer")
        assert app.public_key("dx-signer", version=1) == first
        assert app.public_key("dx-signer") != first
        der = app.export_key("dx-signer", "der")
        assert serialization.load_der_private_key(der, None).public_key() == app.public_key(
            "dx-signer"
        )
        with pytest.raises(InvalidArgument):
            app.export_key("dx-signer", "jwk")


# -- the table of operations (strongroom.service.wire) ------------------------------------------
def test_each_plain_operation_fills_parameters_its_key_api_method_has() -> None:
    """A generic handler calls `KeyAPI.<call>(name, **fields)`: every field it passes must
    be a parameter of that method (a misspelt `arg` would be a TypeError at request time),
    and every client method's operation exists."""
    plain = [op for op in wire.OPS if op.call is not None]
    assert len(plain) >= 15
    for op in plain:
        passed = {f.param for f in (*(op.body or ()), *op.query) if f.passed}
        for api in (KeyAPI, Keystore):  # the handler calls the keystore's tenant view
            params = set(inspect.signature(getattr(api, op.call)).parameters) - {"self"}
            assert passed <= params, (api.__name__, op.name, passed - params)
        assert "{name}" in op.path and op.permissions, op.name
    source = inspect.getsource(RemoteKeystore)
    named = set(re.findall(r'self\._(?:op|result|bytes|key|key_about)\(\s*"(\w+)"', source))
    assert named and named <= set(wire.OP), named - set(wire.OP)


@pytest.mark.parametrize("cls", list(wire.STATUS))
def test_each_error_class_of_the_status_table_comes_back_as_itself(cls: type) -> None:
    error: StrongroomError
    if cls is KeyNotFound:
        error = KeyNotFound("k")
    elif cls is BackendUnavailable:
        error = BackendUnavailable("vault", "/srv/vault is away")
    elif cls is UnsupportedOperation:
        error = UnsupportedOperation("vault", "attest", "ed25519")
    elif cls is AuthenticationFailed:
        error = AuthenticationFailed("wrong PIN", 2)
    else:
        error = cls("/srv/vault is away")
    status, body = wire.error_to_wire(error)
    assert status == wire.STATUS[cls]
    back = wire.error_from_wire(status, body, "k")
    assert type(back) is cls
    if isinstance(back, AuthenticationFailed):
        assert back.retries_left == 2
    if isinstance(back, UnsupportedOperation):
        assert (back.backend, back.operation, back.key_type) == ("vault", "attest", "ed25519")
    # a caller who is not an admin does not learn what a 503 was about
    if status == 503:
        hidden = wire.error_to_wire(error, detail=False)[1]["error"]["message"]
        assert "/srv/vault" not in hidden


def test_the_client_maps_its_own_error_classes_back() -> None:
    from strongroom.service.client import _LOCAL, RateLimited, RequestTooLarge

    for cls in (VaultLocked, RateLimited, RequestTooLarge, NotPermitted):
        body = wire.error_body(cls.__name__, "no")
        assert type(wire.error_from_wire(423, body, None, _LOCAL)) is cls
    unknown = wire.error_from_wire(500, wire.INTERNAL_ERROR, None, _LOCAL)
    assert type(unknown) is StrongroomError and "HTTP 500" in str(unknown)


def test_the_old_import_paths_re_export_the_service() -> None:
    import strongroom.client
    import strongroom.server
    import strongroom.tenants
    from strongroom.service import transport

    assert strongroom.server.App is App and strongroom.server.serve is transport.serve
    assert strongroom.client.RemoteKeystore is RemoteKeystore
    assert strongroom.client.VaultLocked is VaultLocked
    assert strongroom.client.NotPermitted is NotPermitted
    assert strongroom.client.connect is strongroom.service.connect
    assert strongroom.tenants.TenantStore is TenantStore
    assert strongroom.tenants.Permission is Permission


# -- keys as cryptography private keys over the wire (issue 17) ------------------------------------
def test_private_key_signs_csrs_and_tokens_through_the_service(
    service: Service, tokens: Tenancy, tmp_path: Path
) -> None:
    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        app.generate("signing-x509", "ecdsa-p256")
        app.generate("x509-elsewhere", "ecdsa-p256")
        key = signer.private_key("signing-x509")  # the signer: sign, verify, read only
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "over the wire")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        assert csr.is_signature_valid
        (tmp_path / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        p = subprocess.run(
            ["openssl", "req", "-in", "req.pem", "-verify", "-noout"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert "self-signature verify OK" in p.stderr, p.stderr
        token = jwt.encode({"sub": "svc"}, key, algorithm="ES256")
        public = app.public_key("signing-x509")
        assert jwt.decode(token, public, algorithms=["ES256"]) == {"sub": "svc"}
        # the policy decides: outside signing-* the signer is told of no such key
        with pytest.raises(KeyNotFound):
            signer.private_key("x509-elsewhere")
    # the CLI's `key csr` goes through the service too
    server = ["--server", service.unix]
    r = run([*server, "key", "csr", "signing-x509", "--subject", "CN=cli"], tokens.acme_signer)
    assert r.returncode == 0, r.stderr
    assert x509.load_pem_x509_csr(r.stdout).is_signature_valid


def test_certificates_are_kept_through_the_service(
    service: Service, tokens: Tenancy, tmp_path: Path
) -> None:
    from cryptography import x509

    from strongroom.errors import CertificateMismatch

    server = ["--server", service.unix]
    for name in ("signing-ca", "signing-web"):
        r = run([*server, "key", "generate", name, "--type", "ecdsa-p256"], tokens.acme_app)
        assert r.returncode == 0, r.stderr
    r = run(
        [
            *server,
            "key",
            "certificate",
            "signing-ca",
            "--subject",
            "CN=Wire CA",
            "--days",
            "2",
            "--ca",
            "--out",
            str(tmp_path / "ca.pem"),
        ],
        tokens.acme_app,
    )
    assert r.returncode == 0, r.stderr
    r = run(
        [*server, "key", "cert", "set", "signing-ca", str(tmp_path / "ca.pem")], tokens.acme_app
    )
    assert r.returncode == 0, r.stderr
    # the issuer's certificate comes from the service, where it is kept
    r = run(
        [
            *server,
            "key",
            "certificate",
            "signing-web",
            "--subject",
            "CN=web",
            "--days",
            "1",
            "--issuer",
            "signing-ca",
            "--out",
            str(tmp_path / "web.pem"),
        ],
        tokens.acme_signer,
    )
    assert r.returncode == 0, r.stderr
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    web_pem = (tmp_path / "web.pem").read_bytes()
    web = x509.load_pem_x509_certificate(web_pem)
    web.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    with remote(service, tokens.acme_app) as app, remote(service, tokens.acme_signer) as signer:
        assert app.set_certificate("signing-web", web_pem + ca_pem)[0] == web
        assert [c.subject.rfc4514_string() for c in signer.certificate("signing-web")] == [
            "CN=web",
            "CN=Wire CA",
        ]
        with pytest.raises(CertificateMismatch):
            app.set_certificate("signing-ca", web_pem)
        with pytest.raises(NotPermitted, match="manage"):
            signer.set_certificate("signing-web", web_pem)
        app.generate("signing-bare", "ed25519")
        assert signer.certificate("signing-bare") == []
    r = run([*server, "key", "cert", "show", "signing-web", "--format", "der"], tokens.acme_signer)
    assert r.returncode == 0 and x509.load_der_x509_certificate(r.stdout) == web, r.stderr
    r = run(
        [*server, "key", "cert", "set", "signing-ca", str(tmp_path / "web.pem")], tokens.acme_app
    )
    assert r.returncode == 2 and b"not the public key of key 'signing-ca'" in r.stderr, r.stderr
