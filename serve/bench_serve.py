"""Serving benchmark: the HTTP server under concurrent streaming clients, with and without speculation.

    python serve/bench_serve.py --prompts PROMPTS.jsonl|DIR --out bench_serve.json
        [--models smollm2,qwen3_4b] [--modes none,fixed,causal] [--concurrency 1,4,16,64]
        [--max-tokens 128] [--time-budget 420] [--replay 0.8,0.75,0.7]

For each model and mode a server process (`python -m dspark_jax.serve`, on 127.0.0.1) is started
and, at each concurrency c, c streaming clients send requests back to back (max(8, 2c) requests
in all). Modes: `none` decodes plainly (draft.kind=none), `fixed` verifies the draft's γ tokens
every round, `causal` lets the confidence scheduler choose (and runs plain steps where past rounds
say a round pays less), `causal_rounds` is causal without that option. Models:
  smollm2   SmolLM2-135M-Instruct + the shipped DSpark draft; the first turn of each prompt, through
            /v1/chat/completions (answers end at EOS or --max-tokens)
  qwen3_4b  Qwen3-4B's architecture with random weights + a random 5-layer DSpark draft; random
            token-id prompts of --prompt-len tokens through /v1/completions, exactly --max-tokens out
  FILE.py   any config file, served like qwen3_4b
With --replay RATES the random-weight models' servers start through serve/replay_server.py: the
target made predictable and the draft accepted at those conditional rates per position (in every
mode, so `none` decodes the same target), the acceptance a trained draft would have.
Servers start without the engine's warm-up; each cell first runs, unmeasured, a ladder of waves of
1, 2, 4, ... < c requests (every row bucket the measured pass's tail may reach) and then its whole
request set at concurrency c, which compiles the shapes the measured pass meets. Per cell: output tokens/s and requests/s over
the cell's wall time; TTFT (request sent → first
token), ITL (gaps between streamed chunks, each holding one round's tokens) and TPOT ((end − first
token) / (tokens − 1)) as median and p99; the mean accepted length per round, the share of request-steps run
plain and the compilations during the measured part (should be 0), and the plain-step gate's moving step
times and tokens per round by row bucket at the cell's end, from the server's /metrics. This process
never touches the GPU (the server owns it).
Cells left when --time-budget seconds have passed are skipped and listed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from dspark_jax.config import load_config
from dspark_jax.eval import read_prompt_sets
from dspark_jax.server.process import ServerProcess

MODES = {"none": ["draft.kind=none"], "fixed": ["spec.scheduler=fixed"], "causal": ["spec.scheduler=causal"],
         "causal_rounds": ["spec.scheduler=causal", "spec.plain_steps=false"]}
MODELS = {  # name -> (config, endpoint, extra --set overrides)
    "smollm2": ("smollm2_dspark.py", "chat", ["serve.max_context=2048"]),
    "qwen3_4b": ("qwen3_4b.py", "completions", ["serve.max_context=1024"]),
}
# the engine's metric names (ENGINE_API.md)
ACCEPTED = "dspark_accepted_length"
COMPILES = "dspark_compilations_after_warmup_total"
PLAIN = "dspark_plain_steps_total"
STEP_SECONDS = "dspark_step_seconds"
ROUND_TOKENS = "dspark_round_tokens"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def metric_samples(url: str) -> dict[str, float]:
    """Label-free sums of every sample name in /metrics (histogram _sum/_count, counters)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def gate_means(url: str) -> dict[str, dict[str, float]]:
    """The plain-step gate's moving means by row bucket: round/plain step ms and tokens per round."""
    means: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == STEP_SECONDS:
                means.setdefault(s.labels["rows"], {})[f"{s.labels['kind']}_ms"] = round(1e3 * s.value, 3)
            elif s.name == ROUND_TOKENS:
                means.setdefault(s.labels["rows"], {})["tau"] = round(s.value, 3)
    return means


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    arrivals, counts = [], []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode(errors="replace")[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 200, "error": chunk["error"]["message"]}
            tokens = sum(len(c.get("token_ids", [])) for c in chunk["choices"])
            if tokens:
                arrivals.append(time.perf_counter())
                counts.append(tokens)
    end = time.perf_counter()
    n = sum(counts)
    return {"status": 200, "ttft": arrivals[0] - start if arrivals else None,
            "itl": list(np.diff(arrivals)), "tpot": (end - arrivals[0]) / (n - 1) if n > 1 else None,
            "tokens": n}


async def run_cell(url: str, bodies: list[dict], concurrency: int, path: str) -> tuple[list[dict], float]:
    queue = list(reversed(bodies))
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url + path, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def summarize(results: list[dict], seconds: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    rounds = after.get(ACCEPTED + "_count", 0.0) - before.get(ACCEPTED + "_count", 0.0)
    accepted = after.get(ACCEPTED + "_sum", 0.0) - before.get(ACCEPTED + "_sum", 0.0)
    plain = after.get(PLAIN, 0.0) - before.get(PLAIN, 0.0)  # request-steps run plain (not in `rounds`)
    ms = lambda v: None if v is None else round(1e3 * v, 2)  # noqa: E731
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [gap for r in ok for gap in r["itl"]]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {
        "requests": len(results), "errors": [r["error"] for r in results if "error" in r][:5],
        "failed": len(results) - len(ok), "seconds": round(seconds, 3), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / seconds, 1), "requests_per_s": round(len(ok) / seconds, 3),
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)),
        "accepted_length": round(accepted / rounds, 3) if rounds else None,
        "plain_share": round(plain / (plain + rounds), 3) if plain + rounds else None,
        "compilations": after.get(COMPILES, 0.0) - before.get(COMPILES, 0.0),
    }


