"""What the SDPA baselines (sdpa_decode.py, sdpa_prefill.py) share: CUDA-event timing with the
median over repetitions, and the command line that runs every (shape, backend) pair and prints
(and optionally writes) the JSON report."""

import argparse
import json
import statistics
import sys

import torch


def median_seconds(call, calls, repeats):
    """Median seconds per call of `call(i)`: one warm-up round of `calls` calls, then `repeats`
    rounds of `calls` back-to-back calls, each timed with CUDA events."""
    torch.cuda.synchronize()
    for i in range(calls):  # warm-up
        call(i)
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for i in range(calls):
            call(i)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e-3 / calls)
    return statistics.median(samples)


def run(doc, shapes, backends, measure, calls, repeats, head_dim):
    """The baseline's main: `measure(hq, hkv, batch, length, backend, calls, repeats)` for every
    shape (name, hq, hkv, batch, length) and backend (name, SDPBackend); a RuntimeError (the
    backend refused the shape) is reported as the entry's error. bf16 throughout. Returns the exit
    status."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--calls", type=int, default=calls)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 0
    results = []
    for name, hq, hkv, batch, length in shapes:
        for backend_name, backend in backends:
            entry = {"shape": name, "backend": backend_name}
            try:
                entry.update(measure(hq, hkv, batch, length, backend, args.calls, args.repeats))
            except RuntimeError as error:  # backend refused the shape
                entry["error"] = str(error).splitlines()[0][:200]
            torch.cuda.empty_cache()
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "head_dim": head_dim,
        "dtype": "bf16",
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0
