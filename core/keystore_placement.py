"""Where a new key goes and what it is: the checked catalog entry of a new key (name, type,
usage), the backend chosen for it (the named one, or the first in `order` that can), and
the RSA-OAEP variant an RSA encryption key is made for.

`KeyPlacement` is a mixin of `Keystore` (docs/decisions.md, "Modules split along their
banners"); the code moved verbatim from keystore.py's helpers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from . import algorithms
from .backend import Backend
from .catalog import now
from .config import Config
from .errors import BackendUnavailable, InvalidArgument, UnsupportedOperation
from .types import KeyInfo, KeyType, Operation, Usage

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+/-]{0,127}")


class KeyPlacement:
    """Mixin of `Keystore`: new keys' catalog entries, and the backend each one goes to."""

    # Set by Keystore.__init__.
    config: Config
    namespace: str
    _backends: dict[str, Backend]
    _unusable: dict[str, tuple[str, str]]

    if TYPE_CHECKING:  # Keystore's

        def _ready(self, backend: Backend) -> Backend: ...
        def backend(self, name: str) -> Backend: ...
        def _skip_optional(
            self, name: str, reason: str, op: Operation, key_type: KeyType, key: str | None
        ) -> None: ...

    def _new_info(
        self,
        name: str,
        key_type: KeyType | str,
        usage: Any,
        exportable: bool,
        backend: str,
    ) -> KeyInfo:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidArgument(
                "key names are 1-128 characters: letters, digits and . _ @ : + / -, "
                "starting with a letter or digit"
            )
        ktype = KeyType.parse(key_type)
        usages = Usage.parse_set(usage)
        if usages is None:
            usages = ktype.default_usage
        if not usages and ktype is not KeyType.SECRET:  # a secret has none: it is only kept
            raise InvalidArgument("a key needs at least one usage")
        bad = usages - ktype.allowed_usage
        if bad:
            allowed = ", ".join(sorted(u.value for u in ktype.allowed_usage))
            raise InvalidArgument(
                f"{ktype.value} keys cannot have usage {', '.join(sorted(u.value for u in bad))}; "
                f"allowed: {allowed}"
            )
        return KeyInfo(
            name=name,
            type=ktype,
            backend=backend,
            usage=usages,
            exportable=bool(exportable),
            namespace=self.namespace,
            created=now(),
        )

    def _choose_backend(
        self, key_type: KeyType, op: Operation, backend: str | None, key: str | None = None
    ) -> Backend:
        """The named backend, or the first in `order` that can do `op` with `key_type`.

        A backend that cannot hold the type is passed over (Ed25519 on a TPM goes to the
        vault; the result names where the key went). One that is unavailable is never passed
        over silently: it stops the search with BackendUnavailable, unless its config marks it
        `optional`, when it is skipped with a warning and an audit record.
        """
        if backend is not None:
            b = self.backend(backend)
            if not b.supports(key_type, op):
                raise b.unsupported(op, key_type)
            return self._ready(b)
        for name in self.config.order:
            found = self._backends.get(name)
            reason = self._unusable[name][1] if found is None else found.availability()
            if found is not None and reason is None:
                if not found.supports(key_type, op):
                    continue  # the type goes to a store that can hold it: not a downgrade
                try:
                    return self._ready(found)
                except BackendUnavailable as e:  # found at open (the token, the SRK, ...)
                    reason = e.reason
            assert reason is not None  # every path that gets here has one
            if not self.config.backends[name].optional:
                raise BackendUnavailable(
                    name,
                    f"{reason} (no later backend in `order` is tried instead: name one "
                    f"explicitly, or set optional = true in [backends.{name}])",
                )
            self._skip_optional(name, reason, op, key_type, key)
        raise UnsupportedOperation(
            ", ".join(self.config.order), op.value, key_type.value, "no configured backend can"
        )

    def _rsa_encrypt_attributes(self, b: Backend, info: KeyInfo) -> dict[str, str]:
        """The OAEP variant an RSA key that may encrypt or decrypt will use, for its catalog
        attributes; refuse the key if its backend can decrypt with none.

        Chosen once, when the key is made, so encrypt and decrypt agree however the token is
        probed later: SoftHSM2 decrypts OAEP with SHA-1 only, and a ciphertext made with
        SHA-256 to such a key could never be decrypted.
        """
        if not info.type.is_rsa or not info.usage & {Usage.ENCRYPT, Usage.DECRYPT}:
            return {}
        variants = algorithms.rsa_decrypt_algorithms(b)
        if not variants or not b.supports(info.type, Operation.DECRYPT):
            why = str(b.unsupported(Operation.DECRYPT, info.type))
            raise UnsupportedOperation(
                b.name,
                "generate",
                info.type.value,
                f"a key with the encrypt or decrypt usage must be one it can decrypt with ({why})",
            )
        return {algorithms.RSA_ENCRYPT_ATTRIBUTE: variants[0]}

    @staticmethod
    def _rsa_encrypt_algorithm(b: Backend, info: KeyInfo, algorithm: str | None) -> str:
        """The OAEP variant to encrypt to `info` with: `algorithm`, else the key's own; refused
        (UnsupportedOperation) when its backend could not decrypt the result."""
        chosen = algorithms.check_rsa_encrypt_algorithm(
            algorithm or info.attributes.get(algorithms.RSA_ENCRYPT_ATTRIBUTE)
        )
        variants = algorithms.rsa_decrypt_algorithms(b)
        if chosen not in variants:
            raise UnsupportedOperation(
                b.name,
                "encrypt",
                info.type.value,
                f"it could not decrypt RSA-OAEP {chosen}: it decrypts only "
                f"{', '.join(variants) or 'none'}; use --algorithm (algorithm=) "
                f"{variants[0] if variants else 'with a key in another backend'}",
            )
        return chosen
