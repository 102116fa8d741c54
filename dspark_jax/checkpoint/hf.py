"""HF model folders: config.json + safetensors (single file or sharded with an index).

Our module paths mirror HF names: `layers.3.self_attn.o_proj.kernel` ↔ `model.layers.3.self_attn.
o_proj.weight` (transposed: HF Linear weights are [out, in]), `embed_tokens.embedding` ↔
`model.embed_tokens.weight`, top-level `lm_head` without the `model.` prefix. A fused parameter
(`self_attn.qkv_proj`, `mlp.gate_up_proj`) is stored as its parts' tensors under their own names
(`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`): loading joins them, saving splits them
(`stored_parts` in tensors.py). A multimodal Gemma 4
checkpoint (`gemma4`) keeps the same text names under `model.language_model.` instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.flax import save_file

from dspark_jax.checkpoint.deepseek_v4 import arch_from_config, arch_to_config, load_v4_target
from dspark_jax import sharding
from dspark_jax.checkpoint.tensors import (CheckpointError, JoinedParts, TensorSource, atomic_folder, read_config_json,
                                          stored_arrays, stored_parts, to_device)
from dspark_jax.config import (ConfigError, DeepseekV4Arch, Gemma4Arch, LlamaArch, RopeScaling, TargetArch,
                               gemma4_default_layer_types)
from dspark_jax.models import abstract_target
from dspark_jax.models.common import as_dtype


# --------------------------------------------------------------------------------------------
# config.json <-> architecture

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GEMMA4_TYPES = ("gemma4_text", "gemma4")


def _rope_scaling_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind not in ("llama3", "linear", "yarn"):
        raise ConfigError(f"config.json rope_type={kind!r}; supported: default, llama3, linear, yarn")
    if scaling.get("mscale") or scaling.get("mscale_all_dim"):
        raise ConfigError("config.json rope_parameters: yarn mscale/mscale_all_dim is not supported")
    fields = {k: float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast",
                                              "beta_slow", "attention_factor") if scaling.get(k) is not None}
    original = scaling.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
    return theta, RopeScaling(kind=kind, original_max_position_embeddings=int(original),
                              truncate=bool(scaling.get("truncate", True)), **fields)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def arch_from_hf_config(cfg: dict) -> TargetArch:
    """Parse an HF config.json dict into our architecture dataclass."""
    model_type = cfg.get("model_type")
    if model_type in GEMMA4_TYPES:
        return _gemma4_arch_from_hf(cfg)
    if model_type == "deepseek_v4":
        return arch_from_config(cfg)
    if model_type not in LLAMA_TYPES:
        raise ConfigError(f"config.json model_type={model_type!r}; supported: "
                          f"{list(LLAMA_TYPES + GEMMA4_TYPES + ('deepseek_v4',))}")
    if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
        raise ConfigError(f"config.json: sliding-window attention for model_type={model_type!r} is not supported")
    theta, scaling = _rope_scaling_from_hf(cfg)
    heads = int(cfg["num_attention_heads"])
    return LlamaArch(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        attention_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        bos_token_id=int(cfg["bos_token_id"]) if cfg.get("bos_token_id") is not None else -1,
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        model_type=model_type,
    )


def arch_to_hf_config(arch: TargetArch) -> dict:
    """An HF config.json dict that transformers reads back to the same architecture."""
    if isinstance(arch, Gemma4Arch):
        return _gemma4_arch_to_hf(arch)
    if isinstance(arch, DeepseekV4Arch):
        return arch_to_config(arch)
    if not isinstance(arch, LlamaArch):
        raise ConfigError(f"cannot write config.json for {type(arch).__name__}")
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        rope = {"rope_type": s.kind, "rope_theta": arch.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.kind == "yarn":
            rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
            if s.attention_factor > 0:
                rope.update(attention_factor=s.attention_factor)
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    eos = list(arch.eos_token_ids)
    return {
        "architectures": [architectures[arch.model_type]],
        "model_type": arch.model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rope_parameters": rope,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": arch.attention_bias,
        "max_position_embeddings": arch.max_position_embeddings,
        "bos_token_id": arch.bos_token_id if arch.bos_token_id >= 0 else None,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }


# Gemma 4. HF's defaults for fields a config.json may leave out (Gemma4TextConfig).
_GEMMA4_ROPE_DEFAULTS = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


# (field, HF default, the feature it turns on, the value that keeps it off). HF turns each on when the
# field is truthy; per-layer inputs are on by default.
_GEMMA4_UNSUPPORTED = (
    ("enable_moe_block", False, "MoE blocks", "false"),
    ("num_kv_shared_layers", 0, "KV-sharing layers", "0"),
    ("hidden_size_per_layer_input", 256, "per-layer inputs", "0 or null"),
)


def _gemma4_rope(params: dict, layer_type: str, used: bool) -> tuple[float, float]:
    """(theta, partial rotary factor) of one layer type's `rope_parameters` entry.

    HF needs an entry only for the layer types the model has; an unused one gets HF's default.
    """
    entry = params.get(layer_type, None if used else _GEMMA4_ROPE_DEFAULTS[layer_type])
    if not isinstance(entry, dict):
        raise ConfigError(f"config.json rope_parameters[{layer_type!r}] is missing; expected a dict with "
                          "rope_type and rope_theta")
    kind = entry.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ConfigError(f"config.json rope_parameters[{layer_type!r}].rope_type={kind!r}; supported for "
                          "Gemma 4: default, proportional")
    if float(entry.get("factor", 1.0)) != 1.0:
        raise ConfigError(f"config.json rope_parameters[{layer_type!r}].factor={entry['factor']!r}; "
                          "only 1.0 (no frequency scaling) is supported for Gemma 4")
    # HF's "default" RoPE ignores partial_rotary_factor and turns the whole head.
    partial = float(entry.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
    return float(entry["rope_theta"]), partial


def _gemma4_full_layer_shape(text: dict, layer_types: tuple[str, ...], k_eq_v: bool) -> tuple[int, int | None]:
    """(global_head_dim, num_global_kv_heads) from either spelling HF uses.

    Released checkpoints say `global_head_dim` / `num_global_key_value_heads`; transformers 5.x
    re-saves them as `per_layer_config`, overrides keyed by full-attention layer index.
    """
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        global_kv = text.get("num_global_key_value_heads")
        # HF applies the global KV head count only to K=V layers.
        return int(text.get("global_head_dim", 512)), int(global_kv) if k_eq_v and global_kv is not None else None
    shapes = set()
    for key, override in per_layer.items():
        layer = int(key)
        if not 0 <= layer < len(layer_types) or layer_types[layer] != "full_attention":
            raise ConfigError(f"config.json per_layer_config[{key!r}]: overrides are supported only on "
                              "full-attention layers")
        extra = set(override) - {"head_dim", "num_key_value_heads"}
        if extra:
            raise ConfigError(f"config.json per_layer_config[{key!r}] sets {sorted(extra)}; supported: "
                              "head_dim, num_key_value_heads")
        shapes.add((override.get("head_dim"), override.get("num_key_value_heads")))
    full_layers = sum(t == "full_attention" for t in layer_types)
    if len(shapes) != 1 or len(per_layer) != full_layers:
        raise ConfigError(f"config.json per_layer_config: expected the same override on all {full_layers} "
                          f"full-attention layers, got {per_layer}")
    ((head_dim, kv_heads),) = shapes
    base_kv = int(text.get("num_key_value_heads", 4))
    head_dim = int(head_dim) if head_dim is not None else int(text.get("head_dim", 256))
    return head_dim, int(kv_heads) if kv_heads is not None and int(kv_heads) != base_kv else None


def _gemma4_arch_from_hf(cfg: dict) -> Gemma4Arch:
    text = cfg.get("text_config") if cfg["model_type"] == "gemma4" else cfg
    if not isinstance(text, dict):
        raise ConfigError("config.json model_type='gemma4' has no text_config; expected the text decoder's config")
    for name, hf_default, feature, off in _GEMMA4_UNSUPPORTED:
        if text.get(name, hf_default):
            raise ConfigError(f"config.json {name}={text.get(name, hf_default)!r}: Gemma 4 {feature} are not "
                              f"supported; expected {off}")
    # use_double_wide_mlp only widens the MLPs of KV-sharing layers, which are rejected above.
    if text.get("use_bidirectional_attention") not in (None, "vision"):
        raise ConfigError(f"config.json use_bidirectional_attention={text['use_bidirectional_attention']!r}; "
                          "supported: null, or 'vision' (text tokens stay causal)")
    num_layers = int(text.get("num_hidden_layers", 30))
    layer_types = list(text.get("layer_types") or gemma4_default_layer_types(num_layers))
    # HF forces the last layer to full attention whatever config.json says, so the weights expect it.
    layer_types[-1] = "full_attention"
    rope = text.get("rope_parameters") or _GEMMA4_ROPE_DEFAULTS
    theta_sliding, partial_sliding = _gemma4_rope(rope, "sliding_attention", "sliding_attention" in layer_types)
    theta_full, partial_full = _gemma4_rope(rope, "full_attention", True)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    global_head_dim, global_kv = _gemma4_full_layer_shape(text, tuple(layer_types), k_eq_v)
    cap = text.get("final_logit_softcapping")
    eos = cfg.get("eos_token_id", text.get("eos_token_id", 1))
    bos = cfg.get("bos_token_id", text.get("bos_token_id", 2))
    return Gemma4Arch(
        vocab_size=int(text.get("vocab_size", 262144)),
        hidden_size=int(text.get("hidden_size", 2304)),
        intermediate_size=int(text.get("intermediate_size", 9216)),
        num_layers=num_layers,
        num_heads=int(text.get("num_attention_heads", 8)),
        num_kv_heads=int(text.get("num_key_value_heads", 4)),
        head_dim=int(text.get("head_dim", 256)),
        global_head_dim=global_head_dim,
        num_global_kv_heads=global_kv,
        layer_types=tuple(layer_types),
        sliding_window=int(text.get("sliding_window", 512)),
        rope_theta_sliding=theta_sliding,
        rope_theta_full=theta_full,
        partial_rotary_factor_sliding=partial_sliding,
        partial_rotary_factor_full=partial_full,
        attention_k_eq_v=k_eq_v,
        attention_bias=bool(text.get("attention_bias", False)),
        final_logit_softcapping=float(cap) if cap is not None else None,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        bos_token_id=int(bos) if bos is not None else -1,
        eos_token_ids=_eos_ids(eos),
    )


def _gemma4_arch_to_hf(arch: Gemma4Arch) -> dict:
    def rope(theta: float, partial: float) -> dict:
        if partial == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "proportional", "partial_rotary_factor": partial, "rope_theta": theta}

    eos = list(arch.eos_token_ids)
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "global_head_dim": arch.global_head_dim,
        "num_global_key_value_heads": arch.num_global_kv_heads,
        "attention_k_eq_v": arch.attention_k_eq_v,
        "layer_types": list(arch.layer_types),
        "sliding_window": arch.sliding_window,
        "rope_parameters": {
            "sliding_attention": rope(arch.rope_theta_sliding, arch.partial_rotary_factor_sliding),
            "full_attention": rope(arch.rope_theta_full, arch.partial_rotary_factor_full),
        },
        "final_logit_softcapping": arch.final_logit_softcapping,
        "rms_norm_eps": arch.rms_norm_eps,
        "hidden_activation": arch.hidden_activation,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": arch.attention_bias,
        "max_position_embeddings": arch.max_position_embeddings,
        "bos_token_id": arch.bos_token_id if arch.bos_token_id >= 0 else None,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "enable_moe_block": False,
    }


# --------------------------------------------------------------------------------------------
# tensors


def hf_tensor_name(path: tuple, *, prefix: str = "model.") -> tuple[str, bool]:
    """(HF tensor name, whether our array is the transpose of HF's) for a module path.

    `prefix` is where the decoder lives in the checkpoint (`model.`, or `model.language_model.` in
    a multimodal Gemma 4); `lm_head` is always top-level.
    """
    *module, leaf = (str(p) for p in path)
    name = ".".join(module + ["weight" if leaf in ("kernel", "embedding") else leaf])
    if module and module[0] == "lm_head":
        return name, leaf == "kernel"
    return prefix + name, leaf == "kernel"


# A multimodal Gemma 4 checkpoint: the text decoder under its own prefix, plus vision and audio
# towers and their projections into the text embedding space, which a text target does not use.
GEMMA4_MULTIMODAL_PREFIX = "model.language_model."
GEMMA4_NON_TEXT_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def hf_checkpoint_layout(cfg: dict) -> tuple[Callable[[tuple], tuple[str, bool]], Callable[[str], bool]]:
    """(module path -> tensor name, tensors to skip) for an HF folder with this config.json."""
    if cfg.get("model_type") == "gemma4":
        return (functools.partial(hf_tensor_name, prefix=GEMMA4_MULTIMODAL_PREFIX),
                lambda name: name.startswith(GEMMA4_NON_TEXT_PREFIXES))
    return hf_tensor_name, lambda name: False


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def fill_params(abstract_model, source: TensorSource, *, dtype,
                name_of: Callable[[tuple], tuple[str, bool]] = hf_tensor_name,
                optional: Callable[[str], bool] = lambda name: False, mesh=None):
    """Materialise an `nnx.eval_shape` model from checkpoint tensors, checking names and shapes.

    Every parameter must be present with the right shape; every checkpoint tensor must be used
    (except names `optional(name)` accepts, e.g. a tied lm_head stored anyway). With a mesh each
    parameter is built in its shards (see dspark_jax.sharding), each device reading its own block.
    """
    shardings = sharding.shardings(abstract_model, mesh) if mesh is not None else {}
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    missing, misshaped, filled = [], [], []
    used = set()
    for path, var in flat:
        stored, arrays = stored_parts(path, var), []
        for part_path, part_shape in stored:
            name, transpose = name_of(part_path)
            if name not in source.location:
                missing.append(name)
                continue
            shape = source.shape(name)
            expected = tuple(reversed(part_shape)) if transpose else part_shape
            if shape != expected:
                misshaped.append(f"{name}: checkpoint {list(shape)}, expected {list(expected)}")
                continue
            array = source.view(name)
            arrays.append(array.T if transpose else array)
            used.add(name)
        if len(arrays) < len(stored):  # reported below
            filled.append((path, var))
            continue
        parts = var.get_metadata().get("tensor_parts")
        array = arrays[0] if parts is None else JoinedParts(parts, arrays, tuple(var.shape))
        target_dtype = dtype if jnp.issubdtype(var.dtype, jnp.floating) else var.dtype
        filled.append((path, var.replace(to_device(array, target_dtype, shardings.get(path)))))
    unexpected = sorted(n for n in source.names() - used
                        if not n.endswith(IGNORED_SUFFIXES) and not optional(n))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {sorted(missing)[:20]}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {misshaped[:20]}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_hf_target(folder: str | Path, *, dtype="bfloat16", mesh=None):
    """Load an HF model folder (config.json + safetensors) as our target module (onto `mesh`, if given)."""
    cfg = read_config_json(folder)
    if cfg.get("model_type") == "deepseek_v4":  # official names, quantized formats, stacked experts
        return load_v4_target(folder, dtype=dtype, mesh=mesh)
    arch = arch_from_hf_config(cfg)
    name_of, skipped = hf_checkpoint_layout(cfg)
    dtype = as_dtype(dtype)
    model = abstract_target(arch, dtype=dtype)
    tied = getattr(arch, "tie_word_embeddings", False)
    return fill_params(model, TensorSource(folder), dtype=dtype, name_of=name_of,
                       optional=lambda name: skipped(name) or (tied and name == "lm_head.weight"), mesh=mesh)


def model_tensors(model, name_of: Callable[[tuple], tuple[str, bool]] = hf_tensor_name) -> dict[str, jax.Array]:
    """Our parameters under HF names and layouts (fused parameters split back into their parts)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for (part_path, _), value in zip(stored_parts(path, var), stored_arrays(var, var[...])):
            name, transpose = name_of(part_path)
            out[name] = jnp.asarray(value.T if transpose else value)
    return out


def save_hf_target(model, folder: str | Path, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra text files) atomically."""
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(arch_to_hf_config(model.arch), indent=2))
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)
