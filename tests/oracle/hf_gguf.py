"""Oracle (runs under Python 3.11 with torch + transformers): a GGUF model loaded by HF transformers.

Reads one JSON request on stdin:
  {"gguf": "/path/model.gguf",         # loaded with from_pretrained(folder, gguf_file=name)
   "out": "/tmp/x.npz",                # where outputs go
   "dtypes": ["float32", "bfloat16"],  # one load per dtype
   "inputs": [[token ids], ...],       # equal-length rows -> logits_<dtype> [B,S,V] as float32
   "generate": [[prompt ids], ...],    # greedy continuations, first dtype only -> generated_<i>
   "max_new_tokens": 48}
transformers dequantizes the file and undoes llama.cpp's q/k row order itself; generation uses
the generation config it derives from the file (its EOS), with do_sample=False.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers


def main() -> None:
    req = json.load(sys.stdin)
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
            if i == 0:
                for j, prompt in enumerate(req.get("generate", [])):
                    ids = torch.tensor([prompt], dtype=torch.long)
                    result = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=req["max_new_tokens"])
                    out[f"generated_{j}"] = result[0, len(prompt):].numpy()
    np.savez(req["out"], **out)


if __name__ == "__main__":
    main()
