"""DeepSeek-V4 checkpoints: config.json, official tensor names, FP8/FP4 tensors, loading and saving.

Names. Our module paths are the official names (`layers.3.attn.wq_a.weight`, `hc_head_fn`, ...);
routed experts are stacked in the model and stored per expert (`layers.3.ffn.experts.17.w1.weight`).
HF transformers' `save_pretrained` writes the same names under `model.`, except `embed_tokens`,
`hc_head.hc_{fn,base,scale}`, and the attention's `kv_norm` as `attn.norm`; `canonical_name` folds
those back. `mtp.K.*` are the DSpark draft blocks; a checkpoint's `mtp.*` are skipped when the
architecture has none (as HF does).

Formats. A quantized linear is `X.weight` (F8_E4M3 [out, in]) + `X.scale` (F8_E8M0
[⌈out/128⌉, ⌈in/128⌉]); a routed expert matrix is `X.weight` (I8 or U8 [out, in/2], two e2m1 codes
per byte, low nibble first) + `X.scale` (F8_E8M0 [out, in/32]). With `weight_format="fp8"` they
stay quantized in device memory; loading the same files into a `"dense"` architecture dequantizes
them on the host (the NumPy functions below are the reference the device-side ones are tested
against). config.json's `quantization_config` says which format a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dspark_jax import sharding
from dspark_jax.checkpoint.tensors import CheckpointError, TensorSource, atomic_folder, read_config_json, to_device
from dspark_jax.config import ConfigError, DeepseekV4Arch, RopeScaling, deepseek_v4_layer_types
from dspark_jax.models import abstract_target
from dspark_jax.models.common import as_dtype
from dspark_jax.models.quant import FP4_GROUP, FP8_BLOCK, Buffer

# --------------------------------------------------------------------------------------------
# config.json


def _hf_layer_types(cfg: dict, n: int, csa: int, hca: int) -> tuple[str, ...]:
    if cfg.get("layer_types") is not None:
        return tuple(cfg["layer_types"])
    if cfg.get("compress_ratios") is not None:
        return deepseek_v4_layer_types(tuple(int(r) for r in cfg["compress_ratios"])[:n], csa_ratio=csa,
                                       hca_ratio=hca)
    # HF's default (V4-Pro's pattern): two HCA layers, then CSA and HCA alternating.
    rest = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    return tuple((["heavily_compressed_attention"] * min(n, 2) + rest)[:n])


def _hash_layers(cfg: dict, n: int) -> int:
    kinds = cfg.get("mlp_layer_types")
    if kinds is None:
        return min(n, int(cfg.get("num_hash_layers", 3)))
    count = sum(1 for k in kinds if k == "hash_moe")
    if list(kinds) != ["hash_moe"] * count + ["moe"] * (len(kinds) - count):
        raise ConfigError(f"config.json mlp_layer_types={kinds}; supported: 'hash_moe' layers first, then 'moe'")
    return count


def _rope(cfg: dict) -> tuple[float, float, RopeScaling | None]:
    """(θ of window-only layers, θ of compressed layers, YaRN of compressed layers)."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, compress = params["main"], params["compress"]
    else:  # a flat dict (or the legacy `rope_scaling`) describes the compressed layers' scaling
        flat = {**(cfg.get("rope_scaling") or {}), **{k: v for k, v in params.items() if not isinstance(v, dict)}}
        main = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
        compress = {**flat, "rope_theta": cfg.get("compress_rope_theta", 160000.0)}
    if main.get("rope_type", "default") != "default":
        raise ConfigError(f"config.json rope_parameters.main.rope_type={main['rope_type']!r}; expected 'default'")
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"config.json rope_parameters.compress.rope_type={kind!r}; supported: default, yarn")
    scaling = None
    if kind == "yarn":
        # V4 never scales cos/sin by YaRN's mscale (HF forces attention_factor 1).
        scaling = RopeScaling(kind="yarn", factor=float(compress["factor"]),
                              original_max_position_embeddings=int(compress["original_max_position_embeddings"]),
                              beta_fast=float(compress.get("beta_fast", 32.0)),
                              beta_slow=float(compress.get("beta_slow", 1.0)),
                              attention_factor=float(compress.get("attention_factor", 1.0)),
                              truncate=bool(compress.get("truncate", True)))
    return float(main.get("rope_theta", 10000.0)), float(compress.get("rope_theta", 160000.0)), scaling


