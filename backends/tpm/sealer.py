"""The `Sealer` of the TPM backend: the vault master key sealed to this TPM.

`TpmSealer` is a mixin of `TpmBackend`. A seal is a TPM2_Create of a sealed data object
under the storage root key, optionally bound to PCRs (TPM2_PolicyPCR, sha256 bank) and to
the PIN; the slot records the enrolled PCR values, so a refusal can name the PCRs that
changed. docs/tpm.md describes the slot format.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from strongroom.errors import AuthenticationFailed, IntegrityError, InvalidArgument, StrongroomError

try:
    from . import device
except (ImportError, OSError):  # tpm2-pytss missing: discovery.py says why; nothing seals then
    device = None  # type: ignore[assignment]

SEALED_FORMAT = "tpm2-sealed"
_SEAL_OPTIONS = frozenset({"pcrs", "pin"})


class TpmSealer:
    """Mixin of `TpmBackend`: `seal` and `unseal` for vault key slots."""

    if TYPE_CHECKING:  # TpmBackend's

        def _dev(self) -> device.TpmDevice: ...
        def _auth(self) -> bytes: ...
        def _new_auth(self, wanted: bool) -> bytes | None: ...
        def _errors(
            self, command: str, subject: str
        ) -> contextlib.AbstractContextManager[None]: ...
        def _translate(self, e: Any, command: str, subject: str) -> StrongroomError: ...

    def seal(self, secret: memoryview, label: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """TPM2_Create of a sealed data object under the SRK. With PCRs its policy is
        TPM2_PolicyPCR(sha256: PCRs) [+ TPM2_PolicyAuthValue for the PIN], from a trial
        session; without, its auth value is the PIN (or empty)."""
        unknown = set(options) - _SEAL_OPTIONS
        if unknown:
            raise InvalidArgument(
                f"the TPM does not understand sealing options {', '.join(sorted(unknown))}; "
                "it takes pcrs and pin"
            )
        pcrs = _parse_pcrs(options.get("pcrs") or [])
        pin = bool(options.get("pin", False))
        auth = self._new_auth(pin)
        dev = self._dev()
        with self._errors("TPM2_Create", "the sealed vault key"):
            policy = dev.policy_digest(pcrs, pin) if pcrs else b""
            values = dev.pcr_values(pcrs) if pcrs else {}
            public, private = dev.create(device.sealed_template(policy, pin), auth, secret)
        return {
            "format": SEALED_FORMAT,
            "version": 1,
            "label": label,
            "public": base64.b64encode(public).decode(),
            "private": base64.b64encode(private).decode(),
            "pcr_bank": "sha256",
            "pcrs": pcrs,
            "pcr_values": {str(p): v.hex() for p, v in sorted(values.items())},
            "pin": pin,
            "storage_key": dev.srk_name.hex(),
        }

    def unseal(self, params: Mapping[str, Any], out: memoryview) -> None:
        """TPM2_Load, TPM2_PolicyPCR [+ TPM2_PolicyAuthValue], TPM2_Unseal, into `out`."""
        try:
            if params.get("format") != SEALED_FORMAT or params.get("version") != 1:
                raise ValueError("format")
            public = base64.b64decode(str(params["public"]), validate=True)
            private = base64.b64decode(str(params["private"]), validate=True)
            pcrs = _parse_pcrs(params.get("pcrs") or [])
            pin = bool(params.get("pin", False))
        except (KeyError, ValueError, TypeError, binascii.Error, InvalidArgument):
            raise IntegrityError("the TPM key slot of the vault is malformed") from None
        auth = self._auth() if pin else None
        dev = self._dev()
        try:
            dev.unseal_into(public, private, pcrs, auth, out)
        except ValueError as e:  # the sealed secret has another size than expected
            raise IntegrityError(f"the TPM key slot of the vault does not fit: {e}") from None
        except device.TSS2_Exception as e:
            rc = device.TPM2_RC
            if device.error_code(e) in (rc.POLICY_FAIL, rc.PCR_CHANGED) and pcrs:
                raise AuthenticationFailed(self._pcr_refusal(pcrs, params)) from None
            raise self._translate(e, "TPM2_Unseal", "the sealed vault key") from e

    def _pcr_refusal(self, pcrs: list[int], params: Mapping[str, Any]) -> str:
        enrolled = params.get("pcr_values") or {}
        try:
            now = self._dev().pcr_values(pcrs)
            changed = [p for p in pcrs if enrolled.get(str(p)) != now.get(p, b"").hex()]
        except Exception:
            changed = []
        names = ", ".join(str(p) for p in (changed or pcrs))
        what = (
            f"PCR {names} (sha256) changed since the slot was enrolled"
            if changed
            else f"the PCR policy over PCR {names} (sha256) is not met"
        )
        return (
            f"the TPM refuses to unseal the vault key: {what}, so this is not the boot state "
            "it was sealed to; open the vault with another enrolled method (e.g. passphrase), "
            "then re-enroll the TPM if the change is expected"
        )


def _parse_pcrs(value: Any) -> list[int]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in value
    ):
        raise InvalidArgument("PCRs are a list of numbers, e.g. [7, 11]")
    bad = [p for p in value if not 0 <= p <= 23]
    if bad:
        raise InvalidArgument(f"PCR numbers go from 0 to 23, not {bad[0]}")
    return sorted(set(value))
