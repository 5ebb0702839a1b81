#!/usr/bin/env bash
# A short tour of Strongroom's embedded software vault, through the `strongroom` CLI:
# create a vault, make an Ed25519 and an ECDSA P-256 key, sign, verify (with Strongroom
# and with openssl), list the keys. Everything happens in a throwaway directory that is
# removed at the end; your own config and vault are not touched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
SR=$PWD/.venv/bin/strongroom

WORK=$(mktemp -d "${TMPDIR:-/tmp}/strongroom-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

step() { printf '\n==> %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "A config that keeps everything in $WORK; the passphrase comes from the environment"
cat >strongroom.toml <<EOF
[keystore]
data_dir = "$WORK/data"

[backends.vault]
type = "vault"
passphrase = "env:STRONGROOM_PASSPHRASE"
EOF
cat strongroom.toml
export STRONGROOM_CONFIG=$WORK/strongroom.toml
# A demo value only. Real deployments use env:, file: (mode 600) or prompt.
export STRONGROOM_PASSPHRASE="demo only: correct horse battery staple"

step "Create the vault (master key wrapped under Argon2id with the default parameters)"
show "$SR" init

step "Generate an Ed25519 key and an ECDSA P-256 key inside the vault"
show "$SR" key generate demo-ed25519 --type ed25519
show "$SR" key generate demo-p256 --type ecdsa-p256

step "Sign a message with each key (Ed25519: raw 64 bytes; ECDSA: DER)"
printf 'Strongroom demo message\n' >message.txt
show "$SR" key sign demo-ed25519 --in message.txt --out ed25519.sig
show "$SR" key sign demo-p256 --in message.txt --out p256.sig
printf 'signature sizes: ed25519 %s bytes, p256 %s bytes\n' \
    "$(wc -c <ed25519.sig)" "$(wc -c <p256.sig)"

step "Verify each signature with Strongroom"
show "$SR" key verify demo-ed25519 --signature ed25519.sig --in message.txt
show "$SR" key verify demo-p256 --signature p256.sig --in message.txt

step "Verify each signature with openssl, from the exported public keys"
show "$SR" key public demo-ed25519 --out ed25519.pub.pem
show "$SR" key public demo-p256 --out p256.pub.pem
show openssl pkeyutl -verify -pubin -inkey ed25519.pub.pem -rawin -in message.txt \
    -sigfile ed25519.sig
show openssl dgst -sha256 -verify p256.pub.pem -signature p256.sig message.txt

step "A changed message does not verify (exit code 1 means: signature invalid)"
printf 'Strongroom demo message, changed\n' >changed.txt
status=0
show "$SR" key verify demo-p256 --signature p256.sig --in changed.txt || status=$?
if [ "$status" -ne 1 ]; then
    echo "demo.sh: expected exit code 1 for a bad signature, got $status" >&2
    exit 1
fi
echo "exit code $status, as expected"

step "List the keys"
show "$SR" key list

step "Demo done; removing $WORK"
