"""The software vault: the contract suite, published vectors, and vault-only behaviour."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

import strongroom
from strongroom.backends.vault import VaultBackend, procedures
from strongroom.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    KeyNotFound,
    PolicyViolation,
    UnsupportedOperation,
)
from strongroom.keystore import Keystore
from strongroom.testing import BackendContract

VECTORS = Path(__file__).parents[1] / "vectors"
PASS = "correct horse battery staple"


def write_config(tmp: Path, env: str = "SR_TEST_PASS", extra: str = "") -> Path:
    cfg = tmp / "strongroom.toml"
    cfg.write_text(
        f"""
[keystore]
data_dir = "{tmp / "data"}"

[backends.vault]
type = "vault"
passphrase = "env:{env}"
kdf_memory_kib = 8192
kdf_iterations = 1
{extra}
"""
    )
    return cfg


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SR_TEST_PASS", PASS)
    return write_config(tmp_path)


@pytest.fixture
def ks(config: Path) -> Iterator[Keystore]:
    with strongroom.open(config) as keystore:
        yield keystore


def vault_of(ks: Keystore) -> VaultBackend:
    v = ks.vault
    assert isinstance(v, VaultBackend)
    return v


class TestVaultContract(BackendContract):
    @pytest.fixture
    def keystore(self, ks: Keystore) -> Keystore:
        return ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "vault"


# -- published vectors ---------------------------------------------------------------------------
RFC8032 = json.loads((VECTORS / "rfc8032_ed25519.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", RFC8032, ids=[v["name"] for v in RFC8032])
def test_rfc8032_ed25519(ks: Keystore, vector: dict[str, str]) -> None:
    seed = bytearray.fromhex(vector["secret_key"])
    info = ks.import_key("rfc8032", "ed25519", seed, format="raw")
    seed[:] = bytes(len(seed))
    pub = ks.public_key(info.name)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == vector["public_key"]
    message = bytes.fromhex(vector["message"])
    assert ks.sign(info.name, message).hex() == vector["signature"]
    ks.verify(info.name, message, bytes.fromhex(vector["signature"]))


SLIP10 = json.loads((VECTORS / "slip10.json").read_text())


def _slip10_cases() -> list[tuple[str, str, str, str]]:
    cases = []
    for vec in SLIP10["vectors"]:
        if vec["curve"] in ("ed25519", "secp256k1"):
            for chain in vec["chains"]:
                cases.append((vec["curve"], vec["seed"], chain["chain"], chain["public"]))
    return cases


@pytest.mark.parametrize(("curve", "seed", "path", "public"), _slip10_cases())
def test_slip10_derive_in_vault(
    ks: Keystore, curve: str, seed: str, path: str, public: str
) -> None:
    ks.import_key("seed", "seed", bytearray.fromhex(seed), format="raw")
    info = ks.slip10_derive("seed", path, "child", curve)
    pub = ks.public_key(info.name)
    if curve == "ed25519":
        got = b"\x00" + pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        got = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    assert got.hex() == public
    sig = ks.sign("child", b"derived")
    ks.verify("child", b"derived", sig)


BIP39 = json.loads((VECTORS / "bip39_english.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", BIP39[:6], ids=lambda v: v["entropy"][:8])
def test_bip39_recover_matches_vector_seed(ks: Keystore, vector: dict[str, str]) -> None:
    ks.bip39_recover("wallet", vector["mnemonic"], passphrase="TREZOR")
    ks.slip10_derive("wallet", "m/0'", "a", "ed25519")
    expected_key = bytearray(32)
    procedures.slip10_derive(
        "ed25519", bytes.fromhex(vector["seed"]), "m/0'", memoryview(expected_key)
    )
    expected = procedures.slip10_public_key("ed25519", bytes(expected_key))
    pub = ks.public_key("a").public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert b"\x00" + pub == expected


def test_bip39_generate_returns_words_not_seed(ks: Keystore) -> None:
    info, mnemonic = ks.bip39_generate("fresh", words=12)
    assert len(mnemonic.split()) == 12
    procedures.bip39_validate(mnemonic)
    assert info.type.value == "seed"
    with pytest.raises(PolicyViolation):
        ks.export_key("fresh", "raw")
    with pytest.raises(InvalidArgument):
        ks.bip39_recover("bad", "abandon " * 11 + "zoo")


# -- vault behaviour -----------------------------------------------------------------------------
def test_keys_survive_reopen(config: Path) -> None:
    with strongroom.open(config) as ks:
        ks.generate("persist", "ecdsa-p256")
        sig = ks.sign("persist", b"m")
    with strongroom.open(config) as ks:
        ks.verify("persist", b"m", sig)
        assert ks.sign("persist", b"m") != b""


def test_wrong_passphrase(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with strongroom.open(config) as ks:
        ks.generate("k", "ed25519")
    monkeypatch.setenv("SR_TEST_PASS", "not the passphrase")
    with strongroom.open(config) as ks, pytest.raises(AuthenticationFailed) as err:
        ks.sign("k", b"m")
    assert "not the passphrase" not in str(err.value)


def test_import_export_formats(ks: Keystore) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ks.import_key("pem", "ecdsa-p256", bytearray(pem), exportable=True)
    assert ks.public_key("pem").public_numbers() == private.public_key().public_numbers()
    raw = private.private_numbers().private_value.to_bytes(32, "big")
    ks.import_key("raw", "ecdsa-p256", bytearray(raw), format="raw", exportable=True)
    assert ks.export_key("raw", "raw") == raw
    exported = serialization.load_pem_private_key(ks.export_key("pem", "pem"), None)
    assert isinstance(exported, ec.EllipticCurvePrivateKey)
    assert exported.private_numbers() == private.private_numbers()
    with pytest.raises(InvalidArgument):
        ks.import_key("wrongtype", "ecdsa-p384", bytearray(pem))
    with pytest.raises(InvalidArgument):
        ks.import_key("short", "aes-256", bytearray(16))
    ks.generate("locked", "ed25519")
    with pytest.raises(PolicyViolation):
        ks.export_key("locked")


def test_wrap_unwrap_moves_an_exportable_key(ks: Keystore) -> None:
    ks.generate("kek", "aes-256", usage="wrap,unwrap")
    ks.generate("movable", "ed25519", exportable=True)
    ks.generate("fixed", "ed25519")
    blob = ks.wrap("kek", "movable")
    with pytest.raises(PolicyViolation):
        ks.wrap("kek", "fixed")
    ks.unwrap("kek", blob, "moved", "ed25519")
    assert ks.public_key("moved").public_bytes_raw() == ks.public_key("movable").public_bytes_raw()
    with pytest.raises(IntegrityError):
        ks.unwrap("kek", blob[:-1] + bytes([blob[-1] ^ 1]), "broken", "ed25519")


def test_derive_and_hmac(ks: Keystore) -> None:
    ks.generate("root", "hmac-sha256", usage="sign,verify,derive")
    ks.derive("root", "child-a", "aes-256", info=b"a")
    ks.derive("root", "child-b", "aes-256", info=b"a")
    ct = ks.encrypt("child-a", b"x")
    assert ks.decrypt("child-b", ct) == b"x"  # same HKDF input → same key
    tag = ks.mac("root", b"data")
    ks.verify("root", b"data", tag)
    with pytest.raises(InvalidSignature):
        ks.verify("root", b"datA", tag)


def test_x25519_agreement_matches_peer(ks: Keystore) -> None:
    ks.generate("me", "x25519")
    peer = x25519.X25519PrivateKey.generate()
    ks.agree("me", peer.public_key(), "session", "hmac-sha256")
    mine = ks.public_key("me")
    assert isinstance(mine, x25519.X25519PublicKey)
    shared = peer.exchange(mine)
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(hashes.SHA256(), 32, None, b"").derive(shared)
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(b"hello")
    assert ks.mac("session", b"hello") == h.finalize()


def test_catalog_failure_rolls_back_backend_key(
    ks: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = vault_of(ks)
    before = {k.handle for k in vault.records()}

    def broken(info: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ks.catalog, "add", broken)
    with pytest.raises(OSError):
        ks.generate("orphan", "ed25519")
    assert {k.handle for k in vault.records()} == before


def test_explicit_backend_never_falls_back(ks: Keystore) -> None:
    with pytest.raises(InvalidArgument, match="nosuch"):
        ks.generate("k", "ed25519", backend="nosuch")
    with pytest.raises(UnsupportedOperation, match="seed"):
        ks.generate("s", "seed", backend="vault")
    assert "k" not in {k.name for k in ks.keys()}


def test_deleted_key_is_gone_from_snapshot(config: Path) -> None:
    with strongroom.open(config) as ks:
        ks.generate("temp", "ed25519")
        handle = ks.info("temp").handle
        ks.delete("temp")
    with strongroom.open(config) as ks:
        assert handle not in {k.handle for k in vault_of(ks).records()}
        with pytest.raises(KeyNotFound):
            ks.sign("temp", b"x")


def test_public_key_objects(ks: Keystore) -> None:
    ks.generate("e", "ed25519")
    assert isinstance(ks.public_key("e"), ed25519.Ed25519PublicKey)
    ks.generate("s", "aes-256")
    with pytest.raises(InvalidArgument):
        ks.public_key("s")


def test_rsa_oaep_sha1_and_sha256(ks: Keystore) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    ks.generate("rsa-enc", "rsa-2048", usage="encrypt,decrypt")
    public = ks.public_key("rsa-enc")
    for algorithm, digest in (("oaep-sha1", hashes.SHA1), ("oaep-sha256", hashes.SHA256)):
        ct = public.encrypt(  # type: ignore[union-attr]
            b"interop", padding.OAEP(padding.MGF1(digest()), digest(), None)
        )
        assert ks.decrypt("rsa-enc", ct, algorithm=algorithm) == b"interop"
    default = ks.encrypt("rsa-enc", b"x")
    assert ks.decrypt("rsa-enc", default) == b"x"
    with pytest.raises(IntegrityError):
        ks.decrypt("rsa-enc", default, algorithm="oaep-sha1")  # hashes must match
    with pytest.raises(InvalidArgument):
        ks.encrypt("rsa-enc", b"x", algorithm="pkcs1v15")


def test_secrets_are_kept_sealed_and_exported_raw(config: Path) -> None:
    """A `secret` (KMIP's Secret Data and Opaque Object): 1 byte to 64 KiB, imported and
    exported raw, nothing else; sealed in the store like every record (its bytes are not in
    the database file), and kept across a reopen."""
    big = bytes(range(256)) * 256  # 64 KiB exactly
    with strongroom.open(config) as ks:
        info = ks.import_key("db-password", "secret", bytearray(b"hunter2"), exportable=True)
        assert info.usage == frozenset() and not info.type.is_asymmetric
        ks.import_key("blob", "secret", bytearray(big), exportable=True)
        ks.import_key("one", "secret", bytearray(b"\x00"), exportable=True)
        ks.import_key("kept", "secret", bytearray(b"never leaves"))
        for bad in (b"", big + b"!"):
            with pytest.raises(InvalidArgument, match="1 to 65536 bytes"):
                ks.import_key("bad", "secret", bytearray(bad))
        with pytest.raises(InvalidArgument):
            ks.import_key("used", "secret", bytearray(b"x"), usage="encrypt")
        with pytest.raises(UnsupportedOperation):
            ks.generate("made", "secret")
        with pytest.raises(PolicyViolation, match=r"its usages: $"):
            ks.encrypt("db-password", b"x")
        with pytest.raises(PolicyViolation):
            ks.sign("db-password", b"x")
        with pytest.raises(PolicyViolation):
            ks.export_key("kept", "raw")
        with pytest.raises(InvalidArgument, match="raw"):
            ks.export_key("db-password", "pem")
    store = config.parent / "data"
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"hunter2" not in data and big[:64] not in data, path
    with strongroom.open(config) as ks:
        assert ks.export_key("db-password", "raw") == b"hunter2"
        assert ks.export_key("blob", "raw") == big
        assert ks.export_key("one", "raw") == b"\x00"
