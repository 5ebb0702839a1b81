"""`strongroom pkcs11-server` over keys in three stores: the vault, SoftHSM2 (the pkcs11
backend) and swtpm (the tpm backend), one token each, used by programs nobody here wrote:
OpenSC's `pkcs11-tool --test` (its own self-test) and CKM_RSA_PKCS signatures over a
DigestInfo the client built, checked by openssl; OpenSSL through libp11's pkcs11 engine
(`pkeyutl -sign`, `req -new`), checked by plain openssl; and `ssh -I p11-kit-client.so`
into an sshd the module starts itself (tests/emulators/sshagent_support.py).

One keystore and one server, in a thread, serve the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from pkcs11_support import (
    SoftHsm,
    softhsm,  # noqa: F401  (the session's token)
    write_three_backends_config,
)
from pkcs11server_support import serving
from sshagent_support import Sshd, start_sshd
from tpm_support import Swtpm, swtpm  # noqa: F401  (the session's TPM)

import strongroom
from strongroom import algorithms
from strongroom.errors import InvalidArgument, UnsupportedOperation
from strongroom.keystore import Keystore
from strongroom.pkcs11server import Pkcs11Server, Settings, TokenSpec

CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
PIN = "8765-test"
BACKENDS = ("vault", "hsm", "tpm")
"""One token per backend, labelled with its name, holding the keys `p11b-BACKEND-*`."""
SHA1_DIGEST_INFO = algorithms.DIGEST_INFO_PREFIXES["sha1"]

pytestmark = pytest.mark.skipif(
    not CLIENT_MODULE.exists(), reason="p11-kit-client.so (p11-kit-modules) is not installed"
)


@pytest.fixture(scope="module")
def ks(
    tmp_path_factory: pytest.TempPathFactory,
    softhsm: SoftHsm,  # noqa: F811
    swtpm: Swtpm,  # noqa: F811
) -> Iterator[Keystore]:
    directory = tmp_path_factory.mktemp("pkcs11server-backends")
    config = write_three_backends_config(directory, softhsm, swtpm.tcti)
    made: list[str] = []
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        try:
            for backend in BACKENDS:
                for key_type, usage in (("rsa-2048", "sign,verify,encrypt,decrypt"),
                                        ("ecdsa-p256", None)):  # fmt: skip
                    name = f"p11b-{backend}-{key_type}"
                    keystore.generate(name, key_type, backend=backend, usage=usage)
                    made.append(name)
            yield keystore
        finally:
            for name in made:  # the token and the TPM outlive this module
                keystore.delete(name)


@pytest.fixture(scope="module")
def server(ks: Keystore) -> Iterator[Pkcs11Server]:
    tokens = tuple(TokenSpec(b, (f"p11b-{b}-*",)) for b in BACKENDS)
    with serving(ks, Settings(tokens, pin=PIN), "p11b") as srv:
        yield srv


def tool(
    server: Pkcs11Server, *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": server.address}
    done = subprocess.run(
        ["pkcs11-tool", "--module", str(CLIENT_MODULE), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("backend", BACKENDS)
def test_pkcs11_tool_self_test_passes(server: Pkcs11Server, ks: Keystore, backend: str) -> None:
    assert ks.info(f"p11b-{backend}-rsa-2048").backend == backend
    out = tool(server, "--token-label", backend, "--login", "--pin", PIN, "--test").stdout
    assert "No errors" in out, out
    assert "RSA-PKCS: OK" in out, out  # raw CKM_RSA_PKCS over its SHA-1 DigestInfo


def assert_openssl_verifies(directory: Path, hash_name: str) -> None:
    """openssl checks `sig` over `msg` with `pub.der` (all in `directory`), hashing with
    `hash_name`."""
    verified = subprocess.run(
        ["openssl", "dgst", f"-{hash_name}", "-verify", "pub.der", "-keyform", "DER",
         "-signature", "sig", "msg"],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hash_name", ["sha1", "sha384"])
def test_rsa_pkcs_signs_the_clients_digest_info(
    server: Pkcs11Server, backend: str, hash_name: str, tmp_path: Path
) -> None:
    """CKM_RSA_PKCS pads the DigestInfo the client built, in a hash the keystore's own
    algorithms do not offer; openssl checks the signature over the message."""
    key_id = f"p11b-{backend}-rsa-2048".encode().hex()
    message = b"signed through CKM_RSA_PKCS\n"
    (tmp_path / "msg").write_bytes(message)
    digest = hashlib.new(hash_name, message).digest()
    (tmp_path / "block").write_bytes(algorithms.DIGEST_INFO_PREFIXES[hash_name] + digest)
    tool(server, "--token-label", backend, "--read-object", "--type", "pubkey", "--id", key_id,
         "-o", "pub.der", cwd=tmp_path)  # fmt: skip
    tool(server, "--token-label", backend, "--login", "--pin", PIN, "--sign", "-m", "RSA-PKCS",
         "--id", key_id, "-i", "block", "-o", "sig", cwd=tmp_path)  # fmt: skip
    assert_openssl_verifies(tmp_path, hash_name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hash_name", ["sha384", "sha512"])
def test_sha384_and_sha512_rsa_pkcs(
    server: Pkcs11Server, backend: str, hash_name: str, tmp_path: Path
) -> None:
    """CKM_SHA384_RSA_PKCS / CKM_SHA512_RSA_PKCS over the message: the server hashes and
    builds the DigestInfo; openssl checks the signature, the server's C_Verify agrees."""
    key_id = f"p11b-{backend}-rsa-2048".encode().hex()
    (tmp_path / "msg").write_bytes(b"hashed by the server\n" * 50)
    mechanism = f"{hash_name.upper()}-RSA-PKCS"
    login = ("--token-label", backend, "--login", "--pin", PIN, "--id", key_id)
    tool(server, "--token-label", backend, "--read-object", "--type", "pubkey", "--id", key_id,
         "-o", "pub.der", cwd=tmp_path)  # fmt: skip
    tool(server, *login, "--sign", "-m", mechanism, "-i", "msg", "-o", "sig", cwd=tmp_path)
    assert_openssl_verifies(tmp_path, hash_name)
    checked = tool(server, *login, "--verify", "-m", mechanism, "-i", "msg",
                   "--signature-file", "sig", cwd=tmp_path)  # fmt: skip
    assert "Signature is valid" in checked.stdout


