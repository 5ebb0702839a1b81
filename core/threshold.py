"""Threshold (k-of-n) unlock policies and the SLIP-39 secret sharing under them.

Strongroom does not implement Shamir's scheme itself: it uses `shamir-mnemonic`, Trezor's
SLIP-39 implementation. This module is the one place that talks to it:

* `Policy`, `Group`, `Member` describe who must agree to open the vault ("the TPM AND any
  2 of 3 officers" is two groups, with a group threshold of 2);
* `split` and `combine` share a random 32-byte slot key over such a policy (SLIP-39's
  two-level scheme, with the slot key as the "encrypted master secret");
* `recovery_mnemonics` and `recover_secret` make and read standard SLIP-39 mnemonic
  shares (passphrase-encrypted as SLIP-39 specifies) for offline custody.

The library works on Python `bytes`, which cannot be locked or reliably wiped; callers copy
results into guarded memory and scrub the `bytes` they alone hold (docs/threshold.md says
where a copy remains).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shamir_mnemonic import EncryptedMasterSecret, MnemonicError, Share, split_ems
from shamir_mnemonic import combine_mnemonics as _combine_mnemonics
from shamir_mnemonic import generate_mnemonics as _generate_mnemonics
from shamir_mnemonic import recover_ems as _recover_ems
from shamir_mnemonic.shamir import ShareGroup
from shamir_mnemonic.wordlist import WORD_INDEX_MAP as _SLIP39_WORDS

from .errors import IntegrityError, InvalidArgument

MAX_SHARES = 16
"""SLIP-39 encodes indices in 4 bits: at most 16 groups, and 16 members in a group."""
SECRET_BYTES = 32
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
PASSPHRASE = "passphrase"  # noqa: S105 - the method name, not a secret


@dataclass(frozen=True)
class Member:
    """One way of unsealing a share: `passphrase`, or the name of a backend that can seal."""

    method: str
    label: str = ""
    """Unique within the policy (who holds it: "alice"); defaults to the method name."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Sealing options for the backend (e.g. {"pcrs": [7]} for a TPM)."""

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclass(frozen=True)
class Group:
    """`threshold` of these members must succeed for the group to count."""

    threshold: int
    members: tuple[Member, ...]

    def describe(self) -> str:
        names = ", ".join(m.name for m in self.members)
        if len(self.members) == 1:
            return names
        return f"{self.threshold} of ({names})"


@dataclass(frozen=True)
class Policy:
    """`group_threshold` of the groups must succeed to open the vault."""

    group_threshold: int
    groups: tuple[Group, ...]

    @classmethod
    def of(cls, threshold: int, members: Sequence[Member | str]) -> Policy:
        """K of N members, in one group."""
        ms = tuple(m if isinstance(m, Member) else parse_member(m) for m in members)
        return cls(1, (Group(threshold, ms),)).validated()

    def members(self) -> list[Member]:
        return [m for g in self.groups for m in g.members]

    def validated(self) -> Policy:
        """Self, or InvalidArgument saying what is wrong."""
        if not self.groups:
            raise InvalidArgument("a threshold policy needs at least one group of methods")
        if len(self.groups) > MAX_SHARES:
            raise InvalidArgument(f"a threshold policy has at most {MAX_SHARES} groups")
        if not 1 <= self.group_threshold <= len(self.groups):
            raise InvalidArgument(
                f"the group threshold must be from 1 to {len(self.groups)} (the number of "
                f"groups); got {self.group_threshold}"
            )
        for i, g in enumerate(self.groups, 1):
            if not g.members:
                raise InvalidArgument(f"group {i} has no methods")
            if len(g.members) > MAX_SHARES:
                raise InvalidArgument(f"group {i} has more than {MAX_SHARES} methods")
            if not 1 <= g.threshold <= len(g.members):
                which = "the threshold" if len(self.groups) == 1 else f"the threshold of group {i}"
                raise InvalidArgument(
                    f"{which} must be from 1 to {len(g.members)} (the number of methods); "
                    f"got {g.threshold}"
                )
        seen: set[str] = set()
        for m in self.members():
            if not m.method:
                raise InvalidArgument("a threshold member needs a method")
            if not _LABEL.match(m.name):
                raise InvalidArgument(
                    f"member name {m.name!r} must be 1-64 letters, digits or _ . @ + -"
                )
            if m.name in seen:
                raise InvalidArgument(
                    f"method {m.name!r} appears twice; name each one, e.g. "
                    f"{m.method}:alice {m.method}:bob"
                )
            seen.add(m.name)
        return self

    def describe(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].describe()
        parts = " AND ".join(f"[{g.describe()}]" for g in self.groups)
        if self.group_threshold == len(self.groups):
            return parts
        return f"{self.group_threshold} of: " + ", ".join(f"[{g.describe()}]" for g in self.groups)


