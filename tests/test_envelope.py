"""Envelope encryption (docs/envelope.md) with a vault KEK: round trips, the STREAM checks
(truncation, reordering, bit flips, appended data), wrong keys, rewrap, the CLI, and memory
that stays flat for a 1 GiB stream."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, run_cli, write_vault_config

import strongroom
from strongroom import envelope
from strongroom.errors import (
    DataFormatError,
    DataTruncated,
    IntegrityError,
    KeyNotFound,
    PolicyViolation,
    VersionRetired,
)
from strongroom.keystore import Keystore

CHUNK = 1024  # small chunks: many of them in little data
TAG = envelope.TAG


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    return write_vault_config(tmp_path)


@pytest.fixture
def ks(config: Path) -> Iterator[Keystore]:
    with strongroom.open(config) as keystore:
        keystore.generate("kek", "aes-256")
        yield keystore


def seal(ks: Keystore, data: bytes, key: str = "kek", chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    ks.encrypt_stream(key, io.BytesIO(data), out, chunk_size=chunk)
    return out.getvalue()


def unseal(ks: Keystore, blob: bytes) -> bytes:
    out = io.BytesIO()
    ks.decrypt_stream(io.BytesIO(blob), out)
    return out.getvalue()


def payload_offset(blob: bytes) -> int:
    """Where the first chunk starts: after magic, format, length, header and MAC."""
    (length,) = struct.unpack_from(">I", blob, len(envelope.MAGIC) + 1)
    return len(envelope.MAGIC) + 1 + 4 + length + envelope.MAC_SIZE


def chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    start = payload_offset(blob)
    body = blob[start:]
    step = CHUNK + TAG
    return blob[:start], [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_sizes(ks: Keystore, size: int) -> None:
    data = os.urandom(size)
    blob = seal(ks, data)
    _, parts = chunks(blob)
    assert len(parts) == max(1, -(-size // CHUNK))  # one chunk per CHUNK bytes; empty: one
    assert size < 16 or data not in blob
    assert unseal(ks, blob) == data


def test_header_names_key_version_and_algorithm(ks: Keystore) -> None:
    blob = seal(ks, b"hello")
    header, _, _ = envelope.read_header(io.BytesIO(blob))
    assert (header.key, header.version, header.key_type) == ("kek", 1, "aes-256")
    assert header.aead == "aes-256-gcm" and header.chunk_size == CHUNK
    doc = header.to_dict()
    assert doc["kek"]["namespace"] == "default" and len(header.nonce_prefix) == 7
    # two messages: two data keys, salts and nonce prefixes
    other, _, _ = envelope.read_header(io.BytesIO(seal(ks, b"hello")))
    assert other.wrapped_key != header.wrapped_key and other.salt != header.salt
    assert other.nonce_prefix != header.nonce_prefix


def test_truncation_is_detected(ks: Keystore) -> None:
    blob = seal(ks, os.urandom(4 * CHUNK + 100))
    head, parts = chunks(blob)
    for keep in range(1, len(parts)):  # cut at every chunk boundary
        with pytest.raises(DataTruncated, match="ends early"):
            unseal(ks, head + b"".join(parts[:keep]))
    with pytest.raises(DataTruncated):
        unseal(ks, head)  # no chunk at all
    with pytest.raises(IntegrityError):
        unseal(ks, blob[:-5])  # cut inside the final chunk
    with pytest.raises(IntegrityError):
        unseal(ks, head + parts[0][: CHUNK // 2])  # cut inside a chunk
    with pytest.raises(DataTruncated):
        unseal(ks, blob[: len(head) - 10])  # cut inside the header


def test_reordering_dropping_and_appending_are_detected(ks: Keystore) -> None:
    data = os.urandom(4 * CHUNK)  # a multiple of the chunk size: the last chunk is full
    blob = seal(ks, data)
    head, parts = chunks(blob)
    swapped = [parts[1], parts[0], *parts[2:]]
    with pytest.raises(IntegrityError, match="chunk 0"):
        unseal(ks, head + b"".join(swapped))
    dropped = [parts[0], *parts[2:]]
    with pytest.raises(IntegrityError, match="chunk 1"):
        unseal(ks, head + b"".join(dropped))
    last_moved = [parts[0], parts[3], parts[1], parts[2]]
    with pytest.raises(IntegrityError, match="chunk 1"):
        unseal(ks, head + b"".join(last_moved))
    with pytest.raises(IntegrityError, match="data follows the final chunk"):
        unseal(ks, blob + parts[1])
    with pytest.raises(IntegrityError):
        unseal(ks, blob + b"x")
    # a chunk from another message (another data key) does not fit either
    _, foreign = chunks(seal(ks, data))
    with pytest.raises(IntegrityError, match="chunk 2"):
        unseal(ks, head + b"".join([parts[0], parts[1], foreign[2], parts[3]]))


def test_every_bit_flip_region_is_detected(ks: Keystore) -> None:
    data = os.urandom(2 * CHUNK + 10)
    blob = seal(ks, data)
    start = payload_offset(blob)
    positions = [
        0,  # magic
        len(envelope.MAGIC),  # format version
        len(envelope.MAGIC) + 3,  # header length
        start - envelope.MAC_SIZE - 3,  # header JSON
        start - 5,  # header MAC
        start,  # first chunk
        start + CHUNK + TAG - 1,  # first chunk's tag
        start + CHUNK + TAG + 5,  # second chunk
        len(blob) - 1,  # final tag
    ]
    for pos in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= bit
            with pytest.raises(IntegrityError):  # DataFormatError, DataTruncated are kinds of it
                unseal(ks, bytes(bad))


def test_header_fields_are_authenticated(ks: Keystore) -> None:
    ks.generate("other", "aes-256")
    blob = seal(ks, b"x" * 3000)
    header, raw, mac = envelope.read_header(io.BytesIO(blob))
    rest = blob[len(raw) + len(mac) :]

    def rebuilt(**changes: object) -> bytes:
        fields = {**header.__dict__, **changes}
        h = envelope.EnvelopeHeader(**fields)  # type: ignore[arg-type]
        return h.encode() + mac + rest

    with pytest.raises(IntegrityError):
        unseal(ks, rebuilt(key="other"))  # the wrong KEK cannot unwrap the data key
    with pytest.raises(IntegrityError, match="header failed authentication"):
        unseal(ks, rebuilt(nonce_prefix=b"\x00" * 7))
    with pytest.raises(IntegrityError, match="header failed authentication"):
        unseal(ks, rebuilt(chunk_size=2048))
    with pytest.raises(IntegrityError, match="does not match"):
        unseal(ks, rebuilt(version=2))
    with pytest.raises(KeyNotFound):
        unseal(ks, rebuilt(key="nobody"))
    with pytest.raises(DataFormatError, match="canonical"):
        body = b" " + raw[len(envelope.MAGIC) + 5 :]  # same JSON, one space more
        lead = envelope.MAGIC + b"\x01" + struct.pack(">I", len(body))
        unseal(ks, lead + body + mac + rest)
    with pytest.raises(DataFormatError, match="bad magic"):
        unseal(ks, b"not an envelope at all")
    with pytest.raises(DataFormatError, match="format 2"):
        unseal(ks, envelope.MAGIC + b"\x02" + blob[len(envelope.MAGIC) + 1 :])


def test_kek_rules_apply(ks: Keystore) -> None:
    ks.generate("enc-only", "aes-256", usage="encrypt")
    blob = seal(ks, b"data", key="enc-only")
    with pytest.raises(PolicyViolation, match="decrypt"):
        unseal(ks, blob)  # the KEK may not decrypt
    ks.generate("signer", "ed25519")
    with pytest.raises(PolicyViolation):
        seal(ks, b"data", key="signer")
    blob = seal(ks, b"data")
    ks.disable("kek")
    with pytest.raises(PolicyViolation, match="disabled"):
        unseal(ks, blob)
    ks.enable("kek")


def test_rotation_and_rewrap_of_an_envelope(ks: Keystore) -> None:
    data = os.urandom(3 * CHUNK + 1)
    old = seal(ks, data)
    ks.rotate("kek")
    new = seal(ks, data)
    assert envelope.read_header(io.BytesIO(new))[0].version == 2
    assert unseal(ks, old) == data and unseal(ks, new) == data
    out = io.BytesIO()
    moved = envelope.rewrap_stream(ks, io.BytesIO(old), out)
    assert moved.version == 2
    # only the header changed: the chunks are the very same bytes
    assert out.getvalue()[payload_offset(out.getvalue()) :] == old[payload_offset(old) :]
    ks.set_min_decryption_version("kek", 2)
    with pytest.raises(VersionRetired):
        unseal(ks, old)
    assert unseal(ks, out.getvalue()) == data


def test_cli_encrypt_decrypt_files_and_streams(config: Path, tmp_path: Path) -> None:
    def ok(*args: str, input: bytes = b"") -> bytes:
        r = run_cli(config, *args, input=input)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ok("key", "generate", "kek", "--type", "aes-256")
    data = os.urandom(300_000)
    src, enc, back = tmp_path / "plain", tmp_path / "plain.sre", tmp_path / "back"
    src.write_bytes(data)
    header = json.loads(
        ok("--json", "encrypt", "--key", "kek", "--in", str(src), "--out", str(enc))
    )
    assert header["kek"]["key"] == "kek" and header["kek"]["version"] == 1
    assert enc.stat().st_mode & 0o777 == 0o600
    ok("decrypt", "--in", str(enc), "--out", str(back))
    assert back.read_bytes() == data
    # through pipes
    blob = ok("encrypt", "--key", "kek", input=data)
    assert ok("decrypt", input=blob) == data
    # a damaged envelope: one line, exit 9, and no output file (an old one is left alone)
    back.write_bytes(b"previous contents")
    damaged = bytearray(enc.read_bytes())
    damaged[-100] ^= 1
    enc.write_bytes(bytes(damaged))
    r = run_cli(config, "decrypt", "--in", str(enc), "--out", str(back))
    assert r.returncode == 9 and r.stderr.count("\n") == 1 and "failed authentication" in r.stderr
    assert back.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".back")) == []
    last_chunk = len(data) % envelope.DEFAULT_CHUNK + TAG
    r = run_cli(config, "decrypt", input=blob[: len(blob) - last_chunk])  # at a chunk boundary
    assert r.returncode == 9 and "ends early" in r.stderr
    # rewrap after a rotation moves the envelope to version 2
    ok("key", "rotate", "kek")
    moved = ok("key", "rewrap", "kek", input=blob)
    assert envelope.read_header(io.BytesIO(moved))[0].version == 2
    assert ok("decrypt", input=moved) == data
    r = run_cli(config, "encrypt", "--key", "nope", input=b"x")
    assert r.returncode == 3 and "no key named 'nope'" in r.stderr
    ok("key", "generate", "other", "--type", "aes-256")
    r = run_cli(config, "key", "rewrap", "other", input=blob)
    assert r.returncode == 2 and "encrypted to key 'kek', not 'other'" in r.stderr


def test_cli_progress_bar_only_on_a_terminal(config: Path, tmp_path: Path) -> None:
    import pty

    from conftest import PYCACHE, STRONGROOM_BIN

    assert run_cli(config, "key", "generate", "kek", "--type", "aes-256").returncode == 0
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(9 << 20)  # 9 MiB: above the 8 MiB threshold
    env = {
        **os.environ,
        "STRONGROOM_CONFIG": str(config),
        VAULT_PASS_ENV: VAULT_PASSPHRASE,
        "PYTHONPYCACHEPREFIX": str(PYCACHE),
    }
    args = [str(STRONGROOM_BIN), "encrypt", "--key", "kek", "--in", str(big)]
    main, side = pty.openpty()
    try:
        p = subprocess.run(
            [*args, "--out", str(tmp_path / "big.sre")],
            stderr=side,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=60,
            check=False,
        )
        os.close(side)
        seen = b""
        while True:
            try:
                piece = os.read(main, 65536)
            except OSError:
                break
            if not piece:
                break
            seen += piece
    finally:
        os.close(main)
    assert p.returncode == 0
    assert b"encrypting" in seen and b"100%" in seen
    # stderr not a terminal: no bar
    r = run_cli(config, *args[1:], "--out", str(tmp_path / "big2.sre"))
    assert r.returncode == 0 and r.stderr == ""
    r = run_cli(config, "decrypt", "--in", str(tmp_path / "big.sre"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0 and (tmp_path / "b").read_bytes() == bytes(9 << 20)


# -- memory stays flat for a 1 GiB stream ---------------------------------------------------------
_FLAT_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, resource, sys, threading
    import strongroom

    GIB = 1 << 30
    block = os.urandom(1 << 20)

    class Source:
        # 1 GiB of data made up on the fly, hashed as it is read
        def __init__(self):
            self.left, self.hash = GIB, hashlib.blake2b()
        def readinto(self, view):
            n = min(len(view), self.left)
            off = (GIB - self.left) % len(block)
            n = min(n, len(block) - off)
            view[:n] = block[off:off + n]
            self.hash.update(view[:n])
            self.left -= n
            return n

    class Sink:
        def __init__(self):
            self.size, self.hash = 0, hashlib.blake2b()
        def write(self, data):
            self.size += len(data)
            self.hash.update(data)
            return len(data)

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    with strongroom.open(sys.argv[1]) as ks:
        ks.generate("kek", "aes-256")
        r, w = os.pipe()
        src, sink = Source(), Sink()
        with open(r, "rb") as reader, open(w, "wb") as writer:
            # warm up: one small round trip through both directions
            import io
            small = io.BytesIO()
            ks.encrypt_stream("kek", io.BytesIO(b"x" * 200000), small)
            ks.decrypt_stream(io.BytesIO(small.getvalue()), io.BytesIO())
            before = rss()
            def produce():
                try:
                    ks.encrypt_stream("kek", src, writer)
                finally:
                    writer.close()
            t = threading.Thread(target=produce)
            t.start()
            ks.decrypt_stream(reader, sink)
            t.join()
        after = rss()
    assert sink.size == GIB, sink.size
    assert sink.hash.digest() == src.hash.digest()
    print(before, after)
    """
)


