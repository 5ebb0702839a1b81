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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strongroom
from strongroom import envelope, strictjson
from strongroom.audit import verify_log
from strongroom.backends.vault import snapshot
from strongroom.errors import StrongroomError
from strongroom.keystore import verify_attestation

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
    return (data / "vault.snapshot").read_bytes()


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