def parse_member(spec: str) -> Member:
    """`METHOD` or `METHOD:LABEL`."""
    method, _, label = spec.strip().partition(":")
    if not method:
        raise InvalidArgument(f"{spec!r} is not a method (METHOD or METHOD:NAME)")
    return Member(method, label)


def parse_group(spec: str) -> Group:
    """`K:METHOD[:NAME],METHOD[:NAME],...`, e.g. `2:passphrase:alice,hsm,fido`."""
    k, sep, rest = spec.partition(":")
    try:
        threshold = int(k)
    except ValueError:
        threshold = 0
    if not sep or threshold < 1 or not rest:
        raise InvalidArgument(f"{spec!r} is not a group; write K:METHOD,METHOD,... e.g. 2:tpm,hsm")
    return Group(threshold, tuple(parse_member(m) for m in rest.split(",") if m.strip()))


# -- sharing a slot key over a policy ------------------------------------------------------------
@dataclass(frozen=True)
class MemberShare:
    """The share one member seals: public SLIP-39 coordinates plus the secret share value."""

    group: int
    index: int
    value: bytes


def split(policy: Policy, secret: bytes) -> tuple[dict[str, Any], list[MemberShare]]:
    """Share `secret` over `policy`. Returns the public SLIP-39 parameters (stored in the
    slot) and one share per member, in `policy.members()` order.

    SLIP-39 refuses groups of N > 1 members with threshold 1 ("use 1-of-1 sharing"); such a
    group gets one 1-of-1 share that each of its members seals (1-of-N Shamir is N copies).
    """
    policy.validated()
    if len(secret) != SECRET_BYTES:
        raise InvalidArgument(f"the shared secret must be {SECRET_BYTES} bytes")
    identifier = secrets.randbits(15)
    ems = EncryptedMasterSecret(identifier, True, 0, secret)
    shape = [(g.threshold, 1 if g.threshold == 1 else len(g.members)) for g in policy.groups]
    try:
        grouped = split_ems(policy.group_threshold, shape, ems)
    except (ValueError, MnemonicError) as e:
        raise InvalidArgument(f"cannot split over this policy: {e}") from None
    out: list[MemberShare] = []
    for gi, (group, shares) in enumerate(zip(policy.groups, grouped, strict=True)):
        for mi, _member in enumerate(group.members):
            share: Share = shares[0 if group.threshold == 1 else mi]
            out.append(MemberShare(gi, int(share.index), bytes(share.value)))
    params = {
        "scheme": "slip39",
        "identifier": identifier,
        "extendable": True,
        "iteration_exponent": 0,
        "group_threshold": policy.group_threshold,
        "group_count": len(policy.groups),
    }
    return params, out


def combine(
    params: Mapping[str, Any], thresholds: Sequence[int], shares: Iterable[MemberShare]
) -> bytearray:
    """The secret from enough shares (IntegrityError if they do not fit together), as a new
    bytearray the caller wipes. With thresholds of 1 the library hands back a share's own
    `bytes` object, so the result must be a copy: the caller scrubs the shares too.

    `thresholds` are the member thresholds of the groups, by group index.
    """
    groups: dict[int, ShareGroup] = {}
    try:
        for s in shares:
            share = Share(
                int(params["identifier"]),
                bool(params["extendable"]),
                int(params["iteration_exponent"]),
                s.group,
                int(params["group_threshold"]),
                int(params["group_count"]),
                s.index,
                int(thresholds[s.group]),
                s.value,
            )
            group = groups.setdefault(s.group, ShareGroup())
            if not group or len(group) < group.member_threshold():
                group.add(share)
        complete = {i: g for i, g in groups.items() if g.is_complete()}
        chosen = dict(sorted(complete.items())[: int(params["group_threshold"])])
        ems = _recover_ems(chosen)
    except (KeyError, ValueError, TypeError, IndexError, MnemonicError) as e:
        raise IntegrityError(f"the threshold shares do not fit together: {e}") from None
    return bytearray(ems.ciphertext)


# -- mnemonic shares for offline custody --------------------------------------------------------
def _slip39_passphrase(passphrase: str) -> bytes:
    if not all(32 <= ord(c) <= 126 for c in passphrase):
        raise InvalidArgument(
            "a SLIP-39 passphrase may contain only printable ASCII characters (space to ~)"
        )
    return passphrase.encode("ascii")