def _weight_format(cfg: dict) -> str:
    quant = cfg.get("quantization_config")
    if not quant:
        return "dense"
    expert_dtype = quant.get("expert_dtype", cfg.get("expert_dtype"))
    checks = (("quant_method", quant.get("quant_method"), "fp8"), ("fmt", quant.get("fmt", "e4m3"), "e4m3"),
              ("scale_fmt", quant.get("scale_fmt"), "ue8m0"),
              ("weight_block_size", list(quant.get("weight_block_size") or []), [FP8_BLOCK, FP8_BLOCK]),
              ("expert_dtype", expert_dtype, "fp4"))
    for key, value, expected in checks:
        if value != expected:
            raise ConfigError(f"config.json quantization_config.{key}={value!r}; supported: {expected!r} "
                              "(FP8 e4m3 linears with ue8m0 128x128 scales, FP4 experts)")
    return "fp8"


def arch_from_config(cfg: dict) -> DeepseekV4Arch:
    """DeepseekV4Arch from a `deepseek_v4` config.json (DeepSeek's own fields or HF's spelling)."""
    unsupported = (("scoring_func", "sqrtsoftplus"), ("hidden_act", "silu"), ("num_key_value_heads", 1),
                   ("n_shared_experts", 1), ("attention_bias", False), ("mlp_bias", False),
                   ("tie_word_embeddings", False))
    for key, expected in unsupported:
        if key in cfg and cfg[key] != expected:
            raise ConfigError(f"config.json {key}={cfg[key]!r}; DeepSeek-V4 support expects {expected!r}")
    n = int(cfg.get("num_hidden_layers", 43))
    rates = cfg.get("compress_rates") or {}
    csa = int(rates.get("compressed_sparse_attention", cfg.get("compress_rate_csa", 4)))
    hca = int(rates.get("heavily_compressed_attention", cfg.get("compress_rate_hca", 128)))
    head_dim = int(cfg.get("head_dim", 512))
    if cfg.get("qk_rope_head_dim") is not None:
        rope_head_dim = int(cfg["qk_rope_head_dim"])
    else:
        rope_head_dim = int(head_dim * float(cfg.get("partial_rotary_factor") or 64 / 512))
    theta, compress_theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id", 1)
    dspark = int(cfg.get("dspark_block_size") or 0)
    return DeepseekV4Arch(
        vocab_size=int(cfg.get("vocab_size", 129280)),
        hidden_size=int(cfg.get("hidden_size", 4096)),
        num_layers=n,
        num_heads=int(cfg.get("num_attention_heads", 64)),
        head_dim=head_dim,
        rope_head_dim=rope_head_dim,
        q_lora_rank=int(cfg.get("q_lora_rank", 1024)),
        o_groups=int(cfg.get("o_groups", 8)),
        o_lora_rank=int(cfg.get("o_lora_rank", 1024)),
        layer_types=_hf_layer_types(cfg, n, csa, hca),
        sliding_window=int(cfg.get("sliding_window", 128)),
        csa_ratio=csa,
        hca_ratio=hca,
        index_n_heads=int(cfg.get("index_n_heads", 64)),
        index_head_dim=int(cfg.get("index_head_dim", 128)),
        index_topk=int(cfg.get("index_topk", 512)),
        n_routed_experts=int(cfg.get("n_routed_experts", 256)),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 6)),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 2048)),
        num_hash_layers=_hash_layers(cfg, n),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
        swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
        hc_mult=int(cfg.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(cfg.get("hc_eps", 1e-6)),
        rope_theta=theta,
        compress_rope_theta=compress_theta,
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 1048576)),
        bos_token_id=int(cfg["bos_token_id"]) if cfg.get("bos_token_id") is not None else -1,
        eos_token_ids=tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        weight_format=_weight_format(cfg),
        dspark_block_size=dspark,
        dspark_noise_token_id=int(cfg.get("dspark_noise_token_id", -1)) if dspark else -1,
        dspark_target_layer_ids=tuple(int(i) for i in cfg.get("dspark_target_layer_ids") or ()) if dspark else (),
        dspark_markov_rank=int(cfg.get("dspark_markov_rank") or 0) if dspark else 0,
    )


