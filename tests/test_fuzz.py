"""Fuzzing the parsers of outside bytes: every input gives a typed StrongroomError (or a
report), never another exception, in bounded time.

Seeds are real samples: a snapshot and an envelope made here, an audit log made here, and a
TPM attestation statement from swtpm (tests/vectors/tpm-attestation.json). Hypothesis then
flips, cuts, splices and replaces. CI runs a short budget; a long run is

    SR_FUZZ_EXAMPLES=200000 .venv/bin/pytest tests/test_fuzz.py -p no:cacheprovider

(docs/threat-model.md records the last long run).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strongroom
from strongroom import envelope, strictjson
from strongroom.audit import verify_log
from strongroom.backends.vault import rows, snapshot
from strongroom.errors import StrongroomError
from strongroom.keystore import verify_attestation
from strongroom.storage import VaultHeader, VaultRow

EXAMPLES = int(os.environ.get("SR_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 1000,  # CI: the same cases every run; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
VECTORS = Path(__file__).parent / "vectors"


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte-level changes: flips, cuts, inserts, duplicated slices."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup", "truncate"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x22, 0x5B, 0x7B, 0x30]))
        elif kind == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "dup":
            j = draw(st.integers(i, min(len(data), i + 256)))
            data[i:i] = data[i:j]
        else:
            del data[i:]
    return bytes(data)


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JSON_DOCS = JSON_VALUES.map(lambda v: json.dumps(v).encode())
HOSTILE_JSON = st.sampled_from(
    [b"[" * 50_000 + b"]" * 50_000, b"1e400", b"NaN", b"-Infinity", b'"\\ud800"', b"\xff"]
)


def _only_typed(call: Any) -> None:
    try:
        call()
    except StrongroomError:
        pass


# -- strict JSON ---------------------------------------------------------------------------------
@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200), HOSTILE_JSON, JSON_VALUES.map(lambda v: json.dumps(v).encode())
    )
)
def test_strict_json_raises_only_value_error(data: bytes) -> None:
    try:
        strictjson.loads(data)
    except ValueError:
        pass


@contextlib.contextmanager
def seed_keystore(factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Any, Path]]:
    """A fresh vault keystore in its own temp dir, for making a real sample to mutate."""
    root = factory.mktemp(name)
    cfg = write_vault_config(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
        with strongroom.open(cfg) as ks:
            yield ks, root / "data"


# -- the vault snapshot --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snapshot_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    with seed_keystore(tmp_path_factory, "fuzz-snapshot") as (ks, data):
        ks.generate("ed", "ed25519")
        ks.generate("aes", "aes-256")
        ks.vault.backup(data / "seed.snapshot")  # type: ignore[attr-defined]
    return (data / "seed.snapshot").read_bytes()


@FUZZ
@given(data=st.data())
def test_snapshot_decode(snapshot_seed: bytes, data: st.DataObject) -> None:
    bad = data.draw(mutated(snapshot_seed))
    _only_typed(lambda: snapshot.decode(bad, "fuzz.snapshot"))


@FUZZ
@given(header=st.one_of(JSON_DOCS, HOSTILE_JSON))
def test_snapshot_header(snapshot_seed: bytes, header: bytes) -> None:
    """Any header, with lengths and checksum fixed up the way an attacker would."""
    import hashlib
    import struct

    prefix = struct.Struct(">8sHI")
    _, version, hlen = prefix.unpack_from(snapshot_seed)
    rest = snapshot_seed[prefix.size + hlen : -32]
    body = prefix.pack(snapshot.MAGIC, version, len(header)) + header + rest
    _only_typed(lambda: snapshot.decode(body + hashlib.sha256(body).digest(), "fuzz.snapshot"))


# -- the vault's rows in the store ----------------------------------------------------------------
@pytest.fixture(scope="module")
def store_seed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, list[VaultRow], VaultHeader]]:
    """An unlocked vault, its real rows (Ed25519, P-256, AES) and its real header."""
    with seed_keystore(tmp_path_factory, "fuzz-store") as (ks, _):
        for name, key_type in (("ed", "ed25519"), ("p256", "ecdsa-p256"), ("aes", "aes-256")):
            ks.generate(name, key_type)
        vault = ks.vault
        records = vault._rows  # type: ignore[attr-defined]
        found = records.header_with_count()
        assert found is not None
        yield vault._state, list(records.rows()), found[0]  # type: ignore[attr-defined]


def _store_parse(state: Any, row: VaultRow, header: VaultHeader) -> None:
    rows.parse_slots(header, "fuzz")
    rows.read_manifest(state, header, "fuzz")
    rows.from_row(state, row, "fuzz")


def test_store_seeds_parse(store_seed: tuple[Any, list[VaultRow], VaultHeader]) -> None:
    """The positive control: the unmutated rows and header are accepted."""
    state, all_rows, header = store_seed
    for row in all_rows:
        _store_parse(state, row, header)


@FUZZ
@given(data=st.data())
def test_store_records(
    store_seed: tuple[Any, list[VaultRow], VaultHeader], data: st.DataObject
) -> None:
    """A row or header edited field by field, as someone with write access to the database
    could: every result is the record, or a typed error (SnapshotTampered)."""
    state, all_rows, header = store_seed
    row = data.draw(st.sampled_from(all_rows))
    field = data.draw(
        st.sampled_from(
            [
                *("meta", "public", "sealed", "mac", "name", "namespace", "type", "version"),
                *("id", "slots", "manifest", "vault_id", "format"),
            ]
        )
    )
    if field in ("meta", "name", "namespace", "type"):
        text = getattr(row, field).encode()
        new = data.draw(st.one_of(mutated(text), JSON_DOCS, HOSTILE_JSON))
        row = replace(row, **{field: new.decode("utf-8", "replace")})
    elif field in ("public", "sealed", "mac"):
        row = replace(row, **{field: data.draw(mutated(getattr(row, field) or b"\x00"))})
    elif field == "version":
        row = replace(row, version=data.draw(st.integers(-(2**63), 2**63)))
    elif field == "id":
        row = replace(row, record_id=data.draw(st.text(max_size=40)))
    elif field in ("slots", "manifest"):
        text = getattr(header, field).encode()
        new = data.draw(st.one_of(mutated(text), JSON_DOCS, HOSTILE_JSON))
        header = replace(header, **{field: new.decode("utf-8", "replace")})
    elif field == "vault_id":
        header = replace(header, vault_id=data.draw(st.text(max_size=40)))
    else:
        header = replace(header, format=data.draw(st.integers(-(2**63), 2**63)))
    _only_typed(lambda: _store_parse(state, row, header))


# -- envelopes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def envelope_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    with seed_keystore(tmp_path_factory, "fuzz-envelope") as (ks, _):
        ks.generate("kek", "aes-256")
        out = io.BytesIO()
        envelope.encrypt_stream(ks, "kek", io.BytesIO(b"fuzzed envelope " * 64), out)
    return out.getvalue()


@FUZZ
@given(data=st.data())
def test_envelope_header(envelope_seed: bytes, data: st.DataObject) -> None:
    bad = data.draw(mutated(envelope_seed[:600]))
    _only_typed(lambda: envelope.read_header(io.BytesIO(bad)))


@FUZZ
@given(doc=st.one_of(JSON_DOCS, HOSTILE_JSON))
def test_envelope_header_json(doc: bytes) -> None:
    lead = envelope.MAGIC + bytes([envelope.FORMAT_VERSION]) + len(doc).to_bytes(4, "big")
    _only_typed(lambda: envelope.read_header(io.BytesIO(lead + doc + bytes(32))))


# -- the audit log ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audit_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    with seed_keystore(tmp_path_factory, "fuzz-audit") as (ks, data):
        ks.generate("k", "ed25519")
        ks.sign("k", b"a")
        ks.audit_checkpoint()
        ks.sign("k", b"b")
    return (data / "audit.jsonl").read_bytes()


@FUZZ
@given(data=st.data())
def test_audit_verify(audit_seed: bytes, data: st.DataObject, tmp_path_factory: Any) -> None:
    lines = audit_seed.splitlines(keepends=True)
    if data.draw(st.booleans()):
        bad = data.draw(mutated(audit_seed))
    else:  # one line replaced by any JSON, keeping the rest of the chain
        i = data.draw(st.integers(0, len(lines) - 1))
        doc = data.draw(st.one_of(JSON_DOCS, HOSTILE_JSON))
        bad = b"".join([*lines[:i], doc + b"\n", *lines[i + 1 :]])
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    path.write_bytes(bad)
    _only_typed(lambda: verify_log(path).raise_if_tampered())


# -- TPM attestation statements ---------------------------------------------------------------
ATTESTATION = json.loads((VECTORS / "tpm-attestation.json").read_text())
B64_FIELDS = [
    ("certify_info",),
    ("signature",),
    ("attestation_key", "public_area"),
    ("key", "public_area"),
]


@FUZZ
@given(data=st.data())
def test_attestation_statement(data: st.DataObject) -> None:
    statement = copy.deepcopy(ATTESTATION)
    path = data.draw(
        st.sampled_from([*B64_FIELDS, ("nonce",), ("key",), ("format",), ("version",)])
    )
    node = statement
    for part in path[:-1]:
        node = node[part]
    if path in B64_FIELDS and data.draw(st.booleans()):
        raw = base64.b64decode(node[path[-1]])
        node[path[-1]] = base64.b64encode(data.draw(mutated(raw))).decode()
    else:
        node[path[-1]] = data.draw(JSON_VALUES)
    _only_typed(lambda: verify_attestation(statement, b"fuzz seed nonce"))


def test_the_attestation_seed_verifies() -> None:
    """The seed is a real statement: without this the fuzzing above would test little."""
    assert verify_attestation(ATTESTATION, b"fuzz seed nonce")["valid"]


# -- config ---------------------------------------------------------------------------------
CONFIG_SEED = b"""[keystore]
order = ["tpm", "hsm", "vault"]
data_dir = "/tmp/strongroom-fuzz-never-made"
audit = "file"
deletion_wait = "7d"

