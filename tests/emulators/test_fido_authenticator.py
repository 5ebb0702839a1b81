"""The software authenticator (tests/emulators/fido_authenticator.py), driven by python-fido2.

python-fido2's `Fido2Client` and `Ctap2` talk to it, and its `Fido2Server` checks every
registration and assertion, so the authenticator the backend tests rely on behaves like a
CTAP 2.1 security key as python-fido2 understands one. The PC/SC transport is tested in
test_fido_pcsc.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.credman import CredentialManagement
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin
from fido2.server import Fido2Server
from fido2.utils import sha256
from fido2.webauthn import (
    AttestedCredentialData,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
)
from fido_authenticator import (
    FidoCard,
    Presence,
    SoftAuthenticator,
    SoftCtapDevice,
    _parse_body,
)

ERR = CtapError.ERR
RP = PublicKeyCredentialRpEntity(id="example.com", name="Example")
ORIGIN = "https://example.com"
PIN = "4711"


class PinUI(UserInteraction):
    def __init__(self, pin: str | None = None) -> None:
        self.pin = pin
        self.prompts = 0

    def prompt_up(self) -> None:
        self.prompts += 1

    def request_pin(self, permissions: object, rd_id: object) -> str | None:
        return self.pin


@pytest.fixture
def auth(tmp_path: Path) -> SoftAuthenticator:
    return SoftAuthenticator(tmp_path / "state.json", up_timeout=0.2)


def client_for(auth: SoftAuthenticator, pin: str | None = None) -> tuple[Fido2Client, PinUI]:
    ui = PinUI(pin)
    client = Fido2Client(
        SoftCtapDevice(auth),
        DefaultClientDataCollector(ORIGIN),
        ui,
        extensions=[HmacSecretExtension(allow_hmac_secret=True)],
    )
    return client, ui


def register(
    auth: SoftAuthenticator,
    *,
    uv: str = "discouraged",
    pin: str | None = None,
    resident: str | None = None,
    alg: int | None = None,
    user: bytes = b"user-1",
) -> AttestedCredentialData:
    client, ui = client_for(auth, pin)
    server = Fido2Server(RP)
    if alg is not None:
        server.allowed_algorithms = [p for p in server.allowed_algorithms if p.alg == alg]
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=user, name="alice", display_name="Alice"),
        user_verification=uv,
        resident_key_requirement=resident,
        extensions={"prf": {}},
    )
    response = client.make_credential(options.public_key)
    assert response.client_extension_results.prf.enabled is True
    auth_data = server.register_complete(state, response)
    assert auth_data.credential_data is not None
    assert ui.prompts == 1  # the client asked the person to touch
    return auth_data.credential_data


def authenticate(
    auth: SoftAuthenticator,
    cred: AttestedCredentialData,
    *,
    uv: str = "discouraged",
    pin: str | None = None,
    prf: bytes | None = None,
) -> bytes | None:
    """A full WebAuthn authentication checked by Fido2Server; returns the PRF output."""
    client, _ = client_for(auth, pin)
    server = Fido2Server(RP)
    extensions = {"prf": {"eval": {"first": prf}}} if prf is not None else None
    options, state = server.authenticate_begin([cred], user_verification=uv, extensions=extensions)
    selection = client.get_assertion(options.public_key)
    response = selection.get_response(0)
    server.authenticate_complete(state, [cred], response)
    if prf is None:
        return None
    return bytes(response.client_extension_results.prf.results.first)


@pytest.mark.parametrize("alg", [-7, -8], ids=["ES256", "EdDSA"])
def test_register_and_authenticate_verified_by_fido2_server(
    auth: SoftAuthenticator, alg: int
) -> None:
    cred = register(auth, alg=alg)
    assert cred.public_key.ALGORITHM == alg
    authenticate(auth, cred)
    # the up=false pre-flight from Fido2Client came first, then the real assertion
    assert auth.commands[-2:] == ["get_assertion", "get_assertion"]


def test_get_info_is_what_fido2_expects(auth: SoftAuthenticator) -> None:
    info = Ctap2(SoftCtapDevice(auth)).info
    assert "FIDO_2_1" in info.versions
    assert {"hmac-secret", "credProtect"} <= set(info.extensions)
    assert info.pin_uv_protocols == [2]
    assert info.options["clientPin"] is False
    assert {a["alg"] for a in info.algorithms} == {-7, -8}


def test_preflight_and_no_credentials(auth: SoftAuthenticator) -> None:
    ctap = Ctap2(SoftCtapDevice(auth))
    with pytest.raises(CtapError) as err:
        ctap.get_assertion("example.com", os.urandom(32), [{"type": "public-key", "id": b"x"}])
    assert err.value.code == ERR.NO_CREDENTIALS
    cred = register(auth)
    touches = auth.touch_requests
    allow = [{"type": "public-key", "id": cred.credential_id}]
    response = ctap.get_assertion("example.com", os.urandom(32), allow, options={"up": False})
    assert not response.auth_data.is_user_present()
    assert auth.touch_requests == touches  # up=false asks for no touch
    with pytest.raises(CtapError) as err:
        ctap.get_assertion("other.example", os.urandom(32), allow)
    assert err.value.code == ERR.NO_CREDENTIALS


def test_prf_and_hmac_secret_are_stable_per_credential(auth: SoftAuthenticator) -> None:
    cred = register(auth)
    first = authenticate(auth, cred, prf=b"salt one")
    assert first is not None and len(first) == 32
    assert authenticate(auth, cred, prf=b"salt one") == first
    assert authenticate(auth, cred, prf=b"salt two") != first
    other = register(auth, user=b"user-2")
    assert authenticate(auth, other, prf=b"salt one") != first
    # the output is HMAC-SHA-256(CredRandomWithoutUV, SHA-256("WebAuthn PRF" 0 salt))
    stored = auth.credential(cred.credential_id)
    assert stored is not None and stored.cred_random is not None
    import base64

    mac = HMAC(base64.b64decode(stored.cred_random)[:32], hashes.SHA256())
    mac.update(sha256(b"WebAuthn PRF\0salt one"))
    assert mac.finalize() == first


def test_hmac_secret_differs_with_user_verification(auth: SoftAuthenticator) -> None:
    cred = register(auth)
    without_uv = authenticate(auth, cred, prf=b"s")
    ClientPin(Ctap2(SoftCtapDevice(auth))).set_pin(PIN)
    with_uv = authenticate(auth, cred, uv="required", pin=PIN, prf=b"s")
    assert with_uv != without_uv
    assert authenticate(auth, cred, uv="required", pin=PIN, prf=b"s") == with_uv


def test_state_survives_a_restart(tmp_path: Path) -> None:
    first = SoftAuthenticator(tmp_path / "state.json")
    cred = register(first)
    secret = authenticate(first, cred, prf=b"persist")
    ClientPin(Ctap2(SoftCtapDevice(first))).set_pin(PIN)
    restarted = SoftAuthenticator(tmp_path / "state.json")
    assert authenticate(restarted, cred, prf=b"persist", uv="discouraged") == secret
    assert Ctap2(SoftCtapDevice(restarted)).info.options["clientPin"] is True
    # two authentications, each an up=false pre-flight and the real assertion: the counter
    # went on from where the first process left it
    assert restarted.credential(cred.credential_id).sign_count == 4  # type: ignore[union-attr]


def test_pin_protocol_two_retries_and_blocked_state(auth: SoftAuthenticator) -> None:
    ctap = Ctap2(SoftCtapDevice(auth))
    client_pin = ClientPin(ctap)
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token(PIN)
    assert err.value.code == ERR.PIN_NOT_SET
    client_pin.set_pin(PIN)
    with pytest.raises(CtapError) as err:
        client_pin.set_pin("9999")
    assert err.value.code == ERR.NOT_ALLOWED
    assert client_pin.get_pin_retries()[0] == 8
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, "example.com")
    assert len(token) == 32
    for expected_left in (7, 6):
        with pytest.raises(CtapError) as err:
            client_pin.get_pin_token("0000")
        assert err.value.code == ERR.PIN_INVALID
        assert client_pin.get_pin_retries()[0] == expected_left
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token("0000")
    assert err.value.code == ERR.PIN_AUTH_BLOCKED  # third in a row: power-cycle me
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token(PIN)
    assert err.value.code == ERR.PIN_AUTH_BLOCKED  # even the right PIN, until a power cycle
    auth.power_cycle()
    client_pin.get_pin_token(PIN)
    assert client_pin.get_pin_retries()[0] == 8  # a good PIN resets the counter
    for _ in range(8):
        if auth.pin_retries and auth._consecutive_mismatches == 2:
            auth.power_cycle()
        with pytest.raises(CtapError):
            client_pin.get_pin_token("0000")
    assert auth.pin_retries == 0
    with pytest.raises(CtapError) as err:
        client_pin.get_pin_token(PIN)
    assert err.value.code == ERR.PIN_BLOCKED
    assert SoftAuthenticator(auth.state_file).pin_retries == 0  # blocked stays blocked


def test_change_pin(auth: SoftAuthenticator) -> None:
    client_pin = ClientPin(Ctap2(SoftCtapDevice(auth)))
    client_pin.set_pin(PIN)
    client_pin.change_pin(PIN, "123456")
    with pytest.raises(CtapError):
        client_pin.get_pin_token(PIN)
    client_pin.get_pin_token("123456")


def test_tokens_are_single_use_for_assertions(auth: SoftAuthenticator) -> None:
    cred = register(auth)
    ctap = Ctap2(SoftCtapDevice(auth))
    client_pin = ClientPin(ctap)
    client_pin.set_pin(PIN)
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, "example.com")
    allow = [{"type": "public-key", "id": cred.credential_id}]
    cdh = os.urandom(32)
    param = client_pin.protocol.authenticate(token, cdh)
    response = ctap.get_assertion("example.com", cdh, allow, None, None, param, 2)
    assert response.auth_data.is_user_verified()
    with pytest.raises(CtapError) as err:
        ctap.get_assertion("example.com", cdh, allow, None, None, param, 2)
    assert err.value.code == ERR.PIN_AUTH_INVALID
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, "other.example")
    param = client_pin.protocol.authenticate(token, cdh)
    with pytest.raises(CtapError) as err:  # a token bound to another RP ID
        ctap.get_assertion("example.com", cdh, allow, None, None, param, 2)
    assert err.value.code == ERR.PIN_AUTH_INVALID


def test_user_presence_hook(auth: SoftAuthenticator) -> None:
    cred = register(auth)
    auth.presence = lambda command: Presence.REFUSE
    with pytest.raises(ClientError) as err:
        authenticate(auth, cred)
    assert isinstance(err.value.cause, CtapError)
    assert err.value.cause.code == ERR.OPERATION_DENIED
    auth.presence = lambda command: Presence.IGNORE
    with pytest.raises(ClientError) as err:
        authenticate(auth, cred)
    assert err.value.cause.code == ERR.USER_ACTION_TIMEOUT  # type: ignore[union-attr]
    auth.presence = lambda command: True
    authenticate(auth, cred)


def test_cancel_while_waiting_for_touch(auth: SoftAuthenticator) -> None:
    import threading

    cred = register(auth)
    auth.up_timeout = 5
    auth.presence = lambda command: Presence.IGNORE
    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()
    ctap = Ctap2(SoftCtapDevice(auth))
    with pytest.raises(CtapError) as err:
        ctap.get_assertion(
            "example.com",
            os.urandom(32),
            [{"type": "public-key", "id": cred.credential_id}],
            event=cancel,
        )
    assert err.value.code == ERR.KEEPALIVE_CANCEL


def test_discoverable_credentials_and_credential_management(auth: SoftAuthenticator) -> None:
    ClientPin(Ctap2(SoftCtapDevice(auth))).set_pin(PIN)
    first = register(auth, resident="required", uv="required", pin=PIN, user=b"u-1")
    second = register(auth, resident="required", uv="required", pin=PIN, user=b"u-2")
    ctap = Ctap2(SoftCtapDevice(auth))
    assertions = ctap.get_assertions("example.com", os.urandom(32))
    assert {a.credential["id"] for a in assertions} == {
        first.credential_id,
        second.credential_id,
    }
    client_pin = ClientPin(ctap)
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)
    manager = CredentialManagement(ctap, client_pin.protocol, token)
    assert manager.get_metadata()[1] == 2
    manager.delete_cred({"type": "public-key", "id": first.credential_id})
    assert auth.credential(first.credential_id) is None
    assert [a.credential["id"] for a in ctap.get_assertions("example.com", os.urandom(32))] == [
        second.credential_id
    ]


def test_exclude_list_and_cred_protect(auth: SoftAuthenticator) -> None:
    cred = register(auth)
    ctap = Ctap2(SoftCtapDevice(auth))
    with pytest.raises(CtapError) as err:
        ctap.make_credential(
            os.urandom(32),
            {"id": "example.com", "name": "Example"},
            {"id": b"user-1", "name": "alice"},
            [{"type": "public-key", "alg": -7}],
            exclude_list=[{"type": "public-key", "id": cred.credential_id}],
        )
    assert err.value.code == ERR.CREDENTIAL_EXCLUDED
    protected = ctap.make_credential(
        os.urandom(32),
        {"id": "example.com", "name": "Example"},
        {"id": b"user-3", "name": "carol"},
        [{"type": "public-key", "alg": -7}],
        extensions={"credProtect": 3},
    )
    assert protected.auth_data.extensions == {"credProtect": 3}
    cred_id = protected.auth_data.credential_data.credential_id  # type: ignore[union-attr]
    with pytest.raises(CtapError) as err:  # user verification required to even see it
        ctap.get_assertion("example.com", os.urandom(32), [{"type": "public-key", "id": cred_id}])
    assert err.value.code == ERR.NO_CREDENTIALS


def test_malformed_requests(auth: SoftAuthenticator) -> None:
    assert auth.process(b"") == bytes([ERR.INVALID_LENGTH])
    assert auth.process(b"\x42") == bytes([ERR.INVALID_COMMAND])
    assert auth.process(b"\x02\xff\xff") == bytes([ERR.INVALID_CBOR])
    assert auth.process(b"\x02\x01") == bytes([ERR.CBOR_UNEXPECTED_TYPE])
    assert auth.process(b"\x02\xa0") == bytes([ERR.MISSING_PARAMETER])
    ctap = Ctap2(SoftCtapDevice(auth))
    with pytest.raises(CtapError) as err:
        ctap.make_credential(
            os.urandom(32),
            {"id": "example.com"},
            {"id": b"u"},
            [{"type": "public-key", "alg": -257}],
        )
    assert err.value.code == ERR.UNSUPPORTED_ALGORITHM


# -- the card front end (APDUs), without PC/SC ------------------------------------------------
def test_card_answers_select_chaining_and_get_response(auth: SoftAuthenticator) -> None:
    card = FidoCard(auth)
    assert card.transmit(bytes.fromhex("00A4040008A0000006472F000100")) == b"FIDO_2_0\x90\x00"
    assert card.transmit(bytes.fromhex("00A4040005A00000030800")) == b"\x6a\x82"
    # getInfo with a short Le: the answer comes in pieces through GET RESPONSE
    first = card.transmit(bytes.fromhex("80100000010410"))
    assert first[-2] == 0x61 and len(first) == 0x10 + 2
    answer = first[:-2]
    while True:
        part = card.transmit(bytes.fromhex("00C00000") + bytes([min(first[-1] or 256, 255)]))
        answer += part[:-2]
        if part[-2:] == b"\x90\x00":
            break
        first = part
    assert answer[0] == 0 and b"FIDO_2_1" in answer
    # a chained command (clientPIN getPINRetries in two parts): the first part is
    # acknowledged, the last one runs the whole request
    assert card.transmit(bytes.fromhex("9010000003 06a201")) == b"\x90\x00"
    assert card.transmit(bytes.fromhex("8010000003 020201 00")) == bytes.fromhex("00a10308 9000")


def test_apdu_parsing() -> None:
    assert _parse_body(b"") == (b"", 0)
    assert _parse_body(b"\x05") == (b"", 5)
    assert _parse_body(b"\x02ab\x00") == (b"ab", 0)
    assert _parse_body(b"\x00\x00\x02ab\x01\x00") == (b"ab", 256)
    with pytest.raises(ValueError):
        _parse_body(b"\x05ab")
