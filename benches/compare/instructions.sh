#!/usr/bin/env bash
# User-space instructions per request through one Pillion hop, counted by callgrind.
#
#   benches/compare/instructions.sh                  h1, h2c, l4 and floor rows, 20,000 requests each
#   benches/compare/instructions.sh --rows h1 --keep keep the callgrind output for callgrind_annotate
#
# Wall-clock figures on a shared 2-vCPU machine drift by ±20 % between runs; instruction counts
# drift by well under 1 %, so they are what tells whether a change to the request path made it
# cheaper. Kernel work (the socket syscalls, about half the proxy's CPU time on loopback) is not
# counted: compare.sh measures that side. The proxy runs under valgrind with one worker thread;
# the upstream is the same one-worker nginx as compare.sh's; the load generator is h2load.
# `floor` is not Pillion: it is the least an HTTP/1.1 proxy on hyper can do per request
# (benches/src/bin/hyper-floor.rs), the baseline for what Pillion's own layers cost.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROWS="h1,h2c,l4,floor"
REQUESTS=20000
KEEP=0
BASE_PORT=19300

while [[ $# -gt 0 ]]; do
    case $1 in
        --rows) ROWS=$2; shift ;;
        --requests) REQUESTS=$2; shift ;;
        --keep) KEEP=1 ;;
        --base-port) BASE_PORT=$2; shift ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            echo "options: --rows h1,h2c,l4,floor  --requests N (default 20000)  --keep  --base-port N (default 19300)"
            exit 0 ;;
        *) echo "instructions.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || { echo "instructions.sh: --requests must be a positive integer" >&2; exit 2; }

have() { command -v "$1" > /dev/null 2>&1; }
missing=()
have valgrind || missing+=(valgrind)
have nginx || missing+=(nginx-light)
have h2load || missing+=(nghttp2-client)
have curl || missing+=(curl)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
fi

cargo build --release --locked -p pillion-proxy -p pillion-benches --bin pillion-proxy --bin hyper-floor \
    --manifest-path "$ROOT/Cargo.toml" >&2
PROXY_BIN="$ROOT/target/release/pillion-proxy"
FLOOR_BIN="$ROOT/target/release/hyper-floor"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pillion-instructions.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
    wait 2> /dev/null || true
    [[ $KEEP == 1 ]] && echo "kept: $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

P_UP_H1=$BASE_PORT P_UP_H2C=$((BASE_PORT + 1)) P_PROXY=$((BASE_PORT + 10))
sed -e "s#@WORK@#$WORK#g; s#@HTTP1_PORT@#$P_UP_H1#; s#@H2C_PORT@#$P_UP_H2C#" \
    "$ROOT/benches/compare/conf/upstream-nginx.conf" > "$WORK/upstream.conf"
nginx -c "$WORK/upstream.conf" -p "$WORK" -e "$WORK/upstream.err" &
PIDS+=($!)
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$P_UP_H1/" && break; sleep 0.1; done

# ROW: counts the proxy's instructions over REQUESTS requests, after a warm-up.
measure() {
    local row=$1 target load
    case $row in
        h1 | floor) target=$P_UP_H1 load=(--h1 -c16) ;;
        l4) target=$P_UP_H1 load=(--h1 -c16) ;;
        h2c) target=$P_UP_H2C load=(-c4 -m16) ;;
        *) echo "instructions.sh: unknown row '$row' (h1, h2c, l4, floor)" >&2; return 2 ;;
    esac
    local opaque=()
    [[ $row == l4 ]] && opaque=(PILLION_OPAQUE_PORTS="$target")
    local out="$WORK/callgrind.$row" cmd=("$PROXY_BIN") ready="http://127.0.0.1:$((P_PROXY + 2))/ready"
    if [[ $row == floor ]]; then
        cmd=("$FLOOR_BIN" "127.0.0.1:$P_PROXY" "127.0.0.1:$target")
        ready="http://127.0.0.1:$P_PROXY/"
    fi
    env PILLION_OUTBOUND_ADDR="127.0.0.1:$P_PROXY" PILLION_INBOUND_ADDR="127.0.0.1:$((P_PROXY + 1))" \
        PILLION_ADMIN_ADDR="127.0.0.1:$((P_PROXY + 2))" PILLION_OUTBOUND_TARGET="127.0.0.1:$target" \
        PILLION_WORKER_THREADS=1 "${opaque[@]}" \
        valgrind --tool=callgrind --callgrind-out-file="$out" "${cmd[@]}" > "$WORK/$row.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 150); do curl -sf -o /dev/null "$ready" && break; sleep 0.2; done
    h2load "${load[@]}" -n 2000 "http://127.0.0.1:$P_PROXY/" > /dev/null
    callgrind_control -z "$pid" > /dev/null 2>&1
    local done_line
    done_line=$(h2load "${load[@]}" -n "$REQUESTS" "http://127.0.0.1:$P_PROXY/" | grep -E '^requests:')
    callgrind_control -d "$pid" > /dev/null 2>&1
    kill "$pid"
    wait "$pid" 2> /dev/null || true
    # `.1` is the dump requested above; the file without a suffix holds only the shutdown.
    local dump="$out.1"
    local total
    total=$(callgrind_annotate "$dump" 2> /dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    local succeeded
    succeeded=$(awk '{print $8}' <<< "$done_line")
    [[ $succeeded == "$REQUESTS" ]] || echo "warning: $row: $done_line" >&2
    printf '| %s | %s | %s |\n' "$row" "$REQUESTS" "$((total / REQUESTS))"
}

echo "| row | requests | instructions per request |"
echo "|---|---:|---:|"
IFS=, read -r -a rows <<< "$ROWS"
for row in "${rows[@]}"; do measure "$row"; done
