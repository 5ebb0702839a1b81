#!/usr/bin/env bash
# Make a private SoftHSM2 setup with one fresh token, for tests and experiments.
#
#   softhsm-config/init-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf (from softhsm2.conf.in beside this script) with its token
# directory at DIR/tokens, initialises a token labelled LABEL (default: strongroom) in
# the first free slot, and prints `export SOFTHSM2_CONF=DIR/softhsm2.conf` on stdout, so
#
#   eval "$(softhsm-config/init-token.sh /tmp/hsm)"
#
# sets it for the calling shell (or put `env = { SOFTHSM2_CONF = "DIR/softhsm2.conf" }` in
# the pkcs11 backend's config table; see docs/pkcs11.md). The PINs come from the environment:
#   SOFTHSM_SO_PIN  security officer PIN (test default: 12345678)
#   SOFTHSM_PIN     user PIN             (test default: 1234)
# The defaults are for throwaway test tokens only. Find the token by its label, not its
# slot number: SoftHSM renumbers the slot when the token is initialised.
# Needs softhsm2-util (Debian: softhsm2).
set -euo pipefail

usage() { echo "usage: $0 DIR [LABEL]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then usage; fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
label=${2:-strongroom}
so_pin=${SOFTHSM_SO_PIN:-12345678}
pin=${SOFTHSM_PIN:-1234}

command -v softhsm2-util >/dev/null 2>&1 \
    || { echo "$0: softhsm2-util not found; install softhsm2 (apt-get install softhsm2)" >&2; exit 1; }

mkdir -p "$1"
dir=$(cd "$1" && pwd)
case $dir in
    *'|'* | *'&'* | *\\*) echo "$0: DIR must not contain |, & or \\" >&2; exit 2 ;;
esac
mkdir -p "$dir/tokens"
chmod 700 "$dir" "$dir/tokens"
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.in" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF=$dir/softhsm2.conf

# Two tokens with one label would make "find the token by label" ambiguous.
while IFS= read -r line; do
    case $line in
        *Label:*)
            existing=${line#*Label:}
            existing=$(printf '%s' "$existing" | sed 's/^ *//; s/ *$//')
            if [ "$existing" = "$label" ]; then
                echo "$0: $dir already has a token labelled '$label'; use a fresh DIR" >&2
                exit 1
            fi
            ;;
    esac
done < <(softhsm2-util --show-slots 2>/dev/null || true)

# softhsm2-util prints "The token has been initialized and is reassigned to slot N".
out=$(softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$pin" 2>&1) || {
    printf '%s\n' "$out" >&2
    echo "$0: softhsm2-util --init-token failed" >&2
    exit 1
}
slot=$(printf '%s\n' "$out" | sed -n 's/.*reassigned to slot \([0-9]*\).*/\1/p')
echo "$0: token '$label' initialised in $dir/tokens (slot ${slot:-?})" >&2
echo "$0: instead of exporting SOFTHSM2_CONF, a Strongroom config can carry it:" \
    "env = { SOFTHSM2_CONF = \"$SOFTHSM2_CONF\" } in its [backends.NAME] table" >&2
printf 'export SOFTHSM2_CONF=%q\n' "$SOFTHSM2_CONF"
