#!/usr/bin/env python3
"""Prints a short table of Google Benchmark JSON results (--benchmark_out files).

Usage: python3 benchmarks/summarize.py RESULT.json [RESULT.json ...]

One row per benchmark run: the binary (file name), the benchmark name, its time per iteration
(manual time when the benchmark uses CUDA-event timing), and every user counter, e.g.
bw_fraction, bytes_per_second, tokens_per_second or compression_ratio. Failed or skipped runs
show their error message. Aggregates other than mean and median are left out.
"""

import json
import os
import sys

# Keys Google Benchmark writes for every run; anything else numeric is a user counter.
STANDARD_KEYS = {
    "name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
    "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit",
    "aggregate_name", "aggregate_unit", "error_occurred", "error_message", "label", "big_o",
    "rms", "complexity_n", "skipped", "skip_message",
}
SKIPPED_AGGREGATES = {"stddev", "cv"}


def si(value):
    """A number with an SI suffix and 3 significant digits (0.923, 41.2k, 3.01T)."""
    if value == 0 or not isinstance(value, (int, float)):
        return str(value)
    magnitude = abs(value)
    if magnitude < 1e3 and magnitude >= 1e-3:
        return f"{value:.3g}"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def rows_of(path):
    if os.path.getsize(path) == 0:  # a binary whose benchmarks the filter left out writes nothing
        return []
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    binary = os.path.splitext(os.path.basename(path))[0]
    rows = []
    if not isinstance(data, dict):  # not Google Benchmark output (e.g. kvc-e2e's JSON)
        return rows
    for run in data.get("benchmarks", []):
        if run.get("run_type") == "aggregate" and run.get("aggregate_name") in SKIPPED_AGGREGATES:
            continue
        name = run.get("name", "?")
        if run.get("error_occurred") or run.get("skipped"):
            message = run.get("error_message") or run.get("skip_message") or "error"
            rows.append((binary, name, "-", f"ERROR: {message}"))
            continue
        unit = run.get("time_unit", "ns")
        time = f"{run.get('real_time', 0.0):.4g} {unit}"
        counters = []
        for key, value in run.items():
            if key in STANDARD_KEYS or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            counters.append(f"{key}={si(value)}")
        if run.get("label"):
            counters.append(f"[{run['label']}]")
        rows.append((binary, name, time, " ".join(counters)))
    return rows


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    rows = []
    broken = 0
    for path in argv[1:]:
        try:
            rows.extend(rows_of(path))
        except (OSError, ValueError) as error:
            print(f"summarize: cannot read {path}: {error}", file=sys.stderr)
            broken += 1
    if not rows:
        print("no benchmark results")
        return 1 if broken else 0
    header = ("binary", "benchmark", "time", "counters")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(3)]
    def format_row(row):
        return f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"

    print(format_row(header))
    print("-" * len(format_row(header)))
    for row in rows:
        print(format_row(row))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
