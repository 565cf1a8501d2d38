#!/usr/bin/env python3
"""PyTorch baseline of kvc-e2e's full-cache decode: Hugging Face transformers' LlamaForCausalLM
built from a Llama-2-7B LlamaConfig with random bf16 weights, a StaticCache, SDPA attention,
greedy next token, timed per decode step at a given batch and context.

Modes (each timed in the same process, one after the other):
  eager     the decode step as written
  graph     the decode step captured once in a torch.cuda.CUDAGraph and replayed
  compiled  torch.compile(mode="reduce-overhead", fullgraph=True) of the decode step

The StaticCache holds --context tokens (Llama-2-7B at batch 31 and 4096 tokens fills an 80 GB
H100): a chunked prefill (not timed) feeds context - warmup - steps tokens, then --warmup steps
run untimed and --steps steps are timed with CUDA events, the last one writing position
context - 1. Tokens/s = batch * steps / time. kvc-e2e --mode fixed --context C --prompt C
--generate 0 times the same positions (its --context is where the warm-up starts).

Usage: python3 benchmarks/baselines/hf_llama_decode.py [--batch 31] [--context 4096]
           [--steps 32] [--warmup 5] [--modes eager,graph,compiled] [--out FILE]
Prints one JSON object: {"device", "torch", "transformers", "batch", "context", "results":
[{"mode", "step_ms", "tokens_per_s"} or {"mode", "error"}]}.
"""

import argparse
import inspect
import json
import sys
import time
import traceback

import torch


def make_model(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype=torch.bfloat16)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    return model, config


def make_static_cache(config, batch, max_len):
    """StaticCache across transformers versions (keyword names changed between 4.x and 5.x)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": config, "max_cache_len": max_len}
    if "max_batch_size" in params:
        kwargs["max_batch_size"] = batch
    elif "batch_size" in params:
        kwargs["batch_size"] = batch
    if "device" in params:
        kwargs["device"] = "cuda"
    if "dtype" in params:
        kwargs["dtype"] = torch.bfloat16
    return StaticCache(**kwargs)


def logits_kwargs(model):
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


@torch.inference_mode()
def prefill(model, cache, batch, context, chunk=512):
    keep = logits_kwargs(model)
    ids = torch.randint(0, 32000, (batch, context), device="cuda")
    last = None
    for begin in range(0, context, chunk):
        end = min(context, begin + chunk)
        position = torch.arange(begin, end, device="cuda")
        out = model(input_ids=ids[:, begin:end], past_key_values=cache, cache_position=position,
                    use_cache=True, **keep)
        last = out.logits[:, -1:].argmax(-1)
    return last


def run_mode(mode, model, config, batch, context, steps, warmup):
    start_position = context - warmup - steps
    if start_position < 1:
        raise ValueError("--context must exceed --warmup + --steps")
    cache = make_static_cache(config, batch, context)
    token = prefill(model, cache, batch, start_position)
    keep = logits_kwargs(model)

    def step(input_ids, cache_position):
        out = model(input_ids=input_ids, past_key_values=cache, cache_position=cache_position,
                    use_cache=True, **keep)
        return out.logits[:, -1:].argmax(-1)

    input_ids = token.clone()
    position = torch.tensor([start_position], device="cuda")
    if mode == "eager":
        def one_step():
            nonlocal input_ids
            input_ids = step(input_ids, position)
            position.add_(1)
    elif mode == "compiled":
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

        def one_step():
            nonlocal input_ids
            input_ids = compiled(input_ids, position).clone()
            position.add_(1)
    elif mode == "graph":
        static_ids = input_ids.clone()
        # The cache's tensors were made in inference mode (prefill): warm-up and capture must run
        # in it too, or the cache update is refused ("Inplace update to inference tensor outside
        # InferenceMode", seen on an H200 with torch 2.11 / transformers 5.17).
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm the allocator outside capture
                for _ in range(2):
                    step(static_ids, position)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = step(static_ids, position)

        def one_step():
            graph.replay()
            static_ids.copy_(static_out)
            position.add_(1)
        # Warm-up and capture wrote the rows of start_position (kept as the step's position):
        # the replays rewrite that row before reading it.
    else:
        raise ValueError(mode)

    with torch.inference_mode():
        for _ in range(warmup):
            one_step()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            one_step()
        stop.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / steps
    return {"mode": mode, "step_ms": ms, "tokens_per_s": batch * 1000.0 / ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=31)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--modes", default="eager,graph,compiled")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    import transformers

    model, config = make_model(args.layers)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "batch": args.batch,
              "context": args.context, "steps": args.steps, "layers": args.layers,
              "results": []}
    for mode in args.modes.split(","):
        began = time.time()
        try:
            result = run_mode(mode, model, config, args.batch, args.context, args.steps,
                              args.warmup)
        except Exception as error:  # report and go on with the other modes
            traceback.print_exc(file=sys.stderr)
            result = {"mode": mode, "error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = time.time() - began
        report["results"].append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
