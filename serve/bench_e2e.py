"""End-to-end decoding speed: the same prompts decoded plainly, with DSpark (causal, fixed γ), with n-gram
drafting and, optionally, with HF transformers.

    python serve/bench_e2e.py --config smollm2_dspark.py --prompts PROMPTS.jsonl|DIR --out e2e.json
        [--batches 1,16,64] [--modes plain,causal,fixed,ngram] [--max-tokens 128] [--hf]

Per batch B the first B prompts (first turns through the checkpoint's chat template; random token
ids of --prompt-len for a random-weight config) go through `generate` in each mode: one call to
compile (and, for causal, to profile the SPS table once), then --repeats timed calls, median.
Recorded per mode and batch: output tokens/s in total and per user (total ÷ B) over the call's wall
time (which counts building the decoding state and the prefill), the decode phase's tokens/s (after
every prompt has its first token), τ (tokens committed per round) and both speedups = the mode's
rate ÷ plain's in the same run; greedy modes also record whether their tokens equal plain decoding's
(they must).
--hf runs `serve/bench_hf.py --prompt-ids` on the same token ids in a subprocess (HF `generate`,
plain and with prompt lookup, its n-gram drafting) and records its tok/s and whether its greedy
tokens equal ours; it needs torch (on the first CUDA device, else the CPU) and a target with an HF
folder, and --hf-python names a Python that has them when this one does not.
--replay RATES (random-weight targets, greedy): the target's attention outputs are zeroed (same
compute, a predictable next token) and the DSpark draft is wrapped by serve/replay_draft.py, so
its tokens are accepted with the given conditional rate per draft position (the last rate repeats)
while the draft's whole cost stays in every round; plain decoding runs on the same target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from dspark_jax.config import load_config
from dspark_jax.engine import generate
from dspark_jax.eval import atomic_write_text, first_turn_ids, read_prompt_sets
from dspark_jax.loading import checkpoint_folder, load_draft, load_target, load_tokenizer
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams
from replay_draft import ReplayDraft, expected_tau, make_predictable  # serve/ (the script's folder)

MODES = ("plain", "causal", "fixed", "ngram")


def prompt_ids(cfg, args, count: int) -> list[list[int]]:
    if cfg.target.source:
        tokenizer = load_tokenizer(cfg)
        turns = [t for prompt_set in read_prompt_sets(args.prompts).values() for t in prompt_set]
        if not turns:
            raise SystemExit("--prompts: no prompts found; a checkpoint target needs chat prompts")
        return [first_turn_ids(tokenizer, turns[i % len(turns)]) for i in range(count)]
    rng = np.random.default_rng(0)
    return [rng.integers(3, cfg.target.arch.vocab_size, args.prompt_len).tolist() for _ in range(count)]


def run_mode(target, drafts: dict, mode: str, prompts, args) -> dict:
    draft, spec = drafts[mode]
    sampling = SamplingParams(temperature=args.temperature)

    def call():
        return generate(target, draft, prompts, max_new_tokens=args.max_tokens, sampling=sampling, spec=spec,
                        kernels=args.kernels)

    call()  # compiles (and profiles the SPS table once for causal)
    runs = [call() for _ in range(args.repeats)]
    seconds = statistics.median(r.seconds for r in runs)
    decode_seconds = statistics.median(r.decode_seconds for r in runs)
    tokens = sum(len(t) for t in runs[0].tokens)
    decoded = tokens - len(prompts)  # each prompt's first token comes from its prefill
    return {"mode": mode, "batch": len(prompts), "seconds": round(seconds, 4), "output_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "tokens_per_s_per_user": round(tokens / seconds / len(prompts), 1),
            "decode_tokens_per_s": round(decoded / decode_seconds, 1),
            "tau": round(runs[0].stats.acceptance_length, 3) if draft is not None else 1.0,
            "tokens": runs[0].tokens}


def run_hf(folder: Path, dtype: str, prompts: list[list[int]], args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "ids.json", Path(tmp) / "hf.json"
        ids.write_text(json.dumps(prompts))
        subprocess.run([args.hf_python, str(Path(__file__).with_name("bench_hf.py")), "--folder", str(folder),
                        "--prompt-ids", str(ids), "--new-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
                        "--dtype", dtype, "--out", str(out)], check=True)
        return json.loads(out.read_text())["runs"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--prompts", action="append", default=[], help="prompt JSONL file or folder (repeatable)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256, help="token-id prompts' length (random weights)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default=None, help="kernel backend; default: the config's serve.kernels")
    parser.add_argument("--hf", action="store_true", help="also time HF transformers (subprocess, CUDA)")
    parser.add_argument("--hf-python", default=sys.executable, help="the Python with torch + transformers for --hf")
    parser.add_argument("--replay", default="", help="conditional acceptance rates per draft position, e.g. "
                        "0.8,0.75,0.7 (random-weight targets at temperature 0)")
    args = parser.parse_args(argv)
    if args.replay and args.temperature != 0.0:
        parser.error("--replay needs --temperature 0 (the replayed tokens are accepted by greedy verification)")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; expected some of {list(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    target = load_target(cfg)
    rates = tuple(float(r) for r in args.replay.split(",")) if args.replay else ()
    if rates:
        if cfg.target.source:
            raise SystemExit("--replay: for random-weight targets only (it zeroes the target's attention outputs)")
        table = make_predictable(target)
    modes = args.modes.split(",")
    drafts = {"plain": (None, None)}
    if "causal" in modes or "fixed" in modes:
        dspark = load_draft(cfg, target)
        if dspark is None:
            raise SystemExit(f"--config {args.config}: no draft (draft.kind={cfg.draft.kind!r}) for causal/fixed")
        if rates:
            dspark = ReplayDraft(dspark, table, rates)
        drafts["causal"] = (dspark, SpecParams(block_size=args.block_size, scheduler="causal"))
        drafts["fixed"] = (dspark, SpecParams(block_size=args.block_size))
    if "ngram" in modes:
        drafts["ngram"] = (load_draft("ngram", target), SpecParams(block_size=args.block_size))
    args.kernels = args.kernels or cfg.serve.kernels
    batches = [int(b) for b in args.batches.split(",")]
    prompts = prompt_ids(cfg, args, max(batches))
    result = {"config": args.config, "device": jax.devices()[0].device_kind, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "block_size": args.block_size, "rows": []}
    if rates:
        result.update(replay_rates=rates, replay_expected_tau=round(expected_tau(rates, args.block_size), 3))
    for batch in batches:
        plain = run_mode(target, drafts, "plain", prompts[:batch], args)
        rows = [plain] + [run_mode(target, drafts, m, prompts[:batch], args) for m in modes if m != "plain"]
        if args.hf:
            folder = checkpoint_folder(cfg, "bench_e2e --hf")
            rows += run_hf(folder, cfg.target.dtype, prompts[:batch], args)
        plain_tokens = plain["tokens"]
        for row in rows:
            row["speedup"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
            if "decode_tokens_per_s" in row:  # HF rows time whole calls only
                row["decode_speedup"] = round(row["decode_tokens_per_s"] / plain["decode_tokens_per_s"], 3)
            tokens = row.pop("tokens")
            if args.temperature == 0.0:
                row["equals_plain"] = tokens == plain_tokens
            print(json.dumps(row), flush=True)
        result["rows"] += rows
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
