"""The TPM itself, through tpm2-pytss (ESAPI): one context behind one lock.

Everything that touches tpm2-pytss lives in the device layer, so the backend imports
without it: this module (`TpmDevice`: key operations and sealing) and the four it is built
from, context.py (`TpmContext`: the ESAPI context, its lock, the SRK, the slot LRU and the
sessions; reconnecting and recovering from a TPM reset), recovery.py (what an error means;
reclaiming what killed clients left loaded), templates.py (object templates) and facts.py
(what the device reports). The backend imports only this module, which
re-exports what it uses and sets TSS2_LOG before any of them imports tpm2-pytss (the
package imports the backend, and so this module, first). The layer keeps four promises:

- **Slots.** A TPM holds few transient objects (3 on swtpm). Keys are loaded on
  demand into a small LRU, temporaries (the storage key while loading, sequences,
  sealed objects, the attestation key) get a slot reserved first, and every
  handle is flushed: evicted keys at once, the rest on `close()`.
- **The storage root key (SRK)** is the TCG template's ECC P-256 storage primary,
  derived identically every time from the owner hierarchy. With a persistent
  handle configured it lives there: an existing one is reused, never re-created.
- **Temporaries.** tpm2-pytss structures returned by a call own the memory of the
  fields read from them; every result is kept in a local before a field is read.
- **No secret on the bus in clear.** Creating objects (auth values, imported key
  material), unsealing, ECDH results, RSA plaintexts and PIN-protected keys use an
  HMAC session salted with the SRK, with parameter encryption (AES-128-CFB).
"""

from __future__ import annotations

import os

# The TSS C libraries log to stderr by default; Strongroom reports errors itself.
os.environ.setdefault("TSS2_LOG", "all+none")

from collections.abc import Sequence
from typing import Any

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_NT,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_PUBLIC_KEY_RSA,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_PCR_SELECTION,
    TPMS_ECC_POINT,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)

from strongroom.memory import scrub_bytes

from .context import _RANDOM_CHUNK, MAX_BUFFER, TpmContext
from .facts import CounterIndexTaken, Facts, KeyRef, Lockout, StorageKeyProblem
from .recovery import error_code, forgot_our_objects, has_resource_manager, is_tcti_error
from .templates import (
    _NULL_TICKET,
    _SESSION_CIPHER,
    CURVE_P256,
    CURVE_P384,
    OAEP_SHA256,
    aes_template,
    ak_template,
    ecc_template,
    hmac_template,
    rsa_template,
    sealed_template,
    sign_scheme,
)

__all__ = [
    "CURVE_P256",
    "CURVE_P384",
    "ESYS_TR",
    "CounterIndexTaken",
    "TPM2_RC",
    "Facts",
    "KeyRef",
    "Lockout",
    "StorageKeyProblem",
    "TSS2_Exception",
    "TpmDevice",
    "aes_template",
    "ecc_template",
    "error_code",
    "forgot_our_objects",
    "has_resource_manager",
    "hmac_template",
    "is_tcti_error",
    "rsa_template",
    "sealed_template",
    "sign_scheme",
]


_COUNTER_ATTRIBUTES = (
    TPMA_NV.AUTHREAD
    | TPMA_NV.AUTHWRITE
    | TPMA_NV.NO_DA
    | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
)
"""A counter NV index read and incremented with its own (empty) auth value, never counted
against dictionary-attack lockout. Not ORDERLY: an orderly counter jumps ahead after an
unclean shutdown, which would read as a rollback."""


