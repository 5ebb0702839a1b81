"""Envelope encryption of streams of any size (docs/envelope.md).

A fresh 256-bit data key per message is wrapped by a keystore key (the key-encryption key,
KEK) with `Keystore.encrypt`, whatever its backend: a vault AEAD key, an HSM AES key
(AES-GCM inside the token), an RSA key whose private half sits in a TPM or an HSM
(RSA-OAEP). The data is cut into chunks and sealed with AES-256-GCM in the STREAM
construction of Hoang, Reyhanitabar, Rogaway and Vizar (as `age` and Tink use it): chunk
nonce = nonce prefix (7 bytes) || chunk counter (4 bytes) || last-chunk flag (1 byte). Each
chunk is authenticated on its own; reordering, dropping and appending chunks, and cutting the
stream short, all fail. Memory use is two chunk buffers, whatever the size of the stream.

Layout::

    magic "SRENV\\x00" | format 0x01 | header length (uint32 BE) | header (JSON)
    | header MAC (HMAC-SHA256, 32 bytes) | chunk 0 | chunk 1 | ... | final chunk

The header names the KEK (name, namespace, version, type), the wrapped data key, the AEAD,
the chunk size, the HKDF salt and the nonce prefix. The header MAC and the payload key are
both derived from the data key with HKDF-SHA256, so the header cannot be altered either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import strictjson
from .errors import DataFormatError, DataTruncated, IntegrityError, InvalidArgument

if TYPE_CHECKING:
    from .api import KeyAPI
    from .types import KeyInfo

MAGIC = b"SRENV\x00"
FORMAT_VERSION = 1
AEAD = "aes-256-gcm"
DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 1024
MAX_CHUNK = 16 * 1024 * 1024
MAX_HEADER = 64 * 1024
TAG = 16
NONCE_PREFIX = 7
SALT = 32
DATA_KEY = 32
MAC_SIZE = 32
WRAP_AAD = b"strongroom-envelope/1 data key"
_HKDF_INFO = b"strongroom-envelope/1 header-mac+payload"
_LEN = struct.Struct(">I")
_CTR = struct.Struct(">IB")
MAX_CHUNKS = 1 << 32

Progress = Callable[[int], None]
"""progress(n): n more bytes of input were processed."""


@dataclass(frozen=True)
class EnvelopeHeader:
    """What the header of an enveloped stream says (no secrets: the data key is wrapped)."""

    key: str
    namespace: str
    version: int
    key_type: str
    algorithm: str | None
    aead: str
    chunk_size: int
    salt: bytes
    nonce_prefix: bytes
    wrapped_key: bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON header, as stored (and as `--json` shows it)."""
        return {
            "aead": self.aead,
            "chunk_size": self.chunk_size,
            "kek": {
                "algorithm": self.algorithm,
                "key": self.key,
                "namespace": self.namespace,
                "type": self.key_type,
                "version": self.version,
            },
            "nonce_prefix": _b64(self.nonce_prefix),
            "salt": _b64(self.salt),
            "wrapped_key": _b64(self.wrapped_key),
        }

    def encode(self) -> bytes:
        """magic | format | length | JSON header (the bytes the header MAC covers)."""
        body = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + bytes([FORMAT_VERSION]) + _LEN.pack(len(body)) + body


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, size: int | None = None) -> bytes:
    try:
        out = base64.b64decode(str(value), validate=True)
    except ValueError:
        raise DataFormatError(f"the envelope header's {what} is not base64") from None
    if size is not None and len(out) != size:
        raise DataFormatError(f"the envelope header's {what} is not {size} bytes")
    return out


