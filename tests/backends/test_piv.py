"""The PIV backend through the real PC/SC stack: pyscard → pcscd → vpcd → the PIV emulator.

tests/emulators/piv_card.py is the card; tests/emulators/pcsc_support.py starts pcscd with vpcd
readers itself. Every test gets a fresh card in the same reader slot.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pcsc_support
import pytest
from conftest import run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from piv_card import ALG_AES192, DEFAULT_PIN, PivCard
from piv_support import (
    OPENSC_MODULE,
    PIV_MGMT_ENV,
    PIV_PIN_ENV,
    PIV_VAULT_PASS,
    PIV_VAULT_PASS_ENV,
    PivReader,
    piv_reader,
    reader,
    write_piv_config,
)

import strongroom
from strongroom.cli import exit_code_of
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    UnsupportedOperation,
)
from strongroom.keystore import Keystore
from strongroom.testing import BackendContract

__all__ = ["piv_reader", "reader"]  # fixtures, imported so pytest finds them

_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, PIV_VAULT_PASS)
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)


def piv_config(tmp_path: Path, reader: PivReader, piv_extra: str = "") -> Path:
    return write_piv_config(tmp_path / "ks", reader.name, piv_extra=piv_extra)


@pytest.fixture
def ks(tmp_path: Path, reader: PivReader, env: None) -> Iterator[Keystore]:
    with strongroom.open(piv_config(tmp_path, reader)) as keystore:
        yield keystore


class TestPivContract(BackendContract):
    can_adopt = True  # test_adopt_a_key_already_on_the_card puts one on the card first

    @pytest.fixture
    def keystore(self, ks: Keystore) -> Keystore:
        return ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "piv"


# -- keys, slots and certificates -------------------------------------------------------------
def test_slots_certificates_and_openssl(ks: Keystore, reader: PivReader, tmp_path: Path) -> None:
    ks.generate("ec", "ecdsa-p256", backend="piv")
    ks.generate("ec384", "ecdsa-p384", backend="piv")
    ks.generate("rsa", "rsa-2048", backend="piv")
    ks.generate("kex", "ecdsa-p256", backend="piv", usage="agree")
    assert [ks.info(n).handle for n in ("ec", "ec384", "rsa", "kex")] == ["9a", "9c", "82", "9d"]
    assert set(reader.card.state.keys) == {0x9A, 0x9C, 0x82, 0x9D}
    backend = ks.backend("piv")
    for name in ("ec", "ec384", "rsa"):
        cert = backend.certificate(ks.info(name))  # type: ignore[attr-defined]
        store = ks.catalog.store_id.hex()
        assert (
            cert.subject.rfc4514_string() == f"OU=strongroom-store:{store},O=Strongroom,CN={name}"
        )
        cert.verify_directly_issued_by(cert)  # signed by the card's own key
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature
        data = f"openssl checks {name}".encode()
        sig = ks.sign(name, data)
        (tmp_path / "data").write_bytes(data)
        (tmp_path / "sig").write_bytes(sig)
        (tmp_path / "pub.pem").write_bytes(
            ks.public_key(name).public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        digest = "-sha384" if name == "ec384" else "-sha256"
        out = subprocess.run(
            [
                "openssl",
                "dgst",
                digest,
                "-verify",
                str(tmp_path / "pub.pem"),
                "-signature",
                str(tmp_path / "sig"),
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0 and "Verified OK" in out.stdout, out.stderr
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-check_ss_sig",
                "-partial_chain",
                "-CAfile",
                str(tmp_path / "cert.pem"),
                str(tmp_path / "cert.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    kex = backend.certificate(ks.info("kex"))  # type: ignore[attr-defined]
    assert kex.extensions.get_extension_for_class(x509.KeyUsage).value.key_agreement
    # RSA-PSS, padded on the host, verified by cryptography
    pss = ks.sign("rsa", b"pss")
    public = ks.public_key("rsa")
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(pss, b"pss", padding.PKCS1v15(), hashes.SHA256())
    pss = ks.sign("rsa", b"pss", algorithm="pss")
    public.verify(pss, b"pss", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_delete_destroys_the_key_and_frees_the_slot(ks: Keystore, reader: PivReader) -> None:
    ks.generate("a", "ecdsa-p256", backend="piv")
    old = reader.card.state.keys[0x9A]
    assert 0x5FC105 in reader.card.state.objects
    ks.delete("a")
    assert 0x5FC105 not in reader.card.state.objects
    assert reader.card.state.keys[0x9A] is not old  # overwritten: the old private key is gone
    ks.generate("b", "ecdsa-p256", backend="piv")
    assert ks.info("b").handle == "9a"
    # retired slots: the Key History object counts them (tag C1), so middleware looks there
    history = 0x5FC10C
    names = ("c", "d", "e")
    for name in names:
        ks.generate(name, "ecdsa-p256", backend="piv")
    assert [ks.info(n).handle for n in names] == ["9c", "82", "83"]
    assert reader.card.state.objects[history].startswith(bytes.fromhex("5308C10102C20100"))
    ks.delete("d")  # a gap: the count still reaches 83
    assert reader.card.state.objects[history].startswith(bytes.fromhex("5308C10102"))
    ks.delete("e")
    assert reader.card.state.objects[history].startswith(bytes.fromhex("5308C10100"))


def test_wrong_card_is_refused(tmp_path: Path, reader: PivReader, env: None) -> None:
    config = piv_config(tmp_path, reader)
    with strongroom.open(config) as ks:
        ks.generate("mine", "ecdsa-p256", backend="piv")
    reader.remove()
    reader.insert(PivCard())
    with strongroom.open(config) as ks:
        ks.generate("stranger", "ecdsa-p256", backend="piv", usage="sign")
        ks.catalog.remove("default", "stranger")
        with pytest.raises(BackendUnavailable, match="'stranger', not key 'mine'"):
            ks.sign("mine", b"x")
        with pytest.raises(Exception, match="nothing was deleted"):
            ks.delete("mine")
    assert 0x9A in reader.card.state.keys and 0x5FC105 in reader.card.state.objects


def test_slots_setting_and_full_card(tmp_path: Path, reader: PivReader, env: None) -> None:
    config = piv_config(tmp_path, reader, 'slots = ["9e", "95"]')
    with strongroom.open(config) as ks:
        assert ks.generate("one", "ecdsa-p256", backend="piv").handle == "95"
        assert ks.generate("two", "ecdsa-p256", backend="piv").handle == "9e"
        with pytest.raises(UnsupportedOperation, match="already holds a key"):
            ks.generate("three", "ecdsa-p256", backend="piv")
        assert ks.sign("two", b"9e needs no PIN")


def test_aes192_management_key_from_config(
    tmp_path: Path, reader: PivReader, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = bytes(range(1, 25))
    reader.remove()
    reader.insert(PivCard(mgmt_alg=ALG_AES192, mgmt_key=key))
    monkeypatch.setenv(PIV_MGMT_ENV, key.hex())
    good = piv_config(tmp_path / "a", reader, f'management_key = "env:{PIV_MGMT_ENV}"')
    with strongroom.open(good) as ks:
        ks.generate("k", "ecdsa-p256", backend="piv")  # 3DES refused (6A86), then AES-192
    monkeypatch.setenv(PIV_MGMT_ENV, "00" * 24)
    bad = piv_config(tmp_path / "b", reader, f'management_key = "env:{PIV_MGMT_ENV}"')
    with strongroom.open(bad) as ks:
        with pytest.raises(AuthenticationFailed, match="management key"):
            ks.generate("k2", "ecdsa-p256", backend="piv")


# -- PIN ----------------------------------------------------------------------------------------
def _verifies(card: PivCard) -> int:
    return sum(1 for a in card.apdus if a[1] == 0x20 and len(a) > 5)


def test_pin_counter_and_blocking(
    tmp_path: Path, reader: PivReader, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = piv_config(tmp_path, reader)
    with strongroom.open(config) as ks:
        ks.generate("k", "ecdsa-p256", backend="piv")
        assert ks.backend("piv").pin_tries_left() is None  # type: ignore[attr-defined]
    with strongroom.open(config) as ks:
        assert ks.backend("piv").pin_tries_left() == 3  # type: ignore[attr-defined]
    for wrong, left in (("111111", 2), ("222222", 1)):
        monkeypatch.setenv(PIV_PIN_ENV, wrong)
        with strongroom.open(config) as ks:
            before = _verifies(reader.card)
            with pytest.raises(AuthenticationFailed) as err:
                ks.sign("k", b"x")
            assert err.value.retries_left == left and f"{left} tries left" in str(err.value)
            # never sent again by itself, however often the caller asks
            with pytest.raises(AuthenticationFailed, match="already refused"):
                ks.sign("k", b"x")
            assert _verifies(reader.card) == before + 1
            assert reader.card.pin_tries == left
            assert ks.backend("piv").pin_tries_left() == left  # type: ignore[attr-defined]
    monkeypatch.setenv(PIV_PIN_ENV, "333333")
    with strongroom.open(config) as ks:
        with pytest.raises(DeviceLocked, match="blocked"):
            ks.sign("k", b"x")
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    with strongroom.open(config) as ks:
        with pytest.raises(DeviceLocked, match="PUK"):
            ks.sign("k", b"x")
        assert ks.backend("piv").pin_tries_left() == 0  # type: ignore[attr-defined]
        status = {s.name: s for s in ks.backends()}["piv"]
        assert status.details["pin"] == "blocked"


def test_pin_always_slot_and_reset_by_another_program(ks: Keystore, reader: PivReader) -> None:
    ks.generate("a", "ecdsa-p256", backend="piv")
    ks.generate("c", "ecdsa-p256", backend="piv")
    assert ks.info("c").handle == "9c"
    for _ in range(2):  # 9C: VERIFY before every signature
        ks.verify("c", b"m", ks.sign("c", b"m"))
    ks.verify("a", b"m", ks.sign("a", b"m"))
    before = _verifies(reader.card)
    ks.verify("a", b"m", ks.sign("a", b"m"))
    assert _verifies(reader.card) == before  # 9A: once per session
    from smartcard import scard

    rc, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    rc, handle, _ = scard.SCardConnect(
        ctx, reader.name, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
    )
    assert rc == scard.SCARD_S_SUCCESS
    scard.SCardDisconnect(handle, scard.SCARD_RESET_CARD)
    scard.SCardReleaseContext(ctx)
    ks.verify("a", b"m", ks.sign("a", b"m"))  # reconnected, PIN given again


# -- card removal ------------------------------------------------------------------------------
def test_card_removed_and_reinserted(ks: Keystore, reader: PivReader) -> None:
    ks.generate("k", "ecdsa-p256", backend="piv")
    ks.sign("k", b"before")
    card = reader.card
    reader.remove()
    with pytest.raises(BackendUnavailable, match="insert the card"):
        ks.sign("k", b"while out")
    with pytest.raises(BackendUnavailable):
        ks.public_key("k")
    reader.insert(card)
    ks.verify("k", b"after", ks.sign("k", b"after"))


def test_pcscd_restarted_with_the_card_in_use(
    ks: Keystore, reader: PivReader, tmp_path: Path
) -> None:
    """Parsec-style fault (issue 16): pcscd dies under an open keystore that holds a card
    connection; while it is gone the keystore answers BackendUnavailable; once pcscd and the
    card are back, the same Keystore object signs again (the PIN is asked for again)."""
    if not reader.service.started_here:
        pytest.skip("this machine's pcscd was not started by the test run: not ours to kill")
    ks.generate("k", "ecdsa-p256", backend="piv")
    public = ks.public_key("k")
    assert isinstance(public, ec.EllipticCurvePublicKey)
    ks.sign("k", b"before")
    card = reader.card
    reader.service.kill()
    reader.drop_dead_link()
    with pytest.raises(BackendUnavailable):
        ks.sign("k", b"while pcscd is gone")
    reader.service.start_again(tmp_path / "pcscd-again")
    with pytest.raises(BackendUnavailable):  # pcscd is back, the card is not yet
        ks.sign("k", b"no card yet")
    reader.insert(card)
    public.verify(ks.sign("k", b"after"), b"after", ec.ECDSA(hashes.SHA256()))


def test_no_reader_or_card_is_unavailable(tmp_path: Path, reader: PivReader, env: None) -> None:
    config = write_piv_config(tmp_path / "x", "No Such Reader")
    with strongroom.open(config) as ks:
        status = {s.name: s for s in ks.backends()}["piv"]
        assert not status.available and "No Such Reader" in (status.reason or "")
        with pytest.raises(BackendUnavailable, match="no reader name contains"):
            ks.generate("k", "ecdsa-p256", backend="piv")
    reader.remove()
    with strongroom.open(piv_config(tmp_path, reader)) as ks:
        with pytest.raises(BackendUnavailable, match="no PIV card"):
            ks.generate("k", "ecdsa-p256", backend="piv")


# -- the vault sealed to the card --------------------------------------------------------------
def test_vault_enroll_piv_and_open_with_card_and_pin(
    tmp_path: Path, reader: PivReader, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = piv_config(tmp_path, reader)
    with strongroom.open(config) as ks:
        ks.generate("secret", "ed25519", backend="vault")
        slot = ks.vault_control().enroll("piv", {"pin": True})
        assert slot["method"] == "piv"
    assert 0x9D in reader.card.state.keys  # made for the vault, with its certificate
    with strongroom.open(config) as ks:
        assert ks.vault_control().unlock("piv") == "piv"
        assert ks.info("secret").type.value == "ed25519"
        assert ks.sign("secret", b"x")
        # a Strongroom key never lands in the vault's 9D slot
        assert ks.generate("kex", "ecdsa-p256", backend="piv", usage="agree").handle == "82"
    monkeypatch.setenv(PIV_PIN_ENV, "999999")
    with strongroom.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="2 tries left"):
            ks.vault_control().unlock("piv")
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    card = reader.card
    reader.remove()
    reader.insert(PivCard())
    with strongroom.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="not the card"):
            ks.vault_control().unlock("piv")
    reader.remove()
    reader.insert(card)
    with strongroom.open(config) as ks:
        assert ks.vault_control().unlock("piv") == "piv"


def test_cli_generate_sign_and_vault(tmp_path: Path, reader: PivReader) -> None:
    config = piv_config(tmp_path, reader)
    env = {PIV_VAULT_PASS_ENV: PIV_VAULT_PASS, PIV_PIN_ENV: DEFAULT_PIN}

    def cli(*args: str) -> bytes:
        result = run_cli(config, *args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    cli("init")
    cli("vault", "enroll", "piv", "--pin")
    cli("vault", "unlock", "--method", "piv")
    cli("key", "generate", "signer", "--type", "ecdsa-p384", "--backend", "piv")
    data = tmp_path / "data"
    data.write_bytes(b"signed by the card")
    sig = tmp_path / "sig"
    cli("key", "sign", "signer", "--in", str(data), "--out", str(sig))
    cli("key", "verify", "signer", "--signature", str(sig), "--in", str(data))
    public = serialization.load_pem_public_key(cli("key", "public", "signer"))
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.key_size == 384
    bad = run_cli(config, "key", "generate", "x", "--type", "ed25519", "--backend", "piv", env=env)
    assert bad.returncode == exit_code_of(UnsupportedOperation)
    assert "piv" in bad.stderr and "Traceback" not in bad.stderr
    wrong = run_cli(
        config, "key", "sign", "signer", "--in", str(data), env={**env, PIV_PIN_ENV: "000000"}
    )
    assert wrong.returncode == exit_code_of(AuthenticationFailed)
    assert "2 tries left" in wrong.stderr and "Traceback" not in wrong.stderr
    assert DEFAULT_PIN not in wrong.stderr and "000000" not in wrong.stderr


# -- OpenSC's PIV driver sees what Strongroom made ---------------------------------------------
@pytest.mark.skipif(not OPENSC_MODULE.exists(), reason=f"{OPENSC_MODULE} is missing (opensc)")
def test_opensc_lists_and_signs_with_strongroom_keys(
    ks: Keystore, reader: PivReader, tmp_path: Path
) -> None:
    ks.generate("ec", "ecdsa-p256", backend="piv")  # 9A: PKCS#11 id 01
    ks.generate("rsa", "rsa-2048", backend="piv")  # 9C: id 02, context-specific login
    ks.generate("kex", "ecdsa-p384", backend="piv", usage="agree")  # 9D: id 03
    ks.generate("old", "ecdsa-p256", backend="piv")  # 82, in the Key History: id 05
    conf = tmp_path / "opensc.conf"
    conf.write_text(
        "app default {\n  card_drivers = PIV-II;\n"
        "  framework pkcs15 { use_file_caching = no; }\n}\n"
    )
    env = {**os.environ, "OPENSC_CONF": str(conf)}

    def tool(*args: str) -> str:
        out = subprocess.run(
            ["pkcs11-tool", "--module", str(OPENSC_MODULE), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    listing = tool("--list-objects", "--login", "--pin", DEFAULT_PIN)
    objects: list[str] = []
    for line in listing.splitlines():
        if line and not line[0].isspace():
            objects.append(line)
        elif objects:
            objects[-1] += "\n" + line
    keys = (("01", "ec", "EC"), ("02", "rsa", "RSA"), ("03", "kex", "EC"), ("05", "old", "EC"))
    for key_id, name, kind in keys:
        ident = f"ID:         {key_id}"
        assert any(
            o.startswith("Certificate Object") and ident in o and f"CN={name}, O=Strongroom" in o
            for o in objects
        ), listing
        assert any(o.startswith(f"Private Key Object; {kind}") and ident in o for o in objects), (
            listing
        )
    assert sum(o.startswith("Private Key Object") for o in objects) == 4, listing
    data = tmp_path / "data"
    data.write_bytes(b"signed by OpenSC through the PIV driver")
    sig = tmp_path / "sig"
    tool(
        "--sign",
        "--id",
        "01",
        "-m",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "-i",
        str(data),
        "-o",
        str(sig),
        "--login",
        "--pin",
        DEFAULT_PIN,
    )
    ks.verify("ec", data.read_bytes(), sig.read_bytes())
    tool(
        "--sign",
        "--id",
        "02",
        "-m",
        "SHA256-RSA-PKCS",
        "-i",
        str(data),
        "-o",
        str(sig),
        "--login",
        "--pin",
        DEFAULT_PIN,
    )
    ks.verify("rsa", data.read_bytes(), sig.read_bytes())
    tool(
        "--sign",
        "--id",
        "05",
        "-m",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "-i",
        str(data),
        "-o",
        str(sig),
        "--login",
        "--pin",
        DEFAULT_PIN,
    )
    ks.verify("old", data.read_bytes(), sig.read_bytes())
    # ECDH with the 9D key through OpenSC agrees with the peer's side of the exchange
    peer = ec.generate_private_key(ec.SECP384R1())
    peer_der = tmp_path / "peer.der"
    peer_der.write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    secret = tmp_path / "secret"
    tool(
        "--derive",
        "--id",
        "03",
        "-m",
        "ECDH1-DERIVE",
        "--input-file",
        str(peer_der),
        "--output-file",
        str(secret),
        "--login",
        "--pin",
        DEFAULT_PIN,
    )
    card_public = ks.public_key("kex")
    assert isinstance(card_public, ec.EllipticCurvePublicKey)
    assert secret.read_bytes() == peer.exchange(ec.ECDH(), card_public)
    # Strongroom carries on after OpenSC used (and perhaps reset) the card
    ks.verify("ec", b"after", ks.sign("ec", b"after"))


def test_adopt_a_key_already_on_the_card(ks: Keystore, reader: PivReader) -> None:
    ks.generate("made", "ecdsa-p384", backend="piv")
    ks.catalog.remove("default", "made")  # as if another tool had made it
    info = ks.adopt("found", "piv", {"id": "9a"})
    assert info.type.value == "ecdsa-p384" and info.handle == "9a"
    ks.verify("found", b"x", ks.sign("found", b"x"))
    ks.delete("found")  # only forgotten
    assert 0x9A in reader.card.state.keys and 0x5FC105 in reader.card.state.objects
    assert ks.adopt("again", "piv", {"label": "made"}).handle == "9a"
    with pytest.raises(InvalidArgument, match="no PIV slot"):
        ks.adopt("none", "piv", {"id": "9e"})


def test_threads_take_turns_on_the_card(ks: Keystore) -> None:
    import threading

    ks.generate("shared", "ecdsa-p256", backend="piv")
    ks.generate("always", "ecdsa-p256", backend="piv")  # 9C: VERIFY + sign must stay paired
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            for i in range(15):
                data = f"{name} {i}".encode()
                ks.verify(name, data, ks.sign(name, data))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("shared", "always") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_rsa_oaep_decryption_of_what_openssl_encrypted(ks: Keystore, tmp_path: Path) -> None:
    info = ks.generate("box", "rsa-2048", backend="piv", usage="encrypt,decrypt")
    assert info.handle == "9d"  # the key-management slot
    cert = ks.backend("piv").certificate(info)  # type: ignore[attr-defined]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    (tmp_path / "pub.pem").write_bytes(
        ks.public_key("box").public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "msg").write_bytes(b"for the card only")
    for md, algorithm in (("sha256", None), ("sha1", "oaep-sha1")):
        out = subprocess.run(
            ["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", str(tmp_path / "pub.pem"),
             "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", f"rsa_oaep_md:{md}",
             "-pkeyopt", f"rsa_mgf1_md:{md}", "-in", str(tmp_path / "msg")],
            capture_output=True, check=True,
        )  # fmt: skip
        assert ks.decrypt("box", out.stdout, algorithm=algorithm) == b"for the card only"
    ct = ks.encrypt("box", b"x")
    with pytest.raises(IntegrityError):
        ks.decrypt("box", ct, algorithm="oaep-sha1")  # the wrong hash does not decode
    with pytest.raises(IntegrityError):
        ks.decrypt("box", ct[:-1])


def test_rsa_signs_a_digest_info_the_caller_built(ks: Keystore) -> None:
    """pkcs1v15-raw (PKCS#11's CKM_RSA_PKCS): the card's raw RSA over the caller's block,
    padded on the host; SHA-1 is a hash the keystore's own algorithms do not offer."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from strongroom.algorithms import DIGEST_INFO_PREFIXES, RSA_PKCS1V15_RAW

    ks.generate("raw", "rsa-2048", backend="piv")
    public = ks.public_key("raw")
    assert isinstance(public, rsa.RSAPublicKey)
    digest = hashlib.sha1(b"a DigestInfo").digest()
    block = DIGEST_INFO_PREFIXES["sha1"] + digest
    sig = ks.sign("raw", block, RSA_PKCS1V15_RAW, prehashed=True)
    public.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
    ks.verify("raw", block, sig, RSA_PKCS1V15_RAW, prehashed=True)


# -- config and installation ---------------------------------------------------------------------
def test_bad_settings_are_config_errors(tmp_path: Path, env: None) -> None:
    from strongroom.errors import ConfigError

    for extra, key in (
        ('slots = ["9a", "9b"]', "slots"),
        ('management_key_type = "des"', "management_key_type"),
        ('management_key = "0102"', "management_key"),
    ):
        config = write_piv_config(tmp_path / key, "any reader", piv_extra=extra)
        with pytest.raises(ConfigError, match=key):
            strongroom.open(config)


def test_without_pyscard_the_backend_says_what_to_install(
    tmp_path: Path, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "smartcard", None)  # import smartcard → ImportError
    with strongroom.open(write_piv_config(tmp_path, "any reader")) as ks:
        status = {s.name: s for s in ks.backends()}["piv"]
        assert not status.available
        assert "pip install 'strongroom[piv]'" in (status.reason or "")
        with pytest.raises(BackendUnavailable, match="pyscard"):
            ks.generate("k", "ecdsa-p256", backend="piv")


def test_ecdh_on_the_card_matches_the_peer(ks: Keystore) -> None:
    from strongroom.errors import PolicyViolation

    backend = ks.backend("piv")
    for key_type, curve in (("ecdsa-p256", ec.SECP256R1()), ("ecdsa-p384", ec.SECP384R1())):
        info = ks.generate(f"kex-{key_type}", key_type, backend="piv", usage="agree")
        peer = ec.generate_private_key(curve)
        card_public = ks.public_key(info.name)
        assert isinstance(card_public, ec.EllipticCurvePublicKey)
        shared = backend.ecdh(info, peer.public_key())  # type: ignore[attr-defined]
        assert shared == peer.exchange(ec.ECDH(), card_public)
    assert [ks.info(f"kex-{t}").handle for t in ("ecdsa-p256", "ecdsa-p384")] == ["9d", "82"]
    signer = ks.generate("signer", "ecdsa-p256", backend="piv")
    with pytest.raises(PolicyViolation):
        backend.ecdh(signer, ec.generate_private_key(ec.SECP256R1()).public_key())  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):  # a P-384 peer for a P-256 key
        backend.ecdh(  # type: ignore[attr-defined]
            ks.info("kex-ecdsa-p256"), ec.generate_private_key(ec.SECP384R1()).public_key()
        )


