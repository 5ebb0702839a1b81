"""`strongroom pkcs11-server` with programs nobody here wrote: p11-kit's own client module
(Debian p11-kit-modules) under OpenSC's pkcs11-tool and OpenSSH's ssh-keygen, signatures
checked by openssl; and the protocol's hostile cases with a bare client.

One vault keystore (a P-256 and an RSA key) and one server, in a thread, serve the module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, write_vault_config
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11server_support import serving

import strongroom
from strongroom import algorithms
from strongroom.errors import Pkcs11MessageError
from strongroom.keystore import Keystore
from strongroom.pkcs11server import Pkcs11Server, Settings, TokenSpec, ck, wire

CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
PIN = "4321-test"
P256_ID = b"p11-p256".hex()
RSA_ID = b"p11-rsa".hex()

pytestmark = pytest.mark.skipif(
    not CLIENT_MODULE.exists(), reason="p11-kit-client.so (p11-kit-modules) is not installed"
)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystore]:
    directory = tmp_path_factory.mktemp("pkcs11server")
    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    config = write_vault_config(directory)  # the vault alone: first and last in the order
    with strongroom.open(config) as keystore:
        keystore.vault_control().initialize()
        keystore.generate("p11-p256", "ecdsa-p256")
        keystore.generate("p11-rsa", "rsa-2048")
        keystore.generate("other", "ecdsa-p256")  # matches no pattern: never offered
        yield keystore


def serving_p11(
    ks: Keystore, *, allow_destroy: bool = False
) -> contextlib.AbstractContextManager[Pkcs11Server]:
    """A server of the keys p11-* of `ks`, in a thread."""
    settings = Settings(
        (TokenSpec("strongroom", ("p11-*",)),), pin=PIN, allow_destroy=allow_destroy
    )
    return serving(ks, settings, "p11")


@pytest.fixture(scope="module")
def server(ks: Keystore) -> Iterator[Pkcs11Server]:
    with serving_p11(ks) as srv:
        yield srv


def tool(server: Pkcs11Server, *args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": server.address}
    done = subprocess.run(
        ["pkcs11-tool", "--module", str(CLIENT_MODULE), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_socket_is_private(server: Pkcs11Server) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600
    assert server.path.parent.stat().st_mode & 0o777 == 0o700


def test_pkcs11_tool_lists_the_slot_and_the_objects(server: Pkcs11Server) -> None:
    slots = tool(server, "--list-slots")
    assert "token label        : strongroom" in slots
    public = tool(server, "--list-objects")
    assert "label:      p11-p256" in public and "label:      p11-rsa" in public
    assert "Private Key Object" not in public  # private objects only after C_Login
    assert "other" not in public
    private = tool(server, "--login", "--pin", PIN, "--list-objects")
    assert private.count("Private Key Object") == 2
    assert "sensitive, always sensitive, never extractable" in private


def test_a_wrong_pin_is_refused(server: Pkcs11Server) -> None:
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": server.address}
    done = subprocess.run(
        ["pkcs11-tool", "--module", str(CLIENT_MODULE), "--login", "--pin", "0000", "-O"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "CKR_PIN_INCORRECT" in done.stderr


@pytest.mark.parametrize(
    ("key_id", "mechanism", "digest_input", "openssl_opts"),
    [
        (P256_ID, "ECDSA", True, []),
        (RSA_ID, "SHA256-RSA-PKCS", False, []),
        (RSA_ID, "RSA-PKCS-PSS", True, ["-sigopt", "rsa_padding_mode:pss", "-sigopt",
                                        "rsa_pss_saltlen:32"]),
    ],
)  # fmt: skip
def test_pkcs11_tool_signs_and_openssl_verifies(
    server: Pkcs11Server,
    tmp_path: Path,
    key_id: str,
    mechanism: str,
    digest_input: bool,
    openssl_opts: list[str],
) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"a document to sign\n")
    (tmp_path / "data.sha256").write_bytes(
        subprocess.run(
            ["openssl", "dgst", "-sha256", "-binary", str(data)],
            capture_output=True,
            check=True,
        ).stdout
    )
    tool(server, "--read-object", "--type", "pubkey", "--id", key_id, "-o", "pub.der",
         cwd=tmp_path)  # fmt: skip
    extra = ["--signature-format", "openssl"] if mechanism == "ECDSA" else []
    if mechanism == "RSA-PKCS-PSS":
        extra = ["--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256", "--salt-len", "32"]
    source = "data.sha256" if digest_input else "data"
    tool(server, "--login", "--pin", PIN, "--sign", "-m", mechanism, "--id", key_id,
         "-i", source, "-o", "sig", *extra, cwd=tmp_path)  # fmt: skip
    verified = subprocess.run(
        ["openssl", "dgst", "-sha256", *openssl_opts, "-verify", "pub.der", "-keyform", "DER",
         "-signature", "sig", "data"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr
    # and the server's own C_Verify agrees, and refuses other data
    checked = tool(server, "--login", "--pin", PIN, "--verify", "-m", mechanism, "--id", key_id,
                   "-i", source, "--signature-file", "sig", *extra, cwd=tmp_path)  # fmt: skip
    assert "Signature is valid" in checked


def test_ssh_keygen_lists_the_keys(server: Pkcs11Server, ks: Keystore) -> None:
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": server.address}
    done = subprocess.run(
        ["ssh-keygen", "-D", str(CLIENT_MODULE)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.split("\n"))
    assert any(line.startswith("ecdsa-sha2-nistp256 ") and line.endswith(" p11-p256")
               for line in lines), done.stdout  # fmt: skip
    assert any(line.startswith("ssh-rsa ") and line.endswith(" p11-rsa") for line in lines)


# -- the protocol with a bare client ---------------------------------------------------------------
class Raw:
    """A bare p11-kit RPC client: the version byte, then frames."""

    def __init__(self, server: Pkcs11Server, version: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)  # a bound on a hang, not a measurement
        self.sock.connect(str(server.path))
        self.sock.sendall(bytes([version]))
        self.version = self.sock.recv(1)[0]
        self.code = 1

    def call(self, body: bytes) -> bytes:
        self.code += 1
        self.sock.sendall(wire.frame(self.code, body, b"test"))
        head = self._exact(12)
        code, olen, blen = struct.unpack(">III", head)
        assert code == self.code
        self._exact(olen)
        return self._exact(blen)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the server closed the connection"
            out += chunk
        return out

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def u(v: int) -> bytes:
    return struct.pack(">Q", v)


def rv_of(reply: bytes) -> int:
    """The CK_RV of an ERROR reply; 0 for a call's own reply."""
    if reply[:4] != b"\x00\x00\x00\x00":
        return ck.CKR_OK
    return int(struct.unpack(">Q", reply[-8:])[0])


