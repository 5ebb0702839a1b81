"""Keystore keys as SSH keys: key blobs, signature encodings, host-key checks and added keys.

No key logic lives here: the public key comes from `KeyAPI.public_key`, its SSH encoding
from the one definition of `strongroom key public --format openssh`
(`algorithms.encode_public`), and the signature from `KeyAPI.sign`; this module only
re-encodes it the way SSH wants it (RFC 8709 Ed25519, RFC 5656 ECDSA, RFC 8332 RSA).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .. import algorithms
from ..api import KeyAPI
from ..errors import AgentMessageError, UnsupportedOperation
from ..types import KeyInfo, KeyType, Usage
from . import wire

SSH_KEY_TYPES: dict[KeyType, str] = {
    KeyType.ED25519: "ssh-ed25519",
    KeyType.ECDSA_P256: "ecdsa-sha2-nistp256",
    KeyType.ECDSA_P384: "ecdsa-sha2-nistp384",
    KeyType.RSA_2048: "ssh-rsa",
    KeyType.RSA_3072: "ssh-rsa",
    KeyType.RSA_4096: "ssh-rsa",
    KeyType.FIDO_ES256: "sk-ecdsa-sha2-nistp256@openssh.com",
    KeyType.FIDO_EDDSA: "sk-ssh-ed25519@openssh.com",
}
"""The keystore's key types an SSH client can use, with their SSH key type names. FIDO
credentials are OpenSSH security-key keys when they were made for an `ssh:` application
(the fido backend's rp_id; docs/ssh-agent.md)."""
_SK_OF_PLAIN = {
    "ecdsa-sha2-nistp256": SSH_KEY_TYPES[KeyType.FIDO_ES256],
    "ssh-ed25519": SSH_KEY_TYPES[KeyType.FIDO_EDDSA],
}

RSA_SHA2_256 = "rsa-sha2-256"
RSA_SHA2_512 = "rsa-sha2-512"
KEYSTORE_RSA_ALGORITHMS = {RSA_SHA2_256: "pkcs1v15", RSA_SHA2_512: algorithms.RSA_PKCS1V15_SHA512}
"""SSH's RSA signatures (RFC 8332) as the keystore's: PKCS#1 v1.5 over SHA-256 or SHA-512
(core/algorithms.py)."""


def offerable(info: KeyInfo) -> bool:
    """Whether the agent can offer this key: an SSH type, a signing key, enabled."""
    return (
        info.type in SSH_KEY_TYPES
        and Usage.SIGN in info.usage
        and not info.disabled
        and info.delete_after is None
    )


def key_blob(public: PublicKeyTypes, application: str | None = None) -> bytes:
    """The SSH public key blob: the base64 field of the key's `--format openssh` line; with
    an `application`, the security-key (sk-) form of the same key (PROTOCOL.u2f): its
    fields under the sk- name, then the application."""
    line = algorithms.encode_public(public, "openssh")
    blob = base64.b64decode(line.split(b" ")[1], validate=True)
    if application is None:
        return blob
    r = wire.Reader(blob)
    return wire.string(_SK_OF_PLAIN[r.name()]) + r.rest() + wire.string(application)


def ssh_application(rp_id: object) -> str | None:
    """A fido backend's rp_id as an OpenSSH application (`ssh:`...), else None: credentials
    of a WebAuthn RP ID are not keys OpenSSH can verify."""
    return rp_id if isinstance(rp_id, str) and rp_id.startswith("ssh:") else None


def openssh_public_line(ks: KeyAPI, name: str, version: int | None = None) -> bytes:
    """`strongroom key public --format openssh`: the key's OpenSSH line, and for a FIDO key
    of an `ssh:` fido backend its sk- line, the one `ssh-add -L` shows for it."""
    public = ks.public_key(name, version)
    info = ks.info(name)
    if info.type.is_fido:
        details = next((b.details for b in ks.backends() if b.name == info.backend), {})
        application = ssh_application(details.get("rp_id"))
        if application is not None:
            blob = key_blob(public, application)
            return SSH_KEY_TYPES[info.type].encode() + b" " + base64.b64encode(blob)
    return algorithms.encode_public(public, "openssh")


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a key blob, as `ssh-keygen -l` prints it."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=")
    return "SHA256:" + digest.decode()


