"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style, Qwen2, Qwen3) as an NNX module.

Module names mirror HF transformers' (`layers.N.self_attn.o_proj`, ...) so checkpoints map by rule;
q/k/v (`self_attn.qkv_proj`) and gate/up (`mlp.gate_up_proj`) are fused parameters whose parts keep
HF's names in checkpoints (see `FusedLinear`).
Every target family exposes the same surface, which drafts and the decode round rely on:
`embed(tokens)`, `__call__(tokens, positions, attn, capture) -> (normed hidden, {layer: raw})`,
`logits(hidden) -> fp32`, and `kv_heads_and_dims()` for the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import LlamaArch
from dspark_jax.models.common import (FusedLinear, GatedMLP, RMSNorm, apply_rope, embedding, linear, lm_head_logits,
                                      rope_attention_factor, rope_inv_freq, run_layers)


class LlamaAttention(nnx.Module):
    def __init__(self, arch: LlamaArch, *, dtype, rngs: nnx.Rngs, in_features: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.group = arch.num_heads // arch.num_kv_heads  # query heads per KV head
        in_features = in_features or arch.hidden_size
        out_bias = arch.attention_bias and arch.model_type != "qwen2"
        # q/k/v as one kernel [in, KVH, G+2, D] split by KV head, o by rows: one all-reduce per
        # attention on a tensor mesh. Checkpoints keep HF's q_proj/k_proj/v_proj (see FusedLinear).
        self.qkv_proj = FusedLinear(in_features, (("q_proj", self.group), ("k_proj", 1), ("v_proj", 1)),
                                    groups=(self.num_kv_heads,), features=self.head_dim, bias=arch.attention_bias,
                                    dtype=dtype, rngs=rngs, axes=("kv_heads", None, None))
        self.o_proj = linear(self.num_heads * self.head_dim, arch.hidden_size, bias=out_bias, dtype=dtype, rngs=rngs,
                             axes=("heads", None))
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=arch.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, eps=arch.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rope_theta, self.rope_scaling = arch.rope_theta, arch.rope_scaling

    def _rope(self, x, positions):
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        return apply_rope(x, positions, inv_freq, attention_factor=rope_attention_factor(self.rope_scaling))

    def _keys(self, k, positions):
        return self._rope(k if self.k_norm is None else self.k_norm(k), positions)

    def project_kv(self, x, positions):
        """Keys (normed, rotated) and values [..., KVH, D] of x; drafts use it for context K/V.

        Only the K and V slots of the fused kernel are multiplied (no queries are computed).
        """
        kv = self.qkv_proj(x, slots=slice(self.group, self.group + 2))
        return self._keys(kv[..., 0, :], positions), kv[..., 1, :]

    def __call__(self, x, positions, attn, layer: int):
        lead = x.shape[:-1]
        qkv = self.qkv_proj(x)  # [..., KVH, G+2, D]; query head h = kv·G + g, as HF orders them
        q = qkv[..., :self.group, :].reshape(*lead, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self._keys(qkv[..., self.group, :], positions), qkv[..., self.group + 1, :]
        out = attn(layer, self._rope(q, positions), k, v, scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, arch: LlamaArch, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(arch, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, act="silu", dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, attn, layer: int):
        x, normed = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), positions, attn, layer))
        return x + self.mlp(normed)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, arch: LlamaArch, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.arch = arch
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = embedding(arch.vocab_size, arch.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(arch, dtype=dtype, rngs=rngs) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps, dtype=dtype)
        self.lm_head = None if arch.tie_word_embeddings else linear(
            arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype, rngs=rngs, axes=(None, "vocab"))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def __call__(self, tokens, positions, attn, capture: tuple[int, ...] = ()):
        """Run all layers. Returns (final-normed hidden, {layer id: raw layer output})."""
        x, captured = run_layers(self.layers, self.embed(tokens), positions, attn, capture)
        return self.norm(x), captured

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states."""
        return lm_head_logits(self.embed_tokens, self.lm_head, hidden)

    def kv_heads_and_dims(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of each layer's cache."""
        return [(self.arch.num_kv_heads, self.arch.head_dim)] * self.arch.num_layers
