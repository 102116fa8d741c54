"""Configuration dataclasses and the `configs/*.py` loader.

A config file is a Python module that defines a top-level `config` of type `Config`. Every field
is validated on construction; `override(cfg, "a.b=value")` parses the value from the field's
annotation, so `--set` on the command line and keyword construction in Python agree.
"""

from __future__ import annotations

import dataclasses
import runpy
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range or choices."""


def _check_value(owner: str, name: str, hint: Any, value: Any) -> None:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected one of {list(typing.get_args(hint))}")
    elif origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, arg):
                return
            if typing.get_origin(arg) is Literal and value in typing.get_args(arg):
                return
            if arg in (int, float, str, bool) and isinstance(value, arg):
                return
        raise ConfigError(f"{owner}.{name} = {value!r}; expected {hint}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected a number")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected a string")
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{owner}.{name} = {value!r}; expected a tuple")


class Validated:
    """Checks every field against its annotation, then the class's own `check()` ranges."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
                value = tuple(value)
            _check_value(type(self).__name__, f.name, hints[f.name], value)
        self.check()

    def check(self) -> None:
        """Range checks beyond the type; subclasses raise ConfigError naming the field."""

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{name} = {getattr(self, name)!r}; expected {expected}")


# --------------------------------------------------------------------------------------------
# Target architectures


