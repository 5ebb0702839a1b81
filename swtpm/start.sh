#!/usr/bin/env bash
# Start a software TPM 2.0 (swtpm) on loopback, for tests and experiments.
#
#   swtpm/start.sh STATEDIR
#
# Picks a free pair of loopback ports P (TPM commands) and P+1 (swtpm's control
# channel), starts `swtpm socket` in the background with its TPM state in STATEDIR
# (already powered on and started: --flags not-need-init,startup-clear), waits until
# it accepts connections, and writes into STATEDIR:
#   swtpm.pid   the process id      swtpm.port  P
#   tcti        the TCTI string     swtpm.log   swtpm's own log
# On stdout it prints `export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=P` and a comment
# with the TCTI string, so `eval "$(swtpm/start.sh DIR)"` sets up tpm2-tools. Stop it
# with swtpm/stop.sh STATEDIR, which sends TPM2_Shutdown first: a TPM stopped without
# it counts a dictionary-attack failure at its next start (see shared EMULATORS notes).
# Use a fresh STATEDIR per test session. Needs swtpm (Debian: swtpm) and python3.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then echo "usage: $0 STATEDIR" >&2; exit 2; fi
command -v swtpm >/dev/null 2>&1 \
    || { echo "$0: swtpm not found; install swtpm (apt-get install swtpm swtpm-tools)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "$0: python3 is needed to pick free ports" >&2; exit 1; }

mkdir -p "$1"
state=$(cd "$1" && pwd)
chmod 700 "$state"

if [ -f "$state/swtpm.pid" ]; then
    old=$(cat "$state/swtpm.pid")
    if kill -0 "$old" 2>/dev/null && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q swtpm; then
        echo "$0: swtpm is already running for $state (pid $old); stop it with swtpm/stop.sh" >&2
        exit 1
    fi
    rm -f "$state/swtpm.pid" "$state/swtpm.port" "$state/tcti"
fi

# A port P whose neighbour P+1 is free too. Another process may still take them before
# swtpm binds; the loop below then tries another pair.
free_pair() {
    python3 - <<'PY'
import socket
for _ in range(200):
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
    print(port)
    break
else:
    raise SystemExit("no free pair of loopback ports found")
PY
}

listening() {  # listening PORT: true once something accepts on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

for attempt in 1 2 3 4 5; do
    port=$(free_pair)
    swtpm socket --tpm2 \
        --tpmstate "dir=$state" \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear \
        --log "file=$state/swtpm.log" \
        </dev/null >>"$state/swtpm.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 250); do  # up to about 5 s; swtpm is usually ready in ~15 ms
        kill -0 "$pid" 2>/dev/null || break
        if listening "$port"; then
            tcti="swtpm:host=127.0.0.1,port=$port"
            echo "$pid" >"$state/swtpm.pid"
            echo "$port" >"$state/swtpm.port"
            echo "$tcti" >"$state/tcti"
            echo "$0: swtpm running, pid $pid, TPM port $port, control port $((port + 1))" >&2
            printf 'export TPM2TOOLS_TCTI=%s\n# TCTI: %s\n' "$tcti" "$tcti"
            exit 0
        fi
        sleep 0.02
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$0: swtpm did not come up on port $port (attempt $attempt); retrying" >&2
done
echo "$0: could not start swtpm; see $state/swtpm.log" >&2
tail -n 20 "$state/swtpm.log" >&2 || true
exit 1
