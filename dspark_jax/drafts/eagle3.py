"""Eagle3 draft (the autoregressive baseline): one decoder layer over fused target features.

Entry t of the draft's own cache is built from (target feature h_t, token x_{t+1}) at RoPE position
t: the layer input is [input_layernorm(embed(x_{t+1})) ; hidden_norm(h)] (width 2H) and its
residual stream starts from h = fc(features). After the last committed entry (position p−1,
holding the anchor x_p) the layer's output hidden gives the logits of x_{p+1}; each further draft
step feeds its own output hidden back with the token it just sampled. Names follow DeepSpec.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import sharding
from dspark_jax.cache import init_kv_caches, ragged_layout
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts.base import Proposal, ProposeInputs
from dspark_jax.models.attention import LayerKV, PagedKV
from dspark_jax.models.common import GatedMLP, RMSNorm, linear
from dspark_jax.models.llama import LlamaAttention
from dspark_jax.speculative.sampling import sample_from_probs, warp_probs


class Eagle3Layer(nnx.Module):
    def __init__(self, arch: LlamaArch, *, dtype, rngs: nnx.Rngs):
        hidden = arch.hidden_size
        self.hidden_norm = RMSNorm(hidden, eps=arch.rms_norm_eps, dtype=dtype)
        self.input_layernorm = RMSNorm(hidden, eps=arch.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(arch, dtype=dtype, rngs=rngs, in_features=2 * hidden)
        self.post_attention_layernorm = RMSNorm(hidden, eps=arch.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(hidden, arch.intermediate_size, act="silu", dtype=dtype, rngs=rngs)

    def __call__(self, embeds, hidden, positions, attn, layer: int = 0):
        x = jnp.concatenate([self.input_layernorm(embeds), self.hidden_norm(hidden)], axis=-1)
        hidden, normed = self.post_attention_layernorm.add_and_norm(hidden, self.self_attn(x, positions, attn, layer))
        return hidden + self.mlp(normed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Eagle3State:
    caches: list[LayerKV]  # the draft layer's own K/V, paged like the target's
    last_hidden: jax.Array  # [R, H] output hidden of each request's last committed entry


class Eagle3Draft(nnx.Module):
    def __init__(self, config: DraftConfig, target_arch, *, dtype, rngs: nnx.Rngs):
        if not isinstance(target_arch, LlamaArch):
            raise ValueError(f"Eagle3 drafts support Llama-family targets, not {type(target_arch).__name__}")
        if not config.target_layer_ids:
            raise ValueError("DraftConfig.target_layer_ids is empty; Eagle3 needs target layers to read")
        if config.num_layers != 1:
            raise ValueError(f"DraftConfig.num_layers={config.num_layers}; Eagle3 drafts have exactly 1 layer")
        self.config = config
        hidden = target_arch.hidden_size
        self.layer_arch = dataclasses.replace(
            target_arch, num_layers=1, intermediate_size=config.intermediate_size or target_arch.intermediate_size)
        self.fc = linear(len(config.target_layer_ids) * hidden, hidden, bias=False, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Eagle3Layer(self.layer_arch, dtype=dtype, rngs=rngs)])
        self.norm = RMSNorm(hidden, eps=target_arch.rms_norm_eps, dtype=dtype)

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return tuple(self.config.target_layer_ids)

    def init_state(self, *, rows: int, num_pages: int, page_size: int, dtype) -> Eagle3State:
        mesh = sharding.model_mesh(self)
        caches = init_kv_caches([(self.layer_arch.num_kv_heads, self.layer_arch.head_dim)], num_pages=num_pages,
                                page_size=page_size, dtype=dtype, mesh=mesh)
        return Eagle3State(caches, sharding.zeros((rows, self.layer_arch.hidden_size), dtype, (), mesh))

    def ingest(self, target, state: Eagle3State, features, next_tokens, layout, rows) -> Eagle3State:
        attn = PagedKV(state.caches, layout.meta)
        out = self.layers[0](target.embed(next_tokens), self.fc(features), layout.positions, attn)
        cu = layout.meta.cu_q_lens
        last = out[jnp.clip(cu[1:] - 1, 0, out.shape[0] - 1)].astype(state.last_hidden.dtype)
        has_entries = (cu[1:] > cu[:-1])[:, None]
        current = state.last_hidden[jnp.clip(rows, 0, state.last_hidden.shape[0] - 1)]
        last_hidden = state.last_hidden.at[rows].set(jnp.where(has_entries, last, current), mode="drop")
        return Eagle3State(attn.caches, last_hidden)

    def propose(self, target, state: Eagle3State, inputs: ProposeInputs):
        rows = inputs.anchors.shape[0]
        hidden = state.last_hidden if inputs.rows is None else jnp.take(state.last_hidden, inputs.rows, axis=0,
                                                                          mode="clip")
        caches = state.caches
        tokens, probs = [], []
        for k in range(inputs.gamma):
            q = warp_probs(target.logits(self.norm(hidden)), inputs.sampling)
            token = sample_from_probs(q, inputs.keys[:, k])
            tokens.append(token)
            probs.append(q)
            if k + 1 < inputs.gamma:
                # A speculative entry at position p+k; commit rewrites it from the target's features.
                layout = ragged_layout(inputs.page_table, inputs.lens + k, jnp.ones((rows,), jnp.int32),
                                       num_tokens=rows, max_q_len=1, page_size=inputs.geometry.page_size,
                                       num_slots=inputs.geometry.num_slots)
                attn = PagedKV(caches, layout.meta)
                hidden = self.layers[0](target.embed(token), hidden, layout.positions, attn)
                caches = attn.caches
        proposal = Proposal(tokens=jnp.stack(tokens, 1), probs=jnp.stack(probs, 1), confidence_logits=None,
                            valid=jnp.full((rows,), inputs.gamma, jnp.int32))
        return proposal, Eagle3State(caches, state.last_hidden)
