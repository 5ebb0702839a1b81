"""Key types, usages and the description of a stored key."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from .errors import InvalidArgument


def _normalize(value: object) -> str:
    """`ED25519`, `Ecdsa-P256`, `ECDSA_P256` (the Python member name) → the canonical value."""
    return str(value).strip().lower().replace("_", "-")


class KeyType(enum.StrEnum):
    """Every key type Strongroom knows; a backend supports a subset."""

    ED25519 = "ed25519"
    X25519 = "x25519"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    SECP256K1 = "secp256k1"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    AES_256 = "aes-256"
    HMAC_SHA256 = "hmac-sha256"
    CHACHA20_POLY1305 = "chacha20-poly1305"
    SEED = "seed"
    FIDO_ES256 = "fido-es256"
    FIDO_EDDSA = "fido-eddsa"
    SECRET = "secret"  # noqa: S105 - the type's name, not a password
    """Opaque secret data (a password, a KMIP Secret Data or Opaque Object): 1 to
    SECRET_MAX bytes, sealed like every key, imported and exported raw; no usage, no
    operation but export (docs/cli.md, key types)."""

    @classmethod
    def parse(cls, value: KeyType | str) -> KeyType:
        """Accept a member or its string; anything else is an InvalidArgument."""
        if isinstance(value, KeyType):
            return value
        try:
            return cls(_normalize(value))
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise InvalidArgument(f"unknown key type {value!r}; known types: {known}") from None

    @property
    def is_asymmetric(self) -> bool:
        return self not in _SYMMETRIC

    @property
    def is_rsa(self) -> bool:
        return self in (KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096)

    @property
    def is_ecdsa(self) -> bool:
        return self in (KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.SECP256K1)

    @property
    def is_fido(self) -> bool:
        """A FIDO2 credential: it lives only in an authenticator, and `sign` returns a WebAuthn
        assertion structure (docs/fido.md), not a raw signature over the data."""
        return self in (KeyType.FIDO_ES256, KeyType.FIDO_EDDSA)

    @property
    def default_usage(self) -> frozenset[Usage]:
        return _DEFAULT_USAGE[self]

    @property
    def allowed_usage(self) -> frozenset[Usage]:
        return _ALLOWED_USAGE[self]


_SYMMETRIC = frozenset(
    {KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.CHACHA20_POLY1305, KeyType.SEED, KeyType.SECRET}
)
SECRET_MAX = 64 * 1024
"""The largest `secret` (KeyType.SECRET), in bytes."""


class Usage(enum.StrEnum):
    """What a key may be used for, fixed when the key is created."""

    SIGN = "sign"
    VERIFY = "verify"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    WRAP = "wrap"
    UNWRAP = "unwrap"
    DERIVE = "derive"
    AGREE = "agree"

    @classmethod
    def parse_set(cls, values: Iterable[Usage | str] | str | None) -> frozenset[Usage] | None:
        """Parse a usage list ("sign,verify" or an iterable); None stays None."""
        if values is None:
            return None
        if isinstance(values, str):
            values = [v for v in values.replace(" ", ",").split(",") if v]
        out = set()
        for v in values:
            try:
                out.add(v if isinstance(v, Usage) else cls(_normalize(v)))
            except ValueError:
                known = ", ".join(u.value for u in cls)
                raise InvalidArgument(f"unknown usage {v!r}; known usages: {known}") from None
        return frozenset(out)


_S, _V, _E, _D = Usage.SIGN, Usage.VERIFY, Usage.ENCRYPT, Usage.DECRYPT
_W, _U, _DR, _AG = Usage.WRAP, Usage.UNWRAP, Usage.DERIVE, Usage.AGREE

_ALLOWED_USAGE: dict[KeyType, frozenset[Usage]] = {
    KeyType.ED25519: frozenset({_S, _V}),
    KeyType.X25519: frozenset({_AG}),
    KeyType.ECDSA_P256: frozenset({_S, _V, _AG}),
    KeyType.ECDSA_P384: frozenset({_S, _V, _AG}),
    KeyType.SECP256K1: frozenset({_S, _V, _AG}),
    KeyType.RSA_2048: frozenset({_S, _V, _E, _D, _W, _U}),
    KeyType.RSA_3072: frozenset({_S, _V, _E, _D, _W, _U}),
    KeyType.RSA_4096: frozenset({_S, _V, _E, _D, _W, _U}),
    KeyType.AES_256: frozenset({_E, _D, _W, _U, _DR}),
    KeyType.HMAC_SHA256: frozenset({_S, _V, _DR}),
    KeyType.CHACHA20_POLY1305: frozenset({_E, _D, _DR}),
    KeyType.SEED: frozenset({_DR}),
    KeyType.FIDO_ES256: frozenset({_S, _V, _DR}),  # derive: hmac-secret
    KeyType.FIDO_EDDSA: frozenset({_S, _V, _DR}),
    KeyType.SECRET: frozenset(),  # a secret is only kept and exported
}

_DEFAULT_USAGE: dict[KeyType, frozenset[Usage]] = {
    KeyType.ED25519: frozenset({_S, _V}),
    KeyType.X25519: frozenset({_AG}),
    KeyType.ECDSA_P256: frozenset({_S, _V}),
    KeyType.ECDSA_P384: frozenset({_S, _V}),
    KeyType.SECP256K1: frozenset({_S, _V}),
    KeyType.RSA_2048: frozenset({_S, _V}),
    KeyType.RSA_3072: frozenset({_S, _V}),
    KeyType.RSA_4096: frozenset({_S, _V}),
    KeyType.AES_256: frozenset({_E, _D}),
    KeyType.HMAC_SHA256: frozenset({_S, _V}),
    KeyType.CHACHA20_POLY1305: frozenset({_E, _D}),
    KeyType.SEED: frozenset({_DR}),
    KeyType.FIDO_ES256: frozenset({_S, _V}),
    KeyType.FIDO_EDDSA: frozenset({_S, _V}),
    KeyType.SECRET: frozenset(),
}


class Operation(enum.StrEnum):
    """Backend operations, as named in capabilities and errors."""

    GENERATE = "generate"
    IMPORT = "import"
    EXPORT = "export"
    SIGN = "sign"
    VERIFY = "verify"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    AGREE = "agree"
    DERIVE = "derive"
    MAC = "mac"
    WRAP = "wrap"
    UNWRAP = "unwrap"
    DELETE = "delete"

    @property
    def usage(self) -> Usage | None:
        """The usage a key needs for this operation, if any."""
        return OPERATION_USAGE.get(self)


OPERATION_USAGE = {
    Operation.SIGN: Usage.SIGN,
    Operation.VERIFY: Usage.VERIFY,
    Operation.ENCRYPT: Usage.ENCRYPT,
    Operation.DECRYPT: Usage.DECRYPT,
    Operation.AGREE: Usage.AGREE,
    Operation.DERIVE: Usage.DERIVE,
    Operation.WRAP: Usage.WRAP,
    Operation.UNWRAP: Usage.UNWRAP,
}


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key: where it lives. The primary version is the newest."""

    version: int
    backend: str
    created: datetime
    handle: str = field(default="", repr=False)
    attributes: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class KeyInfo:
    """What the catalog knows about a key: never any secret material."""

    name: str
    type: KeyType
    backend: str
    usage: frozenset[Usage]
    exportable: bool = False
    namespace: str = "default"
    version: int = 1
    created: datetime | None = None
    handle: str = field(default="", repr=False)
    attributes: dict[str, str] = field(default_factory=dict, compare=False)
    min_decryption_version: int = 1
    """Versions older than this no longer decrypt or verify (docs/lifecycle.md)."""
    disabled: bool = False
    delete_after: datetime | None = None
    """When a scheduled deletion is due; None when none is scheduled."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view, as the CLI's --json prints it."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "type": self.type.value,
            "backend": self.backend,
            "usage": sorted(u.value for u in self.usage),
            "exportable": self.exportable,
            "version": self.version,
            "created": self.created.isoformat() if self.created else None,
            "attributes": dict(self.attributes),
            "min_decryption_version": self.min_decryption_version,
            "disabled": self.disabled,
            "delete_after": self.delete_after.isoformat() if self.delete_after else None,
        }
