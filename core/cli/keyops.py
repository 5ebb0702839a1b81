"""`strongroom key sign|verify|encrypt|decrypt|rewrap`: data through a key."""

from __future__ import annotations

import hashlib
import io
import sys
from typing import BinaryIO

import click

from .. import algorithms
from ..api import KeyAPI
from ..errors import InvalidArgument, StrongroomError
from ._io import (
    Prepended,
    StrongroomCommand,
    binary_refused,
    in_option,
    is_text,
    open_in,
    open_out,
    out_option,
    read_input,
    refuse_binary_on_terminal,
    write_output,
)
from ._state import State, pass_state

STREAM_MIN = 256 * 1024
"""An ECDSA or RSA signature over more input than this is made from a digest hashed here in
a stream (`prehashed`): the same signature, without holding the input in memory or sending
it to the service."""


def signature_input(
    ks: KeyAPI, name: str, path: str | None, digest: bool, algorithm: str | None = None
) -> tuple[bytes, bool]:
    """What `key sign`/`key verify` pass on: the input, or its digest; and whether it is one.

    With `digest` the input already is the digest. Otherwise a short input is passed whole;
    a longer one is hashed in a stream when the key signs digests (ECDSA, RSA), and read
    whole for Ed25519, HMAC and FIDO keys, which sign the message itself.
    """
    if digest:
        return read_input(path), True
    stdin = path in (None, "-")
    try:
        f = sys.stdin.buffer if stdin else open(str(path), "rb")
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    try:
        head = f.read(STREAM_MIN + 1)
        if len(head) <= STREAM_MIN:
            return head, False
        try:
            key_type = ks.info(name).type
        except StrongroomError:  # e.g. a service identity allowed to sign but not to read
            return _whole(f, head), False
        if not algorithms.signs_digests(key_type):
            return _whole(f, head), False
        hasher = hashlib.new(algorithms.hash_name(key_type, algorithm), head)
        del head
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
        return hasher.digest(), True
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    finally:
        if not stdin:
            f.close()


def _whole(f: BinaryIO, head: bytes) -> bytes:
    """The whole input, of which `head` was read already, in one buffer: read again from the
    start where the input can seek, rather than joined (which needs twice the memory)."""
    if f.seekable():
        f.seek(-len(head), io.SEEK_CUR)
        return f.read()
    return b"".join([head, *iter(lambda: f.read(1 << 20), b"")])


_digest_option = click.option(
    "--digest",
    is_flag=True,
    help="The input is the message's SHA-256 digest (SHA-384 for P-384, SHA-512 with "
    "--algorithm pkcs1v15-sha512), raw bytes; "
    "ECDSA and RSA keys only.",
)


@click.command("sign", cls=StrongroomCommand)
@click.argument("name")
@in_option("Data to sign (default: stdin).")
@out_option("Signature file (default: stdout).")
@click.option(
    "--algorithm",
    type=click.Choice(algorithms.RSA_SIGN_ALGORITHMS),
    help=algorithms.RSA_SIGN_ALGORITHMS_HELP,
)
@click.option(
    "--envelope",
    is_flag=True,
    help="Prefix the signature with the key version (docs/lifecycle.md), for `verify --envelope`.",
)
@_digest_option
@pass_state
def key_sign(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    algorithm: str | None,
    envelope: bool,
    digest: bool,
) -> None:
    """Sign data (DER for ECDSA, raw for Ed25519, PKCS#1 v1.5 or PSS for RSA, HMAC tag,
    a FIDO assertion structure for fido-* keys). ECDSA and RSA hash a large input here, in a
    stream, and sign its digest."""
    refuse_binary_on_terminal(out, "a signature")
    ks = state.keystore()
    data, prehashed = signature_input(ks, name, inp, digest, algorithm)
    write_output(out, ks.sign(name, data, algorithm, envelope=envelope, prehashed=prehashed))


@click.command("verify", cls=StrongroomCommand)
@click.argument("name")
@click.option("--signature", "sig", metavar="FILE", required=True, help="The signature file.")
@in_option("Signed data (default: stdin).")
@click.option(
    "--algorithm",
    type=click.Choice(algorithms.RSA_SIGN_ALGORITHMS),
    help=algorithms.RSA_SIGN_ALGORITHMS_HELP,
)
@click.option(
    "--envelope",
    is_flag=True,
    help="The signature came from `sign --envelope` (names its version).",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="For a bare signature: the key version that made it (default: the newest).",
)
@_digest_option
@pass_state
def key_verify(
    state: State,
    name: str,
    sig: str,
    inp: str | None,
    algorithm: str | None,
    envelope: bool,
    version: int | None,
    digest: bool,
) -> None:
    """Verify a signature: exit 0 if valid, 1 if not."""
    if envelope and version is not None:
        raise click.UsageError("--version is for bare signatures; an envelope names its version")
    ks = state.keystore()
    signature = read_input(sig)
    data, prehashed = signature_input(ks, name, inp, digest, algorithm)
    ks.verify(
        name, data, signature, algorithm, version=version, envelope=envelope, prehashed=prehashed
    )
    state.emit({"valid": True}, "signature valid")


