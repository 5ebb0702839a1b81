"""SoftHSM2 for the PKCS#11 tests: one fresh token per test session, made by
softhsm-config/init-token.sh in a temp dir with a private SOFTHSM2_CONF.

SoftHSM reads SOFTHSM2_CONF once, when the module is first initialised in a process, and
Strongroom never finalises a module; so every test in the session shares this one token,
and tests that need other mechanism lists run the CLI in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, CliResult, run_cli

import strongroom
from strongroom.keystore import Keystore

ROOT = Path(__file__).resolve().parents[2]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "strongroom-test"
USER_PIN = "4711-test-pin"  # distinctive, so a leak into any output is easy to spot
SO_PIN = "so-pin-12345678"
PIN_ENV = "SR_TEST_HSM_PIN"


@dataclass(frozen=True)
class SoftHsm:
    """One initialised SoftHSM2 token and the config that finds it."""

    directory: Path
    conf: Path
    label: str = TOKEN_LABEL
    pin: str = USER_PIN
    module: str = MODULE

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), **extra}


_TOKEN: list[SoftHsm] = []


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """A fresh token for this test session; SOFTHSM2_CONF points at its private config.

    Each test module imports this fixture, which gives pytest one definition per module; the
    token is still made once, because a process can only ever use the first SOFTHSM2_CONF.
    """
    if _TOKEN:
        return _TOKEN[0]
    if not Path(MODULE).is_file():
        pytest.fail(f"{MODULE} is missing; run scripts/setup.sh (it installs softhsm2 and opensc)")
    hsm = make_token(tmp_path_factory.mktemp("softhsm"))
    # Set for the rest of the process: SoftHSM reads it when the module is first initialised.
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    _TOKEN.append(hsm)
    return _TOKEN[0]


def make_token(directory: Path) -> SoftHsm:
    """A fresh SoftHSM2 setup in `directory` (softhsm-config/init-token.sh): its own
    softhsm2.conf and token directory, one token with the test label and PINs."""
    out = subprocess.run(
        ["bash", str(ROOT / "softhsm-config" / "init-token.sh"), str(directory), TOKEN_LABEL],
        env={**os.environ, "SOFTHSM_PIN": USER_PIN, "SOFTHSM_SO_PIN": SO_PIN},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    match = re.fullmatch(r"export SOFTHSM2_CONF=(\S+)\n", out.stdout)
    assert match, out.stdout
    conf = Path(match.group(1))
    assert conf == directory / "softhsm2.conf"
    return SoftHsm(directory, conf)


def write_config(
    directory: Path,
    hsm: SoftHsm,
    *,
    name: str = "strongroom.toml",
    module: str | None = None,
    token: str | None = None,
    pin_ref: str = f"env:{PIN_ENV}",
    unlock: str = '["passphrase"]',
    hsm_extra: str = "",
) -> Path:
    """A config with the HSM first in `order` and a cheap-KDF vault; data in directory/data."""
    path = directory / name
    path.write_text(
        f"""
[keystore]
data_dir = "{directory / "data"}"
order = ["hsm", "vault"]

[backends.vault]
type = "vault"
passphrase = "env:{VAULT_PASS_ENV}"
unlock = {unlock}
kdf_memory_kib = 8192
kdf_iterations = 1

[backends.hsm]
type = "pkcs11"
module = "{hsm.module if module is None else module}"
token = "{hsm.label if token is None else token}"
pin = "{pin_ref}"
{hsm_extra}
""",
        encoding="utf-8",
    )
    return path


def write_three_backends_config(directory: Path, hsm: SoftHsm, tcti: str) -> Path:
    """A config with backends `vault` (first in order, cheap KDF), `hsm` (the SoftHSM
    token) and `tpm` (the swtpm at `tcti`, SRK persistent); data in directory/data. Puts
    the three secrets in the environment as the config names them."""
    from tpm_support import PIN_ENV as TPM_PIN_ENV
    from tpm_support import SRK_HANDLE, TEST_PIN

    os.environ[VAULT_PASS_ENV] = VAULT_PASSPHRASE
    os.environ[PIN_ENV] = hsm.pin
    os.environ[TPM_PIN_ENV] = TEST_PIN
    config = directory / "strongroom.toml"
    config.write_text(
        f'[keystore]\ndata_dir = "{directory / "data"}"\norder = ["vault"]\n\n'
        '[backends.vault]\ntype = "vault"\n'
        f'passphrase = "env:{VAULT_PASS_ENV}"\nkdf_memory_kib = 8192\nkdf_iterations = 1\n\n'
        f'[backends.hsm]\ntype = "pkcs11"\nmodule = "{hsm.module}"\n'
        f'token = "{hsm.label}"\npin = "env:{PIN_ENV}"\n\n'
        f'[backends.tpm]\ntype = "tpm"\ntcti = "{tcti}"\n'
        f'persistent_handle = "0x{SRK_HANDLE:08x}"\npin = "env:{TPM_PIN_ENV}"\n'
    )
    return config


def cli(
    config: Path,
    hsm: SoftHsm,
    *args: str,
    input: bytes = b"",
    env: Mapping[str, str | None] | None = None,
) -> CliResult:
    """`strongroom ARGS` in a subprocess with this token, its PIN and the vault passphrase."""
    full: dict[str, str | None] = {
        "SOFTHSM2_CONF": str(hsm.conf),
        PIN_ENV: hsm.pin,
        VAULT_PASS_ENV: VAULT_PASSPHRASE,
    }
    full.update(env or {})
    return run_cli(config, *args, input=input, env=full)


def pkcs11_tool(hsm: SoftHsm, *args: str, login: bool = True) -> subprocess.CompletedProcess[str]:
    """OpenSC's pkcs11-tool against the same module and token."""
    cmd = ["pkcs11-tool", "--module", hsm.module, "--token-label", hsm.label]
    if login:
        cmd += ["--login", "--pin", hsm.pin]
    return subprocess.run(
        [*cmd, *args], env=hsm.env(), capture_output=True, text=True, check=False, timeout=60
    )


def list_objects(hsm: SoftHsm) -> list[dict[str, str]]:
    """`pkcs11-tool --list-objects`, parsed: one dict per object, with its 'kind' line."""
    out = pkcs11_tool(hsm, "--list-objects")
    assert out.returncode == 0, out.stderr
    objects: list[dict[str, str]] = []
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            objects.append({"kind": line.strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip()
    return objects


# The keystore the PKCS#11 test modules share: a config for the session's token, opened.
@pytest.fixture
def config(tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    return write_config(tmp_path, softhsm)


@pytest.fixture
def ks(config: Path) -> Iterator[Keystore]:
    with strongroom.open(config) as keystore:
        yield keystore
