"""`strongroom pkcs11-server` over keys in three stores: the vault, SoftHSM2 (the pkcs11
backend) and swtpm (the tpm backend), one token each, used by programs nobody here wrote:
OpenSC's `pkcs11-tool --test` (its own self-test) and CKM_RSA_PKCS signatures over a
DigestInfo the client built, checked by openssl.

One keystore and one server, in a thread, serve the module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE
from pkcs11_support import PIN_ENV as HSM_PIN_ENV
from pkcs11_support import SoftHsm, softhsm  # noqa: F401  (the session's token)
from tpm_support import PIN_ENV as TPM_PIN_ENV
from tpm_support import SRK_HANDLE, TEST_PIN, Swtpm, swtpm  # noqa: F401  (the session's TPM)

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
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    os.environ[HSM_PIN_ENV] = softhsm.pin
    os.environ[TPM_PIN_ENV] = TEST_PIN
    config = directory / "strongroom.toml"
    config.write_text(
        f'[keystore]\ndata_dir = "{directory / "data"}"\norder = ["vault"]\n\n'
        '[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{VAULT_PASS_ENV}"\nkdf_memory_kib = 8192\nkdf_iterations = 1\n\n'
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{softhsm.module}"\n'
        f'token = "{softhsm.label}"\npin = "env:{HSM_PIN_ENV}"\n\n'
        f'[backends.tpm]\ntype = "tpm"\ntcti = "{swtpm.tcti}"\n'
        f'persistent_handle = "0x{SRK_HANDLE:08x}"\npin = "env:{TPM_PIN_ENV}"\n'
    )
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
    socket_dir = Path(tempfile.mkdtemp(prefix="sr-p11b-"))
    os.rmdir(socket_dir)  # the server makes it (0700) and removes it again
    tokens = tuple(TokenSpec(b, (f"p11b-{b}-*",)) for b in BACKENDS)
    srv = Pkcs11Server(ks, Settings(tokens, pin=PIN), socket_dir / "p11.sock")
    thread = threading.Thread(target=srv.serve_forever, name="test-p11b", daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=30)
    srv.close()


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
    verified = subprocess.run(
        ["openssl", "dgst", f"-{hash_name}", "-verify", "pub.der", "-keyform", "DER",
         "-signature", "sig", "msg"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr


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