def _read_exact(src: BinaryIO, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = src.read(n - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)


def _fill(src: BinaryIO, view: memoryview) -> int:
    """Read until `view` is full or the stream ends; return the count."""
    size = len(view)
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < size:
        if readinto is not None:
            n = readinto(view[got:])
        else:  # a stream without readinto
            piece = src.read(size - got)
            n = len(piece) if piece else 0
            view[got : got + n] = piece or b""
        if not n:
            break
        got += n
    return got


def read_header(src: BinaryIO) -> tuple[EnvelopeHeader, bytes, bytes]:
    """Parse the header: (header, the exact header bytes, the stored header MAC)."""
    lead = _read_exact(src, len(MAGIC) + 1 + _LEN.size)
    if len(lead) < len(MAGIC) or lead[: len(MAGIC)] != MAGIC:
        if len(lead) < len(MAGIC) and MAGIC.startswith(lead):
            raise DataTruncated("the envelope ends inside its header")
        raise DataFormatError("this is not a Strongroom envelope (bad magic)")
    if len(lead) < len(MAGIC) + 1 + _LEN.size:
        raise DataTruncated("the envelope ends inside its header")
    if lead[len(MAGIC)] != FORMAT_VERSION:
        raise DataFormatError(
            f"envelope format {lead[len(MAGIC)]} is not one this Strongroom reads "
            f"(it reads {FORMAT_VERSION})"
        )
    (length,) = _LEN.unpack_from(lead, len(MAGIC) + 1)
    if length > MAX_HEADER:
        raise DataFormatError(f"the envelope header claims {length} bytes (at most {MAX_HEADER})")
    body = _read_exact(src, length)
    mac = _read_exact(src, MAC_SIZE)
    if len(body) < length or len(mac) < MAC_SIZE:
        raise DataTruncated("the envelope ends inside its header")
    try:
        doc = strictjson.loads(body)
        kek = doc["kek"]
        header = EnvelopeHeader(
            key=str(kek["key"]),
            namespace=str(kek["namespace"]),
            version=int(kek["version"]),
            key_type=str(kek["type"]),
            algorithm=None if kek["algorithm"] is None else str(kek["algorithm"]),
            aead=str(doc["aead"]),
            chunk_size=int(doc["chunk_size"]),
            salt=_unb64(doc["salt"], "salt", SALT),
            nonce_prefix=_unb64(doc["nonce_prefix"], "nonce prefix", NONCE_PREFIX),
            wrapped_key=_unb64(doc["wrapped_key"], "wrapped key"),
        )
    except (ValueError, KeyError, TypeError):
        raise DataFormatError("the envelope header is not valid") from None
    if header.aead != AEAD:
        raise DataFormatError(f"unknown envelope AEAD {header.aead!r} (this reads {AEAD})")
    if not MIN_CHUNK <= header.chunk_size <= MAX_CHUNK:
        raise DataFormatError(f"the envelope chunk size {header.chunk_size} is out of range")
    raw = lead + body
    if header.encode() != raw:  # one canonical encoding: nothing unparsed rides along
        raise DataFormatError("the envelope header is not in canonical form")
    return header, raw, mac


def _derive(data_key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 64, salt, _HKDF_INFO).derive(data_key)
    return okm[:32], okm[32:]


def _mac(mac_key: bytes, header_bytes: bytes) -> bytes:
    return hmac.new(mac_key, header_bytes, hashlib.sha256).digest()


def _chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise InvalidArgument("the chunk size is a whole number of bytes")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise InvalidArgument(f"the chunk size must be {MIN_CHUNK} to {MAX_CHUNK} bytes")
    return chunk_size


def kek_algorithm(info: KeyInfo, algorithm: str | None) -> str | None:
    """How the data key is wrapped: `algorithm` if given; else AES key wrap (RFC 5649) for an
    AES key that may wrap but not encrypt (an HSM's key-wrapping key); else, for an RSA key,
    the OAEP variant recorded with it (the one its backend decrypts: oaep-sha1 on SoftHSM2),
    written into the header so decryption uses the same; else the key's own AEAD (None)."""
    from .algorithms import AES_KEY_WRAP, RSA_ENCRYPT_ATTRIBUTE
    from .types import KeyType, Usage

    if algorithm is not None:
        return algorithm
    if info.type.is_rsa:
        return info.attributes.get(RSA_ENCRYPT_ATTRIBUTE)
    if (
        info.type is KeyType.AES_256
        and Usage.ENCRYPT not in info.usage
        and Usage.WRAP in info.usage
    ):
        return AES_KEY_WRAP
    return None


def _wrap_aad(key_type: str, algorithm: str | None) -> bytes:
    from .algorithms import AES_KEY_WRAP

    # OAEP and RFC 5649 take no associated data; the header MAC binds the rest
    return b"" if key_type.startswith("rsa-") or algorithm == AES_KEY_WRAP else WRAP_AAD


def _wrap(ks: KeyAPI, info: KeyInfo, data_key: bytes, algorithm: str | None) -> tuple[int, bytes]:
    from . import lifecycle

    aad = _wrap_aad(info.type.value, algorithm)
    blob = ks.encrypt(info.name, data_key, aad, algorithm, envelope=True)
    version, _ = lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, blob, "ciphertext")
    return version, blob


