"""Every backend x key type x algorithm that a backend's capabilities list as able to
encrypt must decrypt what it encrypts (issue 13, point 5). Shared by test_encrypt_matrix.py
and test_encrypt_matrix_piv.py.

The matrix is read from `capabilities()` at run time, so a capability added later is tested
without touching this file; a type the helper cannot make a key of fails loudly. The rule:
an explicit algorithm may be refused when encrypting (UnsupportedOperation,
InvalidArgument or PolicyViolation, before anything is made); the default may not; and
whatever encrypts, decrypts, directly and as an envelope KEK.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from strongroom import algorithms
from strongroom.errors import (
    InvalidArgument,
    PolicyViolation,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.keystore import Keystore
from strongroom.types import KeyInfo, KeyType, Operation, Usage

REFUSALS = (UnsupportedOperation, InvalidArgument, PolicyViolation)
"""How an explicit algorithm the key cannot use is refused, at encrypt time (aes-kwp
needs the wrap usage: PolicyViolation)."""


@dataclass
class MatrixResult:
    """What ran: `passed` and `refused` name cases; `failures` say what went wrong."""

    passed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def types_passed(self, backend: str) -> set[str]:
        """The key types whose default (no algorithm) round trip passed, directly."""
        return {
            case.split()[1]
            for case in self.passed
            if case.startswith(f"{backend} ") and case.endswith(" key default")
        }


def encrypting_types(ks: Keystore, backend: str) -> list[KeyType]:
    """The key types the backend's capabilities say it can encrypt with."""
    caps = ks.backend(backend).capabilities()
    return sorted({t for t, op in caps if op is Operation.ENCRYPT}, key=lambda t: t.value)


def _algorithms(caps: frozenset[tuple[KeyType, Operation]], t: KeyType) -> list[str | None]:
    if t.is_rsa:
        return [None, *algorithms.RSA_ENCRYPT_ALGORITHMS]
    out: list[str | None] = [None]
    if (t, Operation.WRAP) in caps and (t, Operation.UNWRAP) in caps:
        out.append(algorithms.AES_KEY_WRAP)
    if t is KeyType.AES_256:
        out.append(algorithms.AES_CBC_PAD)
    return out


def make_key(ks: Keystore, backend: str, name: str, t: KeyType) -> KeyInfo:
    """A key of type `t` in `backend` that may encrypt and decrypt (and wrap, if it can)."""
    b = ks.backend(backend)
    caps = b.capabilities()
    usage = {Usage.ENCRYPT, Usage.DECRYPT}
    if (t, Operation.WRAP) in caps:
        usage |= {Usage.WRAP, Usage.UNWRAP}
    usage &= t.allowed_usage
    if (t, Operation.GENERATE) in caps:
        return ks.generate(name, t, backend=backend, usage=usage)
    # a key the backend derives from one it makes (a FIDO credential's hmac-secret)
    for source in sorted({s for s, op in caps if op is Operation.DERIVE}, key=lambda s: s.value):
        if (source, Operation.GENERATE) in caps:
            ks.generate(f"{name}-src", source, backend=backend, usage="sign,verify,derive")
            return ks.derive(f"{name}-src", name, t, usage=usage)
    if (t, Operation.IMPORT) in caps:
        return ks.import_key(name, t, bytearray(os.urandom(32)), backend=backend, usage=usage)
    raise AssertionError(f"the matrix cannot make a {t.value} key in backend {backend!r}")


def _round_trip(
    ks: Keystore, result: MatrixResult, label: str, name: str, t: KeyType, alg: str | None
) -> None:
    no_aad = (algorithms.AES_KEY_WRAP, algorithms.AES_CBC_PAD)
    aad = b"" if t.is_rsa or alg in no_aad else b"matrix associated data"
    plaintext = os.urandom(32)
    try:
        ct = ks.encrypt(name, plaintext, aad, alg, envelope=True)
    except REFUSALS as e:
        if alg is None:
            result.failures.append(f"{label}: the default is refused: {type(e).__name__}: {e}")
        else:
            result.refused.append(label)
        return
    try:
        out = ks.decrypt(name, ct, aad, alg, envelope=True)
    except StrongroomError as e:
        result.failures.append(f"{label}: encrypted, then decrypt failed: {type(e).__name__}: {e}")
        return
    if out != plaintext:
        result.failures.append(f"{label}: decrypt returned other bytes")
        return
    result.passed.append(label)


def _envelope_round_trip(
    ks: Keystore, result: MatrixResult, label: str, name: str, alg: str | None
) -> None:
    data = os.urandom(3000)
    sealed = io.BytesIO()
    try:
        header = ks.encrypt_stream(name, io.BytesIO(data), sealed, algorithm=alg, chunk_size=1024)
    except REFUSALS as e:
        if alg is None:
            result.failures.append(f"{label}: the default is refused: {type(e).__name__}: {e}")
        else:
            result.refused.append(label)
        return
    out = io.BytesIO()
    try:
        ks.decrypt_stream(io.BytesIO(sealed.getvalue()), out)
    except StrongroomError as e:
        result.failures.append(
            f"{label}: sealed (kek algorithm {header['kek']['algorithm']}), then decrypt "
            f"failed: {type(e).__name__}: {e}"
        )
        return
    if out.getvalue() != data:
        result.failures.append(f"{label}: decrypt returned other bytes")
        return
    result.passed.append(label)


def run_matrix(ks: Keystore, backend: str, result: MatrixResult | None = None) -> MatrixResult:
    """Every encrypting key type of `backend`: each algorithm directly (`key ... ALG`), then
    each envelope KEK algorithm (`envelope ... ALG`). The keys are deleted afterwards."""
    result = result or MatrixResult()
    caps = ks.backend(backend).capabilities()
    for t in encrypting_types(ks, backend):
        name = f"matrix-{backend}-{t.value}"
        try:
            make_key(ks, backend, name, t)
        except StrongroomError as e:
            result.failures.append(
                f"{backend} {t.value}: listed as able to encrypt, but no key could be made: "
                f"{type(e).__name__}: {e}"
            )
            continue
        for alg in _algorithms(caps, t):
            label = f"{backend} {t.value} key {alg or 'default'}"
            _round_trip(ks, result, label, name, t, alg)
        for alg in (None, *algorithms.KEK_ALGORITHMS):
            label = f"{backend} {t.value} envelope {alg or 'default'}"
            _envelope_round_trip(ks, result, label, name, alg)
        for info in ks.keys():
            if info.name.startswith(name):
                ks.delete(info.name)
    return result


__all__ = ["MatrixResult", "encrypting_types", "make_key", "run_matrix"]