def initialize(client: Raw) -> None:
    init = wire.request(
        "C_Initialize", b"\x01" + wire.byte_array(wire.HANDSHAKE), b"\x00", b"\x01\xff\xff\xff\xff"
    )
    assert rv_of(client.call(init)) == ck.CKR_OK


def test_the_version_handshake_offers_at_most_version_2(server: Pkcs11Server) -> None:
    for asked, got in ((0, 0), (1, 1), (2, 2), (3, 2)):
        client = Raw(server, asked)
        assert client.version == got
        client.close()


def _login(client: Raw) -> int:
    """C_Initialize, a session on slot 0, C_Login; the handle of the P-256 private key."""
    initialize(client)
    opened = client.call(wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)))
    session = struct.unpack(">Q", opened[-8:])[0]
    pin = b"\x01" + wire.byte_array(PIN.encode())
    assert rv_of(client.call(wire.request("C_Login", u(session), u(ck.CKU_USER), pin))) == 0
    label = struct.pack(">IBI", ck.CKA_LABEL, 1, 8) + wire.byte_array(b"p11-p256")
    klass = struct.pack(">IBI", ck.CKA_CLASS, 1, 8) + u(ck.CKO_PRIVATE_KEY)
    template = struct.pack(">I", 2) + label + klass
    client.call(wire.request("C_FindObjectsInit", u(session), template))
    found = client.call(wire.request("C_FindObjects", u(session), struct.pack(">I", 4)))
    client.call(wire.request("C_FindObjectsFinal", u(session)))
    assert session == 1
    return int(struct.unpack(">Q", found[-8:])[0])


