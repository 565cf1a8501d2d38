#!/usr/bin/env python3
"""Summarises an Nsight Compute source-page export (`ncu -i R --page source --csv --print-source
sass`, as scripts/gpu-profile.sh --source writes it): warp-stall samples by stall reason, by
opcode, and the instructions with the most samples.

Usage: scripts/source-summary.py SOURCE.csv [TITLE]
"""
import collections
import csv
import sys


def num(value):
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return 0.0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    lines = open(path).read().splitlines()
    # ncu puts a "Kernel Name" line before the header.
    kernel = lines[0] if lines and lines[0].startswith('"Kernel Name"') else ""
    rows = list(csv.DictReader(lines[1:] if kernel else lines))
    if not rows:
        sys.exit(f"no rows in {path}")
    samples_key = "Warp Stall Sampling (All Samples)"
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(num(r[samples_key]) for r in rows)
    if len(sys.argv) > 2:
        print(f"# {sys.argv[2]}")
    if kernel:
        print(f"# {kernel[:200]}")
    print(f"# {total:.0f} warp-stall samples over {len(rows)} SASS instructions")
    print("## by stall reason")
    by_reason = collections.Counter()
    for r in rows:
        for k in reasons:
            by_reason[k] += num(r[k])
    for k, n in by_reason.most_common(10):
        print(f"{k:28} {n:8.0f} {100 * n / max(total, 1):5.1f} %")
    print("## by opcode")
    by_op = collections.Counter()
    for r in rows:
        words = [w for w in r["Source"].split() if not w.startswith("@")]
        by_op[(words[0] if words else "?").split(".")[0]] += num(r[samples_key])
    for k, n in by_op.most_common(15):
        print(f"{k:12} {n:8.0f} {100 * n / max(total, 1):5.1f} %")
    print("## the 15 instructions with most samples (address, samples, SASS, executions)")
    for r in sorted(rows, key=lambda r: -num(r[samples_key]))[:15]:
        print(r["Address"][-5:], int(num(r[samples_key])), r["Source"].strip()[:64],
              r["Instructions Executed"])


if __name__ == "__main__":
    main()
