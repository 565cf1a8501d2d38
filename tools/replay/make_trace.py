#!/usr/bin/env python3
"""Random kvc-replay traces written with numpy, and checks of kvc-replay's outputs.

  make_trace.py write DIR [--policy dmc] [--dtype bf16] [--tokens 64] [--prompt 16] ...
      writes DIR/config.json, q.npy, k.npy, v.npy (float32, values representable in --dtype).
  make_trace.py check TRACE_DIR OUT_DIR
      loads kvc-replay's outputs with numpy and checks their dtypes, shapes and invariants; for
      the full policy also recomputes the attention output with numpy.
  make_trace.py roundtrip KVC_REPLAY WORK_DIR
      write + kvc-replay + check for every policy (the ctest). Exits 77 (skipped) without numpy.

A trace from a real model is the same four files: see docs/replay.md.
"""

import argparse
import json
import os
import subprocess
import sys

SKIP = 77  # ctest SKIP_RETURN_CODE

try:
    import numpy as np
except ImportError:  # numpy is optional: the ctest reports "skipped"
    np = None


def round_to_dtype(x, dtype):
    """Rounds float32 values to the nearest fp16/bf16 value (round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return x


def write_trace(directory, args):
    rng = np.random.default_rng(args.seed)
    t, hq, hkv, d = args.tokens, args.q_heads, args.kv_heads, args.head_dim
    q = round_to_dtype(rng.standard_normal((t, hq, d), dtype=np.float32), args.dtype)
    k = round_to_dtype(rng.standard_normal((t, hkv, d), dtype=np.float32), args.dtype)
    v = round_to_dtype(rng.standard_normal((t, hkv, d), dtype=np.float32), args.dtype)
    if args.policy == "dmc":  # about half the tokens merge: k[dim] - offset > 0
        dim, offset = (0, 0.0) if args.mode == "paper" else (d - 1, 5.0)
        decision = offset + 2.0 * rng.standard_normal((t, hkv), dtype=np.float32)
        k[:, :, dim] = round_to_dtype(decision, args.dtype)
    window = args.window if args.window is not None else (0 if args.mode == "paper" else 12)
    config = {
        "policy": args.policy, "dtype": args.dtype, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
        "rope": args.rope, "rope_theta": args.rope_theta, "prompt_tokens": args.prompt,
        "mode": args.mode, "window": window,
        "heavy": args.heavy, "recent": args.recent, "budget": args.budget,
        "protect_new": args.protect_new,
    }
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "q.npy"), q)
    np.save(os.path.join(directory, "k.npy"), k)
    np.save(os.path.join(directory, "v.npy"), v)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def rope(x, positions, layout, theta):
    """RoPE of x [T, H, D] at positions [T] (rotate_half or interleaved), in float64."""
    if layout == "none":
        return x.astype(np.float64)
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * np.arange(d // 2) / d)
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, D/2]
    cos = np.cos(angle).astype(np.float32)[:, None, :].astype(np.float64)
    sin = np.sin(angle).astype(np.float32)[:, None, :].astype(np.float64)
    x = x.astype(np.float64)
    if layout == "rotate_half":
        first, second = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    first, second = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = first * cos - second * sin
    out[..., 1::2] = second * cos + first * sin
    return out


def full_attention(q, k, v, config):
    """Causal attention of the full cache in float64 (GQA: q head h reads KV head h // G)."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    positions = np.arange(t)
    layout, theta, dtype = config["rope"], config.get("rope_theta", 1e4), config["dtype"]
    qr = round_to_dtype(rope(round_to_dtype(q, dtype), positions, layout, theta), dtype)
    kr = round_to_dtype(rope(round_to_dtype(k, dtype), positions, layout, theta), dtype)
    kr = np.repeat(kr.astype(np.float64), group, axis=1)  # [T, Hq, D]
    vr = np.repeat(v.astype(np.float64), group, axis=1)
    logits = np.einsum("thd,shd->hts", qr.astype(np.float64), kr) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((t, t), dtype=bool))[None], logits, -np.inf)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vr)


