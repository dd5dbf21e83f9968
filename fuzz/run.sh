#!/usr/bin/env bash
# Runs every fuzz target, one after another, for SECONDS each (default 60), at the lowest CPU
# priority, and prints executions and crashes per target. Extra arguments go to libFuzzer.
#
#   fuzz/run.sh 1200                        # twenty minutes per target
#   TARGETS="framing detect" fuzz/run.sh 300
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Stable toolchain: no sanitizer
# (`-s none`), libFuzzer's coverage only; `-a` keeps debug assertions and overflow checks on.
# libFuzzer runs in fork mode with -ignore_crashes=1, so a crash is recorded and fuzzing goes on
# for the whole time (one crash would otherwise end the run). Crashes: fuzz/artifacts/<target>/,
# reproduce one with `cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-...`.
# New inputs that reach new code go into fuzz/corpus/<target>/ (commit only small useful ones:
# `cargo fuzz cmin -s none -a TARGET`). Logs: fuzz/logs/<target>.log.
set -uo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets="${TARGETS:-detect framing route_policy control_policy inject iptables_config}"
flags=(-s none -a)

# Built once, then the binaries run directly (what `cargo fuzz run` does after building), so
# edits to the tree during a long run do not rebuild or break it halfway.
nice -n 19 cargo fuzz build "${flags[@]}" || exit 1
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p logs
printf '%-16s %14s %10s %8s %8s  %s\n' target executions exec/s seconds crashes distinct
status=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    start=$(date +%s)
    nice -n 19 "$bin/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" \
        -fork=1 -ignore_crashes=1 -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 "$@" \
        >"logs/$t.log" 2>&1
    elapsed=$(( $(date +%s) - start ))
    # Fork mode's progress lines: "#<executions>: cov: ... exec/s: N oom/timeout/crash: a/b/c ...".
    last=$(grep -E '^#[0-9]+: cov:' "logs/$t.log" | tail -1)
    runs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
    rate=$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$last")
    crashes=$(( $(ls "artifacts/$t" | wc -l) - before ))
    # Distinct failures: the panic locations and messages, once each.
    distinct=$(grep -h -A1 'panicked at' "logs/$t.log" | grep -v -e '^--$' -e 'panicked at' | sort -u | wc -l)
    printf '%-16s %14s %10s %8s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "$elapsed" "$crashes" "$distinct"
    if [ "$crashes" != 0 ]; then
        status=1
        grep -h -A1 'panicked at' "logs/$t.log" | grep -v -e '^--$' -e 'panicked at' | sort | uniq -c | sort -rn | head -5 | cut -c1-300 | sed 's/^/    /'
    fi
done
exit "$status"
