#!/usr/bin/env python3
"""Prints the prefill figures of issue 6 from one run's result files: kvc's causal attention
against PyTorch SDPA's backends on the same shapes, and the whole prefill (store side included)
against the best SDPA backend, with the issue's targets (Full >= 0.60, DMC >= 0.50).

Usage: python3 benchmarks/compare_prefill.py DIR
  DIR holds kvc_bench_prefill.json, kvc_bench_prefill_store.json (Google Benchmark output) and
  sdpa_prefill.json.txt (benchmarks/baselines/sdpa_prefill.py), as scripts/gpu-check.sh writes
  them, or the session.tgz that scripts/device-session.sh packs them into. Missing files are
  skipped. Ratios are SDPA time / kvc time (higher is better for kvc).
"""

import json
import os
import re
import sys
import tarfile
import tempfile

TARGETS = {"full": 0.60, "dmc": 0.50}


def medians(path):
    """{shape: (median µs, run)} of the benchmark family 'prefill*/<shape>/...'."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    out = {}
    for run in data.get("benchmarks", []):
        if run.get("aggregate_name") != "median" or run.get("error_occurred"):
            continue
        parts = run["name"].split("/")
        if len(parts) < 2:
            continue
        scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3}.get(run.get("time_unit", "us"), 1.0)
        out[parts[1]] = (run["real_time"] * scale, run)
    return out


def baselines(path):
    """{shape: {backend: µs}} from the SDPA script's JSON."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    rows = data.get("results", []) if isinstance(data, dict) else data
    out = {}
    for row in rows:
        if isinstance(row, dict) and "shape" in row and "us" in row:
            out.setdefault(row["shape"], {})[row.get("backend", "?")] = row["us"]
    return out


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: compare_prefill.py DIR", file=sys.stderr)
        return 2
    directory = argv[1]
    archive = os.path.join(directory, "session.tgz")
    if not os.path.exists(os.path.join(directory, "kvc_bench_prefill.json")) and os.path.exists(
        archive
    ):
        with tempfile.TemporaryDirectory() as unpacked:
            with tarfile.open(archive) as tar:
                names = [m for m in tar.getmembers() if m.isfile() and "/" not in m.name.strip("./")]
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(unpacked, members=names, **safe)
            return report(unpacked)
    return report(directory)


def report(directory):
    attention = medians(os.path.join(directory, "kvc_bench_prefill.json"))
    store = medians(os.path.join(directory, "kvc_bench_prefill_store.json"))
    sdpa = baselines(os.path.join(directory, "sdpa_prefill.json.txt"))
    if not attention and not store:
        print("compare_prefill: no prefill results in", directory)
        return 0

    backends = sorted({backend for shape in sdpa.values() for backend in shape})
    print("prefill attention (µs; in parentheses SDPA backend µs / kvc µs)")
    print(f"  {'shape':26s} {'kvc':>9s}  " + "  ".join(f"{b:>16s}" for b in backends))
    for shape, (kvc_us, _) in sorted(attention.items()):
        cells = []
        for backend in backends:
            us = sdpa.get(shape, {}).get(backend)
            cells.append(f"{us:8.1f} ({us / kvc_us:4.2f})" if us else f"{'-':>16s}")
        print(f"  {shape:26s} {kvc_us:9.1f}  " + "  ".join(cells))

    if store:
        print("whole prefill (store side + attention) against the best SDPA backend")
        for shape, (kvc_us, run) in sorted(store.items()):
            match = re.fullmatch(r"(full|dmc)_(\d+)x(\d+)", shape)
            if not match:
                continue
            policy, batch, tokens = match.group(1), match.group(2), match.group(3)
            dense = sdpa.get(f"causal_32x32_B{batch}_N{tokens}", {})
            best = min(dense.values()) if dense else None
            store_us = run.get("store_us")
            ratio = best / kvc_us if best else None
            target = TARGETS[policy]
            verdict = "-" if ratio is None else ("met" if ratio >= target else "short")
            print(f"  {shape:14s} {kvc_us:9.1f} µs (store {store_us or 0:7.1f})  "
                  f"best SDPA {best or 0:7.1f} µs  ratio {ratio or 0:4.2f}  "
                  f"target {target:.2f}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
