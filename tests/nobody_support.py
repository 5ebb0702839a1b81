"""Test support: run Python code as the unprivileged uid 65534 (nobody), with no capabilities.

/root, where the venv's base interpreter lives, is 0700, so the child runs the system
interpreter on a world-readable copy of the few strongroom modules it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from strongroom import _native

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def skip_unless_root_with_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")


def unprivileged_tree(root: Path, core_modules: tuple[str, ...] = ()) -> Path:
    """`root` made into a world-readable package `strongroom`: the native module plus
    copies of `core_modules` (file names in core/)."""
    pkg = root / "strongroom"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    core = Path(_native.__file__).parent
    for name in core_modules:
        shutil.copy(core / name, pkg / name)
    shutil.copy(_native.__file__, pkg / Path(_native.__file__).name)
    for p in (root, pkg, *pkg.iterdir()):
        p.chmod(0o755)
    return root


def interpreters() -> list[str]:
    major, minor = sys.version_info[:2]
    # The system interpreter first: a venv whose base Python lives under /root only starts for
    # uid 65534 by accident (setpriv execs with its capabilities still held).
    found = [
        f"/usr/bin/python{major}.{minor}",
        f"/usr/local/bin/python{major}.{minor}",
        sys.executable,
    ]
    return [p for p in dict.fromkeys(found) if os.path.exists(p)]


def run_as_nobody(
    tmp: str, env: dict[str, str], probe: str, code: str
) -> subprocess.CompletedProcess[str]:
    """Run `code` as uid 65534 with the first interpreter that can run `probe`; else skip."""
    python = next(
        (
            p
            for p in interpreters()
            if subprocess.run(
                [*NOBODY, p, "-s", "-c", probe], env=env, cwd=tmp, capture_output=True
            ).returncode
            == 0
        ),
        None,
    )
    if python is None:
        pytest.skip(f"no Python {sys.version_info[:2]} that uid 65534 can run")
    return subprocess.run(
        [*NOBODY, python, "-s", "-c", code],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_stdlib_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code`, which needs only the standard library, as uid 65534 in the system
    Python's isolated mode (no site, no environment, no current directory on the path)."""
    return subprocess.run(
        [*NOBODY, "/usr/bin/python3", "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
