"""A TPM config that survives swtpm restarts: `swtpm_state = DIR` with swtpm/start.sh --state,
and a fixed `--port` for configs that name `tcti = "swtpm:host=...,port=P"`.

Each test runs its own swtpm through the scripts (not the session fixture), keeps a key
across stop and start, and checks the result with tools nobody here wrote: openssl
verifies the signatures, tpm2-tools reaches the TPM on the recorded port.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliResult, assert_openssl_verified, openssl_verify, run_cli
from tpm_support import PIN_ENV, TEST_PIN, VAULT_PASS, VAULT_PASS_ENV, _free_port_pair, write_config

import strongroom
from strongroom.errors import BackendUnavailable, ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV = {PIN_ENV: TEST_PIN, VAULT_PASS_ENV: VAULT_PASS}

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None
    or shutil.which("tpm2_getcap") is None
    or shutil.which("openssl") is None,
    reason="needs swtpm, tpm2-tools and openssl",
)


def start(state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "swtpm" / "start.sh"), "--state", str(state), *options],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def stop(state: Path) -> None:
    stopped = subprocess.run(
        ["bash", str(REPO / "swtpm" / "stop.sh"), str(state)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    # TPM2_Shutdown before the stop, or the next start counts a dictionary-attack failure.
    assert "shutdown: tpm2_shutdown" in stopped.stderr, stopped.stderr


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state directory for this test's own swtpm, stopped (with TPM2_Shutdown) at the end."""
    directory = tmp_path / "swtpm"
    try:
        yield directory
    finally:
        if (directory / "swtpm.pid").exists():
            stop(directory)


def running_port(state: Path, started: subprocess.CompletedProcess[str]) -> int:
    assert started.returncode == 0, started.stderr
    port = int((state / "swtpm.port").read_text())
    assert f"export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port={port}\n" in started.stdout
    return port


def state_config(directory: Path, state: Path) -> Path:
    """write_config's TPM config, reaching the TPM through swtpm_state instead of a tcti."""
    path = write_config(directory, "unused")
    text = path.read_text()
    assert text.count('tcti = "unused"\n') == 1
    path.write_text(text.replace('tcti = "unused"\n', f'swtpm_state = "{state}"\n'))
    return path


def cli(config: Path, *args: str) -> CliResult:
    return run_cli(config, *args, env=ENV)


def ok(result: CliResult) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


