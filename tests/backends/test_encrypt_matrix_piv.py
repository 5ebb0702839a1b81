"""The encryption matrix of tests/encrypt_matrix.py against the PIV backend (issue 13,
point 5): PIV lists RSA-2048 encrypt/decrypt (the raw RSA operation on the card, OAEP
decoded on the host). Kept apart from test_encrypt_matrix.py because it needs the
machine's one pcscd and the emulated card in the vpcd reader.
"""

from __future__ import annotations

from pathlib import Path

import pcsc_support
import pytest
from encrypt_matrix import encrypting_types, run_matrix
from piv_card import DEFAULT_PIN
from piv_support import (
    PIV_PIN_ENV,
    PIV_VAULT_PASS,
    PIV_VAULT_PASS_ENV,
    PivReader,
    piv_reader,
    reader,
    write_piv_config,
)

import strongroom

__all__ = ["piv_reader", "reader"]  # fixtures, imported so pytest finds them

_missing = pcsc_support.pcsc_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")


def test_every_listed_piv_encryption_decrypts(
    tmp_path: Path, reader: PivReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIV_VAULT_PASS_ENV, PIV_VAULT_PASS)
    monkeypatch.setenv(PIV_PIN_ENV, DEFAULT_PIN)
    with strongroom.open(write_piv_config(tmp_path / "ks", reader.name)) as ks:
        listed = {t.value for t in encrypting_types(ks, "piv")}
        assert "rsa-2048" in listed, sorted(listed)
        result = run_matrix(ks, "piv")
        assert not result.failures, "\n".join(result.failures)
        assert result.types_passed("piv") == listed
        # the card's raw RSA with host-side OAEP decodes either variant
        assert "piv rsa-2048 key oaep-sha1" in result.passed
        assert "piv rsa-2048 key oaep-sha256" in result.passed
        assert "piv rsa-2048 envelope default" in result.passed
