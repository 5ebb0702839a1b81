"""BIP39 and SLIP-0010 procedures against the published vectors in tests/vectors/."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from mnemonic import Mnemonic

from strongroom.backends.vault import procedures
from strongroom.backends.vault.procedures import (
    HARDENED,
    bip39_generate,
    bip39_to_seed,
    bip39_validate,
    slip10_derive,
    slip10_parse_path,
    slip10_public_key,
)
from strongroom.errors import InvalidArgument

VECTORS = Path(__file__).parents[1] / "vectors"


def load(name: str) -> dict[str, Any]:
    with (VECTORS / name).open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    assert data["source"]
    return data


BIP39 = load("bip39_english.json")
SLIP10 = load("slip10.json")
RFC8032 = load("rfc8032_ed25519.json")

BIP39_CASES = [pytest.param(v, id=f"bip39-{i}") for i, v in enumerate(BIP39["vectors"])]
SLIP10_CASES = [
    pytest.param(v["curve"], v["seed"], c, id=f"{v['curve']}-{v['vector']}-{c['chain']}")
    for v in SLIP10["vectors"]
    for c in v["chains"]
]
RFC8032_CASES = [pytest.param(v, id=v["name"]) for v in RFC8032["vectors"]]

ERROR_TEMPLATE = re.compile(
    r"the mnemonic is not valid BIP39: (wrong word count \(\d+; it must be 12, 15, 18, 21 or "
    r"24 words\)|unknown word at position \d+|checksum mismatch)\."
)
# A 12-word vector none of whose words occur in the error templates.
LEGAL = "legal winner thank year wave sausage worth useful legal winner thank yellow"


def assert_no_words(exc: pytest.ExceptionInfo[InvalidArgument], mnemonic: str) -> None:
    message = str(exc.value)
    assert ERROR_TEMPLATE.fullmatch(message), message
    for word in mnemonic.split():
        assert not re.search(rf"\b{re.escape(word)}\b", message, re.IGNORECASE), word


def test_vector_files_are_complete() -> None:
    assert len(BIP39["vectors"]) == 24
    assert BIP39["passphrase"] == "TREZOR"
    assert [v["name"] for v in RFC8032["vectors"]] == [
        "TEST 1",
        "TEST 2",
        "TEST 3",
        "TEST 1024",
        "TEST SHA(abc)",
    ]
    curves = {(v["curve"], v["vector"]) for v in SLIP10["vectors"]}
    assert {("ed25519", 1), ("ed25519", 2), ("secp256k1", 1), ("secp256k1", 2)} <= curves


# --- RFC 8032 (smoke check of the vector file) ---------------------------------------------


@pytest.mark.parametrize("vector", RFC8032_CASES)
def test_rfc8032_vectors_verify_with_pynacl(vector: dict[str, str]) -> None:
    key = nacl.signing.SigningKey(bytes.fromhex(vector["secret_key"]))
    message = bytes.fromhex(vector["message"])
    signature = bytes.fromhex(vector["signature"])
    assert bytes(key.verify_key).hex() == vector["public_key"]
    assert key.sign(message).signature == signature
    key.verify_key.verify(message, signature)


def test_rfc8032_sha_abc_message_is_sha512_of_abc() -> None:
    vector = RFC8032["vectors"][4]
    assert bytes.fromhex(vector["message"]) == hashlib.sha512(b"abc").digest()


# --- BIP39 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", BIP39_CASES)
def test_bip39_vector(vector: dict[str, str]) -> None:
    entropy = bytes.fromhex(vector["entropy"])
    assert Mnemonic("english").to_mnemonic(entropy) == vector["mnemonic"]
    bip39_validate(vector["mnemonic"])
    out = bytearray(64)
    bip39_to_seed(vector["mnemonic"], BIP39["passphrase"], memoryview(out))
    assert out.hex() == vector["seed"]


@pytest.mark.parametrize("vector", BIP39_CASES)
def test_bip39_generate_matches_vector_for_its_entropy(
    vector: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entropy_hex = vector["entropy"]

    def fake_urandom(n: int) -> bytes:
        assert n == len(entropy_hex) // 2
        return bytes.fromhex(entropy_hex)

    monkeypatch.setattr(procedures.os, "urandom", fake_urandom)
    assert bip39_generate(len(vector["mnemonic"].split())) == vector["mnemonic"]


@pytest.mark.parametrize("words", [12, 15, 18, 21, 24])
def test_bip39_generate_is_valid(words: int) -> None:
    mnemonic = bip39_generate(words)
    assert len(mnemonic.split()) == words
    bip39_validate(mnemonic)
    assert Mnemonic("english").check(mnemonic)
    assert bip39_generate(words) != mnemonic


def test_bip39_generate_default_is_24_words() -> None:
    assert len(bip39_generate().split()) == 24


@pytest.mark.parametrize("words", [0, 11, 13, 25, 48, -12, True])
def test_bip39_generate_rejects_word_counts(words: int) -> None:
    with pytest.raises(InvalidArgument):
        bip39_generate(words)


def test_bip39_seed_ignores_case_and_extra_whitespace() -> None:
    vector = BIP39["vectors"][1]
    canonical, messy = bytearray(64), bytearray(64)
    bip39_to_seed(vector["mnemonic"], "TREZOR", memoryview(canonical))
    messy_text = "  " + "\t".join(vector["mnemonic"].upper().split()) + "\n"
    bip39_to_seed(messy_text, "TREZOR", memoryview(messy))
    assert messy == canonical


def test_bip39_seed_passphrase_matters() -> None:
    vector = BIP39["vectors"][0]
    out = bytearray(64)
    bip39_to_seed(vector["mnemonic"], "", memoryview(out))
    assert out.hex() == Mnemonic.to_seed(vector["mnemonic"], "").hex()
    assert out.hex() != vector["seed"]


def test_bip39_seed_into_a_slice_of_a_larger_buffer() -> None:
    vector = BIP39["vectors"][2]
    backing = bytearray(b"\xaa" * 80)
    bip39_to_seed(vector["mnemonic"], "TREZOR", memoryview(backing)[8:72])
    assert backing[8:72].hex() == vector["seed"]
    assert backing[:8] == b"\xaa" * 8 and backing[72:] == b"\xaa" * 8


def test_bip39_wrong_checksum() -> None:
    bad = LEGAL.replace("yellow", "year")
    with pytest.raises(InvalidArgument, match="checksum mismatch") as exc:
        bip39_validate(bad)
    assert_no_words(exc, bad)
    out = bytearray(64)
    with pytest.raises(InvalidArgument, match="checksum mismatch") as exc:
        bip39_to_seed(bad, "TREZOR", memoryview(out))
    assert_no_words(exc, bad)
    assert out == bytearray(64)


def test_bip39_unknown_word() -> None:
    words = LEGAL.split()
    words[2] = "thankz"
    bad = " ".join(words)
    with pytest.raises(InvalidArgument, match="unknown word at position 3") as exc:
        bip39_validate(bad)
    assert_no_words(exc, bad)
    with pytest.raises(InvalidArgument, match="unknown word at position 3") as exc:
        bip39_to_seed(bad, "", memoryview(bytearray(64)))
    assert_no_words(exc, bad)


@pytest.mark.parametrize("count", [0, 1, 11, 13, 23, 25])
def test_bip39_wrong_word_count(count: int) -> None:
    bad = " ".join((LEGAL.split() * 3)[:count])
    with pytest.raises(InvalidArgument, match="wrong word count") as exc:
        bip39_validate(bad)
    assert_no_words(exc, bad)


def test_bip39_rejects_non_str() -> None:
    with pytest.raises(InvalidArgument):
        bip39_validate(LEGAL.encode())  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 32, 63, 65])
def test_bip39_seed_buffer_must_be_64_bytes(size: int) -> None:
    with pytest.raises(InvalidArgument) as exc:
        bip39_to_seed(LEGAL, "", memoryview(bytearray(size)))
    assert "legal" not in str(exc.value)


def test_bip39_seed_buffer_must_be_writable() -> None:
    with pytest.raises(InvalidArgument):
        bip39_to_seed(LEGAL, "", memoryview(bytes(64)))
    with pytest.raises(InvalidArgument):
        bip39_to_seed(LEGAL, "", bytearray(64))  # type: ignore[arg-type]


# --- SLIP-0010 ------------------------------------------------------------------------------


@pytest.mark.parametrize(("curve", "seed_hex", "chain"), SLIP10_CASES)
def test_slip10_vector(curve: str, seed_hex: str, chain: dict[str, str]) -> None:
    seed = bytes.fromhex(seed_hex)
    key, chain_code = bytearray(32), bytearray(32)
    slip10_derive(curve, seed, chain["chain"], memoryview(key), memoryview(chain_code))
    assert key.hex() == chain["private"]
    assert chain_code.hex() == chain["chain_code"]
    assert slip10_public_key(curve, memoryview(key)).hex() == chain["public"]
    key_bytes = bytes(key)
    assert slip10_public_key(curve, key_bytes).hex() == chain["public"]
    assert key_bytes == key  # a caller's bytes are never scrubbed

    # Same result from a memoryview seed, a parsed index list and no chain-code buffer.
    again = bytearray(32)
    seed_view = memoryview(bytearray(seed))
    slip10_derive(curve, seed_view, slip10_parse_path(chain["chain"]), memoryview(again))
    assert again == key


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("m", []),
        ("m/0", [0]),
        ("m/44'/0'/0'", [44 | HARDENED, HARDENED, HARDENED]),
        ("m/44h/0H/1", [44 | HARDENED, HARDENED, 1]),
        ("m/2147483647'/2147483647", [0xFFFFFFFF, 0x7FFFFFFF]),
    ],
)
def test_slip10_parse_path(path: str, expected: list[int]) -> None:
    assert slip10_parse_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/0",
        "0/1",
        "M/0",
        "m/",
        "m//1",
        "m/1/",
        "m/1x",
        "m/-1",
        "m/+1",
        "m/ 1",
        "m/1''",
        "m/1'h",
        "m/0x10",
        "m/2147483648",
        "m/2147483648'",
        "m/" + "9" * 5000,
        "m/\u0661",
        "m" + "/0" * 256,
    ],
)
def test_slip10_bad_path_syntax(path: str) -> None:
    with pytest.raises(InvalidArgument):
        slip10_parse_path(path)
    with pytest.raises(InvalidArgument):
        slip10_derive("secp256k1", bytes(16), path, memoryview(bytearray(32)))


@pytest.mark.parametrize("path", ["m/0", "m/0'/1", [HARDENED, 1]])
def test_slip10_ed25519_rejects_normal_steps(path: str | list[int]) -> None:
    out = bytearray(32)
    with pytest.raises(InvalidArgument, match="hardened"):
        slip10_derive("ed25519", bytes(range(16)), path, memoryview(out))
    assert out == bytearray(32)


def test_slip10_secp256k1_normal_steps_match_vector() -> None:
    vector = next(v for v in SLIP10["vectors"] if (v["curve"], v["vector"]) == ("secp256k1", 2))
    last = vector["chains"][-1]
    assert "/" in last["chain"] and not last["chain"].endswith("'")
    key = bytearray(32)
    slip10_derive("secp256k1", bytes.fromhex(vector["seed"]), last["chain"], memoryview(key))
    assert key.hex() == last["private"]


@pytest.mark.parametrize("path", [[-1], [2**32], ["0"], [True], (0, 1)])
def test_slip10_bad_index_lists(path: Any) -> None:
    with pytest.raises(InvalidArgument):
        slip10_derive("secp256k1", bytes(16), path, memoryview(bytearray(32)))


@pytest.mark.parametrize("size", [0, 15, 65, 128])
def test_slip10_seed_size(size: int) -> None:
    seed = bytes([0x5A]) * size
    with pytest.raises(InvalidArgument) as exc:
        slip10_derive("ed25519", seed, "m", memoryview(bytearray(32)))
    assert seed.hex() not in str(exc.value) or size == 0


@pytest.mark.parametrize("curve", ["ed448", "secp256r1", "Ed25519", "curve25519", ""])
def test_slip10_unknown_curve(curve: str) -> None:
    with pytest.raises(InvalidArgument):
        slip10_derive(curve, bytes(16), "m", memoryview(bytearray(32)))
    with pytest.raises(InvalidArgument):
        slip10_public_key(curve, bytes(32))


def test_slip10_output_buffers_are_checked() -> None:
    seed = bytes(range(16))
    with pytest.raises(InvalidArgument):
        slip10_derive("ed25519", seed, "m", memoryview(bytearray(31)))
    with pytest.raises(InvalidArgument):
        slip10_derive("ed25519", seed, "m", memoryview(bytes(32)))
    with pytest.raises(InvalidArgument):
        slip10_derive("ed25519", seed, "m", memoryview(bytearray(32)), memoryview(bytearray(33)))


def test_slip10_public_key_rejects_bad_keys() -> None:
    with pytest.raises(InvalidArgument):
        slip10_public_key("ed25519", bytes(31))
    with pytest.raises(InvalidArgument):
        slip10_public_key("secp256k1", bytes(32))  # zero is not a valid scalar
    with pytest.raises(InvalidArgument):
        slip10_public_key("secp256k1", b"\xff" * 32)  # above the group order


def test_bip39_seed_feeds_slip10() -> None:
    vector = BIP39["vectors"][0]
    seed = bytearray(64)
    bip39_to_seed(vector["mnemonic"], "TREZOR", memoryview(seed))
    key = bytearray(32)
    slip10_derive("ed25519", memoryview(seed), "m/44'/1729'/0'", memoryview(key))
    assert len(slip10_public_key("ed25519", memoryview(key))) == 33
