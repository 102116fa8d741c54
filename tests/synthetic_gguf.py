"""Tiny llama GGUF files written the way llama.cpp's converter writes them, for tests.

Weights are made in HF names and layouts, then stored under llama.cpp's tensor names with
attn_q / attn_k rows reordered as llama.cpp's convert_hf_to_gguf does (`llama_cpp_permute`), so a
correct reader must give the HF weights back. The tokenizer is a byte-level BPE trained here on a
small corpus, stored as llama.cpp stores one (tokens, merges, token types).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

Q = gguf.GGMLQuantizationType

CORPUS = [
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "In 2024 there were 366 days, and 1999 came before 2000.\n",
    "The quick brown fox jumps over the lazy dog. It's 42 o'clock!\n",
    "for i in range(100):\n        total += i * 7  # sum\n",
    "naïve café, 東京 and ünïcödé text; emoji 😀 too.\n",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"


def train_vocab(vocab_size: int = 420) -> tuple[list[str], list[str], list[int]]:
    """(tokens in id order, merges as 'left right', llama.cpp token types) of a byte-level BPE.

    Trained on plain GPT-2 splitting, so the merges include multi-digit tokens like '12'.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + [USER_DEFINED]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [int(gguf.TokenType.CONTROL) if t in SPECIALS else
             int(gguf.TokenType.USER_DEFINED) if t == USER_DEFINED else int(gguf.TokenType.NORMAL) for t in tokens]
    return tokens, merges, types


@dataclass(frozen=True)
class TinyLlama:
    vocab_size: int
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    layers: int = 2
    context: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def hf_weights(spec: TinyLlama, seed: int = 0) -> dict[str, np.ndarray]:
    """Random non-degenerate float32 weights under HF names ([out, in] linears)."""
    rng = np.random.default_rng(seed)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    d, hd = spec.hidden, spec.head_dim
    w = {"model.embed_tokens.weight": rng.standard_normal((spec.vocab_size, d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    if not spec.tied:
        w["lm_head.weight"] = matrix(spec.vocab_size, d)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
              p + "self_attn.q_proj.weight": matrix(spec.heads * hd, d),
              p + "self_attn.k_proj.weight": matrix(spec.kv_heads * hd, d),
              p + "self_attn.v_proj.weight": matrix(spec.kv_heads * hd, d),
              p + "self_attn.o_proj.weight": matrix(d, spec.heads * hd),
              p + "mlp.gate_proj.weight": matrix(spec.ffn, d), p + "mlp.up_proj.weight": matrix(spec.ffn, d),
              p + "mlp.down_proj.weight": matrix(d, spec.ffn)}
    return w


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, interleave the two rotary halves (rows i and i+d/2 -> 2i, 2i+1)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


LEAF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for an HF llama tensor name."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, *module, leaf = hf_name.split(".")
    return f"blk.{layer}.{LEAF_NAMES['.'.join(module)]}.{leaf}"


@dataclass
class GGUFContents:
    """What to write: architecture, tokenizer metadata, tensors and their storage types."""

    spec: TinyLlama
    weights: dict[str, np.ndarray]  # HF names and layouts
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str = "smollm"
    tokenizer_model: str = "gpt2"
    add_bos: bool = False
    chat_template: str | None = None
    storage: dict[str, Q] = field(default_factory=dict)  # HF name -> type; default F32
    architecture: str = "llama"
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name -> float32
    rope_scaling: str | None = None


def write_gguf(path: Path, c: GGUFContents) -> Path:
    spec, arch = c.spec, c.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(spec.layers)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_vocab_size(spec.vocab_size)
    if c.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(c.rope_scaling))
    writer.add_tokenizer_model(c.tokenizer_model)
    writer.add_tokenizer_pre(c.pre)
    writer.add_token_list(c.tokens)
    writer.add_token_types(c.token_types)
    writer.add_token_merges(c.merges)
    writer.add_bos_token_id(c.tokens.index("<|im_start|>"))
    writer.add_eos_token_id(c.tokens.index("<|im_end|>"))
    writer.add_eot_token_id(c.tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(c.add_bos)
    if c.chat_template is not None:
        writer.add_chat_template(c.chat_template)
    for hf_name, weight in c.weights.items():
        if ".q_proj." in hf_name:
            weight = llama_cpp_permute(weight, spec.heads)
        elif ".k_proj." in hf_name:
            weight = llama_cpp_permute(weight, spec.kv_heads)
        qtype = c.storage.get(hf_name, Q.F32)
        stored = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(gguf_name(hf_name), stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
    for name, weight in c.extra_tensors.items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(path: Path, *, seed: int = 0, **overrides) -> tuple[Path, GGUFContents]:
    """A complete tiny llama GGUF; keyword arguments override GGUFContents / TinyLlama fields."""
    tokens, merges, types = train_vocab()
    spec_fields = {k: overrides.pop(k) for k in list(overrides) if k in TinyLlama.__dataclass_fields__}
    spec = TinyLlama(vocab_size=len(tokens), **spec_fields)
    contents = GGUFContents(spec=spec, weights=hf_weights(spec, seed), tokens=tokens, merges=merges,
                            token_types=types, **overrides)
    return write_gguf(path, contents), contents
