"""Certificates kept with keys (docs/x509.md): `key cert set` and `key cert show`.

`KeyCertificates` is a mixin of `Keystore`. The catalog keeps the certificate or chain a
caller sets (leaf first, PEM); a backend that can also keep the leaf beside the key in its
device (`CertificateStore`: PKCS#11, PIV) gets it there too, so tools such as
`pkcs11-tool` and OpenSC see it. A certificate whose public key is not the key's is refused
(CertificateMismatch) before anything is written.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from .backend import Backend, CertificateStore
from .catalog import Catalog
from .errors import CertificateMismatch, InvalidArgument
from .types import KeyInfo, Operation

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

MAX_CHAIN = 10
"""Certificates in one chain at most: a leaf, intermediates and a root."""


def parse_chain(data: bytes) -> list[x509.Certificate]:
    """One DER certificate, or one or more PEM certificates (leaf first)."""
    try:
        if b"-----BEGIN" in data:
            chain = x509.load_pem_x509_certificates(data)
        else:
            chain = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InvalidArgument("not a PEM or DER X.509 certificate") from None
    if not 1 <= len(chain) <= MAX_CHAIN:
        raise InvalidArgument(f"a chain is 1 to {MAX_CHAIN} certificates, not {len(chain)}")
    return chain


def spki(public: PublicKeyTypes) -> bytes:
    """A public key's SubjectPublicKeyInfo (DER): equal exactly when the keys are equal."""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_chain(name: str, public: PublicKeyTypes, chain: list[x509.Certificate]) -> None:
    """The leaf certifies `public`; each certificate is signed by the next one."""
    if spki(chain[0].public_key()) != spki(public):
        raise CertificateMismatch(
            f"the certificate's public key is not the public key of key {name!r}"
        )
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError):
            raise CertificateMismatch(
                f"in the chain for key {name!r}, {child.subject.rfc4514_string()!r} is not "
                f"issued by the certificate after it, {parent.subject.rfc4514_string()!r}"
            ) from None


def encode_chain(chain: list[x509.Certificate], fmt: str) -> bytes:
    """PEM (the whole chain) or DER (the leaf: DER holds one certificate)."""
    if fmt == "pem":
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    if fmt == "der":
        return chain[0].public_bytes(serialization.Encoding.DER)
    raise InvalidArgument(f"unknown certificate format {fmt!r}; use pem or der")


class KeyCertificates:
    """Mixin of `Keystore`: the certificate (or chain) kept with a key."""

    # Set by Keystore.__init__.
    namespace: str
    catalog: Catalog

    if TYPE_CHECKING:  # Keystore's

        def _audited(
            self, op: str, key: str | None, payload: Any = None, **detail: Any
        ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...
        def _key(
            self, name: str, op: Operation | None, facts: dict[str, Any], version: int | None = None
        ) -> tuple[KeyInfo, Backend]: ...

    def set_certificate(self, name: str, data: bytes) -> list[x509.Certificate]:
        """Keep a certificate or chain (PEM, leaf first; or one DER certificate) with a key.

        The leaf's public key must be the key's primary version's, and each certificate in a
        chain must be signed by the next (CertificateMismatch). A PKCS#11 or PIV key gets the
        leaf on its device too. Returns the parsed chain.
        """
        chain = parse_chain(bytes(data))
        with self._audited("certificate_set", name, certificates=len(chain)) as facts:
            info, b = self._key(name, None, facts)
            if not info.type.is_asymmetric:
                raise InvalidArgument(f"key {name!r} is a {info.type.value} key: no certificate")
            check_chain(name, b.public_key(info), chain)
            if isinstance(b, CertificateStore):
                recorded = b.store_certificate(info, chain)
                if recorded:
                    self.catalog.add_attributes(self.namespace, name, info.version, recorded)
            self.catalog.set_certificate(
                self.namespace, name, encode_chain(chain, "pem").decode("ascii")
            )
            return chain

    def certificate(self, name: str) -> list[x509.Certificate]:
        """The chain kept with a key (leaf first): the catalog's, else the one its device
        holds (a PIV key's self-signed certificate, say); an empty list when there is none."""
        with self._audited("certificate", name) as facts:
            info, b = self._key(name, None, facts)
            pem = self.catalog.certificate(self.namespace, name)
            if pem is not None:
                return x509.load_pem_x509_certificates(pem.encode("ascii"))
            if isinstance(b, CertificateStore):
                found = b.stored_certificate(info)
                if found is not None:
                    return [found]
            return []
