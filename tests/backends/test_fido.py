"""The FIDO2 backend against the software authenticator, in-process (passed to
`Keystore(device_factories=...)`).

The same backend runs over the real PC/SC stack in test_fido_pcsc.py. python-fido2's own
`Fido2Server` checks the registrations and assertions the backend makes, and its
`Fido2Client` (PRF) checks that derived keys come from the WebAuthn PRF output.
"""

from __future__ import annotations

import base64
import importlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fido2.client import DefaultClientDataCollector, Fido2Client
from fido2.ctap2 import Ctap2
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin
from fido2.utils import sha256
from fido2.webauthn import (
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialRequestOptions,
    PublicKeyCredentialType,
    UserVerificationRequirement,
)
from fido_authenticator import (
    FIDO_PIN_ENV,
    FIDO_VAULT_PASS,
    FIDO_VAULT_PASS_ENV,
    MAX_PIN_RETRIES,
    RP_ID,
    Presence,
    SoftAuthenticator,
    SoftCtapDevice,
    open_with_authenticator,
    server_verify,
    write_fido_config,
)

import strongroom
from strongroom.backend import NewKey
from strongroom.backends.fido import FidoBackend
from strongroom.backends.fido.assertion import (
    GET,
    Assertion,
    challenge_for,
    client_data,
    verify_assertion,
)
from strongroom.cli import exit_code_of
from strongroom.config import Config
from strongroom.config import load as load_config
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    PolicyViolation,
    PresenceTimeout,
    UnsupportedOperation,
)
from strongroom.keystore import Keystore
from strongroom.memory import Guarded
from strongroom.testing import BackendContract
from strongroom.types import KeyInfo, KeyType, Usage

PIN = "2468"
_names = itertools.count()


class SoftKey:
    """A software authenticator that this test passes to the keystores it opens."""

    def __init__(self, directory: Path, up_timeout: float = 1.0) -> None:
        self.name = f"soft-{next(_names)}"
        self.authenticator = SoftAuthenticator(
            directory / f"{self.name}.json", up_timeout=up_timeout
        )

    def set_pin(self, pin: str = PIN) -> None:
        ClientPin(Ctap2(SoftCtapDevice(self.authenticator))).set_pin(pin)

    def open(self, config: Path, **options: Any) -> Keystore:
        """`strongroom.open(config)` with this authenticator as the fido backend's device."""
        return open_with_authenticator(self.authenticator, config, **options)


@pytest.fixture
def softkey(tmp_path: Path) -> SoftKey:
    return SoftKey(tmp_path)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, FIDO_VAULT_PASS)
    monkeypatch.setenv(FIDO_PIN_ENV, PIN)


