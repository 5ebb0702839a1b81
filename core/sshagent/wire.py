"""The SSH agent protocol on the wire: RFC 4251 types and the agent's messages, decoded into
frozen dataclasses (draft-ietf-sshm-ssh-agent; OpenSSH's PROTOCOL.agent for its extensions).

Written from the protocol texts. Every decoding error is an `AgentMessageError`, and nothing
else: the server answers SSH_AGENT_FAILURE to it and serves on. A message is one frame,
`uint32 length || byte type || contents`; `decode` takes the frame's body (type and
contents) after the server has read exactly `length` bytes, so a bad message never
desynchronises the stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import AgentMessageError

MAX_MESSAGE = 256 * 1024
"""The largest frame body the agent reads (OpenSSH's agent uses the same bound); a longer
one closes the connection, since skipping it would mean reading it."""

# Requests (client to agent)
REQUEST_IDENTITIES = 11
SIGN_REQUEST = 13
ADD_IDENTITY = 17
REMOVE_IDENTITY = 18
REMOVE_ALL_IDENTITIES = 19
ADD_SMARTCARD_KEY = 20
REMOVE_SMARTCARD_KEY = 21
LOCK = 22
UNLOCK = 23
ADD_ID_CONSTRAINED = 25
ADD_SMARTCARD_KEY_CONSTRAINED = 26
EXTENSION = 27

# Replies (agent to client)
FAILURE = 5
SUCCESS = 6
IDENTITIES_ANSWER = 12
SIGN_RESPONSE = 14
EXTENSION_FAILURE = 28
EXTENSION_RESPONSE = 29

# Signature flags of SIGN_REQUEST
RSA_SHA2_256 = 0x02
RSA_SHA2_512 = 0x04

# Key constraints of ADD_ID_CONSTRAINED
CONSTRAIN_LIFETIME = 1
CONSTRAIN_CONFIRM = 2
CONSTRAIN_EXTENSION = 255
RESTRICT_DESTINATION = "restrict-destination-v00@openssh.com"
"""The destination constraint of `ssh-add -h` (OpenSSH's PROTOCOL.agent): its data is one
string, decoded by policy.destination_constraints."""


_U32 = struct.Struct(">I")


class Reader:
    """Reads RFC 4251 types from a buffer; running past its end is an AgentMessageError."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, data: bytes) -> None:
        self._buf = bytes(data)
        self._pos = 0

    def _take(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            raise AgentMessageError("the message is truncated")
        self._pos = end
        return self._buf[pos:end]

    def byte(self) -> int:
        if self._pos >= len(self._buf):
            raise AgentMessageError("the message is truncated")
        self._pos += 1
        return self._buf[self._pos - 1]

    def boolean(self) -> bool:
        return self.byte() != 0

    def uint32(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._buf):
            raise AgentMessageError("the message is truncated")
        self._pos = pos + 4
        value: int = _U32.unpack_from(self._buf, pos)[0]
        return value

    def string(self) -> bytes:
        return self._take(self.uint32())

    def name(self) -> str:
        """A string that must be printable US-ASCII (an algorithm or extension name)."""
        raw = self.string()
        if not raw or not all(0x21 <= c <= 0x7E for c in raw):
            raise AgentMessageError("a name in the message is empty or not printable ASCII")
        return raw.decode("ascii")

    def mpint(self) -> int:
        """A non-negative mpint (the agent's keys hold no negative numbers)."""
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise AgentMessageError("a negative integer in the message")
        if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
            raise AgentMessageError("an integer in the message has a needless leading zero")
        return int.from_bytes(raw, "big")

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def rest(self) -> bytes:
        return self._take(self.remaining())

    def end(self) -> None:
        """Refuse bytes after the last field: a message means exactly what it says."""
        if self._pos != len(self._buf):
            raise AgentMessageError("the message has trailing bytes")


def uint32(value: int) -> bytes:
    return _U32.pack(value)


def string(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _U32.pack(len(raw)) + raw


def mpint(value: int) -> bytes:
    """RFC 4251 mpint of a non-negative integer: big-endian, a 0 byte before a high bit."""
    if value < 0:
        raise ValueError("mpint of a negative number")
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return string(raw)


def frame(msg_type: int, contents: bytes = b"") -> bytes:
    """One message on the wire: length, type, contents."""
    return struct.pack(">IB", len(contents) + 1, msg_type) + contents


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestIdentities:
    pass


@dataclass(frozen=True)
class SignRequest:
    key_blob: bytes
    data: bytes = field(repr=False)
    flags: int


@dataclass(frozen=True)
class AddIdentity:
    """ADD_IDENTITY or ADD_ID_CONSTRAINED. `key_type` is the SSH name; `fields` the private
    key's fields in the order of its type (never shown: repr=False), `constraints` the
    constraint codes with their data."""

    key_type: str
    fields: tuple[bytes | int, ...] = field(repr=False)
    comment: bytes
    constraints: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class RemoveIdentity:
    key_blob: bytes


@dataclass(frozen=True)
class RemoveAllIdentities:
    pass


@dataclass(frozen=True)
class Lock:
    passphrase: bytes = field(repr=False)


@dataclass(frozen=True)
class Unlock:
    passphrase: bytes = field(repr=False)


@dataclass(frozen=True)
class Extension:
    name: str
    contents: bytes


@dataclass(frozen=True)
class Unsupported:
    """A message type the agent knows but does not serve (smartcard keys), or does not know."""

    msg_type: int


Request = (
    RequestIdentities
    | SignRequest
    | AddIdentity
    | RemoveIdentity
    | RemoveAllIdentities
    | Lock
    | Unlock
    | Extension
    | Unsupported
)

# The private-key fields of ADD_IDENTITY, per key type: "s" a string, "m" an mpint.
# (OpenSSH's PROTOCOL.agent / the draft, "Adding keys to the agent".)
PRIVATE_FIELDS = {
    "ssh-ed25519": "ss",  # public key (32), private key (seed || public, 64)
    "ecdsa-sha2-nistp256": "ssm",  # curve name, public point Q, private scalar d
    "ecdsa-sha2-nistp384": "ssm",
    "ssh-rsa": "mmmmmm",  # n, e, d, iqmp, p, q
}


def decode(body: bytes) -> Request:
    """One message body (type byte and contents) → its request. Raises AgentMessageError."""
    if body[:1] == b"\x0d":  # SIGN_REQUEST, the hot path: sliced without a Reader
        return _sign_request(body)
    r = Reader(body)
    msg_type = r.byte()
    if msg_type == REQUEST_IDENTITIES:
        r.end()
        return RequestIdentities()
    if msg_type == SIGN_REQUEST:
        key_blob, data, flags = r.string(), r.string(), r.uint32()
        r.end()
        return SignRequest(key_blob, data, flags)
    if msg_type in (ADD_IDENTITY, ADD_ID_CONSTRAINED):
        return _add_identity(r, constrained=msg_type == ADD_ID_CONSTRAINED)
    if msg_type == REMOVE_IDENTITY:
        blob = r.string()
        r.end()
        return RemoveIdentity(blob)
    if msg_type == REMOVE_ALL_IDENTITIES:
        r.end()
        return RemoveAllIdentities()
    if msg_type in (LOCK, UNLOCK):
        passphrase = r.string()
        r.end()
        return Lock(passphrase) if msg_type == LOCK else Unlock(passphrase)
    if msg_type == EXTENSION:
        name = r.name()
        return Extension(name, r.rest())
    return Unsupported(msg_type)


def _sign_request(body: bytes) -> SignRequest:
    """SIGN_REQUEST: `byte 13 || string key_blob || string data || uint32 flags`, exactly."""
    n = len(body)
    if n < 13:
        raise AgentMessageError("the message is truncated")
    data_at = 5 + _U32.unpack_from(body, 1)[0]
    if data_at + 4 > n:
        raise AgentMessageError("the message is truncated")
    flags_at = data_at + 4 + _U32.unpack_from(body, data_at)[0]
    if flags_at + 4 != n:
        raise AgentMessageError(
            "the message is truncated" if flags_at + 4 > n else "the message has trailing bytes"
        )
    return SignRequest(
        body[5:data_at], body[data_at + 4 : flags_at], _U32.unpack_from(body, flags_at)[0]
    )


@dataclass(frozen=True)
class SessionBind:
    """The contents of session-bind@openssh.com (OpenSSH's PROTOCOL.agent, section 1)."""

    host_key: bytes
    session_id: bytes
    signature: bytes
    forwarding: bool


def session_bind(contents: bytes) -> SessionBind:
    """Decode session-bind@openssh.com's contents; the signature is checked by the caller."""
    r = Reader(contents)
    host_key, session_id, signature = r.string(), r.string(), r.string()
    forwarding = r.boolean()
    r.end()
    return SessionBind(host_key, session_id, signature, forwarding)


def _add_identity(r: Reader, *, constrained: bool) -> AddIdentity:
    key_type = r.name()
    layout = PRIVATE_FIELDS.get(key_type)
    if layout is None:
        # The fields of other types (certificates, DSA, sk-) cannot be skipped without
        # parsing them, and the agent adds none of them.
        raise AgentMessageError(f"keys of type {key_type} cannot be added to this agent")
    fields = tuple(r.string() if kind == "s" else r.mpint() for kind in layout)
    comment = r.string()
    constraints: list[tuple[int, bytes]] = []
    while constrained and r.remaining():
        code = r.byte()
        if code == CONSTRAIN_LIFETIME:
            constraints.append((code, uint32(r.uint32())))
        elif code == CONSTRAIN_CONFIRM:
            constraints.append((code, b""))
        elif code == CONSTRAIN_EXTENSION:
            name = r.name()
            if name == RESTRICT_DESTINATION:
                constraints.append((code, string(name) + string(r.string())))
            else:
                # An unknown extension's data has no length of its own: it runs to the end
                # of the message. The agent refuses the key (agent.py), so it need not know.
                constraints.append((code, string(name) + r.rest()))
        else:
            raise AgentMessageError(f"unknown key constraint {code}")
    if constrained and not constraints:
        raise AgentMessageError("a constrained add names no constraint")
    r.end()
    return AddIdentity(key_type, fields, comment, tuple(constraints))


# -- replies ------------------------------------------------------------------------------------
def identities_answer(identities: list[tuple[bytes, str]]) -> bytes:
    """IDENTITIES_ANSWER for (key blob, comment) pairs, as a frame."""
    body = uint32(len(identities)) + b"".join(
        string(blob) + string(comment) for blob, comment in identities
    )
    return frame(IDENTITIES_ANSWER, body)


def sign_response(signature: bytes) -> bytes:
    """SIGN_RESPONSE as a frame (built in one step: it is the hot path)."""
    return struct.pack(">IBI", len(signature) + 5, SIGN_RESPONSE, len(signature)) + signature


def extension_response(name: str, contents: bytes) -> bytes:
    return frame(EXTENSION_RESPONSE, string(name) + contents)


FAILURE_FRAME = frame(FAILURE)
SUCCESS_FRAME = frame(SUCCESS)
EXTENSION_FAILURE_FRAME = frame(EXTENSION_FAILURE)
