"""Test support: PyKMIP 0.11.0 (hash-pinned, requirements/pykmip-tests.txt) installed into a
directory of its own, and a `strongroom serve --kmip` with one tenant whose identity is the
test PKI's client certificate."""

from __future__ import annotations

import hashlib
import platform
import re
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import STRONGROOM_BIN, run_strongroom
from server_support import Pki, service_env, write_service_config

from strongroom.kmip import ttlv
from strongroom.kmip.tags import CryptographicAlgorithm, ObjectType, Operation, ResultStatus, Tag
from strongroom.kmip.ttlv import Item, Type, structure

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements" / "pykmip-tests.txt"


def pykmip() -> Path:
    """A directory with PyKMIP and its extra dependencies (for PYTHONPATH), and beside it the
    unpacked sdist (its tests); made once per lock file, hash-checked by pip."""
    if (sys.version_info[:2], platform.machine()) != ((3, 11), "x86_64"):
        pytest.skip("requirements/pykmip-tests.txt pins CPython 3.11 x86_64 wheels")
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    home = Path(sys.prefix) / f"pykmip-tests-{digest}"
    done = home / ".done"
    if not done.exists():
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run(
            [
                *pip,
                "download",
                "--no-deps",
                "--require-hashes",
                "--no-binary",
                "pykmip",
                "-r",
                str(REQUIREMENTS),
                "-d",
                str(home / "dist"),
            ],
            check=True,
        )
        subprocess.run(
            [
                *pip,
                "install",
                "--no-deps",
                "--require-hashes",
                "--no-build-isolation",
                "--no-compile",
                "--no-index",
                "--find-links",
                str(home / "dist"),
                "--target",
                str(home / "lib"),
                "-r",
                str(REQUIREMENTS),
            ],
            check=True,
        )
        (sdist,) = (home / "dist").glob("pykmip-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(home / "src", filter="data")
        done.touch()
    return home


def pykmip_sdist(home: Path) -> Path:
    (src,) = (home / "src").glob("pykmip-*")
    return src


@dataclass
class KmipService:
    process: subprocess.Popen[str]
    host: str
    port: int
    config: Path
    banner: str = ""
    """The line `serve` printed when it was ready: every address it serves."""

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


def cli(config: Path, *args: str) -> None:
    run_strongroom(
        ["--config", str(config), *args], env=service_env(), timeout=None
    ).check_returncode()


def start_kmip(
    root: Path,
    pki: Pki,
    permissions: str,
    extra: str = "",
    args: tuple[str, ...] = (),
    keystore_extra: str = "",
) -> KmipService:
    """`strongroom serve` with `[server] kmip_listen = "127.0.0.1:0"` (beside the HTTP service
    unless `args` say otherwise); the client certificate is the identity acme:kmip with
    `permissions` on every key. `keystore_extra` goes into the `[keystore]` table."""
    config = write_service_config(root, pki, 'kmip_listen = "127.0.0.1:0"\n')
    if keystore_extra:
        config.write_text(
            config.read_text().replace("[keystore]\n", "[keystore]\n" + keystore_extra, 1)
        )
    if extra:
        with config.open("a") as f:
            f.write(extra)
    cli(config, "tenant", "create", "acme")
    cli(config, "tenant", "cert", "acme", "kmip", "--cert", str(pki.client_cert))
    cli(config, "policy", "grant", "acme", "kmip", "--keys", "*", "--permissions", permissions)
    return run_kmip(config, args)


def run_kmip(config: Path, args: tuple[str, ...] = ()) -> KmipService:
    """Start `strongroom serve ARGS` on `config` and wait for its KMIP address."""
    proc = subprocess.Popen(
        [str(STRONGROOM_BIN), "--config", str(config), "serve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=service_env(),
    )
    found: list[str] = []
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"kmip://([^,\s]+):(\d+)", line)
            if m:
                found[:] = [m.group(1), m.group(2), line.strip()]
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60) or not found:
        proc.kill()
        raise RuntimeError("strongroom serve --kmip did not start:\n" + "".join(lines))
    return KmipService(proc, found[0], int(found[1]), config, found[2])