def test_a_block_that_is_no_digest_info(server: Pkcs11Server, tmp_path: Path) -> None:
    """The vault and SoftHSM2 pad any block of up to k - 11 bytes; a TPM pads only the
    DigestInfo it builds itself, so for it CKM_RSA_PKCS over another block is
    CKR_MECHANISM_INVALID, not a wrong signature."""
    block = b"\x01" * 36  # TLS 1.1's MD5 || SHA-1, say: no DigestInfo
    (tmp_path / "block").write_bytes(block)
    for backend in BACKENDS:
        key_id = f"p11b-{backend}-rsa-2048".encode().hex()
        args = ("--token-label", backend, "--login", "--pin", PIN, "--id", key_id,
                "-m", "RSA-PKCS", "-i", "block")  # fmt: skip
        signed = tool(server, *args, "--sign", "-o", f"{backend}.sig", cwd=tmp_path, check=False)
        if backend == "tpm":
            assert signed.returncode != 0
            assert "CKR_MECHANISM_INVALID" in signed.stderr, signed.stderr
            continue
        assert signed.returncode == 0, signed.stderr
        checked = tool(server, *args, "--verify", "--signature-file", f"{backend}.sig",
                       cwd=tmp_path)  # fmt: skip
        assert "Signature is valid" in checked.stdout
    # a block longer than k - 11 bytes is the client's error, before any backend is asked
    (tmp_path / "long").write_bytes(b"\x01" * 246)
    key_id = b"p11b-vault-rsa-2048".hex()
    args = ("--token-label", "vault", "--login", "--pin", PIN, "--id", key_id, "--sign",
            "-m", "RSA-PKCS", "-i", "long")  # fmt: skip
    too_long = tool(server, *args, cwd=tmp_path, check=False)
    assert "CKR_DATA_LEN_RANGE" in too_long.stderr, too_long.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_keystore_refuses_a_raw_block_it_cannot_honour(ks: Keystore, backend: str) -> None:
    """pkcs1v15-raw is prehashed only, RSA only, and 1 to k - 11 bytes, in every backend."""
    rsa_key, ec_key = f"p11b-{backend}-rsa-2048", f"p11b-{backend}-ecdsa-p256"
    raw = algorithms.RSA_PKCS1V15_RAW
    block = SHA1_DIGEST_INFO + hashlib.sha1(b"x").digest()
    with pytest.raises(InvalidArgument, match="prehashed"):
        ks.sign(rsa_key, block, raw)
    with pytest.raises(InvalidArgument):
        ks.sign(ec_key, hashlib.sha256(b"x").digest(), raw, prehashed=True)
    with pytest.raises(InvalidArgument, match="1 to 245 bytes"):
        ks.sign(rsa_key, b"\x00" * 246, raw, prehashed=True)
    signature = ks.sign(rsa_key, block, raw, prehashed=True)
    ks.verify(rsa_key, block, signature, raw, prehashed=True)
    with pytest.raises(InvalidArgument, match="prehashed"):
        ks.verify(rsa_key, block, signature, raw)
    if backend == "tpm":
        with pytest.raises(UnsupportedOperation):
            ks.sign(rsa_key, b"\x01" * 36, raw, prehashed=True)


