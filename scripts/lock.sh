#!/usr/bin/env bash
# Refresh the lock files that scripts/setup.sh installs from (the demo, the tests, CI):
#   requirements/lock.txt   every dependency of .[dev,pkcs11,tpm,fido,piv,server,postgres]
#                           plus the build tools of requirements/build.in, pinned with hashes
#   requirements/build.txt  the build tools alone, at the same versions (installed first,
#                           so that sdists build with --no-build-isolation; see decisions.md)
# for Python 3.11 and newer on any platform (uv's --universal: x86_64 and aarch64 Linux
# alike). pyproject.toml keeps the compatible ranges users get.
#
#   bash scripts/lock.sh                          everything to its newest release
#   bash scripts/lock.sh --upgrade-package NAME   only NAME (and what it needs); repeatable
#   bash scripts/lock.sh --keep                   keep every pin that still fits (after an
#                                                 edit of pyproject.toml or build.in)
# Then run `bash scripts/test.sh` (it reinstalls .venv from the new lock) and commit both files.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The lock tool, pinned; it lives in its own venv and never in .venv.
UV_VERSION=0.13.10
TOOLS=.venv-lock
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ "$("$TOOLS/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    echo "==> lock: installing uv $UV_VERSION in $TOOLS"
    "$PYTHON" -m venv --clear "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q "uv==$UV_VERSION"
fi

if [ "$#" -eq 0 ]; then
    set -- --upgrade
elif [ "$1" = --keep ]; then
    shift
fi
extras=(dev pkcs11 tpm fido piv server postgres)
common=(--universal --python-version 3.11 --generate-hashes --quiet
    --custom-compile-command "bash scripts/lock.sh")

echo "==> lock: requirements/lock.txt (.[${extras[*]}] + requirements/build.in)"
"$TOOLS/bin/uv" pip compile pyproject.toml requirements/build.in \
    "${extras[@]/#/--extra=}" "${common[@]}" "$@" -o requirements/lock.txt
echo "==> lock: requirements/build.txt (requirements/build.in, at the versions of lock.txt)"
# Always re-resolved from scratch: the constraint alone decides the versions.
"$TOOLS/bin/uv" pip compile requirements/build.in -c requirements/lock.txt \
    "${common[@]}" --upgrade -o requirements/build.txt
echo "==> lock: done; now bash scripts/test.sh, then commit requirements/"
