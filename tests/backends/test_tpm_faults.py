"""Parsec-style faults on the TPM (issue 16): the TPM process killed and restarted under an
open keystore, and a TPM reset (_TPM_Init, then `tpm2_startup -c`) with keys loaded.

Each fault gives a typed error (or none at all) and then the same Keystore object works
again: nobody restarts Strongroom. Each test has a swtpm of its own, so killing it never
touches the session's shared one.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm_support import PIN_ENV, TEST_PIN, VAULT_PASS, VAULT_PASS_ENV, Swtpm, write_config

import strongroom
from strongroom.errors import BackendUnavailable

MESSAGE = b"signed across a fault"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIN_ENV, TEST_PIN)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASS)


@pytest.fixture
def own_tpm(tmp_path: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path / "tpm-state")
    tpm.start()
    try:
        yield tpm
    finally:
        if tpm.proc is not None:
            tpm.stop()


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-srk", "transient-srk"])
def test_a_killed_tpm_is_unavailable_then_recovers_in_the_same_keystore(
    tmp_path: Path, own_tpm: Swtpm, persistent: bool
) -> None:
    cfg = write_config(tmp_path, own_tpm.tcti, persistent=persistent)
    with strongroom.open(cfg) as ks:
        ks.generate("ec", "ecdsa-p256")
        ks.generate("mac", "hmac-sha256")
        public = ks.public_key("ec")
        assert isinstance(public, ec.EllipticCurvePublicKey)
        tag = ks.mac("mac", b"before")
        ks.sign("ec", MESSAGE)  # the key is loaded in the TPM now

        own_tpm.kill()
        with pytest.raises(BackendUnavailable) as gone:
            ks.sign("ec", MESSAGE)
        assert "tpm" in str(gone.value)
        with pytest.raises(BackendUnavailable):  # still gone: a typed answer each time
            ks.mac("mac", b"before")

        own_tpm.start(same_port=True)  # back where the config points, same state
        public.verify(ks.sign("ec", MESSAGE), MESSAGE, ec.ECDSA(hashes.SHA256()))
        ks.verify("mac", b"before", tag)
        ks.generate("after", "ecdsa-p256")  # and new keys can be made
        ks.sign("after", MESSAGE)
    own_tpm.stop()
    own_tpm.start(same_port=True)
    assert own_tpm.transient_handles() == [], "the recovered keystore flushed what it loaded"


def test_a_tpm_killed_while_threads_sign_fails_them_typed_then_they_carry_on(
    tmp_path: Path, own_tpm: Swtpm
) -> None:
    """Mid-operation: four threads sign while the TPM is killed. Every failure is
    BackendUnavailable; after the restart every thread signs again."""
    cfg = write_config(tmp_path, own_tpm.tcti)
    with strongroom.open(cfg) as ks:
        ks.generate("ec", "ecdsa-p256")
        public = ks.public_key("ec")
        assert isinstance(public, ec.EllipticCurvePublicKey)
        killed, restarted = threading.Event(), threading.Event()
        untyped: list[BaseException] = []
        typed = [0]
        after = [0] * 4

        def signer(i: int) -> None:
            # Sign until the TPM is back and this thread has signed twice since: a count of
            # operations, not a time, so a slow machine only makes the test slower.
            while after[i] < 2:
                back = restarted.is_set()
                try:
                    sig = ks.sign("ec", MESSAGE)
                except BackendUnavailable:
                    typed[0] += 1
                    continue
                except BaseException as e:  # the test's subject: anything untyped
                    untyped.append(e)
                    return
                public.verify(sig, MESSAGE, ec.ECDSA(hashes.SHA256()))
                if back:
                    after[i] += 1
                if not killed.is_set():
                    killed.wait()

        threads = [threading.Thread(target=signer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        own_tpm.kill()
        killed.set()
        # one thread must have met the dead TPM before it comes back
        with pytest.raises(BackendUnavailable):
            ks.sign("ec", MESSAGE)
        own_tpm.start(same_port=True)
        restarted.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a signer hung after the restart"
        assert not untyped, untyped[:3]
        assert after == [2, 2, 2, 2]


def test_a_tpm_reset_with_keys_loaded_is_survived(tmp_path: Path, own_tpm: Swtpm) -> None:
    """_TPM_Init + TPM2_Startup(CLEAR) flush every loaded object and the SRK (unless it is
    persistent) behind the keystore's back. The keystore reloads and goes on."""
    for persistent in (True, False):
        (tmp_path / str(persistent)).mkdir()
        cfg = write_config(tmp_path / str(persistent), own_tpm.tcti, persistent=persistent)
        with strongroom.open(cfg) as ks:
            ks.generate("ec", "ecdsa-p256")
            ks.generate("mac", "hmac-sha256")
            public = ks.public_key("ec")
            assert isinstance(public, ec.EllipticCurvePublicKey)
            tag = ks.mac("mac", b"x")
            ks.sign("ec", MESSAGE)
            assert own_tpm.transient_handles(), "keys are loaded before the reset"

            own_tpm.reset()
            assert own_tpm.transient_handles() == [], "the reset flushed them"

            try:
                sig = ks.sign("ec", MESSAGE)
            except BackendUnavailable:  # a typed answer is allowed once; then it must work
                sig = ks.sign("ec", MESSAGE)
            public.verify(sig, MESSAGE, ec.ECDSA(hashes.SHA256()))
            ks.verify("mac", b"x", tag)
        assert own_tpm.transient_handles() == []


