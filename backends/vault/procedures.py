"""BIP39 mnemonics and SLIP-0010 key derivation as pure functions over caller buffers.

Secrets are written into writable memoryviews the caller provides (normally guarded
memory). Intermediates live in bytearrays that are zeroed when done; the `bytes` objects
that hashlib, hmac and PyNaCl return are scrubbed in place after use. Python `str` and
`int` values (the mnemonic itself, scalar arithmetic) cannot be wiped; that limit is
documented in the threat model. No error message contains a word, seed or key.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import hmac
import os
import re
import unicodedata

import nacl.bindings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.errors import InvalidArgument
from strongroom.memory import scrub_bytes, wipe

__all__ = [
    "BIP39_SEED_SIZE",
    "HARDENED",
    "SLIP10_CURVES",
    "bip39_generate",
    "bip39_to_seed",
    "bip39_validate",
    "slip10_derive",
    "slip10_parse_path",
    "slip10_public_key",
]

HARDENED = 0x80000000
"""Bit set in a child index for hardened derivation."""

BIP39_SEED_SIZE = 64
BIP39_ROUNDS = 2048
_BIP39_WORD_COUNTS = (12, 15, 18, 21, 24)
_SALT_PREFIX = b"mnemonic"

SLIP10_CURVES = ("ed25519", "secp256k1", "nist256p1")
"""Curves slip10_derive accepts (nist256p1 is NIST P-256, as SLIP-0010 names it)."""

_HMAC_KEYS = {
    "ed25519": b"ed25519 seed",
    "secp256k1": b"Bitcoin seed",
    "nist256p1": b"Nist256p1 seed",
}
_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256k1": ec.SECP256K1(),
    "nist256p1": ec.SECP256R1(),
}
_ORDERS = {
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "nist256p1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
_KEY_SIZE = 32
_MIN_SEED, _MAX_SEED = 16, 64
_MAX_DEPTH = 255  # BIP32 serialises the depth in one byte
_PATH_STEP = re.compile(r"([0-9]+)(['hH]?)", re.ASCII)


# --- helpers ------------------------------------------------------------------------------


def _out_view(out: object, size: int, name: str) -> memoryview:
    """Check `out` is a writable contiguous buffer of exactly `size` bytes; view it as bytes."""
    if not isinstance(out, memoryview):
        raise InvalidArgument(f"{name} must be a writable memoryview, not {type(out).__name__}.")
    if out.readonly:
        raise InvalidArgument(f"{name} is read-only; a writable memoryview is needed.")
    if not out.c_contiguous:
        raise InvalidArgument(f"{name} must be a contiguous memoryview.")
    if out.nbytes != size:
        raise InvalidArgument(f"{name} must be exactly {size} bytes long, not {out.nbytes}.")
    return out if out.format == "B" and out.ndim == 1 else out.cast("B")


def _check_curve(curve: str) -> None:
    if curve not in _HMAC_KEYS:
        known = ", ".join(SLIP10_CURVES)
        raise InvalidArgument(
            f"curve {curve!r} is not supported for SLIP-0010; use one of {known}."
        )


@functools.cache
def _wordlist() -> tuple[bytes, ...]:
    """The BIP39 English word list as sorted ASCII bytes (for bisect lookups)."""
    from mnemonic import Mnemonic

    words = tuple(w.encode("ascii") for w in Mnemonic("english").wordlist)
    if len(words) != 2048 or list(words) != sorted(words):
        raise RuntimeError("the installed BIP39 English word list is not the standard one")
    return words


def _word_index(word: bytearray) -> int:
    """Index of `word` in the English list, or -1; bisect avoids hashing the secret word."""
    words = _wordlist()
    i = bisect.bisect_left(words, word)
    return i if i < len(words) and words[i] == word else -1


def _split_words(mnemonic: str) -> list[bytearray]:
    """NFKD-normalise, lower-case and split a mnemonic into bytearray words (caller wipes)."""
    if not isinstance(mnemonic, str):
        raise InvalidArgument(f"the mnemonic must be a str, not {type(mnemonic).__name__}.")
    encoded = unicodedata.normalize("NFKD", mnemonic).lower().encode("utf-8")
    text = bytearray(encoded)
    scrub_bytes(encoded)
    try:
        return text.split()
    finally:
        wipe(text)


def _wipe_all(parts: list[bytearray]) -> None:
    for p in parts:
        wipe(p)


def _check_words(words: list[bytearray]) -> None:
    """Raise InvalidArgument unless `words` is a valid BIP39 English mnemonic."""
    count = len(words)
    if count not in _BIP39_WORD_COUNTS:
        raise InvalidArgument(
            f"the mnemonic is not valid BIP39: wrong word count ({count}; "
            "it must be 12, 15, 18, 21 or 24 words)."
        )
    total_bits = count * 11
    checksum_bits = count // 3
    entropy_len = (total_bits - checksum_bits) // 8
    packed = bytearray((total_bits + 7) // 8)
    try:
        acc = 0
        nbits = 0
        pos = 0
        for n, word in enumerate(words, start=1):
            index = _word_index(word)
            if index < 0:
                raise InvalidArgument(
                    f"the mnemonic is not valid BIP39: unknown word at position {n}."
                )
            acc = (acc << 11) | index
            nbits += 11
            while nbits >= 8:
                nbits -= 8
                packed[pos] = (acc >> nbits) & 0xFF
                pos += 1
            acc &= (1 << nbits) - 1
        if nbits:
            packed[pos] = (acc << (8 - nbits)) & 0xFF
        digest = hashlib.sha256(memoryview(packed)[:entropy_len]).digest()
        want = digest[0] >> (8 - checksum_bits)
        scrub_bytes(digest)
        got = packed[entropy_len] >> (8 - checksum_bits)
        if want != got:
            raise InvalidArgument("the mnemonic is not valid BIP39: checksum mismatch.")
    finally:
        wipe(packed)


# --- BIP39 --------------------------------------------------------------------------------


def bip39_generate(words: int = 24) -> str:
    """Make a new English BIP39 mnemonic of `words` words from os.urandom entropy."""
    if isinstance(words, bool) or not isinstance(words, int) or words not in _BIP39_WORD_COUNTS:
        raise InvalidArgument(f"a BIP39 mnemonic has 12, 15, 18, 21 or 24 words, not {words!r}.")
    entropy_len = words * 11 * 32 // 33 // 8
    checksum_bits = words // 3
    raw = os.urandom(entropy_len)
    packed = bytearray(entropy_len + 1)
    packed[:entropy_len] = raw
    scrub_bytes(raw)
    try:
        digest = hashlib.sha256(memoryview(packed)[:entropy_len]).digest()
        packed[entropy_len] = digest[0] & ~((1 << (8 - checksum_bits)) - 1) & 0xFF
        scrub_bytes(digest)
        wordlist = _wordlist()
        out: list[str] = []
        acc = 0
        nbits = 0
        for byte in packed:
            acc = (acc << 8) | byte
            nbits += 8
            while nbits >= 11 and len(out) < words:
                nbits -= 11
                out.append(wordlist[(acc >> nbits) & 0x7FF].decode("ascii"))
            acc &= (1 << nbits) - 1
        return " ".join(out)
    finally:
        wipe(packed)


def bip39_validate(mnemonic: str) -> None:
    """Raise InvalidArgument unless `mnemonic` is a valid English BIP39 mnemonic."""
    words = _split_words(mnemonic)
    try:
        _check_words(words)
    finally:
        _wipe_all(words)


def bip39_to_seed(mnemonic: str, passphrase: str, out: memoryview) -> None:
    """Validate `mnemonic` and write its 64-byte BIP39 seed (PBKDF2-HMAC-SHA512) into `out`.

    Words are NFKD-normalised, lower-cased and joined by single spaces before hashing, so
    stray whitespace or capitals give the same seed as the canonical sentence. The salt is
    "mnemonic" followed by the NFKD-normalised passphrase.
    """
    view = _out_view(out, BIP39_SEED_SIZE, "the seed buffer")
    if not isinstance(passphrase, str):
        raise InvalidArgument(f"the passphrase must be a str, not {type(passphrase).__name__}.")
    words = _split_words(mnemonic)
    sentence = bytearray()
    salt = bytearray()
    try:
        _check_words(words)
        sentence = bytearray(b" ").join(words)
        encoded = unicodedata.normalize("NFKD", passphrase).encode("utf-8")
        salt = bytearray(len(_SALT_PREFIX) + len(encoded))
        salt[: len(_SALT_PREFIX)] = _SALT_PREFIX
        salt[len(_SALT_PREFIX) :] = encoded
        scrub_bytes(encoded)
        seed = hashlib.pbkdf2_hmac("sha512", sentence, salt, BIP39_ROUNDS)
        view[:] = seed
        scrub_bytes(seed)
    finally:
        _wipe_all(words)
        wipe(sentence)
        wipe(salt)


# --- SLIP-0010 ----------------------------------------------------------------------------


def slip10_parse_path(path: str) -> list[int]:
    """Parse "m/44'/0'/0'" or "m/44h/0H/1" into child indexes (hardened ones have bit 31 set)."""
    if not isinstance(path, str):
        raise InvalidArgument(f"a derivation path must be a str, not {type(path).__name__}.")
    parts = path.split("/")
    if parts[0] != "m":
        raise InvalidArgument(f"the derivation path {path!r} must start with 'm'.")
    steps: list[int] = []
    for n, part in enumerate(parts[1:], start=1):
        match = _PATH_STEP.fullmatch(part)
        if match is None:
            raise InvalidArgument(
                f"step {n} of the derivation path {path!r} is not a number with an optional "
                "hardened mark (', h or H)."
            )
        digits = match.group(1)
        index = int(digits) if len(digits) <= 10 else HARDENED
        if index >= HARDENED:
            raise InvalidArgument(
                f"step {n} of the derivation path {path!r} is too large; indexes go up to "
                f"{HARDENED - 1}."
            )
        steps.append(index | HARDENED if match.group(2) else index)
    if len(steps) > _MAX_DEPTH:
        raise InvalidArgument(f"a derivation path has at most {_MAX_DEPTH} steps.")
    return steps


def _steps(path: str | list[int]) -> list[int]:
    if isinstance(path, str):
        return slip10_parse_path(path)
    if not isinstance(path, list):
        raise InvalidArgument(
            f"a derivation path must be a str or a list of ints, not {type(path).__name__}."
        )
    for n, index in enumerate(path, start=1):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**32:
            raise InvalidArgument(f"step {n} of the derivation path is not an index in 0..2**32-1.")
    if len(path) > _MAX_DEPTH:
        raise InvalidArgument(f"a derivation path has at most {_MAX_DEPTH} steps.")
    return list(path)


def _ec_public(curve: str, key: bytearray | memoryview | bytes) -> bytes:
    """Compressed SEC1 public key of a valid private scalar on a Weierstrass curve."""
    private = ec.derive_private_key(int.from_bytes(key, "big"), _EC_CURVES[curve])
    return private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def _ed25519_public(key: bytearray | memoryview | bytes) -> bytes:
    """0x00 || Ed25519 public key of a 32-byte seed, as SLIP-0010 serialises it."""
    owned = type(key) is not bytes  # bytes(b) would return the caller's own object
    seed = bytes(key)
    try:
        public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        scrub_bytes(secret)
    finally:
        if owned:
            scrub_bytes(seed)
    return b"\x00" + public


def _split(i: bytes, key: bytearray, chain: bytearray) -> None:
    """Copy I_L into `key` and I_R into `chain`, then scrub I."""
    key[:] = i[:_KEY_SIZE]
    chain[:] = i[_KEY_SIZE:]
    scrub_bytes(i)


def _master(curve: str, seed: memoryview | bytes, key: bytearray, chain: bytearray) -> None:
    """SLIP-0010 master key generation, retrying with S := I while I_L is 0 or >= n."""
    hmac_key = _HMAC_KEYS[curve]
    _split(hmac.digest(hmac_key, seed, "sha512"), key, chain)
    if curve == "ed25519":
        return
    order = _ORDERS[curve]
    data = bytearray(64)
    try:
        while not 0 < int.from_bytes(key, "big") < order:
            data[:_KEY_SIZE] = key
            data[_KEY_SIZE:] = chain
            _split(hmac.digest(hmac_key, data, "sha512"), key, chain)
    finally:
        wipe(data)


def _child(curve: str, index: int, key: bytearray, chain: bytearray) -> None:
    """SLIP-0010 CKDpriv: replace (key, chain) with the child at `index`, in place."""
    data = bytearray(37)
    child = bytearray(_KEY_SIZE)
    next_chain = bytearray(_KEY_SIZE)
    try:
        if index & HARDENED:
            data[0] = 0
            data[1:33] = key
        else:
            public = _ec_public(curve, key)
            data[:33] = public
        data[33:] = index.to_bytes(4, "big")
        _split(hmac.digest(chain, data, "sha512"), child, next_chain)
        if curve != "ed25519":
            order = _ORDERS[curve]
            parent = int.from_bytes(key, "big")
            while True:
                tweak = int.from_bytes(child, "big")
                total = (tweak + parent) % order if tweak < order else 0
                if total != 0:
                    encoded = total.to_bytes(_KEY_SIZE, "big")
                    child[:] = encoded
                    scrub_bytes(encoded)
                    break
                data[0] = 1
                data[1:33] = next_chain
                _split(hmac.digest(chain, data, "sha512"), child, next_chain)
        key[:] = child
        chain[:] = next_chain
    finally:
        wipe(data)
        wipe(child)
        wipe(next_chain)


def slip10_derive(
    curve: str,
    seed: memoryview | bytes,
    path: str | list[int],
    out_key: memoryview,
    out_chain_code: memoryview | None = None,
) -> None:
    """Derive the SLIP-0010 private key (and chain code) at `path` from `seed` into the buffers.

    `curve` is "ed25519", "secp256k1" or "nist256p1"; the seed is 16 to 64 bytes. Ed25519
    allows only hardened steps. The 32-byte key goes to `out_key`, the 32-byte chain code to
    `out_chain_code` when given.
    """
    _check_curve(curve)
    if not isinstance(seed, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"the seed must be bytes or a memoryview, not {type(seed).__name__}.")
    seed_len = seed.nbytes if isinstance(seed, memoryview) else len(seed)
    if not _MIN_SEED <= seed_len <= _MAX_SEED:
        raise InvalidArgument(
            f"a SLIP-0010 seed is {_MIN_SEED} to {_MAX_SEED} bytes long, not {seed_len}."
        )
    steps = _steps(path)
    if curve == "ed25519":
        for n, index in enumerate(steps, start=1):
            if not index & HARDENED:
                raise InvalidArgument(
                    f"ed25519 allows only hardened derivation, and step {n} of the path is "
                    "not hardened."
                )
    key_view = _out_view(out_key, _KEY_SIZE, "the key buffer")
    chain_view = (
        None
        if out_chain_code is None
        else _out_view(out_chain_code, _KEY_SIZE, "the chain code buffer")
    )
    key = bytearray(_KEY_SIZE)
    chain = bytearray(_KEY_SIZE)
    try:
        _master(curve, seed, key, chain)
        for index in steps:
            _child(curve, index, key, chain)
        key_view[:] = key
        if chain_view is not None:
            chain_view[:] = chain
    finally:
        wipe(key)
        wipe(chain)


def slip10_public_key(curve: str, private_key: memoryview | bytes) -> bytes:
    """Public key as in the SLIP-0010 vectors: 0x00 || key for ed25519, compressed SEC1 else."""
    _check_curve(curve)
    if not isinstance(private_key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(
            f"the private key must be bytes or a memoryview, not {type(private_key).__name__}."
        )
    size = private_key.nbytes if isinstance(private_key, memoryview) else len(private_key)
    if size != _KEY_SIZE:
        raise InvalidArgument(f"a {curve} private key is {_KEY_SIZE} bytes long, not {size}.")
    if curve == "ed25519":
        return _ed25519_public(private_key)
    if not 0 < int.from_bytes(private_key, "big") < _ORDERS[curve]:
        raise InvalidArgument(f"the private key is not a valid {curve} scalar.")
    return _ec_public(curve, private_key)