@dataclass(frozen=True)
class Identity:
    """One key the agent offers: its blob and the keystore key behind it."""

    blob: bytes
    name: str
    key_type: KeyType
    application: str | None = None
    """A FIDO key's OpenSSH application (`ssh:`...); None for other keys."""


def sign_algorithm(identity: Identity, flags: int) -> tuple[str, str | None]:
    """(SSH signature name, the keystore's `algorithm=`) for a SIGN_REQUEST's flags.

    RSA: rsa-sha2-256 or rsa-sha2-512 (with both flags, SHA-256, as OpenSSH's agent does).
    Plain ssh-rsa (SHA-1, no flag) is refused as unsafe; OpenSSH clients ask for a SHA-2
    signature whenever the server allows one.
    """
    if not identity.key_type.is_rsa:
        return SSH_KEY_TYPES[identity.key_type], None
    for flag, ssh_name in ((wire.RSA_SHA2_256, RSA_SHA2_256), (wire.RSA_SHA2_512, RSA_SHA2_512)):
        if flags & flag:
            return ssh_name, KEYSTORE_RSA_ALGORITHMS[ssh_name]
    raise UnsupportedOperation(
        "ssh-agent", "sign", identity.key_type, "ssh-rsa signatures (SHA-1) are refused"
    )


def ssh_signature(key_type: KeyType, ssh_name: str, signature: bytes) -> bytes:
    """The keystore's signature in SSH's encoding: `string name || string blob`, where an
    ECDSA blob is `mpint r || mpint s` (the keystore gives DER)."""
    if key_type.is_ecdsa:
        signature = _dss_mpints(signature)
    return wire.string(ssh_name) + wire.string(signature)


def _dss_mpints(der: bytes) -> bytes:
    """An ECDSA signature's DER `SEQUENCE { INTEGER r, INTEGER s }` as SSH's `mpint r ||
    mpint s`. A DER INTEGER of a positive number is the mpint's content byte for byte
    (big-endian, minimal, a 0 before a high bit), so the common short form is re-framed
    without decoding the numbers; anything else (long lengths, a non-minimal or negative
    integer, trailing bytes) goes through the full decoder, which rejects what is not DER."""
    n = len(der)
    if 8 <= n < 130 and der[0] == 0x30 and der[1] == n - 2 and der[2] == 0x02:
        r_len = der[3]
        s_at = 4 + r_len
        if s_at + 2 <= n and der[s_at] == 0x02 and s_at + 2 + der[s_at + 1] == n:
            r, s = der[4:s_at], der[s_at + 2 :]
            if _minimal_positive(r) and _minimal_positive(s):
                return wire.string(r) + wire.string(s)
    r_int, s_int = decode_dss_signature(der)
    return wire.mpint(r_int) + wire.mpint(s_int)


def _minimal_positive(value: bytes) -> bool:
    """A DER INTEGER's content that is positive and minimal (so also a valid mpint)."""
    if not value or value[0] & 0x80:
        return False
    return not (value[0] == 0 and (len(value) == 1 or not value[1] & 0x80))