class Prompts:
    """Collects what the keystore tells the user ("touch your security key")."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)


def open_keystore(
    tmp_path: Path, softkey: SoftKey, fido_extra: str = "", prompts: Prompts | None = None
) -> Keystore:
    config = write_fido_config(tmp_path / "ks", fido_extra=fido_extra)
    return softkey.open(config, presence=prompts)


@pytest.fixture
def ks(tmp_path: Path, softkey: SoftKey, env: None) -> Iterator[Keystore]:
    with open_keystore(tmp_path, softkey) as keystore:
        yield keystore


def fido_of(ks: Keystore) -> FidoBackend:
    backend = ks.backend("fido")
    assert isinstance(backend, FidoBackend)
    return backend


# -- the contract suite ----------------------------------------------------------------------------
class TestFidoContract(BackendContract):
    @pytest.fixture
    def keystore(self, ks: Keystore) -> Keystore:
        self._ks = ks
        return ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "fido"

    def independent_verify(self, key_type: KeyType, public: Any, data: bytes, sig: bytes) -> None:
        name = next(
            k.name for k in self._ks.keys() if k.type is key_type and k.name.startswith("sig-")
        )
        server_verify(self._ks, name, data, sig)


def test_everything_else_is_unsupported(ks: Keystore) -> None:
    ks.generate("cred", "fido-es256", backend="fido")
    for key_type in ("ed25519", "ecdsa-p256", "aes-256", "rsa-2048", "hmac-sha256"):
        with pytest.raises(UnsupportedOperation) as err:
            ks.generate(f"no-{key_type}", key_type, backend="fido")
        assert err.value.backend == "fido"
    with pytest.raises(UnsupportedOperation):
        ks.import_key("imported", "fido-es256", b"\0" * 32, backend="fido")
    with pytest.raises(UnsupportedOperation):
        ks.random(16, backend="fido")
    with pytest.raises(UnsupportedOperation):
        fido_of(ks).export_key(ks.info("cred"), "pem")
    with pytest.raises(UnsupportedOperation):
        fido_of(ks).encrypt(ks.info("cred"), b"x", b"", None)
    with pytest.raises(PolicyViolation):  # usage first: a credential never encrypts
        ks.encrypt("cred", b"x")
    ks.generate("deriver", "fido-es256", backend="fido", usage="sign,verify,derive")
    with pytest.raises(UnsupportedOperation):  # derive only into aes-256
        ks.derive("deriver", "bad", "hmac-sha256")
    # and the vault never claims FIDO types
    assert not any(t.is_fido for t, _ in ks.vault.capabilities())


# -- sign and verify -------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["fido-es256", "fido-eddsa"])
def test_sign_is_an_assertion_that_fido2_server_accepts(
    ks: Keystore, softkey: SoftKey, key_type: str
) -> None:
    info = ks.generate("signer", key_type, backend="fido")
    assert info.usage == {Usage.SIGN, Usage.VERIFY}
    data = b"pay 10 EUR to Bob"
    signature = ks.sign("signer", data)
    server_verify(ks, "signer", data, signature)
    ks.verify("signer", data, signature)
    assertion = Assertion.decode(signature)
    client_data = json.loads(assertion.client_data_json)
    assert client_data["type"] == "webauthn.get"
    assert client_data["origin"] == f"https://{RP_ID}"
    assert base64.urlsafe_b64decode(client_data["challenge"] + "==") == challenge_for(data)
    # it is not a raw signature over the data
    public = ks.public_key("signer")
    with pytest.raises(InvalidSignature):
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(assertion.signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(assertion.signature, data)
    with pytest.raises(InvalidSignature):
        server_verify(ks, "signer", b"pay 1000 EUR to Bob", signature)


@pytest.mark.parametrize("key_type", ["fido-es256", "fido-eddsa"])
def test_an_ssh_application_signs_the_openssh_way(
    tmp_path: Path, softkey: SoftKey, env: None, key_type: str
) -> None:
    """rp_id "ssh:": the authenticator signs authenticatorData || SHA-256(message), with no
    client data, which is what OpenSSH checks for its security-key keys."""
    with open_keystore(tmp_path, softkey, fido_extra='rp_id = "ssh:"') as ks:
        ks.generate("sk", key_type, backend="fido")
        data = b"an SSH login"
        assertion = Assertion.decode(ks.sign("sk", data))
        assert assertion.client_data_json == b""
        auth = assertion.authenticator_data
        assert auth[:32] == sha256(b"ssh:") and auth[32] & 0x01  # the RP, user present
        signed = auth + sha256(data)
        public = ks.public_key("sk")
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(assertion.signature, signed, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(assertion.signature, signed)
        ks.verify("sk", data, ks.sign("sk", data))
        with pytest.raises(InvalidSignature):
            ks.verify("sk", data + b"!", ks.sign("sk", data))
        with pytest.raises(InvalidSignature):  # the WebAuthn form is not this key's
            webauthn = Assertion(
                assertion.credential_id,
                auth,
                client_data(GET, challenge_for(data), "ssh:"),
                assertion.signature,
            )
            ks.verify("sk", data, webauthn.encode())


def test_verify_refuses_tampering(ks: Keystore) -> None:
    ks.generate("a", "fido-es256", backend="fido")
    ks.generate("b", "fido-es256", backend="fido")
    data = b"message"
    good = Assertion.decode(ks.sign("a", data))
    ks.verify("a", data, good.encode())
    with pytest.raises(InvalidSignature):  # another key's assertion
        ks.verify("b", data, good.encode())
    flipped_flags = bytearray(good.authenticator_data)
    flipped_flags[32] &= ~0x01  # clear "user present"
    other_origin = good.client_data_json.replace(b"strongroom.local", b"evil.example")
    for bad in (
        Assertion(good.credential_id, bytes(flipped_flags), good.client_data_json, good.signature),
        Assertion(good.credential_id, good.authenticator_data, other_origin, good.signature),
        Assertion(b"other-id", good.authenticator_data, good.client_data_json, good.signature),
    ):
        with pytest.raises(InvalidSignature):
            ks.verify("a", data, bad.encode())
    for garbage in (b"", b"\xa0", good.encode()[:-1], b"\x00" + good.encode()):
        with pytest.raises(InvalidSignature):
            ks.verify("a", data, garbage)
    with pytest.raises(InvalidArgument):
        ks.verify("a", data, good.encode(), algorithm="pss")
    # the stand-alone verifier, for relying parties
    verify_assertion(ks.public_key("a"), RP_ID, data, good.encode())
    with pytest.raises(InvalidSignature):
        verify_assertion(ks.public_key("a"), "other.example", data, good.encode())


def test_each_signature_asks_for_a_touch(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    prompts = Prompts()
    with open_keystore(tmp_path, softkey, prompts=prompts) as ks:
        ks.generate("k", "fido-es256", backend="fido")
        before = softkey.authenticator.touch_requests
        ks.sign("k", b"one")
        ks.sign("k", b"two")
    assert softkey.authenticator.touch_requests == before + 2
    assert prompts.messages.count("touch your security key") == 3  # generate + two signs


def test_user_verification_required(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    softkey.set_pin()
    with open_keystore(tmp_path, softkey, 'user_verification = "required"') as ks:
        ks.generate("k", "fido-es256", backend="fido")
        signature = ks.sign("k", b"data")
        assert Assertion.decode(signature).authenticator_data[32] & 0x04  # UV flag
        ks.verify("k", b"data", signature)
        # the verifier of a UV-required key refuses a (genuine) assertion made without UV
        credential_id = Assertion.decode(signature).credential_id
        cdj = client_data(GET, challenge_for(b"data"), RP_ID)
        response = Ctap2(SoftCtapDevice(softkey.authenticator)).get_assertion(
            RP_ID, sha256(cdj), [{"type": "public-key", "id": credential_id}]
        )
        unverified = Assertion(credential_id, response.auth_data, cdj, response.signature)
        assert not unverified.authenticator_data[32] & 0x04
        with pytest.raises(InvalidSignature):
            ks.verify("k", b"data", unverified.encode())


def test_pin_set_while_open(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    with open_keystore(tmp_path, softkey, 'user_verification = "required"') as ks:
        with pytest.raises(AuthenticationFailed, match="has no PIN"):
            ks.generate("k", "fido-es256", backend="fido")
        softkey.set_pin()  # e.g. with the vendor's tool, while Strongroom is connected
        ks.generate("k", "fido-es256", backend="fido")
        ks.verify("k", b"d", ks.sign("k", b"d"))


def test_discoverable_credential_is_deleted_from_the_key(
    tmp_path: Path,
    softkey: SoftKey,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    softkey.set_pin()
    with open_keystore(tmp_path, softkey, "resident_key = true") as ks:
        ks.generate("rk", "fido-es256", backend="fido")
        credential_id = Assertion.decode(ks.sign("rk", b"x")).credential_id
        stored = softkey.authenticator.credential(credential_id)
        assert stored is not None and stored.resident
        ks.delete("rk")
        assert softkey.authenticator.credential(credential_id) is None
        ks.generate("kept", "fido-es256", backend="fido")
        kept = Assertion.decode(ks.sign("kept", b"x")).credential_id
        monkeypatch.delenv(FIDO_PIN_ENV)  # no PIN: Strongroom forgets it, the key keeps it
        with caplog.at_level(logging.WARNING, "strongroom.fido"):
            ks.delete("kept")
        assert "stays on the security key" in caplog.text
        assert softkey.authenticator.credential(kept) is not None


# -- derive: hmac-secret / PRF ---------------------------------------------------------------
def prf_output(softkey: SoftKey, credential_id: bytes, salt: bytes) -> bytes:
    """What a WebAuthn client's PRF extension gives for this credential (python-fido2)."""
    client = Fido2Client(
        SoftCtapDevice(softkey.authenticator),
        DefaultClientDataCollector(f"https://{RP_ID}"),
        extensions=[HmacSecretExtension()],
    )
    selection = client.get_assertion(
        PublicKeyCredentialRequestOptions(
            challenge=b"\0" * 32,
            rp_id=RP_ID,
            allow_credentials=[
                PublicKeyCredentialDescriptor(
                    type=PublicKeyCredentialType.PUBLIC_KEY, id=credential_id
                )
            ],
            user_verification=UserVerificationRequirement.DISCOURAGED,
            extensions={"prf": {"eval": {"first": salt}}},
        )
    )
    response = selection.get_response(0)
    return bytes(response.client_extension_results.prf.results.first)


