"""The vault's TPM counter against rollback of its store (`rollback_counter`, docs/storage.md):
every change advances an NV counter in swtpm; a copy of the database from before later
changes, put back, is refused with RollbackDetected; a commit whose counter step was cut
short by a kill is caught up at the next unlock; tpm2-tools sees the counter."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VAULT_PASSPHRASE
from tpm_support import PIN_ENV, TEST_PIN, VAULT_PASS_ENV, Swtpm, swtpm
from tpm_support import write_config as write_tpm_config

import strongroom
from strongroom import RollbackDetected
from strongroom.backends.tpm.backend import counter_index

__all__ = ["swtpm"]
DATA = b"rollback test"


@pytest.fixture
def config(tmp_path: Path, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    monkeypatch.setenv(PIN_ENV, TEST_PIN)
    path = write_tpm_config(tmp_path, swtpm.tcti)
    text = path.read_text().replace(
        '[backends.vault]\ntype = "vault"\n',
        '[backends.vault]\ntype = "vault"\nrollback_counter = "tpm"\n',
    )
    path.write_text(text)
    yield path
    # The counter is an NV index in the session's swtpm: give its space back.
    with strongroom.open(path) as ks:
        vault_id = ks.vault.vault_status().get("vault_id")  # type: ignore[attr-defined]
    if vault_id:
        subprocess.run(
            ["tpm2_nvundefine", f"0x{counter_index(vault_id):08x}"],
            env=swtpm.tools_env(),
            capture_output=True,
            check=False,
        )


def db_files(config: Path) -> list[Path]:
    data = config.parent / "data"
    return [data / n for n in ("catalog.sqlite", "catalog.sqlite-wal") if (data / n).exists()]


def test_a_rolled_back_store_is_refused(config: Path, tmp_path: Path, swtpm: Swtpm) -> None:
    with strongroom.open(config) as ks:
        ks.generate("first", "ed25519", backend="vault")
        vault_id = ks.vault.vault_status()["vault_id"]  # type: ignore[attr-defined]
    old = tmp_path / "old"
    old.mkdir()
    for f in db_files(config):
        shutil.copy2(f, old / f.name)
    with strongroom.open(config) as ks:
        ks.generate("second", "ed25519", backend="vault")
    new = tmp_path / "new"
    new.mkdir()
    for f in db_files(config):
        shutil.copy2(f, new / f.name)

    for f in db_files(config):  # put the older copy back, as a restored disk image would
        f.unlink()
    for f in old.iterdir():
        shutil.copy2(f, config.parent / "data" / f.name)
    with pytest.raises(RollbackDetected, match="rolled back"), strongroom.open(config) as ks:
        ks.sign("first", DATA)

    for f in db_files(config):
        f.unlink()
    for f in new.iterdir():
        shutil.copy2(f, config.parent / "data" / f.name)
    with strongroom.open(config) as ks:  # the current copy opens
        ks.verify("second", DATA, ks.sign("second", DATA))

    index = f"0x{counter_index(vault_id):08x}"
    public = subprocess.run(
        ["tpm2_nvreadpublic", index], env=swtpm.tools_env(), capture_output=True, text=True
    )
    assert public.returncode == 0, public.stderr
    # a counter (nt=0x1) with its own auth, no dictionary-attack lockout, written
    assert "friendly: authwrite|nt=0x1|authread|no_da|written" in public.stdout, public.stdout
    value = subprocess.run(
        ["tpm2_nvread", index, "-C", index, "-s", "8"],
        env=swtpm.tools_env(),
        capture_output=True,
        check=True,
    ).stdout
    with strongroom.open(config) as ks:
        ks.vault.unlock()  # type: ignore[attr-defined]
        status = ks.vault.vault_status()  # type: ignore[attr-defined]
        assert status["rollback_counter"] == int.from_bytes(value, "big")


def test_a_kill_between_commit_and_counter_step_is_caught_up(config: Path) -> None:
    with strongroom.open(config) as ks:
        ks.generate("before", "ed25519", backend="vault")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ks = strongroom.open(config)
            tpm = ks.backend("tpm")
            real = tpm.counter_advance  # type: ignore[attr-defined]

            def advance(label: str, at_least: int) -> int:
                if at_least > 0:  # the step after the commit: die instead
                    os.kill(os.getpid(), signal.SIGKILL)
                return int(real(label, at_least))

            tpm.counter_advance = advance  # type: ignore[attr-defined]
            ks.generate("during", "ed25519", backend="vault")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with strongroom.open(config) as ks:  # the store is ahead of the counter: caught up
        ks.verify("during", DATA, ks.sign("during", DATA))
    with strongroom.open(config) as ks:
        ks.generate("after", "ed25519", backend="vault")
        ks.vault.verify_store()  # type: ignore[attr-defined]