[server]
socket = "/tmp/sr.sock"
listen = "127.0.0.1:8443"
rate_limit = 100

[backends.vault]
type = "vault"
unlock = ["tpm", "passphrase"]
passphrase = "env:STRONGROOM_PASSPHRASE"
kdf_memory_kib = 65536

[backends.hsm]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token = "strongroom"
pin = "env:STRONGROOM_HSM_PIN"
optional = true
env = { SOFTHSM2_CONF = "/tmp/softhsm2.conf" }

[backends.tpm]
type = "tpm"
tcti = "swtpm:host=127.0.0.1,port=2321"
"""
TOML_JUNK = st.sampled_from(
    [b"a = [" * 5000, b"x = {" * 3000, b"\x00", b"\xff", b'"\\ud800"', b"[[x]]\n" * 3, b"= 1"]
)


@FUZZ
@given(data=st.data())
def test_config(data: st.DataObject, tmp_path_factory: Any) -> None:
    from strongroom import config

    if data.draw(st.booleans()):
        text = data.draw(mutated(CONFIG_SEED))
    else:
        lines = CONFIG_SEED.splitlines(keepends=True)
        i = data.draw(st.integers(0, len(lines)))
        text = b"".join([*lines[:i], data.draw(TOML_JUNK) + b"\n", *lines[i:]])
    path = tmp_path_factory.mktemp("cfg") / "strongroom.toml"
    path.write_bytes(text)
    _only_typed(lambda: config.load(path))


# -- key import: raw, DER (PKCS#8, PKCS#1, SEC1) and PEM, every type ------------------------------
def _import_seeds() -> list[tuple[str, str, bytes]]:
    """(key type, format, material) made by cryptography: every form the vault takes."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

    pkcs8 = (ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pem8 = (ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    trad = (ser.Encoding.DER, ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption())
    raw = (ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    seeds: list[tuple[str, str, bytes]] = []
    for name, key in (
        ("ed25519", ed25519.Ed25519PrivateKey.generate()),
        ("x25519", x25519.X25519PrivateKey.generate()),
    ):
        seeds += [(name, "raw", key.private_bytes(*raw)), (name, "der", key.private_bytes(*pkcs8))]
        seeds.append((name, "pem", key.private_bytes(*pem8)))
    for name, curve in (
        ("ecdsa-p256", ec.SECP256R1()),
        ("ecdsa-p384", ec.SECP384R1()),
        ("secp256k1", ec.SECP256K1()),
    ):
        eckey = ec.generate_private_key(curve)
        size = (curve.key_size + 7) // 8
        seeds.append((name, "raw", eckey.private_numbers().private_value.to_bytes(size, "big")))
        seeds += [
            (name, "der", eckey.private_bytes(*pkcs8)),
            (name, "der", eckey.private_bytes(*trad)),
        ]
        seeds.append((name, "pem", eckey.private_bytes(*pem8)))
    rsakey = rsa.generate_private_key(65537, 2048)
    seeds += [
        ("rsa-2048", "der", rsakey.private_bytes(*pkcs8)),
        ("rsa-2048", "der", rsakey.private_bytes(*trad)),
        ("rsa-2048", "pem", rsakey.private_bytes(*pem8)),
    ]
    for name in ("aes-256", "hmac-sha256", "chacha20-poly1305", "seed"):
        seeds.append((name, "raw", bytes(range(32))))
    return seeds


IMPORT_SEEDS = _import_seeds()


@FUZZ
@given(data=st.data())
def test_key_import(data: st.DataObject) -> None:
    """The vault's own DER/PEM reader (native/keyops.c) and the raw checks: a mutated key
    is either a key of that type or InvalidArgument, under any declared format."""
    from strongroom.backends.vault import keyops
    from strongroom.errors import InvalidArgument
    from strongroom.types import KeyType

    key_type, fmt, seed = data.draw(st.sampled_from(IMPORT_SEEDS))
    material = data.draw(st.one_of(mutated(seed), st.binary(max_size=80)))
    declared = data.draw(st.sampled_from([fmt, "auto", "raw", "der", "pem"]))
    try:
        guarded, _public = keyops.import_material(KeyType(key_type), memoryview(material), declared)
    except InvalidArgument:
        return
    guarded.close()


def test_every_import_seed_imports() -> None:
    """The positive control: unmutated, each seed is a key the vault takes."""
    from strongroom.backends.vault import keyops
    from strongroom.types import KeyType

    for key_type, fmt, seed in IMPORT_SEEDS:
        for declared in (fmt, "auto"):
            guarded, _public = keyops.import_material(KeyType(key_type), memoryview(seed), declared)
            guarded.close()


# -- the service's JSON bodies, over every operation of its OpenAPI document ----------------------
@pytest.fixture(scope="module")
def service_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """An in-process service (the ASGI app uvicorn runs) with one key of each usage and a
    tenant token that may do every key operation."""
    import strongroom.config
    from strongroom.keystore import Keystore
    from strongroom.service.app import App
    from strongroom.service.tenants import Permission, TenantStore

    root = tmp_path_factory.mktemp("fuzz-service")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
        cfg = strongroom.config.load(write_vault_config(root))
        cfg.server.max_request_bytes = 64 * 1024
        ks = Keystore(cfg)
        ks.vault_control().initialize()
        store = TenantStore(cfg.data_dir / "tenants.sqlite")
        store.create_tenant("acme")
        token = store.issue_token("acme", "app")
        store.grant("acme", "app", "*", [p for p in Permission if p is not Permission.ADMIN])
        app = App(ks, store, cfg.server)
        app.limiter.rate = 0  # the bodies are the subject here, not the rate limit
        try:
            yield app, token
        finally:
            app.close()


SERVICE_KEYS = {"ed": "ed25519", "aes": "aes-256", "p256": "ecdsa-p256", "x": "x25519"}


def _asgi(app: Any, method: str, path: str, body: bytes, token: str) -> tuple[int, bytes]:
    import asyncio

    sent: list[dict[str, Any]] = []
    path, _, query = path.partition("?")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"authorization", b"Bearer " + token.encode())],
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def _operations(app: Any) -> list[tuple[str, str, list[str]]]:
    """(method, path template, request body field names) for every documented operation."""
    ops = []
    for path, item in app.openapi["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = body.get("schema", {})
            if "$ref" in schema:
                ref = schema["$ref"].rsplit("/", 1)[-1]
                schema = app.openapi.get("components", {}).get("schemas", {}).get(ref, {})
            ops.append((method.upper(), path, sorted(schema.get("properties", {}))))
    return ops


B64_VALUES = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())


@FUZZ
@given(data=st.data())
def test_service_json_bodies(service_app: tuple[Any, str], data: st.DataObject) -> None:
    """Every operation gets an answer with a status below 500 and a JSON body; an error names
    its type. A 500 is how the service answers an exception it did not expect (a bug)."""
    app, token = service_app
    if not any(k.name == "ed" for k in app.ks.keys()):
        for name, key_type in SERVICE_KEYS.items():
            app.ks.generate(name, key_type)
    method, template, fields = data.draw(st.sampled_from(_operations(app)))
    name = data.draw(st.sampled_from([*SERVICE_KEYS, "absent", "a%2Fb", "..", "x" * 300]))
    path = template.replace("{name}", name)
    for param in ("{tenant}", "{app}", "{policy}", "{id}"):
        path = path.replace(param, data.draw(st.sampled_from(["acme", "other", "%00"])))
    if data.draw(st.booleans()):
        path += "?" + data.draw(st.sampled_from(["format=pem", "format=xml", "limit=-1", "x=%zz"]))
    value = st.one_of(JSON_VALUES, B64_VALUES, st.sampled_from(list(SERVICE_KEYS.values())))
    doc = data.draw(st.dictionaries(st.sampled_from(fields or ["data"]), value, max_size=6))
    raw = json.dumps(doc).encode()
    if data.draw(st.integers(0, 3)) == 0:
        raw = data.draw(mutated(raw))
    status, body = _asgi(app, method, path, raw, token)
    assert status < 500 or status == 503, (method, path, raw[:200], body[:300])
    answer = json.loads(body)
    if status >= 400:
        assert set(answer["error"]) >= {"type", "message"}, answer


# -- the service's request heads, on a running `strongroom serve` --------------------------------
@pytest.fixture(scope="module")
def running_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from server_support import init_service_data, make_pki, start_service, write_service_config

    directory = tmp_path_factory.mktemp("fuzz-serve")
    pki = make_pki(directory / "pki")
    config = write_service_config(directory, pki)
    tenancy = init_service_data(config, pki)
    service = start_service(config)
    try:
        yield service, tenancy.acme_app
    finally:
        assert service.stop() == 0, "".join(service.stderr_lines)


def _exchange(socket_path: Path, raw: bytes) -> bytes:
    """Send `raw`, close our half, read until the service closes: its whole answer."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)  # a bound against a hang only: an answer takes milliseconds
        s.connect(str(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def _head_seeds(token: str) -> list[bytes]:
    auth = f"Authorization: Bearer {token}\r\n".encode()
    body = b'{"data": "aGVsbG8="}'
    return [
        b"GET /v1/keys HTTP/1.1\r\nHost: s\r\n" + auth + b"\r\n",
        b"POST /v1/keys/k/sign HTTP/1.1\r\nHost: s\r\n"
        + auth
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
        b"POST /v1/keys HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n"
        + auth
        + b'\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n',
    ]


HEAD_JUNK = st.sampled_from(
    [
        b"X: " + b"a" * 20_000 + b"\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"\x00\xff\r\n",
        b"Host: a\r\nHost: b\r\n",
        b"Authorization: Bearer \xff\xfe\r\n",
        b" folded: header\r\n",
    ]
)


@FUZZ
@given(data=st.data())
def test_service_request_heads(running_service: tuple[Any, str], data: st.DataObject) -> None:
    """Mutated request lines, headers and chunked bodies: every answer the service gives is
    an HTTP response below 500 (or none: it may just close), and it keeps serving."""
    service, token = running_service
    seed = data.draw(st.sampled_from(_head_seeds(token)))
    if data.draw(st.booleans()):
        raw = data.draw(mutated(seed))
    else:
        lines = seed.split(b"\r\n")
        i = data.draw(st.integers(1, max(1, len(lines) - 2)))
        raw = b"\r\n".join([*lines[:i], data.draw(HEAD_JUNK).rstrip(b"\r\n"), *lines[i:]])
    answer = _exchange(service.socket, raw)
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
        assert int(status_line.split()[1]) < 500 or b" 503 " in status_line, answer[:300]
        assert b"Traceback" not in answer
    assert service.process.poll() is None, "the service died"


def test_the_service_still_answers_after_the_head_fuzz(running_service: tuple[Any, str]) -> None:
    """The positive control, and proof that the fuzzed service still works."""
    service, token = running_service
    answer = _exchange(service.socket, _head_seeds(token)[0])
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


# -- the SSH agent's messages ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssh_agent_seeds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[bytes]]]:
    """A vault agent offering one key of each SSH type, and real messages to it: list, sign
    (each type, RSA with its flag; a login request), add (Ed25519, P-256, RSA; with a
    lifetime; restricted to a destination), remove, lock, unlock, query, and session-binds
    signed by a real host key and by a host certificate's key."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from sshagent_support import hop, restrict_destination, userauth_request

    from strongroom.sshagent import Agent, AgentSettings, keys, wire

    def add_message(private: Any) -> bytes:
        if isinstance(private, ed25519.Ed25519PrivateKey):
            seed = private.private_bytes_raw()
            public = private.public_key().public_bytes_raw()
            fields = wire.string(public) + wire.string(seed + public)
            name = "ssh-ed25519"
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            point = keys.key_blob(private.public_key())[-65:]
            fields = wire.string("nistp256") + wire.string(point)
            fields += wire.mpint(private.private_numbers().private_value)
            name = "ecdsa-sha2-nistp256"
        else:
            n = private.private_numbers()
            fields = b"".join(
                wire.mpint(v)
                for v in (n.public_numbers.n, n.public_numbers.e, n.d, n.iqmp, n.p, n.q)
            )
            name = "ssh-rsa"
        return bytes([wire.ADD_IDENTITY]) + wire.string(name) + fields + wire.string("c")

    with seed_keystore(tmp_path_factory, "fuzz-ssh-agent") as (ks, _data):
        ks.vault_control().initialize()
        for name, key_type in (("e", "ed25519"), ("p", "ecdsa-p256"), ("r", "rsa-2048")):
            ks.generate(name, key_type)
        agent = Agent(ks, AgentSettings(patterns=("*",), allow_add=True))
        blobs = [i.blob for i in agent.identities()]
        added = ed25519.Ed25519PrivateKey.generate()
        host = ed25519.Ed25519PrivateKey.generate()
        host_blob = keys.key_blob(host.public_key())
        sid = b"\x07" * 32
        bind = wire.string(host_blob) + wire.string(sid)
        bind += wire.string(wire.string("ssh-ed25519") + wire.string(host.sign(sid))) + b"\0"
        # A host certificate (draft-miller-ssh-cert) for a second host, signed by a CA.
        ca, certified = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        signed = (
            wire.string("ssh-ed25519-cert-v01@openssh.com")
            + wire.string(b"\1" * 32)  # nonce
            + wire.string(certified.public_key().public_bytes_raw())
            + wire.uint32(0)
            + wire.uint32(1)  # serial
            + wire.uint32(2)  # a host certificate
            + wire.string("host-id")
            + wire.string(wire.string("host"))  # principals
            + wire.uint32(0) * 2  # valid after
            + wire.uint32(0xFFFFFFFF) * 2  # valid before: forever
            + wire.string(b"") * 3  # critical options, extensions, reserved
            + wire.string(keys.key_blob(ca.public_key()))
        )
        cert = signed + wire.string(wire.string("ssh-ed25519") + wire.string(ca.sign(signed)))
        sid2 = b"\x08" * 32
        cert_bind = wire.string(cert) + wire.string(sid2)
        cert_bind += wire.string(wire.string("ssh-ed25519") + wire.string(certified.sign(sid2)))
        cert_bind += b"\0"
        seeds = [
            bytes([wire.REQUEST_IDENTITIES]),
            *(
                bytes([wire.SIGN_REQUEST]) + wire.string(b) + wire.string(b"m") + wire.uint32(2)
                for b in blobs
            ),
            add_message(added),
            add_message(ec.generate_private_key(ec.SECP256R1())),
            add_message(rsa.generate_private_key(65537, 2048)),
            bytes([wire.ADD_ID_CONSTRAINED])
            + add_message(added)[1:]
            + bytes([wire.CONSTRAIN_LIFETIME])
            + wire.uint32(600),
            bytes([wire.ADD_ID_CONSTRAINED])
            + add_message(added)[1:]
            + restrict_destination((hop(), hop("host", (host_blob,), "user*"))),
            bytes([wire.SIGN_REQUEST])
            + wire.string(blobs[0])
            + wire.string(userauth_request(sid, "user", blobs[0], "ssh-ed25519", host_blob))
            + wire.uint32(0),
            bytes([wire.REMOVE_IDENTITY]) + wire.string(keys.key_blob(added.public_key())),
            bytes([wire.LOCK]) + wire.string(b"pw"),
            bytes([wire.UNLOCK]) + wire.string(b"pw"),
            bytes([wire.EXTENSION]) + wire.string("query"),
            bytes([wire.EXTENSION]) + wire.string("session-bind@openssh.com") + bind,
            bytes([wire.EXTENSION]) + wire.string("session-bind@openssh.com") + cert_bind,
        ]
        yield agent, seeds


@FUZZ
@given(data=st.data())
def test_ssh_agent_messages(ssh_agent_seeds: tuple[Any, list[bytes]], data: st.DataObject) -> None:
    """The decoder and every parser behind it raise only AgentMessageError; the agent answers
    every message with one well-formed frame, and no message reaches its bug path (an
    untyped exception, logged at ERROR)."""
    import logging
    import struct

    from strongroom.errors import AgentMessageError
    from strongroom.sshagent import Peer, keys, policy, wire

    agent, seeds = ssh_agent_seeds
    body = data.draw(st.one_of(mutated(data.draw(st.sampled_from(seeds))), st.binary(max_size=64)))
    try:
        request = wire.decode(body)
        if isinstance(request, wire.SignRequest):
            policy.login_request(request.data)  # never raises: a non-login is None
        if isinstance(request, wire.AddIdentity):
            for code, constraint in request.constraints:
                if code == wire.CONSTRAIN_EXTENSION:
                    extension = wire.Reader(constraint)
                    if extension.name() == wire.RESTRICT_DESTINATION:
                        policy.destination_constraints(extension.string())
            keys.added_key(request)
        elif isinstance(request, wire.Extension) and request.name == "session-bind@openssh.com":
            bind = wire.session_bind(request.contents)
            keys.verify_session_signature(bind.host_key, bind.session_id, bind.signature)
    except AgentMessageError:
        pass

    bugs: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = bugs.append  # type: ignore[method-assign]
    logger = logging.getLogger("strongroom.sshagent")
    logger.addHandler(handler)
    try:
        reply = agent.handle(body, Peer(os.getpid(), os.getuid()))
    finally:
        logger.removeHandler(handler)
        if agent.locked:  # a mutated LOCK: undo it, so later cases see the keys
            agent._lock_mac = None
    assert not bugs, [r.getMessage() for r in bugs]
    assert struct.unpack(">I", reply[:4])[0] == len(reply) - 4 >= 1


def test_every_ssh_agent_seed_is_served(ssh_agent_seeds: tuple[Any, list[bytes]]) -> None:
    """The positive control: unmutated, no seed is refused (in order: add before remove, lock
    before unlock)."""
    from strongroom.sshagent import Peer

    agent, seeds = ssh_agent_seeds
    for body in seeds:
        reply = agent.handle(body, Peer(os.getpid(), os.getuid()))
        assert reply[4] != 5, body[:1]


# -- the PKCS#11 server's requests ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pkcs11_seeds(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Callable[..., Any], dict[int, list[bytes]]]]:
    """A vault token with a P-256 and an RSA key, a way to open a logged-in client connection
    of a protocol version to it, and real requests (by version: each mechanism encoded as
    that version does):
    info, slots, token, mechanisms, find (with a nested template), get attributes, sign,
    verify, a raw CKM_RSA_PKCS sign, AES-GCM decrypt in parts, encrypt, generate key (pair)
    and destroy (refused: the session is read-only), random."""
    import struct

    from strongroom.pkcs11server import Connection, Settings, TokenSpec, ck, wire

    def u(v: int) -> bytes:
        return struct.pack(">Q", v)

    def ay(data: bytes) -> bytes:
        return b"\x01" + wire.byte_array(data)

    def attr_ulong(kind: int, v: int) -> bytes:
        return struct.pack(">IBI", kind, 1, 8) + u(v)

    version = 0  # the mechanism encoding the seeds below are built in (2: p11-kit 0.25.6)

    def mech(kind: int) -> bytes:  # each one used here is parameterless in version 2
        return struct.pack(">I", kind) + (b"" if version >= 2 else wire.byte_array(None))

    def params(kind: int, encoded: bytes) -> bytes:  # version 2: a presence byte first
        return struct.pack(">I", kind) + (b"\x01" if version >= 2 else b"") + encoded

    def gcm(iv: bytes, aad: bytes) -> bytes:  # CK_GCM_PARAMS as p11-kit 0.25 encodes it
        return params(ck.CKM_AES_GCM, wire.byte_array(iv) + u(96) + wire.byte_array(aad)
                      + u(128))  # fmt: skip

    def oaep() -> bytes:
        return params(ck.CKM_RSA_PKCS_OAEP, u(ck.CKM_SHA256) + u(ck.CKG_MGF1_SHA256)
                      + u(ck.CKZ_DATA_SPECIFIED) + wire.byte_array(b""))  # fmt: skip

    with seed_keystore(tmp_path_factory, "fuzz-pkcs11") as (ks, _data):
        ks.vault_control().initialize()
        ks.generate("p", "ecdsa-p256")
        ks.generate("r", "rsa-2048", usage="sign,verify,encrypt,decrypt")
        ks.generate("s-aes", "aes-256")  # handle 5, after p's and r's objects
        sealed = ks.encrypt("s-aes", b"m", b"h")

        def connection(version: int = 0) -> Any:
            """A client connection of `version` initialised, with session 1 open and logged
            in."""
            conn = Connection(ks, Settings((TokenSpec("t", ("*",)),), pin="1234"), version)
            for body in (
                wire.request("C_Initialize", ay(wire.HANDSHAKE), b"\x00", ay(b"")),
                wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)),
                wire.request("C_Login", u(1), u(ck.CKU_USER), ay(b"1234")),
                wire.request("C_FindObjectsInit", u(1), struct.pack(">I", 0)),  # handles 1-5
                wire.request("C_FindObjectsFinal", u(1)),
            ):
                assert conn.handle(body)[:4] != b"\x00\x00\x00\x00"
            return conn

        nested = struct.pack(">IBI", ck.CKA_WRAP_TEMPLATE, 1, 24) + struct.pack(">I", 1)
        nested += attr_ulong(ck.CKA_CLASS, ck.CKO_PRIVATE_KEY)

        def requests() -> list[bytes]:
            return [
                wire.request("C_GetInfo"),
                wire.request("C_GetSlotList", b"\x01", struct.pack(">I", 8)),
                wire.request("C_GetTokenInfo", u(0)),
                wire.request("C_GetMechanismList", u(0), struct.pack(">I", 0)),
                wire.request("C_GetMechanismInfo", u(0), u(ck.CKM_ECDSA)),
                wire.request(
                    "C_FindObjectsInit", u(1), struct.pack(">I", 2)
                    + attr_ulong(ck.CKA_CLASS, ck.CKO_PRIVATE_KEY) + nested
                ),
                wire.request("C_FindObjects", u(1), struct.pack(">I", 10)),
                wire.request("C_FindObjectsFinal", u(1)),
                wire.request(
                    "C_GetAttributeValue", u(1), u(1),
                    struct.pack(">I", 3) + struct.pack(">II", ck.CKA_EC_POINT, 0)
                    + struct.pack(">II", ck.CKA_LABEL, 64) + struct.pack(">II", ck.CKA_VALUE, 64),
                ),
                wire.request("C_SignInit", u(1), mech(ck.CKM_ECDSA), u(1)),
                wire.request("C_Sign", u(1), ay(b"\x01" * 32), struct.pack(">I", 64)),
                wire.request("C_VerifyInit", u(1), mech(ck.CKM_SHA256_RSA_PKCS), u(4)),
                wire.request("C_Verify", u(1), ay(b"m"), ay(b"\x00" * 256)),
                wire.request("C_SignInit", u(1), mech(ck.CKM_RSA_PKCS), u(3)),
                wire.request("C_Sign", u(1), ay(bytes.fromhex("3021300906052b0e03021a05000414")
                                                 + b"\x02" * 20), struct.pack(">I", 256)),
                wire.request("C_DecryptInit", u(1), gcm(sealed[:12], b"h"), u(5)),
                wire.request("C_DecryptUpdate", u(1), ay(sealed[12:15]), struct.pack(">I", 64)),
                wire.request("C_DecryptUpdate", u(1), ay(sealed[15:]), struct.pack(">I", 64)),
                wire.request("C_DecryptFinal", u(1), struct.pack(">I", 64)),
                wire.request("C_EncryptInit", u(1), oaep(), u(4)),
                wire.request("C_Encrypt", u(1), ay(b"to r"), struct.pack(">I", 256)),
                # the session is read-only: these two are refused, after their templates decode
                wire.request("C_GenerateKey", u(1), mech(ck.CKM_AES_KEY_GEN), struct.pack(">I", 2)
                             + attr_ulong(ck.CKA_VALUE_LEN, 32)
                             + struct.pack(">IBI", ck.CKA_LABEL, 1, 3) + wire.byte_array(b"new")),
                wire.request("C_GenerateKeyPair", u(1), mech(ck.CKM_EC_KEY_PAIR_GEN),
                             struct.pack(">I", 1) + struct.pack(">IBI", ck.CKA_EC_PARAMS, 1, 10)
                             + wire.byte_array(bytes.fromhex("06082a8648ce3d030107")),
                             struct.pack(">I", 1) + struct.pack(">IBI", ck.CKA_SIGN, 1, 1)
                             + b"\x01"),
                wire.request("C_DestroyObject", u(1), u(5)),
                wire.request("C_GenerateRandom", u(1), struct.pack(">I", 16)),
                wire.request("C_Logout", u(1)),
            ]  # fmt: skip

        seeds = {0: requests()}
        version = 2
        seeds[2] = requests()
        # CKM_AES_GCM with the presence byte 0, no CK_GCM_PARAMS: CKR_MECHANISM_PARAM_INVALID
        bare_gcm = struct.pack(">IB", ck.CKM_AES_GCM, 0)
        seeds[2].insert(-1, wire.request("C_DecryptInit", u(1), bare_gcm, u(5)))
        yield connection, seeds


