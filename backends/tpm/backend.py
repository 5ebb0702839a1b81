"""The TPM 2.0 backend: keys that live in this machine's TPM, through tpm2-pytss (ESAPI).

Keys are children of the storage root key (SRK); their public and private blobs are
kept in the catalog handle (`blob.py`), so they survive TPM restarts and resets.
ECDSA, RSA (PKCS#1 v1.5, PSS, OAEP), ECDH, HMAC and AES-256 (CFB + HMAC) run in the
TPM; hashing is done on the host. The backend also seals the vault master key to the
TPM (`Sealer`, optionally bound to PCRs and a PIN; sealer.py) and attests its keys with
TPM2_Certify (`Attester`). Discovery (reaching the TPM, its capabilities) is discovery.py.
See docs/tpm.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strongroom import algorithms
from strongroom.backend import Backend, BackendContext, Capability, ConfigKey, NewKey
from strongroom.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    DeviceLocked,
    IntegrityError,
    InvalidArgument,
    StrongroomError,
    UnsupportedOperation,
)
from strongroom.memory import scrub_bytes
from strongroom.types import KeyInfo, KeyType, Operation, Usage

from . import attestation, structures
from .blob import KeyBlob
from .discovery import TpmDiscovery
from .sealer import TpmSealer

try:
    from . import device
except (ImportError, OSError):  # tpm2-pytss missing: discovery.py says why (availability)
    device = None  # type: ignore[assignment]

DEFAULT_TCTI = "device:/dev/tpmrm0"
MAX_PIN_BYTES = 32  # a TPM auth value is at most the name hash's size (SHA-256)
_AEAD_LABEL = b"strongroom-tpm-aes256-cfb-hmac-sha256-v1"
_IV = 16
_TAG = 32
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}


@dataclass(frozen=True)
class _Key:
    """A catalog handle decoded once: its blob, first public area, public key and LRU refs."""

    blob: KeyBlob
    area: structures.PublicArea
    public: PublicKeyTypes | None
    refs: tuple[Any, ...]  # device.KeyRef per part, without the PIN


COUNTER_INDEX_BASE = 0x01350000
"""NV counters live at 0x01350000 + the first two bytes of the label's SHA-256, inside the
owner's range of NV indices (0x01000000 to 0x013FFFFF in TCG's handle registry). Two vaults
whose labels meet (one chance in 65,536 for two vaults on one TPM) share a counter; each
then reads the other's changes as newer than its own manifest, so they fail safe: a false
rollback report, never a missed one."""
_MAX_COUNTER_STEPS = 1000


def counter_index(label: str) -> int:
    """The NV index of the counter for `label` (a vault id)."""
    return COUNTER_INDEX_BASE + int.from_bytes(hashlib.sha256(label.encode()).digest()[:2], "big")


class TpmBackend(TpmDiscovery, TpmSealer, Backend):
    """Keys in a TPM 2.0 (real, or swtpm for tests), reached through a TCTI."""

    type_name = "tpm"
    config_keys = {
        # No default here: __init__ must see whether tcti was given, to refuse it together
        # with swtpm_state; DEFAULT_TCTI applies when neither is.
        "tcti": ConfigKey(
            str, "how to reach the TPM: device:/dev/tpmrm0 (default), tabrmd or swtpm:host=H,port=P"
        ),
        "swtpm_state": ConfigKey(
            str,
            "an swtpm state directory run by swtpm/start.sh; the TPM is reached on the port "
            "recorded there, read at every connect (instead of tcti)",
        ),
        "persistent_handle": ConfigKey(
            (int, str),
            "keep the storage root key at this persistent handle, e.g. 0x81000001 "
            "(an existing key there is reused, never re-created)",
        ),
        "pin": ConfigKey(
            (str, list), "where key PINs come from: env:NAME, file:PATH or prompt", secret=True
        ),
        "pin_keys": ConfigKey(
            list, "name patterns (e.g. 'signer', 'prod-*') of keys created with the PIN", []
        ),
        "max_loaded_keys": ConfigKey(
            int, "keys kept loaded in TPM transient slots (default: the TPM's slots minus one)"
        ),
    }

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        s = context.settings
        state = s.get("swtpm_state")
        self.swtpm_state: Path | None = None
        if state is not None:
            if s.get("tcti") is not None:
                raise context.config_error(
                    "cannot be combined with tcti: give tcti for a fixed TCTI, or swtpm_state "
                    "for an swtpm started by swtpm/start.sh",
                    "swtpm_state",
                )
            if not str(state).strip():
                raise context.config_error("must name a directory", "swtpm_state")
            self.swtpm_state = Path(str(state)).expanduser().absolute()
            # Until the first connect reads the port, messages name the state directory.
            self.tcti = f"swtpm (state {self.swtpm_state})"
        else:
            self.tcti = str(s.get("tcti") or DEFAULT_TCTI)
            if ":" not in self.tcti and self.tcti not in ("tabrmd", "device", "mssim", "swtpm"):
                raise context.config_error(
                    "must be a TCTI like device:/dev/tpmrm0, tabrmd or swtpm:host=H,port=P",
                    "tcti",
                )
        self.persistent_handle = _parse_handle(s.get("persistent_handle"), context)
        self.pin_patterns = [str(p) for p in s.get("pin_keys", [])]
        max_loaded = s.get("max_loaded_keys")
        if max_loaded is not None and int(max_loaded) < 1:
            raise context.config_error("must be at least 1", "max_loaded_keys")
        self.pin_source = context.secret("pin", f"PIN for the TPM keys of backend {self.name!r}: ")
        self._pin: str | None = None
        self._device = (
            device.TpmDevice(self.tcti, self.persistent_handle, max_loaded) if device else None
        )
        self._keys: dict[str, _Key] = {}
        self._caps: frozenset[Capability] | None = None
        self._schemes: dict[tuple[KeyType, str | None], tuple[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"TpmBackend(name={self.name!r}, tcti={self.tcti!r})"

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect; the SRK is checked or created (TPM2_CreatePrimary, TPM2_EvictControl)."""
        self._connect()

    def close(self) -> None:
        """TPM2_FlushContext of every loaded key and session; Esys_Finalize."""
        if self._device is not None:
            self._device.close()
        self._keys.clear()
        self._pin = None

    # -- helpers -------------------------------------------------------------------------------
    def _dev(self) -> device.TpmDevice:
        dev = self._device
        if dev is None or not dev.is_open:
            return self._connect()
        return dev

    def _key(self, info: KeyInfo) -> _Key:
        key = self._keys.get(info.handle)
        if key is None:
            blob = KeyBlob.decode(info.handle)
            try:
                area = structures.parse_public_2b(blob.parts[0][0])
                public = area.public_key() if info.type.is_asymmetric else None
            except structures.StructureError as e:
                raise IntegrityError(f"key {info.name!r} has a damaged TPM public blob: {e}")
            prefix = hashlib.sha256(info.handle.encode()).hexdigest()[:24]
            refs = tuple(
                device.KeyRef(f"{prefix}#{i}", pub, priv)
                for i, (pub, priv) in enumerate(blob.parts)
            )
            key = _Key(blob, area, public, refs)
            self._keys[info.handle] = key
        return key

    def _ref(self, key: _Key, part: int = 0) -> Any:
        ref = key.refs[part]
        return replace(ref, auth=self._auth()) if key.blob.pin else ref

    def _auth(self) -> bytes:
        """The PIN as the keys' auth value, resolved once (a wrong one is forgotten)."""
        if self._pin is None:
            self._pin = self.pin_source.get()
        return _pin_bytes(self._pin)

    def _new_auth(self, wanted: bool) -> bytes | None:
        """The PIN for a new object, or None; asked for with confirmation when prompting."""
        if not wanted:
            return None
        if self._pin is None:
            self._pin = self.pin_source.get(confirm=True)
        return _pin_bytes(self._pin)

    def _wants_pin(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.pin_patterns)

    @contextlib.contextmanager
    def _errors(self, command: str, subject: str) -> Iterator[None]:
        """Turn TSS2 errors of `command` on `subject` (e.g. "key 'x'") into Strongroom's."""
        try:
            yield
        except device.TSS2_Exception as e:
            raise self._translate(e, command, subject) from e

    def _translate(self, e: Any, command: str, subject: str) -> StrongroomError:
        code = device.error_code(e)
        rc = device.TPM2_RC
        dev = self._device
        assert dev is not None
        if device.is_tcti_error(e):
            dev.lost()
            return BackendUnavailable(
                self.name, f"lost the connection to the TPM ({self.tcti}) during {command}: {e}"
            )
        if code in (rc.AUTH_FAIL, rc.BAD_AUTH):
            self._pin = None  # ask again next time; never retried here
            lock = self._lockout()
            where = (
                f"; the TPM's dictionary-attack counter is {lock.failures} of "
                f"{lock.max_failures}, and it forgets one failure every {lock.interval} s"
                if lock
                else ""
            )
            return AuthenticationFailed(
                f"wrong PIN for {subject}: the TPM refused {command}{where}",
                retries_left=lock.tries_left if lock else None,
            )
        if code == rc.LOCKOUT:
            lock = self._lockout()
            detail = (
                f" after {lock.failures} failed authorisations (of {lock.max_failures} "
                f"allowed); it forgets one failure every {lock.interval} s"
                if lock
                else ""
            )
            return DeviceLocked(
                f"the TPM is in dictionary-attack lockout and refused {command} for {subject}"
                f"{detail}, or its lockout authority can reset it "
                "(tpm2_dictionarylockout --clear-lockout); Strongroom never retries a PIN"
            )
        if code == rc.INTEGRITY:
            return IntegrityError(
                f"the TPM rejected {subject} in {command}: its blob is damaged, or was made "
                "under another storage key (another TPM, or before a TPM2_Clear)"
            )
        if code in (rc.OBJECT_MEMORY, rc.SESSION_MEMORY):
            return StrongroomError(
                f"the TPM has no free slot for {command} on {subject}: other programs hold "
                "its transient objects or sessions; use a resource manager (tpmrm0, tabrmd)"
            )
        return StrongroomError(f"{command} failed for {subject}: {e} (TPM rc 0x{int(e.rc):x})")

    def _lockout(self) -> Any:
        """The DA state for an error message; None if even that cannot be read."""
        try:
            return self._dev().lockout()
        except Exception:
            return None

    def _scheme(self, key_type: KeyType, algorithm: str | None) -> tuple[Any, Any]:
        """(hashlib constructor, TPMT_SIG_SCHEME) for a signature, built once per kind."""
        found = self._schemes.get((key_type, algorithm))
        if found is None:
            hash_name = algorithms.hash_name(key_type, algorithm)
            if key_type.is_ecdsa:
                kind = "ecdsa"
            else:
                kind = "rsapss" if algorithm == "pss" else "rsassa"
            facts = self._dev().facts
            if hash_name == "sha512" and (facts is None or not facts.has_alg("SHA512")):
                raise self.unsupported(
                    Operation.SIGN,
                    key_type,
                    "this TPM has no SHA-512, so no RSASSA with SHA-512 (pkcs1v15-sha512)",
                )
            hasher = getattr(hashlib, hash_name)
            found = (hasher, device.sign_scheme(kind, hash_name))
            self._schemes[(key_type, algorithm)] = found
        return found

    def _raw_scheme(self, key_type: KeyType, block: bytes) -> tuple[bytes, Any]:
        """(digest, RSASSA scheme) of a pkcs1v15-raw block that is a DigestInfo whose hash
        this TPM has; UnsupportedOperation for any other block."""
        parsed = algorithms.parse_digest_info(block)
        facts = self._dev().facts
        if parsed is None or parsed[0] == "sha224":
            raise self.unsupported(
                Operation.SIGN,
                key_type,
                "a TPM pads only a DigestInfo of SHA-1, SHA-256, SHA-384 or SHA-512 itself",
            )
        hash_name, digest = parsed
        if facts is None or not facts.has_alg(hash_name.upper()):
            raise self.unsupported(Operation.SIGN, key_type, f"this TPM has no {hash_name}")
        return digest, device.sign_scheme("rsassa", hash_name)

    def _check(self, op: Operation, key_type: KeyType) -> None:
        if (key_type, op) not in self.capabilities():
            raise self.unsupported(op, key_type)

    # -- key operations ----------------------------------------------------------------------------
    def generate(self, new: NewKey) -> str:
        """TPM2_Create under the SRK: the TPM generates the key (ECC, RSA, HMAC, or AES + HMAC)."""
        info = new.info
        self._check(Operation.GENERATE, info.type)
        if info.exportable:
            raise self.unsupported(
                Operation.GENERATE,
                info.type,
                "TPM keys never leave the TPM; create exportable keys in the vault",
            )
        auth = self._new_auth(self._wants_pin(info.name))
        pin = auth is not None
        usage = info.usage
        t = info.type
        dev = self._dev()
        with self._errors("TPM2_Create", f"new key {info.name!r}"):
            if t.is_ecdsa:
                agree = Usage.AGREE in usage
                sign = Usage.SIGN in usage or not agree
                curve = device.CURVE_P384 if t is KeyType.ECDSA_P384 else device.CURVE_P256
                parts = [dev.create(device.ecc_template(curve, sign, agree, pin), auth, None)]
            elif t.is_rsa:
                decrypt = bool(usage & {Usage.DECRYPT, Usage.UNWRAP})
                sign = Usage.SIGN in usage or not decrypt
                template = device.rsa_template(_RSA_BITS[t], sign, decrypt, pin)
                parts = [dev.create(template, auth, None)]
            elif t is KeyType.HMAC_SHA256:
                parts = [dev.create(device.hmac_template(pin, True), auth, None)]
            elif t is KeyType.AES_256:
                parts = [
                    dev.create(device.aes_template(pin, True), auth, None),
                    dev.create(device.hmac_template(pin, True), auth, None),
                ]
            else:  # pragma: no cover - capabilities exclude it
                raise self.unsupported(Operation.GENERATE, t)
        return KeyBlob(pin, tuple(parts)).encode()

    def public_key(self, info: KeyInfo) -> PublicKeyTypes:
        """From the public blob in the catalog (no TPM command)."""
        public = self._key(info).public
        if public is None:
            raise InvalidArgument(f"key {info.name!r} is a {info.type.value} key")
        return public

    def sign(self, info: KeyInfo, data: bytes, algorithm: str | None) -> bytes:
        """TPM2_Sign (ECDSA → DER, RSASSA with SHA-256 or SHA-512, or RSAPSS) of a host-made
        digest; TPM2_HMAC for HMAC."""
        if info.type is KeyType.HMAC_SHA256:
            if algorithm is not None:
                raise InvalidArgument("HMAC keys take no signature algorithm")
            return self._hmac(info, data)
        if not (info.type.is_ecdsa or info.type.is_rsa):
            raise self.unsupported(Operation.SIGN, info.type)
        hasher, _ = self._scheme(info.type, algorithm)
        return self.sign_digest(info, hasher(data).digest(), algorithm)

    def sign_digest(self, info: KeyInfo, digest: bytes, algorithm: str | None) -> bytes:
        """TPM2_Sign (ECDSA → DER, RSASSA or RSAPSS) of the caller's digest. A pkcs1v15-raw
        block is signed when it is a DigestInfo of SHA-1/256/384/512 (RSASSA with that hash:
        the same signature); the TPM pads no other block."""
        if not (info.type.is_ecdsa or info.type.is_rsa):
            raise self.unsupported(Operation.SIGN, info.type)
        key = self._key(info)
        if algorithm == algorithms.RSA_PKCS1V15_RAW:
            digest, scheme = self._raw_scheme(info.type, digest)
        else:
            _, scheme = self._scheme(info.type, algorithm)
        try:
            raw = self._dev().sign(self._ref(key), digest, scheme)
        except device.TSS2_Exception as e:
            raise self._translate(e, "TPM2_Sign", f"key {info.name!r}") from e
        return structures.parse_signature(raw).value

    def _hmac(self, info: KeyInfo, data: bytes, part: int = 0) -> bytes:
        key = self._key(info)
        with self._errors("TPM2_HMAC", f"key {info.name!r}"):
            return self._dev().hmac(self._ref(key, part), data)

    def verify(self, info: KeyInfo, data: bytes, signature: bytes, algorithm: str | None) -> None:
        """TPM2_HMAC, compared on the host in constant time; signatures with the public key."""
        if info.type is not KeyType.HMAC_SHA256:
            return super().verify(info, data, signature, algorithm)
        if not hmac.compare_digest(self._hmac(info, data), signature):
            raise InvalidSignature()

    def encrypt(self, info: KeyInfo, plaintext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """AES-256: TPM2_EncryptDecrypt2 (CFB, random IV), then TPM2_HMAC over aad, IV and
        ciphertext. Output: IV(16) ‖ ciphertext ‖ tag(32). (RSA is done by the keystore.)"""
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.ENCRYPT, info.type)
        if algorithm == algorithms.AES_KEY_WRAP:
            raise self.unsupported(Operation.WRAP, info.type, _NO_KEY_WRAP)
        _no_algorithm(algorithm)
        key = self._key(info)
        iv = os.urandom(_IV)
        subject = f"key {info.name!r}"
        dev = self._dev()
        with dev.lock:
            with self._errors("TPM2_EncryptDecrypt2", subject):
                ciphertext = dev.encrypt_decrypt(self._ref(key, 0), iv, plaintext, False)
            with self._errors("TPM2_HMAC", subject):
                tag = dev.hmac(self._ref(key, 1), _mac_input(aad, iv, ciphertext))
        return iv + ciphertext + tag

    def rsa_encrypt_algorithms(self) -> tuple[str, ...]:
        """TPM2_RSA_Decrypt is called with OAEP and SHA-256 only, so the keystore refuses to
        encrypt to a TPM RSA key with oaep-sha1 (the result could not be decrypted)."""
        return ("oaep-sha256",)

    def decrypt(self, info: KeyInfo, ciphertext: bytes, aad: bytes, algorithm: str | None) -> bytes:
        """RSA: TPM2_RSA_Decrypt (OAEP, SHA-256). AES-256: TPM2_HMAC check, then
        TPM2_EncryptDecrypt2. IntegrityError for a wrong key or damaged ciphertext."""
        if algorithm == algorithms.AES_KEY_WRAP and not info.type.is_rsa:
            raise self.unsupported(Operation.UNWRAP, info.type, _NO_KEY_WRAP)
        if not info.type.is_rsa:
            _no_algorithm(algorithm)
        elif algorithms.check_rsa_encrypt_algorithm(algorithm) != "oaep-sha256":
            raise self.unsupported(
                Operation.DECRYPT, info.type, "TPM RSA keys decrypt OAEP with SHA-256 only"
            )
        key = self._key(info)
        subject = f"key {info.name!r}"
        if info.type.is_rsa:
            if len(ciphertext) != _RSA_BITS[info.type] // 8:
                raise IntegrityError("RSA-OAEP ciphertext has the wrong length for this key")
            try:
                return self._dev().rsa_decrypt(self._ref(key), ciphertext)
            except device.TSS2_Exception as e:
                rc = device.TPM2_RC
                if device.error_code(e) in (rc.VALUE, rc.FAILURE, rc.SIZE, rc.SCHEME):
                    raise IntegrityError(
                        "RSA-OAEP decryption failed: wrong key or damaged ciphertext"
                    ) from None
                raise self._translate(e, "TPM2_RSA_Decrypt", subject) from e
        if info.type is not KeyType.AES_256:
            raise self.unsupported(Operation.DECRYPT, info.type)
        if len(ciphertext) < _IV + _TAG:
            raise IntegrityError("the ciphertext is too short to be one of this key's")
        iv, body, tag = ciphertext[:_IV], ciphertext[_IV:-_TAG], ciphertext[-_TAG:]
        dev = self._dev()
        with dev.lock:
            with self._errors("TPM2_HMAC", subject):
                expected = dev.hmac(self._ref(key, 1), _mac_input(aad, iv, body))
            if not hmac.compare_digest(expected, tag):
                raise IntegrityError(
                    "the ciphertext failed authentication: wrong key, wrong associated data, "
                    "or damaged ciphertext"
                )
            with self._errors("TPM2_EncryptDecrypt2", subject):
                return dev.encrypt_decrypt(self._ref(key, 0), iv, body, True)

    def exchange(self, info: KeyInfo, peer: PublicKeyTypes) -> bytes:
        """TPM2_ECDH_ZGen with the peer's point: the raw secret (the x coordinate), for the
        caller."""
        self._check(Operation.AGREE, info.type)
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise InvalidArgument("ECDH needs an EC peer public key")
        size = (peer.curve.key_size + 7) // 8
        numbers = peer.public_numbers()
        key = self._key(info)
        with self._errors("TPM2_ECDH_ZGen", f"key {info.name!r}"):
            shared = self._dev().ecdh_zgen(
                self._ref(key), numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
            )
        try:
            return bytes(shared)
        finally:
            scrub_bytes(shared)

    def agree(
        self, info: KeyInfo, peer: PublicKeyTypes, new: NewKey, salt: bytes, context: bytes
    ) -> str:
        """TPM2_ECDH_ZGen with the peer's point; HKDF-SHA256 on the host; TPM2_Create imports
        the output as a new TPM key (aes-256: 64 bytes, AES then HMAC key; hmac-sha256: 32)."""
        self._check(Operation.AGREE, info.type)
        target = new.info.type
        if (
            target not in (KeyType.AES_256, KeyType.HMAC_SHA256)
            or (
                target,
                Operation.GENERATE,
            )
            not in self.capabilities()
        ):
            raise UnsupportedOperation(
                self.name,
                "agree",
                target.value,
                "the TPM holds an agreed secret only as an aes-256 or hmac-sha256 key; "
                "agree with a vault key for other types",
            )
        if new.info.exportable:
            raise self.unsupported(Operation.AGREE, target, "TPM keys cannot be exportable")
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise InvalidArgument("ECDH needs an EC peer public key")
        size = (peer.curve.key_size + 7) // 8
        numbers = peer.public_numbers()
        key = self._key(info)
        dev = self._dev()
        with self._errors("TPM2_ECDH_ZGen", f"key {info.name!r}"):
            shared = dev.ecdh_zgen(
                self._ref(key), numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
            )
        length = 64 if target is KeyType.AES_256 else 32
        okm = bytearray(length)
        try:
            HKDF(hashes.SHA256(), length, salt or None, context).derive_into(shared, okm)
            auth = self._new_auth(self._wants_pin(new.info.name))
            pin = auth is not None
            with self._errors("TPM2_Create", f"new key {new.info.name!r}"):
                if target is KeyType.AES_256:
                    with memoryview(okm) as view:
                        parts = [
                            dev.create(device.aes_template(pin, False), auth, view[:32]),
                            dev.create(device.hmac_template(pin, False), auth, view[32:]),
                        ]
                else:
                    parts = [dev.create(device.hmac_template(pin, False), auth, okm)]
        finally:
            scrub_bytes(shared)
            scrub_bytes(okm)
        return KeyBlob(pin, tuple(parts)).encode()

    def delete(self, info: KeyInfo) -> None:
        """TPM2_FlushContext if loaded. The blob exists only in the catalog, which drops it."""
        key = self._keys.pop(info.handle, None)
        dev = self._device
        if key is not None and dev is not None and dev.is_open:
            for ref in key.refs:
                dev.unload(ref.cache_id)

    def random(self, n: int) -> bytes:
        """TPM2_GetRandom."""
        with self._errors("TPM2_GetRandom", "random bytes"):
            return self._dev().random(n)

    # -- MonotonicCounter (the vault's rollback check) -----------------------------------------
    def counter_read(self, label: str) -> int | None:
        """TPM2_NV_Read of the label's NV counter (docs/storage.md)."""
        index = counter_index(label)
        with self._counter_errors(index), self._errors("TPM2_NV_Read", f"counter 0x{index:08x}"):
            return self._dev().counter_read(index)

    def counter_advance(self, label: str, at_least: int) -> int:
        """TPM2_NV_Increment of the label's NV counter (TPM2_NV_DefineSpace first, in the
        owner hierarchy, when there is none) until it reaches `at_least`."""
        index = counter_index(label)
        what = f"counter 0x{index:08x}"
        with self._counter_errors(index), self._errors("TPM2_NV_Increment", what):
            dev = self._dev()
            value = dev.counter_read(index)
            for _ in range(_MAX_COUNTER_STEPS):
                if value is not None and value >= at_least:
                    return value
                value = dev.counter_increment(index)
        raise StrongroomError(
            f"the TPM's {what} is more than {_MAX_COUNTER_STEPS} steps behind the vault's "
            "manifest; the manifest is not one this TPM's counter kept"
        )

    @contextlib.contextmanager
    def _counter_errors(self, index: int) -> Iterator[None]:
        try:
            yield
        except device.CounterIndexTaken as e:
            raise BackendUnavailable(self.name, f"{e}; another program defined it") from None

    # -- Attester --------------------------------------------------------------------------------
    def attest(self, info: KeyInfo, nonce: bytes) -> dict[str, Any]:
        """TPM2_CreatePrimary of the attestation key (endorsement hierarchy) and TPM2_Certify of
        the key with the nonce as qualifying data."""
        key = self._key(info)
        with self._errors("TPM2_Certify", f"key {info.name!r}"):
            attest, signature, ak_area = self._dev().certify(self._ref(key), nonce)
        return attestation.make_statement(
            info.name, info.type.value, nonce, attest, signature, key.area.raw, ak_area
        )

    @staticmethod
    def verify_attestation(
        statement: Mapping[str, Any],
        nonce: bytes | None,
        trusted_signer: PublicKeyTypes | None,
        expected_public: PublicKeyTypes | None,
    ) -> dict[str, Any]:
        """Check a TPM2_Certify statement in software (no TPM needed)."""
        return attestation.verify_statement(statement, nonce, trusted_signer, expected_public)


