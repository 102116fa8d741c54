"""Gemma 4 dense text decoder as an NNX module, with the same surface as `LlamaForCausalLM`.

What sets it apart from the Llama family, all as HF transformers' `gemma4_text` computes it:
- the embedding is multiplied by sqrt(hidden_size), rounded to the weight dtype first;
- layers alternate sliding-window and full attention; full layers may use a larger head
  (`global_head_dim`), their own KV head count, "proportional" partial RoPE, and K=V (no v_proj:
  the values are the raw key projection);
- q, k and v are RMS-normed per head (v without a weight), so attention uses scale 1;
- sandwich norms around attention and MLP, a gelu-tanh gated MLP, and a learned per-layer scalar
  that multiplies the whole residual stream after the layer;
- logits are soft-capped: cap * tanh(logits / cap).
Module names mirror HF's (`layers.N.self_attn.o_proj`, `layers.N.layer_scalar`, ...) so
checkpoints map by rule; q/k(/v) and gate/up are fused parameters stored as HF's separate tensors
(see `FusedLinear`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import Gemma4Arch
from dspark_jax.models.common import (FusedLinear, GatedMLP, RMSNorm, apply_rope, embedding, linear, lm_head_logits,
                                      proportional_rope_inv_freq, run_layers)


def _norm(dim: int, arch: Gemma4Arch, dtype, *, with_scale: bool = True) -> RMSNorm:
    # Gemma 4 multiplies by the weight in fp32 before casting back (and has no "1 + weight").
    return RMSNorm(dim, eps=arch.rms_norm_eps, dtype=dtype, with_scale=with_scale, scale_in_fp32=True)


class Gemma4Attention(nnx.Module):
    def __init__(self, arch: Gemma4Arch, layer: int, *, dtype, rngs: nnx.Rngs):
        sliding = arch.is_sliding(layer)
        self.sliding_window = arch.sliding_window if sliding else None
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.kv_heads(layer), arch.layer_head_dim(layer)
        self.rope_theta = arch.rope_theta_sliding if sliding else arch.rope_theta_full
        self.partial_rotary_factor = arch.partial_rotary_factor_sliding if sliding else arch.partial_rotary_factor_full
        hidden, bias = arch.hidden_size, arch.attention_bias
        self.group = self.num_heads // self.num_kv_heads  # query heads per KV head
        # K=V layers have no v_proj: their values are the raw key projection, so the kernel has G+1 slots.
        self.k_eq_v = arch.attention_k_eq_v and not sliding
        parts = (("q_proj", self.group), ("k_proj", 1)) + (() if self.k_eq_v else (("v_proj", 1),))
        self.qkv_proj = FusedLinear(hidden, parts, groups=(self.num_kv_heads,), features=self.head_dim, bias=bias,
                                    dtype=dtype, rngs=rngs, axes=("kv_heads", None, None))
        self.o_proj = linear(self.num_heads * self.head_dim, hidden, bias=bias, dtype=dtype, rngs=rngs,
                             axes=("heads", None))
        self.q_norm = _norm(self.head_dim, arch, dtype)
        self.k_norm = _norm(self.head_dim, arch, dtype)
        self.v_norm = _norm(self.head_dim, arch, dtype, with_scale=False)

    def __call__(self, x, positions, attn, layer: int):
        lead = x.shape[:-1]
        qkv = self.qkv_proj(x)  # [..., KVH, G+2 (G+1 when K=V), D]
        q = qkv[..., :self.group, :].reshape(*lead, self.num_heads, self.head_dim)
        k = qkv[..., self.group, :]
        # K=V layers take the values from the key projection before its norm and rotation.
        v = k if self.k_eq_v else qkv[..., self.group + 1, :]
        inv_freq = proportional_rope_inv_freq(self.head_dim, self.rope_theta, self.partial_rotary_factor)
        q = apply_rope(self.q_norm(q), positions, inv_freq)
        k = apply_rope(self.k_norm(k), positions, inv_freq)
        # q and k have unit RMS per head; that normalisation replaces the 1/sqrt(head_dim) scale.
        out = attn(layer, q, k, self.v_norm(v), scale=1.0, sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class Gemma4DecoderLayer(nnx.Module):
    def __init__(self, arch: Gemma4Arch, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = _norm(arch.hidden_size, arch, dtype)
        self.self_attn = Gemma4Attention(arch, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = _norm(arch.hidden_size, arch, dtype)
        self.pre_feedforward_layernorm = _norm(arch.hidden_size, arch, dtype)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, act=arch.hidden_activation, dtype=dtype,
                            rngs=rngs)
        self.post_feedforward_layernorm = _norm(arch.hidden_size, arch, dtype)
        # A checkpoint weight (HF keeps it as a persistent buffer); a Param so it loads and saves by rule.
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype))

    def __call__(self, x, positions, attn, layer: int):
        x, normed = self.pre_feedforward_layernorm.add_and_norm(
            x, self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, attn, layer)))
        x = x + self.post_feedforward_layernorm(self.mlp(normed))
        return x * self.layer_scalar[...]


class Gemma4ForCausalLM(nnx.Module):
    def __init__(self, arch: Gemma4Arch, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.arch = arch
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = embedding(arch.vocab_size, arch.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Gemma4DecoderLayer(arch, i, dtype=dtype, rngs=rngs) for i in range(arch.num_layers)])
        self.norm = _norm(arch.hidden_size, arch, dtype)
        self.lm_head = None if arch.tie_word_embeddings else linear(
            arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype, rngs=rngs, axes=(None, "vocab"))

    def embed(self, tokens: jax.Array) -> jax.Array:
        # HF rounds sqrt(hidden) to the weight dtype and multiplies in that dtype (bf16: 55.4 -> 55.5).
        return self.embed_tokens(tokens) * jnp.asarray(self.arch.hidden_size ** 0.5, self.dtype)

    def __call__(self, tokens, positions, attn, capture: tuple[int, ...] = ()):
        """Run all layers. Returns (final-normed hidden, {layer id: raw layer output})."""
        x, captured = run_layers(self.layers, self.embed(tokens), positions, attn, capture)
        return self.norm(x), captured

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states, soft-capped when the arch says so."""
        logits = lm_head_logits(self.embed_tokens, self.lm_head, hidden)
        cap = self.arch.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def kv_heads_and_dims(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of each layer's cache; sliding and full layers differ."""
        return [(self.arch.kv_heads(i), self.arch.layer_head_dim(i)) for i in range(self.arch.num_layers)]
