"""DeepSpec-layout draft folders: config.json + model.safetensors (+ our sts.json).

config.json is the target's HF config with the draft's layer count and the draft fields
(block_size, mask_token_id, target_layer_ids, markov_rank, markov_head_type,
enable_confidence_head, confidence_head_with_markov; Eagle3: ttt_length, step_loss_decay).
Tensor names have no `model.` prefix; the frozen copies of the target's `embed_tokens` and
`lm_head` are checked against the target on load (a draft trained for another target is an
error) and written on export so DeepSpec and vLLM read our drafts too.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import save_file

from dspark_jax.checkpoint.hf import (CheckpointError, TensorSource, arch_from_hf_config, arch_to_hf_config,
                                      atomic_folder, fill_params, model_tensors, read_config_json)
from dspark_jax.config import DraftConfig
from dspark_jax.drafts import create_draft
from dspark_jax.models.common import as_dtype

SHARED = ("embed_tokens.weight", "lm_head.weight")


def deepspec_tensor_name(path: tuple) -> tuple[str, bool]:
    *module, leaf = (str(p) for p in path)
    return ".".join(module + ["weight" if leaf in ("kernel", "embedding") else leaf]), leaf == "kernel"


def draft_config_from_json(cfg: dict) -> DraftConfig:
    """Our DraftConfig from a DeepSpec draft config.json."""
    layer_ids = tuple(int(i) for i in cfg.get("target_layer_ids") or ())
    common = dict(target_layer_ids=layer_ids, intermediate_size=int(cfg["intermediate_size"]))
    if "ttt_length" in cfg:
        layers = int(cfg.get("draft_num_hidden_layers", cfg.get("num_hidden_layers", 1)))
        if layers != 1:
            raise CheckpointError(f"config.json draft_num_hidden_layers={layers}; Eagle3 drafts have 1 layer")
        return DraftConfig(kind="eagle3", block_size=int(cfg["ttt_length"]), num_layers=1, **common)
    rank = int(cfg.get("markov_rank", 0))
    confidence = bool(cfg.get("enable_confidence_head", False))
    if confidence and (rank == 0 or not cfg.get("confidence_head_with_markov", True)):
        raise CheckpointError("config.json: a confidence head without Markov features is not supported "
                              f"(markov_rank={rank}, confidence_head_with_markov="
                              f"{cfg.get('confidence_head_with_markov')})")
    kind = "dspark" if rank > 0 else "dflash"
    return DraftConfig(kind=kind, block_size=int(cfg["block_size"]), num_layers=int(cfg["num_hidden_layers"]),
                       mask_token_id=int(cfg["mask_token_id"]), markov_rank=max(rank, 1),
                       markov_head=str(cfg.get("markov_head_type", "vanilla")).lower(),
                       confidence_head=confidence, **common)


def draft_config_to_json(config: DraftConfig, target_arch) -> dict:
    base = arch_to_hf_config(target_arch)
    base["intermediate_size"] = config.intermediate_size or target_arch.intermediate_size
    base["target_layer_ids"] = list(config.target_layer_ids)
    if config.kind == "eagle3":
        base.update(num_hidden_layers=1, draft_num_hidden_layers=1, ttt_length=config.block_size,
                    step_loss_decay=0.8, architectures=["Qwen3Eagle3Model"])
        return base
    dspark = config.kind == "dspark"
    base.update(num_hidden_layers=config.num_layers, block_size=config.block_size,
                mask_token_id=config.mask_token_id, markov_rank=config.markov_rank if dspark else 0,
                markov_head_type=config.markov_head, enable_confidence_head=dspark and config.confidence_head,
                confidence_head_with_markov=True, num_anchors=512, architectures=["Qwen3DSparkModel"])
    return base


def _check_target_compatible(folder: Path, cfg: dict, target) -> None:
    arch = target.arch
    for field, ours in (("hidden_size", arch.hidden_size), ("vocab_size", arch.vocab_size)):
        if int(cfg.get(field, -1)) != ours:
            raise CheckpointError(f"{folder}/config.json {field}={cfg.get(field)}; the target has {ours}")


def _check_shared_tensors(folder: Path, source: TensorSource, target) -> None:
    """The draft's frozen embedding copy must be the target's (a few rows suffice to tell)."""
    if "embed_tokens.weight" not in source.location:
        return
    vocab = target.arch.vocab_size
    rows = np.array([0, vocab // 3, vocab // 2, vocab - 1])
    ours = np.asarray(target.embed(jnp.asarray(rows)), np.float32)
    theirs = np.asarray(source.get("embed_tokens.weight")[rows], np.float32)
    scale = np.abs(ours).max() + 1e-12
    if np.abs(ours - theirs).max() > 2e-2 * scale:
        raise CheckpointError(f"{folder}: the draft's embed_tokens differ from the target's embedding; "
                              "was it trained for another target?")


def load_deepspec_draft(folder: str | Path, target, *, dtype=None):
    """Load a DeepSpec-layout DSpark/DFlash/Eagle3 folder as a draft for `target`."""
    folder = Path(folder)
    cfg = read_config_json(folder)
    _check_target_compatible(folder, cfg, target)
    config = draft_config_from_json(cfg)
    layer_arch = arch_from_hf_config(cfg)
    if layer_arch.head_dim != target.arch.head_dim or layer_arch.num_kv_heads != target.arch.num_kv_heads:
        raise CheckpointError(f"{folder}/config.json attention shape (heads {layer_arch.num_heads}/"
                              f"{layer_arch.num_kv_heads}, head_dim {layer_arch.head_dim}) differs from the target's")
    dtype = as_dtype(dtype or target.dtype)
    abstract = nnx.eval_shape(lambda: create_draft(config, target, dtype=dtype))
    source = TensorSource(folder)
    _check_shared_tensors(folder, source, target)
    draft = fill_params(abstract, source, dtype=dtype, name_of=deepspec_tensor_name,
                        optional=lambda name: name in SHARED)
    sts = folder / "sts.json"
    if sts.is_file() and hasattr(draft, "sts_temperatures"):
        temps = tuple(float(t) for t in json.loads(sts.read_text())["temperatures"])
        if len(temps) != config.block_size or min(temps) <= 0:
            raise CheckpointError(f"{sts}: expected {config.block_size} positive temperatures, got {temps}")
        draft.sts_temperatures = temps
    return draft


def save_deepspec_draft(draft, target, folder: str | Path, *, shared: bool = True) -> Path:
    """Export a draft in DeepSpec's layout (atomically), with STS temperatures when it has them.

    shared=False leaves out the target's embedding and lm_head copies (the loader takes them from
    the target), which is most of a small draft's bytes.
    """
    tensors = model_tensors(draft, name_of=deepspec_tensor_name)
    if shared:
        tensors["embed_tokens.weight"] = target.embed_tokens.embedding[...]
        tensors["lm_head.weight"] = (target.embed_tokens.embedding[...] if target.lm_head is None
                                     else target.lm_head.kernel[...].T)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(draft_config_to_json(draft.config, target.arch), indent=2))
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if hasattr(draft, "sts_temperatures"):
            (tmp / "sts.json").write_text(json.dumps({"temperatures": list(draft.sts_temperatures)}))
    return Path(folder)