Pkcs11Seeds = tuple[Callable[..., Any], dict[int, list[bytes]]]


@pytest.fixture(scope="module")
def pkcs11_fuzzed(pkcs11_seeds: Pkcs11Seeds) -> dict[int, Any]:
    """The connection of each protocol version the fuzzed requests share (its state drifts
    as they run; a new one replaces it once it is logged out or finalised)."""
    return {}


@FUZZ
@pytest.mark.parametrize("version", [0, 2])
@given(data=st.data())
def test_pkcs11_requests(
    pkcs11_seeds: Pkcs11Seeds, pkcs11_fuzzed: dict[int, Any], version: int, data: st.DataObject
) -> None:
    """The decoder raises only Pkcs11MessageError; the server answers every request body with
    one well-formed reply (its call's, or ERROR with a CK_RV) and never raises, in version
    0's mechanism encoding and in version 2's (a presence byte before parameters)."""
    from strongroom.errors import Pkcs11MessageError
    from strongroom.pkcs11server import wire

    connection, seeds = pkcs11_seeds[0], pkcs11_seeds[1][version]
    conn = pkcs11_fuzzed.get(version)
    if conn is None or not conn.initialized or 1 not in conn.sessions or not conn.logged_in:
        conn = pkcs11_fuzzed[version] = connection(version)  # logged in, handles 1-5 found
    body = data.draw(st.one_of(mutated(data.draw(st.sampled_from(seeds))), st.binary(max_size=64)))
    for v in (1, 2):  # the decoder alone, in both mechanism encodings
        with contextlib.suppress(Pkcs11MessageError):
            wire.decode(body, v)
    reply = conn.handle(body)
    call_id = int.from_bytes(reply[:4], "big")
    assert call_id < len(wire.CALLS)
    assert reply[4:8] == len(wire.CALLS[call_id][2]).to_bytes(4, "big")
    for session in conn.sessions.values():  # a mutated C_OpenSession may ask for read-write:
        session.rw = False  # no fuzzed request makes or destroys keys the seeds use


