"""HF transformers (PyTorch) greedy decoding speed, for the side-by-side ratio in docs/benchmarks.md.

    python serve/bench_hf.py --folder SMOLLM2_HF_FOLDER --out hf.json [--batches 1,32] [--context 1024]

Times `generate` with a static number of new tokens and subtracts a one-token run (prefill), so the
figure is per decode step. Runs on the first CUDA device in bf16.
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
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="HF model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16).cuda().eval()
    rows = []
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device="cuda")
        full = seconds_of(model, ids, args.new_tokens)
        prefill = seconds_of(model, ids, 1)
        step = (full - prefill) / (args.new_tokens - 1)
        rows.append({"batch": batch, "context": args.context, "step_ms": step * 1e3})
        print(f"HF transformers {transformers.__version__} B={batch}: {step * 1e3:.3f} ms/step", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "transformers": transformers.__version__,
                   "torch": torch.__version__, "decode": rows}, f, indent=2)


if __name__ == "__main__":
    main()