def request_bodies(model: str, endpoint: str, n: int, args, prompts: list[str], vocab: int) -> list[dict]:
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
              "return_token_ids": True}
    if endpoint == "chat":
        return [{**common, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]} for i in range(n)]
    rng = np.random.default_rng(0)
    return [{**common, "prompt": rng.integers(3, vocab, args.prompt_len).tolist(), "ignore_eos": True}
            for _ in range(n)]


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().split("\n")[0] or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", action="append", default=[], help="prompt JSONL file or folder (repeatable)")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--models", default="smollm2,qwen3_4b")
    parser.add_argument("--modes", default="none,fixed,causal")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256, help="token-id prompts' length (random-weight models)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], help="extra config override for every server")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; later cells are skipped")
    parser.add_argument("--replay", default="", help="random-weight models: conditional acceptance rates per draft "
                        "position, e.g. 0.8,0.75,0.7; servers start through serve/replay_server.py (temperature 0)")
    args = parser.parse_args(argv)
    if args.replay and args.temperature != 0.0:
        parser.error("--replay needs --temperature 0 (the replayed tokens are accepted by greedy verification)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sets = read_prompt_sets(args.prompts) if args.prompts else {}
    prompts = [turns[0] for prompt_set in sets.values() for turns in prompt_set]
    # no start-up warm-up (every bucket of 64 slots, compiled for each of the servers, would not fit the
    # budget); each cell first runs its own requests once, unmeasured, instead
    serve_sets = [f"serve.max_batch={max(concurrencies)}", f"serve.max_waiting={4 * max(concurrencies)}",
                  "serve.warmup=false"]
    result = {"device": device_name(), "max_tokens": args.max_tokens, "temperature": args.temperature,
              "prompts": len(prompts), "cells": [], "skipped": []}
    program = ("-m", "dspark_jax.serve")
    if args.replay:
        program = (str(Path(__file__).with_name("replay_server.py")), f"--replay={args.replay}")
        result["replay_rates"] = [float(r) for r in args.replay.split(",")]
    logs = Path(args.out).resolve().parent / "bench_serve_logs"  # one server log per model and mode
    logs.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        config, endpoint, model_sets = MODELS.get(model, (model, "completions", []))
        if endpoint == "chat" and not prompts:
            raise SystemExit(f"--models {model}: chat prompts needed; pass --prompts FILE.jsonl or a folder")
        for mode in args.modes.split(","):
            cells = [(model, mode, c) for c in concurrencies]
            if time.monotonic() - started > args.time_budget:
                result["skipped"] += [list(cell) for cell in cells]
                continue
            overrides = serve_sets + model_sets + MODES[mode] + args.set
            arch = load_config(config, overrides).target.arch
            if (endpoint == "completions" or args.replay) and arch is None:
                raise SystemExit(f"--models {model}: random token-id prompts and --replay need a random-weight "
                                 "config (target.arch)")
            vocab = arch.vocab_size if arch is not None else None
            server = ServerProcess(config, logs / f"{Path(model).stem}-{mode}.log",
                                   *(f"--set={o}" for o in overrides),
                                   "--served-model-name", "bench", program=program)
            try:
                launch = time.monotonic()
                server.wait_healthy(timeout=max(60.0, args.time_budget - (time.monotonic() - started)))
                startup = round(time.monotonic() - launch, 1)
                path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
                for c in concurrencies:
                    if time.monotonic() - started > args.time_budget:
                        result["skipped"].append([model, mode, c])
                        continue
                    bodies = request_bodies("bench", endpoint, max(8, 2 * c), args, prompts, vocab)
                    warm_start = time.monotonic()
                    for rows in (1 << i for i in range((c - 1).bit_length())):
                        asyncio.run(run_cell(server.url, bodies[:rows], rows, path))
                    asyncio.run(run_cell(server.url, bodies, c, path))
                    warm_seconds = time.monotonic() - warm_start
                    before = metric_samples(server.url)
                    results, seconds = asyncio.run(run_cell(server.url, bodies, c, path))
                    cell = {"model": model, "mode": mode, "concurrency": c, "startup_s": startup,
                            "warmup_s": round(warm_seconds, 1),
                            **summarize(results, seconds, before, metric_samples(server.url)),
                            "gate": gate_means(server.url)}
                    result["cells"].append(cell)
                    print(json.dumps(cell), flush=True)
            except RuntimeError as e:  # the server did not come up: record it, go on with the next
                result["cells"].append({"model": model, "mode": mode, "error": str(e)[-2000:]})
            finally:
                server.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    columns = ["model", "mode", "concurrency", "output_tokens_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p99",
               "itl_ms_p50", "itl_ms_p99", "tpot_ms_p50", "accepted_length", "plain_share", "failed", "compilations"]
    rows = [[str(cell.get(c, "")) for c in columns] for cell in result["cells"] if "error" not in cell]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print(f"\n{result['device']}, {result['max_tokens']} tokens max, T={result['temperature']}")
    for row in [columns, *rows]:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for cell in result["cells"]:
        if "error" in cell:
            print(f"{cell['model']} {cell['mode']}: server failed: {cell['error'][-300:]}")
    if result["skipped"]:
        print(f"skipped (time budget): {result['skipped']}")


if __name__ == "__main__":
    sys.exit(main())
