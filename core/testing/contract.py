"""The backend contract: what every backend must do, checked through the key API.

The suite is typed against `KeyAPI`, so it runs unchanged through a `Keystore` and through
`strongroom.connect()` (tests/service/test_server.py runs it over both of the service's transports).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from strongroom import algorithms
from strongroom.api import KeyAPI
from strongroom.errors import (
    CertificateMismatch,
    DataFormatError,
    IntegrityError,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    UnsupportedOperation,
    VersionRetired,
)
from strongroom.types import KeyType, Operation, Usage

_counter = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


def _independent_verify(key_type: KeyType, public: Any, data: bytes, sig: bytes) -> None:
    """Verify with `cryptography` directly, not through Strongroom's own helpers."""
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, data)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        digest = hashes.SHA384() if key_type is KeyType.ECDSA_P384 else hashes.SHA256()
        public.verify(sig, data, ec.ECDSA(digest))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    else:  # pragma: no cover - contract misuse
        raise AssertionError(f"no independent verifier for {key_type}")


class BackendContract:
    """Subclass and provide the `keystore` and `backend_name` fixtures."""

    @pytest.fixture
    def keystore(self) -> KeyAPI:  # pragma: no cover - must be overridden
        raise NotImplementedError("provide a keystore fixture")

    @pytest.fixture
    def backend_name(self) -> str:  # pragma: no cover - must be overridden
        raise NotImplementedError("provide a backend_name fixture")

    # -- helpers -------------------------------------------------------------------------------
    def independent_verify(self, key_type: KeyType, public: Any, data: bytes, sig: bytes) -> None:
        """Check a signature without Strongroom's own code. A backend whose signatures are
        structures (FIDO assertions) overrides this with a verifier for them."""
        _independent_verify(key_type, public, data, sig)

    @staticmethod
    def caps(ks: KeyAPI, backend: str) -> frozenset[tuple[KeyType, Operation]]:
        return {s.name: s for s in ks.backends()}[backend].capabilities

    can_adopt = False
    """Set by the suite of a backend that implements `adopt` (it then overrides `adoptable`)."""

    def adoptable(self, keystore: KeyAPI, backend_name: str) -> dict[str, str] | None:
        """The `ref` of a key made in the backend outside Strongroom, for `test_adopt`; None
        when the test cannot make one (the default)."""
        return None

    def types_for(self, ks: KeyAPI, backend: str, *ops: Operation) -> list[KeyType]:
        caps = self.caps(ks, backend)
        return sorted(
            (t for t in KeyType if all((t, op) in caps for op in ops)), key=lambda t: t.value
        )

    # -- the contract --------------------------------------------------------------------------
    def test_available_with_capabilities(self, keystore: KeyAPI, backend_name: str) -> None:
        status = {s.name: s for s in keystore.backends()}[backend_name]
        assert status.available, status.reason
        assert status.capabilities, "an available backend must be able to do something"

    def test_generate_each_supported_type(self, keystore: KeyAPI, backend_name: str) -> None:
        for key_type in self.types_for(keystore, backend_name, Operation.GENERATE):
            name = _name(f"gen-{key_type.value}")
            info = keystore.generate(name, key_type, backend=backend_name)
            assert info.backend == backend_name and info.namespace == keystore.namespace
            assert info.type is key_type
            assert info.usage == key_type.default_usage
            assert keystore.info(name) == info
            if key_type.is_asymmetric:
                from strongroom.algorithms import public_key_matches

                assert public_key_matches(key_type, keystore.public_key(name))

    def test_sign_and_verify(self, keystore: KeyAPI, backend_name: str) -> None:
        for key_type in self.types_for(keystore, backend_name, Operation.GENERATE, Operation.SIGN):
            name = _name(f"sig-{key_type.value}")
            keystore.generate(name, key_type, backend=backend_name)
            data = b"the contract suite signs this"
            sig = keystore.sign(name, data)
            keystore.verify(name, data, sig)
            with pytest.raises(InvalidSignature):
                keystore.verify(name, data + b"!", sig)
            with pytest.raises(InvalidSignature):
                keystore.verify(name, data, bytes([sig[0] ^ 1]) + sig[1:])
            if key_type.is_asymmetric:
                self.independent_verify(key_type, keystore.public_key(name), data, sig)
            if key_type.is_rsa:
                pss = keystore.sign(name, data, algorithm="pss")
                rsa_public = keystore.public_key(name)
                assert isinstance(rsa_public, rsa.RSAPublicKey)
                rsa_public.verify(
                    pss,
                    data,
                    padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                    hashes.SHA256(),
                )
                # SSH's rsa-sha2-512 (RFC 8332), which ssh and `ssh-keygen -Y sign` ask for
                sha512 = keystore.sign(name, data, algorithm="pkcs1v15-sha512")
                rsa_public.verify(sha512, data, padding.PKCS1v15(), hashes.SHA512())
                keystore.verify(name, data, sha512, algorithm="pkcs1v15-sha512")
                with pytest.raises(InvalidSignature):  # not the SHA-256 signature
                    keystore.verify(name, data, sha512)
            self.check_prehashed(keystore, name, key_type, data, sig)

    def test_private_key(self, keystore: KeyAPI, backend_name: str) -> None:
        """A signing key is a `cryptography` private key that cryptography's own X.509
        builder signs with (docs/x509.md); one key per family, the smallest RSA only."""
        families: dict[str, KeyType] = {}
        for key_type in self.types_for(keystore, backend_name, Operation.GENERATE, Operation.SIGN):
            if key_type.is_fido:
                family = "fido"
            elif key_type.is_rsa:
                family = "rsa"
            elif key_type.is_ecdsa:
                family = "ecdsa"
            else:
                family = key_type.value
            families.setdefault(family, key_type)
        for key_type in families.values():
            name = _name(f"pkey-{key_type.value}")
            keystore.generate(name, key_type, backend=backend_name)
            if key_type.is_fido:
                with pytest.raises(UnsupportedOperation):
                    keystore.private_key(name)
                continue
            if not key_type.is_asymmetric:
                with pytest.raises(InvalidArgument):
                    keystore.private_key(name)
                continue
            key = keystore.private_key(name)
            assert isinstance(
                key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
            )
            der = serialization.Encoding.DER
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            public = keystore.public_key(name)
            assert key.public_key().public_bytes(der, spki) == public.public_bytes(der, spki)
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            digest: Any = None
            if algorithms.signs_digests(key_type):
                digest = hashes.SHA384() if key_type is KeyType.ECDSA_P384 else hashes.SHA256()
            csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, digest)
            assert csr.is_signature_valid
            assert csr.public_key().public_bytes(der, spki) == public.public_bytes(der, spki)

    def test_certificate(self, keystore: KeyAPI, backend_name: str) -> None:
        """A certificate of the key is kept with it; one of another key is refused."""
        types = [
            t
            for t in self.types_for(keystore, backend_name, Operation.GENERATE, Operation.SIGN)
            if t.is_asymmetric and not t.is_fido
        ]
        if not types:
            pytest.skip("backend makes no key that signs certificates")
        key_type = types[0]
        name, other = _name(f"cert-{key_type.value}"), _name(f"cert-{key_type.value}")
        keystore.generate(name, key_type, backend=backend_name)
        keystore.generate(other, key_type, backend=backend_name)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        digest: Any = None
        if algorithms.signs_digests(key_type):
            digest = hashes.SHA384() if key_type is KeyType.ECDSA_P384 else hashes.SHA256()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(keystore.private_key(name).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(keystore.private_key(name), digest)
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        assert keystore.set_certificate(name, pem) == [cert]
        assert keystore.certificate(name) == [cert]
        with pytest.raises(CertificateMismatch):
            keystore.set_certificate(other, pem)
        keystore.delete(name)

    def check_prehashed(
        self, keystore: KeyAPI, name: str, key_type: KeyType, data: bytes, sig: bytes
    ) -> None:
        """ECDSA and RSA sign a digest made by the caller into the signature the whole message
        gets; other types refuse a digest rather than sign it as a message."""
        if not algorithms.signs_digests(key_type):
            with pytest.raises(InvalidArgument):
                keystore.sign(name, bytes(32), prehashed=True)
            with pytest.raises(InvalidArgument):
                keystore.verify(name, bytes(32), sig, prehashed=True)
            return
        digest = hashlib.new(algorithms.hash_name(key_type), data).digest()
        from_digest = keystore.sign(name, digest, prehashed=True)
        self.independent_verify(key_type, keystore.public_key(name), data, from_digest)
        keystore.verify(name, digest, sig, prehashed=True)
        keystore.verify(name, data, from_digest)
        with pytest.raises(InvalidSignature):
            keystore.verify(name, bytes([digest[0] ^ 1]) + digest[1:], sig, prehashed=True)
        with pytest.raises(InvalidArgument):  # a digest of the wrong length is no digest
            keystore.sign(name, digest[:-1], prehashed=True)
        if key_type.is_rsa:
            pss = keystore.sign(name, digest, algorithm="pss", prehashed=True)
            keystore.verify(name, data, pss, algorithm="pss")
            sha512 = hashlib.sha512(data).digest()
            with pytest.raises(InvalidArgument):  # a SHA-256 digest is not a SHA-512 one
                keystore.sign(name, digest, algorithm="pkcs1v15-sha512", prehashed=True)
            from_512 = keystore.sign(name, sha512, algorithm="pkcs1v15-sha512", prehashed=True)
            keystore.verify(name, data, from_512, algorithm="pkcs1v15-sha512")
            self.check_raw_block(keystore, name, data)

    def check_raw_block(self, keystore: KeyAPI, name: str, data: bytes) -> None:
        """pkcs1v15-raw (PKCS#11's CKM_RSA_PKCS): a DigestInfo the caller built, in a hash
        the other algorithms do not name (SHA-1), is signed as that hash's PKCS#1 v1.5
        signature; another block is signed as given or refused (UnsupportedOperation), never
        signed as something else; and the algorithm is prehashed only."""
        raw = algorithms.RSA_PKCS1V15_RAW
        sha1 = hashlib.sha1(data).digest()  # noqa: S324 - a hash a PKCS#11 client may choose
        block = algorithms.DIGEST_INFO_PREFIXES["sha1"] + sha1
        signature = keystore.sign(name, block, algorithm=raw, prehashed=True)
        public = keystore.public_key(name)
        assert isinstance(public, rsa.RSAPublicKey)
        sha1_hash = Prehashed(hashes.SHA1())  # noqa: S303 - checking, not choosing, SHA-1
        public.verify(signature, sha1, padding.PKCS1v15(), sha1_hash)
        keystore.verify(name, block, signature, algorithm=raw, prehashed=True)
        with pytest.raises(InvalidSignature):
            keystore.verify(name, block[:-1] + b"\0", signature, algorithm=raw, prehashed=True)
        with pytest.raises(InvalidArgument):
            keystore.sign(name, block, algorithm=raw)  # not prehashed: refused, not hashed
        other = bytes(range(1, 37))  # no DigestInfo
        try:
            signed = keystore.sign(name, other, algorithm=raw, prehashed=True)
        except UnsupportedOperation:
            return
        assert public.recover_data_from_signature(signed, padding.PKCS1v15(), None) == other

    def test_encrypt_and_decrypt(self, keystore: KeyAPI, backend_name: str) -> None:
        types = self.types_for(keystore, backend_name, Operation.GENERATE, Operation.DECRYPT)
        for key_type in types:
            name = _name(f"enc-{key_type.value}")
            usage = {Usage.ENCRYPT, Usage.DECRYPT}
            keystore.generate(name, key_type, backend=backend_name, usage=usage)
            aad = b"" if key_type.is_rsa else b"header"
            ct = keystore.encrypt(name, b"secret message", aad=aad)
            assert b"secret message" not in ct
            assert keystore.decrypt(name, ct, aad=aad) == b"secret message"
            with pytest.raises(IntegrityError):
                keystore.decrypt(name, ct[:-1] + bytes([ct[-1] ^ 1]), aad=aad)
            if not key_type.is_rsa:
                with pytest.raises(IntegrityError):
                    keystore.decrypt(name, ct, aad=b"other header")

    def test_usage_is_enforced(self, keystore: KeyAPI, backend_name: str) -> None:
        signers = self.types_for(keystore, backend_name, Operation.GENERATE, Operation.SIGN)
        if not signers:
            pytest.skip("backend generates no signing keys")
        name = _name("sign-only")
        keystore.generate(name, signers[0], backend=backend_name, usage={Usage.SIGN})
        with pytest.raises(PolicyViolation):
            keystore.decrypt(name, b"\0" * 64)
        with pytest.raises(PolicyViolation):
            keystore.verify(name, b"x", b"\0" * 64)

    def test_unsupported_type_is_refused_by_name(self, keystore: KeyAPI, backend_name: str) -> None:
        unsupported = [
            t
            for t in KeyType
            if (t, Operation.GENERATE) not in self.caps(keystore, backend_name)
            and t is not KeyType.SEED
        ]
        if not unsupported:
            pytest.skip("backend generates every key type")
        with pytest.raises(UnsupportedOperation) as err:
            keystore.generate(_name("nope"), unsupported[0], backend=backend_name)
        assert err.value.backend == backend_name
        assert err.value.key_type == unsupported[0].value
        assert backend_name in str(err.value) and unsupported[0].value in str(err.value)

    def test_names_are_unique(self, keystore: KeyAPI, backend_name: str) -> None:
        key_type = self.types_for(keystore, backend_name, Operation.GENERATE)[0]
        name = _name("unique")
        keystore.generate(name, key_type, backend=backend_name)
        before = len(keystore.keys())
        with pytest.raises(KeyExists):
            keystore.generate(name, key_type, backend=backend_name)
        assert len(keystore.keys()) == before

    def test_delete(self, keystore: KeyAPI, backend_name: str) -> None:
        key_type = self.types_for(keystore, backend_name, Operation.GENERATE)[0]
        name = _name("doomed")
        keystore.generate(name, key_type, backend=backend_name)
        keystore.delete(name)
        with pytest.raises(KeyNotFound):
            keystore.info(name)
        with pytest.raises(KeyNotFound):
            keystore.delete(name)
        assert name not in {k.name for k in keystore.keys()}

    def test_bad_names_and_usages(self, keystore: KeyAPI, backend_name: str) -> None:
        key_type = self.types_for(keystore, backend_name, Operation.GENERATE)[0]
        with pytest.raises(InvalidArgument):
            keystore.generate("", key_type, backend=backend_name)
        with pytest.raises(InvalidArgument):
            keystore.generate("../etc", key_type, backend=backend_name)
        with pytest.raises(InvalidArgument):
            keystore.generate(_name("u"), key_type, backend=backend_name, usage=["fly"])

    def test_random(self, keystore: KeyAPI, backend_name: str) -> None:
        try:
            a = keystore.random(32, backend=backend_name)
        except UnsupportedOperation:
            pytest.skip("backend has no random generator")
        b = keystore.random(32, backend=backend_name)
        assert len(a) == len(b) == 32 and a != b

    def test_agree(self, keystore: KeyAPI, backend_name: str) -> None:
        for key_type in self.types_for(keystore, backend_name, Operation.GENERATE, Operation.AGREE):
            name = _name(f"agree-{key_type.value}")
            keystore.generate(name, key_type, backend=backend_name, usage={Usage.AGREE})
            peer: Any
            if key_type is KeyType.X25519:
                peer = x25519.X25519PrivateKey.generate()
            else:
                from strongroom.algorithms import CURVES

                peer = ec.generate_private_key(CURVES[key_type])
            target = self.agreement_target(keystore, backend_name)
            new = keystore.agree(name, peer.public_key(), _name("agreed"), target)
            assert new.backend == backend_name and new.type is target
            if target is KeyType.HMAC_SHA256:
                keystore.verify(new.name, b"agreed", keystore.sign(new.name, b"agreed"))
            else:
                ct = keystore.encrypt(new.name, b"agreed")
                assert keystore.decrypt(new.name, ct) == b"agreed"

    def test_exchange(self, keystore: KeyAPI, backend_name: str) -> None:
        """The raw shared secret equals the peer's own view of it (cryptography's exchange),
        through KeyAPI and through the key as a `cryptography` private key."""
        for key_type in self.types_for(keystore, backend_name, Operation.GENERATE, Operation.AGREE):
            name = _name(f"exchange-{key_type.value}")
            keystore.generate(name, key_type, backend=backend_name, usage={Usage.AGREE})
            ours = keystore.public_key(name)
            if key_type is KeyType.X25519:
                x_peer = x25519.X25519PrivateKey.generate()
                assert isinstance(ours, x25519.X25519PublicKey)
                expected = x_peer.exchange(ours)
                assert keystore.exchange(name, x_peer.public_key()) == expected
                continue
            from strongroom.algorithms import CURVES

            peer = ec.generate_private_key(CURVES[key_type])
            assert isinstance(ours, ec.EllipticCurvePublicKey)
            expected = peer.exchange(ec.ECDH(), ours)
            assert keystore.exchange(name, peer.public_key()) == expected
            key = keystore.private_key(name)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert key.exchange(ec.ECDH(), peer.public_key()) == expected
            signer = _name(f"exchange-sign-{key_type.value}")
            keystore.generate(signer, key_type, backend=backend_name, usage={Usage.SIGN})
            with pytest.raises(PolicyViolation):
                keystore.exchange(signer, peer.public_key())

    def agreement_target(self, keystore: KeyAPI, backend_name: str) -> KeyType:
        """The symmetric type `agree` makes in this backend: the first it can generate."""
        caps = self.caps(keystore, backend_name)
        for target in (KeyType.AES_256, KeyType.CHACHA20_POLY1305, KeyType.HMAC_SHA256):
            if (target, Operation.GENERATE) in caps:
                return target
        pytest.skip("the backend agrees into no symmetric key type it can generate")

    def test_wrap_and_unwrap(self, keystore: KeyAPI, backend_name: str) -> None:
        needed = {(KeyType.AES_256, op) for op in (Operation.GENERATE, Operation.WRAP)}
        needed.add((KeyType.AES_256, Operation.UNWRAP))
        if not needed <= self.caps(keystore, backend_name):
            pytest.skip("backend wraps no keys with AES-256")
        kek = _name("kek")
        keystore.generate(kek, KeyType.AES_256, backend=backend_name, usage="wrap,unwrap")
        movable, fixed = _name("movable"), _name("fixed")
        keystore.generate(movable, KeyType.AES_256, backend=backend_name, exportable=True)
        keystore.generate(fixed, KeyType.AES_256, backend=backend_name)
        blob = keystore.wrap(kek, movable)
        moved = keystore.unwrap(kek, blob, _name("moved"), KeyType.AES_256)
        assert moved.backend == backend_name and moved.type is KeyType.AES_256
        assert not moved.exportable
        ct = keystore.encrypt(movable, b"the same key", aad=b"a")
        assert keystore.decrypt(moved.name, ct, aad=b"a") == b"the same key"
        with pytest.raises(PolicyViolation):  # only an exportable key may leave, even wrapped
            keystore.wrap(kek, fixed)
        broken = _name("broken")
        with pytest.raises(IntegrityError):
            keystore.unwrap(kek, blob[:-1] + bytes([blob[-1] ^ 1]), broken, KeyType.AES_256)
        assert broken not in {k.name for k in keystore.keys()}

    def test_rewrap_moves_a_ciphertext_to_the_new_version(
        self, keystore: KeyAPI, backend_name: str
    ) -> None:
        types = self.types_for(
            keystore, backend_name, Operation.GENERATE, Operation.ENCRYPT, Operation.DECRYPT
        )
        if not types:
            pytest.skip("backend encrypts with no key type it generates")
        key_type = types[0]
        name = _name(f"rewrap-{key_type.value}")
        keystore.generate(name, key_type, backend=backend_name, usage="encrypt,decrypt")
        aad = b"" if key_type.is_rsa else b"header"
        old = keystore.encrypt(name, b"kept across versions", aad=aad, envelope=True)
        assert keystore.rotate(name).version == 2
        new = keystore.rewrap(name, old, aad)
        keystore.set_min_decryption_version(name, 2)
        assert keystore.decrypt(name, new, aad=aad, envelope=True) == b"kept across versions"
        with pytest.raises(VersionRetired):
            keystore.decrypt(name, old, aad=aad, envelope=True)
        with pytest.raises(VersionRetired):  # rewrap decrypts first: the same rule
            keystore.rewrap(name, old, aad)
        with pytest.raises(DataFormatError):
            keystore.rewrap(name, b"not a versioned ciphertext", aad)

    def test_attest(self, keystore: KeyAPI, backend_name: str) -> None:
        """A backend attests its keys with a statement that verifies, or refuses by name."""
        from strongroom.keystore import verify_attestation

        key_type = self.types_for(keystore, backend_name, Operation.GENERATE)[0]
        name = _name(f"attest-{key_type.value}")
        keystore.generate(name, key_type, backend=backend_name)
        nonce = b"contract suite nonce"
        try:
            statement = keystore.attest(name, nonce)
        except UnsupportedOperation as e:
            assert (e.backend, e.operation) == (backend_name, "attest")
            return
        verify_attestation(statement, nonce)
        with pytest.raises(InvalidArgument):
            keystore.attest(name, bytes(65))
        with pytest.raises(KeyNotFound):
            keystore.attest(_name("absent"), nonce)

    def test_adopt(self, keystore: KeyAPI, backend_name: str) -> None:
        """A key made outside Strongroom is registered once, and delete only forgets it."""
        ref = self.adoptable(keystore, backend_name)
        name = _name("adopted")
        if ref is None and self.can_adopt:
            pytest.skip("this suite makes no key outside Strongroom to adopt")
        if ref is None:
            with pytest.raises(UnsupportedOperation) as err:
                keystore.adopt(name, backend_name, {"label": "anything"})
            assert (err.value.backend, err.value.operation) == (backend_name, "adopt")
            assert name not in {k.name for k in keystore.keys()}
            return
        info = keystore.adopt(name, backend_name, ref)
        assert info.backend == backend_name and keystore.info(name) == info
        if Usage.SIGN in info.usage:
            keystore.verify(name, b"adopted", keystore.sign(name, b"adopted"))
        with pytest.raises(InvalidArgument, match="already registered"):
            keystore.adopt(_name("twice"), backend_name, ref)
        with pytest.raises(KeyExists):
            keystore.adopt(name, backend_name, ref)
        keystore.delete(name)  # forgets the key; the backend keeps it
        again = keystore.adopt(_name("again"), backend_name, ref)
        assert again.type is info.type
        keystore.delete(again.name)
