#!/usr/bin/env python3
"""Aggregates a comparison run into one markdown table and a JSON file.

    report.py WORKDIR OUT      (writes OUT.md and OUT.json, prints the markdown)

WORKDIR is benches/compare.sh's scratch directory:

    meta.txt                key<TAB>value lines: date, command, machine, versions, settings
    rows.txt                row<TAB>baseline row<TAB>description, in table order
    peak-rss.txt            row<TAB>VmHWM in kB (summed over the row's proxy processes)
    notes.txt               free-text notes (skipped peers, warnings), one per line
    raw/r<N>/<row>/summary.json   measure.py's summary of round N
    footprint-<name>.json   footprint.py's output per Pillion variant

Every figure is the median across rounds; a ratio to the baseline (`direct`, or `direct-h2c` for
h2c rows) is taken within each round first, then the median of those ratios is reported, so slow
and fast phases of the machine cancel out. Standard library only.
"""

import json
import os
import statistics
import sys

RATES = ("1000", "5000")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=2):
    if value is None:
        return "—"
    if isinstance(value, float) and value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def load_rounds(work):
    """{round number: {row: summary}}"""
    rounds = {}
    raw = os.path.join(work, "raw")
    for name in sorted(os.listdir(raw)) if os.path.isdir(raw) else []:
        number = int(name[1:])
        for row in os.listdir(os.path.join(raw, name)):
            path = os.path.join(raw, name, row, "summary.json")
            if os.path.exists(path):
                rounds.setdefault(number, {})[row] = json.load(open(path))
    return rounds


def errors_of(summary):
    count = 0
    t = summary.get("throughput", {})
    count += t.get("non_2xx", 0) + t.get("socket_errors", 0) + (t.get("failed", 0) if t.get("tool") == "h2load" else 0)
    for lat in summary.get("latency", {}).values():
        count += lat.get("failed", 0) + lat.get("socket_errors", 0)
    return count


def aggregate(rows, rounds, peaks):
    table = []
    for row, baseline, description in rows:
        per_round = {n: r[row] for n, r in rounds.items() if row in r}
        if not per_round:
            table.append({"row": row, "baseline": baseline, "description": description, "measured": False})
            continue
        entry = {"row": row, "baseline": baseline, "description": description, "measured": True,
                 "rounds": per_round}
        rps = {n: s.get("throughput", {}).get("rps") for n, s in per_round.items()}
        entry["rps"] = median(rps.values())
        ratios = []
        for n, value in rps.items():
            base = rounds[n].get(baseline, {}).get("throughput", {}).get("rps")
            if value and base:
                ratios.append(value / base)
        entry["ratio"] = median(ratios)
        entry["ratio_min"] = min(ratios) if ratios else None
        entry["ratio_max"] = max(ratios) if ratios else None
        entry["latency"] = {}
        for rate in RATES:
            lats = [s.get("latency", {}).get(rate) for s in per_round.values()]
            lats = [lat for lat in lats if lat]
            agg = {k: median(lat.get(k) for lat in lats) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "achieved_rps")}
            added = []
            for n, s in per_round.items():
                mine = s.get("latency", {}).get(rate, {}).get("p50_ms")
                base = rounds[n].get(baseline, {}).get("latency", {}).get(rate, {}).get("p50_ms")
                if mine is not None and base is not None:
                    added.append(mine - base)
            agg["added_p50_ms"] = median(added) if row != baseline else None
            entry["latency"][rate] = agg
        entry["cpu_us_per_request"] = median(s.get("cpu_us_per_request") for s in per_round.values())
        entry["peak_rss_kb"] = peaks.get(row)
        entry["errors"] = sum(errors_of(s) for s in per_round.values())
        table.append(entry)
    return table


