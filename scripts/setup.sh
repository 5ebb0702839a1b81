#!/usr/bin/env bash
# Install what Strongroom needs on a Debian machine (bookworm or later), then make
# .venv and the editable install (which builds the native extension in native/).
#
# .venv gets exactly the versions of requirements/lock.txt, hash-checked (refresh the
# lock with scripts/lock.sh): packages it lacks are installed, other versions replaced,
# packages the lock does not name removed. See docs/decisions.md, "Locked installs".
#
# Idempotent: it installs only what is missing, and skips the pip step when
# pyproject.toml, setup.py, native/ and requirements/ have not changed since the last
# install, .venv still matches the lock and the extension still imports.
# STRONGROOM_SETUP_FORCE=1 reinstalls anyway.
# PYTHON=/path/to/python3 picks another interpreter for a new .venv.
#
# --latest: instead, .venv-latest with the newest releases of everything (the lock ignored,
# upgraded on every run), for `bash scripts/test.sh --latest`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LATEST=0
case "${1:-}" in
    "") ;;
    --latest) LATEST=1 ;;
    *) printf 'usage: bash scripts/setup.sh [--latest]\n' >&2; exit 2 ;;
esac
if [ "$LATEST" = 1 ]; then VENV=$ROOT/.venv-latest; else VENV=$ROOT/.venv; fi
VENV_NAME=${VENV#"$ROOT/"}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.strongroom-install-stamp
EXTRAS=dev,pkcs11,tpm,fido,piv,server,postgres
LOCK=requirements/lock.txt
BUILD_LOCK=requirements/build.txt
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# Run a noisy command with its output in a log; show the log only if it fails.
quiet() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        printf 'setup.sh: command failed (exit %s): %s\n' "$status" "$*" >&2
        tail -n 40 "$log" >&2
        rm -f "$log"
        exit "$status"
    fi
    rm -f "$log"
}

installed() {  # installed PACKAGE: true when dpkg says "install ok installed"
    # Captured, not piped into `grep -q`: grep quitting early would SIGPIPE dpkg, and under
    # pipefail an installed package would then look missing.
    local out
    out=$(dpkg -s "$1" 2>/dev/null) || return 1
    [[ $'\n'$out$'\n' == *$'\nStatus: install ok installed\n'* ]]
}

python_ok() {  # python_ok PY: true for Python 3.11 or newer
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

has_headers() {  # has_headers PY: true when Python.h is where the build will look for it
    "$1" -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        2>/dev/null
}

has_venv() {  # has_venv PY: true when `PY -m venv` can bootstrap pip (Debian splits ensurepip off)
    "$1" -c 'import ensurepip, venv' 2>/dev/null
}

# -- 1. system packages ------------------------------------------------------------------------
# gcc + libc6-dev build native/ (libssl-dev: SHA-256 for the audit log's append); openssl verifies signatures in the tests and the
# demo; util-linux gives setpriv (the memlock test runs as an unprivileged user).
wanted=(gcc libc6-dev openssl util-linux libssl-dev)
# The emulators and tools the backend tests run against (see EMULATORS.md in shared/):
# SoftHSM2 + OpenSC's pkcs11-tool; swtpm + tpm2-tools, and the TSS headers tpm2-pytss builds on.
wanted+=(softhsm2 opensc swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config)
# OpenSSH's client and server: the ssh-agent tests run ssh-add, ssh-keygen, ssh and their own
# sshd against `strongroom ssh-agent`; git signs commits through it (gpg.format=ssh).
wanted+=(openssh-client openssh-server git)
# p11-kit's client module (p11-kit-client.so), the OpenSSL pkcs11 engine and NSS's tools: the
# pkcs11-server tests load the module under pkcs11-tool, ssh-keygen, ssh, python-pkcs11,
# openssl's engine and NSS's modutil/certutil; tpm2-pkcs11 is what
# bench/bench_pkcs11server.py --tpm compares with.
wanted+=(p11-kit-modules libengine-pkcs11-openssl libnss3-tools libtpm2-pkcs11-1)
# pcscd + vpcd (a virtual reader) for the FIDO-over-PC/SC tests; swig builds pyscard.
wanted+=(pcscd libpcsclite-dev vsmartcard-vpcd swig)
# PostgreSQL: the server the store tests start a private cluster of (initdb, pg_ctl). The
# locked psycopg-binary brings its own libpq; libpq5 serves psycopg's pure-Python fallback.
wanted+=(postgresql libpq5)
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    wanted+=(python3 python3-dev python3-venv)
else
    has_headers "$PYTHON" || wanted+=(python3-dev)
    [ -x "$VENV/bin/python" ] || has_venv "$PYTHON" || wanted+=(python3-venv)
fi

if command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in "${wanted[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -eq 0 ]; then
            SUDO=()
        elif command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo DEBIAN_FRONTEND=noninteractive)
        else
            die "need to install ${missing[*]} but this is not root and sudo is missing"
        fi
        say "apt: installing ${missing[*]}"
        quiet "${SUDO[@]}" apt-get update -q
        quiet "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        say "apt: system packages present (${wanted[*]})"
    fi
