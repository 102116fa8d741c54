"""The DSpark draft of a DeepSeek-V4 DSpark checkpoint: the target's own draft blocks `mtp.0..n−1`.

The blocks are window-only V4 blocks (attention over the last `sliding_window` positions, MoE,
mHC) that load with the target (models/deepseek_v4.py `DSparkBlock`); this drafter runs them
through the interface of base.py and shares their weights with the target. No reference
implementation of the draft's forward is public (the published loaders name its parts); this is
our reading of it, the paper's DSpark on V4 blocks:
- context: the target's outputs at `dspark_target_layer_ids`, each layer's mHC streams averaged
  into one hidden (the streams start as copies of the embedding), concatenated, projected by the
  first block's `main_proj` and normed by its `main_norm`; every block keeps K=V of the context
  positions (its own `wkv`, `kv_norm` and RoPE) in a per-slot ring of `sliding_window` entries;
- block: [x0, noise×(γ−1)] at positions p..p+γ−1 enters as the embedding's streams and runs the
  blocks, its queries seeing the context window before p and the whole block (not causal); the
  last block's `hc_head` collapse and `norm`, then the target's head, give the base logits;
- the last block's Markov head (rank-r bias of the previous token) and confidence head
  ([h_k ; W1[x_{k−1}]] → logit) work as in drafts/dspark.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels, sharding
from dspark_jax.config import DraftConfig
from dspark_jax.drafts.base import Proposal, ProposeInputs
from dspark_jax.models.common import apply_interleaved_rope, rope_inv_freq
from dspark_jax.speculative.sampling import uniform_from_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextWindows:
    """Per block: K=V [S, sliding_window, head_dim] of each slot's latest context positions (slot p % size)."""

    windows: list[jax.Array]


@dataclasses.dataclass
class _BlockLayout:
    positions: jax.Array  # [R·γ] what a V4 attention layer reads of its context's layout


