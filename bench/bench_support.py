"""What the SoftHSM2 benchmarks share (bench_pkcs11, bench_pkcs11server, bench_sshagent);
each is run as a script, so this module is found next to it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = "bench-pin-1234"


def make_token(tmp: Path) -> None:
    """A fresh SoftHSM2 token labelled `bench` (user PIN: PIN); sets SOFTHSM2_CONF for this
    process (and so for any server it starts)."""
    out = subprocess.run(
        ["bash", str(ROOT / "softhsm-config" / "init-token.sh"), str(tmp / "hsm"), "bench"],
        env={**os.environ, "SOFTHSM_PIN": PIN},
        capture_output=True,
        text=True,
        check=True,
    )
    os.environ["SOFTHSM2_CONF"] = out.stdout.strip().split("=", 1)[1]
