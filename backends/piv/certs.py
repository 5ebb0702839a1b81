"""The certificates in a PIV card's slots: reading them, telling which key a slot holds,
and writing the self-signed certificate of a new key.

`PivCertificates` is a mixin of `PivBackend`. A slot's certificate marks it as taken; its
subject (CN = key name, O = Strongroom) tells which key the slot holds, so a catalog key
is checked against it before the card uses or deletes it. Certificates are read once per
session (`_certs`), and a key once checked is remembered (`_checked_keys`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from strongroom import algorithms as sr_algorithms
from strongroom.backend import BackendContext
from strongroom.errors import BackendUnavailable, CertificateMismatch, StrongroomError
from strongroom.types import KeyInfo, KeyType

from . import encoding
from .card import PcscCard, find_tag, tlv
from .slots import KEY_ALGS, SLOT_OBJECTS, _slot_name, parse_slot

T = TypeVar("T")

CERT_KEY_ATTRIBUTE = "piv_public_key_sha256"
"""Catalog attribute of a PIV key whose slot certificate `key cert set` replaced: the
SHA-256 of its SubjectPublicKeyInfo. The new certificate no longer names the key
(CN = key name, O = Strongroom), so this is how the key is still known on its card."""


def public_key_sha256(public: PublicKeyTypes) -> str:
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class PivCertificates:
    """Mixin of `PivBackend`: the slots' certificates."""

    if TYPE_CHECKING:  # PivBackend's, and Backend's
        name: str
        context: BackendContext
        _certs: dict[int, x509.Certificate | None]
        _checked_keys: dict[str, tuple[str, int, x509.Certificate]]

        def _private_op(
            self, card: PcscCard, slot: int, alg: int, data: bytes, tag: int = 0x81
        ) -> bytes: ...
        def _mgmt_auth(self, card: PcscCard) -> None: ...
        def _run(self, fn: Callable[[PcscCard], T]) -> T: ...
        def _run_held(self, fn: Callable[[PcscCard], T]) -> T: ...

    def _cert(self, card: PcscCard, slot: int) -> x509.Certificate | None:
        if slot in self._certs:
            return self._certs[slot]
        contents = card.get_data(SLOT_OBJECTS[slot])
        cert = None
        if contents:
            try:
                der = find_tag(contents, 0x70)
                info = dict((t, v) for t, v in _tlvs(contents))
                if info.get(0x71, b"\x00") != b"\x00":
                    raise ValueError("compressed certificate")
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise StrongroomError(
                    f"the certificate object of PIV slot {_slot_name(slot)} is malformed or "
                    "compressed; Strongroom leaves that slot alone"
                ) from None
        self._certs[slot] = cert
        return cert

    @staticmethod
    def _subject(cert: x509.Certificate) -> str:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else cert.subject.rfc4514_string()

    def _owned(self, cert: x509.Certificate) -> bool:
        """Whether this keystore wrote the certificate (O = Strongroom, OU = its store id)."""
        owner = self.context.owner
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        unit = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        return (
            bool(owner)
            and bool(org)
            and org[0].value == encoding.CERT_ORGANIZATION
            and bool(unit)
            and unit[0].value == encoding.OWNER_PREFIX + owner.hex()
        )

    @staticmethod
    def _ours(cert: x509.Certificate, name: str) -> bool:
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return (
            bool(org)
            and org[0].value == encoding.CERT_ORGANIZATION
            and bool(cn)
            and cn[0].value == name
        )

    def _holds(self, cert: x509.Certificate, info: KeyInfo) -> bool:
        """Whether a slot's certificate is the catalog key's: ours (named for it), or the
        one `key cert set` wrote (its public key recorded with the key)."""
        if self._ours(cert, info.name):
            return True
        recorded = info.attributes.get(CERT_KEY_ATTRIBUTE)
        return recorded is not None and recorded == public_key_sha256(cert.public_key())

    def _key_cert(self, card: PcscCard, info: KeyInfo) -> tuple[int, x509.Certificate]:
        """The slot and certificate of a catalog key, checked to be that key on this card."""
        known = self._checked_keys.get(info.handle)
        if known is not None and known[0] == info.name:
            return known[1], known[2]
        slot = parse_slot(info.handle)
        cert = self._cert(card, slot)
        where = f"slot {_slot_name(slot)} of the PIV card in {card.reader!r}"
        if cert is None:
            raise BackendUnavailable(
                self.name,
                f"{where} holds no key for {info.name!r}: is this the card the key was made on?",
            )
        if info.attributes.get("adopted") != "true" and not self._holds(cert, info):
            raise BackendUnavailable(
                self.name,
                f"{where} holds {self._subject(cert)!r}, not key {info.name!r}: is this the "
                "card the key was made on?",
            )
        if not sr_algorithms.public_key_matches(info.type, cert.public_key()):
            raise BackendUnavailable(self.name, f"{where} holds no {info.type.value} key")
        self._checked_keys[info.handle] = (info.name, slot, cert)
        return slot, cert

    def store_certificate(
        self, info: KeyInfo, chain: Sequence[x509.Certificate]
    ) -> Mapping[str, str]:
        """PUT DATA of the leaf into the key's slot object, in place of the certificate there
        (after mutual authentication with the management key), as `generate` writes one."""
        leaf = chain[0]
        fingerprint = public_key_sha256(leaf.public_key())

        def op(card: PcscCard) -> None:
            slot, old = self._key_cert(card, info)
            if public_key_sha256(old.public_key()) != fingerprint:
                raise CertificateMismatch(
                    f"the certificate's public key is not the one in PIV slot {_slot_name(slot)}"
                )
            self._mgmt_auth(card)
            self._put_cert(card, slot, leaf)
            self._checked_keys[info.handle] = (info.name, slot, leaf)

        self._run_held(op)
        return {CERT_KEY_ATTRIBUTE: fingerprint}

    def stored_certificate(self, info: KeyInfo) -> x509.Certificate | None:
        """The certificate in the key's slot object (GET DATA; cached per connection)."""
        return self._run(lambda card: self._key_cert(card, info)[1])

    def _put_cert(self, card: PcscCard, slot: int, cert: x509.Certificate) -> None:
        der = cert.public_bytes(serialization.Encoding.DER)
        card.put_data(SLOT_OBJECTS[slot], tlv(0x70, der) + tlv(0x71, b"\x00") + tlv(0xFE, b""))
        self._certs[slot] = cert

    def _write_cert(
        self,
        card: PcscCard,
        slot: int,
        key_type: KeyType,
        public: PublicKeyTypes,
        name: str,
        usage: frozenset[str],
    ) -> x509.Certificate:
        alg = KEY_ALGS[key_type]

        def sign_tbs(tbs: bytes, digest: hashes.HashAlgorithm) -> bytes:
            h = hashes.Hash(digest)
            h.update(tbs)
            d = h.finalize()
            if key_type is KeyType.RSA_2048:
                block = encoding.pkcs1v15_block(d, 256)
            else:
                block = d
            return self._private_op(card, slot, alg, block)

        owner = self.context.owner.hex()
        cert = encoding.self_signed_certificate(public, name, usage, sign_tbs, owner)
        try:
            cert.verify_directly_issued_by(cert)
        except (InvalidSignature, ValueError, TypeError):
            raise StrongroomError(
                f"the PIV card's signature on the certificate for slot {_slot_name(slot)} "
                "does not verify"
            ) from None
        self._put_cert(card, slot, cert)
        return cert


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    from .card import parse_tlv

    return parse_tlv(data)