def test_version_2_encodes_mechanisms_its_own_way(server: Pkcs11Server, ks: Keystore) -> None:
    """p11-kit 0.25.6 and later: nothing after the type of a parameterless mechanism, a
    presence byte before the parameters of the others; version 1 keeps the byte array. A
    mechanism whose version 2 encoding the server does not know is CKR_MECHANISM_INVALID,
    and the connection serves on."""
    digest = bytes(range(32))
    room = struct.pack(">I", 64)
    for version, ecdsa in ((2, b""), (1, wire.byte_array(None))):
        client = Raw(server, version)
        try:
            assert client.version == version
            key = _login(client)
            mech = struct.pack(">I", ck.CKM_ECDSA) + ecdsa
            assert rv_of(client.call(wire.request("C_SignInit", u(1), mech, u(key)))) == 0
            reply = client.call(wire.request("C_Sign", u(1), b"\x01" + wire.byte_array(digest),
                                             room))  # fmt: skip
            assert rv_of(reply) == 0
            signature = reply[-64:]
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            ks.verify("p11-p256", digest, encode_dss_signature(r, s), prehashed=True)
        finally:
            client.close()
    client = Raw(server, 2)
    try:
        key = _login(client)
        # PSS with the presence byte (and its parameters); a PSS key type mismatch here
        pss = struct.pack(">I", ck.CKM_RSA_PKCS_PSS) + b"\x01" + u(ck.CKM_SHA256) + u(
            ck.CKG_MGF1_SHA256) + u(32)  # fmt: skip
        reply = client.call(wire.request("C_SignInit", u(1), pss, u(key)))
        assert rv_of(reply) == ck.CKR_KEY_TYPE_INCONSISTENT  # decoded: an EC key, not RSA
        # a mechanism the server cannot read in version 2
        odd = struct.pack(">I", 0x1234) + b"\x01\x02\x03"
        reply = client.call(wire.request("C_SignInit", u(1), odd, u(key)))
        assert rv_of(reply) == ck.CKR_MECHANISM_INVALID
        reply = client.call(wire.request("C_DeriveKey2", u(1), odd, u(key), struct.pack(">I", 0)))
        assert rv_of(reply) == ck.CKR_FUNCTION_NOT_SUPPORTED
        assert rv_of(client.call(wire.request("C_GetInfo"))) == ck.CKR_OK
    finally:
        client.close()
    # C_DeriveKey2 is no call of version 1
    body = wire.request("C_DeriveKey2", u(1), struct.pack(">I", 0x1234), u(1), struct.pack(">I", 0))
    with pytest.raises(Pkcs11MessageError, match="unknown call"):
        wire.decode(body, 1)


def _find(client: Raw, session: int, label: bytes, klass: int) -> int:
    """The handle of the one object of class `klass` labelled `label`."""
    attrs = struct.pack(">IBI", ck.CKA_LABEL, 1, len(label)) + wire.byte_array(label)
    attrs += struct.pack(">IBI", ck.CKA_CLASS, 1, 8) + u(klass)
    client.call(wire.request("C_FindObjectsInit", u(session), struct.pack(">I", 2) + attrs))
    found = client.call(wire.request("C_FindObjects", u(session), struct.pack(">I", 4)))
    client.call(wire.request("C_FindObjectsFinal", u(session)))
    assert struct.unpack(">I", found[11:15])[0] == 1
    return int(struct.unpack(">Q", found[-8:])[0])


