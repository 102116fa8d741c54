"""Oracle (runs under Python 3.11 with torch + transformers): a GGUF model loaded by HF transformers.

Reads one JSON request on stdin:
  {"gguf": "/path/model.gguf",         # loaded with from_pretrained(folder, gguf_file=name)
   "out": "/tmp/x.npz",                # where outputs go
   "dtypes": ["float32", "bfloat16"],  # one load per dtype
   "inputs": [[token ids], ...],       # equal-length rows -> logits_<dtype> [B,S,V] as float32
   "generate": [[prompt ids], ...],    # greedy continuations, first dtype only -> generated_<i>,
                                       # and top2_values_<i> / top2_ids_<i> [len, 2] of each step's logits
   "max_new_tokens": 48}
transformers dequantizes the file and undoes llama.cpp's q/k row order itself; generation uses
the generation config it derives from the file (its EOS), with do_sample=False. The prompts are
generated as one left-padded batch; each continuation ends at its first EOS (included).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers


def main() -> None:
    req = json.load(sys.stdin)
    # one thread: on a busy 2-core machine two threads' synchronisation makes generation 5x slower
    torch.set_num_threads(1)
    path = Path(req["gguf"])
    out = {}
    for i, dtype_name in enumerate(req.get("dtypes", ["float32"])):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype_name))
        model.eval()
        with torch.no_grad():
            if req.get("inputs"):
                logits = model(input_ids=torch.tensor(req["inputs"], dtype=torch.long), use_cache=False).logits
                out[f"logits_{dtype_name}"] = logits.float().numpy()
            if i == 0 and req.get("generate"):
                out.update(generate(model, req["generate"], req["max_new_tokens"]))
    np.savez(req["out"], **out)


def generate(model, prompts: list[list[int]], max_new_tokens: int) -> dict[str, np.ndarray]:
    width = max(map(len, prompts))
    pad = model.generation_config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    result = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                            output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(result.logits, dim=1).float().topk(2, dim=-1)  # [B, steps, 2]
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    out = {}
    for j in range(len(prompts)):
        tokens = result.sequences[j, width:].tolist()
        length = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
        out[f"generated_{j}"] = np.asarray(tokens[:length], dtype=np.int64)
        out[f"top2_values_{j}"] = top2.values[j, :length].numpy()
        out[f"top2_ids_{j}"] = top2.indices[j, :length].numpy()
    return out


if __name__ == "__main__":
    main()