class TpmDevice(TpmContext):
    """The TPM's key operations and sealing, on the context (lock, LRU, SRK, session)."""

    def create(
        self,
        template: TPM2B_PUBLIC,
        auth: bytes | None,
        data: bytes | bytearray | memoryview | None,
    ) -> tuple[bytes, bytes]:
        """TPM2_Create under the SRK; returns marshalled (TPM2B_PUBLIC, TPM2B_PRIVATE).

        The auth value and any caller-supplied key material travel encrypted (salted session).
        """
        with self.lock:
            esys = self.esys()
            material = bytes(data) if data is not None else b""
            try:
                sensitive = TPM2B_SENSITIVE_CREATE(
                    sensitive=TPMS_SENSITIVE_CREATE(
                        userAuth=TPM2B_AUTH(auth or b""), data=TPM2B_SENSITIVE_DATA(material)
                    )
                )
            finally:
                scrub_bytes(material)
            try:
                # TPM2_Create builds the new object in a free slot, beside the parent's.
                with self._temporary(1), self._parent() as parent:
                    session = self._salted_session((), parent)
                    esys.trsess_set_attributes(
                        session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
                    )
                    result = esys.create(
                        parent, sensitive, template, session1=ESYS_TR.PASSWORD, session2=session
                    )
                private, public = result[0], result[1]
                return public.marshal(), private.marshal()
            finally:
                _wipe_sensitive(sensitive)

    def sign(self, ref: KeyRef, digest: bytes, scheme: TPMT_SIG_SCHEME) -> bytes:
        """TPM2_Sign of a host-computed digest; returns the marshalled TPMT_SIGNATURE."""
        with self.lock:
            tr = self._lru.get(ref.cache_id)
            esys = self._esys
            if tr is not None and esys is not None and ref.auth is None:
                # The hot path: a loaded key without a PIN. One digest structure is reused
                # (under the lock): building a new one costs more than the rest together.
                self._lru.move_to_end(ref.cache_id)
                self._digest.buffer = digest
                try:
                    return bytes(esys.sign(tr, self._digest, scheme, _NULL_TICKET).marshal())
                except TSS2_Exception as e:
                    if not forgot_our_objects(e):
                        raise
                    self.after_reset()  # then load again, below

            def command(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> bytes:
                signature = esys.sign(tr, TPM2B_DIGEST(digest), scheme, _NULL_TICKET, s1, s2)
                return bytes(signature.marshal())

            return self.run(ref, command)

    def ecdh_zgen(self, ref: KeyRef, x: bytes, y: bytes) -> bytearray:
        """TPM2_ECDH_ZGen: the shared point's x coordinate (response encrypted on the bus)."""
        point = TPM2B_ECC_POINT(point=TPMS_ECC_POINT(x=x, y=y))

        def command(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> bytearray:
            result = esys.ecdh_zgen(tr, point, s1, s2)
            view = result.point.x.buffer
            try:
                return bytearray(view)
            finally:
                view[:] = bytes(len(view))

        return self.run(ref, command, encrypt=True)

    def rsa_decrypt(self, ref: KeyRef, ciphertext: bytes) -> bytes:
        """TPM2_RSA_Decrypt with OAEP (SHA-256, empty label); the plaintext comes back encrypted."""

        def command(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> bytes:
            result = esys.rsa_decrypt(
                tr, TPM2B_PUBLIC_KEY_RSA(ciphertext), OAEP_SHA256, None, s1, s2
            )
            return bytes(result)

        return self.run(ref, command, encrypt=True)

    def hmac(self, ref: KeyRef, data: bytes) -> bytes:
        """TPM2_HMAC, or TPM2_HMAC_Start/SequenceUpdate/SequenceComplete beyond 1024 bytes."""
        if len(data) <= MAX_BUFFER:

            def one(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> bytes:
                return bytes(esys.hmac(tr, data, TPM2_ALG.SHA256, s1, s2))

            return self.run(ref, one)
        with self.lock, self._temporary(1, {ref.cache_id}):

            def start(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> ESYS_TR:
                return esys.hmac_start(tr, TPM2B_AUTH(), TPM2_ALG.SHA256, s1, s2)

            sequence = self.run(ref, start)
            esys = self.esys()
            try:
                end = len(data) - (len(data) % MAX_BUFFER or MAX_BUFFER)
                for i in range(0, end, MAX_BUFFER):
                    esys.sequence_update(sequence, data[i : i + MAX_BUFFER])
                result = esys.sequence_complete(sequence, data[end:], ESYS_TR.NULL)
            except BaseException:
                self._flush(sequence)  # SequenceComplete flushes it; a failure may not
                raise
            return bytes(result[0])

    def encrypt_decrypt(self, ref: KeyRef, iv: bytes, data: bytes, decrypt: bool) -> bytes:
        """TPM2_EncryptDecrypt2 (AES-CFB) in 1024-byte steps, chaining the IV."""
        out = bytearray()

        def command(esys: ESAPI, tr: ESYS_TR, s1: ESYS_TR, s2: ESYS_TR) -> None:
            chain = iv
            for i in range(0, len(data), MAX_BUFFER):
                result = esys.encrypt_decrypt_2(
                    tr, decrypt, TPM2_ALG.CFB, chain, data[i : i + MAX_BUFFER], s1, s2
                )
                out.extend(bytes(result[0]))
                chain = bytes(result[1])

        if data:
            self.run(ref, command, encrypt=True, decrypt=True)
        return bytes(out)

    def certify(self, ref: KeyRef, nonce: bytes) -> tuple[bytes, bytes, bytes]:
        """TPM2_Certify of the key by the attestation key (a TPM2_CreatePrimary in the
        endorsement hierarchy); returns (TPMS_ATTEST, TPMT_SIGNATURE, AK TPMT_PUBLIC)."""
        with self.lock:
            keep = {ref.cache_id}
            tr = self.loaded(ref, keep)
            esys = self.esys()
            with self._temporary(1, keep):
                created = self._retry(
                    lambda: esys.create_primary(
                        TPM2B_SENSITIVE_CREATE(), ak_template(), ESYS_TR.ENDORSEMENT
                    ),
                    keep,
                )
                ak, ak_public = created[0], created[1]
                try:
                    ak_area = bytes(ak_public.publicArea.marshal())
                    s1, _ = self._sessions(tr, ref, False, False, keep)
                    try:
                        attest, signature = esys.certify(
                            tr,
                            ak,
                            nonce,
                            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                            session1=s1,
                            session2=ESYS_TR.PASSWORD,
                        )
                    finally:
                        if ref.auth is not None:
                            esys.tr_set_auth(tr, None)
                    return bytes(attest), bytes(signature.marshal()), ak_area
                finally:
                    self._flush(ak)

    def random(self, n: int) -> bytes:
        """TPM2_GetRandom, 32 bytes at a time."""
        with self.lock:
            esys = self.esys()
            out = bytearray()
            while len(out) < n:
                out += bytes(esys.get_random(min(_RANDOM_CHUNK, n - len(out))))
            return bytes(out)

    # -- monotonic counters (the vault's rollback check) --------------------------------------
    def counter_read(self, index: int) -> int | None:
        """TPM2_NV_Read of the NV counter at `index`; None when it is not defined or was
        never incremented. Refuses an index that holds something else."""
        with self.lock:
            esys = self.esys()
            tr = self._counter_index(esys, index)
            if tr is None:
                return None
            try:
                public, _ = esys.nv_read_public(tr)
                if not public.nvPublic.attributes & TPMA_NV.WRITTEN:
                    return None
                return int.from_bytes(bytes(esys.nv_read(tr, 8, 0, auth_handle=tr)), "big")
            finally:
                esys.tr_close(tr)

    def counter_increment(self, index: int) -> int:
        """TPM2_NV_Increment of the counter at `index`, defining it first (owner hierarchy,
        empty auth values, no dictionary-attack lockout) if needed; returns its new value."""
        with self.lock:
            esys = self.esys()
            tr = self._counter_index(esys, index)
            if tr is None:
                public = TPM2B_NV_PUBLIC(
                    nvPublic=TPMS_NV_PUBLIC(
                        nvIndex=index,
                        nameAlg=TPM2_ALG.SHA256,
                        attributes=_COUNTER_ATTRIBUTES,
                        dataSize=8,
                    )
                )
                try:
                    tr = esys.nv_define_space(b"", public, auth_handle=ESYS_TR.OWNER)
                except TSS2_Exception as e:
                    if error_code(e) != TPM2_RC.NV_DEFINED:  # another process was first
                        raise
                    tr = self._counter_index(esys, index)
                    if tr is None:  # pragma: no cover - defined, then gone at once
                        raise
            try:
                esys.nv_increment(tr, auth_handle=tr)
                return int.from_bytes(bytes(esys.nv_read(tr, 8, 0, auth_handle=tr)), "big")
            finally:
                esys.tr_close(tr)

    @staticmethod
    def _counter_index(esys: ESAPI, index: int) -> ESYS_TR | None:
        try:
            tr = esys.tr_from_tpmpublic(index)
        except TSS2_Exception as e:
            if error_code(e) == TPM2_RC.HANDLE:
                return None
            raise
        public, _ = esys.nv_read_public(tr)
        attributes = int(public.nvPublic.attributes) & ~int(TPMA_NV.WRITTEN)
        if attributes != int(_COUNTER_ATTRIBUTES) or public.nvPublic.dataSize != 8:
            esys.tr_close(tr)
            raise CounterIndexTaken(
                f"TPM NV index 0x{index:08x} holds something other than Strongroom's counter"
            )
        return tr

    # -- sealing -------------------------------------------------------------------------------
    def pcr_values(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """TPM2_PCR_Read of the SHA-256 bank (several calls: one returns at most 8 values)."""
        with self.lock:
            esys = self.esys()
            values: dict[int, bytes] = {}
            todo = sorted(set(pcrs))
            while todo:
                result = esys.pcr_read(_selection(todo))
                selection, digests = result[1], result[2]
                got = _selected(selection)
                for index, value in zip(got, digests.digests, strict=False):
                    values[index] = bytes(value)
                del result, selection, digests
                if not got:
                    raise RuntimeError("the TPM has no SHA-256 bank for these PCRs")
                todo = [p for p in todo if p not in values]
            return values

    def policy_digest(self, pcrs: Sequence[int], pin: bool) -> bytes:
        """The digest of TPM2_PolicyPCR(sha256: pcrs) [+ TPM2_PolicyAuthValue]: trial session."""
        with self.lock:
            esys = self.esys()
            trial = esys.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )  # fmt: skip
            try:
                esys.policy_pcr(trial, TPM2B_DIGEST(), _selection(pcrs))
                if pin:
                    esys.policy_auth_value(trial)
                return bytes(esys.policy_get_digest(trial))
            finally:
                self._flush(trial)

    def unseal_into(
        self, public: bytes, private: bytes, pcrs: Sequence[int], auth: bytes | None, out: Any
    ) -> None:
        """TPM2_Load + (TPM2_PolicyPCR [+ PolicyAuthValue]) + TPM2_Unseal, straight into `out`."""
        with self.lock:
            esys = self.esys()
            in_private = TPM2B_PRIVATE.unmarshal(private)[0]
            in_public = TPM2B_PUBLIC.unmarshal(public)[0]
            self._reserve(2)
            with self._temporary(1):
                with self._parent() as parent:
                    item = self._retry(lambda: esys.load(parent, in_private, in_public), ())
                    policy = None
                    if pcrs:
                        policy = esys.start_auth_session(
                            parent, ESYS_TR.NONE, TPM2_SE.POLICY, _SESSION_CIPHER, TPM2_ALG.SHA256
                        )
                try:
                    if policy is not None:
                        esys.policy_pcr(policy, TPM2B_DIGEST(), _selection(pcrs))
                        if auth is not None:
                            esys.policy_auth_value(policy)
                        esys.trsess_set_attributes(
                            policy, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT
                        )
                        if auth is not None:
                            esys.tr_set_auth(item, auth)
                        data = esys.unseal(item, session1=policy)
                    else:
                        ref = KeyRef("unseal", public, private, auth)
                        s1, s2 = self._sessions(item, ref, True, False, ())
                        data = esys.unseal(item, session1=s1, session2=s2)
                    view = data.buffer
                    try:
                        if len(view) != len(out):
                            raise ValueError(
                                f"the sealed secret is {len(view)} bytes, expected {len(out)}"
                            )
                        out[:] = view
                    finally:
                        view[:] = bytes(len(view))
                finally:
                    if policy is not None:
                        self._flush(policy)
                    self._flush(item)


def _selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in sorted(set(pcrs))))


def _selected(selection: TPML_PCR_SELECTION) -> list[int]:
    """The SHA-256 PCR indexes a TPML_PCR_SELECTION names, in order."""
    out: list[int] = []
    for i in range(int(selection.count)):
        s = selection.pcrSelections[i]
        if int(s.hash) != TPM2_ALG.SHA256:
            continue
        bits = bytes(s.pcrSelect)[: int(s.sizeofSelect)]
        out += [b for b in range(len(bits) * 8) if bits[b // 8] & (1 << (b % 8))]
    return out


def _wipe_sensitive(sensitive: TPM2B_SENSITIVE_CREATE) -> None:
    """Zero the auth value and key material in the structure's C memory."""
    inner = sensitive.sensitive
    for field in (inner.userAuth, inner.data):
        view = field.buffer
        view[:] = bytes(len(view))
