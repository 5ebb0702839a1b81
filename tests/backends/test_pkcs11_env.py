"""The pkcs11 backend's `env` table: SOFTHSM2_CONF (or any variable a module reads) set from
the config before the module loads, so no shell has to export it.

The CLI runs in a subprocess with SOFTHSM2_CONF removed from its environment and finds a
private token only through the config; OpenSC's pkcs11-tool, given that conf, then sees
the key. In-process tests cover the checks of the table and a module already loaded
with another value (this process loaded SoftHSM2 with the session token's conf).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CliResult, run_cli
from pkcs11_support import (
    MODULE,
    PIN_ENV,
    SO_PIN,
    USER_PIN,
    SoftHsm,
    config,
    softhsm,
    write_config,
)

import strongroom
from strongroom.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LABEL = "env-token"

__all__ = ["config", "softhsm"]

pytestmark = pytest.mark.skipif(
    shutil.which("pkcs11-tool") is None or shutil.which("softhsm2-util") is None,
    reason="needs pkcs11-tool (opensc) and softhsm2-util",
)


@pytest.fixture
def private_conf(tmp_path: Path) -> Path:
    """A token in its own SoftHSM2 config, which only the Strongroom config will name; the
    conf's path (the fixture's value shows in failures, so it is not a SoftHsm with a PIN)."""
    directory = tmp_path / "hsm"
    out = subprocess.run(
        ["bash", str(ROOT / "softhsm-config" / "init-token.sh"), str(directory), LABEL],
        env={**os.environ, "SOFTHSM_PIN": USER_PIN, "SOFTHSM_SO_PIN": SO_PIN},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.startswith("export SOFTHSM2_CONF="), out.stdout
    return directory / "softhsm2.conf"


def env_config(directory: Path, conf: Path, extra: str = "") -> Path:
    """A config for the private token whose `env` names its SoftHSM2 conf."""
    hsm = SoftHsm(conf.parent, conf, label=LABEL)
    return write_config(directory, hsm, hsm_extra=f'env = {{ SOFTHSM2_CONF = "{conf}" }}\n{extra}')


def cli(config: Path, *args: str, exported: str | None = None) -> CliResult:
    """The CLI with SOFTHSM2_CONF exported as given, or (None) not in its environment at all."""
    return run_cli(config, *args, env={"SOFTHSM2_CONF": exported, PIN_ENV: USER_PIN})


def ok(result: CliResult) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_env_sets_softhsm2_conf_for_the_module(tmp_path: Path, private_conf: Path) -> None:
    config = env_config(tmp_path, private_conf)
    info = json.loads(ok(cli(config, "--json", "key", "generate", "from-env", "--type",
                             "ecdsa-p256", "--backend", "hsm")))  # fmt: skip
    assert info["backend"] == "hsm"
    status = json.loads(ok(cli(config, "--json", "backends")))
    hsm = next(b for b in status if b["name"] == "hsm")
    assert hsm["available"] and hsm["details"]["env"] == {"SOFTHSM2_CONF": "config"}
    assert str(private_conf) not in json.dumps(hsm)  # names and sources, no values

    listed = subprocess.run(
        ["pkcs11-tool", "--module", MODULE, "--token-label", LABEL,
         "--login", "--pin", USER_PIN, "--list-objects"],
        env={**os.environ, "SOFTHSM2_CONF": str(private_conf)},
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("label:      from-env") == 2, listed.stdout  # private and public


def test_exported_value_wins_unless_env_override(
    tmp_path: Path, private_conf: Path, softhsm: SoftHsm
) -> None:
    """A SOFTHSM2_CONF the user exported is kept by default, and the error says so;
    env_override = true gives the config's value."""
    config = env_config(tmp_path, private_conf)
    kept = cli(config, "key", "generate", "k", "--type", "ecdsa-p256", "--backend", "hsm",
               exported=str(softhsm.conf))  # fmt: skip
    assert kept.returncode == 6 and kept.stderr.count("\n") == 1, kept.stderr
    assert f"no token labelled '{LABEL}'" in kept.stderr
    assert "SOFTHSM2_CONF exported in the environment was used instead" in kept.stderr
    assert "env_override = true" in kept.stderr

    override = env_config(tmp_path, private_conf, "env_override = true\n")
    ok(cli(override, "key", "generate", "k", "--type", "ecdsa-p256", "--backend", "hsm",
           exported=str(softhsm.conf)))  # fmt: skip


def test_env_table_is_checked(tmp_path: Path, softhsm: SoftHsm) -> None:
    for extra, why in (
        ("env = { SOFTHSM2_CONF = 5 }", "SOFTHSM2_CONF must be a string"),
        ('env = { "NOT=NAME" = "x" }', "'NOT=NAME' is not an environment variable name"),
        ('env = { "" = "x" }', "'' is not an environment variable name"),
        ('env = "SOFTHSM2_CONF=/x"', "has the wrong type"),
        ('env_override = "yes"', "has the wrong type"),
    ):
        path = write_config(tmp_path, softhsm, hsm_extra=extra + "\n")
        with pytest.raises(ConfigError, match=why) as err:
            strongroom.open(path)
        assert "backends.hsm.env" in str(err.value)


def test_module_loaded_with_another_value(config: Path, tmp_path: Path, softhsm: SoftHsm) -> None:
    """This process loaded SoftHSM2 with the session token's conf: a backend whose env asks
    for another value is unavailable (the module would never read it); the same value works."""
    with strongroom.open(config) as ks:
        ks.generate("loaded", "ecdsa-p256", backend="hsm")  # the module is loaded now
    before = os.environ["SOFTHSM2_CONF"]
    other = tmp_path / "other.conf"
    clash = write_config(
        tmp_path, softhsm, name="clash.toml",
        hsm_extra=f'env = {{ SOFTHSM2_CONF = "{other}" }}\nenv_override = true\n',
    )  # fmt: skip
    with strongroom.open(clash) as ks:
        reason = {s.name: s for s in ks.backends()}["hsm"].reason
    assert reason is not None and "already loaded in this process" in reason, reason
    assert "another value of SOFTHSM2_CONF" in reason and str(other) not in reason
    assert os.environ["SOFTHSM2_CONF"] == before  # nothing changed behind the loaded module

    same = write_config(
        tmp_path, softhsm, name="same.toml",
        hsm_extra=f'env = {{ SOFTHSM2_CONF = "{softhsm.conf}" }}\nenv_override = true\n',
    )  # fmt: skip
    with strongroom.open(same) as ks:
        assert ks.sign("loaded", b"same module, same conf")
