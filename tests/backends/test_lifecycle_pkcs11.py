"""Key versions and envelope encryption with SoftHSM2 behind python-pkcs11: rotation in the
token, rotation from the vault into the token, deletion of every version (checked with
OpenSC's pkcs11-tool), and the token's AES and RSA keys as envelope KEKs."""

from __future__ import annotations

import io
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import CliResult
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11_support import SoftHsm, cli, config, ks, list_objects, softhsm

from strongroom import envelope, lifecycle
from strongroom.errors import (
    IntegrityError,
    InvalidArgument,
    PolicyViolation,
    UnsupportedOperation,
    VersionRetired,
)
from strongroom.keystore import Keystore

__all__ = ["config", "ks", "softhsm"]  # fixtures, imported so pytest finds them


def labelled(hsm: SoftHsm, label: str) -> int:
    return sum(1 for o in list_objects(hsm) if o.get("label") == label)


def test_rotation_in_the_token(ks: Keystore, softhsm: SoftHsm) -> None:
    ks.generate("lc-aes", "aes-256", backend="hsm")
    ks.generate("lc-ec", "ecdsa-p256", backend="hsm")
    ct1 = ks.encrypt("lc-aes", b"v1 data", b"aad", envelope=True)
    sig1 = ks.sign("lc-ec", b"msg", envelope=True)
    pub1 = ks.public_key("lc-ec")
    assert ks.rotate("lc-aes").version == 2
    assert ks.rotate("lc-ec").backend == "hsm"
    assert labelled(softhsm, "lc-aes") == 2  # both versions are token objects
    ct2 = ks.encrypt("lc-aes", b"v2 data", b"aad", envelope=True)
    assert ks.decrypt("lc-aes", ct1, b"aad", envelope=True) == b"v1 data"
    assert ks.decrypt("lc-aes", ct2, b"aad", envelope=True) == b"v2 data"
    ks.verify("lc-ec", b"msg", sig1, envelope=True)
    # the old version's public key still checks its bare signature, outside Strongroom too
    assert ks.public_key("lc-ec", version=1) == pub1 != ks.public_key("lc-ec")
    _, bare = lifecycle.unpack(lifecycle.SIGNATURE_MAGIC, sig1, "signature")
    assert isinstance(pub1, ec.EllipticCurvePublicKey)
    pub1.verify(bare, b"msg", ec.ECDSA(hashes.SHA256()))
    moved = ks.rewrap("lc-aes", ct1, b"aad")
    ks.set_min_decryption_version("lc-aes", 2)
    with pytest.raises(VersionRetired):
        ks.decrypt("lc-aes", ct1, b"aad", envelope=True)
    assert ks.decrypt("lc-aes", moved, b"aad", envelope=True) == b"v1 data"
    assert ks.trim("lc-aes") == [1]
    assert labelled(softhsm, "lc-aes") == 1  # version 1 left the token
    ks.delete("lc-aes")
    ks.delete("lc-ec")
    assert labelled(softhsm, "lc-aes") == 0 and labelled(softhsm, "lc-ec") == 0


def test_rotation_from_the_vault_into_the_token(ks: Keystore, softhsm: SoftHsm) -> None:
    first = ks.generate("lc-move", "aes-256", backend="vault")
    ct1 = ks.encrypt("lc-move", b"soft", envelope=True)
    info = ks.rotate("lc-move", backend="hsm")
    assert (first.backend, info.backend, info.version) == ("vault", "hsm", 2)
    assert [(v.version, v.backend) for v in ks.versions("lc-move")] == [(1, "vault"), (2, "hsm")]
    ct2 = ks.encrypt("lc-move", b"hard", envelope=True)
    assert ks.decrypt("lc-move", ct1, envelope=True) == b"soft"
    assert ks.decrypt("lc-move", ct2, envelope=True) == b"hard"
    with pytest.raises(IntegrityError):  # the token's key cannot open the vault's ciphertext
        ks.decrypt("lc-move", ct1[lifecycle.HEADER_SIZE :])
    ks.schedule_deletion("lc-move", timedelta(seconds=1))
    assert labelled(softhsm, "lc-move") == 1
    import time

    time.sleep(1.1)
    assert [i.name for i in ks.purge_due()] == ["lc-move"]
    assert labelled(softhsm, "lc-move") == 0


@pytest.mark.parametrize(
    ("key_type", "usage", "algorithm"),
    [("aes-256", None, None), ("rsa-2048", "encrypt,decrypt", "oaep-sha1")],
)
def test_token_keys_as_envelope_keks(
    ks: Keystore, key_type: str, usage: str | None, algorithm: str | None
) -> None:
    name = f"lc-kek-{key_type}"
    ks.generate(name, key_type, backend="hsm", usage=usage)
    data = os.urandom(200_000)
    blob = io.BytesIO()
    header = ks.encrypt_stream(name, io.BytesIO(data), blob, algorithm=algorithm)
    assert header["kek"] == {
        "algorithm": algorithm,
        "key": name,
        "namespace": "default",
        "type": key_type,
        "version": 1,
    }
    out = io.BytesIO()
    ks.decrypt_stream(io.BytesIO(blob.getvalue()), out)
    assert out.getvalue() == data
    bad = bytearray(blob.getvalue())
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        ks.decrypt_stream(io.BytesIO(bytes(bad)), io.BytesIO())
    hdr, _, _ = envelope.read_header(io.BytesIO(blob.getvalue()))
    assert data[:64] not in hdr.wrapped_key
    ks.delete(name)