# -- OpenSSL through libp11's pkcs11 engine (Debian libengine-pkcs11-openssl) ------------------
def engine_env(server: Pkcs11Server) -> dict[str, str]:
    return {
        **os.environ,
        "P11_KIT_SERVER_ADDRESS": server.address,
        "PKCS11_MODULE_PATH": str(CLIENT_MODULE),
    }


def uri(backend: str, key_type: str) -> str:
    return f"pkcs11:token={backend};object=p11b-{backend}-{key_type};type=private;pin-value={PIN}"


def openssl(env: dict[str, str] | None, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_openssl_engine_signs_and_plain_openssl_verifies(
    server: Pkcs11Server, ks: Keystore, backend: str, key_type: str, tmp_path: Path
) -> None:
    """`openssl pkeyutl -engine pkcs11 -keyform engine -sign` over a SHA-256 digest (for RSA
    the engine builds the DigestInfo and signs it with CKM_RSA_PKCS), checked by
    `openssl pkeyutl -verify` with the public key alone, no engine."""
    name = f"p11b-{backend}-{key_type}"
    (tmp_path / "pub.pem").write_bytes(algorithms.encode_public(ks.public_key(name), "pem"))
    (tmp_path / "digest").write_bytes(hashlib.sha256(b"signed by the engine").digest())
    env = engine_env(server)
    signed = openssl(env, "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-sign",
                     "-inkey", uri(backend, key_type), "-pkeyopt", "digest:sha256",
                     "-in", "digest", "-out", "sig", cwd=tmp_path)  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    verified = openssl(None, "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem",
                       "-pkeyopt", "digest:sha256", "-in", "digest", "-sigfile", "sig",
                       cwd=tmp_path)  # fmt: skip
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout, (
        verified.stdout + verified.stderr
    )
    (tmp_path / "digest").write_bytes(hashlib.sha256(b"another document").digest())
    forged = openssl(None, "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem",
                     "-pkeyopt", "digest:sha256", "-in", "digest", "-sigfile", "sig",
                     cwd=tmp_path)  # fmt: skip
    assert forged.returncode != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_openssl_req_makes_a_csr_that_verifies(
    server: Pkcs11Server, ks: Keystore, backend: str, key_type: str, tmp_path: Path
) -> None:
    env = engine_env(server)
    made = openssl(env, "req", "-engine", "pkcs11", "-keyform", "engine", "-new",
                   "-key", uri(backend, key_type), "-subj", f"/CN={backend} {key_type}",
                   "-sha256", "-out", "csr.pem", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    checked = openssl(None, "req", "-verify", "-noout", "-in", "csr.pem", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "verify OK" in checked.stdout + checked.stderr
    # the CSR holds the keystore key's public key
    shown = openssl(None, "req", "-pubkey", "-noout", "-in", "csr.pem", cwd=tmp_path).stdout
    name = f"p11b-{backend}-{key_type}"
    assert shown.encode() == algorithms.encode_public(ks.public_key(name), "pem")


# -- OpenSSH: ssh -I p11-kit-client.so into an sshd the module starts --------------------------
@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, ks: Keystore) -> Iterator[Sshd]:
    """An sshd (tests/emulators/sshagent_support.py) that accepts every key of the module."""
    authorized = b"".join(
        algorithms.encode_public(ks.public_key(f"p11b-{b}-{t}"), "openssh") + b"\n"
        for b in BACKENDS
        for t in ("ecdsa-p256", "rsa-2048")
    )
    server = start_sshd(tmp_path_factory.mktemp("sshd-p11"), authorized.decode())
    yield server
    server.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_ssh_logs_in_through_the_module(
    server: Pkcs11Server, ks: Keystore, sshd: Sshd, backend: str, key_type: str, tmp_path: Path
) -> None:
    """`ssh -I p11-kit-client.so`, offered only this key (IdentityFile with its public key,
    IdentitiesOnly), logs in; ssh reads the PIN through SSH_ASKPASS."""
    name = f"p11b-{backend}-{key_type}"
    pub = tmp_path / f"{name}.pub"
    pub.write_bytes(algorithms.encode_public(ks.public_key(name), "openssh") + b"\n")
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho '{PIN}'\n")
    askpass.chmod(0o700)
    env = {
        **os.environ,
        "P11_KIT_SERVER_ADDRESS": server.address,
        "SSH_ASKPASS": str(askpass),
        "SSH_ASKPASS_REQUIRE": "force",
        "DISPLAY": ":0",
    }
    env.pop("SSH_AUTH_SOCK", None)
    user = os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
    done = subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(sshd.port), "-I", str(CLIENT_MODULE),
         "-o", f"IdentityFile={pub}", "-o", "IdentitiesOnly=yes",
         "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
         "-o", f"UserKnownHostsFile={sshd.directory / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=30",
         f"{user}@127.0.0.1", "echo", "logged-in"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + sshd.log.read_text()[-2000:]
    assert done.stdout == "logged-in\n"
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True,
        timeout=30,
    ).stdout.split()[1]  # fmt: skip
    assert f"Accepted publickey for {user}" in sshd.log.read_text()
    assert fingerprint in sshd.log.read_text()


# -- C_GenerateKeyPair into the configured backend, C_DestroyObject there ----------------------
@pytest.mark.parametrize("backend", ["hsm", "tpm"])
def test_generate_into_the_configured_backend(ks: Keystore, backend: str) -> None:
    """With `[pkcs11_server] backend`, python-pkcs11's C_GenerateKeyPair makes the key in
    that backend (a SoftHSM2 token, a TPM), it signs there, and C_DestroyObject deletes it."""
    tokens = tuple(TokenSpec(b, (f"p11b-{b}-*",)) for b in BACKENDS)
    settings = Settings(tokens, pin=PIN, backend=backend, allow_destroy=True)
    with serving(ks, settings, "p11g") as srv:
        name = f"p11b-{backend}-made"
        client = Path(__file__).with_name("p11_client.py")

        def run(*args: str) -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, str(client), args[0], backend, PIN, *args[1:]],
                env={**os.environ, "P11_KIT_SERVER_ADDRESS": srv.address},
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            result: dict[str, Any] = json.loads(done.stdout)
            return result

        try:
            made = run("generate", name, "ec")
            assert ks.info(name).backend == backend
            public = ks.public_key(name)
            assert isinstance(public, ec.EllipticCurvePublicKey)
            signature = bytes.fromhex(made["signature"])
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            public.verify(encode_dss_signature(r, s), b"\x07" * 32, ec.ECDSA(Prehashed(SHA256())))
            assert run("destroy", name, "private") == {"left": 0}
            assert all(info.name != name for info in ks.keys())
        finally:
            if any(info.name == name for info in ks.keys()):
                ks.delete(name)  # the token and the TPM outlive this module
