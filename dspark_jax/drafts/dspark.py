"""DSpark draft: a parallel backbone, a sequential Markov head and a confidence head.

Backbone (DFlash style): the block [x0, MASK×(γ−1)] at positions p..p+γ−1 runs through a few
target-family decoder layers; each layer attends bidirectionally inside the block and to a
context K/V built from the target's hidden states at `target_layer_ids` (concatenated, projected
by `fc`, normed by `hidden_norm`, then through the layer's own k/v projections). Base logits use
the target's frozen lm_head. The Markov head then samples left to right with a bias B_k that
depends on the previous token; the confidence head scores each position from [h_k ; W1[x_{k−1}]].
DFlash is this module without the two heads. Parameter names follow DeepSpec's checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import init_kv_caches
from dspark_jax.config import DraftConfig
from dspark_jax.drafts.base import Proposal, ProposeInputs
from dspark_jax.models import decoder_layer
from dspark_jax.models.attention import DenseDraftBlocks, DraftBlock, LayerKV
from dspark_jax.models.common import RMSNorm, embedding, linear
from dspark_jax.sharding import model_mesh
from dspark_jax.speculative.sampling import sample_from_probs, uniform_from_keys, warp_probs


class MarkovHead(nnx.Module):
    """Low-rank transition bias B(x_{k−1}, ·) = W1[x_{k−1}] W2 (vanilla), gated, or an RNN (paper eq. 6)."""

    def __init__(self, kind: str, *, vocab: int, rank: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.rank = rank
        # Vocabulary-split like the target's embedding and head: B_k comes out split as the base logits.
        self.markov_w1 = embedding(vocab, rank, dtype=dtype, rngs=rngs)
        self.markov_w2 = linear(rank, vocab, bias=False, dtype=dtype, rngs=rngs, axes=(None, "vocab"))
        self.gate_proj = linear(hidden + rank, rank, bias=True, dtype=dtype, rngs=rngs) if kind == "gated" else None
        self.joint_proj = (linear(2 * rank + hidden, 3 * rank, bias=True, dtype=dtype, rngs=rngs)
                           if kind == "rnn" else None)

    def prev_embedding(self, tokens):
        return self.markov_w1(tokens)

    def initial_state(self, lead_shape, dtype):
        return jnp.zeros((*lead_shape, self.rank), dtype)

    def latent_step(self, state, prev_tokens, hidden):
        """(next recurrent state, rank-r latent) for one block position; the bias is latent @ W2."""
        emb = self.prev_embedding(prev_tokens)
        if self.kind == "vanilla":
            return state, emb
        if self.kind == "gated":
            return state, jax.nn.sigmoid(self.gate_proj(jnp.concatenate([hidden, emb], axis=-1))) * emb
        gate, candidate, out = jnp.split(self.joint_proj(jnp.concatenate([state, emb, hidden], axis=-1)), 3, -1)
        gate = jax.nn.sigmoid(gate)
        state = gate * state + (1.0 - gate) * jnp.tanh(candidate)
        return state, jnp.tanh(out)

    def bias(self, latent):
        """B = latent @ W2 [..., V] fp32."""
        kernel = self.markov_w2.kernel[...]
        return jnp.einsum("...r,rv->...v", latent.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)

    def step(self, state, prev_tokens, hidden):
        """(next recurrent state, bias [..., V] fp32) for one block position."""
        state, latent = self.latent_step(state, prev_tokens, hidden)
        return state, self.bias(latent)

    def teacher_forced_latents(self, hidden, prev_tokens):
        """Latents [..., γ, r] of a whole block whose previous tokens are known (training).

        hidden [..., γ, H]; prev_tokens [..., γ]: the anchor, then the true token of each slot.
        Only the latents are returned: the [.., V] bias is formed later, a chunk of rows at a time.
        """
        state = self.initial_state(hidden.shape[:-2], hidden.dtype)
        latents = []
        for k in range(hidden.shape[-2]):
            state, latent = self.latent_step(state, prev_tokens[..., k], hidden[..., k, :])
            latents.append(latent)
        return jnp.stack(latents, axis=-2)


class ConfidenceHead(nnx.Module):
    """c_k = σ(w·[h_k ; W1[x_{k−1}]] + b); returns the logit (fp32)."""

    def __init__(self, in_features: int, *, dtype, rngs: nnx.Rngs):
        self.proj = linear(in_features, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, features):
        return self.proj(features)[..., 0].astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextCache:
    """Per-layer context K/V of the draft, paged like the target's cache (same page table)."""

    caches: list[LayerKV]


