"""The Sign parameters of core/kmip/keyblocks.py: what a client asks is what is signed."""

from __future__ import annotations

import pytest

from strongroom.kmip.keyblocks import KmipFailure, sign_algorithm
from strongroom.kmip.tags import (
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    PaddingMethod,
    ResultReason,
)
from strongroom.types import KeyType


@pytest.mark.parametrize(
    ("padding", "dsa"),
    [
        (PaddingMethod.PSS, DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION),
        (PaddingMethod.PSS, DigitalSignatureAlgorithm.SHA512_WITH_RSA_ENCRYPTION),
        (PaddingMethod.PKCS1V15, DigitalSignatureAlgorithm.RSASSA_PSS),
        (PaddingMethod.OAEP, DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION),
    ],
)
def test_a_padding_that_contradicts_the_signature_algorithm_is_refused(
    padding: int, dsa: int
) -> None:
    with pytest.raises(KmipFailure) as e:
        sign_algorithm(KeyType.RSA_2048, padding, None, dsa)
    assert e.value.reason == ResultReason.FEATURE_NOT_SUPPORTED


def test_a_padding_that_agrees_with_the_signature_algorithm_signs() -> None:
    sha256 = DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION
    assert sign_algorithm(KeyType.RSA_2048, PaddingMethod.PKCS1V15, None, sha256) == "pkcs1v15"
    assert sign_algorithm(KeyType.RSA_2048, None, HashingAlgorithm.SHA_256, sha256) == "pkcs1v15"
    pss = DigitalSignatureAlgorithm.RSASSA_PSS
    assert sign_algorithm(KeyType.RSA_2048, PaddingMethod.PSS, None, pss) == "pss"