else
    say "not a Debian system: skipping apt; make sure a C compiler, Python >= 3.11 with" \
        "its headers and venv, openssl and setpriv are installed"
fi

# -- 2. Python -----------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON found; install Python 3.11 or newer"
if ! python_ok "$PYTHON"; then
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
        || echo unknown)
    die "Strongroom needs Python 3.11 or newer, but $(command -v "$PYTHON") is $version;" \
        "install a newer one and run again with PYTHON=/path/to/python3.11"
fi
has_headers "$PYTHON" || die "$(command -v "$PYTHON") has no C headers (Python.h), which the" \
    "native extension needs; on Debian install python3-dev, or use a Python built with headers"
say "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# -- 3. virtual environment ----------------------------------------------------------------------
if [ ! -e "$VENV" ]; then
    say "venv: creating $VENV_NAME"
    quiet "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
elif [ ! -x "$VENV/bin/python" ] || ! python_ok "$VENV/bin/python"; then
    die "$VENV_NAME exists but its python is missing or older than 3.11; remove $VENV_NAME" \
        "and run again"
else
    say "venv: $VENV_NAME exists"
fi

# -- 4. Python packages, the editable install and the native build -------------------------------
# A strongroom.egg-info left in the checkout by `setup.py build_ext --inplace` would shadow
# the installed metadata (entry points!) for anything run from the repository root.
rm -rf "$ROOT/strongroom.egg-info"
PIP=("$VENV/bin/python" -m pip)

native_imports() { "$VENV/bin/python" -c 'import strongroom._native' 2>/dev/null; }

if [ "$LATEST" = 1 ]; then
    # The newest release of every dependency (and of the build tools, in pip's isolated
    # build environments), whatever the lock says: what a user installing today gets.
    say "pip: upgrading pip, then strongroom[$EXTRAS] and every dependency to the newest release"
    quiet "${PIP[@]}" install -q --upgrade pip
    quiet "${PIP[@]}" install -q --upgrade --upgrade-strategy eager -e ".[$EXTRAS]"
    native_imports || die "the editable install finished but strongroom._native does not import"
    say "setup done ($VENV_NAME, newest releases): $("$VENV/bin/strongroom" --version)"
    exit 0
fi

[ -f "$LOCK" ] && [ -f "$BUILD_LOCK" ] || die "$LOCK or $BUILD_LOCK is missing"
# Runs in .venv: is every package there exactly what the lock says, and nothing else?
in_sync() { "$VENV/bin/python" scripts/lockcheck.py check "$LOCK" 2>/dev/null; }
fingerprint=$(cat pyproject.toml setup.py native/* "$LOCK" "$BUILD_LOCK" | sha256sum | cut -d' ' -f1)
if [ "${STRONGROOM_SETUP_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$fingerprint" ] && in_sync && native_imports; then
    say "pip: .venv matches $LOCK and strongroom is installed (STRONGROOM_SETUP_FORCE=1 reinstalls)"
else
    rm -f "$STAMP"
    # 1. The build tools (pip itself among them), hash-checked, so that 2. and 3. can build
    #    without pip's isolated build environments, which would fetch unpinned setuptools.
    say "pip: installing the build tools of $BUILD_LOCK (hash-checked)"
    quiet "${PIP[@]}" install -q --require-hashes -r "$BUILD_LOCK"
    # 2. Every dependency at its locked version, hash-checked; a different installed version
    #    is replaced. tpm2-pytss and pyscard come as sdists and build here.
    say "pip: installing $LOCK (hash-checked; tpm2-pytss and pyscard build from source)"
    quiet "${PIP[@]}" install -q --require-hashes --no-build-isolation -r "$LOCK"
    # ...and whatever the lock does not name goes (pip-sync semantics).
    mapfile -t extra < <("$VENV/bin/python" scripts/lockcheck.py extras "$LOCK")
    if [ "${#extra[@]}" -gt 0 ]; then
        say "pip: removing packages the lock does not name: ${extra[*]}"
        quiet "${PIP[@]}" uninstall -q -y "${extra[@]}"
    fi
    # 3. Our own package, editable, with nothing else: it builds native/.
    say "pip: installing strongroom in editable mode (builds native/)"
    quiet "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
    "$VENV/bin/python" scripts/lockcheck.py check "$LOCK" \
        || die ".venv does not match $LOCK after the install (see above)"
    native_imports || die "the editable install finished but strongroom._native does not import"
    printf '%s\n' "$fingerprint" >"$STAMP"
fi
# Byte-compile our own modules. An environment with PYTHONDONTWRITEBYTECODE set (CI images
# often have it) otherwise compiles ~30 modules from source in every `strongroom` process:
# 0.2 s a command, which the test suite's ~1,000 CLI calls and every user pay. Python checks
# each .pyc against its source's mtime, so an edited module is never run from a stale one.
"$VENV/bin/python" -m compileall -q core backends >/dev/null
say "setup done: $("$VENV/bin/strongroom" --version)"