def test_doctor_finds_and_repairs_a_key_a_crash_left_on_the_card(
    tmp_path: Path, reader: PivReader, env: None
) -> None:
    """A kill after the card made the key and its certificate, before the catalog row: the
    slot is this keystore's (its certificate names the store), so doctor lists it and
    --repair frees it. A slot another keystore wrote is never listed."""
    import signal

    config = piv_config(tmp_path, reader)
    other = write_piv_config(tmp_path / "other", reader.name)
    with strongroom.open(other) as ks:
        ks.generate("theirs", "ecdsa-p256", backend="piv")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ks = strongroom.open(config)

            def killed(*_: object) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            ks.catalog.add = killed  # type: ignore[method-assign]
            ks.generate("lost", "ecdsa-p256", backend="piv")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    with strongroom.open(config) as ks:
        orphans, unsearched = ks.orphans()
        assert unsearched == []
        assert [(o.backend, o.handle) for o in orphans] == [("piv", "9c")]
        assert "'lost'" in orphans[0].description
        assert [o.handle for o in ks.repair_orphans(lambda o: True)] == ["9c"]
        assert ks.orphans() == ([], [])
        assert 0x5FC10A not in reader.card.state.objects  # 9C's certificate object: empty
        ks.generate("next", "ecdsa-p256", backend="piv")
        assert ks.info("next").handle == "9c"  # the slot is free again
    with strongroom.open(other) as ks:
        assert ks.orphans() == ([], [])
        ks.verify("theirs", b"x", ks.sign("theirs", b"x"))
