"""Key versions and envelope encryption on a TPM (swtpm through tpm2-pytss): rotation round
trips, and an RSA key in the TPM as the envelope KEK (RSA-OAEP)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm_support import PIN_ENV, TEST_PIN, VAULT_PASS, VAULT_PASS_ENV, Swtpm, swtpm, write_config

import strongroom
from strongroom import envelope
from strongroom.errors import DataTruncated, UnsupportedOperation, VersionRetired
from strongroom.keystore import Keystore
from strongroom.types import KeyType, Operation

__all__ = ["swtpm"]  # the session fixture, imported so pytest finds it


@pytest.fixture
def ks(tmp_path: Path, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Keystore]:
    monkeypatch.setenv(PIN_ENV, TEST_PIN)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASS)
    with strongroom.open(write_config(tmp_path, swtpm.tcti)) as keystore:
        yield keystore
    assert swtpm.transient_handles() == []


def test_rotation_round_trips_in_the_tpm(ks: Keystore) -> None:
    ks.generate("t-ec", "ecdsa-p256", backend="tpm")
    sigs = {1: ks.sign("t-ec", b"msg", envelope=True)}
    for v in (2, 3):
        assert ks.rotate("t-ec").version == v
        sigs[v] = ks.sign("t-ec", b"msg", envelope=True)
    assert {v.backend for v in ks.versions("t-ec")} == {"tpm"}
    for sig in sigs.values():
        ks.verify("t-ec", b"msg", sig, envelope=True)
    ks.set_min_decryption_version("t-ec", 3)
    with pytest.raises(VersionRetired):
        ks.verify("t-ec", b"msg", sigs[2], envelope=True)
    assert ks.backend("tpm").supports(KeyType.AES_256, Operation.GENERATE)  # swtpm has AES
    ks.generate("t-aes", "aes-256", backend="tpm")
    ct1 = ks.encrypt("t-aes", b"first", b"a", envelope=True)
    ks.rotate("t-aes")
    ct2 = ks.encrypt("t-aes", b"second", b"a", envelope=True)
    assert ks.decrypt("t-aes", ct1, b"a", envelope=True) == b"first"
    assert ks.decrypt("t-aes", ct2, b"a", envelope=True) == b"second"
    assert ks.decrypt("t-aes", ks.rewrap("t-aes", ct1, b"a"), b"a", envelope=True) == b"first"
    ks.delete("t-aes")
    ks.delete("t-ec")
    # a backend that cannot hold the type: a clear error, and the key is unchanged
    ks.generate("t-ed", "ed25519")
    with pytest.raises(UnsupportedOperation, match="'tpm'"):
        ks.rotate("t-ed", backend="tpm")
    assert [(v.version, v.backend) for v in ks.versions("t-ed")] == [(1, "vault")]


def test_tpm_rsa_key_as_envelope_kek_across_a_rotation(ks: Keystore) -> None:
    ks.generate("t-kek", "rsa-2048", backend="tpm", usage="encrypt,decrypt")
    data = os.urandom(150_000)
    old = io.BytesIO()
    ks.encrypt_stream("t-kek", io.BytesIO(data), old, chunk_size=4096)
    ks.rotate("t-kek")
    new = io.BytesIO()
    header = ks.encrypt_stream("t-kek", io.BytesIO(data), new)
    assert header["kek"]["version"] == 2 and header["kek"]["type"] == "rsa-2048"
    for blob in (old.getvalue(), new.getvalue()):
        out = io.BytesIO()
        ks.decrypt_stream(io.BytesIO(blob), out)
        assert out.getvalue() == data
    moved = io.BytesIO()
    envelope.rewrap_stream(ks, io.BytesIO(old.getvalue()), moved)
    ks.set_min_decryption_version("t-kek", 2)
    out = io.BytesIO()
    ks.decrypt_stream(io.BytesIO(moved.getvalue()), out)
    assert out.getvalue() == data
    with pytest.raises(DataTruncated):
        ks.decrypt_stream(io.BytesIO(moved.getvalue()[: -(len(data) % 4096 + 16)]), io.BytesIO())
    ks.delete("t-kek")
