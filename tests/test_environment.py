"""The suite is hermetic: a developer's STRONGROOM_* variables and user dirs do not reach it.

tests/conftest.py scrubs the environment when pytest imports it. The first test checks the
scrubbed environment of this process; the second runs that check and a few CLI and service
tests in a child pytest whose environment is hostile: every STRONGROOM_* variable the code
reads set to something that would break them, and a user config dir holding a config that
points elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TEST_HOME, USER_ENV_PREFIX, XDG_DIRS

from strongroom import _native
from strongroom import config as config_mod

ROOT = Path(__file__).resolve().parent.parent

# Every STRONGROOM_* name core/ and backends/ read (grep -rhoE 'STRONGROOM_[A-Z_]+'), with a
# value that sends the code somewhere wrong.
HOSTILE = {
    "STRONGROOM_CONFIG": "{hostile}/strongroom.toml",
    "STRONGROOM_PASSPHRASE": "hostile passphrase",
    "STRONGROOM_PASSPHRASE_ALICE": "hostile passphrase",
    "STRONGROOM_SERVER": "unix:{hostile}/no-such-service.sock",
    "STRONGROOM_TOKEN": "hostile-token",
    "STRONGROOM_HSM_PIN": "0000",
    "STRONGROOM_PIV_PIN": "0000",
    "STRONGROOM_NO_SECRETMEM": "1",
}

# Cheap tests that fail when any of the above leaks through: the CLI against the fixture's
# vault (STRONGROOM_CONFIG, _SERVER, _PASSPHRASE), the client with a certificate and no
# token (STRONGROOM_TOKEN would be sent instead).
CHILD_TESTS = [
    "tests/test_environment.py::test_this_process_sees_no_user_environment",
    "tests/cli/test_cli.py::test_vault_status_before_init",
    "tests/cli/test_cli.py::test_init_creates_the_vault_and_a_second_init_fails_in_one_line",
    "tests/service/test_server.py::test_client_certificate_identifies_the_caller",
]


def test_this_process_sees_no_user_environment() -> None:
    assert [name for name in os.environ if name.startswith(USER_ENV_PREFIX)] == []
    for name in XDG_DIRS:
        assert Path(os.environ[name]).parent == TEST_HOME
    # Without STRONGROOM_CONFIG the config and the data live in the throwaway home.
    assert config_mod.default_path().is_relative_to(TEST_HOME)
    assert config_mod.load().data_dir.is_relative_to(TEST_HOME)
    # STRONGROOM_NO_SECRETMEM was gone before the native module read it.
    assert _native.secretmem_enabled()


def test_a_hostile_user_environment_does_not_reach_the_tests(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile"
    (hostile / "data").mkdir(parents=True)
    elsewhere = f'[keystore]\ndata_dir = "{hostile / "data"}"\n'
    (hostile / "strongroom.toml").write_text(elsewhere, encoding="utf-8")
    user_config = hostile / "xdg-config" / "strongroom"
    user_config.mkdir(parents=True)
    (user_config / "strongroom.toml").write_text(elsewhere, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in XDG_DIRS}
    env.update({name: value.format(hostile=hostile) for name, value in HOSTILE.items()})
    env["XDG_CONFIG_HOME"] = str(hostile / "xdg-config")
    env["XDG_DATA_HOME"] = str(hostile / "xdg-data")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHILD_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{len(CHILD_TESTS)} passed" in proc.stdout, proc.stdout[-4000:]
    # Nothing was written where the hostile variables pointed.
    assert list((hostile / "data").iterdir()) == []
    assert not (hostile / "xdg-data").exists()
