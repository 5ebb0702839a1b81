"""Test support for the custody service: a throwaway PKI and `strongroom serve` in a subprocess.

The service runs as the real console script (uvicorn, its own process and event loop), on a
Unix socket and on TLS over loopback (port 0: the kernel picks a free one, and the service
prints where it listens).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import STRONGROOM_BIN, VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import strongroom
from strongroom.service.tenants import Permission, TenantStore

ALL_KEY_PERMISSIONS = [
    Permission.READ,
    Permission.SIGN,
    Permission.VERIFY,
    Permission.ENCRYPT,
    Permission.DECRYPT,
    Permission.AGREE,
    Permission.DERIVE,
    Permission.GENERATE,
    Permission.MANAGE,
    Permission.DELETE,
    Permission.EXPORT,
    Permission.RANDOM,
    Permission.ADOPT,
]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by the CA, never enrolled
    stranger_key: Path
    rogue_cert: Path  # self-signed: the handshake refuses it
    rogue_key: Path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("strongroom test CA", ca_key, "strongroom test CA", ca_key, ca=True)
    paths: dict[str, Path] = {}
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["ca"] = directory / "ca.pem"
    for name, issuer, issuer_key, server in (
        ("server", "strongroom test CA", ca_key, True),
        ("client", "strongroom test CA", ca_key, False),
        ("stranger", "strongroom test CA", ca_key, False),
        ("rogue", "rogue", None, False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, issuer, issuer_key or key)
        if server:
            cert = _cert("localhost", key, issuer, ca_key, server=True)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{name}.key", key)
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_key"] = directory / f"{name}.key"
    return Pki(**paths)


def write_service_config(
    directory: Path, pki: Pki, server_extra: str = "", store_url: str | None = None
) -> Path:
    """A vault config with a [server] table: Unix socket and TLS on 127.0.0.1 port 0; with
    `store_url`, its store is that PostgreSQL database."""
    cfg = write_vault_config(directory, store_url=store_url)
    with cfg.open("a", encoding="utf-8") as f:
        f.write(
            "\n[server]\n"
            f'socket = "{directory / "serve.sock"}"\n'
            'listen = "127.0.0.1:0"\n'
            f'tls_cert = "{pki.server_cert}"\n'
            f'tls_key = "{pki.server_key}"\n'
            f'tls_client_ca = "{pki.ca}"\n'
            "rate_limit = 0\n"  # the load test drives one identity as fast as it can
            f"{server_extra}"
        )
    return cfg


@dataclass
class Service:
    """A running `strongroom serve`."""

    config: Path
    process: subprocess.Popen[str]
    socket: Path
    https: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def unix(self) -> str:
        return f"unix:{self.socket}"

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def service_env(*, vault_passphrase: bool = True) -> dict[str, str]:
    """The environment of a service process: this one's, with the vault passphrase (or,
    without `vault_passphrase`, with none: a node that opens the vault through another
    key slot), and no client settings."""
    env = dict(os.environ)
    if vault_passphrase:
        env[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    else:
        env.pop(VAULT_PASS_ENV, None)
    env.pop("STRONGROOM_SERVER", None)
    env.pop("STRONGROOM_TOKEN", None)
    return env


def start_service(config: Path, timeout: float = 30, *, vault_passphrase: bool = True) -> Service:
    """Start `strongroom --config CONFIG serve` and wait until it says where it listens;
    `vault_passphrase` as for service_env."""
    proc = subprocess.Popen(
        [str(STRONGROOM_BIN), "--config", str(config), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=service_env(vault_passphrase=vault_passphrase),
    )
    assert proc.stderr is not None
    lines: list[str] = []
    found: dict[str, str] = {}
    done = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving on (.*)$", line.strip())
            if m:
                for where in m.group(1).split(", "):
                    found["unix" if where.startswith("unix:") else "https"] = where
                done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    if not done.wait(timeout) or "unix" not in found:
        proc.kill()
        proc.wait()
        raise RuntimeError("strongroom serve did not start:\n" + "".join(lines))
    return Service(config, proc, Path(found["unix"][len("unix:") :]), found.get("https", ""), lines)


def unix_client(service: Service, token: str, timeout: float = 60) -> httpx.Client:
    """A plain HTTP client on the service's Unix socket, sending `token` as its bearer."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(service.socket)),
        base_url="http://strongroom",
        headers={"authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def wait_gone(path: Path, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not path.exists():
            return True
        time.sleep(0.02)
    return False


@dataclass
class Tenancy:
    """Tokens made in the tenants store before the service starts (kept out of the repr,
    which pytest prints in failure reports)."""

    admin: str = field(repr=False)
    acme_app: str = field(repr=False)  # every key permission in acme
    acme_signer: str = field(repr=False)  # sign, verify, read on 'signing-*' only
    globex_app: str = field(repr=False)  # every key permission in globex


def init_service_data(config: Path, pki: Pki) -> Tenancy:
    """Initialise the vault and make two tenants, their identities and an admin."""
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    with strongroom.open(config) as ks:
        ks.vault_control().initialize()
        data_dir = ks.config.data_dir
    store = TenantStore(data_dir / "tenants.sqlite")
    try:
        store.create_tenant("acme")
        store.create_tenant("globex")
        admin = store.issue_token(None, "root", admin=True)
        acme_app = store.issue_token("acme", "app")
        store.grant("acme", "app", "*", ALL_KEY_PERMISSIONS)
        acme_signer = store.issue_token("acme", "signer")
        store.grant(
            "acme", "signer", "signing-*", [Permission.SIGN, Permission.VERIFY, Permission.READ]
        )
        globex_app = store.issue_token("globex", "app")
        store.grant("globex", "app", "*", ALL_KEY_PERMISSIONS)
        der = pki.client_cert.read_bytes()
        import ssl

        store.add_certificate("acme", "cert-app", ssl.PEM_cert_to_DER_cert(der.decode()))
        store.grant("acme", "cert-app", "*", ALL_KEY_PERMISSIONS)
    finally:
        store.close()
    return Tenancy(admin, acme_app, acme_signer, globex_app)


@contextlib.contextmanager
def tenants_service(root: Path) -> Iterator[tuple[Service, Tenancy]]:
    """A `strongroom serve` in `root` (its PKI, config and data there) with the tenants of
    init_service_data; stopped on leaving."""
    pki = make_pki(root / "pki")
    config = write_service_config(root, pki)
    tenancy = init_service_data(config, pki)
    svc = start_service(config)
    try:
        yield svc, tenancy
    finally:
        svc.stop()


def first_line(process: subprocess.Popen[str], timeout: float = 60) -> str | None:
    """The first line `process` writes on its stdout (a pipe), or None when none has come
    within `timeout` seconds (a bound on a hang; the process is left running)."""
    first: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        first.append(process.stdout.readline())
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    return first[0] if ready.wait(timeout) else None
