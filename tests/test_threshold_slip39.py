"""SLIP-39 as Strongroom uses it: the official test vectors, and sharing over policies.

tests/vectors/slip39.json is vectors.json of Trezor's python-shamir-mnemonic (MIT licence,
see tests/vectors/README.md): [description, mnemonics, master secret hex, BIP32 xprv],
with the passphrase "TREZOR"; an empty secret means the set must be refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import pytest

from strongroom.errors import IntegrityError, InvalidArgument
from strongroom.threshold import (
    Group,
    Member,
    MemberShare,
    Policy,
    combine,
    mnemonic_identifier,
    parse_group,
    parse_member,
    recover_secret,
    recovery_mnemonics,
    split,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "slip39.json").read_text())
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def xprv(secret: bytes) -> str:
    """BIP32 master extended private key of `secret` (the vectors' second check)."""
    digest = hmac.new(b"Bitcoin seed", secret, hashlib.sha512).digest()
    payload = bytes.fromhex("0488ade4") + bytes(9) + digest[32:] + b"\x00" + digest[:32]
    data = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\x00"))) + out


def test_the_vector_file_is_complete() -> None:
    assert len(VECTORS) == 45
    assert sum(1 for v in VECTORS if v[2]) == 15  # valid sets; the other 30 must be refused


@pytest.mark.parametrize("vector", VECTORS, ids=[v[0].split(".")[0] for v in VECTORS])
def test_official_vectors(vector: list[object]) -> None:
    description, mnemonics, secret_hex, expected_xprv = vector
    assert isinstance(mnemonics, list) and isinstance(secret_hex, str)
    if secret_hex:
        secret = recover_secret(mnemonics, "TREZOR")
        assert secret == bytes.fromhex(secret_hex), description
        assert xprv(secret) == expected_xprv, description
        if len(mnemonics) > 1 or "without sharing" not in str(description):
            # a different passphrase gives a different secret (SLIP-39 has no check)
            assert recover_secret(mnemonics, "NOT TREZOR") != secret
    else:
        with pytest.raises(InvalidArgument) as err:
            recover_secret(mnemonics)
        assert "\n" not in str(err.value)


def test_recovery_mnemonics_round_trip_with_any_k() -> None:
    secret = os.urandom(32)
    (shares,) = recovery_mnemonics(secret, 3, 5, "pass phrase")
    assert len(shares) == 5 and len({mnemonic_identifier(m) for m in shares}) == 1
    for picked in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        assert recover_secret([shares[i] for i in picked], "pass phrase") == secret
    # messy typing is accepted: case and spaces
    assert recover_secret([shares[0].upper(), "  " + shares[1], shares[2]], "pass phrase") == secret
    with pytest.raises(InvalidArgument, match=r"too few recovery shares.*group 1: 2 of 3"):
        recover_secret(shares[:2], "pass phrase")
    bad = shares[0].split()
    bad[10] = "academic" if bad[10] != "academic" else "acid"
    with pytest.raises(InvalidArgument, match=r"share 1 is not a valid SLIP-39 share.*checksum"):
        recover_secret([" ".join(bad), *shares[1:3]], "pass phrase")
    with pytest.raises(InvalidArgument, match="printable ASCII"):
        recovery_mnemonics(secret, 2, 3, "pässphrase")
    with pytest.raises(InvalidArgument, match="threshold 1"):
        recovery_mnemonics(secret, 1, 3)
    with pytest.raises(InvalidArgument, match="from 1 to 16"):
        recovery_mnemonics(secret, 2, 17)
    with pytest.raises(InvalidArgument, match="from 1 to the number of shares"):
        recovery_mnemonics(secret, 4, 3)
    with pytest.raises(InvalidArgument, match="no recovery shares"):
        recover_secret(["", "  "])


def test_split_and_combine_over_groups() -> None:
    policy = Policy(
        2,
        (
            Group(1, (Member("tpm"),)),
            Group(2, (Member("passphrase", "alice"), Member("hsm"), Member("fido"))),
            Group(1, (Member("passphrase", "bob"), Member("passphrase", "carol"))),
        ),
    )
    assert policy.describe() == "2 of: [tpm], [2 of (alice, hsm, fido)], [1 of (bob, carol)]"
    secret = os.urandom(32)
    params, shares = split(policy, secret)
    assert params["group_threshold"] == 2 and params["group_count"] == 3
    by_name = dict(zip([m.name for m in policy.members()], shares, strict=True))
    # the 1-of-2 group: bob and carol seal copies of one 1-of-1 share
    assert by_name["bob"] == by_name["carol"]
    thresholds = [1, 2, 1]

    def opens(*names: str) -> bytes:
        return combine(params, thresholds, [by_name[n] for n in names])

    assert opens("tpm", "alice", "fido") == secret
    assert opens("tpm", "carol") == secret
    assert opens("hsm", "fido", "bob") == secret
    for short in (("tpm",), ("tpm", "alice"), ("alice", "bob", "carol")):
        with pytest.raises(IntegrityError, match="do not fit together"):
            opens(*short)
    forged = MemberShare(1, by_name["hsm"].index, os.urandom(32))
    with pytest.raises(IntegrityError, match="digest"):
        combine(params, thresholds, [by_name["alice"], forged, by_name["tpm"]])


def test_policy_parsing_and_validation() -> None:
    assert parse_member("passphrase:alice") == Member("passphrase", "alice")
    assert parse_group("2:passphrase:alice,hsm, fido") == Group(
        2, (Member("passphrase", "alice"), Member("hsm"), Member("fido"))
    )
    assert Policy.of(2, ["tpm", "hsm", "passphrase"]).describe() == "2 of (tpm, hsm, passphrase)"
    for spec in ("tpm,hsm", "0:tpm", "x:tpm", "2:"):
        with pytest.raises(InvalidArgument, match="not a group"):
            parse_group(spec)
    with pytest.raises(InvalidArgument, match="appears twice"):
        Policy.of(1, ["tpm", "tpm"])
    with pytest.raises(InvalidArgument, match="must be from 1 to 2"):
        Policy.of(3, ["tpm", "hsm"])
    with pytest.raises(InvalidArgument, match="group threshold"):
        Policy(3, (Group(1, (Member("a"),)), Group(1, (Member("b"),)))).validated()
    with pytest.raises(InvalidArgument, match="more than 16"):
        Policy.of(1, [f"passphrase:p{i}" for i in range(17)])
    with pytest.raises(InvalidArgument, match="letters"):
        Policy.of(1, ["passphrase:bad name"])


def test_recovery_errors_name_the_share_and_position_never_a_word() -> None:
    """Found: errors quoted share words, a mistyped one included (the words are the secret)."""
    secret = os.urandom(32)
    (shares,) = recovery_mnemonics(secret, 2, 3)
    (other,) = recovery_mnemonics(os.urandom(32), 2, 3)
    typo = shares[1].split()
    typo[6] += "zz"  # no SLIP-39 word is longer than eight letters or ends so
    swapped = shares[1].split()
    # two neighbours that differ (the header words are often equal: swapping those changes
    # nothing, and the share stays valid, about one set in a hundred)
    i = next(i for i in range(4, len(swapped) - 1) if swapped[i] != swapped[i + 1])
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    cases = [
        ([shares[0], " ".join(typo)], r"share 2: word 7 is not in the SLIP-39 word list"),
        ([shares[0], " ".join(swapped)], r"share 2 is not a valid SLIP-39 share"),
        ([shares[0], " ".join(shares[1].split()[:-1])], r"share 2 is not a valid"),
        ([shares[0], other[1]], r"share 2 belongs to another set"),
        ([shares[2]], r"too few recovery shares"),
        ([shares[0], shares[0]], r"too few recovery shares|a share given twice"),
    ]
    # Any run of three words of a share, or the mistyped word. Not single words: SLIP-39's
    # list has ordinary English ("group", "method"), which a message may use on its own.
    runs = {
        " ".join(ws[i : i + 3])
        for m in (*shares, *other)
        for ws in [m.split()]
        for i in range(len(ws) - 2)
    }
    for given, why in cases:
        with pytest.raises(InvalidArgument, match=why) as err:
            recover_secret(given)
        message = " ".join(str(err.value).lower().split())
        assert not [r for r in runs if r in message], "the message quotes a share"
        assert not re.search(rf"\b{re.escape(typo[6])}\b", message)
    with pytest.raises(InvalidArgument, match="word 7") as err:
        mnemonic_identifier(" ".join(typo))
    assert typo[6] not in str(err.value)