def test_version_2_gcm_without_parameters_is_refused_and_the_connection_serves_on(
    server: Pkcs11Server, ks: Keystore
) -> None:
    """Version 2 lets a client send CKM_AES_GCM with the presence byte 0 (no CK_GCM_PARAMS):
    CKR_MECHANISM_PARAM_INVALID, and the connection serves on; with its parameters the same
    key decrypts."""
    ks.generate("p11-gcm", "aes-256")
    sealed = ks.encrypt("p11-gcm", b"sealed", b"aad")
    client = Raw(server, 2)
    try:
        _login(client)
        key = _find(client, 1, b"p11-gcm", ck.CKO_SECRET_KEY)
        bare = struct.pack(">I", ck.CKM_AES_GCM) + b"\x00"
        reply = client.call(wire.request("C_DecryptInit", u(1), bare, u(key)))
        assert rv_of(reply) == ck.CKR_MECHANISM_PARAM_INVALID
        assert rv_of(client.call(wire.request("C_GetInfo"))) == ck.CKR_OK
        gcm = struct.pack(">I", ck.CKM_AES_GCM) + b"\x01" + wire.byte_array(sealed[:12])
        gcm += u(96) + wire.byte_array(b"aad") + u(128)
        assert rv_of(client.call(wire.request("C_DecryptInit", u(1), gcm, u(key)))) == 0
        reply = client.call(wire.request("C_Decrypt", u(1), b"\x01" + wire.byte_array(
            sealed[12:]), struct.pack(">I", 64)))  # fmt: skip
        assert rv_of(reply) == 0 and reply.endswith(b"sealed")
    finally:
        client.close()
        ks.delete("p11-gcm")