def sk_signature(identity: Identity, assertion: bytes) -> bytes:
    """A FIDO key's assertion structure (the keystore's `sign`, core docs/fido.md) as an
    OpenSSH security-key signature: `string name || string signature || byte flags ||
    uint32 counter`, where the ECDSA signature is `mpint r || mpint s` (PROTOCOL.u2f).

    The credential must have signed the OpenSSH way, for this key's application: no client
    data, and authenticator data of exactly the application's hash, flags and counter (no
    extensions, which OpenSSH's verifier does not take)."""
    not_ssh = UnsupportedOperation(
        "ssh-agent",
        "sign",
        identity.key_type,
        "the credential did not sign for an ssh: application (the fido backend's rp_id)",
    )
    try:
        fields = _cbor_map(assertion)
    except (ValueError, IndexError):
        raise not_ssh from None
    auth, signature = fields.get("authenticatorData"), fields.get("signature")
    application = identity.application or ""
    if (
        not isinstance(auth, bytes)
        or not isinstance(signature, bytes)
        or fields.get("clientDataJSON") != b""
        or len(auth) != 37
        or auth[:32] != hashlib.sha256(application.encode()).digest()
    ):
        raise not_ssh
    if identity.key_type is KeyType.FIDO_ES256:
        r, s = decode_dss_signature(signature)
        signature = wire.mpint(r) + wire.mpint(s)
    name = SSH_KEY_TYPES[identity.key_type]
    return wire.string(name) + wire.string(signature) + auth[32:37]  # flags, counter


def _cbor_map(data: bytes) -> dict[str, object]:
    """The top-level map of a CBOR document whose keys are text and whose values are
    unsigned integers, byte strings or text (all an assertion structure holds). ValueError
    or IndexError for anything else; no nesting, so no recursion to bound."""
    pos = 0

    def head() -> tuple[int, int]:
        nonlocal pos
        first = data[pos]
        pos += 1
        major, info = first >> 5, first & 0x1F
        if info < 24:
            return major, info
        size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
        if size is None or pos + size > len(data):
            raise ValueError("not a definite-length CBOR item")
        value = int.from_bytes(data[pos : pos + size], "big")
        pos += size
        return major, value

    def item() -> object:
        nonlocal pos
        major, value = head()
        if major == 0:
            return value
        if major in (2, 3):
            if pos + value > len(data):
                raise ValueError("a CBOR string runs past the end")
            raw = data[pos : pos + value]
            pos += value
            return raw if major == 2 else raw.decode()
        raise ValueError("an unexpected CBOR item")

    major, count = head()
    if major != 5:
        raise ValueError("not a CBOR map")
    out: dict[str, object] = {}
    for _ in range(count):
        key = item()
        if not isinstance(key, str):
            raise ValueError("a CBOR map key that is not text")
        out[key] = item()
    if pos != len(data):
        raise ValueError("bytes after the CBOR map")
    return out


# -- host keys (session-bind@openssh.com) --------------------------------------------------------
HostKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def load_blob(blob: bytes) -> HostKey:
    """A public key from its SSH blob (Ed25519, ECDSA or RSA); else AgentMessageError."""
    try:
        key_type = wire.Reader(blob).name()
        public = serialization.load_ssh_public_key(
            key_type.encode() + b" " + base64.b64encode(blob)
        )
    except (ValueError, UnsupportedAlgorithm):
        raise AgentMessageError("the host key is not a public key this agent reads") from None
    if not isinstance(public, HostKey):
        raise AgentMessageError("the host key is not an Ed25519, ECDSA or RSA key")
    return public


_ECDSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "ecdsa-sha2-nistp256": hashes.SHA256(),
    "ecdsa-sha2-nistp384": hashes.SHA384(),
    "ecdsa-sha2-nistp521": hashes.SHA512(),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "rsa-sha2-256": hashes.SHA256(),
    "rsa-sha2-512": hashes.SHA512(),
}


