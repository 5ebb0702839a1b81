"""Compare the packages installed in this interpreter's environment with lock files.

Run with the venv's python by scripts/setup.sh:

    python scripts/lockcheck.py check LOCK...    exit 0 if the environment is exactly the
                                                  lock (for this Python and platform), else
                                                  print the differences and exit 1
    python scripts/lockcheck.py extras LOCK...   print the installed packages no lock names
                                                  (setup.sh uninstalls them)

Our own package (strongroom, installed editable with --no-deps) is not in the lock and is
left out of both. Lock lines are `name==version [; marker] \\` as uv writes them; entries
whose marker does not hold here (e.g. colorama on Windows) do not count.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a venv not installed from the lock yet: certainly not in sync
    print("lockcheck: 'packaging' is not installed", file=sys.stderr)
    sys.exit(1)

OWN = "strongroom"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(paths: list[str]) -> dict[str, str]:
    """{canonical name: version} of the pins that apply to this interpreter."""
    pins: dict[str, str] = {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            m = PIN.match(line)
            if m is None:
                continue
            name, version, marker = m.groups()
            if marker and not Marker(marker).evaluate():
                continue
            pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    found.pop(OWN, None)
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("check", "extras"):
        print(__doc__, file=sys.stderr)
        return 2
    pins, have = locked(argv[1:]), installed()
    extras = sorted(set(have) - set(pins))
    if argv[0] == "extras":
        for name in extras:
            print(name)
        return 0
    problems = [f"missing {n}=={v}" for n, v in sorted(pins.items()) if n not in have]
    problems += [
        f"{n} is {have[n]}, the lock says {v}"
        for n, v in sorted(pins.items())
        if n in have and Version(have[n]) != Version(v)
    ]
    problems += [f"{n} {have[n]} is not in the lock" for n in extras]
    for p in problems:
        print(f"lockcheck: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
