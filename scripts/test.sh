#!/usr/bin/env bash
# The whole test suite: ruff (lint and format), mypy (strict) and pytest.
# Installs what it needs first (scripts/setup.sh): .venv with the locked versions of
# requirements/lock.txt. Every check runs even when an earlier one fails; the exit status
# is non-zero if any failed. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k snapshot -x`.
#
# `bash scripts/test.sh --latest [pytest arguments]` runs the same checks in .venv-latest
# with the newest release of every dependency instead (upgraded on every run), so that a
# new cryptography, OpenSSL build or pytest breaks our run before it breaks a user's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = --latest ]; then
    shift
    bash scripts/setup.sh --latest
    export PATH=$PWD/.venv-latest/bin:$PATH
    # Its own mypy cache: the two venvs may have different mypy versions.
    export MYPY_CACHE_DIR=$PWD/.venv-latest/mypy_cache
    MODE="newest releases (.venv-latest), not the lock"
else
    bash scripts/setup.sh
    export PATH=$PWD/.venv/bin:$PATH
    MODE="locked versions (.venv, requirements/lock.txt)"
fi
echo "test.sh: $MODE"

step() { printf '\n==> %s\n' "$*"; }
results=()
failed=0
record() {  # record NAME STATUS
    if [ "$2" -eq 0 ]; then
        results+=("$1: ok")
    else
        results+=("$1: FAILED (exit $2)")
        failed=1
    fi
}

# mypy cannot map the import name `strongroom` onto core/ and backends/ the way
# setuptools' package-dir does, so it checks a view of the package made of symlinks:
#   build/typecheck/strongroom/<every entry of core/>  and  .../strongroom/backends -> backends/
# It is rebuilt on every run so that new modules are picked up. Error paths are
# rewritten back to core/ and backends/ so they point at the real files.
make_typecheck_view() {
    local view=build/typecheck/strongroom entry name
    rm -rf build/typecheck
    mkdir -p "$view"
    for entry in core/*; do
        name=${entry#core/}
        [ "$name" = __pycache__ ] && continue
        ln -s "$PWD/$entry" "$view/$name"
    done
    ln -s "$PWD/backends" "$view/backends"
}

step "ruff check ."
status=0; ruff check . || status=$?; record "ruff check" "$status"

step "ruff format --check ."
status=0; ruff format --check . || status=$?; record "ruff format" "$status"

step "mypy -p strongroom (strict, settings from pyproject.toml)"
make_typecheck_view
status=0
MYPYPATH=build/typecheck mypy --config-file pyproject.toml -p strongroom \
    | sed -E 's#^build/typecheck/strongroom/backends/#backends/#; s#^build/typecheck/strongroom/#core/#' \
    || status=$?
record "mypy" "$status"

step "pytest"
status=0; pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that counts as a failure" >&2
fi
record "pytest" "$status"

step "summary: $MODE"
printf '  %s\n' "${results[@]}"
if [ "$failed" -ne 0 ]; then
    echo "test.sh: FAILED" >&2
    exit 1
fi
echo "test.sh: all checks passed"