def pykmip_conf(home: Path, service: KmipService, pki: Pki, section: str = "strongroom") -> Path:
    """A HOME whose ~/.pykmip/pykmip.conf has `section` pointing at the service."""
    conf = home / ".pykmip" / "pykmip.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        f"[{section}]\nhost={service.host}\nport={service.port}\n"
        f"certfile={pki.client_cert}\nkeyfile={pki.client_key}\nca_certs={pki.ca}\n"
        "cert_reqs=CERT_REQUIRED\nssl_version=PROTOCOL_SSLv23\ndo_handshake_on_connect=True\n"
        "suppress_ragged_eofs=True\n"
    )
    return home


# -- raw TTLV, for what PyKMIP's client cannot say or would never send -------------------------
def tls(
    kmip: KmipService, pki: Pki, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(cert or pki.client_cert), str(key or pki.client_key))
    raw = socket.create_connection((kmip.host, kmip.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def exchange(conn: ssl.SSLSocket, message: bytes) -> Item:
    conn.sendall(message)
    head = b""
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    body = b""
    need = ttlv.message_length(head) - 8
    while len(body) < need:
        body += conn.recv(need - len(body))
    return ttlv.decode(head + body)


def request(*batch: tuple[Operation, list[Item]], version: tuple[int, int] = (1, 4)) -> bytes:
    header = structure(
        Tag.REQUEST_HEADER,
        structure(
            Tag.PROTOCOL_VERSION,
            Item(Tag.PROTOCOL_VERSION_MAJOR, Type.INTEGER, version[0]),
            Item(Tag.PROTOCOL_VERSION_MINOR, Type.INTEGER, version[1]),
        ),
        Item(Tag.BATCH_COUNT, Type.INTEGER, len(batch)),
    )
    items = [
        structure(
            Tag.BATCH_ITEM,
            Item(Tag.OPERATION, Type.ENUMERATION, op),
            structure(Tag.REQUEST_PAYLOAD, *payload),
        )
        for op, payload in batch
    ]
    return ttlv.encode(structure(Tag.REQUEST_MESSAGE, header, *items))


def attr(name: str, value: Item) -> Item:
    return structure(
        Tag.ATTRIBUTE,
        Item(Tag.ATTRIBUTE_NAME, Type.TEXT_STRING, name),
        Item(Tag.ATTRIBUTE_VALUE, value.type, value.value),
    )


def registered_key(tag: int, fmt: int, material: bytes, algorithm: int, length: int) -> Item:
    """A key object (`tag`: Private Key, Public Key...) for Register: its Key Block with
    the material as a byte string, the algorithm and the length."""
    return structure(
        tag,
        structure(
            Tag.KEY_BLOCK,
            Item(Tag.KEY_FORMAT_TYPE, Type.ENUMERATION, fmt),
            structure(Tag.KEY_VALUE, Item(Tag.KEY_MATERIAL, Type.BYTE_STRING, material)),
            Item(Tag.CRYPTOGRAPHIC_ALGORITHM, Type.ENUMERATION, algorithm),
            Item(Tag.CRYPTOGRAPHIC_LENGTH, Type.INTEGER, length),
        ),
    )


def results(response: Item) -> list[Item]:
    return list(response.all(Tag.BATCH_ITEM))


def ok(item: Item) -> Item:
    assert item.int_of(Tag.RESULT_STATUS) == ResultStatus.SUCCESS, item.text_of(Tag.RESULT_MESSAGE)
    return item.need(Tag.RESPONSE_PAYLOAD)


CREATE_AES = [
    Item(Tag.OBJECT_TYPE, Type.ENUMERATION, ObjectType.SYMMETRIC_KEY),
    structure(
        Tag.TEMPLATE_ATTRIBUTE,
        attr("Cryptographic Algorithm", Item(0, Type.ENUMERATION, CryptographicAlgorithm.AES)),
        attr("Cryptographic Length", Item(0, Type.INTEGER, 256)),
        attr("Cryptographic Usage Mask", Item(0, Type.INTEGER, 0x0C)),
    ),
]
