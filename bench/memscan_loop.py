"""Run tests/test_memory_scan.py many times in a row and count the runs that pass.

One clean scan shows only that no copy was found that time: freed memory may or may not
have been reused before the scan. The claim in docs/threat-model.md rests on this loop.
Not part of CI (each run takes ~20 s and needs root).

    sudo .venv/bin/python bench/memscan_loop.py --runs 50
    sudo .venv/bin/python bench/memscan_loop.py --runs 50 --python /tmp/venv-c50/bin/python

--python picks the interpreter (a venv with another cryptography version) that runs
pytest and therefore the vault child.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the venv")
    parser.add_argument("--secretmem", choices=("on", "off", "both"), default="both")
    args = parser.parse_args()
    version = subprocess.run(
        [args.python, "-c", "import cryptography; print(cryptography.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    modes = ("on", "off") if args.secretmem == "both" else (args.secretmem,)
    for mode in modes:
        passed = failed = 0
        for i in range(args.runs):
            run = subprocess.run(
                [
                    args.python,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    f"tests/test_memory_scan.py::test_no_key_in_process_memory[{mode}]",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout:
                passed += 1
            else:
                failed += 1
                found = [ln for ln in run.stdout.splitlines() if "copies of secrets" in ln]
                print(f"run {i + 1} ({mode}) FAILED: {found[-1] if found else run.stdout[-400:]}")
            print(
                f"\rcryptography {version}, secretmem {mode}: {passed} passed, {failed} failed "
                f"of {i + 1}",
                end="",
                flush=True,
            )
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