def verify_host_signature(blob: bytes, data: bytes, signature: bytes) -> None:
    """Check an SSH signature by the host key `blob` over `data`; AgentMessageError if it
    does not verify or uses an algorithm this agent refuses (ssh-rsa with SHA-1)."""
    public = load_blob(blob)
    r = wire.Reader(signature)
    name, sig = r.name(), r.string()
    r.end()
    try:
        if isinstance(public, ed25519.Ed25519PublicKey) and name == "ssh-ed25519":
            public.verify(sig, data)
        elif isinstance(public, ec.EllipticCurvePublicKey) and name in _ECDSA_HASHES:
            if wire.Reader(blob).name() != name:
                raise InvalidSignature
            inner = wire.Reader(sig)
            der = encode_dss_signature(inner.mpint(), inner.mpint())
            inner.end()
            public.verify(der, data, ec.ECDSA(_ECDSA_HASHES[name]))
        elif isinstance(public, rsa.RSAPublicKey) and name in _RSA_HASHES:
            public.verify(sig, data, padding.PKCS1v15(), _RSA_HASHES[name])
        else:
            raise InvalidSignature
    except InvalidSignature:
        raise AgentMessageError(
            "the host key's signature over the session does not verify"
        ) from None


# -- host certificates (OpenSSH's certificate keys, draft-miller-ssh-cert) ------------------------
CERT_SUFFIX = "-cert-v01@openssh.com"
HOST_CERT = 2
"""A certificate's type field: 1 user, 2 host."""
_CERT_PLAIN_FIELDS = {
    "ssh-ed25519": "s",  # pk
    "ecdsa-sha2-nistp256": "ss",  # curve, public point
    "ecdsa-sha2-nistp384": "ss",
    "ecdsa-sha2-nistp521": "ss",
    "ssh-rsa": "ss",  # e, n (as mpints; kept as their raw strings)
}


@dataclass(frozen=True)
class HostCertificate:
    """A certificate a host key blob carries, its CA signature verified."""

    key: bytes
    """The plain public key blob inside: the key that signs for the host."""
    cert_type: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    ca: bytes
    """The CA's public key blob (the certificate's signature key)."""

    def valid_for(self, hostname: str, now: float) -> bool:
        """OpenSSH's host check: a host certificate, within its validity, with no critical
        option, naming `hostname` among its principals (which are wildcard patterns)."""
        return (
            self.cert_type == HOST_CERT
            and self.valid_after <= now < self.valid_before
            and not self.critical_options
            and any(match_pattern(hostname.lower(), p.lower()) for p in self.principals)
        )