@dataclass(frozen=True)
class RopeScaling(Validated):
    """RoPE frequency scaling as in HF `rope_parameters` (llama3, linear or yarn)."""

    kind: Literal["llama3", "linear", "yarn"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # yarn cos/sin scale; 0 = 0.1·ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dims

    def check(self) -> None:
        self._require(self.factor >= 1.0, "factor", ">= 1")


@dataclass(frozen=True)
class LlamaArch(Validated):
    """Llama-family decoder: Llama 2/3, SmolLM2, Mistral-like, Qwen2 (bias) and Qwen3 (q/k norm)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    qk_norm: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)
    model_type: Literal["llama", "qwen2", "qwen3", "mistral"] = "llama"

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            self._require(getattr(self, name) > 0, name, "> 0")
        self._require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                      f"a divisor of num_heads={self.num_heads}")
        self._require(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)")


LayerType = Literal["sliding_attention", "full_attention"]


def gemma4_default_layer_types(num_layers: int) -> tuple[str, ...]:
    """HF Gemma 4's default pattern: five sliding-window layers, then one full; the last is always full."""
    return tuple("full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
                 for i in range(num_layers))


@dataclass(frozen=True)
class Gemma4Arch(Validated):
    """Gemma 4 dense text decoder (HF `gemma4_text`, or the text half of a `gemma4` checkpoint).

    Sliding-window and full-attention layers differ in head size, KV heads and RoPE; the
    `*_full` fields describe the full-attention layers. `num_global_kv_heads` (HF
    `num_global_key_value_heads`) only exists together with `attention_k_eq_v`, as in HF; None
    means the full layers use `num_kv_heads`. A partial rotary factor below 1 is HF's
    "proportional" RoPE (the first fraction of the head's frequency pairs turn, the rest pass).
    A sliding layer's query at position p sees keys at positions p - sliding_window < k <= p, as
    in HF's mask and our attention kernels.
    """

    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_layers: int = 30
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_kv_heads: int | None = None
    layer_types: tuple[LayerType, ...] = gemma4_default_layer_types(30)
    sliding_window: int = 512
    rope_theta_sliding: float = 10000.0
    rope_theta_full: float = 1000000.0
    partial_rotary_factor_sliding: float = 1.0
    partial_rotary_factor_full: float = 0.25
    attention_k_eq_v: bool = False
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    hidden_activation: Literal["gelu_pytorch_tanh", "silu"] = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "global_head_dim", "sliding_window",
                     "max_position_embeddings"):
            self._require(getattr(self, name) > 0, name, "> 0")
        self._require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                      f"a divisor of num_heads={self.num_heads}")
        if self.num_global_kv_heads is not None:
            self._require(self.attention_k_eq_v, "num_global_kv_heads",
                          "None unless attention_k_eq_v (HF applies it only to K=V layers)")
            self._require(self.num_global_kv_heads > 0 and self.num_heads % self.num_global_kv_heads == 0,
                          "num_global_kv_heads", f"a divisor of num_heads={self.num_heads}")
        self._require(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)")
        self._require(self.global_head_dim % 2 == 0, "global_head_dim", "an even number (RoPE rotates pairs)")
        self._require(len(self.layer_types) == self.num_layers, "layer_types",
                      f"{self.num_layers} entries (num_layers), each 'sliding_attention' or 'full_attention'")
        for t in self.layer_types:
            self._require(t in ("sliding_attention", "full_attention"), "layer_types",
                          "entries 'sliding_attention' or 'full_attention'")
        # HF forces the last layer to full attention; a config that says otherwise would load differently.
        self._require(self.layer_types[-1] == "full_attention", "layer_types",
                      "'full_attention' as the last entry (HF Gemma 4 forces it)")
        for name in ("rope_theta_sliding", "rope_theta_full"):
            self._require(getattr(self, name) > 0, name, "> 0")
        for name in ("partial_rotary_factor_sliding", "partial_rotary_factor_full"):
            self._require(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        if self.final_logit_softcapping is not None:
            self._require(self.final_logit_softcapping > 0, "final_logit_softcapping", "> 0 or None (off)")
        self._require(self.rms_norm_eps > 0, "rms_norm_eps", "> 0")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def kv_heads(self, layer: int) -> int:
        if self.is_sliding(layer) or self.num_global_kv_heads is None:
            return self.num_kv_heads
        return self.num_global_kv_heads

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim


V4LayerType = Literal["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def deepseek_v4_layer_types(compress_ratios: tuple[int, ...], *, csa_ratio: int = 4,
                            hca_ratio: int = 128) -> tuple[str, ...]:
    """Layer kinds from the official per-layer `compress_ratios` (0 = window only)."""
    kinds = {0: "sliding_attention", csa_ratio: "compressed_sparse_attention",
             hca_ratio: "heavily_compressed_attention"}
    bad = sorted({r for r in compress_ratios if r not in kinds})
    if bad:
        raise ConfigError(f"compress_ratios holds {bad}; expected 0, {csa_ratio} (CSA) or {hca_ratio} (HCA)")
    return tuple(kinds[r] for r in compress_ratios)


@dataclass(frozen=True)
class DeepseekV4Arch(Validated):
    """DeepSeek-V4 (HF `deepseek_v4`): hybrid window/compressed attention, mHC streams, MoE everywhere.

    Each layer attends to the last `sliding_window` tokens with one shared K=V head; CSA layers
    also attend to the `index_topk` compressed entries (one per `csa_ratio` tokens) a Lightning
    Indexer picks, HCA layers to every compressed entry (one per `hca_ratio` tokens). The first
    `num_hash_layers` MoE layers pick experts by a token-id table. `weight_format="fp8"` is the
    official checkpoint layout (FP8 e4m3 linears with ue8m0 128x128 block scales, FP4 routed
    experts with an e8m0 scale per 32), kept quantized on device; "dense" holds every weight in
    the model dtype. The `dspark_*` fields describe the draft blocks `mtp.0..` of a DSpark
    checkpoint (window-only V4 blocks); `dspark_block_size=0` means none are loaded.
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    layer_types: tuple[V4LayerType, ...] = deepseek_v4_layer_types((0, 0) + (4, 128) * 20 + (4,))
    sliding_window: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # YaRN of the compressed layers; V4 keeps cos/sin unscaled (attention_factor 1).
    rope_scaling: RopeScaling | None = RopeScaling(kind="yarn", factor=16.0, original_max_position_embeddings=65536,
                                                   beta_fast=32.0, beta_slow=1.0, attention_factor=1.0)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    weight_format: Literal["dense", "fp8"] = "fp8"
    dspark_block_size: int = 0
    dspark_noise_token_id: int = -1
    dspark_target_layer_ids: tuple[int, ...] = ()
    dspark_markov_rank: int = 0

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                     "n_routed_experts", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                     "max_position_embeddings"):
            self._require(getattr(self, name) > 0, name, "> 0")
        self._require(0 < self.rope_head_dim <= min(self.head_dim, self.index_head_dim) and self.rope_head_dim % 2 == 0,
                      "rope_head_dim", f"an even number in 2..min(head_dim, index_head_dim)="
                      f"{min(self.head_dim, self.index_head_dim)}")
        self._require(self.num_heads % self.o_groups == 0, "o_groups", f"a divisor of num_heads={self.num_heads}")
        self._require(len(self.layer_types) == self.num_layers, "layer_types",
                      f"{self.num_layers} entries (num_layers)")
        for t in self.layer_types:
            self._require(t in typing.get_args(V4LayerType), "layer_types", f"entries in {list(typing.get_args(V4LayerType))}")
        self._require(self.csa_ratio >= 1, "csa_ratio", ">= 1")
        self._require(self.hca_ratio >= 1, "hca_ratio", ">= 1")
        self._require(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                      f"1..n_routed_experts={self.n_routed_experts}")
        self._require(0 <= self.num_hash_layers <= self.num_layers, "num_hash_layers", f"0..num_layers={self.num_layers}")
        self._require(self.routed_scaling_factor > 0, "routed_scaling_factor", "> 0")
        self._require(self.swiglu_limit > 0, "swiglu_limit", "> 0")
        self._require(self.hc_eps > 0, "hc_eps", "> 0")
        self._require(self.rms_norm_eps > 0, "rms_norm_eps", "> 0")
        for name in ("rope_theta", "compress_rope_theta"):
            self._require(getattr(self, name) > 0, name, "> 0")
        if self.rope_scaling is not None:
            self._require(self.rope_scaling.kind == "yarn", "rope_scaling", "None or a yarn RopeScaling")
        self._require(not self.tie_word_embeddings, "tie_word_embeddings", "false (V4 has a separate head)")
        if self.weight_format == "fp8":
            # FP4 experts pack two codes per byte with one scale per 32 inputs.
            for name in ("hidden_size", "moe_intermediate_size"):
                self._require(getattr(self, name) % 32 == 0, name, "a multiple of 32 with weight_format='fp8' "
                              "(FP4 experts scale 32 inputs at a time)")
        self._require(self.dspark_block_size >= 0, "dspark_block_size", ">= 0 (0 = no DSpark blocks)")
        if self.dspark_block_size:
            self._require(0 <= self.dspark_noise_token_id < self.vocab_size, "dspark_noise_token_id",
                          f"a token id in [0, {self.vocab_size})")
            self._require(len(self.dspark_target_layer_ids) >= 1 and all(
                0 <= i < self.num_layers for i in self.dspark_target_layer_ids), "dspark_target_layer_ids",
                f"one or more layer ids in 0..{self.num_layers - 1}")
            self._require(self.dspark_markov_rank >= 1, "dspark_markov_rank", ">= 1")

    def compress_ratio(self, layer: int) -> int:
        """Tokens per compressed entry of a layer (0: window only)."""
        return {"sliding_attention": 0, "compressed_sparse_attention": self.csa_ratio,
                "heavily_compressed_attention": self.hca_ratio}[self.layer_types[layer]]

    @property
    def num_mtp_layers(self) -> int:
        """DSpark draft blocks in the checkpoint (`mtp.0..`): one per target layer they read."""
        return len(self.dspark_target_layer_ids) if self.dspark_block_size else 0


TargetArch = LlamaArch | Gemma4Arch | DeepseekV4Arch


@dataclass(frozen=True)
class TargetConfig(Validated):
    """Where the target model comes from.

    `source` is an HF model folder, a .gguf file, or a named asset (see checkpoint.assets);
    empty means random weights of `arch` (for benchmarks at real sizes without weights).
    """

    source: str = ""
    arch: TargetArch | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    seed: int = 0

    def check(self) -> None:
        if not self.source and self.arch is None:
            raise ConfigError("TargetConfig: set `source` (a checkpoint) or `arch` (random weights)")
        if self.source and self.arch is not None:
            raise ConfigError("TargetConfig: `source` and `arch` are exclusive; the checkpoint "
                              "defines its architecture")


# --------------------------------------------------------------------------------------------
# Draft, speculation, serving, training


@dataclass(frozen=True)
class DraftConfig(Validated):
    """The drafter. `kind="none"` decodes plainly; "ngram" needs no weights."""

    kind: Literal["none", "ngram", "dspark", "dflash", "eagle3"] = "none"
    source: str = ""  # trained draft folder (DeepSpec layout); empty = random init
    block_size: int = 7
    num_layers: int = 5
    target_layer_ids: tuple[int, ...] = ()
    mask_token_id: int = -1
    markov_rank: int = 256
    markov_head: Literal["vanilla", "gated", "rnn"] = "vanilla"
    confidence_head: bool = True
    intermediate_size: int = 0  # 0 = the target's
    ngram_min: int = 1
    ngram_max: int = 4
    seed: int = 0

    def check(self) -> None:
        self._require(1 <= self.block_size <= 32, "block_size", "1..32")
        self._require(self.num_layers >= 1, "num_layers", ">= 1")
        self._require(self.markov_rank >= 1, "markov_rank", ">= 1")
        self._require(1 <= self.ngram_min <= self.ngram_max, "ngram_min", f"1..ngram_max={self.ngram_max}")


@dataclass(frozen=True)
class SpecConfig(Validated):
    """How many draft tokens to verify per request and round."""

    scheduler: Literal["fixed", "threshold", "causal", "async"] = "fixed"
    block_size: int = 0  # draft tokens per round; 0 = the draft's block size
    threshold: float = 0.5
    sps_profile: str = ""  # an SPS table (JSON with an "sps" list, as profile_sps caches it); empty = profile
    plain_steps: bool = True  # causal/async: a plain step where past rounds say a round pays less

    def check(self) -> None:
        self._require(0 <= self.block_size <= 32, "block_size", "0..32 (0 = the draft's)")
        self._require(0.0 <= self.threshold <= 1.0, "threshold", "0..1")


@dataclass(frozen=True)
class ServeConfig(Validated):
    """Engine shapes, sampling defaults and the HTTP endpoint."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_batch: int = 16
    max_context: int = 4096
    page_size: int = 16
    prefill_chunk: int = 512
    kernels: Literal["auto", "xla", "pallas", "interpret"] = "auto"  # see dspark_jax.kernels
    # Device mesh sizes (data, tensor, expert) (see dspark_jax.sharding); () = every device on "tensor".
    mesh: tuple[int, ...] = ()
    num_pages: int = 0  # KV pages shared by all requests; 0 = enough for max_batch × max_context
    max_waiting: int = 256  # requests waiting for a slot before new ones are refused (HTTP 429)
    warmup: bool = True  # compile every program shape before serving
    compilation_cache: bool = True  # keep compiled programs on disk (under the cache folder) across runs, on GPUs
    chat: bool = True  # wrap --prompt in the tokenizer's chat template
    host: str = "127.0.0.1"
    port: int = 8000

    def check(self) -> None:
        self._require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        self._require(self.temperature >= 0.0, "temperature", ">= 0")
        self._require(self.top_k >= 0, "top_k", ">= 0 (0 = off)")
        self._require(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        self._require(self.max_batch >= 1, "max_batch", ">= 1")
        self._require(self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0,
                      "page_size", "a power of two")
        self._require(self.max_context >= self.page_size, "max_context", f">= page_size={self.page_size}")
        self._require(self.prefill_chunk >= 16, "prefill_chunk", ">= 16")
        self._require(self.mesh == () or (len(self.mesh) == 3 and min(self.mesh) >= 1), "mesh",
                      "() or three sizes >= 1 for the axes (data, tensor, expert), e.g. (1, 8, 1)")
        self._require(self.num_pages >= 0, "num_pages", ">= 0 (0 = enough for every slot)")
        self._require(self.max_waiting >= 1, "max_waiting", ">= 1")


@dataclass(frozen=True)
class TrainConfig(Validated):
    """Draft training recipe (DeepSpec defaults; see dspark_jax/train).

    One optimizer step sees `grad_accum` micro-batches of `batch_size` sequences (the global batch
    is their product; `batch_size` is split over the devices). `data` are regenerated chat
    conversations (JSONL files or folders of them, as `dspark_jax.train.regenerate` writes);
    `text_data` are glob patterns of plain-text files added as extra distillation data.
    """

    data: tuple[str, ...] = ()
    text_data: tuple[str, ...] = ()
    text_max_tokens: int = 0  # 0 = every token of text_data
    out_dir: str = "runs/draft"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 2048
    min_length: int = 64  # shortest sequence bucket (sequences are padded to a power of two ≥ this)
    min_loss_tokens: int = 14  # conversations with fewer supervised tokens are dropped
    anchors_per_sequence: int = 512  # DSpark/DFlash blocks, or Eagle3 loss origins, per sequence
    learning_rate: float = 6e-4
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    loss_ce: float = 0.1
    loss_l1: float = 0.9
    loss_conf: float = 1.0
    position_decay: float = 4.0  # DSpark/DFlash position weight exp(−k / position_decay)
    step_decay: float = 0.8  # Eagle3 step weight step_decay ** s
    logits_chunk: int = 1024  # rows of vocabulary-sized logits formed at once
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # master weights are always fp32
    holdout_fraction: float = 0.02  # conversations kept out of training for STS calibration
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "anchors_per_sequence", "logits_chunk",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            self._require(getattr(self, name) >= 1, name, ">= 1")
        self._require(self.min_length >= 16 and self.min_length & (self.min_length - 1) == 0, "min_length",
                      "a power of two >= 16")
        self._require(self.max_length >= self.min_length, "max_length", f">= min_length={self.min_length}")
        self._require(self.min_loss_tokens >= 1, "min_loss_tokens", ">= 1")
        self._require(self.text_max_tokens >= 0, "text_max_tokens", ">= 0 (0 = all)")
        self._require(self.learning_rate > 0, "learning_rate", "> 0")
        self._require(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", "in [0, 1)")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        self._require(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        self._require(self.eps > 0, "eps", "> 0")
        self._require(self.clip_norm > 0, "clip_norm", "> 0")
        for name in ("loss_ce", "loss_l1", "loss_conf"):
            self._require(getattr(self, name) >= 0, name, ">= 0")
        self._require(self.loss_ce + self.loss_l1 > 0, "loss_ce", "> 0 when loss_l1 is 0 (nothing to learn from)")
        self._require(self.position_decay > 0, "position_decay", "> 0")
        self._require(0.0 < self.step_decay <= 1.0, "step_decay", "in (0, 1]")
        self._require(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", "in [0, 1)")


@dataclass(frozen=True)
class Config(Validated):
    target: TargetConfig
    draft: DraftConfig = field(default_factory=DraftConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Loading and overriding


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path that exists, else a bare name looked up in ./configs and the repository's configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (Path.cwd() / "configs", CONFIG_DIR):
        candidate = folder / path.name
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.py")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {str(name_or_path)!r} not found; known configs: {known}")


def load_config(name_or_path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Run a config file and return its `config`, with `a.b=value` overrides applied."""
    path = resolve_config_path(name_or_path)
    namespace = runpy.run_path(str(path))
    cfg = namespace.get("config")
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path} must define a top-level `config` of type Config, got {type(cfg).__name__}")
    return apply_overrides(cfg, overrides)


def _parse(text: str, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(hint)):
            return None
        for arg in args:
            try:
                return _parse(text, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot parse {text!r} as {hint}")
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{where} = {text!r}; expected one of {list(choices)}")
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        body = text.strip().strip("[]()")
        return tuple(_parse(p.strip(), item, where) for p in body.split(",") if p.strip())
    if hint is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} = {text!r}; expected true or false")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{where} = {text!r}; expected {'an integer' if hint is int else 'a number'}") from None
    if hint is str:
        return text
    raise ConfigError(f"{where}: cannot set a field of type {hint} from the command line")


def override(cfg: Any, assignment: str) -> Any:
    """Return a copy of `cfg` with the dotted field in `"a.b.c=value"` replaced."""
    return apply_overrides(cfg, [assignment])


def apply_overrides(cfg: Any, assignments: typing.Iterable[str]) -> Any:
    """Apply `a.b=value` assignments together: each section is rebuilt (and validated) once, so
    fields that must agree (heads and KV heads, say) can change in the same call."""
    tree: dict = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. serve.max_batch=8")
        dotted, text = (part.strip() for part in assignment.split("=", 1))
        node = tree
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {name} is set both as a value and as a section")
        node[leaf] = (text, dotted)
    return _rebuild(cfg, tree)


def _rebuild(obj: Any, tree: dict) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for name, sub in tree.items():
        if name not in names:
            raise ConfigError(f"--set: {type(obj).__name__} has no field {name!r}; fields: {names}")
        if isinstance(sub, tuple):
            changes[name] = _parse(sub[0], hints[name], f"{type(obj).__name__}.{name}")
            continue
        child = getattr(obj, name)
        if child is None or not dataclasses.is_dataclass(child):
            raise ConfigError(f"--set: {type(obj).__name__}.{name} is {child!r}, not a section")
        changes[name] = _rebuild(child, sub)
    return dataclasses.replace(obj, **changes)
