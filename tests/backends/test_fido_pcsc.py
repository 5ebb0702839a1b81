"""The FIDO2 backend over the real PC/SC stack: fido2.pcsc → pyscard → pcscd → vpcd → card.

The software authenticator is served as a card with the FIDO applet on a vpcd reader
(tests/emulators/pcsc_support.py). python-fido2's own `CtapPcscDevice.list_devices()` finds it, and
the backend reaches it with `device = "pcsc"`, in this process and from the `strongroom`
command in a subprocess.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pcsc_support
import pytest
from conftest import run_cli
from fido2.client import DefaultClientDataCollector, Fido2Client
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.pcsc import CtapPcscDevice
from fido2.server import Fido2Server
from fido2.webauthn import PublicKeyCredentialRpEntity, PublicKeyCredentialUserEntity
from fido_authenticator import (
    FIDO_PIN_ENV,
    FIDO_VAULT_PASS,
    FIDO_VAULT_PASS_ENV,
    FidoCard,
    Presence,
    SoftAuthenticator,
    server_verify,
    write_fido_config,
)

import strongroom
from strongroom.backends.fido.assertion import Assertion, verify_assertion
from strongroom.cli import exit_code_of
from strongroom.errors import AuthenticationFailed, PresenceTimeout
from strongroom.keystore import Keystore
from strongroom.testing import BackendContract

PIN = "8642"
_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


class Card:
    """The card in the FIDO vpcd slot; each test puts a fresh authenticator in it."""

    def __init__(self, link: pcsc_support.VpcdLink, card: FidoCard) -> None:
        self.link = link
        self.card = card
        self.reader = link.reader.name

    @property
    def authenticator(self) -> SoftAuthenticator:
        return self.card.authenticator

    def insert(self, authenticator: SoftAuthenticator) -> None:
        self.card.authenticator = authenticator


@pytest.fixture(scope="module")
def pcsc_card(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Card]:
    workdir = tmp_path_factory.mktemp("pcscd")
    card = FidoCard(SoftAuthenticator(workdir / "initial.json"))
    with pcsc_support.ensure_pcscd(workdir) as service:
        with service.serve(card, pcsc_support.FIDO_SLOT) as link:
            yield Card(link, card)
            assert link.error is None, link.error
        gc.collect()  # drop pyscard connections while pcscd still runs


@pytest.fixture
def card(pcsc_card: Card, tmp_path: Path) -> Card:
    pcsc_card.insert(SoftAuthenticator(tmp_path / "authenticator.json", up_timeout=1.0))
    return pcsc_card


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FIDO_VAULT_PASS_ENV, FIDO_VAULT_PASS)
    monkeypatch.setenv(FIDO_PIN_ENV, PIN)


def pcsc_config(tmp_path: Path, card: Card, fido_extra: str = "") -> Path:
    return write_fido_config(tmp_path / "ks", f"pcsc:{card.reader}", fido_extra=fido_extra)


@pytest.fixture
def ks(tmp_path: Path, card: Card, env: None) -> Iterator[Keystore]:
    with strongroom.open(pcsc_config(tmp_path, card)) as keystore:
        yield keystore


# -- python-fido2 finds and uses the card ------------------------------------------------------
def test_fido2_lists_the_card_and_fido2_server_accepts_it(card: Card) -> None:
    devices = list(CtapPcscDevice.list_devices())
    try:
        assert [repr(d) for d in devices] == [f"CtapPcscDevice({card.reader})"]
        device = devices[0]
        client = Fido2Client(
            device,
            DefaultClientDataCollector("https://example.com"),
            extensions=[HmacSecretExtension()],
        )
        server = Fido2Server(PublicKeyCredentialRpEntity(id="example.com", name="Example"))
        options, state = server.register_begin(
            PublicKeyCredentialUserEntity(id=b"u", name="alice"),
            user_verification="discouraged",
            extensions={"prf": {}},
        )
        credential = server.register_complete(
            state, client.make_credential(options.public_key)
        ).credential_data
        assert credential is not None
        outputs = []
        for _ in range(2):
            options, state = server.authenticate_begin(
                [credential],
                user_verification="discouraged",
                extensions={"prf": {"eval": {"first": b"pcsc salt"}}},
            )
            response = client.get_assertion(options.public_key).get_response(0)
            server.authenticate_complete(state, [credential], response)
            outputs.append(response.client_extension_results.prf.results.first)
        assert outputs[0] == outputs[1] and len(outputs[0]) == 32
    finally:
        for d in devices:
            d.close(release=True)
    assert card.link.apdus > 0 and card.link.error is None


# -- the backend through PC/SC -------------------------------------------------------------------
class TestFidoOverPcscContract(BackendContract):
    @pytest.fixture
    def keystore(self, ks: Keystore) -> Keystore:
        self._ks = ks
        return ks

    @pytest.fixture
    def backend_name(self) -> str:
        return "fido"

    def independent_verify(self, key_type: Any, public: Any, data: bytes, sig: bytes) -> None:
        name = next(k.name for k in self._ks.keys() if k.type is key_type and "sig-" in k.name)
        server_verify(self._ks, name, data, sig)


def test_sign_verify_and_derive_over_pcsc(ks: Keystore, card: Card) -> None:
    status = {s.name: s for s in ks.backends()}["fido"]
    assert status.available and status.details["connected"].startswith("PC/SC")
    ks.generate("k", "fido-eddsa", backend="fido", usage="sign,verify,derive")
    signature = ks.sign("k", b"over the wire")
    ks.verify("k", b"over the wire", signature)
    verify_assertion(ks.public_key("k"), "strongroom.local", b"over the wire", signature)
    assert Assertion.decode(signature).authenticator_data[32] & 0x01
    ks.derive("k", "kek", "aes-256", salt=b"salt")
    assert ks.decrypt("kek", ks.encrypt("kek", b"secret")) == b"secret"


def test_touch_timeout_and_refusal_over_pcsc(tmp_path: Path, card: Card, env: None) -> None:
    config = pcsc_config(tmp_path, card, "touch_timeout = 0.5")
    with strongroom.open(config) as ks:
        ks.generate("k", "fido-es256", backend="fido")
        card.authenticator.presence = lambda command: Presence.REFUSE
        with pytest.raises(AuthenticationFailed, match="refused"):
            ks.sign("k", b"x")
        # the deadline cancels through NFCCTAP_GETRESPONSE (80 11 11 00)
        card.authenticator.presence = lambda command: Presence.IGNORE
        card.authenticator.up_timeout = 10
        with pytest.raises(PresenceTimeout):
            ks.sign("k", b"x")
        card.authenticator.presence = lambda command: Presence.TOUCH
        ks.verify("k", b"x", ks.sign("k", b"x"))


def test_vault_over_pcsc(tmp_path: Path, card: Card, env: None) -> None:
    config = pcsc_config(tmp_path, card)
    with strongroom.open(config) as ks:
        ks.generate("secret", "ed25519", backend="vault")
        ks.vault_control().enroll("fido", {})
    prompts: list[str] = []
    with strongroom.open(config, presence=prompts.append) as ks:
        assert ks.vault_control().unlock("fido") == "fido"
        assert ks.info("secret").type.value == "ed25519"
    assert prompts == ["touch your security key"]
    other = SoftAuthenticator(tmp_path / "other.json")
    card.insert(other)
    with strongroom.open(config) as ks:
        with pytest.raises(AuthenticationFailed, match="not the security key"):
            ks.vault_control().unlock("fido")
    assert other.touch_requests == 0


# -- the strongroom command in a subprocess ------------------------------------------------------
def test_cli_over_pcsc(tmp_path: Path, card: Card) -> None:
    config = pcsc_config(tmp_path, card)
    env = {FIDO_VAULT_PASS_ENV: FIDO_VAULT_PASS, FIDO_PIN_ENV: PIN}

    def cli(*args: str, input: bytes = b"") -> Any:
        result = run_cli(config, *args, input=input, env=env)
        assert result.returncode == 0, result.stderr
        return result

    cli("init")
    result = cli("vault", "enroll", "fido")
    assert "touch your security key" in result.stderr
    result = cli("vault", "unlock", "--method", "fido")
    assert "touch your security key" in result.stderr
    cli("key", "generate", "signer", "--type", "fido-es256", "--backend", "fido")
    shown = cli("key", "show", "signer").stdout.decode()
    assert "not a raw signature" in shown and "fido-es256" in shown
    data = tmp_path / "data.txt"
    data.write_bytes(b"signed over PC/SC")
    signature = tmp_path / "sig.cbor"
    result = cli("key", "sign", "signer", "--in", str(data), "--out", str(signature))
    assert "touch your security key" in result.stderr
    cli("key", "verify", "signer", "--signature", str(signature), "--in", str(data))
    data.write_bytes(b"something else")
    args = ("key", "verify", "signer", "--signature", str(signature), "--in", str(data))
    bad = run_cli(config, *args, env=env)
    assert bad.returncode == 1
    card.authenticator.presence = lambda command: Presence.REFUSE
    refused = run_cli(config, "vault", "unlock", "--method", "fido", env=env)
    assert refused.returncode == exit_code_of(AuthenticationFailed)
    assert "refused" in refused.stderr and "Traceback" not in refused.stderr