def test_an_unexpected_error_is_function_failed_and_the_connection_serves_on(
    server: Pkcs11Server,
    ks: Keystore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call that fails with an exception the server does not expect (a bug) answers
    CKR_FUNCTION_FAILED; its message, which may hold secret bytes, stays out of the log."""

    def broken() -> None:
        raise RuntimeError("secret-4c1f")

    monkeypatch.setattr(ks, "keys", broken)
    client = Raw(server)
    try:
        initialize(client)
        opened = client.call(wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)))
        session = struct.unpack(">Q", opened[-8:])[0]
        reply = client.call(wire.request("C_FindObjectsInit", u(session), struct.pack(">I", 0)))
        assert rv_of(reply) == ck.CKR_FUNCTION_FAILED
        assert rv_of(client.call(wire.request("C_GetInfo"))) == ck.CKR_OK
    finally:
        client.close()
    assert "C_FindObjectsInit failed unexpectedly: RuntimeError" in caplog.text
    assert "secret-4c1f" not in caplog.text


def test_sessions_and_handles_of_one_client_are_invisible_to_another(
    server: Pkcs11Server,
) -> None:
    a, b = Raw(server), Raw(server)
    try:
        for c in (a, b):
            initialize(c)
        opened = a.call(wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)))
        session = struct.unpack(">Q", opened[-8:])[0]
        pin = b"\x01" + wire.byte_array(PIN.encode())
        assert rv_of(a.call(wire.request("C_Login", u(session), u(ck.CKU_USER), pin))) == 0
        a.call(wire.request("C_FindObjectsInit", u(session), struct.pack(">I", 0)))
        found = a.call(wire.request("C_FindObjects", u(session), struct.pack(">I", 16)))
        count = struct.unpack(">I", found[11:15])[0]
        handles = struct.unpack(f">{count}Q", found[15:])
        assert count == 4  # two keys, a private and a public object each
        # b has no session of its own: a's session handle means nothing to it
        assert rv_of(b.call(wire.request("C_GetSessionInfo", u(session)))) == (
            ck.CKR_SESSION_HANDLE_INVALID
        )
        b_opened = b.call(wire.request("C_OpenSession", u(0), u(ck.CKF_SERIAL_SESSION)))
        b_session = struct.unpack(">Q", b_opened[-8:])[0]
        for handle in handles:  # nor do a's object handles, private or public
            query = struct.pack(">I", 1) + struct.pack(">II", ck.CKA_LABEL, 0)
            reply = b.call(wire.request("C_GetAttributeValue", u(b_session), u(handle), query))
            assert rv_of(reply) == ck.CKR_OBJECT_HANDLE_INVALID
        # and a's login is not b's
        b.call(wire.request("C_FindObjectsInit", u(b_session), struct.pack(">I", 0)))
        found_b = b.call(wire.request("C_FindObjects", u(b_session), struct.pack(">I", 16)))
        assert struct.unpack(">I", found_b[11:15])[0] == 2  # the public objects only
    finally:
        a.close()
        b.close()


def test_a_malformed_message_gets_device_error_and_the_connection_serves_on(
    server: Pkcs11Server,
) -> None:
    client = Raw(server)
    try:
        initialize(client)
        bad = [
            struct.pack(">I", 9999) + wire.byte_array(b""),  # an unknown call
            struct.pack(">I", wire.CALL_IDS["C_GetInfo"]) + wire.byte_array(b"u"),  # signature
            wire.request("C_OpenSession", u(0)),  # truncated
            wire.request("C_GetInfo") + b"\x00",  # trailing bytes
            wire.request("C_FindObjectsInit", u(1), struct.pack(">I", 0xFFFFFFF)),  # count
        ]
        for body in bad:
            assert rv_of(client.call(body)) == ck.CKR_DEVICE_ERROR
        assert rv_of(client.call(wire.request("C_GetInfo"))) == ck.CKR_OK
        # a call the server does not serve
        reply = client.call(wire.request("C_DigestInit", u(1), struct.pack(">I", ck.CKM_SHA256)
                                          + wire.byte_array(None)))  # fmt: skip
        assert rv_of(reply) == ck.CKR_FUNCTION_NOT_SUPPORTED
    finally:
        client.close()


def test_a_huge_frame_closes_the_connection(server: Pkcs11Server) -> None:
    client = Raw(server)
    try:
        client.sock.sendall(struct.pack(">III", 5, 0, wire.MAX_BODY + 1))
        assert client.closed()
    finally:
        client.close()


def test_deep_attribute_nesting_is_refused() -> None:
    inner = struct.pack(">IBI", ck.CKA_CLASS, 1, 8) + u(ck.CKO_DATA)
    for _ in range(wire.MAX_DEPTH + 1):
        inner = struct.pack(">IBI", ck.CKA_WRAP_TEMPLATE, 1, 24) + struct.pack(">I", 1) + inner
    body = wire.request("C_FindObjectsInit", u(1), struct.pack(">I", 1) + inner)
    with pytest.raises(Pkcs11MessageError, match="nest deeper"):
        wire.decode(body)
    # one level less than the limit decodes
    shallow = struct.pack(">IBI", ck.CKA_CLASS, 1, 8) + u(ck.CKO_DATA)
    for _ in range(wire.MAX_DEPTH - 1):
        shallow = struct.pack(">IBI", ck.CKA_WRAP_TEMPLATE, 1, 24) + struct.pack(">I", 1) + shallow
    call = wire.decode(wire.request("C_FindObjectsInit", u(1), struct.pack(">I", 1) + shallow))
    assert call.name == "C_FindObjectsInit"


def test_a_huge_byte_array_length_is_refused_without_reading() -> None:
    body = wire.request("C_SignUpdate", u(1), b"\x01" + struct.pack(">I", 0x7FFFFFF0))
    with pytest.raises(Pkcs11MessageError, match="past the end"):
        wire.decode(body)


def test_pkcs11_tool_makes_and_deletes_a_key_pair(server: Pkcs11Server, ks: Keystore) -> None:
    """--keypairgen is C_GenerateKeyPair into the keystore; --delete-object of the private
    key is C_DestroyObject: refused (CKR_ACTION_PROHIBITED) by default, and with
    allow_destroy it deletes the key (no deletion_wait here: at once; its public object
    goes with it)."""
    login = ("--login", "--pin", PIN)
    made = tool(server, *login, "--keypairgen", "--key-type", "EC:prime256v1",
                "--label", "p11-made")  # fmt: skip
    assert "label:      p11-made" in made
    assert ks.info("p11-made").type.value == "ecdsa-p256"
    ks.rotate("p11-made")
    listed = tool(server, *login, "--list-objects")
    assert listed.count("label:      p11-made") == 2  # a private and a public object
    delete = ("--delete-object", "--type", "privkey", "--label", "p11-made")
    refused = subprocess.run(
        ["pkcs11-tool", "--module", str(CLIENT_MODULE), *login, *delete],
        env={**os.environ, "P11_KIT_SERVER_ADDRESS": server.address},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "C_DestroyObject() failed" in refused.stderr
    assert f"(0x{ck.CKR_ACTION_PROHIBITED:x})" in refused.stderr  # OpenSC has no name for it
    assert [v.version for v in ks.versions("p11-made")] == [1, 2]
    with serving_p11(ks, allow_destroy=True) as destroying:
        tool(destroying, *login, *delete)
        assert "p11-made" not in tool(destroying, *login, "--list-objects")
    assert all(info.name != "p11-made" for info in ks.keys())


def test_destroy_waits_the_keystores_deletion_wait(tmp_path: Path) -> None:
    """With [keystore] deletion_wait, C_DestroyObject schedules the deletion as `key delete`
    does: the key and its versions stay, it leaves the token, and it can be brought back."""
    config = tmp_path / "strongroom.toml"
    config.write_text(
        f'[keystore]\ndata_dir = "{tmp_path / "data"}"\norder = ["vault"]\n'
        'deletion_wait = "7d"\n\n[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{VAULT_PASS_ENV}"\nkdf_memory_kib = 8192\nkdf_iterations = 1\n'
    )
    login = ("--login", "--pin", PIN)
    with strongroom.open(config) as waiting:
        waiting.vault_control().initialize()
        waiting.generate("p11-kept", "ecdsa-p256")
        waiting.rotate("p11-kept")
        with serving_p11(waiting, allow_destroy=True) as srv:
            tool(srv, *login, "--delete-object", "--type", "privkey", "--label", "p11-kept")
            assert "p11-kept" not in tool(srv, *login, "--list-objects")
            info = waiting.info("p11-kept")
            assert info.delete_after is not None
            assert [v.version for v in waiting.versions("p11-kept")] == [1, 2]
            waiting.cancel_deletion("p11-kept")
            assert tool(srv, *login, "--list-objects").count("label:      p11-kept") == 2


@pytest.mark.skipif(shutil.which("modutil") is None, reason="NSS's tools (libnss3-tools)")
@pytest.mark.parametrize("name", ["p11-p256", "p11-rsa"])
def test_nss_lists_the_keys_and_makes_a_csr(
    server: Pkcs11Server, ks: Keystore, tmp_path: Path, name: str
) -> None:
    """NSS (what Firefox and Thunderbird use): `modutil -add` the module into a database,
    `certutil -K` lists the token's keys, and `certutil -R -k ID` makes a CSR with one,
    which `openssl req -verify` accepts and which holds the keystore key's public key."""
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": server.address}
    db = f"sql:{tmp_path}"
    (tmp_path / "pin").write_text(PIN + "\n")

    def run(*args: str) -> str:
        done = subprocess.run(
            args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    run("certutil", "-N", "-d", db, "--empty-password")
    run("modutil", "-dbdir", db, "-add", "strongroom", "-libfile", str(CLIENT_MODULE), "-force")
    assert "Token Name: strongroom" in run("modutil", "-dbdir", db, "-list", "strongroom")
    listed = run("certutil", "-K", "-d", db, "-h", "strongroom", "-f", "pin")
    assert '"p11-p256"' in listed and '"p11-rsa"' in listed
    (tmp_path / "noise").write_bytes(os.urandom(64))
    run("certutil", "-R", "-d", db, "-h", "strongroom", "-f", "pin", "-k", name.encode().hex(),
        "-s", f"CN={name}", "-o", "csr.der", "-z", "noise")  # fmt: skip
    checked = run("openssl", "req", "-inform", "DER", "-in", "csr.der", "-verify", "-noout")
    assert "verify OK" in checked
    shown = run("openssl", "req", "-inform", "DER", "-in", "csr.der", "-pubkey", "-noout")
    assert algorithms.encode_public(ks.public_key(name), "pem").decode() in shown