def tpm2_getcap(port: int, what: str) -> str:
    """tpm2-tools through the port swtpm/start.sh recorded."""
    env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={port}"}
    env["TSS2_LOG"] = "all+none"
    out = subprocess.run(
        ["tpm2_getcap", what], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def sign_and_verify(config: Path, tmp_path: Path, name: str, round_: int) -> None:
    data = tmp_path / f"data-{round_}.bin"
    data.write_bytes(b"signed by a TPM key made before the restart, round %d" % round_)
    signature = tmp_path / f"{name}-{round_}.sig"
    ok(cli(config, "key", "sign", name, "--in", str(data), "--out", str(signature)))
    assert_openssl_verified(
        openssl_verify("-sha256", tmp_path, f"{name}.pem", str(signature), str(data))
    )


def test_swtpm_state_config_survives_restarts(tmp_path: Path, state: Path) -> None:
    """One config, never edited: a key made before two restarts still signs after both, the
    second on another port because the first one is taken."""
    port = running_port(state, start(state))
    config = state_config(tmp_path, state)
    ok(cli(config, "key", "generate", "signer", "--type", "ecdsa-p256", "--backend", "tpm"))
    public = tmp_path / "signer.pem"
    ok(cli(config, "key", "public", "signer", "--format", "pem", "--out", str(public)))
    sign_and_verify(config, tmp_path, "signer", 0)
    stop(state)
    assert (state / "swtpm.port").read_text().strip() == str(port)  # kept for the next start

    # Stopped: the config names the state directory and says how to start it.
    down = cli(config, "key", "sign", "signer", "--in", str(public))
    assert down.returncode == 6 and down.stderr.count("\n") == 1, down.stderr
    assert f"swtpm is not running for {state}" in down.stderr
    assert "swtpm/start.sh --state" in down.stderr

    # Started again on the same state: the recorded port is free, so it is reused.
    assert running_port(state, start(state)) == port
    sign_and_verify(config, tmp_path, "signer", 1)
    assert "TPM2_PT_MANUFACTURER" in tpm2_getcap(port, "properties-fixed")
    stop(state)

    # The recorded port is taken meanwhile: start.sh picks another, the config follows it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        moved = running_port(state, start(state))
        assert moved != port
        sign_and_verify(config, tmp_path, "signer", 2)
        variable = tpm2_getcap(moved, "properties-variable")
    # Every stop sent TPM2_Shutdown, so no restart counted a dictionary-attack failure.
    assert re.search(r"TPM2_PT_LOCKOUT_COUNTER: 0x0\b", variable), variable
    status = ok(cli(config, "--json", "backends")).decode()
    assert f"swtpm:host=127.0.0.1,port={moved}" in status and str(state) in status


def test_fixed_port_keeps_a_tcti_config_working(tmp_path: Path, state: Path) -> None:
    """`--port P` for configs that name `tcti = "swtpm:host=127.0.0.1,port=P"`; a taken P is
    refused with a clear message instead of a silent move."""
    port = _free_port_pair()
    running_port(state, start(state, "--port", str(port)))
    config = write_config(tmp_path, f"swtpm:host=127.0.0.1,port={port}")
    ok(cli(config, "key", "generate", "fixed", "--type", "ecdsa-p256", "--backend", "tpm"))
    public = tmp_path / "fixed.pem"
    ok(cli(config, "key", "public", "fixed", "--format", "pem", "--out", str(public)))
    stop(state)
    assert running_port(state, start(state, "--port", str(port))) == port
    sign_and_verify(config, tmp_path, "fixed", 1)

    other = tmp_path / "other-swtpm"
    taken = start(other, "--port", str(port))  # `state`'s swtpm holds it
    assert taken.returncode == 1 and not (other / "swtpm.pid").exists()
    assert f"port {port} or {port + 1} (the control port) is already in use" in taken.stderr


def test_swtpm_state_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config mistakes are config errors; a state without a usable port is unavailable with
    what to do."""
    both = state_config(tmp_path, tmp_path / "s")
    both.write_text(both.read_text() + 'tcti = "swtpm:host=127.0.0.1,port=2321"\n')
    with pytest.raises(ConfigError, match="cannot be combined with tcti") as err:
        strongroom.open(both)
    assert "backends.tpm.swtpm_state" in str(err.value)

    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASS)
    missing = tmp_path / "never-started"
    for directory, port_text, why in (
        (missing, None, f"no swtpm state directory at {missing}"),
        (tmp_path / "empty", None, "has no recorded swtpm port (swtpm.port)"),
        (tmp_path / "garbled", "port 99\n", "does not hold a port number"),
        (tmp_path / "zero", "0\n", "does not hold a port number"),
    ):
        if directory != missing:
            directory.mkdir()
        if port_text is not None:
            (directory / "swtpm.port").write_text(port_text)
        with strongroom.open(state_config(tmp_path, directory)) as ks:
            reason = {s.name: s for s in ks.backends()}["tpm"].reason
        assert reason is not None and why in reason, reason
        assert f"swtpm/start.sh --state {directory}" in reason, reason


def test_open_keystore_follows_a_restart_on_another_port(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port is read again when the backend reconnects, not only when it is made: an open
    keystore loses the TPM once when swtpm restarts elsewhere, then finds it there."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    port = running_port(state, start(state))
    with strongroom.open(state_config(tmp_path, state)) as ks:
        ks.generate("long-lived", "ecdsa-p256", backend="tpm")
        ks.sign("long-lived", b"before")
        stop(state)
        with socket.socket() as squatter:  # only while swtpm starts, to move it elsewhere
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            moved = running_port(state, start(state))
        assert moved != port
        # The old port now refuses (a listener there that never answers would hang the TSS).
        with pytest.raises(BackendUnavailable, match="lost the connection"):
            ks.sign("long-lived", b"during")
        signature = ks.sign("long-lived", b"after")
        ks.verify("long-lived", b"after", signature)
        assert ks.backend("tpm").status()["tcti"] == f"swtpm:host=127.0.0.1,port={moved}"