@pytest.mark.parametrize("version", [0, 2])
def test_every_pkcs11_seed_is_served(pkcs11_seeds: Pkcs11Seeds, version: int) -> None:
    """The positive control: unmutated, each seed but the bad-signature verify, the calls
    that need a read-write session and (version 2) CKM_AES_GCM without parameters succeeds,
    on a fresh connection (the fuzzed one may be left mid-operation by a mutated request)."""
    from strongroom.pkcs11server import ck, wire

    connection, seeds = pkcs11_seeds[0], pkcs11_seeds[1][version]
    conn = connection(version)
    for body in seeds:
        reply = conn.handle(body)
        failed = reply[:4] == b"\x00\x00\x00\x00"
        name = wire.CALLS[int.from_bytes(body[:4], "big")][0]
        if version == 2 and body is seeds[-2]:  # the parameterless CKM_AES_GCM
            assert reply == wire.error(ck.CKR_MECHANISM_PARAM_INVALID)
            continue
        refused = body is seeds[12] or name in ("C_GenerateKey", "C_GenerateKeyPair",
                                                 "C_DestroyObject")  # fmt: skip
        assert failed == refused, name


# -- the KMIP TTLV decoder ---------------------------------------------------------------------
def _kmip_seed() -> bytes:
    from strongroom.kmip import ttlv
    from strongroom.kmip.ttlv import Item, Type, structure

    return ttlv.encode(
        structure(
            0x420078,
            structure(0x420077, Item(0x42000D, Type.INTEGER, 1)),
            Item(0x420094, Type.TEXT_STRING, "kmip-0123"),
            Item(0x420003, Type.BIG_INTEGER, 1 << 70),
            Item(0x420006, Type.BOOLEAN, True),
            Item(0x4200C2, Type.BYTE_STRING, b"data"),
        )
    )


@FUZZ
@given(data=st.data())
def test_kmip_ttlv_decode(data: st.DataObject) -> None:
    from strongroom.kmip import ttlv

    blob = data.draw(mutated(_kmip_seed()))
    with contextlib.suppress(StrongroomError):
        item = ttlv.decode(blob)
        assert ttlv.decode(ttlv.encode(item)) == item
