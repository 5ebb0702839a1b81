"""`strongroom key csr|certificate|cert ...`: CSRs and certificates signed by a key
(docs/x509.md).

The key signs as a `cryptography` private key (`KeyAPI.private_key`): `key csr` and
`key certificate` work with any signing key, in process or through the service (its sign
permission). `key cert set|show` keep a certificate with a key (the manage and read
permissions through the service).
"""

from __future__ import annotations

import datetime
import ipaddress

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .. import algorithms
from ..api import KeyAPI
from ..errors import CertificateMismatch, InvalidArgument
from ..keystore_certs import encode_chain, parse_chain, spki
from ._io import StrongroomCommand, StrongroomSubGroup, out_option, read_input, write_output
from ._state import State, pass_state

MAX_DAYS = 36500


def parse_subject(dn: str) -> x509.Name:
    """An RFC 4514 distinguished name, e.g. "CN=api.example,O=Example"."""
    try:
        name = x509.Name.from_rfc4514_string(dn)
    except ValueError as e:
        raise InvalidArgument(f"--subject is not an RFC 4514 name ({e})") from None
    if not list(name):
        raise InvalidArgument("--subject is empty")
    return name


def parse_san(text: str | None) -> list[x509.GeneralName]:
    """`DNS:a.example,IP:10.0.0.1,email:x@example,URI:https://...` as GeneralNames."""
    names: list[x509.GeneralName] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, value = item.partition(":")
        kind = kind.strip().upper()
        if not sep or not value:
            raise InvalidArgument(f"--san entry {item!r} is not KIND:VALUE")
        try:
            if kind == "DNS":
                names.append(x509.DNSName(value))
            elif kind == "IP":
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
            elif kind == "EMAIL":
                names.append(x509.RFC822Name(value))
            elif kind == "URI":
                names.append(x509.UniformResourceIdentifier(value))
            else:
                raise InvalidArgument(f"--san kind {kind!r} is not DNS, IP, email or URI")
        except ValueError as e:
            raise InvalidArgument(f"--san entry {item!r}: {e}") from None
    return names


def signature_hash(ks: KeyAPI, name: str) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash the key signs with (`algorithms.digest_for`), or None for Ed25519, which
    hashes inside the scheme."""
    key_type = ks.info(name).type
    if not (key_type.is_ecdsa or key_type.is_rsa):
        return None
    return hashes.SHA384() if algorithms.hash_name(key_type) == "sha384" else hashes.SHA256()


_san_option = click.option(
    "--san", metavar="LIST", help="Subject alternative names: DNS:x,IP:y,email:z,URI:u."
)
_subject_option = click.option(
    "--subject", required=True, metavar="DN", help='RFC 4514 name, e.g. "CN=api,O=Example".'
)


@click.command("csr", cls=StrongroomCommand)
@click.argument("name")
@_subject_option
@_san_option
@out_option("Where the PEM CSR goes (default: stdout).")
@pass_state
def key_csr(state: State, name: str, subject: str, san: str | None, out: str | None) -> None:
    """Make a certificate signing request (PKCS#10, PEM) signed by the key."""
    ks = state.keystore()
    builder = x509.CertificateSigningRequestBuilder().subject_name(parse_subject(subject))
    names = parse_san(san)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(ks.private_key(name), signature_hash(ks, name))
    write_output(out, csr.public_bytes(serialization.Encoding.PEM))


@click.command("certificate", cls=StrongroomCommand)
@click.argument("name")
@_subject_option
@click.option("--days", required=True, type=click.IntRange(1, MAX_DAYS), help="Validity.")
@click.option("--issuer", metavar="KEY", help="The key that signs (default: NAME itself).")
@click.option(
    "--issuer-cert",
    metavar="FILE",
    help="The issuer's certificate (default: the one kept with --issuer).",
)
@click.option("--ca", is_flag=True, help="A CA certificate (basicConstraints CA:TRUE).")
@_san_option
@out_option("Where the PEM certificate goes (default: stdout).")
@pass_state
def key_certificate(
    state: State,
    name: str,
    subject: str,
    days: int,
    issuer: str | None,
    issuer_cert: str | None,
    ca: bool,
    san: str | None,
    out: str | None,
) -> None:
    """Make an X.509 certificate for the key: self-signed, or issued by another key."""
    if issuer_cert is not None and issuer is None:
        raise InvalidArgument("--issuer-cert needs --issuer")
    ks = state.keystore()
    public = ks.public_key(name)
    subject_name = parse_subject(subject)
    signer = issuer or name
    signer_key = ks.private_key(signer)
    if issuer is None:
        issuer_name, issuer_public = subject_name, public
    else:
        parent = _issuer_certificate(state, issuer, issuer_cert)
        if spki(parent.public_key()) != spki(signer_key.public_key()):
            raise CertificateMismatch(
                f"the issuer certificate's public key is not the public key of key {issuer!r}"
            )
        issuer_name, issuer_public = parent.subject, parent.public_key()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer_name)
        .public_key(public)  # type: ignore[arg-type]  # a signing key's public half
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(ca, isinstance(public, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),  # type: ignore[arg-type]
            critical=False,
        )
    )
    names = parse_san(san)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if not ca and names:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    cert = builder.sign(signer_key, signature_hash(ks, signer))
    write_output(out, cert.public_bytes(serialization.Encoding.PEM))


def _key_usage(ca: bool, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issuer_certificate(state: State, issuer: str, path: str | None) -> x509.Certificate:
    if path is not None:
        return parse_chain(read_input(path))[0]
    kept = state.keystore().certificate(issuer)
    if not kept:
        raise InvalidArgument(
            f"key {issuer!r} has no certificate kept with it: pass --issuer-cert FILE"
        )
    return kept[0]


@click.group("cert", cls=StrongroomSubGroup)
def key_cert() -> None:
    """Keep a certificate (or chain) with a key, and show it."""


@key_cert.command("set")
@click.argument("name")
@click.argument("file")
@pass_state
def key_cert_set(state: State, name: str, file: str) -> None:
    """Keep the certificate or chain in FILE (PEM, leaf first; or DER) with the key.

    PIV and PKCS#11 keys get the leaf on the device too. A certificate whose public key is
    not the key's is refused.
    """
    chain = state.keystore().set_certificate(name, read_input(file))
    leaf = chain[0]
    state.emit(
        {"name": name, "subject": leaf.subject.rfc4514_string(), "certificates": len(chain)},
        f"kept a certificate for {leaf.subject.rfc4514_string()!r} with key {name!r}"
        + (f" (a chain of {len(chain)})" if len(chain) > 1 else ""),
    )


@key_cert.command("show")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "der"]),
    default="pem",
    show_default=True,
    help="pem: the whole chain; der: the leaf only.",
)
@out_option("Where the certificate goes (default: stdout).")
@pass_state
def key_cert_show(state: State, name: str, fmt: str, out: str | None) -> None:
    """Print the certificate (or chain) kept with the key."""
    chain = state.keystore().certificate(name)
    if not chain:
        raise InvalidArgument(
            f"key {name!r} has no certificate; keep one with `strongroom key cert set`"
        )
    write_output(out, encode_chain(chain, fmt))