@click.command("encrypt", cls=StrongroomCommand)
@click.argument("name")
@in_option("Plaintext (default: stdin).")
@out_option("Ciphertext (default: stdout).")
@click.option("--aad", default="", help="Associated data (text) bound to the ciphertext.")
@click.option(
    "--algorithm",
    type=click.Choice(
        [*algorithms.RSA_ENCRYPT_ALGORITHMS, algorithms.AES_KEY_WRAP, algorithms.AES_CBC_PAD]
    ),
    help="RSA: oaep-sha256 or oaep-sha1 (default: the one the key records at generation, "
    "oaep-sha1 on tokens that decrypt only that, such as SoftHSM2); "
    "aes-kwp: RFC 5649 key wrap of a short secret by a PKCS#11 AES key with the wrap usage; "
    "aes-cbc-pad: AES-256-CBC with PKCS#7 padding, not authenticated (for KMIP clients).",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Write the bare ciphertext, without the key-version prefix (docs/lifecycle.md).",
)
@pass_state
def key_encrypt(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    aad: str,
    algorithm: str | None,
    raw: bool,
) -> None:
    """Encrypt (AES-256-GCM, XChaCha20-Poly1305, or RSA-OAEP) with the newest key version;
    the output names that version unless --raw."""
    refuse_binary_on_terminal(out, "a ciphertext")
    ks = state.keystore()
    ct = ks.encrypt(name, read_input(inp), aad.encode(), algorithm, envelope=not raw)
    write_output(out, ct)


@click.command("decrypt", cls=StrongroomCommand)
@click.argument("name")
@in_option("Ciphertext (default: stdin).")
@out_option("Plaintext (default: stdout).")
@click.option("--aad", default="", help="The associated data given at encryption.")
@click.option(
    "--algorithm",
    type=click.Choice(
        [*algorithms.RSA_ENCRYPT_ALGORITHMS, algorithms.AES_KEY_WRAP, algorithms.AES_CBC_PAD]
    ),
    help="RSA: the OAEP hash used at encryption (default: the one the key records); aes-kwp "
    "for a "
    "secret wrapped with `encrypt --algorithm aes-kwp`.",
)
@click.option(
    "--raw",
    is_flag=True,
    help="The input is a bare ciphertext (no key-version prefix), e.g. from openssl.",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="For a bare ciphertext: the key version that made it (default: the newest).",
)
@pass_state
def key_decrypt(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    aad: str,
    algorithm: str | None,
    raw: bool,
    version: int | None,
) -> None:
    """Decrypt what `key encrypt` made, with the key version it names. Input without the
    version prefix is taken as a bare ciphertext (as with --raw)."""
    from .. import lifecycle

    data = read_input(inp)
    envelope = not raw and lifecycle.is_versioned(lifecycle.CIPHERTEXT_MAGIC, data)
    if envelope and version is not None:
        raise click.UsageError("--version is for bare ciphertexts; this one names its version")
    ks = state.keystore()
    plain = ks.decrypt(name, data, aad.encode(), algorithm, version=version, envelope=envelope)
    if out is None and sys.stdout.isatty() and not is_text(plain):
        raise binary_refused("the decrypted data")
    write_output(out, plain)


@click.command("rewrap", cls=StrongroomCommand)
@click.argument("name")
@in_option("Ciphertext or envelope (default: stdin).")
@out_option("Where to write (default: stdout).")
@click.option("--aad", default="", help="The associated data given at encryption.")
@click.option("--algorithm", type=click.Choice(algorithms.RSA_ENCRYPT_ALGORITHMS))
@pass_state
def key_rewrap(
    state: State, name: str, inp: str | None, out: str | None, aad: str, algorithm: str | None
) -> None:
    """Move a ciphertext from `key encrypt`, or a `strongroom encrypt` envelope, to the newest
    version of its key. An envelope's data stays as it is: only its data key is rewrapped."""
    from .. import envelope

    refuse_binary_on_terminal(out, "a ciphertext")
    ks = state.keystore()
    with open_in(inp) as src:
        lead = b""
        while len(lead) < len(envelope.MAGIC) and (
            piece := src.read(len(envelope.MAGIC) - len(lead))
        ):
            lead += piece
        if lead == envelope.MAGIC:
            if aad:
                raise click.UsageError("--aad is for `key encrypt` ciphertexts, not envelopes")
            with open_out(out) as dst:
                envelope.rewrap_stream(
                    state.local("key rewrap of an envelope"),
                    Prepended(lead, src),
                    dst.stream,
                    algorithm=algorithm,
                    key=name,
                )
                dst.commit()
            return
        data = lead + src.read()
    write_output(out, ks.rewrap(name, data, aad.encode(), algorithm))
