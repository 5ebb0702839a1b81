#!/usr/bin/env bash
# Start a software TPM 2.0 (swtpm) on loopback, for tests and experiments.
#
#   swtpm/start.sh [--state] STATEDIR [--port P]
#
# Starts `swtpm socket` in the background with its TPM state in STATEDIR (already powered
# on and started: --flags not-need-init,startup-clear), on loopback port P for TPM
# commands and P+1 for swtpm's control channel, waits until it accepts connections, and
# writes into STATEDIR:
#   swtpm.pid   the process id (removed by stop.sh)
#   swtpm.port  P; kept after stop.sh, so the next start on STATEDIR reuses it
#   tcti        the TCTI string (removed by stop.sh)
#   swtpm.log   swtpm's own log
# The port: --port P if given (and an error if P or P+1 is taken); else the port recorded
# in STATEDIR/swtpm.port when P and P+1 are both free; else any free pair. A config with
# `swtpm_state = "STATEDIR"` reads swtpm.port whenever it connects, so it follows a
# restart even when the port had to change; a config with a fixed
# `tcti = "swtpm:host=127.0.0.1,port=P"` needs `--port P`.
# On stdout it prints `export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=P` and a comment
# with the TCTI string, so `eval "$(swtpm/start.sh --state DIR)"` sets up tpm2-tools. Stop
# it with swtpm/stop.sh STATEDIR, which sends TPM2_Shutdown first: a TPM stopped without
# it counts a dictionary-attack failure at its next start (see shared EMULATORS notes).
# Keep the state dir to keep the TPM's keys; use a fresh one per test session.
# Needs swtpm (Debian: swtpm) and python3.
set -euo pipefail

usage() { echo "usage: $0 [--state] STATEDIR [--port P]" >&2; exit 2; }
dir="" fixed=""
while [ $# -gt 0 ]; do
    case $1 in
        --state) [ $# -ge 2 ] && [ -z "$dir" ] || usage; dir=$2; shift 2 ;;
        --state=*) [ -z "$dir" ] || usage; dir=${1#--state=}; shift ;;
        --port) [ $# -ge 2 ] || usage; fixed=$2; shift 2 ;;
        --port=*) fixed=${1#--port=}; shift ;;
        -h | --help) usage ;;
        -*) echo "$0: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir=$1; shift ;;
    esac
done
[ -n "$dir" ] || usage
if [ -n "$fixed" ]; then
    case $fixed in
        *[!0-9]* | 0*) echo "$0: --port must be a number from 1 to 65534, not '$fixed'" >&2; exit 2 ;;
    esac
    if [ "${#fixed}" -gt 5 ] || [ "$fixed" -gt 65534 ]; then
        echo "$0: --port must be from 1 to 65534 (P+1 is the control port)" >&2
        exit 2
    fi
fi
command -v swtpm >/dev/null 2>&1 \
    || { echo "$0: swtpm not found; install swtpm (apt-get install swtpm swtpm-tools)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "$0: python3 is needed to check ports" >&2; exit 1; }

mkdir -p "$dir"
state=$(cd "$dir" && pwd)
chmod 700 "$state"

if [ -f "$state/swtpm.pid" ]; then
    old=$(cat "$state/swtpm.pid")
    if kill -0 "$old" 2>/dev/null && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q swtpm; then
        echo "$0: swtpm is already running for $state (pid $old); stop it with swtpm/stop.sh" >&2
        exit 1
    fi
    rm -f "$state/swtpm.pid" "$state/tcti"
fi

# pair_free P: true when P and P+1 can both be bound on loopback now. With SO_REUSEADDR,
# as swtpm binds, so connections of its last run still in TIME_WAIT do not count as taken.
pair_free() {
    python3 - "$1" <<'PY'
import socket, sys
port = int(sys.argv[1])
for p in (port, port + 1):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            sys.exit(1)
PY
}

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

last=""
if [ -z "$fixed" ] && [ -f "$state/swtpm.port" ]; then
    last=$(cat "$state/swtpm.port")
    case $last in
        '' | *[!0-9]* | 0*) last="" ;;
        *) { [ "${#last}" -le 5 ] && [ "$last" -le 65534 ]; } || last="" ;;
    esac
fi
if [ -n "$fixed" ] && ! pair_free "$fixed"; then
    echo "$0: port $fixed or $((fixed + 1)) (the control port) is already in use on" \
        "127.0.0.1; stop what holds it, or choose another --port" >&2
    exit 1
fi

listening() {  # listening PORT: true once something accepts on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

for attempt in 1 2 3 4 5; do
    if [ -n "$fixed" ]; then
        port=$fixed
    elif [ "$attempt" = 1 ] && [ -n "$last" ] && pair_free "$last"; then
        port=$last
    else
        port=$(free_pair)
    fi
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
            # Written whole, then renamed: a backend reading swtpm.port never sees half of it.
            echo "$port" >"$state/swtpm.port.new"
            mv -f "$state/swtpm.port.new" "$state/swtpm.port"
            echo "$tcti" >"$state/tcti"
            echo "$0: swtpm running, pid $pid, TPM port $port, control port $((port + 1))" >&2
            printf 'export TPM2TOOLS_TCTI=%s\n# TCTI: %s\n' "$tcti" "$tcti"
            exit 0
        fi
        sleep 0.02
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ -n "$fixed" ]; then  # the user asked for this port: no other will do
        echo "$0: swtpm did not come up on port $fixed; see $state/swtpm.log" >&2
        tail -n 20 "$state/swtpm.log" >&2 || true
        exit 1
    fi
    echo "$0: swtpm did not come up on port $port (attempt $attempt); retrying" >&2
done
echo "$0: could not start swtpm; see $state/swtpm.log" >&2
tail -n 20 "$state/swtpm.log" >&2 || true
exit 1