def test_a_wrap_only_token_key_wraps_envelope_data_keys_with_rfc_5649(
    ks: Keystore, softhsm: SoftHsm
) -> None:
    """An HSM key-wrapping key (usage wrap,unwrap: it cannot encrypt) as an envelope KEK: the
    data key is wrapped inside the token by C_WrapKey with CKM_AES_KEY_WRAP_PAD, and comes
    back through C_UnwrapKey; no session object is left behind."""
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

    ks.generate("lc-kwk", "aes-256", backend="hsm", usage="wrap,unwrap")
    before = len(list_objects(softhsm))
    data = os.urandom(300_000)
    blob = io.BytesIO()
    header = ks.encrypt_stream("lc-kwk", io.BytesIO(data), blob)
    assert header["kek"]["algorithm"] == "aes-kwp"
    out = io.BytesIO()
    ks.decrypt_stream(io.BytesIO(blob.getvalue()), out)
    assert out.getvalue() == data
    hdr, _, _ = envelope.read_header(io.BytesIO(blob.getvalue()))
    wrapped = lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, hdr.wrapped_key, "ciphertext")[1]
    assert len(wrapped) == 40  # RFC 5649 of a 32-byte data key: 8 bytes longer
    with pytest.raises(InvalidUnwrap):  # not any other key's wrap
        aes_key_unwrap_with_padding(os.urandom(32), wrapped)
    # a damaged wrapped key is refused by the token's unwrap
    damaged = bytearray(hdr.wrapped_key)
    damaged[-1] ^= 1
    with pytest.raises(IntegrityError):
        ks.decrypt("lc-kwk", bytes(damaged), algorithm="aes-kwp", envelope=True)
    # the data key and the plaintext never sit on the token
    assert len(list_objects(softhsm)) == before
    # the key still cannot encrypt, and an explicit aes-kwp needs the wrap usage
    with pytest.raises(PolicyViolation):
        ks.encrypt("lc-kwk", b"x")
    ks.generate("lc-enc-only", "aes-256", backend="hsm", usage="encrypt,decrypt")
    with pytest.raises(PolicyViolation):
        ks.encrypt("lc-enc-only", os.urandom(32), algorithm="aes-kwp")
    ct = ks.encrypt("lc-kwk", b"\x01" * 32, algorithm="aes-kwp")
    assert ks.decrypt("lc-kwk", ct, algorithm="aes-kwp") == b"\x01" * 32
    with pytest.raises(InvalidArgument, match="no associated data"):
        ks.encrypt("lc-kwk", b"\x01" * 32, aad=b"a", algorithm="aes-kwp")
    # a vault key does not take aes-kwp: it says so by name
    ks.generate("lc-vault-aes", "aes-256", backend="vault", usage="wrap,unwrap,encrypt,decrypt")
    with pytest.raises(UnsupportedOperation, match="vault"):
        ks.encrypt("lc-vault-aes", os.urandom(32), algorithm="aes-kwp")
    for name in ("lc-kwk", "lc-enc-only", "lc-vault-aes"):
        ks.delete(name)


def test_cli_rotate_from_the_vault_into_the_token(config: Path, softhsm: SoftHsm) -> None:
    """`key rotate --backend hsm` through the real CLI: version 2 is a token object, and
    the vault's version 1 still decrypts what it encrypted."""

    def ok(*args: str, input: bytes = b"") -> CliResult:
        r = cli(config, softhsm, *args, input=input)
        assert r.returncode == 0, r.stderr
        return r

    ok("key", "generate", "lc-cli-move", "--type", "aes-256", "--backend", "vault")
    ct1 = ok("key", "encrypt", "lc-cli-move", input=b"soft").stdout
    assert labelled(softhsm, "lc-cli-move") == 0
    out = ok("key", "rotate", "lc-cli-move", "--backend", "hsm").stdout.decode()
    assert out == "rotated 'lc-cli-move': version 2 in hsm is primary\n"
    assert labelled(softhsm, "lc-cli-move") == 1  # the new version is a token object
    versions = json.loads(ok("--json", "key", "versions", "lc-cli-move").stdout)
    assert [(v["version"], v["backend"], v["primary"]) for v in versions] == [
        (1, "vault", False),
        (2, "hsm", True),
    ]
    ct2 = ok("key", "encrypt", "lc-cli-move", input=b"hard").stdout
    assert lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, ct2, "ciphertext")[0] == 2
    assert ok("key", "decrypt", "lc-cli-move", input=ct1).stdout == b"soft"
    assert ok("key", "decrypt", "lc-cli-move", input=ct2).stdout == b"hard"
    # a backend that does not exist: one line, and no third version
    bad = cli(config, softhsm, "key", "rotate", "lc-cli-move", "--backend", "nosuch")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad
    assert "nosuch" in bad.stderr and "Traceback" not in bad.stderr
    assert len(json.loads(ok("--json", "key", "versions", "lc-cli-move").stdout)) == 2
    ok("key", "delete", "lc-cli-move")
    assert labelled(softhsm, "lc-cli-move") == 0
