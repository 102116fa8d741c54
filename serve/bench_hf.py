"""HF transformers (PyTorch) greedy decoding speed, for the side-by-side ratios in docs/benchmarks.md.

    python serve/bench_hf.py --folder SMOLLM2_HF_FOLDER --out hf.json [--batches 1,32] [--context 1024]
    python serve/bench_hf.py --folder F --prompt-ids IDS.json --out hf.json [--new-tokens 128] [--dtype float32]

Default: times `generate` with a static number of new tokens on random ids and subtracts a
one-token run (prefill), so the figure is per decode step. --prompt-ids (what serve/bench_e2e.py
passes): the JSON list of token-id prompts as one left-padded batch, greedy until EOS or
--new-tokens, end to end; at batch 1 also with prompt lookup (HF's n-gram drafting, which HF runs
at batch 1 only). Writes each run's tokens (cut after EOS) for comparison. Runs on the first CUDA
device (the CPU when there is none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers


def seconds_of(model, input_ids, new_tokens: int, repeats: int = 5) -> float:
    def run():
        synchronize()
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        synchronize()
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(repeats))


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_prompts(model, prompts: list[list[int]], new_tokens: int, repeats: int, **lookup) -> dict:
    """Greedy `generate` of the prompts as one left-padded batch: median seconds, tokens cut after EOS."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def run():
        synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **lookup)
        synchronize()
        return time.perf_counter() - start, out[:, width:].tolist()

    run()
    timed = [run() for _ in range(repeats)]
    tokens = []
    for row in timed[0][1]:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:cut])
    seconds = statistics.median(t for t, _ in timed)
    count = sum(len(t) for t in tokens)
    return {"batch": len(prompts), "seconds": round(seconds, 4), "output_tokens": count,
            "tokens_per_s": round(count / seconds, 1), "tokens_per_s_per_user": round(count / seconds / len(prompts), 1),
            "tau": None, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="HF model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-ids", help="JSON list of token-id prompts: time them end to end instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=getattr(torch, args.dtype))
    model = model.to(device).eval()
    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompts = json.load(f)
        runs = [{"mode": "hf", **run_prompts(model, prompts, args.new_tokens, args.repeats)}]
        if len(prompts) == 1:
            runs.append({"mode": "hf_prompt_lookup", **run_prompts(model, prompts, args.new_tokens, args.repeats,
                                                                   prompt_lookup_num_tokens=10)})
        with open(args.out, "w") as f:
            json.dump({"device": device, "transformers": transformers.__version__, "torch": torch.__version__,
                       "runs": runs}, f)
        return
    rows = []
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device=device)
        full = seconds_of(model, ids, args.new_tokens)
        prefill = seconds_of(model, ids, 1)
        step = (full - prefill) / (args.new_tokens - 1)
        rows.append({"batch": batch, "context": args.context, "step_ms": step * 1e3})
        print(f"HF transformers {transformers.__version__} B={batch}: {step * 1e3:.3f} ms/step", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "transformers": transformers.__version__, "torch": torch.__version__, "decode": rows}, f, indent=2)


if __name__ == "__main__":
    main()