KILLED_CHILD = """
import os, sys
import strongroom
with strongroom.open(sys.argv[1]) as ks:
    ks.sign("ec", b"load the key and keep it loaded")
    if sys.argv[2] == "both":
        ks.encrypt("aes", b"and a second one, through the salted session")
    print("loaded", flush=True)
    sys.stdin.readline()  # killed here, its objects and session loaded in the TPM
"""


def _start_child(cfg: Path, keys: str = "both") -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(cfg), keys],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "loaded\n"
    return child


def test_what_killed_clients_left_in_the_tpm_is_reclaimed(tmp_path: Path, own_tpm: Swtpm) -> None:
    """Issue 16, defect 5: with no resource manager (the swtpm TCTI), a killed client's
    transient objects and session stay loaded; four of them wedged the TPM ("no free slot").
    A keystore that finds no other live Strongroom process on the TPM flushes them."""
    cfg = write_config(tmp_path, own_tpm.tcti)
    with strongroom.open(cfg) as ks:
        ks.generate("ec", "ecdsa-p256")
        ks.generate("aes", "aes-256")
    for _ in range(4):
        child = _start_child(cfg)
        child.kill()
        child.wait()
    assert own_tpm.transient_handles(), "the killed clients left objects loaded"
    with strongroom.open(cfg) as ks:
        ks.sign("ec", MESSAGE)
        ks.decrypt("aes", ks.encrypt("aes", MESSAGE))
        ks.generate("more", "ecdsa-p256")
        ks.sign("more", MESSAGE)
    assert own_tpm.transient_handles() == []


def test_a_live_clients_objects_are_left_alone(tmp_path: Path, own_tpm: Swtpm) -> None:
    """Another live Strongroom process on the same TPM keeps what it has loaded: nothing is
    reclaimed while it runs (it holds one of the three slots; this keystore works in the
    other two), and it signs on afterwards."""
    cfg = write_config(tmp_path, own_tpm.tcti)
    with strongroom.open(cfg) as ks:
        ks.generate("ec", "ecdsa-p256")
        ks.generate("aes", "aes-256")
    live = _start_child(cfg, "one")
    try:
        loaded = set(own_tpm.transient_handles())
        assert loaded
        with strongroom.open(cfg) as ks:
            ks.sign("ec", MESSAGE)
            assert loaded <= set(own_tpm.transient_handles()), "a live client's objects went"
    finally:
        assert live.stdin is not None
        live.stdin.write("\n")
        live.stdin.close()
        assert live.wait(60) == 0
    assert own_tpm.transient_handles() == []


def test_doctor_says_when_the_tpm_has_no_resource_manager(tmp_path: Path, own_tpm: Swtpm) -> None:
    cfg = write_config(tmp_path, own_tpm.tcti)
    with strongroom.open(cfg) as ks:
        details = {s.name: s for s in ks.backends()}["tpm"].details
        assert details["resource_manager"] is False
        assert any("no resource manager" in n for n in details["notes"])
    r = run_cli(cfg, "doctor")
    row = [line for line in r.stdout.decode().splitlines() if "no resource manager" in line]
    assert row and "note" in row[0], r.stdout
    # a TCTI through the kernel's resource manager has no such note
    (tmp_path / "rm").mkdir()
    rm = write_config(tmp_path / "rm", "device:/dev/tpmrm0")
    with strongroom.open(rm) as ks:
        assert "notes" not in {s.name: s for s in ks.backends()}["tpm"].details