def _unwrap(ks: KeyAPI, header: EnvelopeHeader) -> bytes:
    if header.namespace != ks.namespace:
        raise InvalidArgument(
            f"the envelope's key is in namespace {header.namespace!r}, this keystore uses "
            f"{ks.namespace!r}"
        )
    from . import lifecycle

    version, _ = lifecycle.unpack(lifecycle.CIPHERTEXT_MAGIC, header.wrapped_key, "ciphertext")
    if version != header.version:
        raise IntegrityError("the envelope header's key version does not match its wrapped key")
    data_key = ks.decrypt(
        header.key,
        header.wrapped_key,
        _wrap_aad(header.key_type, header.algorithm),
        header.algorithm,
        envelope=True,
    )
    if len(data_key) != DATA_KEY:
        raise IntegrityError("the envelope's data key has the wrong length")
    return data_key


def encrypt_stream(
    ks: KeyAPI,
    name: str,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    algorithm: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> EnvelopeHeader:
    """Encrypt `src` to `dst` under a fresh data key wrapped by key `name`."""
    chunk_size = _chunk_size(chunk_size)
    info = ks.info(name)
    algorithm = kek_algorithm(info, algorithm)
    data_key = os.urandom(DATA_KEY)
    version, wrapped = _wrap(ks, info, data_key, algorithm)
    header = EnvelopeHeader(
        key=name,
        namespace=ks.namespace,
        version=version,
        key_type=info.type.value,
        algorithm=algorithm,
        aead=AEAD,
        chunk_size=chunk_size,
        salt=os.urandom(SALT),
        nonce_prefix=os.urandom(NONCE_PREFIX),
        wrapped_key=wrapped,
    )
    mac_key, payload_key = _derive(data_key, header.salt)
    del data_key
    raw = header.encode()
    dst.write(raw + _mac(mac_key, raw))
    aead = AESGCM(payload_key)
    del payload_key, mac_key
    prefix = header.nonce_prefix
    bufs = [bytearray(chunk_size), bytearray(chunk_size)]
    views = [memoryview(b) for b in bufs]
    out = bytearray(chunk_size + TAG)
    out_view = memoryview(out)
    pack = _CTR.pack
    encrypt_into = aead.encrypt_into
    write = dst.write
    cur = 0
    n = _fill(src, views[0])
    counter = 0
    while True:
        nxt = _fill(src, views[1 - cur]) if n == chunk_size else 0
        last = nxt == 0
        if counter >= MAX_CHUNKS:
            raise InvalidArgument("the stream is too long for one envelope (2^32 chunks)")
        encrypt_into(prefix + pack(counter, last), views[cur][:n], None, out_view[: n + TAG])
        write(out_view[: n + TAG])
        if progress is not None:
            progress(n)
        if last:
            break
        counter += 1
        cur, n = 1 - cur, nxt
    return header


def decrypt_stream(
    ks: KeyAPI,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    progress: Progress | None = None,
) -> EnvelopeHeader:
    """Decrypt an envelope from `src` to `dst`; raise IntegrityError (or DataTruncated) at the
    first chunk that fails. Chunks before it were authenticated and already written."""
    header, raw, mac = read_header(src)
    data_key = _unwrap(ks, header)
    mac_key, payload_key = _derive(data_key, header.salt)
    del data_key
    if not hmac.compare_digest(_mac(mac_key, raw), mac):
        raise IntegrityError("the envelope header failed authentication: it was altered")
    aead = AESGCM(payload_key)
    del payload_key, mac_key
    size = header.chunk_size + TAG
    prefix = header.nonce_prefix
    bufs = [bytearray(size), bytearray(size)]
    views = [memoryview(b) for b in bufs]
    plain = bytearray(header.chunk_size)
    plain_view = memoryview(plain)
    pack = _CTR.pack
    decrypt_into = aead.decrypt_into
    write = dst.write
    cur = 0
    n = _fill(src, views[0])
    counter = 0
    while True:
        if n < TAG:
            raise DataTruncated(f"the envelope ends early: chunk {counter} is missing or cut short")
        nxt = _fill(src, views[1 - cur]) if n == size else 0
        last = nxt == 0
        body = views[cur][:n]
        try:
            decrypt_into(prefix + pack(counter, last), body, None, plain_view[: n - TAG])
        except InvalidTag:
            raise _chunk_failure(aead, prefix, counter, last, body) from None
        write(plain_view[: n - TAG])
        if progress is not None:
            progress(n)
        if last:
            break
        counter += 1
        if counter >= MAX_CHUNKS:
            raise IntegrityError("the envelope has more chunks than the format allows")
        cur, n = 1 - cur, nxt
    return header


def _chunk_failure(
    aead: AESGCM, prefix: bytes, counter: int, last: bool, body: memoryview
) -> IntegrityError:
    """Say why chunk `counter` failed: cut short, extended, or altered."""
    try:
        aead.decrypt(prefix + _CTR.pack(counter, not last), body, None)
    except InvalidTag:
        return IntegrityError(
            f"chunk {counter} of the envelope failed authentication: it was altered or "
            "reordered, or the stream was cut inside it"
        )
    if last:
        return DataTruncated(
            f"the envelope ends early: chunk {counter} is not the final chunk, and the rest is gone"
        )
    return IntegrityError(f"data follows the final chunk ({counter}) of the envelope")


def rewrap_stream(
    ks: KeyAPI,
    src: Any,
    dst: BinaryIO,
    *,
    algorithm: str | None = None,
    key: str | None = None,
) -> EnvelopeHeader:
    """Wrap an envelope's data key under the newest version of its key; copy the chunks as
    they are (they are not decrypted). The header MAC is checked, then made anew. With
    `key`, an envelope made for another key is refused before anything is unwrapped."""
    header, raw, mac = read_header(src)
    if key is not None and header.key != key:
        raise InvalidArgument(f"the envelope is encrypted to key {header.key!r}, not {key!r}")
    data_key = _unwrap(ks, header)
    mac_key, _ = _derive(data_key, header.salt)
    if not hmac.compare_digest(_mac(mac_key, raw), mac):
        raise IntegrityError("the envelope header failed authentication: it was altered")
    info = ks.info(header.key)
    algorithm = kek_algorithm(info, algorithm or header.algorithm)
    version, wrapped = _wrap(ks, info, data_key, algorithm)
    del data_key
    new = EnvelopeHeader(
        key=header.key,
        namespace=header.namespace,
        version=version,
        key_type=header.key_type,
        algorithm=algorithm,
        aead=header.aead,
        chunk_size=header.chunk_size,
        salt=header.salt,
        nonce_prefix=header.nonce_prefix,
        wrapped_key=wrapped,
    )
    new_raw = new.encode()
    dst.write(new_raw + _mac(mac_key, new_raw))
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := _fill(src, view):
        dst.write(view[:n])
    return new


__all__ = [
    "DEFAULT_CHUNK",
    "MAGIC",
    "EnvelopeHeader",
    "decrypt_stream",
    "encrypt_stream",
    "read_header",
    "rewrap_stream",
]