def test_derive_gives_a_stable_kek_equal_to_webauthn_prf(
    tmp_path: Path, ks: Keystore, softkey: SoftKey
) -> None:
    ks.generate("cred", "fido-es256", backend="fido", usage="sign,verify,derive")
    salt, info = b"\x01" * 16, b"backup key"
    kek = ks.derive("cred", "kek", "aes-256", salt=salt, info=info)
    assert kek.backend == "fido" and kek.usage == {Usage.ENCRYPT, Usage.DECRYPT}
    ct = ks.encrypt("kek", b"wrapped secret", aad=b"ctx")
    assert ks.decrypt("kek", ct, aad=b"ctx") == b"wrapped secret"
    with pytest.raises(IntegrityError):
        ks.decrypt("kek", ct, aad=b"other")
    # the same derivation again is the same key
    ks.derive("cred", "kek2", "aes-256", salt=salt, info=info)
    assert ks.decrypt("kek2", ct, aad=b"ctx") == b"wrapped secret"
    ks.derive("cred", "kek3", "aes-256", salt=b"\x02" * 16, info=info)
    with pytest.raises(IntegrityError):
        ks.decrypt("kek3", ct, aad=b"ctx")
    # the 32 bytes are the WebAuthn PRF output for `salt`; the key is HKDF over them
    handle = json.loads(ks.info("cred").handle.split(":", 1)[1])
    credential_id = base64.urlsafe_b64decode(handle["id"] + "==")
    output = prf_output(softkey, credential_id, salt)
    expected = HKDF(hashes.SHA256(), 32, salt, b"strongroom fido kek\x00" + info).derive(output)
    assert AESGCM(expected).decrypt(ct[:12], ct[12:], b"ctx") == b"wrapped secret"
    # never written out: not in the catalog, the audit log or any other file
    for path in (tmp_path / "ks" / "data").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert output not in content and expected not in content, path
            assert base64.b64encode(expected) not in content