def _parse_handle(value: Any, context: BackendContext) -> int | None:
    if value is None:
        return None
    try:
        handle = value if isinstance(value, int) else int(str(value), 0)
    except ValueError:
        raise context.config_error("must be a handle like 0x81000001", "persistent_handle")
    if not 0x81000000 <= handle <= 0x817FFFFF:
        raise context.config_error(
            "must be an owner persistent handle, 0x81000000 to 0x817FFFFF", "persistent_handle"
        )
    return handle


def _pin_bytes(pin: str) -> bytes:
    raw = pin.encode("utf-8")
    if not raw:
        raise AuthenticationFailed("the TPM PIN is empty")
    if len(raw) > MAX_PIN_BYTES:
        raise InvalidArgument(f"a TPM PIN is at most {MAX_PIN_BYTES} bytes (UTF-8)")
    return raw


def _mac_input(aad: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    return _AEAD_LABEL + struct.pack(">Q", len(aad)) + aad + iv + ciphertext


def _no_algorithm(algorithm: str | None) -> None:
    if algorithm is not None:
        raise InvalidArgument(f"the TPM picks the scheme from the key type; got {algorithm!r}")


_NO_KEY_WRAP = "a TPM has no AES key wrap (RFC 5649); aes-kwp is for PKCS#11 key-wrapping keys"