def latency_cell(lat):
    if not lat or lat.get("p50_ms") is None:
        return "—"
    return " / ".join(fmt(lat[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))


def markdown(meta, table, footprints, notes):
    out = []
    out.append(f"## Load comparison, {meta.get('date', '?')}")
    out.append("")
    for key in ("command", "machine", "load", "settings", "pillion", "peers"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    out.append("")
    out.append("| row | req/s | × direct | 1k rps: p50 / p90 / p99 / max ms | +p50 @1k ms "
               "| 5k rps: p50 / p90 / p99 / max ms | CPU µs/req | peak RSS MiB | errors |")
    out.append("|---|---:|---:|---|---:|---|---:|---:|---:|")
    for e in table:
        if not e["measured"]:
            out.append(f"| {e['row']} | not run | | | | | | | |")
            continue
        if e["row"] == e["baseline"]:
            ratio = "1.00"
        elif e["ratio"] is None:
            ratio = "—"
        elif e["ratio_min"] == e["ratio_max"]:
            ratio = fmt(e["ratio"])
        else:
            ratio = f"{fmt(e['ratio'])} ({fmt(e['ratio_min'])}–{fmt(e['ratio_max'])})"
        rss = None if e["peak_rss_kb"] is None else e["peak_rss_kb"] / 1024
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            e["row"], fmt(e["rps"], 0), ratio, latency_cell(e["latency"].get("1000")),
            fmt(e["latency"].get("1000", {}).get("added_p50_ms"), 3), latency_cell(e["latency"].get("5000")),
            fmt(e["cpu_us_per_request"], 1), fmt(rss, 1), e["errors"]))
    out.append("")
    out.append("Rows:")
    for e in table:
        out.append(f"- `{e['row']}`: {e['description']}")
    out.append("")
    out.append("Medians of the rounds; `× direct` is the median of per-round ratios to the row's baseline "
               "(`direct`, `direct-h2c` for h2c rows, `random-3-one-slow` for `balanced-3-one-slow`), "
               "with the range across rounds in brackets; "
               "`+p50 @1k` is the median of per-round differences to the baseline's p50. Latencies are "
               "open-loop at a fixed rate with coordinated-omission correction (benches/compare/README.md). "
               "CPU is the proxy processes' utime+stime during the closed-loop run divided by its requests "
               "(both proxies for the two-hop row); peak RSS is VmHWM at the end of the run, summed over "
               "the row's proxy processes. `errors` counts non-2xx responses, socket errors and failed "
               "requests over all runs of the row.")
    if footprints:
        out.append("")
        out.append("| Pillion | idle RSS MiB | RSS, 1k conns open MiB | RSS, 1k keep-alive conns MiB | exec → /ready ms |")
        out.append("|---|---:|---:|---:|---:|")
        for name, f in footprints:
            if "error" in f:
                out.append(f"| {name} | failed: {f['error']} | | | |")
                continue
            mib = lambda k: fmt(None if f.get(k) is None else f[k] / 1024, 1)
            out.append(f"| {name} | {mib('idle_rss_kb')} | {mib('conns_open_rss_kb')} | "
                       f"{mib('keepalive_rss_kb')} | {fmt(f.get('ready_ms'), 1)} |")
        out.append("")
        out.append("Fresh processes: idle = 1 s after ready; 1k conns open = accepted, no bytes yet; "
                   "1k keep-alive = after one request each (each also holds an upstream connection); "
                   "exec → /ready = median of 5 starts.")
    if notes:
        out.append("")
        out.append("Notes:")
        for note in notes:
            out.append(f"- {note}")
    return "\n".join(out) + "\n"


def main(argv):
    if len(argv) != 3:
        print("usage: report.py WORKDIR OUT", file=sys.stderr)
        return 2
    work, out = argv[1], argv[2]
    meta = dict(line for line in read_tsv(os.path.join(work, "meta.txt")) if len(line) == 2)
    rows = [line for line in read_tsv(os.path.join(work, "rows.txt")) if len(line) == 3]
    peaks = {line[0]: int(line[1]) for line in read_tsv(os.path.join(work, "peak-rss.txt")) if len(line) == 2 and line[1]}
    notes = []
    if os.path.exists(os.path.join(work, "notes.txt")):
        notes = [line.strip() for line in open(os.path.join(work, "notes.txt")) if line.strip()]
    rounds = load_rounds(work)
    table = aggregate(rows, rounds, peaks)
    footprints = []
    for name in sorted(os.listdir(work), key=lambda n: (len(n), n)):
        if name.startswith("footprint-") and name.endswith(".json"):
            label = name[len("footprint-"):-len(".json")]
            try:
                footprints.append((label, json.load(open(os.path.join(work, name)))))
            except json.JSONDecodeError:
                footprints.append((label, {"error": "no result (see the proxy log)"}))
    for e in table:
        for rate in RATES:
            achieved = e.get("latency", {}).get(rate, {}).get("achieved_rps")
            if achieved is not None and achieved < 0.95 * int(rate):
                notes.append(f"{e['row']}: the {rate} rps run reached only {achieved:.0f} rps")
    text = markdown(meta, table, footprints, notes)
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": table, "pillion_footprint": dict(footprints), "notes": notes}, f, indent=1)
        f.write("\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
