#!/usr/bin/env python3
"""Turns the benchmark suite's JSON into PNG plots and Markdown tables.

Inputs (a folder written by scripts/bench-suite.sh):
  e2e_*.json           kvc-e2e records (a JSON list each; mode "budget" or "fixed")
  hf_llama_decode.json the PyTorch baseline (benchmarks/baselines/hf_llama_decode.py), optional
  kvc_bench_decode.json Google Benchmark JSON of the decode benchmark, optional
Outputs (into --out, default the input folder):
  throughput_vs_cr.png      tokens/s against compression, memory-budget mode, per model
  throughput_vs_batch.png   tokens/s against batch per policy, fixed-batch mode
  memory_per_sequence.png   KV bytes held per sequence per policy
  decode_bw_vs_bytes.png    decode attention's fraction of the read bandwidth against kept bytes
  tables.md                 the same figures as Markdown tables
Needs python3 and matplotlib (Debian: python3-matplotlib); without matplotlib only tables.md is
written.

Usage: python3 scripts/plot_results.py RESULTS_DIR [--out DIR]
"""

import argparse
import glob
import json
import os
import sys


def load_e2e(folder):
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "e2e_*.json"))):
        with open(path) as f:
            records.extend(json.load(f))
    return records


def load_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def policy_family(policy):
    return policy.rstrip("x0123456789") if policy != "full" else "full"


def budget_table(records):
    lines = ["| model | policy | batch | tokens/s | vs full | CR measured | KV GB / seq | "
             "step ms | bw fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["mode"] != "budget":
            continue
        ratio = r.get("ratio_to_full")
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
            f"{'%.2fx' % ratio if ratio else '-'} | {r['measured_ratio']:.2f} | "
            f"{r['kv_bytes_per_seq'] / 1e9:.3f} | {r['step_ms']:.2f} | {r['bw_fraction']:.3f} |")
    return lines


def fixed_table(records):
    lines = ["| model | policy | batch | context | step ms | tokens/s | vs full | bw fraction |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["mode"] != "fixed":
            continue
        ratio = r.get("ratio_to_full")
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['batch']} | {r['context']} | "
            f"{r['step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{'%.2fx' % ratio if ratio else '-'} | {r['bw_fraction']:.3f} |")
    return lines


def baseline_table(baseline):
    if not baseline or "results" not in baseline:
        return []
    lines = [f"PyTorch {baseline.get('torch')} / transformers {baseline.get('transformers')}, "
             f"batch {baseline['batch']}, cache {baseline['context']} tokens:", "",
             "| mode | step ms | tokens/s |", "|---|---|---|"]
    for r in baseline["results"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:80]} | |")
        else:
            lines.append(f"| {r['mode']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} |")
    return lines


def decode_points(bench):
    points = []
    if not bench:
        return points
    for b in bench.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        if "bw_fraction" in b and "bytes" in b:
            points.append((b["name"], float(b["bytes"]), float(b["bw_fraction"])))
    return points


def plot(records, bench, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results: matplotlib missing: tables only", file=sys.stderr)
        return []
    written = []

    budget = [r for r in records if r["mode"] == "budget"]
    if budget:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in sorted({r["model"] for r in budget}):
            rows = [r for r in budget if r["model"] == model]
            full = [r for r in rows if r["policy"] == "full"]
            for family in ("dmc", "h2o", "tova"):
                series = sorted((r["target_ratio"], r["tokens_per_s"]) for r in rows
                                if policy_family(r["policy"]) == family)
                if full:
                    series = [(1.0, full[0]["tokens_per_s"])] + series
                if len(series) > 1:
                    ax.plot(*zip(*series), marker="o", label=f"{model} {family}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (full = 1)")
        ax.set_ylabel("decode tokens/s (largest batch that fits)")
        ax.set_title("Memory-budget mode")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "throughput_vs_cr.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [f"{r['model']}\n{r['policy']}" for r in budget]
        ax.bar(range(len(budget)), [r["kv_bytes_per_seq"] / 1e9 for r in budget])
        ax.set_xticks(range(len(budget)))
        ax.set_xticklabels(labels, rotation=60, fontsize=6)
        ax.set_ylabel("KV cache GB per sequence (pages held)")
        ax.set_title("Memory per sequence")
        fig.tight_layout()
        path = os.path.join(out, "memory_per_sequence.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fixed = [r for r in records if r["mode"] == "fixed"]
    if fixed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({(r["model"], r["policy"]) for r in fixed}):
            series = sorted((r["batch"], r["tokens_per_s"]) for r in fixed
                            if (r["model"], r["policy"]) == key)
            ax.plot(*zip(*series), marker="o", label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Fixed-batch mode")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "throughput_vs_batch.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    points = decode_points(bench)
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([p[1] / 1e9 for p in points], [p[2] for p in points])
        ax.set_xscale("log")
        ax.set_xlabel("bytes per call (GB; K+V kept + q + out)")
        ax.set_ylabel("fraction of measured read bandwidth")
        ax.set_title("Decode attention")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, "decode_bw_vs_bytes.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main():
    parser = argparse.ArgumentParser(description="plots and tables of the benchmark suite")
    parser.add_argument("folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    out = args.out or args.folder
    os.makedirs(out, exist_ok=True)
    records = load_e2e(args.folder)
    bench = load_json(os.path.join(args.folder, "kvc_bench_decode.json"))
    baseline = load_json(os.path.join(args.folder, "hf_llama_decode.json"))
    tables = ["## Memory-budget mode", ""] + budget_table(records) + ["", "## Fixed-batch mode",
                                                                       ""] + fixed_table(records)
    tables += ["", "## PyTorch baseline", ""] + baseline_table(baseline)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write("\n".join(tables) + "\n")
    written = plot(records, bench, out)
    print("\n".join(tables))
    for path in written:
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
