#!/usr/bin/env python3
"""PyTorch SDPA causal prefill baseline on the shapes of benchmarks/bench_prefill.cu.

Packed prompts of equal length without a cached prefix, bf16, head dim 128, 32 query heads:
  causal_32x8_B1_N4096, causal_32x8_B8_N2048, causal_32x8_B32_N512   (GQA, 8 KV heads)
  causal_32x32_B1_N4096, causal_32x32_B8_N2048, causal_32x32_B32_N512 (MHA)
(q [B, Hq, N, D], k/v [B, Hkv, N, D], is_causal=True; GQA through enable_gqa=True, or through
K/V expanded to Hq heads when a backend refuses enable_gqa) with the flash, cuDNN and
memory-efficient backends of torch.nn.functional.scaled_dot_product_attention. Each measurement
times CALLS back-to-back calls with CUDA events and reports the median over REPEATS repetitions.
TFLOP/s counts causal FLOPs as bench_prefill does: 4 * D * Hq * B * N (N + 1) / 2.

Usage: python3 benchmarks/baselines/sdpa_prefill.py [--calls 10] [--repeats 10] [--out FILE]
Prints JSON: {"device": ..., "torch": ..., "results": [{"shape", "backend", "us", "TFLOPs",
"gqa"} or {"shape", "backend", "error"}]}.
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _sdpa_common import median_seconds, run

HEAD_DIM = 128
SHAPES = [
    # (name, q heads, kv heads, batch, tokens per row)
    ("causal_32x8_B1_N4096", 32, 8, 1, 4096),
    ("causal_32x8_B8_N2048", 32, 8, 8, 2048),
    ("causal_32x8_B32_N512", 32, 8, 32, 512),
    ("causal_32x32_B1_N4096", 32, 32, 1, 4096),
    ("causal_32x32_B8_N2048", 32, 32, 8, 2048),
    ("causal_32x32_B32_N512", 32, 32, 32, 512),
]
BACKENDS = [
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
]


def causal_flops(hq, batch, tokens):
    return 4.0 * HEAD_DIM * hq * batch * tokens * (tokens + 1) / 2.0


def measure(hq, hkv, batch, tokens, backend, calls, repeats):
    device = torch.device("cuda")
    dtype = torch.bfloat16
    q = torch.randn(batch, hq, tokens, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(batch, hkv, tokens, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn(batch, hkv, tokens, HEAD_DIM, device=device, dtype=dtype)
    mode = "native" if hq != hkv else "mha"

    def call_native():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)

    k_wide = k.repeat_interleave(hq // hkv, dim=1) if hq != hkv else k
    v_wide = v.repeat_interleave(hq // hkv, dim=1) if hq != hkv else v

    def call_expanded():
        return F.scaled_dot_product_attention(q, k_wide, v_wide, is_causal=True)

    call = call_native
    with sdpa_kernel([backend]):
        try:
            call()
        except RuntimeError:
            if hq == hkv:
                raise
            call = call_expanded  # the backend refuses enable_gqa: same FLOPs on expanded K/V
            mode = "expanded"
            call()
        seconds = median_seconds(lambda _: call(), calls, repeats)
    return {"us": seconds * 1e6, "TFLOPs": causal_flops(hq, batch, tokens) / seconds * 1e-12, "gqa": mode}


def main():
    return run(__doc__, SHAPES, BACKENDS, measure, calls=10, repeats=10, head_dim=HEAD_DIM)


if __name__ == "__main__":
    sys.exit(main())
