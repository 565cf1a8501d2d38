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

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _sdpa_common import median_seconds, run

HEAD_DIM = 128
SHAPES = [
    # (name, q heads, kv heads, batch, length)
    ("full_32x32_B64_L4096", 32, 32, 64, 4096),
    ("full_32x8_B64_L4096", 32, 8, 64, 4096),
    ("full_32x4_B64_L4096", 32, 4, 64, 4096),
]
BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


def measure(hq, hkv, batch, length, backend, calls, repeats):
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
        seconds = median_seconds(call, calls, repeats)
    return {"us": seconds * 1e6, "GBps": bytes_moved / seconds * 1e-9, "bytes": bytes_moved}


def main():
    return run(__doc__, SHAPES, BACKENDS, measure, calls=20, repeats=15, head_dim=HEAD_DIM)


if __name__ == "__main__":
    sys.exit(main())
