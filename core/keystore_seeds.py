"""Seed procedures through the keystore: BIP-39 seeds (generate, recover) and SLIP-0010
derivation from them, on a backend that offers `SeedProcedures` (the vault).

`KeySeeds` is a mixin of `Keystore`: each method is one audited keystore operation that
makes a key, through the keystore's `_create` (backend key first, then the catalog row).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from .backend import Backend, NewKey, SeedProcedures
from .catalog import Catalog
from .config import Config
from .errors import InvalidArgument, UnsupportedOperation
from .types import KeyInfo, KeyType, Operation


class KeySeeds:
    """Mixin of `Keystore`: BIP-39 and SLIP-0010."""

    # Set by Keystore.__init__.
    config: Config
    namespace: str
    catalog: Catalog

    if TYPE_CHECKING:  # Keystore's

        def _audited(
            self, op: str, key: str | None, payload: Any = None, **detail: Any
        ) -> contextlib.AbstractContextManager[dict[str, Any]]: ...
        def _ready(self, backend: Backend) -> Backend: ...
        def backend(self, name: str) -> Backend: ...
        def _key(
            self, name: str, op: Operation | None, facts: dict[str, Any], version: int | None = None
        ) -> tuple[KeyInfo, Backend]: ...
        @property
        def vault(self) -> Backend: ...
        def _new_info(
            self,
            name: str,
            key_type: KeyType | str,
            usage: Any,
            exportable: bool,
            backend: str,
        ) -> KeyInfo: ...
        def _create(self, info: KeyInfo, backend: Backend, make: Any) -> KeyInfo: ...

    def _seed_backend(self, backend: str | None) -> tuple[Backend, SeedProcedures]:
        b = self._ready(self.backend(backend) if backend else self.vault)
        if not isinstance(b, SeedProcedures):
            raise UnsupportedOperation(b.name, "bip39", KeyType.SEED.value)
        return b, b

    def bip39_generate(
        self, name: str, words: int = 24, passphrase: str = "", backend: str | None = None
    ) -> tuple[KeyInfo, str]:
        """Store a new BIP39 seed as key `name`; return it and the mnemonic (shown only once)."""
        with self._audited("bip39_generate", name, words=words) as facts:
            b, procs = self._seed_backend(backend)
            info = self._new_info(name, KeyType.SEED, None, False, b.name)
            facts["backend"] = b.name
            words_out: list[str] = []

            def make(new: NewKey) -> str:
                handle, mnemonic = procs.bip39_generate(new, words, passphrase)
                words_out.append(mnemonic)
                return handle

            created = self._create(info, b, make)
            return created, words_out[0]

    def bip39_recover(
        self, name: str, mnemonic: str, passphrase: str = "", backend: str | None = None
    ) -> KeyInfo:
        """Store the seed of an existing BIP39 mnemonic as key `name`."""
        with self._audited("bip39_recover", name) as facts:
            b, procs = self._seed_backend(backend)
            info = self._new_info(name, KeyType.SEED, None, False, b.name)
            facts["backend"] = b.name
            return self._create(info, b, lambda n: procs.bip39_recover(n, mnemonic, passphrase))

    def slip10_derive(
        self,
        seed: str,
        path: str,
        new_name: str,
        key_type: KeyType | str = KeyType.ED25519,
        usage: Any = None,
        exportable: bool = False,
    ) -> KeyInfo:
        """Derive an ed25519 or secp256k1 key at SLIP-0010 `path` from seed key `seed`."""
        with self._audited("slip10_derive", seed, new_key=new_name, path=path) as facts:
            src, b = self._key(seed, Operation.DERIVE, facts)
            if src.type is not KeyType.SEED:
                raise InvalidArgument(f"key {seed!r} is not a seed")
            if not isinstance(b, SeedProcedures):
                raise UnsupportedOperation(b.name, "slip10", src.type.value)
            procs = b
            new = self._new_info(new_name, key_type, usage, exportable, b.name)
            if new.type not in (KeyType.ED25519, KeyType.SECP256K1):
                raise InvalidArgument("SLIP-0010 derives ed25519 or secp256k1 keys")
            return self._create(new, b, lambda n: procs.slip10_derive(src, path, n))
