"""The vault's native EC/RSA key operations (native/keyops.c) against cryptography and openssl.

Keys made by cryptography are imported in every format; the stored material must be the
PKCS#8 cryptography itself writes (snapshots keep their format), signatures must verify
with cryptography and the openssl command, ECDH and RSA-OAEP must agree with cryptography,
and malformed input of any shape must end in InvalidArgument, never a crash.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom.backends.vault import keyops
from strongroom.errors import IntegrityError, InvalidArgument
from strongroom.memory import Guarded
from strongroom.types import KeyType

CURVES = {
    KeyType.ECDSA_P256: (ec.SECP256R1(), hashes.SHA256()),
    KeyType.ECDSA_P384: (ec.SECP384R1(), hashes.SHA384()),
    KeyType.SECP256K1: (ec.SECP256K1(), hashes.SHA256()),
}
_NOENC = serialization.NoEncryption()
_DER, _PEM = serialization.Encoding.DER, serialization.Encoding.PEM
_PKCS8, _TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL


def _material(result: tuple[Guarded, bytes | None]) -> tuple[bytes, bytes | None]:
    """The stored bytes of an import/generate result (test only), closing the buffer."""
    guarded, public = result
    with guarded, guarded.read() as m:
        return bytes(m), public


def _import(key_type: KeyType, data: bytes, fmt: str) -> tuple[bytes, bytes | None]:
    return _material(keyops.import_material(key_type, memoryview(data), fmt))


def _ec_forms(key: ec.EllipticCurvePrivateKey) -> Iterator[tuple[bytes, str]]:
    size = (key.curve.key_size + 7) // 8
    yield key.private_numbers().private_value.to_bytes(size, "big"), "raw"
    for enc, form in ((_DER, _PKCS8), (_DER, _TRAD), (_PEM, _PKCS8), (_PEM, _TRAD)):
        yield key.private_bytes(enc, form, _NOENC), "pem" if enc is _PEM else "der"


@pytest.mark.parametrize("key_type", list(CURVES), ids=lambda t: t.value)
def test_ec_import_sign_agree_export(key_type: KeyType) -> None:
    curve, digest = CURVES[key_type]
    key = ec.generate_private_key(curve)
    pkcs8 = key.private_bytes(_DER, _PKCS8, _NOENC)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    peer = ec.generate_private_key(curve)
    for data, fmt in _ec_forms(key):
        stored, public = _import(key_type, data, fmt)
        assert stored == pkcs8, f"{fmt}: the record format must stay cryptography's PKCS#8"
        assert public == point
    m = memoryview(pkcs8)
    for message in (b"", b"abc", bytes(1000)):
        key.public_key().verify(keyops.sign(key_type, m, message, None), message, ec.ECDSA(digest))
    with keyops.shared_secret(key_type, m, peer.public_key()) as z, z.read() as zv:
        assert bytes(zv) == peer.exchange(ec.ECDH(), key.public_key())
    assert keyops.export(key_type, m, "der") == pkcs8
    assert keyops.export(key_type, m, "pem") == key.private_bytes(_PEM, _PKCS8, _NOENC)
    assert keyops.export(key_type, m, "raw") == next(_ec_forms(key))[0]


def test_p256_known_answer() -> None:
    """RFC 6979 A.2.5: the P-256 key x and its public point U."""
    x = bytes.fromhex("C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721")
    ux = "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6"
    uy = "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299"
    stored, public = _import(KeyType.ECDSA_P256, x, "raw")
    assert public == bytes.fromhex("04" + ux + uy)
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    sig = keyops.sign(KeyType.ECDSA_P256, memoryview(stored), b"sample", None)
    pub.verify(sig, b"sample", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("key_type", [*CURVES, KeyType.RSA_2048], ids=lambda t: t.value)
def test_generated_keys_load_elsewhere(key_type: KeyType) -> None:
    stored, public = _material(keyops.generate(key_type))
    key = serialization.load_der_private_key(stored, None)
    assert public == keyops.public_bytes_of(key_type, key.public_key())
    assert key.private_bytes(_DER, _PKCS8, _NOENC) == stored


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_rsa_import_sign_decrypt(rsa_key: rsa.RSAPrivateKey) -> None:
    pkcs8 = rsa_key.private_bytes(_DER, _PKCS8, _NOENC)
    for enc, form in ((_DER, _PKCS8), (_DER, _TRAD), (_PEM, _PKCS8), (_PEM, _TRAD)):
        stored, public = _import(KeyType.RSA_2048, rsa_key.private_bytes(enc, form, _NOENC), "auto")
        assert stored == pkcs8
        assert public == keyops.public_bytes_of(KeyType.RSA_2048, rsa_key.public_key())
    m, pub = memoryview(pkcs8), rsa_key.public_key()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    for algorithm, pad in (("pkcs1v15", padding.PKCS1v15()), ("pss", pss)):
        pub.verify(
            keyops.sign(KeyType.RSA_2048, m, b"msg", algorithm), b"msg", pad, hashes.SHA256()
        )
    for algorithm, h in (("oaep-sha256", hashes.SHA256()), ("oaep-sha1", hashes.SHA1())):
        ct = pub.encrypt(b"data key", padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
        assert keyops.decrypt(KeyType.RSA_2048, m, ct, b"", algorithm) == b"data key"
        with pytest.raises(IntegrityError):
            keyops.decrypt(KeyType.RSA_2048, m, ct[:-1] + bytes([ct[-1] ^ 1]), b"", algorithm)
    assert keyops.export(KeyType.RSA_2048, m, "pem") == rsa_key.private_bytes(_PEM, _PKCS8, _NOENC)
    with pytest.raises(InvalidArgument):
        _import(KeyType.RSA_3072, pkcs8, "der")  # the wrong size for the key type


def test_sign_digest(rsa_key: rsa.RSAPrivateKey) -> None:
    import hashlib

    pkcs8 = memoryview(rsa_key.private_bytes(_DER, _PKCS8, _NOENC))
    digest = hashlib.sha256(b"prehashed").digest()
    sig = keyops.sign_digest(KeyType.RSA_2048, pkcs8, digest, None)
    assert sig == keyops.sign(KeyType.RSA_2048, pkcs8, b"prehashed", None)  # deterministic
    with pytest.raises(InvalidArgument):
        keyops.sign_digest(KeyType.RSA_2048, pkcs8, digest[:20], None)
    with pytest.raises(InvalidArgument):
        keyops.sign_digest(KeyType.ED25519, pkcs8, digest, None)


def test_sign_a_raw_block(rsa_key: rsa.RSAPrivateKey) -> None:
    """pkcs1v15-raw pads the caller's block as given: over a DigestInfo it is the signature
    cryptography makes of that digest; any other block of up to k - 11 bytes is what the
    public key recovers; a longer or empty one is refused."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from strongroom.algorithms import DIGEST_INFO_PREFIXES, RSA_PKCS1V15_RAW

    pkcs8 = memoryview(rsa_key.private_bytes(_DER, _PKCS8, _NOENC))
    digest = hashlib.sha1(b"raw").digest()
    block = DIGEST_INFO_PREFIXES["sha1"] + digest
    sig = keyops.sign_digest(KeyType.RSA_2048, pkcs8, block, RSA_PKCS1V15_RAW)
    assert sig == rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
    public = rsa_key.public_key()
    for other in (b"\x01" * 36, b"\x00" * 245):
        sig = keyops.sign_digest(KeyType.RSA_2048, pkcs8, other, RSA_PKCS1V15_RAW)
        assert public.recover_data_from_signature(sig, padding.PKCS1v15(), None) == other
    for bad in (b"", b"\x00" * 246):
        with pytest.raises(InvalidArgument):
            keyops.sign_digest(KeyType.RSA_2048, pkcs8, bad, RSA_PKCS1V15_RAW)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("case", ["ecdsa-p256", "ecdsa-p384", "secp256k1", "pkcs1v15", "pss"])