def test_derive_needs_derive_usage_and_hmac_secret(ks: Keystore) -> None:
    ks.generate("plain", "fido-es256", backend="fido")
    with pytest.raises(PolicyViolation):
        ks.derive("plain", "kek", "aes-256")
    # the backend itself refuses a credential made without hmac-secret
    new = NewKey(KeyInfo("x", KeyType.AES_256, "fido", frozenset({Usage.ENCRYPT})))
    with pytest.raises(InvalidArgument, match="without hmac-secret"):
        fido_of(ks).derive(ks.info("plain"), new, b"", b"")


def test_derived_keys_need_a_touch_each_use(ks: Keystore, softkey: SoftKey) -> None:
    ks.generate("cred", "fido-eddsa", backend="fido", usage="sign,verify,derive")
    ks.derive("cred", "kek", "aes-256", salt=b"s")
    softkey.authenticator.presence = lambda command: Presence.REFUSE
    with pytest.raises(AuthenticationFailed):
        ks.encrypt("kek", b"data")


def test_hmac_secret_output_is_copied_into_guarded_memory_and_zeroed(
    ks: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks.generate("cred", "fido-es256", backend="fido", usage="sign,verify,derive")
    backend = fido_of(ks)
    session = backend._connect()
    assert session.protocol is not None
    returned: list[bytes] = []
    real_decrypt = session.protocol.decrypt

    def spy(key: bytes, ciphertext: bytes) -> bytes:
        out: bytes = real_decrypt(key, ciphertext)
        returned.append(out)
        return out

    monkeypatch.setattr(session.protocol, "decrypt", spy)
    ks.derive("cred", "kek", "aes-256", salt=b"s")
    assert len(returned) == 1
    assert returned[0] == b"\0" * 32  # python-fido2's bytes copy was wiped after use


# -- errors: device, touch, PIN -------------------------------------------------------------------
def test_missing_device_is_backend_unavailable(tmp_path: Path, env: None) -> None:
    missing = tmp_path / "hidraw-nothing-here"
    config = write_fido_config(tmp_path / "ks", str(missing))
    with strongroom.open(config) as ks:
        status = {s.name: s for s in ks.backends()}["fido"]
        assert not status.available
        assert f"no device at {missing}" in (status.reason or "")
        with pytest.raises(BackendUnavailable) as err:
            ks.generate("k", "fido-es256", backend="fido")
        assert "hidraw-nothing-here" in str(err.value)
    config = write_fido_config(tmp_path / "pcsc", "pcsc:No Such Reader")
    with strongroom.open(config) as ks:
        reason = {s.name: s for s in ks.backends()}["fido"].reason or ""
        assert reason.startswith("no FIDO2 security key found")


def test_bad_config_is_refused(tmp_path: Path, env: None) -> None:
    for extra, key in (
        ('user_verification = "sometimes"', "user_verification"),
        ("touch_timeout = 0", "touch_timeout"),
        ('rp_id = "https://example.com"', "rp_id"),
        ('rp_id = "ssh:a/b"', "rp_id"),
    ):
        config = write_fido_config(tmp_path / key, fido_extra=extra)
        with pytest.raises(strongroom.ConfigError) as err:
            strongroom.open(config)
        assert key in str(err.value)
    config = write_fido_config(tmp_path / "dev", "bluetooth")
    with pytest.raises(strongroom.ConfigError):
        strongroom.open(config)


def test_no_config_reaches_a_test_device(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    """The software authenticator is passed in by code; the old `test:NAME` setting is refused."""
    config = write_fido_config(tmp_path / "ks", f"test:{softkey.name}")
    with pytest.raises(strongroom.ConfigError) as err:
        strongroom.open(config)
    assert "device" in str(err.value) and "must be auto" in str(err.value)
    assert softkey.authenticator.touch_requests == 0
    with pytest.raises(strongroom.ConfigError):
        softkey.open(config)  # not even when a device is passed in
    # a factory for a backend the config lacks is a mistake, not silently unused
    config = write_fido_config(tmp_path / "ok")
    with pytest.raises(InvalidArgument, match=r"'fido2', which is not a configured backend"):
        Keystore(load_config(config), device_factories={"fido2": lambda: None})
    with Keystore(load_config(config), device_factories={"fido": lambda: object()}) as ks:
        with pytest.raises(InvalidArgument, match="returned object, not a python-fido2"):
            ks.generate("k", "fido-es256", backend="fido")


def test_refused_touch_and_timeouts(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    with open_keystore(tmp_path, softkey, "touch_timeout = 0.3") as ks:
        ks.generate("k", "fido-es256", backend="fido")
        softkey.authenticator.presence = lambda command: Presence.REFUSE
        with pytest.raises(AuthenticationFailed, match="refused at the security key"):
            ks.sign("k", b"x")
        # nobody touches: our own deadline cancels the request
        softkey.authenticator.presence = lambda command: Presence.IGNORE
        softkey.authenticator.up_timeout = 10
        with pytest.raises(PresenceTimeout, match=r"no touch within 0\.3 s"):
            ks.sign("k", b"x")
        # the authenticator gives up first (USER_ACTION_TIMEOUT)
        softkey.authenticator.up_timeout = 0.05
        with pytest.raises(PresenceTimeout):
            ks.sign("k", b"x")
        softkey.authenticator.presence = lambda command: Presence.TOUCH
        ks.verify("k", b"x", ks.sign("k", b"x"))


def test_wrong_pin_is_never_retried(
    tmp_path: Path, softkey: SoftKey, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    softkey.set_pin()
    with open_keystore(tmp_path, softkey) as ks:
        ks.generate("k", "fido-es256", backend="fido")  # preferred UV: the PIN is used
        monkeypatch.setenv(FIDO_PIN_ENV, "0000")
        with pytest.raises(AuthenticationFailed) as err:
            ks.sign("k", b"x")
        assert err.value.retries_left == MAX_PIN_RETRIES - 1
        assert "7 tries left" in str(err.value)
        assert softkey.authenticator.pin_retries == MAX_PIN_RETRIES - 1
        with pytest.raises(AuthenticationFailed) as err:  # the same PIN is not sent again
            ks.sign("k", b"x")
        assert err.value.retries_left == MAX_PIN_RETRIES - 1
        assert softkey.authenticator.pin_retries == MAX_PIN_RETRIES - 1
        monkeypatch.setenv(FIDO_PIN_ENV, PIN)
        ks.verify("k", b"x", ks.sign("k", b"x"))
        assert softkey.authenticator.pin_retries == MAX_PIN_RETRIES


def test_pin_blocks(
    tmp_path: Path, softkey: SoftKey, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    softkey.set_pin()
    with open_keystore(tmp_path, softkey) as ks:
        ks.generate("k", "fido-es256", backend="fido")
        for wrong in ("1111", "2222"):
            monkeypatch.setenv(FIDO_PIN_ENV, wrong)
            with pytest.raises(AuthenticationFailed):
                ks.sign("k", b"x")
        monkeypatch.setenv(FIDO_PIN_ENV, "3333")
        with pytest.raises(DeviceLocked, match="unplug it"):  # three in a row
            ks.sign("k", b"x")
        softkey.authenticator.state.pin_retries = 1
        softkey.authenticator.power_cycle()
        monkeypatch.setenv(FIDO_PIN_ENV, "4444")
        with pytest.raises(DeviceLocked, match="blocked"):
            ks.sign("k", b"x")
        monkeypatch.setenv(FIDO_PIN_ENV, PIN)
        with pytest.raises(DeviceLocked, match="blocked"):
            ks.sign("k", b"x")


def test_no_pin_or_secret_in_logs_reprs_or_errors(
    tmp_path: Path,
    softkey: SoftKey,
    env: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    softkey.set_pin("918273")
    monkeypatch.setenv(FIDO_PIN_ENV, "918273")
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    with open_keystore(tmp_path, softkey) as ks:
        ks.generate("k", "fido-es256", backend="fido", usage="sign,verify,derive")
        ks.derive("k", "kek", "aes-256", salt=b"s")
        ks.encrypt("kek", b"x")
        monkeypatch.setenv(FIDO_PIN_ENV, "564738")
        with pytest.raises(AuthenticationFailed) as err:
            ks.sign("k", b"x")
        errors.append(str(err.value))
        errors.append(repr(err.value))
        errors.append(repr(fido_of(ks).__dict__))
    text = caplog.text + "\n".join(errors)
    assert "918273" not in text and "564738" not in text


# -- the vault, sealed by the security key ----------------------------------------------------
def vault_with_slot(
    tmp_path: Path, softkey: SoftKey, options: dict[str, Any] | None = None, fido_extra: str = ""
) -> tuple[Path, dict[str, Any]]:
    config = write_fido_config(tmp_path / "ks", fido_extra=fido_extra)
    with softkey.open(config) as ks:
        ks.generate("secret", "ed25519", backend="vault")  # creates the vault
        slot = ks.vault_control().enroll("fido", options or {})
    return config, slot


def test_vault_opens_with_the_security_key(
    tmp_path: Path, softkey: SoftKey, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, slot = vault_with_slot(tmp_path, softkey)
    assert slot["method"] == "fido"
    monkeypatch.delenv(FIDO_VAULT_PASS_ENV)  # the passphrase is not needed now
    prompts = Prompts()
    touches = softkey.authenticator.touch_requests
    with softkey.open(config, presence=prompts) as ks:
        assert ks.vault_control().unlock("fido") == "fido"
        ks.verify("secret", b"m", ks.sign("secret", b"m"))
    assert prompts.messages == ["touch your security key"]
    assert softkey.authenticator.touch_requests == touches + 1


def test_vault_slot_records_what_it_needs(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    config = write_fido_config(tmp_path / "ks")
    with softkey.open(config) as ks:
        backend = fido_of(ks)
        ks.backends()  # connects the device
        with Guarded.from_buffer(b"\x07" * 32) as master, master.read() as m:
            params = backend.seal(m, "strongroom-vault:test", {})
        with Guarded(32) as out:
            with out.write() as o:
                backend.unseal(params, o)
            with out.read() as o:
                assert bytes(o) == b"\x07" * 32
    assert params["rp_id"] == RP_ID
    assert params["uv"] is False and params["up"] is True
    assert len(base64.urlsafe_b64decode(params["salt"] + "==")) == 32
    assert (
        softkey.authenticator.credential(base64.urlsafe_b64decode(params["credential_id"] + "=="))
        is not None
    )
    assert set(params) == {
        "kind",
        "version",
        "rp_id",
        "credential_id",
        "salt",
        "uv",
        "up",
        "label",
        "aaguid",
        "kdf",
        "aead",
        "wrapped",
    }
    # a tampered slot does not open
    bad = dict(params, up=False)
    with softkey.open(config) as ks, Guarded(32) as out, out.write() as o:
        with pytest.raises(AuthenticationFailed):
            fido_of(ks).unseal(bad, o)


def test_vault_refuses_another_security_key(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    config, _ = vault_with_slot(tmp_path, softkey)
    other = SoftKey(tmp_path)
    with other.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="not the security key"):
            ks.vault_control().unlock("fido")
    assert other.authenticator.touch_requests == 0  # found out without a touch


def test_vault_refuses_without_the_touch(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    config, _ = vault_with_slot(tmp_path, softkey, fido_extra="touch_timeout = 0.3")
    softkey.authenticator.presence = lambda command: Presence.REFUSE
    with softkey.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="refused"):
            ks.vault_control().unlock("fido")
    softkey.authenticator.presence = lambda command: Presence.IGNORE
    softkey.authenticator.up_timeout = 10
    with softkey.open(config) as ks:
        with pytest.raises(PresenceTimeout, match=r"no touch within 0\.3 s"):
            ks.vault_control().unlock("fido")


def test_vault_slot_without_touch(tmp_path: Path, softkey: SoftKey, env: None) -> None:
    config, _ = vault_with_slot(tmp_path, softkey, {"touch": "false"})
    softkey.authenticator.presence = lambda command: Presence.REFUSE
    with softkey.open(config) as ks:
        assert ks.vault_control().unlock("fido") == "fido"


def test_vault_with_pin(
    tmp_path: Path, softkey: SoftKey, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    softkey.set_pin()
    config, _ = vault_with_slot(tmp_path, softkey, {"pin": True})
    with softkey.open(config) as ks:
        assert ks.vault_control().unlock("fido") == "fido"
    # a second slot on the same key: a wrong PIN is still sent only once
    with softkey.open(config) as ks:
        ks.vault_control().unlock()
        ks.vault_control().enroll("fido", {"pin": "true"})
    monkeypatch.setenv(FIDO_PIN_ENV, "0000")
    with softkey.open(config) as ks:
        with pytest.raises(AuthenticationFailed) as err:
            ks.vault_control().unlock("fido")
        assert err.value.retries_left == MAX_PIN_RETRIES - 1
        assert softkey.authenticator.pin_retries == MAX_PIN_RETRIES - 1
        with pytest.raises(AuthenticationFailed):  # asking again sends nothing
            ks.vault_control().unlock("fido")
        assert softkey.authenticator.pin_retries == MAX_PIN_RETRIES - 1
    softkey.authenticator.state.pin_retries = 0
    with softkey.open(config) as ks:
        with pytest.raises(DeviceLocked):
            ks.vault_control().unlock("fido")
    # without a PIN configured, a PIN slot cannot open
    monkeypatch.delenv(FIDO_PIN_ENV)
    softkey.authenticator.state.pin_retries = MAX_PIN_RETRIES
    with softkey.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="not available"):
            ks.vault_control().unlock("fido")


def test_cli_prompts_for_the_touch(
    tmp_path: Path, softkey: SoftKey, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI in this process, through click; the keystores it opens get the authenticator
    passed in (no command or config can name one)."""
    from click.testing import CliRunner

    # State opens the keystore: patch the name where it looks it up.
    state_module = importlib.import_module("strongroom.cli._state")

    class WithSoftKey(Keystore):
        def __init__(self, config: Config, **options: Any) -> None:
            device = {"fido": lambda: SoftCtapDevice(softkey.authenticator)}
            super().__init__(config, device_factories=device, **options)

    monkeypatch.setattr(state_module, "Keystore", WithSoftKey)
    cli = importlib.import_module("strongroom.cli").cli
    config = write_fido_config(tmp_path / "ks")
    monkeypatch.setenv("STRONGROOM_CONFIG", str(config))
    runner = CliRunner()
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["vault", "enroll", "fido"])
    assert result.exit_code == 0, result.output
    assert "touch your security key" in result.stderr
    result = runner.invoke(cli, ["vault", "unlock", "--method", "fido"])
    assert result.exit_code == 0, result.output
    assert "touch your security key" in result.stderr
    result = runner.invoke(
        cli, ["key", "generate", "k", "--type", "fido-es256", "--backend", "fido"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["key", "show", "k"])
    assert result.exit_code == 0, result.output
    assert "not a raw signature" in result.stdout
    assert "BEGIN PUBLIC KEY" in result.stdout
    softkey.authenticator.presence = lambda command: Presence.REFUSE
    result = runner.invoke(cli, ["vault", "unlock", "--method", "fido"])
    assert result.exit_code == exit_code_of(AuthenticationFailed)
    assert "refused at the security key" in result.stderr
