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
# New inputs that reach new code go into fuzz/corpus-grown/<target>/, which git ignores; the
# committed seeds in fuzz/corpus/<target>/ are only read (add a small, useful input there by hand).
# Logs: fuzz/logs/<target>.log.
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
    # New inputs go to corpus-grown/ (ignored by git); the committed seeds in corpus/ are only read.
    mkdir -p "corpus-grown/$t" "corpus/$t" "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    start=$(date +%s)
    nice -n 19 "$bin/$t" -artifact_prefix="artifacts/$t/" "corpus-grown/$t" "corpus/$t" \
        -fork=1 -ignore_crashes=1 -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 "$@" \
        >"logs/$t.log" 2>&1
    elapsed=$(( $(date +%s) - start ))
    # Fork mode's progress lines: "#<executions>: cov: ... oom/timeout/crash: a/b/c time: Ns ...";
    # their exec/s is the last job's, so the average is worked out here.
    last=$(grep -E '^#[0-9]+: cov:' "logs/$t.log" | tail -1)
    runs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
    fuzzed=$(sed -nE 's/.* time: ([0-9]+)s.*/\1/p' <<<"$last")
    rate=$(( ${runs:-0} / (${fuzzed:-0} > 0 ? ${fuzzed:-1} : 1) ))
    crashes=$(( $(ls "artifacts/$t" | wc -l) - before ))
    # Distinct failures: the newest 50 crash inputs replayed, each panic message counted once.
    reasons=$(ls -t "artifacts/$t" | head -n "$(( crashes < 50 ? crashes : 50 ))" | while read -r a; do
        timeout 120 "$bin/$t" "artifacts/$t/$a" 2>&1 | grep -A1 'panicked at' | tail -1 | cut -c1-160
    done | sort | uniq -c | sort -rn)
    distinct=$(grep -c . <<<"$reasons")
    printf '%-16s %14s %10s %8s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "$elapsed" "$crashes" "$distinct"
    if [ "$crashes" != 0 ]; then
        status=1
        sed 's/^/    /' <<<"$reasons"
    fi
done
exit "$status"