class DSparkDraft(nnx.Module):
    def __init__(self, config: DraftConfig, target_arch, *, dtype, rngs: nnx.Rngs):
        if config.kind not in ("dspark", "dflash"):
            raise ValueError(f"DSparkDraft: DraftConfig.kind={config.kind!r}; expected 'dspark' or 'dflash'")
        if not config.target_layer_ids:
            raise ValueError("DraftConfig.target_layer_ids is empty; DSpark needs target layers to read")
        if not 0 <= config.mask_token_id < target_arch.vocab_size:
            raise ValueError(f"DraftConfig.mask_token_id={config.mask_token_id}; expected a token id in "
                             f"[0, {target_arch.vocab_size})")
        bad = [i for i in config.target_layer_ids if not 0 <= i < target_arch.num_layers - 1]
        if bad:
            raise ValueError(f"DraftConfig.target_layer_ids {bad} out of range; expected 0..{target_arch.num_layers - 2}"
                             " (the last layer's output is only available after the final norm)")
        self.config = config
        hidden = target_arch.hidden_size
        self.layer_arch = dataclasses.replace(
            target_arch, num_layers=config.num_layers,
            intermediate_size=config.intermediate_size or target_arch.intermediate_size)
        eps = target_arch.rms_norm_eps
        self.fc = linear(len(config.target_layer_ids) * hidden, hidden, bias=False, dtype=dtype, rngs=rngs)
        self.hidden_norm = RMSNorm(hidden, eps=eps, dtype=dtype)
        self.layers = nnx.List([decoder_layer(self.layer_arch, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(hidden, eps=eps, dtype=dtype)
        heads = config.kind == "dspark"
        self.markov_head = (MarkovHead(config.markov_head, vocab=target_arch.vocab_size, rank=config.markov_rank,
                                       hidden=hidden, dtype=dtype, rngs=rngs) if heads else None)
        self.confidence_head = (ConfidenceHead(hidden + config.markov_rank, dtype=dtype, rngs=rngs)
                                if heads and config.confidence_head else None)
        # Sequential temperature scaling of the confidence logits, fitted after training.
        self.sts_temperatures = (1.0,) * config.block_size

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return tuple(self.config.target_layer_ids)

    def init_state(self, *, rows: int, num_pages: int, page_size: int, dtype) -> ContextCache:
        del rows
        heads_dims = [(self.layer_arch.num_kv_heads, self.layer_arch.head_dim)] * self.config.num_layers
        return ContextCache(init_kv_caches(heads_dims, num_pages=num_pages, page_size=page_size, dtype=dtype,
                                           mesh=model_mesh(self)))

    def context(self, features):
        """C = hidden_norm(fc(features)), the per-position context shared by all layers."""
        return self.hidden_norm(self.fc(features))

    def ingest(self, target, state: ContextCache, features, next_tokens, layout, rows) -> ContextCache:
        del target, next_tokens, rows  # the context cache is addressed through the layout's slots
        ctx = self.context(features)
        caches = []
        for layer, (k_pages, v_pages) in zip(self.layers, state.caches):
            k, v = layer.self_attn.project_kv(ctx, layout.positions)
            caches.append(kernels.write_kv(k_pages, v_pages, k, v, layout.meta.slot_mapping))
        return ContextCache(caches)

    def _blocks(self, target, anchors, starts, attn, gamma: int):
        """Final-normed hidden [..., γ, H] of blocks [x0, MASK…] at positions starts..starts+γ−1."""
        block = jnp.full((*anchors.shape, gamma), self.config.mask_token_id, jnp.int32).at[..., 0].set(anchors)
        x = target.embed(block)
        positions = starts[..., None] + jnp.arange(gamma)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, attn, i)
        return self.norm(x)

    def backbone(self, target, state: ContextCache, anchors, lens, page_table, gamma: int):
        """Final-normed block hidden states h [R, γ, H] for blocks [x0, MASK…] at positions lens..lens+γ−1."""
        return self._blocks(target, anchors, lens, DraftBlock(state.caches, page_table, lens), gamma)

    def training_blocks(self, target, features, tokens, anchors, gamma: int):
        """h [B, N, γ, H] for N blocks per whole sequence (training), each seeing the context before it.

        features [B, S, n·H] are the target's captured layers for every position, tokens [B, S];
        block n of sequence b starts at anchors[b, n] with token tokens[b, anchors[b, n]].
        """
        context = self.context(features)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        context_kv = [layer.self_attn.project_kv(context, positions) for layer in self.layers]
        first = jnp.take_along_axis(tokens, anchors, axis=1)
        return self._blocks(target, first, anchors, DenseDraftBlocks(context_kv, anchors), gamma)

    def calibrated_confidence(self, logits):
        """c_k = σ(z_k / T_k) for confidence logits [R, γ] (γ ≤ the trained block size)."""
        temps = jnp.asarray(self.sts_temperatures[:logits.shape[-1]], jnp.float32)
        return jax.nn.sigmoid(logits / temps)

    def confidence_logits(self, hidden, prev_tokens):
        if self.confidence_head is None:
            return None
        features = hidden
        if self.markov_head is not None:
            features = jnp.concatenate([hidden, self.markov_head.prev_embedding(prev_tokens).astype(hidden.dtype)], -1)
        return self.confidence_head(features)

    def sample_block(self, hidden, base, anchors, sampling, keys):
        """The sequential stage: γ steps of Markov bias + warp + sample (+ confidence) from block outputs.

        hidden [R, γ, H] and base logits [R, γ, V] come from the parallel stage; keys [R, γ].
        Returns (tokens [R, γ], probs [R, γ, V] fp32, confidence logits [R, γ] or None).
        """
        head = self.markov_head
        if head is None or head.kind == "vanilla":  # the loop the kernel dispatch covers
            w1 = w2 = None
            if head is not None:
                w1 = head.markov_w1.embedding[...].astype(head.markov_w1.dtype)  # as nnx.Embed promotes it
                w2 = head.markov_w2.kernel[...]
            tokens, probs = kernels.markov_sample(base, anchors, w1, w2, uniform_from_keys(keys), sampling)
        else:
            tokens, probs = self._sample_recurrent(hidden, base, anchors, sampling, keys)
        if self.confidence_head is None:
            return tokens, probs, None
        prev = jnp.concatenate([anchors[:, None], tokens[:, :-1]], axis=1)
        conf = [self.confidence_logits(hidden[:, k], prev[:, k]) for k in range(tokens.shape[1])]
        return tokens, probs, jnp.stack(conf, 1)

    def _sample_recurrent(self, hidden, base, anchors, sampling, keys):
        """The gated and RNN heads' loop: their bias depends on the block's hidden states and a state."""
        prev = anchors
        state = self.markov_head.initial_state((hidden.shape[0],), hidden.dtype)
        tokens, probs = [], []
        for k in range(hidden.shape[1]):
            state, bias = self.markov_head.step(state, prev, hidden[:, k])
            q = warp_probs(base[:, k] + bias, sampling)
            prev = sample_from_probs(q, keys[:, k])
            tokens.append(prev)
            probs.append(q)
        return jnp.stack(tokens, 1), jnp.stack(probs, 1)

    def propose(self, target, state: ContextCache, inputs: ProposeInputs):
        hidden = self.backbone(target, state, inputs.anchors, inputs.lens, inputs.page_table, inputs.gamma)
        tokens, probs, conf = self.sample_block(hidden, target.logits(hidden), inputs.anchors, inputs.sampling,
                                                inputs.keys)
        valid = jnp.full((inputs.anchors.shape[0],), inputs.gamma, jnp.int32)
        return Proposal(tokens=tokens, probs=probs, confidence_logits=conf, valid=valid), state
