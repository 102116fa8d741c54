"""HF model folders: config.json + safetensors (single file or sharded with an index).

Our module paths mirror HF names: `layers.3.self_attn.q_proj.kernel` ↔ `model.layers.3.self_attn.
q_proj.weight` (transposed: HF Linear weights are [out, in]), `embed_tokens.embedding` ↔
`model.embed_tokens.weight`, top-level `lm_head` without the `model.` prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from dspark_jax.config import ConfigError, LlamaArch, RopeScaling, TargetArch
from dspark_jax.models import abstract_target
from dspark_jax.models.common import as_dtype


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------
# config.json <-> architecture

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    if model_type not in LLAMA_TYPES:
        raise ConfigError(f"config.json model_type={model_type!r}; supported: {list(LLAMA_TYPES)}")
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


# --------------------------------------------------------------------------------------------
# tensors


def hf_tensor_name(path: tuple) -> tuple[str, bool]:
    """(HF tensor name, whether our array is the transpose of HF's) for a module path."""
    *module, leaf = (str(p) for p in path)
    name = ".".join(module + ["weight" if leaf in ("kernel", "embedding") else leaf])
    if module and module[0] == "lm_head":
        return name, leaf == "kernel"
    return "model." + name, leaf == "kernel"


class TensorSource:
    """Lazy access to every tensor of a folder's safetensors files (index-aware)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self.location: dict[str, Path] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{folder}: the index names {f.name}, which is missing")
            with safe_open(str(f), framework="flax") as handle:
                for key in handle.keys():
                    self.location[key] = f
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> jax.Array:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        f = self.location[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="flax")
        return self._open[f]


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def fill_params(abstract_model, source: TensorSource, *, dtype,
                name_of: Callable[[tuple], tuple[str, bool]] = hf_tensor_name,
                optional: Callable[[str], bool] = lambda name: False):
    """Materialise an `nnx.eval_shape` model from checkpoint tensors, checking names and shapes.

    Every parameter must be present with the right shape; every checkpoint tensor must be used
    (except names `optional(name)` accepts, e.g. a tied lm_head stored anyway).
    """
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    missing, misshaped, filled = [], [], []
    used = set()
    for path, var in flat:
        name, transpose = name_of(path)
        if name not in source.location:
            missing.append(name)
            filled.append((path, var))
            continue
        shape = source.shape(name)
        expected = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
        if shape != expected:
            misshaped.append(f"{name}: checkpoint {list(shape)}, expected {list(expected)}")
            filled.append((path, var))
            continue
        array = source.get(name)
        array = array.T if transpose else array
        target_dtype = dtype if jnp.issubdtype(var.dtype, jnp.floating) else var.dtype
        filled.append((path, var.replace(jnp.asarray(array, dtype=target_dtype))))
        used.add(name)
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


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected an HF model folder)")
    return json.loads(path.read_text())


def load_hf_target(folder: str | Path, *, dtype="bfloat16"):
    """Load an HF model folder (config.json + safetensors) as our target module."""
    arch = arch_from_hf_config(read_config_json(folder))
    dtype = as_dtype(dtype)
    model = abstract_target(arch, dtype=dtype)
    tied = getattr(arch, "tie_word_embeddings", False)
    return fill_params(model, TensorSource(folder), dtype=dtype,
                       optional=lambda name: tied and name == "lm_head.weight")


def model_tensors(model, name_of: Callable[[tuple], tuple[str, bool]] = hf_tensor_name) -> dict[str, jax.Array]:
    """Our parameters under HF names and layouts."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = name_of(path)
        value = var[...]
        out[name] = jnp.asarray(value.T if transpose else value)
    return out


def atomic_folder(folder: str | Path):
    """Context manager yielding a temporary folder that replaces `folder` only on success."""
    return _AtomicFolder(Path(folder))


class _AtomicFolder:
    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> Path:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.folder.exists():
            old = self.folder.with_name(f".{self.folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.folder, old)
            os.replace(self.tmp, self.folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.folder)
        return False


def save_hf_target(model, folder: str | Path, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra text files) atomically."""
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(arch_to_hf_config(model.arch), indent=2))
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)
