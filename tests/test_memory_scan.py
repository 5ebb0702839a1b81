"""Proof that a running vault keeps no key in readable process memory.

A child process runs a vault and, for every key type it holds, imports keys this process
made (raw, DER and PEM, each from a bytearray it wipes at once), generates keys, and uses
all of them: sign, verify, MAC, encrypt/decrypt, RSA-OAEP decrypt, ECDH/X25519 agreement
and export in every format (each export result scrubbed at once). It sends the generated
and agreed keys here over a pipe (then scrubs its copy), since this process cannot know
them otherwise. This process then reads every readable mapping of the child through
/proc/PID/maps and /proc/PID/mem and counts copies of each secret: every private scalar
and seed, every symmetric key, RSA's d, p, q, dmp1, dmq1 and iqmp, every ECDH/X25519
shared secret and every agreed key, each also byte-reversed (BIGNUM limbs are little-
endian). Unreadable regions (memfd_secret) count as clean. A secret the child deliberately
leaves in a plain bytearray must be found: the positive control.

Once is not proof that no copy is ever left (freed memory may or may not be reused);
bench/memscan_loop.py runs this test many times in a row.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from strongroom import memory

# The child reads length-prefixed fields: name, type, format, material.
CHILD = textwrap.dedent(
    """
    import os, struct, sys
    import strongroom
    from strongroom.memory import scrub_bytes
    from strongroom.types import KeyType

    config, in_fd, out_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def read_exact(n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            got += os.readv(in_fd, [view[got:]])
        view.release()
        return buf

    def field():
        return read_exact(struct.unpack(">I", read_exact(4))[0])

    items = []
    while True:
        name = field().decode()
        if name == "":
            break
        items.append((name, field().decode(), field().decode(), field()))
    control = field()  # left in place: the positive control
    os.close(in_fd)

    def send(name, secret):
        os.write(out_fd, struct.pack(">I", len(name)) + name.encode())
        os.write(out_fd, struct.pack(">I", len(secret)) + secret)
        scrub_bytes(secret)

    def every(key_type):
        return sorted(u.value for u in KeyType.parse(key_type).allowed_usage)

    EXPORTS = {
        "ed25519": ("raw", "der", "pem"), "x25519": ("raw", "der", "pem"),
        "aes-256": ("raw",), "chacha20-poly1305": ("raw",), "hmac-sha256": ("raw",),
        "ecdsa-p256": ("raw", "der", "pem"), "ecdsa-p384": ("raw", "der", "pem"),
        "secp256k1": ("raw", "der", "pem"), "rsa-2048": ("der", "pem"),
    }
    with strongroom.open(config) as ks:
        keys = []
        for name, key_type, fmt, material in items:
            ks.import_key(
                name, key_type, material, format=fmt, exportable=True, usage=every(key_type)
            )
            material[:] = bytes(len(material))
            keys.append((name, key_type))
        for key_type in EXPORTS:
            name = "gen-" + key_type
            ks.generate(name, key_type, exportable=True, usage=every(key_type))
            keys.append((name, key_type))
            # the generated key travels to the parent, which scans for its components
            send(name, ks.export_key(name, "raw" if key_type != "rsa-2048" else "der"))
        by_type = {}
        for name, key_type in keys:
            by_type.setdefault(key_type, []).append(name)
        for round_ in range(3):
            message = b"message %d" % round_
            for name, key_type in keys:
                if key_type in ("ed25519", "ecdsa-p256", "ecdsa-p384", "secp256k1"):
                    ks.verify(name, message, ks.sign(name, message))
                elif key_type == "rsa-2048":
                    for alg in ("pkcs1v15", "pss"):
                        ks.verify(name, message, ks.sign(name, message, alg), alg)
                    for alg in ("oaep-sha256", "oaep-sha1"):
                        ct = ks.encrypt(name, message, algorithm=alg)
                        assert ks.decrypt(name, ct, algorithm=alg) == message
                elif key_type == "hmac-sha256":
                    ks.verify(name, message, ks.sign(name, message))
                elif key_type in ("aes-256", "chacha20-poly1305"):
                    assert ks.decrypt(name, ks.encrypt(name, message, b"aad"), b"aad") == message
        for key_type in ("x25519", "ecdsa-p256", "ecdsa-p384", "secp256k1"):
            names = by_type[key_type]
            for mine, peer in zip(names, names[1:] + names[:1]):
                agreed = "agreed-" + mine
                ks.agree(mine, ks.public_key(peer), agreed, "aes-256", exportable=True)
                key = ks.export_key(agreed, "raw")
                assert ks.decrypt(agreed, ks.encrypt(agreed, b"m")) == b"m"
                send(agreed + "|" + peer, key)
        for name, key_type in keys:
            for fmt in EXPORTS[key_type]:
                scrub_bytes(ks.export_key(name, fmt))
        os.write(out_fd, struct.pack(">I", 0))
        os.close(out_fd)
        print("ready", flush=True)
        sys.stdin.readline()
    """
)

EC_CURVES = {
    "ecdsa-p256": ec.SECP256R1(),
    "ecdsa-p384": ec.SECP384R1(),
    "secp256k1": ec.SECP256K1(),
}
_NOENC = serialization.NoEncryption()
_PKCS8 = serialization.PrivateFormat.PKCS8
_TRAD = serialization.PrivateFormat.TraditionalOpenSSL


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _secrets_of(name: str, key: object) -> dict[str, bytes]:
    """The byte strings that must never be found for `key`."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return {name: key.private_numbers().private_value.to_bytes(size, "big")}
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        parts = {"d": n.d, "p": n.p, "q": n.q, "dmp1": n.dmp1, "dmq1": n.dmq1, "iqmp": n.iqmp}
        return {f"{name}.{part}": _int_bytes(v) for part, v in parts.items()}
    if isinstance(key, ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NOENC)
        return {name: raw}
    raise AssertionError(f"no secrets known for {type(key).__name__}")


def _imports() -> Iterator[tuple[str, str, str, bytes, object]]:
    """(name, key type, format, material, private key object) for every import case."""
    for key_type in ("aes-256", "chacha20-poly1305", "hmac-sha256"):
        yield f"{key_type}-raw", key_type, "raw", secrets.token_bytes(32), None
    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NOENC
    for key_type, cls in (
        ("ed25519", ed25519.Ed25519PrivateKey),
        ("x25519", x25519.X25519PrivateKey),
    ):
        yield f"{key_type}-raw", key_type, "raw", (k := cls.generate()).private_bytes(*raw), k
        der = (k := cls.generate()).private_bytes(serialization.Encoding.DER, _PKCS8, _NOENC)
        yield f"{key_type}-der", key_type, "der", der, k
        pem = (k := cls.generate()).private_bytes(serialization.Encoding.PEM, _PKCS8, _NOENC)
        yield f"{key_type}-pem", key_type, "pem", pem, k
    for key_type, curve in EC_CURVES.items():
        k = ec.generate_private_key(curve)
        yield f"{key_type}-raw", key_type, "raw", _secrets_of("", k)[""], k
        for label, fmt, enc, form in (
            ("der", "der", serialization.Encoding.DER, _PKCS8),
            ("sec1", "der", serialization.Encoding.DER, _TRAD),
            ("pem", "pem", serialization.Encoding.PEM, _PKCS8),
            ("sec1pem", "pem", serialization.Encoding.PEM, _TRAD),
        ):
            k = ec.generate_private_key(curve)
            yield f"{key_type}-{label}", key_type, fmt, k.private_bytes(enc, form, _NOENC), k
    for fmt, enc, form in (
        ("der", serialization.Encoding.DER, _PKCS8),
        ("pkcs1", serialization.Encoding.DER, _TRAD),
        ("pem", serialization.Encoding.PEM, _PKCS8),
    ):
        k = rsa.generate_private_key(65537, 2048)
        yield (
            f"rsa-2048-{fmt}",
            "rsa-2048",
            fmt if fmt != "pkcs1" else "der",
            k.private_bytes(enc, form, _NOENC),
            k,
        )


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_sent(fd: int) -> Iterator[tuple[str, bytes]]:
    with os.fdopen(fd, "rb") as f:

        def field() -> bytes:
            head = f.read(4)
            assert len(head) == 4, "the child stopped early (its stderr is above)"
            return f.read(struct.unpack(">I", head)[0])

        while name := field():
            yield name.decode(), field()


def _received_secrets(name: str, key_type: str, data: bytes) -> dict[str, bytes]:
    """The secrets of a key the child generated (and exported) or agreed."""
    if key_type == "rsa-2048":
        return _secrets_of(name, serialization.load_der_private_key(data, None))
    return {name: data}  # raw: the scalar, seed or symmetric key itself


_WORD = 8
"""A needle of at least 2 * _WORD - 1 bytes covers one whole aligned 8-byte word wherever it
lies, and that word is one of the needle's own 8-byte substrings."""


def _words(needle: bytes) -> set[int]:
    """Every 8-byte substring of `needle`, as the native-order word memory holds it."""
    return {
        int.from_bytes(needle[i : i + _WORD], sys.byteorder) for i in range(len(needle) - _WORD + 1)
    }


def _scan(pid: int, needles: dict[str, bytes]) -> tuple[dict[str, int], int, int]:
    """Count each needle (and its byte-reversed form) in every readable mapping of `pid`.

    The counts are those of `data.count(needle)` over every mapping. To get them without 186
    passes over 200 MB, one pass first collects the mapping's aligned words that are
    substrings of some needle: a needle (of 15 bytes or more) whose words are not among them
    does not occur in that mapping, and only the others are counted. Shorter needles are
    always counted."""
    counts = dict.fromkeys(needles, 0)
    read_bytes = unreadable = 0
    owners: dict[int, set[str]] = {}
    always = set()
    for name, needle in needles.items():
        if len(needle) < 2 * _WORD - 1:
            always.add(name)
            continue
        for word in _words(needle) | _words(needle[::-1]):
            owners.setdefault(word, set()).add(name)
    words = frozenset(owners)
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            assert m
            start, end = int(m[1], 16), int(m[2], 16)
            if "[vsyscall]" in line or "[vvar" in line:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                unreadable += end - start  # memfd_secret, or a vanished mapping
                continue
            read_bytes += len(data)
            assert start % _WORD == 0 and len(data) % _WORD == 0  # mappings are whole pages
            with memoryview(data) as view, view.cast("Q") as as_words:
                found = words.intersection(as_words)
            candidates = set(always)
            for word in found:
                candidates |= owners[word]
            for name in candidates:
                needle = needles[name]
                counts[name] += data.count(needle) + data.count(needle[::-1])
    return counts, read_bytes, unreadable


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc")
@pytest.mark.parametrize("secretmem", ["on", "off"])
def test_no_key_in_process_memory(tmp_path: Path, secretmem: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root (or CAP_SYS_PTRACE)")
    cfg = tmp_path / "strongroom.toml"
    cfg.write_text(
        f'[keystore]\ndata_dir = "{tmp_path / "data"}"\n'
        '[backends.vault]\ntype = "vault"\npassphrase = "env:SCAN_PASS"\n'
        "kdf_memory_kib = 8192\nkdf_iterations = 1\n"
    )
    needles: dict[str, bytes] = {}
    privates: dict[str, object] = {}
    message = b""
    for name, key_type, fmt, material, key in _imports():
        message += _field(name.encode()) + _field(key_type.encode()) + _field(fmt.encode())
        message += _field(material)
        needles.update(_secrets_of(name, key) if key is not None else {name: material})
        privates[name] = key
    control = secrets.token_bytes(32)
    message += _field(b"") + _field(control)

    env = dict(os.environ, SCAN_PASS="memory scan passphrase")
    if secretmem == "off":
        env["STRONGROOM_NO_SECRETMEM"] = "1"
    to_child, child_in = os.pipe()
    child_out, from_child = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cfg), str(to_child), str(from_child)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        pass_fds=(to_child, from_child),
    )
    os.close(to_child)
    os.close(from_child)
    try:
        with os.fdopen(child_in, "wb") as w:
            w.write(message)
        for name, data in _read_sent(child_out):
            if name.startswith("gen-"):
                needles.update(_received_secrets(name, name[4:], data))
            else:  # "agreed-<mine>|<peer>": the agreed key, and the shared secret behind it
                agreed, peer = name.split("|")
                needles[agreed] = data
                mine, theirs = privates.get(agreed[7:]), privates.get(peer)
                if isinstance(mine, x25519.X25519PrivateKey) and theirs is not None:
                    needles[agreed + ".z"] = mine.exchange(theirs.public_key())  # type: ignore[attr-defined]
                elif isinstance(mine, ec.EllipticCurvePrivateKey) and theirs is not None:
                    needles[agreed + ".z"] = mine.exchange(ec.ECDH(), theirs.public_key())  # type: ignore[attr-defined]
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", "the child failed to start"
        needles["control"] = control
        counts, read_bytes, unreadable = _scan(child.pid, needles)
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=60)
    assert read_bytes > 10_000_000, "the scan read almost nothing: it proves nothing"
    assert counts["control"] >= 1, "positive control: the scanner must find the planted secret"
    kinds = {n.split("-")[0] for n in needles}
    assert {"gen", "agreed", "rsa", "ecdsa", "secp256k1", "ed25519", "x25519"} <= kinds
    leaks = {name: n for name, n in counts.items() if name != "control" and n}
    assert not leaks, f"copies of secrets found in process memory: {leaks}"
    assert child.returncode == 0
    if secretmem == "on" and memory.memlock_status().secretmem_available:
        assert unreadable > 0, "guarded pages should be memfd_secret, unreadable from outside"