def test_openssl_verifies(case: str, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    if case in ("pkcs1v15", "pss"):
        key_type, key, digest = KeyType.RSA_2048, rsa_key, "-sha256"
    else:
        key_type = KeyType(case)
        key = ec.generate_private_key(CURVES[key_type][0])
        digest = "-sha384" if key_type is KeyType.ECDSA_P384 else "-sha256"
    stored, _ = _import(key_type, key.private_bytes(_DER, _PKCS8, _NOENC), "der")
    message = b"verified by openssl"
    sig = keyops.sign(key_type, memoryview(stored), message, case if key_type.is_rsa else None)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(sig)
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    opts = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
    cmd = ["openssl", "dgst", digest, "-verify", "pub.pem", "-signature", "sig"]
    cmd += [*(opts if case == "pss" else []), "msg"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "Verified OK" in run.stdout, run.stderr


@pytest.mark.parametrize("key_type", [KeyType.ED25519, KeyType.X25519], ids=lambda t: t.value)
def test_25519_pkcs8(key_type: KeyType) -> None:
    cls = ed25519.Ed25519PrivateKey if key_type is KeyType.ED25519 else x25519.X25519PrivateKey
    key = cls.generate()
    for enc, fmt in ((_DER, "der"), (_PEM, "pem")):
        data = key.private_bytes(enc, _PKCS8, _NOENC)
        stored, _ = _import(key_type, data, fmt)
        assert keyops.export(key_type, memoryview(stored), fmt) == data


def _bad(key_type: KeyType, data: bytes, fmt: str = "der") -> None:
    with pytest.raises(InvalidArgument):
        _import(key_type, data, fmt)


def test_malformed_keys_are_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    p256 = KeyType.ECDSA_P256
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    for d in (0, n, n + 1, 2**256 - 1):
        _bad(p256, d.to_bytes(32, "big"), "raw")
    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = key.private_bytes(_DER, _PKCS8, _NOENC)
    _bad(KeyType.ECDSA_P384, pkcs8)  # another curve
    _bad(KeyType.SECP256K1, pkcs8)
    _bad(p256, pkcs8[:-1])  # truncated
    _bad(p256, pkcs8 + b"\x00")  # trailing data
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    wrong_point = other.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    _bad(p256, pkcs8[:-65] + wrong_point)  # the embedded point is not this key's
    _bad(p256, rsa_key.private_bytes(_DER, _PKCS8, _NOENC))
    encrypted = key.private_bytes(_PEM, _PKCS8, serialization.BestAvailableEncryption(b"pw"))
    _bad(p256, encrypted, "pem")
    legacy = key.private_bytes(_PEM, _TRAD, serialization.BestAvailableEncryption(b"pw"))
    _bad(p256, legacy, "pem")
    nums = rsa_key.private_numbers()
    broken = rsa.RSAPrivateNumbers(
        nums.p, nums.q, nums.d, nums.dmp1 ^ 2, nums.dmq1, nums.iqmp, nums.public_numbers
    )
    writer = _TRAD  # PKCS#1 lets the test carry a wrong CRT value through cryptography
    try:
        bad_der = broken.private_key(unsafe_skip_rsa_key_validation=True).private_bytes(
            _DER, writer, _NOENC
        )
    except ValueError:
        pytest.skip("this cryptography refuses to build an inconsistent key")
    _bad(KeyType.RSA_2048, bad_der)


def _valid_inputs() -> list[tuple[KeyType, bytes, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    small = rsa.generate_private_key(65537, 2048)
    return [
        (KeyType.ECDSA_P256, key.private_bytes(_DER, _PKCS8, _NOENC), "der"),
        (KeyType.ECDSA_P256, key.private_bytes(_DER, _TRAD, _NOENC), "der"),
        (KeyType.ECDSA_P256, key.private_bytes(_PEM, _PKCS8, _NOENC), "pem"),
        (KeyType.RSA_2048, small.private_bytes(_DER, _PKCS8, _NOENC), "der"),
        (KeyType.RSA_2048, small.private_bytes(_PEM, _TRAD, _NOENC), "pem"),
        (
            KeyType.ED25519,
            ed25519.Ed25519PrivateKey.generate().private_bytes(_DER, _PKCS8, _NOENC),
            "der",
        ),
    ]


VALID = _valid_inputs()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.integers(0, len(VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 4000),
    noise=st.binary(max_size=64),
)
def test_mutated_der_and_pem_give_typed_errors(
    case: int, edits: list[tuple[int, int]], cut: int, noise: bytes
) -> None:
    key_type, data, fmt = VALID[case]
    mutated = bytearray(data)
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    mutated = mutated[: max(1, cut % (len(mutated) + 1))] + noise if cut % 3 == 0 else mutated
    try:
        _import(key_type, bytes(mutated), fmt)
    except InvalidArgument:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=600), key_type=st.sampled_from(list(CURVES)))
def test_random_bytes_give_typed_errors(data: bytes, key_type: KeyType) -> None:
    for fmt in ("der", "pem"):
        with pytest.raises(InvalidArgument):
            _import(
                key_type, b"-----BEGIN PRIVATE KEY-----\n" + data if fmt == "pem" else data, fmt
            )