def arch_to_config(arch: DeepseekV4Arch) -> dict:
    """config.json in DeepSeek's own spelling (which HF transformers also reads)."""
    ratios = [arch.compress_ratio(i) for i in range(arch.num_layers)]
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": 1, "head_dim": arch.head_dim,
        "qk_rope_head_dim": arch.rope_head_dim, "q_lora_rank": arch.q_lora_rank, "o_groups": arch.o_groups,
        "o_lora_rank": arch.o_lora_rank, "sliding_window": arch.sliding_window,
        "index_n_heads": arch.index_n_heads, "index_head_dim": arch.index_head_dim, "index_topk": arch.index_topk,
        "n_routed_experts": arch.n_routed_experts, "num_experts_per_tok": arch.num_experts_per_tok,
        "moe_intermediate_size": arch.moe_intermediate_size, "n_shared_experts": 1,
        "num_hash_layers": arch.num_hash_layers, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
        "routed_scaling_factor": arch.routed_scaling_factor, "swiglu_limit": arch.swiglu_limit,
        "hc_mult": arch.hc_mult, "hc_sinkhorn_iters": arch.hc_sinkhorn_iters, "hc_eps": arch.hc_eps,
        "rope_theta": arch.rope_theta, "compress_rope_theta": arch.compress_rope_theta,
        "rms_norm_eps": arch.rms_norm_eps, "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": arch.bos_token_id if arch.bos_token_id >= 0 else None,
        "eos_token_id": list(arch.eos_token_ids) if len(arch.eos_token_ids) > 1 else arch.eos_token_ids[0],
        "num_nextn_predict_layers": arch.num_mtp_layers,
    }
    if (arch.csa_ratio, arch.hca_ratio) == (4, 128):
        cfg["compress_ratios"] = ratios
    else:  # per-layer ratios are only readable as 0/4/128; other ratios need HF's spelling
        cfg["layer_types"] = list(arch.layer_types)
        cfg["compress_rates"] = {"compressed_sparse_attention": arch.csa_ratio,
                                 "heavily_compressed_attention": arch.hca_ratio}
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        cfg["rope_scaling"] = {"type": "yarn", "factor": s.factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings,
                               "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
    if arch.weight_format == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        cfg["expert_dtype"] = "fp4"
    if arch.dspark_block_size:
        cfg.update(dspark_block_size=arch.dspark_block_size, dspark_noise_token_id=arch.dspark_noise_token_id,
                   dspark_target_layer_ids=list(arch.dspark_target_layer_ids),
                   dspark_markov_rank=arch.dspark_markov_rank)
    return cfg


# --------------------------------------------------------------------------------------------
# names

_HF_RENAMES = (
    (re.compile(r"^embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    # HF maps every `.norm.` to `.kv_norm.` on load and back on save, so the attention's own
    # kv_norm comes out as `attn.norm` (the compressors' `compressor.norm` is unaffected).
    (re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
)


def canonical_name(name: str) -> str:
    """The official name of a checkpoint tensor, whether or not HF transformers saved it."""
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, replacement in _HF_RENAMES:
        name = pattern.sub(replacement, name)
    return name


def official_name(path: tuple) -> str:
    """Official tensor name of a module path (routed experts: with `{expert}` to fill in)."""
    parts = [str(p) for p in path]
    if parts[-1] == "embedding":
        parts[-1] = "weight"
    if "experts" in parts and parts[parts.index("experts") - 1] == "ffn":
        at = parts.index("experts") + 1
        parts.insert(at, "{expert}")
    return ".".join(parts)


# --------------------------------------------------------------------------------------------
# NumPy reference formats


def e8m0_np(scale: np.ndarray) -> np.ndarray:
    return np.asarray(scale).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)


def dequantize_fp8_np(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [out, in] of F8_E4M3 codes with 128x128 ue8m0 block scales (bytes or F8_E8M0)."""
    w = np.asarray(codes).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = e8m0_np(scale)
    s = np.repeat(np.repeat(s, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
    return w * s[..., :w.shape[-2], :w.shape[-1]]


def dequantize_fp4_np(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [..., out, in] of e2m1 codes packed two per byte (low nibble first), e8m0 per 32."""
    u8 = np.asarray(packed).view(np.uint8)
    nibbles = np.stack([u8 & 0xF, u8 >> 4], axis=-1).reshape(*u8.shape[:-1], 2 * u8.shape[-1])
    values = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return values * np.repeat(e8m0_np(scale), FP4_GROUP, axis=-1)


# --------------------------------------------------------------------------------------------
# loading

# What each kind of model variable accepts from a checkpoint.
_ACCEPTED = {"fp8": ("F8_E4M3",), "fp4": ("I8", "U8"), "scale": ("F8_E8M0", "U8"), "int": ("I64", "I32"),
             "float": ("F32", "BF16", "F16")}
_WHAT = {"fp8": "FP8 e4m3 codes", "fp4": "packed FP4 codes", "scale": "e8m0 scales", "int": "an integer table",
         "float": "a float tensor"}


def _kind(var, name: str) -> str:
    if not isinstance(var, Buffer):
        return "float"
    if name.endswith(".scale"):
        return "scale"
    if var.dtype == jnp.float8_e4m3fn:
        return "fp8"
    return "fp4" if var.dtype == jnp.uint8 else "int"


class _Reader:
    """Reads the tensors a model needs, recording every problem instead of stopping at the first."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.names = {canonical_name(n): n for n in source.names()}
        if len(self.names) != len(source.names()):
            raise CheckpointError("checkpoint names collide once HF's `model.` spelling is folded back; "
                                  "expected one copy of each tensor")
        self.used: set[str] = set()
        self.problems: list[str] = []

    def tensor(self, name: str, kind: str, shape: tuple) -> np.ndarray | None:
        if kind == "float" and (name[: -len("weight")] + "scale") in self.names and name.endswith(".weight"):
            return self._dequantized(name, shape)
        if name not in self.names:
            self.problems.append(f"missing: {name}")
            return None
        raw = self.names[name]
        self.used.add(name)
        dtype, actual = self.source.dtype(raw), tuple(self.source.shape(raw))
        if dtype not in _ACCEPTED[kind]:
            self.problems.append(f"{raw}: dtype {dtype}; expected {_WHAT[kind]} ({' or '.join(_ACCEPTED[kind])})")
            return None
        if actual != shape:
            self.problems.append(f"{raw}: shape {list(actual)}, expected {list(shape)}")
            return None
        array = self.source.view(raw)  # a memory map: a mesh's devices read their own blocks
        return array.view(np.uint8) if kind in ("fp4", "scale") else array

    def _dequantized(self, name: str, shape: tuple) -> np.ndarray | None:
        """A dense parameter from a quantized `.weight` + `.scale` pair (the dequantized path)."""
        scale = name[: -len("weight")] + "scale"
        self.used.update((name, scale))
        raw = self.names[name]
        dtype = self.source.dtype(raw)
        kind = "fp8" if dtype == "F8_E4M3" else "fp4" if dtype in ("I8", "U8") else None
        if kind is None:
            self.problems.append(f"{raw}: dtype {dtype} next to a `.scale`; expected F8_E4M3 or packed FP4 (I8/U8)")
            return None
        codes, scales = self.source.view(raw), self.source.view(self.names[scale])
        dense = dequantize_fp8_np(codes, scales) if kind == "fp8" else dequantize_fp4_np(codes, scales)
        if dense.shape != shape:
            self.problems.append(f"{raw}: dequantized shape {list(dense.shape)}, expected {list(shape)}")
            return None
        return dense


def fill_v4_params(abstract_model, source: TensorSource, *, dtype, skip=lambda name: False, mesh=None):
    """Materialise an `nnx.eval_shape` V4 model from a checkpoint, checking every name, shape and dtype.

    Quantized variables (FP8 codes, FP4 codes, e8m0 scales) take the checkpoint bytes as they are;
    dense parameters take plain tensors, or dequantize an FP8/FP4 `.weight` + `.scale` pair. Float
    parameters become `dtype`, except the ones the model keeps in fp32 (norms, mHC, sinks, ...).
    With a mesh each variable goes straight to its shards (one tensor on the host at a time).
    """
    shardings = sharding.shardings(abstract_model, mesh) if mesh is not None else {}
    graphdef, state = nnx.split(abstract_model)
    reader = _Reader(source)
    filled = []
    for path, var in nnx.to_flat_state(state):
        template = official_name(path)
        kind = _kind(var, template)
        if "{expert}" in template:
            parts = [reader.tensor(template.format(expert=e), kind, tuple(var.shape[1:])) for e in range(var.shape[0])]
            array = None if any(p is None for p in parts) else np.stack(parts)
        else:
            array = reader.tensor(template, kind, tuple(var.shape))
        if array is None:
            filled.append((path, var))
            continue
        if kind == "int" and array.size and (array.min() < 0 or array.max() >= abstract_model.arch.n_routed_experts):
            reader.problems.append(f"{template}: expert ids outside [0, {abstract_model.arch.n_routed_experts})")
        target = dtype if kind == "float" and var.dtype != jnp.float32 else var.dtype
        filled.append((path, var.replace(to_device(array, target, shardings.get(path)))))
    unexpected = sorted(n for n in set(reader.names) - reader.used if not skip(n))
    if unexpected:
        reader.problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}")
    if reader.problems:
        raise CheckpointError(f"checkpoint does not match the DeepSeek-V4 model ({len(reader.problems)} problems): "
                              + "; ".join(reader.problems[:30]))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_v4_target(folder: str | Path, *, dtype="bfloat16", dequantize: bool = False, mesh=None):
    """A DeepSeek-V4 folder (config.json + safetensors, sharded with an index or not) as our model.

    `dequantize=True` loads an FP8/FP4 checkpoint into dense weights of `dtype` (for tests and
    references); otherwise the checkpoint's format is kept.
    """
    cfg = read_config_json(folder)
    arch = arch_from_config(cfg)
    if dequantize:
        arch = dataclasses.replace(arch, weight_format="dense")
    dtype = as_dtype(dtype)
    skip_mtp = arch.num_mtp_layers == 0
    return fill_v4_params(abstract_target(arch, dtype=dtype), TensorSource(folder), dtype=dtype,
                          skip=lambda name: skip_mtp and name.startswith("mtp."), mesh=mesh)


# --------------------------------------------------------------------------------------------
# saving


def v4_tensors(model) -> dict[str, np.ndarray]:
    """Every checkpoint tensor of a model under its official name (experts one by one)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        template = official_name(path)
        value = np.asarray(var[...])
        if var.dtype == jnp.uint8 and template.endswith(".scale"):
            value = value.view(ml_dtypes.float8_e8m0fnu)
        if "{expert}" in template:
            out.update({template.format(expert=e): value[e] for e in range(value.shape[0])})
        else:
            out[template] = value
    return out


def save_v4_checkpoint(model, folder: str | Path, *, shards: int = 1, hf_names: bool = False) -> Path:
    """Write config.json + safetensors (sharded with model.safetensors.index.json when shards > 1).

    `hf_names` writes the names HF transformers' save_pretrained would (the `model.` prefix etc.).
    """
    tensors = v4_tensors(model)
    if hf_names:
        tensors = {_hf_name(n): v for n, v in tensors.items()}
    names = sorted(tensors)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(arch_to_config(model.arch), indent=2))
        if shards == 1:
            save_file({n: tensors[n] for n in names}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i in range(shards):
                file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                part = names[i::shards]
                save_file({n: tensors[n] for n in part}, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({n: file for n in part})
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    return Path(folder)


def _hf_name(name: str) -> str:
    if name == "head.weight":
        return name
    name = {"embed.weight": "embed_tokens.weight"}.get(name, name)
    name = re.sub(r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1", name)
    name = re.sub(r"^(layers\.\d+\.attn)\.kv_norm\.weight$", r"\1.norm.weight", name)
    return "model." + name
