#!/usr/bin/env bash
# Stop a software TPM started by swtpm/start.sh STATEDIR.
#
#   swtpm/stop.sh STATEDIR
#
# Sends TPM2_Shutdown(CLEAR) first, so the TPM's next start does not count a
# dictionary-attack failure: with `tpm2_shutdown -c` (tpm2-tools) when it is installed,
# else as the raw 12-byte command over the TPM port. Then sends SIGTERM, waits up to
# 5 s, and uses SIGKILL only if swtpm is still there. Stopping one that is not running
# is not an error. STATEDIR/swtpm.port stays: the next start.sh on STATEDIR reuses the
# port when it is free, and a `swtpm_state` config reads it to find the TPM.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then echo "usage: $0 STATEDIR" >&2; exit 2; fi
[ -d "$1" ] || { echo "$0: no such directory: $1" >&2; exit 1; }
state=$(cd "$1" && pwd)

if [ ! -f "$state/swtpm.pid" ]; then
    echo "$0: no swtpm.pid in $state; nothing to stop" >&2
    exit 0
fi
pid=$(cat "$state/swtpm.pid")
port=$(cat "$state/swtpm.port" 2>/dev/null || true)

# start.sh has exited, so swtpm's parent is now PID 1, which may take a second or more
# to reap it: a zombie counts as stopped (kill -0 would still succeed on it).
alive() {
    local stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ]
}

# Only signal the swtpm we started: the pid may have been reused since.
ours() {
    alive && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "swtpm socket.*dir=$state"
}

if ours; then
    shut=no
    if [ -n "$port" ]; then
        if command -v tpm2_shutdown >/dev/null 2>&1; then
            TSS2_LOG=all+none TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port" \
                timeout 10 tpm2_shutdown -c >/dev/null 2>&1 && shut=tpm2_shutdown
        else
            # TPM2_Shutdown: tag 8001 (no sessions), size 12, command code 0145, TPM_SU_CLEAR.
            # The 10-byte answer should be 8001 0000000a 00000000 (TPM_RC_SUCCESS).
            reply=$(
                exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
                printf '\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x45\x00\x00' >&3
                timeout 5 head -c 10 <&3 | od -An -tx1 | tr -d ' \n'
            ) 2>/dev/null || true
            [ "$reply" = 80010000000a00000000 ] && shut="raw TPM2_Shutdown"
        fi
    fi
    if [ "$shut" = no ]; then
        echo "$0: warning: TPM2_Shutdown failed; the next start of this state counts a" \
            "dictionary-attack failure" >&2
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 250); do
        alive || break
        sleep 0.02
    done
    if alive; then
        echo "$0: swtpm (pid $pid) ignored SIGTERM for 5 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "$0: stopped swtpm pid $pid (shutdown: $shut)" >&2
else
    echo "$0: swtpm pid $pid from $state is not running" >&2
fi
rm -f "$state/swtpm.pid" "$state/tcti"
