"""A software TPM for the TPM tests: one `swtpm socket` per test session, with fresh state.

What swtpm/start.sh and swtpm/stop.sh do, in Python, so the fixture owns the process:
loopback only, a free port pair, the state in a temp dir, `--flags
not-need-init,startup-clear`, and TPM2_Shutdown(CLEAR) before terminate-and-wait (a TPM
stopped without it counts a dictionary-attack failure at its next start).

Test modules share one instance: `shared_swtpm()` starts it on first use and
`release_swtpm()` stops it when the last module is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TSS2_LOG", "all+none")

SRK_HANDLE = 0x81000001
TEST_PIN = "2468"  # a test PIN, not a secret
WRONG_PIN = "1357"
PIN_ENV = "SR_TEST_TPM_PIN"
VAULT_PASS_ENV = "SR_TEST_TPM_VAULT_PASS"
VAULT_PASS = "tpm tests vault passphrase"


def _free_port_pair() -> int:
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of loopback ports")


class Swtpm:
    """One swtpm process on loopback, with its state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self, same_port: bool = False) -> None:
        """Start on the state directory: on a new free port pair, or with `same_port` on the
        one used before (a TPM that comes back where its users' config points)."""
        if shutil.which("swtpm") is None:
            raise RuntimeError("swtpm is not installed (apt-get install swtpm swtpm-tools)")
        self.state.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            port = self.port if same_port and self.port else _free_port_pair()
            log = open(self.state / "swtpm.log", "ab")
            proc = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2",
                    "--tpmstate", f"dir={self.state}",
                    "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )  # fmt: skip
            log.close()
            # Returns as soon as swtpm listens; the bound only stops a hang, so it is far
            # beyond a start on a loaded machine (each retry would start from scratch).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    self.proc, self.port = proc, port
                    self.starts += 1
                    return
                time.sleep(0.01)
            proc.kill()
            proc.wait()
        raise RuntimeError(f"swtpm did not start; see {self.state / 'swtpm.log'}")

    def stop(self) -> None:
        """TPM2_Shutdown(CLEAR), then terminate and wait."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            with self.esapi() as e:
                from tpm2_pytss.constants import TPM2_SU

                e.shutdown(TPM2_SU.CLEAR)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same state: a TPM reset (and a new port)."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL: the TPM vanishes mid-whatever, with no orderly shutdown."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def reset(self) -> None:
        """A TPM reset without stopping swtpm: _TPM_Init on the control channel (as a power
        cycle would), then `tpm2_startup -c`. Every loaded object and session is gone."""
        env = self.tools_env()
        subprocess.run(
            ["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.port + 1}", "-i"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["tpm2_startup", "-c"], check=True, capture_output=True, env=env)

    @contextlib.contextmanager
    def esapi(self) -> Iterator[Any]:
        """A raw tpm2-pytss ESAPI context, for what the tests do behind Strongroom's back."""
        from tpm2_pytss import ESAPI

        e = ESAPI(self.tcti)
        try:
            yield e
        finally:
            e.close()

    def transient_handles(self) -> list[int]:
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

        with self.esapi() as e:
            _, data = e.get_capability(TPM2_CAP.HANDLES, int(TPM2_HT.TRANSIENT) << 24, 64)
            return [int(h) for h in data.data.handles]

    def lockout_counter(self) -> int:
        from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

        with self.esapi() as e:
            _, data = e.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
            return int(data.data.tpmProperties[0].value)

    def reset_lockout(self) -> None:
        """TPM2_DictionaryAttackLockReset with the (empty) lockout auth of a fresh swtpm."""
        from tpm2_pytss.constants import ESYS_TR

        with self.esapi() as e:
            e.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)

    def da_parameters(self, max_tries: int, recovery: int = 1000, lockout: int = 1000) -> None:
        from tpm2_pytss.constants import ESYS_TR

        with self.esapi() as e:
            e.dictionary_attack_parameters(max_tries, recovery, lockout, ESYS_TR.LOCKOUT)

    def pcr_extend(self, index: int, data: bytes = b"\x42" * 32) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        with self.esapi() as e:
            digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=data))
            e.pcr_extend(getattr(ESYS_TR, f"PCR{index}"), TPML_DIGEST_VALUES([digest]))

    def pcr_reset(self, index: int) -> None:
        from tpm2_pytss.constants import ESYS_TR

        with self.esapi() as e:
            e.pcr_reset(getattr(ESYS_TR, f"PCR{index}"))

    def tools_env(self) -> dict[str, str]:
        """Environment for tpm2-tools against this TPM."""
        return {**os.environ, "TPM2TOOLS_TCTI": self.tcti, "TSS2_LOG": "all+none"}


_shared: Swtpm | None = None
_users = 0
_tmp: tempfile.TemporaryDirectory[str] | None = None


def shared_swtpm() -> Swtpm:
    """The session's swtpm, started with fresh state on first use."""
    global _shared, _users, _tmp
    if _shared is None:
        _tmp = tempfile.TemporaryDirectory(prefix="strongroom-swtpm-")
        _shared = Swtpm(Path(_tmp.name) / "state")
        _shared.start()
    _users += 1
    return _shared


def release_swtpm() -> None:
    global _shared, _users, _tmp
    _users -= 1
    if _users > 0 or _shared is None:
        return
    try:
        _shared.stop()
    finally:
        _shared = None
        if _tmp is not None:
            _tmp.cleanup()
            _tmp = None


def write_config(
    directory: Path,
    tcti: str,
    *,
    persistent: bool = True,
    tpm_extra: str = "",
    order: tuple[str, ...] = ("tpm", "vault"),
    unlock: tuple[str, ...] = ("passphrase",),
    name: str = "strongroom.toml",
) -> Path:
    """A config with a TPM backend named `tpm` and a cheap-KDF vault; data in directory/data."""
    path = directory / name
    handle = f'persistent_handle = "0x{SRK_HANDLE:08x}"\n' if persistent else ""
    order_list = ", ".join(f'"{o}"' for o in order)
    unlock_list = ", ".join(f'"{u}"' for u in unlock)
    path.write_text(
        "[keystore]\n"
        f'data_dir = "{directory / "data"}"\n'
        f"order = [{order_list}]\n"
        "\n[backends.vault]\n"
        'type = "vault"\n'
        f'passphrase = "env:{VAULT_PASS_ENV}"\n'
        f"unlock = [{unlock_list}]\n"
        "kdf_memory_kib = 8192\n"
        "kdf_iterations = 1\n"
        "\n[backends.tpm]\n"
        'type = "tpm"\n'
        f'tcti = "{tcti}"\n'
        f"{handle}"
        f'pin = "env:{PIN_ENV}"\n'
        f"{tpm_extra}",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def swtpm() -> Iterator[Swtpm]:
    """The session's swtpm, for every TPM test module (each imports this fixture)."""
    tpm = shared_swtpm()
    try:
        yield tpm
    finally:
        release_swtpm()


@contextlib.contextmanager
def swtpms(root: Path, count: int) -> Iterator[list[Swtpm]]:
    """`count` running swtpm instances, one in each of root/tpm0, root/tpm1, ...: a TPM of
    its own for each node of a cluster test. All are stopped on leaving."""
    started: list[Swtpm] = []
    try:
        for i in range(count):
            tpm = Swtpm(root / f"tpm{i}")
            tpm.start()
            started.append(tpm)
        yield started
    finally:
        for tpm in started:
            tpm.stop()