def recovery_mnemonics(
    secret: bytes,
    threshold: int,
    count: int,
    passphrase: str = "",
    groups: Sequence[tuple[int, int]] | None = None,
    group_threshold: int = 1,
) -> list[list[str]]:
    """Standard SLIP-39 mnemonics of `secret`: `threshold` of `count` (or the given groups of
    (threshold, count), `group_threshold` of them) recover it, with `passphrase`."""
    shape = list(groups) if groups else [(threshold, count)]
    check_recovery_shape(shape, group_threshold)
    try:
        grouped = _generate_mnemonics(
            group_threshold, shape, secret, _slip39_passphrase(passphrase), extendable=True
        )
        return [[str(m) for m in group] for group in grouped]
    except (ValueError, MnemonicError) as e:
        raise InvalidArgument(f"cannot make recovery shares: {e}") from None


def check_recovery_shape(shape: Sequence[tuple[int, int]], group_threshold: int = 1) -> None:
    """InvalidArgument unless SLIP-39 can make shares of this shape ((K, N) per group)."""
    if not shape or len(shape) > MAX_SHARES:
        raise InvalidArgument(f"recovery shares need 1 to {MAX_SHARES} groups")
    if not 1 <= group_threshold <= len(shape):
        raise InvalidArgument(f"the group threshold must be from 1 to {len(shape)}")
    for i, (k, n) in enumerate(shape, 1):
        if not 1 <= n <= MAX_SHARES:
            raise InvalidArgument(f"the number of shares must be from 1 to {MAX_SHARES}; got {n}")
        if not 1 <= k <= n:
            where = "" if len(shape) == 1 else f" of group {i}"
            raise InvalidArgument(
                f"the threshold{where} must be from 1 to the number of shares ({n}); got {k}"
            )
        if k == 1 and n > 1:
            raise InvalidArgument(
                "SLIP-39 does not make several shares with threshold 1 (each would be the whole "
                "secret); use --threshold 1 --shares 1, or a threshold of 2 or more"
            )


def _parse_share(mnemonic: str, which: str) -> Share:
    """One SLIP-39 share. Errors say which share and which word position, never a word:
    shamir_mnemonic's own messages quote the words (a mistyped one included), and a share's
    words are its secret."""
    words = mnemonic.split()
    for position, word in enumerate(words, 1):
        if word not in _SLIP39_WORDS:
            raise InvalidArgument(f"{which}: word {position} is not in the SLIP-39 word list")
    try:
        return Share.from_mnemonic(mnemonic)
    except (MnemonicError, ValueError):
        raise InvalidArgument(
            f"{which} is not a valid SLIP-39 share ({len(words)} words): its checksum or "
            "length is wrong, so a word is probably mistyped or missing"
        ) from None


def _check_set(shares: Sequence[Share]) -> None:
    """Name what keeps valid shares from recovering: another set, or too few of them."""
    first = shares[0]
    for number, share in enumerate(shares[1:], 2):
        if (share.identifier, share.group_threshold, share.group_count) != (
            first.identifier,
            first.group_threshold,
            first.group_count,
        ):
            raise InvalidArgument(f"share {number} belongs to another set of shares than share 1")
    groups: dict[int, set[int]] = {}
    needed: dict[int, int] = {}
    for share in shares:
        groups.setdefault(share.group_index, set()).add(share.index)
        needed[share.group_index] = share.member_threshold
    complete = [g for g, members in groups.items() if len(members) >= needed[g]]
    if len(complete) < first.group_threshold:
        counts = ", ".join(
            f"group {g + 1}: {len(members)} of {needed[g]}" for g, members in sorted(groups.items())
        )
        raise InvalidArgument(
            f"too few recovery shares: {first.group_threshold} complete group(s) needed, "
            f"{len(complete)} given ({counts})"
        )


def recover_secret(mnemonics: Sequence[str], passphrase: str = "") -> bytes:
    """The secret from SLIP-39 mnemonics; InvalidArgument naming the problem if they are not a
    valid, sufficient set. A wrong passphrase gives a different secret (SLIP-39 by design)."""
    cleaned = [" ".join(m.lower().split()) for m in mnemonics if m.strip()]
    if not cleaned:
        raise InvalidArgument("no recovery shares were given")
    _check_set([_parse_share(m, f"share {i}") for i, m in enumerate(cleaned, 1)])
    try:
        return bytes(_combine_mnemonics(cleaned, _slip39_passphrase(passphrase)))
    except (MnemonicError, ValueError):  # what _check_set cannot see, e.g. duplicate indices
        raise InvalidArgument(
            "the recovery shares are not a valid set (a share given twice, or shares of "
            "different sets)"
        ) from None


def mnemonic_identifier(mnemonic: str) -> int:
    """The SLIP-39 identifier of a mnemonic share (which set it belongs to)."""
    return int(_parse_share(" ".join(mnemonic.lower().split()), "the share").identifier)


__all__ = [
    "Group",
    "Member",
    "MemberShare",
    "Policy",
    "check_recovery_shape",
    "combine",
    "mnemonic_identifier",
    "parse_group",
    "parse_member",
    "recover_secret",
    "recovery_mnemonics",
    "split",
]
