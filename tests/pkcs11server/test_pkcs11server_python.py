"""`strongroom pkcs11-server` under python-pkcs11 (through p11-kit-client.so, in its own
process: p11_client.py): multi-part sign and verify, RSA-OAEP encrypt and decrypt, key
generation into the configured backend and C_DestroyObject; the results checked here with
cryptography and the keystore. And CKM_AES_GCM decryption with a bare client, since
Debian 12's p11-kit client (0.24) refuses the mechanism before it reaches any server.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11server_support import serving

import strongroom
from strongroom.errors import KeyNotFound
from strongroom.keystore import Keystore
from strongroom.pkcs11server import Pkcs11Server, Settings, TokenSpec, ck, wire

CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
CLIENT = Path(__file__).with_name("p11_client.py")
PIN = "2222-test"
TOKEN = "py"
CHUNKS = [b"part one, ", b"part two, ", b"and the last part" * 100]
"""p11_client.CHUNKS: the message it signs in pieces."""

pytestmark = pytest.mark.skipif(
    not CLIENT_MODULE.exists(), reason="p11-kit-client.so (p11-kit-modules) is not installed"
)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    directory = tmp_path_factory.mktemp("pkcs11server-python")
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(directory)  # the vault alone: first and last in the order
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        keystore.generate("py-rsa", "rsa-2048", usage="sign,verify,encrypt,decrypt")
        keystore.generate("py-hmac", "hmac-sha256")
        keystore.generate("py-aes", "aes-256", usage="encrypt,decrypt")
        yield keystore


@pytest.fixture(scope="module")
def server(ks: Keystore) -> Iterator[Pkcs11Server]:
    settings = Settings(
        (TokenSpec(TOKEN, ("py-*",)),), pin=PIN, backend="vault", allow_destroy=True
    )
    with serving(ks, settings, "p11py") as srv:
        yield srv


def client(server: Pkcs11Server, scenario: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(CLIENT), scenario, TOKEN, PIN, *args],
        env={**os.environ, "P11_KIT_SERVER_ADDRESS": server.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_multi_part_rsa_sign_and_verify(server: Pkcs11Server, ks: Keystore) -> None:
    out = client(server, "multipart", "py-rsa")
    assert out["good"] is True and out["bad"] is False
    public = ks.public_key("py-rsa")
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        bytes.fromhex(out["signature"]), b"".join(CHUNKS), padding.PKCS1v15(), hashes.SHA256()
    )


def test_multi_part_hmac(server: Pkcs11Server, ks: Keystore) -> None:
    out = client(server, "multipart", "py-hmac")
    assert out["good"] is True and out["bad"] is False
    assert hmac.compare_digest(bytes.fromhex(out["signature"]), ks.mac("py-hmac", b"".join(CHUNKS)))


def test_rsa_oaep_encrypt_and_decrypt(server: Pkcs11Server, ks: Keystore) -> None:
    out = client(server, "oaep", "py-rsa")
    assert bytes.fromhex(out["plaintext"]) == b"a secret for RSA"
    # the keystore decrypts what the client encrypted, and the client what the keystore did
    assert ks.decrypt("py-rsa", bytes.fromhex(out["ciphertext"])) == b"a secret for RSA"
    made = ks.encrypt("py-rsa", b"from the keystore", algorithm="oaep-sha256")
    back = client(server, "decrypt_oaep", "py-rsa", made.hex())
    assert bytes.fromhex(back["plaintext"]) == b"from the keystore"


@pytest.mark.parametrize("kind", ["ec", "rsa", "aes"])
def test_generate_then_destroy(server: Pkcs11Server, ks: Keystore, kind: str) -> None:
    name = f"py-made-{kind}"
    out = client(server, "generate", name, kind)
    info = ks.info(name)
    assert info.backend == "vault"
    public = ks.public_key(name) if kind != "aes" else None
    if kind == "ec":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        signature = bytes.fromhex(out["signature"])
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        digest = ec.ECDSA(Prehashed(hashes.SHA256()))  # CKM_ECDSA signs the client's digest
        public.verify(encode_dss_signature(r, s), b"\x07" * 32, digest)
        assert info.type.value == "ecdsa-p256"
    elif kind == "rsa":
        assert isinstance(public, rsa.RSAPublicKey)
        assert int(out["modulus"], 16) == public.public_numbers().n
        public.verify(bytes.fromhex(out["signature"]), b"message", padding.PKCS1v15(),
                      hashes.SHA256())  # fmt: skip
    else:
        assert out == {"value_len": 32, "sensitive": True}
        assert info.type.value == "aes-256"
        assert ks.decrypt(name, ks.encrypt(name, b"x")) == b"x"
    if kind != "aes":  # a public key object alone cannot be destroyed
        refused = client(server, "destroy", name, "public")  # python-pkcs11 has no name for it
        assert refused["error"] == "PKCS11Error" and "code 0x1b" in refused["args"][0], refused
        assert ks.info(name)
    left = client(server, "destroy", name, "secret" if kind == "aes" else "private")
    assert left == {"left": 0}
    with pytest.raises(KeyNotFound):
        ks.info(name)


def test_a_name_outside_the_token_is_not_made(server: Pkcs11Server, ks: Keystore) -> None:
    out = client(server, "generate", "elsewhere", "aes")
    assert out["error"] == "TemplateInconsistent", out
    with pytest.raises(KeyNotFound):
        ks.info("elsewhere")


# -- CKM_AES_GCM, as p11-kit 0.25 and later encode it ----------------------------------------------
def _u(v: int) -> bytes:
    return struct.pack(">Q", v)


def _ay(data: bytes) -> bytes:
    return b"\x01" + wire.byte_array(data)


def _gcm(iv: bytes, aad: bytes, tag_bits: int = 128) -> bytes:
    return (
        struct.pack(">I", ck.CKM_AES_GCM)
        + wire.byte_array(iv)
        + _u(len(iv) * 8)
        + wire.byte_array(aad)
        + _u(tag_bits)
    )


def test_aes_gcm_decrypts_a_keystore_ciphertext(ks: Keystore) -> None:
    """The vault's AES-256 ciphertext is nonce ‖ ct ‖ tag: CKM_AES_GCM with the nonce as
    the IV decrypts it, in one part or several. Encryption with the client's IV is refused
    (the keystore chooses every nonce), and so is a tag that does not check."""
    from strongroom.pkcs11server import Connection

    conn = Connection(ks, Settings((TokenSpec(TOKEN, ("py-*",)),), pin=PIN))

    def call(name: str, *args: bytes) -> bytes:
        return conn.handle(wire.request(name, *args))

    def rv(reply: bytes) -> int:
        return int.from_bytes(reply[-8:], "big") if reply[:4] == b"\0\0\0\0" else 0

    assert rv(call("C_Initialize", _ay(wire.HANDSHAKE), b"\x00", _ay(b""))) == 0
    assert rv(call("C_OpenSession", _u(0), _u(ck.CKF_SERIAL_SESSION))) == 0
    assert rv(call("C_Login", _u(1), _u(ck.CKU_USER), _ay(PIN.encode()))) == 0
    template = struct.pack(">I", 1) + struct.pack(">IBI", ck.CKA_LABEL, 1, 6)
    call("C_FindObjectsInit", _u(1), template + wire.byte_array(b"py-aes"))
    found = call("C_FindObjects", _u(1), struct.pack(">I", 4))
    (key,) = struct.unpack(">Q", found[-8:])
    call("C_FindObjectsFinal", _u(1))
    blob = ks.encrypt("py-aes", b"sealed by the keystore", b"header")
    iv, body = blob[:12], blob[12:]
    room = struct.pack(">I", 4096)
    assert rv(call("C_DecryptInit", _u(1), _gcm(iv, b"header"), _u(key))) == 0
    reply = call("C_Decrypt", _u(1), _ay(body), room)
    assert reply.endswith(wire.byte_array(b"sealed by the keystore"))
    # several parts: nothing before the tag is checked, all of it at Final
    assert rv(call("C_DecryptInit", _u(1), _gcm(iv, b"header"), _u(key))) == 0
    assert call("C_DecryptUpdate", _u(1), _ay(body[:5]), room).endswith(b"\x01\0\0\0\0")
    call("C_DecryptUpdate", _u(1), _ay(body[5:]), room)
    assert call("C_DecryptFinal", _u(1), room).endswith(wire.byte_array(b"sealed by the keystore"))
    # the wrong associated data fails the tag
    assert rv(call("C_DecryptInit", _u(1), _gcm(iv, b"other"), _u(key))) == 0
    assert rv(call("C_Decrypt", _u(1), _ay(body), room)) == ck.CKR_ENCRYPTED_DATA_INVALID
    # a 64-bit tag, or a 16-byte IV, is not the keystore's GCM
    for mech in (_gcm(iv, b"", 64), _gcm(b"\0" * 16, b"")):
        assert rv(call("C_DecryptInit", _u(1), mech, _u(key))) == ck.CKR_MECHANISM_PARAM_INVALID
    # and encryption with an IV the client chose is not offered
    assert rv(call("C_EncryptInit", _u(1), _gcm(iv, b""), _u(key))) == ck.CKR_MECHANISM_INVALID
