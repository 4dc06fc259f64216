#!/usr/bin/env python3
"""Prints the tables of BENCHMARKS.md from the JSON that scripts/bench.py wrote."""

import json
import sys


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def main():
    r = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "bench-results.json"))
    m = r["machine"]
    print(f"Machine: {m['cpus']} × {m['model']}, {m['mem_gib']} GiB, open files limit {m['open_files_limit']}.")
    if r.get("merged_from"):
        print(f"Command: `{r['merged_from']}`, then `{r['command']}` (the ramps named there re-run and merged).\n")
    else:
        print(f"Command: `{r['command']}`\n")
    raw = r.get("raw_sink_lines_per_sec")
    if raw:
        cores = r.get("raw_sink_cores")
        extra = f", the sink using {fmt(cores, 2)} cores" if cores else ""
        print(f"Raw sink rate (VictoriaMetrics, 5,000-line batches, 4 in flight): **{fmt(raw)} lines/s**{extra}\n")
    for name, ramp in r.get("ramps", {}).items():
        mode, per = name.split("-")
        print(f"### {mode}, {per} reading(s) per message\n")
        print("| offered msg/s | published msg/s | delivered readings/s | drain s | gateway CPU µs/msg | CPU s per M readings | peak RSS MiB | PUBACK p50 / p99 ms | log syncs/s | log MiB/s | lag p99 ms (gateway) | lost |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in ramp["steps"]:
            print(
                f"| {fmt(s['offered_messages_per_sec'])} | {fmt(s['published_messages_per_sec'])} | "
                f"{fmt(s['delivered_readings_per_sec'])} | {fmt(s['drain_secs'], 1)} | {fmt(s['cpu_us_per_message'], 2)} | "
                f"{fmt(s['cpu_secs_per_million_readings'], 2)} | {fmt(s['peak_rss_mib'])} | "
                f"{fmt(s.get('puback_p50_ms'), 1)} / {fmt(s.get('puback_p99_ms'), 1)} | {fmt(s.get('log_syncs_per_sec'))} | "
                f"{fmt(s.get('log_mib_per_sec'), 1)} | {fmt(s['gateway_lag_p99_ms'])} | {s.get('lost', '–')} |"
            )
        lat = ramp["latency"]
        print(
            f"\nLatency at {fmt(lat['offered_messages_per_sec'])} msg/s (half the best): publish → visible in the sink "
            f"p50 {fmt(lat.get('latency_p50_ms'))} ms, p99 {fmt(lat.get('latency_p99_ms'))} ms; gateway receive → sink "
            f"acknowledgement p50 ≤ {fmt(lat['gateway_lag_p50_ms'])} ms, p99 ≤ {fmt(lat['gateway_lag_p99_ms'])} ms; "
            f"publish → PUBACK p50 {fmt(lat.get('puback_p50_ms'), 1)} ms, p99 {fmt(lat.get('puback_p99_ms'), 1)} ms.\n"
        )
    if "ratios" in r:
        print("### Ratios (same run)\n")
        for k, v in r["ratios"].items():
            print(f"- {k}: {fmt(v, 2)}")
        print()
    if r.get("scale"):
        print("### Scale: devices connected at 1 message a minute\n")
        print("| devices | connected | RSS before MiB | RSS connected MiB | KiB per connection |")
        print("|---:|---:|---:|---:|---:|")
        for s in r["scale"]:
            print(
                f"| {fmt(s['devices'])} | {fmt(s['connected'])} | "
                f"{fmt(s['rss_before_mib'])} | {fmt(s['rss_connected_mib'])} | {fmt(s['kib_per_connection'], 1)} |"
            )


if __name__ == "__main__":
    main()
