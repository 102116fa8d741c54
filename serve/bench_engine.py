"""The engine on the current device: warm-up, no compiles after it, lossless output, throughput, latency.

    python serve/bench_engine.py --out engine.json [--requests 48] [--max-batch 8] [--budget-s 420]

SmolLM2-135M's architecture with random bf16 weights (timings depend on shapes only; a random
draft is rarely accepted, so speculation shows its cost here, not its gain) and a random one-layer
DSpark draft (γ = 7). In one process:
1. `generate` of 16 prompts, plain and with the draft (fixed): identical greedy tokens; tokens/s;
2. an Engine per mode (plain, fixed, causal with a flat SPS table), warmed up (seconds, programs),
   then `--requests` concurrent requests (prompts of 32..384 tokens, 128 new tokens, every third
   one sampled at T=0.7, top-p 0.9) submitted at once through an asyncio loop: output tokens/s,
   time to first token and inter-token latency percentiles (client side), compilations after
   warm-up (must be 0), and the share of greedy requests whose tokens equal `generate` plain
   (bf16: a near-tie may flip with the batch shape).
Results are written after every part; a mode that would start past --budget-s is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import jax
import numpy as np

from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineConfig, RequestParams, generate
from dspark_jax.models import create_target
from dspark_jax.speculative.schedule import SpecParams

ARCH = LlamaArch()  # the defaults are SmolLM2-135M's
GAMMA = 7
NEW_TOKENS = 128


def prompts_of(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, ARCH.vocab_size, int(n)).tolist() for n in rng.integers(32, 385, count)]


async def serve_all(engine: Engine, requests) -> list[dict]:
    """Submit every (prompt, params) at once; per request its tokens and output arrival times."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()

    async def one(prompt, params):
        tokens, times = [], []
        async for out in engine.submit(prompt, params, loop=loop):
            tokens += out.token_ids
            times += [time.perf_counter() - start] * len(out.token_ids)
        return {"tokens": tokens, "times": times}

    return await asyncio.gather(*(one(p, params) for p, params in requests))


def percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    return {f"p{q}": float(np.percentile(values, q)) * 1e3 for q in (50, 90, 99)} if len(values) else {}


def bench_mode(name, target, draft, spec, args, reference) -> dict:
    config = EngineConfig(max_batch=args.max_batch, max_context=512, prefill_chunk=args.prefill_chunk,
                          compilation_cache=False)
    engine = Engine(target, draft, spec=spec, config=config)
    started = time.perf_counter()
    engine.start()
    while not engine.ready:
        time.sleep(0.05)
    warmup_s = time.perf_counter() - started
    prompts = prompts_of(args.requests, seed=1)
    requests = [(p, RequestParams(max_tokens=NEW_TOKENS, seed=i, **({"temperature": 0.7, "top_p": 0.9}
                                                                     if i % 3 == 2 else {})))
                for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    results = asyncio.run(serve_all(engine, requests))
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    engine.shutdown(1.0)
    # bf16 rounding depends on batch shapes, so a greedy near-tie may flip: report the share that agree
    greedy = [i for i in range(len(prompts)) if i % 3 != 2]
    agree = sum(results[i]["tokens"] == reference[i] for i in greedy) / len(greedy)
    ttft = [r["times"][0] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["tokens"]) for r in results)
    return {"mode": name, "warmup_s": warmup_s, "programs": engine.core.compiles.count,
            "compiles_after_warmup": stats["compiles_after_warmup"], "preemptions": stats["preemptions"],
            "requests": len(prompts), "output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "greedy_equal_to_generate": agree}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args()
    begin = time.perf_counter()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    target = create_target(ARCH, dtype="bfloat16")
    draft = create_draft(DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(1, 14, 27), block_size=GAMMA,
                                     mask_token_id=ARCH.vocab_size - 1, markov_rank=24), target)
    batch = prompts_of(16, seed=0)
    t0 = time.perf_counter()
    plain = generate(target, None, batch, max_new_tokens=NEW_TOKENS)
    t1 = time.perf_counter()
    spec = generate(target, draft, batch, max_new_tokens=NEW_TOKENS, spec=SpecParams(block_size=GAMMA))
    t2 = time.perf_counter()
    results["generate"] = {"prompts": 16, "equal": spec.tokens == plain.tokens,
                           "plain_s_with_compile": t1 - t0, "fixed_s_with_compile": t2 - t1,
                           "plain_decode_tokens_per_s": 16 * (NEW_TOKENS - 1) / plain.decode_seconds,
                           "fixed_decode_tokens_per_s": 16 * (NEW_TOKENS - 1) / spec.decode_seconds,
                           "fixed_acceptance_length": spec.stats.acceptance_length}
    save()
    print(json.dumps(results["generate"]), flush=True)

    reference = generate(target, None, prompts_of(args.requests, seed=1), max_new_tokens=NEW_TOKENS).tokens
    flat = tuple(1.0 for _ in range(args.max_batch * (GAMMA + 1) + 1))
    modes = [("plain", None, None), ("fixed", draft, SpecParams(block_size=GAMMA)),
             ("causal", draft, SpecParams(block_size=GAMMA, scheduler="causal", sps=flat))]
    results["engine"] = []
    for name, mode_draft, mode_spec in modes:
        if time.perf_counter() - begin > args.budget_s:
            results["engine"].append({"mode": name, "skipped": "past --budget-s"})
            continue
        results["engine"].append(bench_mode(name, target, mode_draft, mode_spec, args, reference))
        save()
        print(json.dumps(results["engine"][-1]), flush=True)
    save()
    print(f"\n{'mode':8s} {'warm-up s':>9s} {'programs':>8s} {'late':>4s} {'tok/s':>8s} {'TTFT p50':>9s} "
          f"{'ITL p50':>8s} {'ITL p90':>8s} {'greedy=':>7s}")
    for row in results["engine"]:
        if "skipped" in row:
            print(f"{row['mode']:8s} skipped")
            continue
        print(f"{row['mode']:8s} {row['warmup_s']:9.1f} {row['programs']:8d} {row['compiles_after_warmup']:4d} "
              f"{row['tokens_per_s']:8.0f} {row['ttft_ms'].get('p50', 0):9.1f} {row['itl_ms'].get('p50', 0):8.2f} "
              f"{row['itl_ms'].get('p90', 0):8.2f} {row['greedy_equal_to_generate']:7.2f}")


if __name__ == "__main__":
    main()
