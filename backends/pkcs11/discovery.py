"""Discovery of a PKCS#11 token: loading the module, finding the token, and what it can do.

`Pkcs11Discovery` is a mixin of `Pkcs11Backend`. `_connect` loads the module (with the
config's `env`) and finds the token by label; every way that can fail becomes a
`BackendUnavailable` naming what to fix. Capabilities come from the token's mechanism list
(C_GetMechanismList, once) against `_REQUIREMENTS`; the OAEP variants the token decrypts
are probed once with a throwaway session key pair. `_missing` and `_no_oaep` say which
mechanism a refused operation lacks.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from strongroom import algorithms
from strongroom.backend import Capability
from strongroom.errors import BackendUnavailable
from strongroom.types import KeyType, Operation

from .keys import _EC_TYPES, _RSA_TYPES
from .token import (
    IMPORT_ERROR,
    Module,
    SessionPool,
    find_token,
    load_module,
    missing_module_reason,
    module_environment,
    token_labels,
    with_public_session,
)

if IMPORT_ERROR is None:
    from pkcs11 import MGF, Attribute, Mechanism, PKCS11Error
    from pkcs11 import KeyType as P11KeyType
    from pkcs11 import exceptions as p11

# (key type, operation) → the mechanisms the token must offer for it. Verification and
# RSA encryption run on the host with the public key, so they need none.
_REQUIREMENTS: dict[Capability, tuple[str, ...]] = {}
for _t in _EC_TYPES:
    _REQUIREMENTS.update(
        {
            (_t, Operation.GENERATE): ("EC_KEY_PAIR_GEN",),
            (_t, Operation.SIGN): ("ECDSA",),
            (_t, Operation.VERIFY): ("ECDSA",),
            (_t, Operation.AGREE): ("ECDH1_DERIVE",),
            (_t, Operation.DELETE): (),
        }
    )
_REQUIREMENTS.update(
    {
        (KeyType.ED25519, Operation.GENERATE): ("EC_EDWARDS_KEY_PAIR_GEN",),
        (KeyType.ED25519, Operation.SIGN): ("EDDSA",),
        (KeyType.ED25519, Operation.VERIFY): ("EDDSA",),
        (KeyType.ED25519, Operation.DELETE): (),
    }
)
for _t in _RSA_TYPES:
    _REQUIREMENTS.update(
        {
            (_t, Operation.GENERATE): ("RSA_PKCS_KEY_PAIR_GEN",),
            (_t, Operation.SIGN): ("RSA_PKCS",),
            (_t, Operation.VERIFY): ("RSA_PKCS",),
            (_t, Operation.ENCRYPT): ("RSA_PKCS_OAEP",),
            (_t, Operation.DECRYPT): ("RSA_PKCS_OAEP",),
            (_t, Operation.DELETE): (),
        }
    )
_REQUIREMENTS.update(
    {
        (KeyType.AES_256, Operation.GENERATE): ("AES_KEY_GEN",),
        (KeyType.AES_256, Operation.IMPORT): (),
        (KeyType.AES_256, Operation.ENCRYPT): ("AES_GCM",),
        (KeyType.AES_256, Operation.DECRYPT): ("AES_GCM",),
        (KeyType.AES_256, Operation.WRAP): ("AES_KEY_WRAP_PAD",),
        (KeyType.AES_256, Operation.UNWRAP): ("AES_KEY_WRAP_PAD",),
        (KeyType.AES_256, Operation.DELETE): (),
        (KeyType.HMAC_SHA256, Operation.GENERATE): ("GENERIC_SECRET_KEY_GEN",),
        (KeyType.HMAC_SHA256, Operation.IMPORT): (),
        (KeyType.HMAC_SHA256, Operation.SIGN): ("SHA256_HMAC",),
        (KeyType.HMAC_SHA256, Operation.VERIFY): ("SHA256_HMAC",),
        (KeyType.HMAC_SHA256, Operation.DELETE): (),
    }
)
_STATIC_CAPABILITIES = frozenset(_REQUIREMENTS)


_OAEP: Any = None  # (SHA-256, MGF1-SHA-256, no label) once python-pkcs11 is known present
_OAEP_SHA1: Any = None  # for tokens such as SoftHSM2 whose OAEP takes SHA-1 only
if IMPORT_ERROR is None:
    _OAEP = (Mechanism.SHA256, MGF.SHA256, None)
    _OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)


def _mechanism_value(name: str) -> int:
    return int(getattr(Mechanism, name))


class Pkcs11Discovery:
    """Mixin of `Pkcs11Backend`: `availability`, `capabilities`, `status` and `_connect`."""

    if TYPE_CHECKING:  # Pkcs11Backend's, and Backend's
        name: str
        module_path: str
        token_label: str
        env: dict[str, str]
        env_override: bool
        _env_kept: tuple[str, ...]
        _lock: threading.RLock
        _module: Module | None
        _token: Any
        _pool: SessionPool | None
        _mechanisms: frozenset[int] | None
        _capabilities: frozenset[Capability] | None
        _oaep_variants: tuple[str, ...] | None

    def availability(self) -> str | None:
        """PKCS#11: C_Initialize (once), C_GetSlotList and C_GetTokenInfo: is the token there?"""
        if self._pool is not None:
            return None
        try:
            self._connect()
        except BackendUnavailable as e:
            return e.reason
        return None

    def _connect(self) -> tuple[Module, Any]:
        """Load the module and find the token; BackendUnavailable with a reason if not."""
        if IMPORT_ERROR is not None:
            raise BackendUnavailable(
                self.name,
                f"python-pkcs11 is not installed ({IMPORT_ERROR}); "
                "pip install 'strongroom[pkcs11]'",
            )
        if not os.path.isfile(self.module_path):
            raise BackendUnavailable(self.name, missing_module_reason(self.module_path))
        env, self._env_kept = module_environment(self.env, self.env_override)
        try:
            module = load_module(self.module_path, env)
        except BackendUnavailable as e:
            raise BackendUnavailable(self.name, e.reason) from None
        except (OSError, PKCS11Error) as e:
            raise BackendUnavailable(
                self.name,
                f"cannot load {self.module_path} as a PKCS#11 module: {e}{self._env_note()}",
            ) from e
        try:
            token = find_token(module, self.token_label)
        except BackendUnavailable as e:
            raise BackendUnavailable(self.name, e.reason) from None
        except PKCS11Error as e:
            raise BackendUnavailable(
                self.name, f"{self.module_path} failed to list its tokens: {type(e).__name__}"
            ) from e
        if token is None:
            present = ", ".join(repr(label) for label in token_labels(module)) or "none"
            raise BackendUnavailable(
                self.name,
                f"no token labelled {self.token_label!r} in {self.module_path} "
                f"(tokens present: {present}); initialise one (for SoftHSM2: softhsm2-util "
                f"--init-token --free --label {self.token_label}) or correct `token`"
                f"{self._env_note()}",
            )
        with self._lock:
            self._module = module
            if self._pool is None:
                self._token = token
        return module, token

    def _env_note(self) -> str:
        """Why the module may see other settings than the config's `env`, for a message."""
        if not self._env_kept:
            return ""
        names = ", ".join(self._env_kept)
        return (
            f"; note: {names} exported in the environment was used instead of the value in "
            "`env` (unset it, or set env_override = true)"
        )

    def capabilities(self) -> frozenset[Capability]:
        """PKCS#11: C_GetMechanismList (once): what this token can do, by mechanism."""
        caps = self._capabilities
        if caps is not None:
            return caps
        mechanisms = self._mechanism_set()
        if mechanisms is None:  # not reachable now: claim what we could do; open() will say why not
            return _STATIC_CAPABILITIES
        found = {
            cap
            for cap, needs in _REQUIREMENTS.items()
            if all(_mechanism_value(n) in mechanisms for n in needs)
        }
        if (KeyType.RSA_2048, Operation.DECRYPT) in found and not self.rsa_encrypt_algorithms():
            found -= {(t, op) for t in _RSA_TYPES for op in (Operation.ENCRYPT, Operation.DECRYPT)}
        caps = frozenset(found)
        self._capabilities = caps
        return caps

    def rsa_encrypt_algorithms(self) -> tuple[str, ...]:
        """Which OAEP variants this token decrypts: SoftHSM2 takes SHA-1 only.

        PKCS#11: C_GenerateKeyPair (a throwaway 1024-bit session key pair, no login needed),
        then per variant C_Encrypt and C_Decrypt with CKM_RSA_PKCS_OAEP (SHA-256 and
        MGF1-SHA-256, SHA-1 and MGF1-SHA-1; no label), once per backend. The keystore records
        the first with each RSA key that may encrypt, so encrypt and decrypt agree.
        """
        if self._oaep_variants is not None:
            return self._oaep_variants
        if not self._has("RSA_PKCS_OAEP"):
            return ()
        try:
            module, token = self._connect()
        except BackendUnavailable:
            return algorithms.RSA_ENCRYPT_ALGORITHMS  # not cached: asked again once it is back

        def probe(session: Any) -> tuple[str, ...]:
            public, private = session.generate_keypair(
                P11KeyType.RSA,
                1024,
                store=False,
                capabilities=0,
                public_template={Attribute.ENCRYPT: True, Attribute.PRIVATE: False},
                private_template={Attribute.DECRYPT: True, Attribute.PRIVATE: False},
            )
            works = []
            try:
                for name, params in (("oaep-sha256", _OAEP), ("oaep-sha1", _OAEP_SHA1)):
                    try:
                        ct = public.encrypt(
                            b"probe", mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                        )
                        pt = private.decrypt(
                            ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                        )
                    except (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid):
                        continue
                    if bytes(pt) == b"probe":
                        works.append(name)
            finally:
                public.destroy()
                private.destroy()
            return tuple(works)

        try:
            found = tuple(with_public_session(module, token, probe))
        except PKCS11Error:  # the token would not make the probe key: assume the standard one
            found = ("oaep-sha256",)
        self._oaep_variants = found
        return found

    def _mechanism_set(self) -> frozenset[int] | None:
        """PKCS#11: C_GetMechanismList, once."""
        if self._mechanisms is not None:
            return self._mechanisms
        try:
            _, token = self._connect()
            found = frozenset(int(m) for m in token.slot.get_mechanisms())
        except (BackendUnavailable, PKCS11Error):
            return None
        self._mechanisms = found
        return found

    def _serial(self) -> str:
        return bytes(self._token.serial).decode("ascii", "replace").strip()

    def _has(self, mechanism: str) -> bool:
        mechanisms = self._mechanism_set()
        return mechanisms is None or _mechanism_value(mechanism) in mechanisms

    def status(self) -> dict[str, Any]:
        """From C_GetTokenInfo (already read): serial, manufacturer, model; and the pool."""
        out: dict[str, Any] = {"module": self.module_path, "token": self.token_label}
        token, module, pool = self._token, self._module, self._pool
        if token is not None:
            out.update(
                serial=self._serial(),
                manufacturer=str(token.manufacturer_id),
                model=str(token.model),
            )
        if module is not None:
            out["concurrent_calls"] = module.concurrent
        if self.env:
            # Where each variable's value came from; never the values (they may be secrets).
            out["env"] = {
                name: "environment" if name in self._env_kept else "config" for name in self.env
            }
        out["logged_in"] = pool is not None
        if pool is not None:
            out["sessions"] = pool.stats()
        return out

    def _no_oaep(self) -> str:
        if not self._has("RSA_PKCS_OAEP"):
            return f"token {self.token_label!r} has no CKM_RSA_PKCS_OAEP"
        variants = self.rsa_encrypt_algorithms()
        if not variants:
            return (
                f"token {self.token_label!r} decrypts CKM_RSA_PKCS_OAEP with neither "
                "SHA-256 nor SHA-1"
            )
        if variants == ("oaep-sha1",):
            return (
                f"token {self.token_label!r} takes CKM_RSA_PKCS_OAEP only with SHA-1; "
                "encrypt and decrypt with algorithm oaep-sha1 (CLI: --algorithm oaep-sha1)"
            )
        return f"token {self.token_label!r} decrypts RSA-OAEP only as {', '.join(variants)}"

    def _missing(self, key_type: KeyType, op: Operation) -> str:
        needs = _REQUIREMENTS.get((key_type, op))
        if needs is None:
            return "the pkcs11 backend does not offer it"
        names = ", ".join(f"CKM_{n}" for n in needs if not self._has(n))
        if names:
            return f"token {self.token_label!r} lacks {names}"
        if key_type in _RSA_TYPES and op in (Operation.ENCRYPT, Operation.DECRYPT):
            return self._no_oaep()
        return ""