def match_pattern(value: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` and `?` wildcards, nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def is_certificate(blob: bytes) -> bool:
    """Whether a key blob is an OpenSSH certificate (`...-cert-v01@openssh.com`)."""
    try:
        return wire.Reader(blob).name().endswith(CERT_SUFFIX)
    except AgentMessageError:
        return False


@functools.lru_cache(maxsize=64)
def host_certificate(blob: bytes) -> HostCertificate:
    """Decode a certificate blob and verify its CA's signature over it. AgentMessageError
    for anything else: another key type, a malformed field, a CA key this agent does not
    read, an ssh-rsa (SHA-1) CA signature, or a signature that does not verify."""
    r = wire.Reader(blob)
    name = r.name()
    plain = name.removesuffix(CERT_SUFFIX)
    layout = _CERT_PLAIN_FIELDS.get(plain)
    if layout is None or plain == name:
        raise AgentMessageError("the host key is not a certificate this agent reads")
    r.string()  # nonce
    fields = [r.string() for _ in layout]
    key = wire.string(plain) + b"".join(wire.string(f) for f in fields)
    r.uint32()  # serial, high half
    r.uint32()  # serial, low half
    cert_type = r.uint32()
    r.string()  # key id
    packed = wire.Reader(r.string())
    principals: list[str] = []
    while packed.remaining():
        principals.append(packed.string().decode("utf-8", "replace"))
    valid_after = (r.uint32() << 32) | r.uint32()
    valid_before = (r.uint32() << 32) | r.uint32()
    critical = r.string()
    r.string()  # extensions
    r.string()  # reserved
    ca = r.string()
    signed = blob[: len(blob) - r.remaining()]
    signature = r.string()
    r.end()
    load_blob(key)  # the plain key is one this agent reads
    if is_certificate(ca):
        raise AgentMessageError("a certificate's CA key is itself a certificate")
    verify_host_signature(ca, signed, signature)
    return HostCertificate(
        key, cert_type, tuple(principals), valid_after, valid_before, critical, ca
    )


def plain_host_key(blob: bytes) -> bytes:
    """The key that signs for a host: the blob itself, or a certificate's inner key."""
    return host_certificate(blob).key if is_certificate(blob) else blob


def host_key_fingerprint(blob: bytes) -> str:
    """A host key's fingerprint as OpenSSH prints it: a certificate's is its inner key's."""
    try:
        return fingerprint(plain_host_key(blob))
    except AgentMessageError:
        return fingerprint(blob)


def verify_session_signature(host_key: bytes, session_id: bytes, signature: bytes) -> None:
    """session-bind's check: the host key (plain, or a certificate whose CA signature
    verifies) signed the session identifier. AgentMessageError otherwise."""
    verify_host_signature(plain_host_key(host_key), session_id, signature)


# -- keys added by a client (ADD_IDENTITY) --------------------------------------------------------
_ADDED_TYPES = {
    "ssh-ed25519": KeyType.ED25519,
    "ecdsa-sha2-nistp256": KeyType.ECDSA_P256,
    "ecdsa-sha2-nistp384": KeyType.ECDSA_P384,
}


def added_key(add: wire.AddIdentity) -> tuple[KeyType, bytearray, bytes]:
    """(key type, PKCS#8 DER of the private key, its public key blob) for ADD_IDENTITY.

    The DER is a bytearray so that the caller can zero it once the keystore has it. The
    public key sent along is checked against the private one, so a client cannot have a key
    offered under another key's public half.
    """
    try:
        private = _private_key(add)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AgentMessageError("the added key's fields do not make a valid private key") from None
    if isinstance(private, rsa.RSAPrivateKey):
        key_type = KeyType(f"rsa-{private.key_size}")
        if key_type not in SSH_KEY_TYPES:
            raise AgentMessageError("RSA keys of 2048, 3072 or 4096 bits can be added")
    else:
        key_type = _ADDED_TYPES[add.key_type]
    der = bytearray(
        private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key_type, der, key_blob(private.public_key())


def _private_key(
    add: wire.AddIdentity,
) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    f = add.fields
    if add.key_type == "ssh-ed25519":
        public, secret = f[0], f[1]
        if not isinstance(public, bytes) or not isinstance(secret, bytes) or len(secret) != 64:
            raise ValueError
        key = ed25519.Ed25519PrivateKey.from_private_bytes(secret[:32])
        if secret[32:] != public or key_blob(key.public_key())[-32:] != public:
            raise ValueError
        return key
    if add.key_type.startswith("ecdsa-sha2-"):
        curve_name, point, scalar = f
        curve = algorithms.CURVES[_ADDED_TYPES[add.key_type]]
        if not isinstance(point, bytes) or not isinstance(scalar, int):
            raise ValueError
        if curve_name != add.key_type.removeprefix("ecdsa-sha2-").encode():
            raise ValueError
        ec_key = ec.derive_private_key(scalar, curve)
        if ec.EllipticCurvePublicKey.from_encoded_point(curve, point) != ec_key.public_key():
            raise ValueError
        return ec_key
    n, e, d, iqmp, p, q = (int(x) for x in f)
    if p * q != n:
        raise ValueError
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), iqmp, rsa.RSAPublicNumbers(e, n)
    )
    return numbers.private_key()


def added_key_name(blob: bytes) -> str:
    """The keystore name of a key added through the agent: fixed by its public key, so adding
    the same key twice finds the one already imported."""
    return "ssh-agent/" + hashlib.sha256(blob).hexdigest()[:32]
