"""Discovery of the TPM backend: whether tpm2-pytss and the TPM can be reached, what the TPM
can do, and its status.

`TpmDiscovery` is a mixin of `TpmBackend`. `_connect` opens the device (Esys_Initialize on
the TCTI, TPM2_GetCapability, the storage root key) and turns every way that can fail into
a `BackendUnavailable` the user can act on; `capabilities` is derived from the TPM's own
answers (`facts.py`). For an swtpm run by swtpm/start.sh, the port it recorded is read at
every connect.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strongroom.backend import Capability
from strongroom.errors import BackendUnavailable
from strongroom.types import KeyType, Operation

try:
    from . import device
except (ImportError, OSError) as _e:  # tpm2-pytss, or the TSS libraries under it, missing
    device = None  # type: ignore[assignment]
    _MISSING: str | None = (
        f"tpm2-pytss cannot be imported ({type(_e).__name__}: {_e}); install it with "
        "`pip install 'strongroom[tpm]'`, which builds against the TSS "
        "(Debian: apt-get install libtss2-dev pkg-config gcc)"
    )
else:
    _MISSING = None

SWTPM_PORT_FILE = "swtpm.port"  # written by swtpm/start.sh into its state directory
SWTPM_PID_FILE = "swtpm.pid"  # there while that swtpm runs; stop.sh removes it


class TpmDiscovery:
    """Mixin of `TpmBackend`: `availability`, `capabilities`, `status` and `_connect`."""

    if TYPE_CHECKING:  # TpmBackend's, and Backend's
        name: str
        tcti: str
        swtpm_state: Path | None
        _device: device.TpmDevice | None
        _caps: frozenset[Capability] | None

    def availability(self) -> str | None:
        if _MISSING is not None:
            return _MISSING
        try:
            self._connect()
        except BackendUnavailable as e:
            return e.reason
        return None

    def capabilities(self) -> frozenset[Capability]:
        """From TPM2_GetCapability (curves, algorithms, commands) and TPM2_TestParms."""
        if self._caps is None:
            dev = self._connect()
            assert dev.facts is not None
            self._caps = _capabilities(dev.facts)
        return self._caps

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tcti": self.tcti}
        if self.swtpm_state is not None:
            out["swtpm_state"] = str(self.swtpm_state)
        if device is not None and not device.has_resource_manager(self.tcti):
            out["resource_manager"] = False
            out["notes"] = [
                "no resource manager on this TCTI: what a killed process left loaded is "
                "flushed only when no other Strongroom process uses the TPM, and other "
                "programs sharing it may lose their objects; use /dev/tpmrm0 or tpm2-abrmd "
                "where several programs share the TPM (docs/tpm.md)"
            ]
        dev = self._device
        if dev is None or not dev.is_open or dev.facts is None:
            return out
        f = dev.facts
        out.update(
            manufacturer=f.manufacturer,
            firmware=f.firmware,
            storage_key=dev.srk_source,
            storage_key_name=dev.srk_name.hex(),
            transient_slots=dev.slots,
            max_loaded_keys=dev.max_loaded,
            loaded_keys=dev.loaded_count,
            reclaimed_from_dead_processes=dev.reclaimed,
            rsa_sizes=list(f.rsa_bits),
        )
        with contextlib.suppress(Exception):
            out["dictionary_attack"] = dev.lockout().to_dict()
        return out

    def _connect(self) -> device.TpmDevice:
        """Esys_Initialize on the TCTI, TPM2_GetCapability, and the SRK; BackendUnavailable
        with a reason the user can act on when that fails."""
        if _MISSING is not None or self._device is None:
            raise BackendUnavailable(self.name, _MISSING or "tpm2-pytss is missing")
        dev = self._device
        if dev.is_open:
            return dev
        if self.swtpm_state is not None:
            # Read at every connect (and reconnect), so a restarted swtpm is found on
            # whatever port start.sh gave it this time.
            self.tcti = dev.tcti = _swtpm_tcti(self.name, self.swtpm_state)
        kind, _, conf = self.tcti.partition(":")
        if kind == "device":
            path = conf or "/dev/tpmrm0"
            if not os.path.exists(path):
                raise BackendUnavailable(
                    self.name,
                    f"no TPM device at {path}: this machine has no TPM 2.0, or its driver is "
                    "not loaded; set tcti (for tests: swtpm, see swtpm/start.sh)",
                )
            if not os.access(path, os.R_OK | os.W_OK):
                raise BackendUnavailable(
                    self.name,
                    f"no permission to use {path}; add this user to the group that owns it "
                    "(usually tss)",
                )
        try:
            dev.open()
        except device.StorageKeyProblem as e:
            raise BackendUnavailable(self.name, str(e)) from None
        except device.TSS2_Exception as e:
            if device.is_tcti_error(e):
                state = self.swtpm_state
                if state is not None and not (state / SWTPM_PID_FILE).exists():
                    raise BackendUnavailable(
                        self.name,
                        f"swtpm is not running for {state} (it last listened on "
                        f"{self.tcti!r}); start it with swtpm/start.sh --state {state}",
                    ) from None
                raise BackendUnavailable(
                    self.name,
                    f"cannot reach the TPM through TCTI {self.tcti!r} ({e}); is the TPM, "
                    "tpm2-abrmd or swtpm running and reachable?",
                ) from None
            if device.error_code(e) in (device.TPM2_RC.AUTH_FAIL, device.TPM2_RC.BAD_AUTH):
                raise BackendUnavailable(
                    self.name,
                    "the TPM's owner hierarchy has an auth value, so Strongroom cannot create "
                    "or persist its storage key; provision one at persistent_handle with "
                    "tpm2_createprimary/tpm2_evictcontrol, or clear the owner auth",
                ) from None
            raise BackendUnavailable(self.name, f"the TPM refused to start up: {e}") from None
        return dev


def _capabilities(f: Any) -> frozenset[Capability]:
    caps: set[Capability] = set()

    def add(key_type: KeyType, *ops: Operation) -> None:
        caps.update((key_type, op) for op in (Operation.GENERATE, Operation.DELETE, *ops))

    hmac_ok = f.has_alg("KEYEDHASH") and f.has_alg("HMAC") and f.has_command("HMAC")
    # Agreement makes a new TPM key, so it needs a type the TPM can hold it as (HMAC at least).
    ecdh = f.has_alg("ECDH") and f.has_command("ECDH_ZGen") and hmac_ok
    if f.has_alg("ECC") and f.has_alg("ECDSA"):
        for key_type, curve in ((KeyType.ECDSA_P256, 0x0003), (KeyType.ECDSA_P384, 0x0004)):
            if curve in f.curves:
                add(key_type, Operation.SIGN, Operation.VERIFY)
                if ecdh:
                    caps.add((key_type, Operation.AGREE))
    rsa_sign = f.has_alg("RSASSA") and f.has_alg("RSAPSS")
    if rsa_sign:
        for bits in f.rsa_bits:
            key_type = KeyType(f"rsa-{bits}")
            add(key_type, Operation.SIGN, Operation.VERIFY)
            if f.has_alg("OAEP") and f.has_command("RSA_Decrypt"):
                caps.update({(key_type, Operation.ENCRYPT), (key_type, Operation.DECRYPT)})
    if hmac_ok:
        add(KeyType.HMAC_SHA256, Operation.SIGN, Operation.VERIFY)
    if hmac_ok and f.aes256 and f.has_alg("CFB") and f.has_command("EncryptDecrypt2"):
        add(KeyType.AES_256, Operation.ENCRYPT, Operation.DECRYPT)
    return frozenset(caps)


def _swtpm_tcti(backend: str, state: Path) -> str:
    """The TCTI of the swtpm that swtpm/start.sh runs on `state`: loopback (start.sh binds
    nothing else) and the port it recorded in STATE/swtpm.port."""
    start = f"start swtpm with swtpm/start.sh --state {state}"
    if not state.is_dir():
        raise BackendUnavailable(backend, f"no swtpm state directory at {state}; {start}")
    recorded = state / SWTPM_PORT_FILE
    try:
        text = recorded.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise BackendUnavailable(
            backend, f"{state} has no recorded swtpm port ({SWTPM_PORT_FILE}); {start}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BackendUnavailable(backend, f"cannot read {recorded}: {e}") from None
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise BackendUnavailable(
            backend, f"{recorded} does not hold a port number; restart swtpm: {start}"
        )
    return f"swtpm:host=127.0.0.1,port={int(text)}"
