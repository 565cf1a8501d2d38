#!/usr/bin/env python3
"""PyTorch SDPA decode baseline on the dense shapes of benchmarks/bench_decode.cu.

One query token per sequence over a dense bf16 KV cache, head dim 128:
  full_32x32_B64_L4096, full_32x8_B64_L4096, full_32x4_B64_L4096
(q [B, Hq, 1, D], k/v [B, Hkv, L, D]; GQA through enable_gqa=True) with the cuDNN and flash
backends of torch.nn.functional.scaled_dot_product_attention. Each measurement times
CALLS back-to-back calls with CUDA events (rotating over enough copies of K/V that a round reads
at least 8x the L2 size) and reports the median over REPEATS repetitions. Bytes counted as in
bench_decode: K + V + q + out. A backend that refuses a shape is reported with its error.

Usage: python3 benchmarks/baselines/sdpa_decode.py [--calls 20] [--repeats 15] [--out FILE]
Prints JSON: {"device": ..., "torch": ..., "results": [{"shape", "backend", "us", "GBps",
"bytes"} or {"shape", "backend", "error"}]}.
"""

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEAD_DIM = 128
SHAPES = [
    # (name, q heads, kv heads, batch, length)
    ("full_32x32_B64_L4096", 32, 32, 64, 4096),
    ("full_32x8_B64_L4096", 32, 8, 64, 4096),
    ("full_32x4_B64_L4096", 32, 4, 64, 4096),
]
BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


def measure(name, hq, hkv, batch, length, backend, calls, repeats):
    device = torch.device("cuda")
    dtype = torch.bfloat16
    kv_bytes = 2 * batch * hkv * length * HEAD_DIM * 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(1, min(16, (8 * l2) // kv_bytes + 1))
    q = torch.randn(batch, hq, 1, HEAD_DIM, device=device, dtype=dtype)
    caches = [
        (torch.randn(batch, hkv, length, HEAD_DIM, device=device, dtype=dtype),
         torch.randn(batch, hkv, length, HEAD_DIM, device=device, dtype=dtype))
        for _ in range(copies)
    ]
    gqa = hq != hkv
    bytes_moved = kv_bytes + 2 * batch * hq * HEAD_DIM * 2

    def call(i):
        k, v = caches[i % copies]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    with sdpa_kernel([backend]):
        call(0)  # refuses here when the backend cannot serve the shape
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
    seconds = statistics.median(samples)
    del caches
    torch.cuda.empty_cache()
    return {"us": seconds * 1e6, "GBps": bytes_moved / seconds * 1e-9, "bytes": bytes_moved}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 0
    results = []
    for name, hq, hkv, batch, length in SHAPES:
        for backend_name, backend in BACKENDS:
            entry = {"shape": name, "backend": backend_name}
            try:
                entry.update(measure(name, hq, hkv, batch, length, backend, args.calls, args.repeats))
            except RuntimeError as error:  # backend refused the shape
                entry["error"] = str(error).splitlines()[0][:200]
                torch.cuda.empty_cache()
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "head_dim": HEAD_DIM,
        "dtype": "bf16",
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
