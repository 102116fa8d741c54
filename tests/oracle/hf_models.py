"""Oracle (runs under Python 3.11 with torch + transformers): random tiny HF models and their outputs.

Reads one JSON request on stdin:
  {"model_type": "qwen3", "config": {...HF config fields...}, "seed": 0,
   "model_dir": "/tmp/x",            # save_pretrained() target (safetensors)
   "out": "/tmp/x.npz",              # where outputs go
   "inputs": [[token ids], ...],     # equal-length rows
   "hidden_layers": [1, 3],          # decoder layer ids whose raw outputs to return
   "dtypes": ["float32", "bfloat16"],
   "int_buffers": {"tid2eid": 8}}   # optional: integer tables to randomise (name suffix -> bound)
Creates the model from the config with every weight (parameters and saved buffers) drawn at random
(norm weights and layer scalars around 1, matrices scaled by 1/sqrt(fan_in)) so that nothing is
degenerate, saves it, reloads it in each dtype and writes `logits_<dtype>` [B,S,V] and
`hidden_<layer>_<dtype>` [B,S,H] as float32; the hidden states are the raw outputs of those
decoder layers (forward hooks, no final norm). Integer buffers named in `int_buffers` (e.g. a MoE
hash-routing table) get distinct random values in [0, bound) along their last axis. Composite
configs (e.g. "gemma4" with a text_config and a vision_config) work too: their causal-LM class
runs on the text inputs.
"""

import json
import sys

import numpy as np
import torch
import transformers


def checkpoint_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters, then the float tensor buffers save_pretrained writes (e.g. Gemma 4's layer_scalar).

    Scalar buffers (clipping bounds and the like) keep their initial values.
    """
    saved = set(model.state_dict())
    buffers = [(n, b) for n, b in model.named_buffers() if n in saved and b.is_floating_point() and b.ndim > 0]
    return sorted(model.named_parameters()) + sorted(buffers)


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in checkpoint_tensors(model):
            if p.ndim == 1 and ("norm" in name or name.endswith("layer_scalar")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def randomise_int_buffers(model: torch.nn.Module, bounds: dict[str, int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            bound = next((b for suffix, b in bounds.items() if name.endswith(suffix)), None)
            if bound is None or buf.is_floating_point():
                continue
            rows = buf.reshape(-1, buf.shape[-1])
            for row in rows:
                row.copy_(torch.randperm(bound, generator=gen)[:buf.shape[-1]])
            buf.copy_(rows.reshape(buf.shape))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list, wherever the family keeps it."""
    for path in ("model.layers", "model.language_model.layers", "language_model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"no decoder layer list in {type(model).__name__}")


def first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def main() -> None:
    req = json.load(sys.stdin)
    torch.manual_seed(req.get("seed", 0))
    config = transformers.AutoConfig.for_model(req["model_type"], **req["config"])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, req.get("seed", 0))
    randomise_int_buffers(model, req.get("int_buffers", {}), req.get("seed", 0))
    model.save_pretrained(req["model_dir"], safe_serialization=True)

    inputs = torch.tensor(req["inputs"], dtype=torch.long)
    out = {}
    for dtype_name in req.get("dtypes", ["float32"]):
        dtype = getattr(torch, dtype_name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=dtype)
        loaded.eval()
        captured = {}
        layers = decoder_layers(loaded)
        for layer in req.get("hidden_layers", []):
            layers[layer].register_forward_hook(
                lambda mod, args, output, layer=layer: captured.__setitem__(layer, first_tensor(output)))
        with torch.no_grad():
            res = loaded(input_ids=inputs, use_cache=False)
        out[f"logits_{dtype_name}"] = res.logits.float().numpy()
        for layer, hidden in captured.items():
            out[f"hidden_{layer}_{dtype_name}"] = hidden.float().numpy()
    np.savez(req["out"], **out)


if __name__ == "__main__":
    main()