class _BlockAttention:
    """The attention context of the draft blocks (see deepseek_v4.V4Context for the layers' side).

    Queries of row r sit at positions start[r]..start[r]+γ−1; they see row r's context keys at
    positions p < start[r] with p > q − window, and all γ keys of their own block.
    """

    def __init__(self, windows: list[jax.Array], start: jax.Array, gamma: int):
        self.windows, self.start, self.gamma = windows, start, gamma
        self.query_positions = start[:, None] + jnp.arange(gamma)[None, :]  # [R, γ]
        self.layout = _BlockLayout(self.query_positions.reshape(-1))

    def attend(self, layer: int, q, kv, *, sinks, scale: float, window: int, extra=None, selected=None):
        del extra, selected  # window-only layers
        rows, gamma = self.query_positions.shape
        heads, dim = q.shape[1:]
        ring = self.windows[layer]
        size = ring.shape[1]
        base = self.start[:, None] - size
        ring_positions = base + jnp.mod(jnp.arange(size)[None, :] - base, size)  # [R, size], latest = start − 1
        visible = (ring_positions >= 0)[:, None, :] & (
            ring_positions[:, None, :] > self.query_positions[:, :, None] - window)
        keys = jnp.concatenate([ring.astype(q.dtype), kv.reshape(rows, gamma, dim)], axis=1)
        mask = jnp.concatenate([visible, jnp.ones((rows, gamma, gamma), bool)], axis=2)[:, :, None, :]
        scores = jnp.einsum("rqhd,rkd->rqhk", q.reshape(rows, gamma, heads, dim), keys,
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask, scores, -jnp.inf)
        sink = sinks.astype(jnp.float32)[None, None, :, None]
        top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
        weights = jnp.exp(scores - top)
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top))
        out = jnp.einsum("rqhk,rkd->rqhd", weights.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
        return out.reshape(rows * gamma, heads, dim).astype(q.dtype)


class V4DSparkDraft(nnx.Module):
    def __init__(self, config: DraftConfig, target):
        arch = target.arch
        if not arch.dspark_block_size:
            raise ValueError("the DeepSeek-V4 target carries no DSpark draft blocks (dspark_block_size=0: a base "
                             "checkpoint); use a DSpark revision, or draft.kind='ngram'")
        expected = dict(block_size=f"<= {arch.dspark_block_size} (dspark_block_size)",
                        num_layers=arch.num_mtp_layers, target_layer_ids=tuple(arch.dspark_target_layer_ids),
                        mask_token_id=arch.dspark_noise_token_id, markov_rank=arch.dspark_markov_rank,
                        markov_head="vanilla")
        for name, value in expected.items():
            ok = config.block_size <= arch.dspark_block_size if name == "block_size" else getattr(config, name) == value
            if not ok:
                raise ValueError(f"DraftConfig.{name}={getattr(config, name)!r}; the V4 checkpoint's DSpark blocks "
                                 f"expect {value!r}")
        self.config = config
        self.arch = arch
        self.blocks = target.mtp  # the target's own modules: the weights are shared, not copied
        self.sts_temperatures = (1.0,) * config.block_size

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return tuple(self.arch.dspark_target_layer_ids)

    @property
    def confidence_head(self):
        return self.blocks[-1].confidence_head

    def init_state(self, *, rows: int, num_pages: int, page_size: int, dtype) -> ContextWindows:
        del num_pages, page_size  # per-slot rings, no pages
        shape = (rows, self.arch.sliding_window, self.arch.head_dim)
        # on the draft's mesh, replicated like the target's V4 state (one K=V head: no axis to split)
        return ContextWindows([sharding.zeros(shape, dtype, (), sharding.model_mesh(self)) for _ in self.blocks])

    def context(self, features):
        """C [T, H]: the captured layers' streams [T, n·hc·H] averaged per layer, projected and normed."""
        a, first = self.arch, self.blocks[0]
        per_layer = features.reshape(features.shape[0], len(a.dspark_target_layer_ids), a.hc_mult, a.hidden_size)
        mean = jnp.mean(per_layer.astype(jnp.float32), axis=2).astype(features.dtype)
        return first.main_norm(first.main_proj(mean.reshape(features.shape[0], -1)))

    def ingest(self, target, state: ContextWindows, features, next_tokens, layout, rows) -> ContextWindows:
        del target, next_tokens  # the context is the target's features alone
        context = self.context(features)
        positions = layout.positions
        size = self.arch.sliding_window
        end = layout.meta.kv_lens[layout.token_req]
        keep = layout.valid & (positions >= end - size)  # each row's latest `size` positions of this batch
        row = jnp.where(keep, rows[layout.token_req], state.windows[0].shape[0])
        windows = []
        for block, ring in zip(self.blocks, state.windows):
            attn = block.attn
            kv = attn.kv_norm(attn.wkv(context))[:, None, :]
            kv = apply_interleaved_rope(kv, positions, rope_inv_freq(*attn.rope))[:, 0, :]
            windows.append(ring.at[row, jnp.mod(positions, size)].set(kv.astype(ring.dtype), mode="drop"))
        return ContextWindows(windows)

    def calibrated_confidence(self, logits):
        """c_k = σ(z_k / T_k) for confidence logits [R, γ]."""
        return jax.nn.sigmoid(logits / jnp.asarray(self.sts_temperatures[:logits.shape[-1]], jnp.float32))

    def propose(self, target, state: ContextWindows, inputs: ProposeInputs):
        rows, gamma = inputs.anchors.shape[0], inputs.gamma
        slots = jnp.arange(rows) if inputs.rows is None else inputs.rows
        block = jnp.full((rows, gamma), self.config.mask_token_id, jnp.int32).at[:, 0].set(inputs.anchors)
        tokens = block.reshape(-1)
        ctx = _BlockAttention([jnp.take(w, slots, axis=0, mode="clip") for w in state.windows], inputs.lens, gamma)
        streams = target.embed_streams(tokens)
        for k, draft_block in enumerate(self.blocks):
            streams = draft_block(streams, tokens, ctx, k)
        last = self.blocks[-1]
        hidden = last.norm(last.collapse_streams(streams)).reshape(rows, gamma, -1)
        head = last.markov_head
        w1 = head.markov_w1.embedding[...]
        w2 = head.markov_w2.dense_weight(w1.dtype).T  # [rank, V]
        drafted, probs = kernels.markov_sample(target.logits(hidden), inputs.anchors, w1, w2,
                                               uniform_from_keys(inputs.keys), inputs.sampling)
        prev = jnp.concatenate([inputs.anchors[:, None], drafted[:, :-1]], axis=1)
        features = jnp.concatenate([hidden, w1[prev].astype(hidden.dtype)], axis=-1)
        confidence = last.confidence_head.proj(features)[..., 0].astype(jnp.float32)
        proposal = Proposal(tokens=drafted, probs=probs, confidence_logits=confidence,
                            valid=jnp.full((rows,), gamma, jnp.int32))
        return proposal, state