def check_outputs(trace_dir, out_dir):
    """Checks kvc-replay's outputs with numpy; returns a list of problems (empty: all good)."""
    with open(os.path.join(trace_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    q = np.load(os.path.join(trace_dir, "q.npy"))
    k = np.load(os.path.join(trace_dir, "k.npy"))
    v = np.load(os.path.join(trace_dir, "v.npy"))
    t, hq, d = q.shape
    hkv = k.shape[1]
    problems = []

    def expect(condition, message):
        if not condition:
            problems.append(message)

    out = np.load(os.path.join(out_dir, "out.npy"))
    slots = np.load(os.path.join(out_dir, "slots.npy"))
    cache_k = np.load(os.path.join(out_dir, "cache_k.npy"))
    cache_v = np.load(os.path.join(out_dir, "cache_v.npy"))
    cache_pos = np.load(os.path.join(out_dir, "cache_pos.npy"))
    expect(out.dtype == np.float32 and out.shape == (t, hq, d), f"out.npy: {out.dtype} {out.shape}")
    expect(slots.dtype == np.int32 and slots.shape == (t, hkv),
           f"slots.npy: {slots.dtype} {slots.shape}")
    max_slots = int(slots[-1].max())
    expect(cache_k.dtype == np.float32 and cache_k.shape == (hkv, max_slots, d),
           f"cache_k.npy: {cache_k.shape}")
    expect(cache_v.shape == cache_k.shape, f"cache_v.npy: {cache_v.shape}")
    expect(cache_pos.dtype == np.int32 and cache_pos.shape == (hkv, max_slots),
           f"cache_pos.npy: {cache_pos.shape}")
    expect(np.isfinite(out).all(), "out.npy has non-finite values")
    expect(report["policy"] == config["policy"], "report.json: policy")
    expect(report["slots_per_head"] == slots[-1].tolist(),
           "report.json: slots_per_head != slots.npy[-1]")
    expect(abs(report["compression_ratio"] - t * hkv / slots[-1].sum()) < 1e-9,
           "report.json: compression_ratio")
    for h in range(hkv):  # padding: zero keys, position -1
        kept = slots[-1, h]
        expect((cache_pos[h, kept:] == -1).all() and (cache_k[h, kept:] == 0).all(),
               f"head {h}: padding")
        expect((cache_pos[h, :kept] >= 0).all() and (cache_pos[h, :kept] < t).all(),
               f"head {h}: positions")
    policy = config["policy"]
    if policy == "full":
        expected_slots = np.arange(1, t + 1)[:, None].clip(config["prompt_tokens"])
        expect((slots == expected_slots).all(), "full: slots")
        reference = full_attention(q, k, v, config)
        error = np.abs(out - reference).max()
        expect(error < 1e-4, f"full: out.npy differs from numpy attention by {error}")
    elif policy == "h2o":
        expect(max_slots <= config["heavy"] + config["recent"], "h2o: over budget")
    elif policy == "tova":
        expect(max_slots <= config["budget"], "tova: over budget")
        expect((slots == slots[:, :1]).all(), "tova: KV heads must share one slot count")
    elif policy == "dmc":
        growth = np.diff(slots[config["prompt_tokens"]:], axis=0)
        expect((growth <= 1).all(), "dmc: a decode step added more than one slot")
    return problems


def roundtrip(replay, work):
    failures = 0
    cases = [
        ("full", ["--dtype", "fp32", "--rope", "rotate_half", "--q-heads", "4", "--kv-heads", "2"]),
        ("full", ["--dtype", "fp32", "--rope", "interleaved", "--q-heads", "2", "--kv-heads", "2"]),
        ("dmc", ["--dtype", "bf16", "--mode", "checkpoint"]),
        ("dmc", ["--dtype", "fp16", "--mode", "paper", "--prompt", "0"]),
        ("h2o", ["--dtype", "fp16", "--heavy", "6", "--recent", "4"]),
        ("tova", ["--dtype", "bf16", "--budget", "10", "--protect-new"]),
    ]
    for index, (policy, extra) in enumerate(cases):
        trace = os.path.join(work, f"trace{index}_{policy}")
        out = os.path.join(work, f"out{index}_{policy}")
        args = parser().parse_args(
            ["write", trace, "--policy", policy, "--seed", str(index)] + extra)
        write_trace(trace, args)
        run = subprocess.run([replay, trace, "--out", out, "--quiet"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{policy}: kvc-replay exited {run.returncode}: {run.stderr}")
            failures += 1
            continue
        problems = check_outputs(trace, out)
        for problem in problems:
            print(f"{policy} (case {index}): {problem}")
        failures += bool(problems)
    # a numpy file of the wrong dtype is a clear error (exit 1), not a crash
    bad = os.path.join(work, "bad_dtype")
    write_trace(bad, parser().parse_args(["write", bad, "--policy", "full"]))
    np.save(os.path.join(bad, "k.npy"), np.load(os.path.join(bad, "k.npy")).astype(np.float64))
    run = subprocess.run([replay, bad, "--out", os.path.join(work, "bad_out")],
                         capture_output=True, text=True)
    if run.returncode != 1 or "k.npy" not in run.stderr or "'<f8'" not in run.stderr:
        print(f"float64 k.npy: exit {run.returncode}, stderr {run.stderr!r}")
        failures += 1
    print(f"numpy round trip: {len(cases) + 1 - failures} of {len(cases) + 1} cases passed")
    return 1 if failures else 0


def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a random trace")
    w.add_argument("dir")
    w.add_argument("--policy", choices=["full", "dmc", "h2o", "tova"], default="dmc")
    w.add_argument("--mode", choices=["checkpoint", "paper"], default="checkpoint")
    w.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    w.add_argument("--rope", choices=["none", "rotate_half", "interleaved"], default="rotate_half")
    w.add_argument("--rope-theta", type=float, default=10000.0)
    w.add_argument("--tokens", type=int, default=48)
    w.add_argument("--prompt", type=int, default=16)
    w.add_argument("--q-heads", type=int, default=4)
    w.add_argument("--kv-heads", type=int, default=2)
    w.add_argument("--head-dim", type=int, default=16)
    w.add_argument("--window", type=int, default=None)
    w.add_argument("--heavy", type=int, default=8)
    w.add_argument("--recent", type=int, default=4)
    w.add_argument("--budget", type=int, default=12)
    w.add_argument("--protect-new", action="store_true")
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="check kvc-replay's outputs")
    c.add_argument("trace_dir")
    c.add_argument("out_dir")
    r = sub.add_parser("roundtrip", help="write, replay and check every policy (the ctest)")
    r.add_argument("replay")
    r.add_argument("work")
    return p


def main():
    args = parser().parse_args()
    if np is None:
        print("make_trace.py: numpy is not installed: skipped")
        return SKIP
    if args.command == "write":
        write_trace(args.dir, args)
        return 0
    if args.command == "check":
        problems = check_outputs(args.trace_dir, args.out_dir)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    os.makedirs(args.work, exist_ok=True)
    return roundtrip(args.replay, args.work)


if __name__ == "__main__":
    sys.exit(main())