def test_one_gib_stream_with_flat_memory(config: Path) -> None:
    env = {**os.environ, VAULT_PASS_ENV: VAULT_PASSPHRASE}
    p = subprocess.run(
        [sys.executable, "-c", _FLAT_SCRIPT, str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    before, after = (int(x) for x in p.stdout.split())
    growth_kib = after - before
    assert growth_kib < 16 * 1024, f"peak RSS grew by {growth_kib} KiB over a 1 GiB stream"


def test_format_matches_docs_envelope_md(ks: Keystore) -> None:
    """Decode an envelope following docs/envelope.md alone, with `cryptography` only: an
    exportable vault AES key as the KEK, so its material (and the data key) can be read."""
    import base64
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    ks.generate("open-kek", "aes-256", exportable=True)
    data = os.urandom(5000)
    blob = seal(ks, data, key="open-kek", chunk=2048)
    kek = ks.export_key("open-kek", "raw")
    assert blob[:6] == b"SRENV\x00" and blob[6] == 1
    (length,) = struct.unpack(">I", blob[7:11])
    header = json.loads(blob[11 : 11 + length])
    mac = blob[11 + length : 43 + length]
    wrapped = base64.b64decode(header["wrapped_key"])
    assert wrapped[:4] == b"SRK\x01" and struct.unpack(">I", wrapped[4:8])[0] == 1
    body = wrapped[8:]  # the vault's AES-GCM output: nonce(12) | ciphertext | tag
    data_key = AESGCM(kek).decrypt(body[:12], body[12:], b"strongroom-envelope/1 data key")
    okm = HKDF(
        hashes.SHA256(),
        64,
        base64.b64decode(header["salt"]),
        b"strongroom-envelope/1 header-mac+payload",
    ).derive(data_key)
    assert hmac.compare_digest(
        hmac.new(okm[:32], blob[: 11 + length], hashlib.sha256).digest(), mac
    )
    prefix = base64.b64decode(header["nonce_prefix"])
    step = header["chunk_size"] + 16
    payload = blob[43 + length :]
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)]
    out = b"".join(
        AESGCM(okm[32:]).decrypt(prefix + struct.pack(">IB", i, i == len(pieces) - 1), piece, None)
        for i, piece in enumerate(pieces)
    )
    assert out == data
