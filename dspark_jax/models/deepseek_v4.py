"""DeepSeek-V4 as an NNX module, computed as HF transformers' `deepseek_v4` computes it.

Module paths are the official checkpoint names (`layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.w1`
stacked over experts, `hc_head_fn`, `mtp.0.main_proj`, ...); checkpoint/deepseek_v4.py maps them.

What a layer does (T flat tokens, residual stream of `hc_mult` parallel copies [T, hc, D]):
- mHC: from the RMS-normed flattened streams a linear map gives `pre` (collapses the streams into
  the block input), `post` (spreads the block output back) and `comb` (hc×hc, Sinkhorn-projected
  towards doubly stochastic); streams ← post ⊗ block(norm(Σ pre·streams)) + combᵀ · streams.
  This wraps the attention and the MoE.
- Attention: low-rank queries (wq_a → q_norm → wq_b, then a weightless per-head RMSNorm), one
  K=V head (wkv → kv_norm), interleaved RoPE on the last `rope_head_dim` dims, a per-head sink
  logit, the rope slice of the output turned back by the query's angle, and a grouped low-rank
  output projection (wo_a block-diagonal over `o_groups`, then wo_b). Every layer sees the last
  `sliding_window` tokens; compressed layers also see compressed entries:
  HCA (ratio m=128): entry w pools tokens [w·m, (w+1)·m) by a softmax gate (+ learned `ape`),
    then kv norm and RoPE at position w·m; every completed entry is visible.
  CSA (ratio 4): the projections are twice as wide; entry w pools the previous window's first
    half with the current window's second half (8 slots), and a Lightning Indexer (its own
    compressor at `index_head_dim`, queries from the q_lora activations) keeps the top
    `index_topk` completed entries per query.
  Window-only layers use RoPE θ=rope_theta; compressed layers θ=compress_rope_theta with YaRN.
- MoE: sqrt-softplus router, hash routing in the first `num_hash_layers` layers, clamped SwiGLU
  experts plus a shared expert (models/moe.py).

One forward serves both modes through `V4Context`: whole sequences (HF's forward; `DenseCausal`
from `models.forward` is turned into a context without state) and incremental steps over a flat
ragged token batch with per-row decoding state (`V4State`): prefill chunks, single-token
decode, verification chunks. Rows advance by their committed length: a step's trailing tokens
may be rejected (not advanced over) as long as there are at most `V4State.rollback` of them.

`capture` returns each requested layer's raw output: its mHC streams flattened stream-major,
[..., hc_mult·hidden_size] (reshape to [..., hc_mult, hidden_size] for the streams).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import sharding
from dspark_jax.config import DeepseekV4Arch
from dspark_jax.models.attention import DenseCausal
from dspark_jax.models.common import RMSNorm, apply_interleaved_rope, embedding, rope_inv_freq
from dspark_jax.models.moe import MoE
from dspark_jax.models.quant import Linear

_HIGHEST = jax.lax.Precision.HIGHEST


def _norm(dim: int, eps: float) -> RMSNorm:
    # V4 keeps norm weights in fp32 and multiplies in fp32 before casting back.
    return RMSNorm(dim, eps=eps, dtype=jnp.float32, scale_in_fp32=True)


def _unit_rms(x: jax.Array, eps: float) -> jax.Array:
    """Weightless RMSNorm in fp32 (the mHC input norm and the per-head query norm)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _fp32_param(shape, rngs: nnx.Rngs, stddev: float = 0.02, axes: tuple = ()) -> nnx.Param:
    return nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), shape, jnp.float32), **sharding.logical(*axes))


# --------------------------------------------------------------------------------------------
# incremental decoding state and the attention context


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class V4LayerState:
    """One layer's decoding state for N rows.

    Rings hold per-position data of the latest positions at slot `position % ring size`:
    `window` the K=V of the last positions; `comp_src`/`index_src` the compressor's (kv ‖ gate)
    projections of positions whose window is not complete yet (or whose Ca half the next CSA
    entry still needs). `comp`/`index` hold compressed entries (and indexer keys) by entry index.
    """

    window: jax.Array  # [N, ring_w, head_dim]
    comp_src: jax.Array | None  # [N, ring_c, 2·width]
    comp: jax.Array | None  # [N, entries, head_dim]
    index_src: jax.Array | None  # [N, ring_c, 2·2·index_head_dim] (CSA)
    index: jax.Array | None  # [N, entries, index_head_dim] (CSA)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class V4State:
    """Decoding state of every layer; `rollback` = the most trailing tokens of a step that may be rejected."""

    layers: list[V4LayerState]
    rollback: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class V4Layout:
    """A flat ragged token batch: request r owns tokens cu_q_lens[r]:cu_q_lens[r+1] at positions
    start[r]… and state row rows[r] (out of range: a padding request whose writes are dropped)."""

    positions: jax.Array  # [T] int32 (0 for padding tokens)
    token_req: jax.Array  # [T] int32
    token_slot: jax.Array  # [T] int32 index among the request's queries
    valid: jax.Array  # [T] bool
    cu_q_lens: jax.Array  # [R+1] int32
    start: jax.Array  # [R] int32 position of each request's first token (= its cached length)
    rows: jax.Array  # [R] int32
    max_q_len: int = dataclasses.field(metadata=dict(static=True))
    max_len: int = dataclasses.field(metadata=dict(static=True))  # ≥ every start + q_len


def v4_layout(start, q_lens, rows, *, num_tokens: int, max_q_len: int, max_len: int) -> V4Layout:
    """Flatten q_lens[r] tokens per request (from position start[r]) into num_tokens slots; in or out of jit."""
    start, q_lens, rows = (jnp.asarray(a, jnp.int32) for a in (start, q_lens, rows))
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens, dtype=jnp.int32)])
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    req = jnp.clip(jnp.searchsorted(cu[1:], token, side="right"), 0, start.shape[0] - 1).astype(jnp.int32)
    valid = token < cu[-1]
    slot = jnp.where(valid, token - cu[req], 0)
    return V4Layout(positions=jnp.where(valid, start[req] + slot, 0), token_req=req, token_slot=slot, valid=valid,
                    cu_q_lens=cu, start=start, rows=rows, max_q_len=max_q_len, max_len=max_len)


def _ring_positions(start: jax.Array, size: int) -> jax.Array:
    """[R, size] position each ring slot holds when a request's latest written position is start−1."""
    base = start[:, None] - size
    return base + jnp.mod(jnp.arange(size)[None, :] - base, size)


class V4Context:
    """How attention layers find their keys: whole sequences (`state=None`) or a step over `V4State`.

    Layers call `attend` and `compressed`; the context reads the rows' state, writes this step's
    positions into it, and collects the new state (`new_state()`).
    """

    def __init__(self, layout: V4Layout, state: V4State | None):
        self.layout = layout
        self.state = state
        self.layers = list(state.layers) if state is not None else None

    @staticmethod
    def dense(batch: int, seq: int) -> "V4Context":
        """A stateless context for `batch` rows of whole sequences, each at positions 0..seq−1."""
        layout = v4_layout(jnp.zeros((batch,), jnp.int32), jnp.full((batch,), seq, jnp.int32), jnp.arange(batch),
                           num_tokens=batch * seq, max_q_len=seq, max_len=seq)
        return V4Context(layout, None)

    def new_state(self) -> V4State:
        return V4State(self.layers, self.state.rollback)

    # -- layout helpers

    def grid(self, x: jax.Array) -> jax.Array:
        """Flat [T, ...] → per-request [R, Q, ...] (zeros past each request's tokens)."""
        m = self.layout
        slot = jnp.arange(m.max_q_len)
        q_lens = m.cu_q_lens[1:] - m.cu_q_lens[:-1]
        flat = jnp.where(slot[None, :] < q_lens[:, None], m.cu_q_lens[:-1, None] + slot[None, :], x.shape[0])
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[flat]

    def _query_positions(self) -> tuple[jax.Array, jax.Array]:
        m = self.layout
        slot = jnp.arange(m.max_q_len)
        q_lens = m.cu_q_lens[1:] - m.cu_q_lens[:-1]
        return m.start[:, None] + slot[None, :], slot[None, :] < q_lens[:, None]

    def _row_of(self, states: jax.Array) -> jax.Array:
        """State row of each request, clipped for reads (padding requests read row 0 and never write)."""
        return jnp.minimum(self.layout.rows, states.shape[0] - 1)

    def _write_ring(self, ring: jax.Array, values: jax.Array) -> jax.Array:
        """Store each request's latest ring-size positions of this step at slot position % size."""
        m = self.layout
        size = ring.shape[1]
        end = m.start + (m.cu_q_lens[1:] - m.cu_q_lens[:-1])
        keep = m.valid & (m.positions >= end[m.token_req] - size)
        row = jnp.where(keep, m.rows[m.token_req], ring.shape[0])
        return ring.at[row, jnp.mod(m.positions, size)].set(values.astype(ring.dtype), mode="drop")

    # -- the two services layers use

    def compressed(self, layer: int, name: str, compressor: "Compressor", x: jax.Array):
        """(entries [N, capacity, width], row of each request [R]) after this step's windows complete.

        Request r's entry w is entries[row[r], w]; it is complete (and may be attended) for a query
        at position p iff w < (p+1) // ratio. Callers gather what they read from the buffer itself.
        """
        m = self.layout
        ratio, width = compressor.ratio, compressor.head_dim
        num_entries = m.max_len // ratio
        proj = compressor.project(x)  # [T, 2·cw]: kv ‖ gate
        span = compressor.span
        # Tokens that complete a window: at most T // ratio + R of them in any layout.
        completes = m.valid & (jnp.mod(m.positions + 1, ratio) == 0)
        count = min(x.shape[0], x.shape[0] // ratio + m.start.shape[0])
        tok = jnp.nonzero(completes, size=count, fill_value=x.shape[0])[0]
        live = tok < x.shape[0]
        tok = jnp.minimum(tok, x.shape[0] - 1)
        req = m.token_req[tok]
        src = m.positions[tok, None] - span + 1 + jnp.arange(span)[None, :]  # [C, span] source positions
        in_step = src >= m.start[req][:, None]
        flat = m.cu_q_lens[req][:, None] + src - m.start[req][:, None]
        values = proj[jnp.clip(flat, 0, x.shape[0] - 1)]
        valid = in_step & live[:, None]
        src_name, entries_name = f"{name}_src", name
        if self.layers is not None:
            layer_state = self.layers[layer]
            ring = getattr(layer_state, src_name)
            from_ring = ring[self._row_of(ring)[req][:, None], jnp.mod(src, ring.shape[1])]
            values = jnp.where(in_step[..., None], values, from_ring)
            valid = valid | (~in_step & (src >= 0) & live[:, None])
            entries = getattr(layer_state, entries_name)
        else:
            entries = jnp.zeros((m.start.shape[0], num_entries, width), x.dtype)
        window = (m.positions[tok] + 1) // ratio - 1
        new = compressor.pool(values, valid, window * ratio)
        row = jnp.where(live, m.rows[req], entries.shape[0])
        entries = entries.at[row, window].set(new.astype(entries.dtype), mode="drop")
        if self.layers is not None:
            ring = self._write_ring(getattr(self.layers[layer], src_name), proj)
            self.layers[layer] = dataclasses.replace(self.layers[layer], **{src_name: ring, entries_name: entries})
            return entries, self._row_of(entries)
        return entries, m.rows

    def attend(self, layer: int, q, kv, *, sinks, scale: float, window: int, extra=None, selected=None):
        """Softmax attention (fp32, with per-head sink logits) of q [T, H, D] over:
        the last `window` positions' K=V (earlier steps' from the ring, then this step's kv [T, D]);
        `extra` = (keys [R, E, D], mask [R, Q, E]) shared by a request's queries;
        `selected` = (keys [T, k, D], mask [T, k]) per query. Returns [T, H, D] (zeros for padding)."""
        m = self.layout
        q_pos, q_valid = self._query_positions()
        keys, key_pos = self.grid(kv), q_pos
        key_ok = q_valid
        if self.layers is not None:
            ring = self.layers[layer].window
            keys = jnp.concatenate([ring[self._row_of(ring)], keys], axis=1)
            ring_pos = _ring_positions(m.start, ring.shape[1])
            key_pos = jnp.concatenate([ring_pos, key_pos], axis=1)
            key_ok = jnp.concatenate([ring_pos >= 0, key_ok], axis=1)
            self.layers[layer] = dataclasses.replace(self.layers[layer], window=self._write_ring(ring, kv))
        mask = (key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
                & (key_pos[:, None, :] > q_pos[:, :, None] - window))
        if extra is not None:
            keys = jnp.concatenate([keys, extra[0].astype(keys.dtype)], axis=1)
            mask = jnp.concatenate([mask, extra[1]], axis=2)
        qg = self.grid(q)  # [R, Q, H, D]
        scores = [jnp.einsum("rqhd,rkd->rqhk", qg, keys, preferred_element_type=jnp.float32)]
        masks = [mask[:, :, None, :]]
        if selected is not None:
            sel_keys, sel_mask = self.grid(selected[0]).astype(qg.dtype), self.grid(selected[1])
            scores.append(jnp.einsum("rqhd,rqkd->rqhk", qg, sel_keys, preferred_element_type=jnp.float32))
            masks.append(sel_mask[:, :, None, :])
        scores = [jnp.where(mk, s * scale, -jnp.inf) for s, mk in zip(scores, masks)]
        sink = sinks.astype(jnp.float32)[None, None, :, None]
        top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores], sink)
        probs = [jnp.exp(s - top) for s in scores]
        denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs) + jnp.exp(sink - top)
        out = jnp.einsum("rqhk,rkd->rqhd", (probs[0] / denom).astype(keys.dtype), keys,
                         preferred_element_type=jnp.float32)
        if selected is not None:
            out = out + jnp.einsum("rqhk,rqkd->rqhd", (probs[1] / denom).astype(sel_keys.dtype), sel_keys,
                                   preferred_element_type=jnp.float32)
        out = out[m.token_req, m.token_slot]
        return jnp.where(m.valid[:, None, None], out, 0.0).astype(q.dtype)

    def entry_mask(self, num_entries: int, ratio: int) -> jax.Array:
        """[R, Q, E] completed-entry visibility: entry w for a query at p iff w < (p+1) // ratio."""
        q_pos, q_valid = self._query_positions()
        visible = jnp.arange(num_entries)[None, None, :] < ((q_pos + 1) // ratio)[:, :, None]
        return visible & q_valid[:, :, None]


# --------------------------------------------------------------------------------------------
# attention


class Compressor(nnx.Module):
    """Softmax-gated pooling of `ratio` tokens (HCA) or, overlapped, of 2·ratio half-width slots (CSA).

    `wkv`, `wgate` [cw, H] with cw = head_dim (HCA) or 2·head_dim (CSA), `ape` [ratio, cw] the
    position-in-window gate bias, `norm` the kv norm; entries get RoPE at the window's first position.
    """

    def __init__(self, hidden: int, head_dim: int, ratio: int, *, overlap: bool, eps: float, rope: tuple,
                 dtype, rngs: nnx.Rngs):
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.span = 2 * ratio if overlap else ratio
        width = 2 * head_dim if overlap else head_dim
        self.wkv = Linear(hidden, width, fp8=False, dtype=dtype, rngs=rngs)
        self.wgate = Linear(hidden, width, fp8=False, dtype=dtype, rngs=rngs)
        self.ape = _fp32_param((ratio, width), rngs)
        self.norm = _norm(head_dim, eps)
        self.rope = rope

    def project(self, x: jax.Array) -> jax.Array:
        """[T, 2·cw]: the kv and gate projections of each token, side by side."""
        return jnp.concatenate([self.wkv(x), self.wgate(x)], axis=-1)

    def pool(self, values: jax.Array, valid: jax.Array, positions: jax.Array) -> jax.Array:
        """Entries [C, head_dim] from the (kv ‖ gate) of their `span` source positions [C, span, 2·cw]."""
        width = values.shape[-1] // 2
        kv = values[..., :width].astype(jnp.float32)
        gate = values[..., width:].astype(jnp.float32) + jnp.tile(self.ape[...], (self.span // self.ratio, 1))
        if self.overlap:
            # Slots 0..r−1 (the previous window) take the first half, r..2r−1 (this window) the second.
            d, r = self.head_dim, self.ratio
            kv = jnp.concatenate([kv[:, :r, :d], kv[:, r:, d:]], axis=1)
            gate = jnp.concatenate([gate[:, :r, :d], gate[:, r:, d:]], axis=1)
        gate = jnp.where(valid[..., None], gate, -jnp.inf)
        pooled = jnp.sum(jax.nn.softmax(gate, axis=1) * kv, axis=1).astype(values.dtype)
        pooled = self.norm(pooled)
        return apply_interleaved_rope(pooled[:, None, :], positions, rope_inv_freq(*self.rope))[:, 0, :]


class Indexer(nnx.Module):
    """Lightning Indexer: score_t(s) = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s) / √c over compressed keys k."""

    def __init__(self, arch: DeepseekV4Arch, rope: tuple, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.topk = arch.index_n_heads, arch.index_head_dim, arch.index_topk
        # Indexer heads split over a tensor mesh; their weighted sum over heads is then all-reduced.
        self.wq_b = Linear(arch.q_lora_rank, self.num_heads * self.head_dim, fp8=arch.weight_format == "fp8",
                           dtype=dtype, rngs=rngs, axes=("index_heads", None))
        self.weights_proj = Linear(arch.hidden_size, self.num_heads, fp8=False, dtype=dtype, rngs=rngs,
                                   axes=("index_heads", None))
        self.compressor = Compressor(arch.hidden_size, self.head_dim, arch.csa_ratio, overlap=True,
                                     eps=arch.rms_norm_eps, rope=rope, dtype=dtype, rngs=rngs)
        self.rope = rope

    def select(self, ctx: V4Context, q_lora: jax.Array, x: jax.Array, keys: jax.Array, visible: jax.Array):
        """(entry ids [T, k], valid [T, k]) of the top-k visible entries per query; keys [R, E, c]."""
        m = ctx.layout
        q = self.wq_b(q_lora).reshape(-1, self.num_heads, self.head_dim)
        q = apply_interleaved_rope(q, m.positions, rope_inv_freq(*self.rope))
        weights = self.weights_proj(x).astype(jnp.float32) * self.num_heads ** -0.5
        dots = jnp.einsum("rqhc,rec->rqhe", ctx.grid(q).astype(jnp.float32), keys.astype(jnp.float32),
                          precision=_HIGHEST)
        scores = jnp.einsum("rqhe,rqh->rqe", jax.nn.relu(dots) * self.head_dim ** -0.5, ctx.grid(weights),
                            precision=_HIGHEST)
        scores = jnp.where(visible, scores, -jnp.inf)[m.token_req, m.token_slot]
        top, ids = jax.lax.top_k(scores, min(self.topk, keys.shape[1]))
        return ids, top > -jnp.inf


class Attention(nnx.Module):
    def __init__(self, arch: DeepseekV4Arch, layer_type: str, *, dtype, rngs: nnx.Rngs):
        fp8 = arch.weight_format == "fp8"
        hidden, heads, head_dim = arch.hidden_size, arch.num_heads, arch.head_dim
        self.num_heads, self.head_dim, self.window = heads, head_dim, arch.sliding_window
        self.o_groups, self.eps = arch.o_groups, arch.rms_norm_eps
        compressed = layer_type != "sliding_attention"
        # (rotary dims, θ, scaling): window-only layers plain RoPE, compressed layers YaRN at their own θ.
        self.rope = ((arch.rope_head_dim, arch.compress_rope_theta, arch.rope_scaling) if compressed
                     else (arch.rope_head_dim, arch.rope_theta, None))
        self.wq_a = Linear(hidden, arch.q_lora_rank, fp8=fp8, dtype=dtype, rngs=rngs)
        self.q_norm = _norm(arch.q_lora_rank, arch.rms_norm_eps)
        # Query heads split over a tensor mesh; the single K=V head and the low-rank paths are replicated.
        self.wq_b = Linear(arch.q_lora_rank, heads * head_dim, fp8=fp8, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.wkv = Linear(hidden, head_dim, fp8=fp8, dtype=dtype, rngs=rngs)
        self.kv_norm = _norm(head_dim, arch.rms_norm_eps)
        # wo_a is block-diagonal: o_groups blocks of [o_lora_rank, heads·head_dim / o_groups], stacked.
        # Split by whole groups (each a run of heads), so a device's heads meet its own wo_a blocks.
        self.wo_a = Linear(heads * head_dim // arch.o_groups, arch.o_groups * arch.o_lora_rank, fp8=fp8, dtype=dtype,
                           rngs=rngs, axes=("o_groups", None))
        self.wo_b = Linear(arch.o_groups * arch.o_lora_rank, hidden, fp8=fp8, dtype=dtype, rngs=rngs,
                           axes=(None, "o_groups"))
        self.attn_sink = _fp32_param((heads,), rngs, axes=("heads",))
        if layer_type == "heavily_compressed_attention":
            self.compressor = Compressor(hidden, head_dim, arch.hca_ratio, overlap=False, eps=arch.rms_norm_eps,
                                         rope=self.rope, dtype=dtype, rngs=rngs)
        elif layer_type == "compressed_sparse_attention":
            self.compressor = Compressor(hidden, head_dim, arch.csa_ratio, overlap=True, eps=arch.rms_norm_eps,
                                         rope=self.rope, dtype=dtype, rngs=rngs)
        else:
            self.compressor = None
        self.indexer = Indexer(arch, self.rope, dtype=dtype, rngs=rngs) \
            if layer_type == "compressed_sparse_attention" else None

    def __call__(self, x: jax.Array, ctx: V4Context, layer: int) -> jax.Array:
        positions = ctx.layout.positions
        inv_freq = rope_inv_freq(*self.rope)
        q_lora = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lora).reshape(-1, self.num_heads, self.head_dim)
        q = apply_interleaved_rope(_unit_rms(q, self.eps).astype(x.dtype), positions, inv_freq)
        kv = apply_interleaved_rope(self.kv_norm(self.wkv(x))[:, None, :], positions, inv_freq)[:, 0, :]
        extra = selected = None
        if self.compressor is not None:
            # Both compressors advance their state every step, whether or not an entry is visible yet.
            entries, rows = ctx.compressed(layer, "comp", self.compressor, x)
            if self.indexer is not None:
                keys, key_rows = ctx.compressed(layer, "index", self.indexer.compressor, x)
            count = min(ctx.layout.max_len // self.compressor.ratio, entries.shape[1])  # entries a query may see
            visible = ctx.entry_mask(count, self.compressor.ratio)
            if count and self.indexer is None:
                extra = (entries[rows, :count], visible)
            elif count:
                ids, ok = self.indexer.select(ctx, q_lora, x, keys[key_rows, :count], visible)
                # Only the picked entries are read, straight from the buffer.
                selected = (entries[rows[ctx.layout.token_req][:, None], ids], ok)
        out = ctx.attend(layer, q, kv, sinks=self.attn_sink[...], scale=self.head_dim ** -0.5, window=self.window,
                         extra=extra, selected=selected)
        # K = V carries RoPE on its tail; turning the output back by the query's angle keeps each
        # key's contribution a function of the relative distance only.
        out = apply_interleaved_rope(out, positions, inv_freq, inverse=True)
        groups = out.reshape(-1, self.o_groups, self.num_heads * self.head_dim // self.o_groups)
        wo_a = self.wo_a.dense_weight(x.dtype).reshape(self.o_groups, -1, groups.shape[-1])
        lowrank = jnp.einsum("tgi,goi->tgo", groups, wo_a, preferred_element_type=jnp.float32).astype(x.dtype)
        return self.wo_b(lowrank.reshape(lowrank.shape[0], -1))


# --------------------------------------------------------------------------------------------
# manifold-constrained hyper-connections


def hc_weights(streams, fn, base, scale, *, hc: int, eps: float, hc_eps: float, sinkhorn_iters: int):
    """(pre [T, hc], post [T, hc], comb [T, hc, hc]) in fp32 from streams [T, hc, D]."""
    flat = _unit_rms(streams.reshape(streams.shape[0], -1), eps)
    mixes = jnp.einsum("ti,oi->to", flat, fn[...], precision=_HIGHEST)
    base, scale = base[...], scale[...]
    pre = jax.nn.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[:, 2 * hc:].reshape(-1, hc, hc) * scale[2] + base[2 * hc:].reshape(hc, hc)
    comb = jax.nn.softmax(comb, axis=-1) + hc_eps
    # Sinkhorn-Knopp towards a doubly stochastic matrix: columns first, then rows and columns.
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + hc_eps)

    def rows_then_columns(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + hc_eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + hc_eps)

    # A loop, not unrolled: 20 iterations per mix site would dominate compile times.
    return pre, post, jax.lax.fori_loop(0, sinkhorn_iters - 1, rows_then_columns, comb)


def hc_collapse(streams: jax.Array, pre: jax.Array) -> jax.Array:
    """Σ_i pre_i · stream_i [T, D] in the streams' dtype."""
    return jnp.einsum("th,thd->td", pre, streams.astype(jnp.float32), precision=_HIGHEST).astype(streams.dtype)


def hc_expand(streams: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """New streams: post ⊗ block output + combᵀ · old streams (comb[j, k] moves stream j into k)."""
    mixed = jnp.einsum("tjk,tjd->tkd", comb, streams.astype(jnp.float32), precision=_HIGHEST)
    return (post[:, :, None] * out.astype(jnp.float32)[:, None, :] + mixed).astype(streams.dtype)


def _hc_params(prefix: str, owner: nnx.Module, arch: DeepseekV4Arch, rngs: nnx.Rngs, outputs: int) -> None:
    hc = arch.hc_mult
    setattr(owner, f"{prefix}_fn", _fp32_param((outputs, hc * arch.hidden_size), rngs))
    setattr(owner, f"{prefix}_base", nnx.Param(jnp.zeros((outputs,), jnp.float32)))
    setattr(owner, f"{prefix}_scale", nnx.Param(jnp.ones((3 if outputs > hc else 1,), jnp.float32)))


# --------------------------------------------------------------------------------------------
# blocks and the model


class Block(nnx.Module):
    """One V4 layer: mHC around attention and around the MoE."""

    def __init__(self, arch: DeepseekV4Arch, layer_type: str, hash_routing: bool, *, dtype, rngs: nnx.Rngs):
        self.arch = arch
        self.attn_norm = _norm(arch.hidden_size, arch.rms_norm_eps)
        self.attn = Attention(arch, layer_type, dtype=dtype, rngs=rngs)
        self.ffn_norm = _norm(arch.hidden_size, arch.rms_norm_eps)
        self.ffn = MoE(arch.hidden_size, arch.moe_intermediate_size, num_experts=arch.n_routed_experts,
                       top_k=arch.num_experts_per_tok, vocab_size=arch.vocab_size, hash_routing=hash_routing,
                       scaling=arch.routed_scaling_factor, limit=arch.swiglu_limit,
                       quantized=arch.weight_format == "fp8", dtype=dtype, rngs=rngs)
        outputs = (2 + arch.hc_mult) * arch.hc_mult
        _hc_params("hc_attn", self, arch, rngs, outputs)
        _hc_params("hc_ffn", self, arch, rngs, outputs)

    def _mix(self, prefix: str, streams):
        a = self.arch
        return hc_weights(streams, getattr(self, f"{prefix}_fn"), getattr(self, f"{prefix}_base"),
                          getattr(self, f"{prefix}_scale"), hc=a.hc_mult, eps=a.rms_norm_eps, hc_eps=a.hc_eps,
                          sinkhorn_iters=a.hc_sinkhorn_iters)

    def __call__(self, streams: jax.Array, tokens: jax.Array, ctx: V4Context, layer: int) -> jax.Array:
        pre, post, comb = self._mix("hc_attn", streams)
        out = self.attn(self.attn_norm(hc_collapse(streams, pre)), ctx, layer)
        streams = hc_expand(streams, out, post, comb)
        pre, post, comb = self._mix("hc_ffn", streams)
        out = self.ffn(self.ffn_norm(hc_collapse(streams, pre)), tokens)
        return hc_expand(streams, out, post, comb)


class HeadCollapse:
    """The final stream collapse (`hc_head_*`) shared by the model and the DSpark blocks' heads."""

    def collapse_streams(self, streams: jax.Array) -> jax.Array:
        a = self.arch
        flat = _unit_rms(streams.reshape(streams.shape[0], -1), a.rms_norm_eps)
        mixes = jnp.einsum("ti,oi->to", flat, self.hc_head_fn[...], precision=_HIGHEST)
        pre = jax.nn.sigmoid(mixes * self.hc_head_scale[...] + self.hc_head_base[...]) + a.hc_eps
        return hc_collapse(streams, pre)


class MarkovHead(nnx.Module):
    """DSpark's vanilla Markov head of a V4 DSpark checkpoint: bias(x_prev) = markov_w1[x_prev] · markov_w2ᵀ."""

    def __init__(self, vocab: int, rank: int, *, dtype, rngs: nnx.Rngs):
        self.markov_w1 = embedding(vocab, rank, dtype=dtype, rngs=rngs)
        self.markov_w2 = Linear(rank, vocab, fp8=False, dtype=dtype, rngs=rngs, axes=("vocab", None))


class ConfidenceHead(nnx.Module):
    """DSpark's confidence head of a V4 DSpark checkpoint: logit = proj([h ; markov_w1[x_prev]]) (no bias)."""

    def __init__(self, in_features: int, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(in_features, 1, fp8=False, dtype=dtype, rngs=rngs)


class DSparkBlock(Block, HeadCollapse):
    """A DSpark draft block `mtp.K` of a V4 DSpark checkpoint: a window-only V4 block with learned
    routing; the first also fuses the target features (`main_proj` [H, n·H], `main_norm`), the last
    carries the output collapse (`hc_head_*`, `norm`) and the Markov and confidence heads. The draft
    (drafts/) runs them; the target only loads them."""

    def __init__(self, arch: DeepseekV4Arch, index: int, *, dtype, rngs: nnx.Rngs):
        super().__init__(arch, "sliding_attention", False, dtype=dtype, rngs=rngs)
        hidden, count = arch.hidden_size, arch.num_mtp_layers
        fp8 = arch.weight_format == "fp8"
        if index == 0:
            self.main_proj = Linear(len(arch.dspark_target_layer_ids) * hidden, hidden, fp8=fp8, dtype=dtype,
                                    rngs=rngs)
            self.main_norm = _norm(hidden, arch.rms_norm_eps)
        if index == count - 1:
            _hc_params("hc_head", self, arch, rngs, arch.hc_mult)
            self.norm = _norm(hidden, arch.rms_norm_eps)
            self.markov_head = MarkovHead(arch.vocab_size, arch.dspark_markov_rank, dtype=dtype, rngs=rngs)
            self.confidence_head = ConfidenceHead(hidden + arch.dspark_markov_rank, dtype=dtype, rngs=rngs)


class DeepseekV4ForCausalLM(nnx.Module, HeadCollapse):
    def __init__(self, arch: DeepseekV4Arch, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.arch = arch
        self.dtype = jnp.dtype(dtype)
        self.embed = embedding(arch.vocab_size, arch.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(arch, arch.layer_types[i], i < arch.num_hash_layers, dtype=dtype, rngs=rngs)
                                for i in range(arch.num_layers)])
        self.norm = _norm(arch.hidden_size, arch.rms_norm_eps)
        self.head = Linear(arch.hidden_size, arch.vocab_size, fp8=False, dtype=dtype, rngs=rngs, axes=("vocab", None))
        _hc_params("hc_head", self, arch, rngs, arch.hc_mult)
        self.mtp = nnx.List([DSparkBlock(arch, k, dtype=dtype, rngs=rngs) for k in range(arch.num_mtp_layers)])

    def embed_streams(self, tokens: jax.Array) -> jax.Array:
        """[..., hc, D]: every mHC stream starts as the token embedding."""
        e = self.embed(tokens)
        return jnp.broadcast_to(e[..., None, :], (*e.shape[:-1], self.arch.hc_mult, e.shape[-1]))

    def __call__(self, tokens, positions, attn, capture: tuple[int, ...] = ()):
        """Run all layers. Returns (final-normed hidden, {layer id: raw output streams, flattened}).

        `attn` is a `V4Context` (flat tokens [T] at its layout's positions) or a `DenseCausal` over
        whole sequences [B, S] (each row at positions 0..S−1, no state; `positions` is not read);
        outputs keep the tokens' leading shape.
        """
        lead = tokens.shape
        if isinstance(attn, DenseCausal):
            attn = V4Context.dense(*tokens.shape)
            tokens = tokens.reshape(-1)
        streams = self.embed_streams(tokens)
        captured = {}
        for i, layer in enumerate(self.layers):
            streams = layer(streams, tokens, attn, i)
            if i in capture:
                captured[i] = streams.reshape(*lead, -1)
        hidden = self.norm(self.collapse_streams(streams))
        return hidden.reshape(*lead, -1), captured

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] from final-normed hidden states."""
        w = self.head.dense_weight(hidden.dtype)
        return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=jnp.float32)

    def kv_heads_and_dims(self):
        raise NotImplementedError(
            "DeepSeek-V4 has no paged K/V cache: it keeps its own decoding state (init_state, V4Context, "
            "v4_step), which the engine keeps per slot (speculative.decode.TargetCache)")

    def init_state(self, rows: int, max_context: int, *, rollback: int = 32, dtype=None) -> V4State:
        """Empty decoding state for `rows` requests of up to `max_context` positions.

        Up to `rollback` trailing tokens of a step may be rejected (the row then advances by fewer
        positions than it fed): the rings keep that many positions beyond what attention needs, so
        the rejected tokens' writes never reach a position a later query reads.
        """
        a = self.arch
        # On the model's mesh, replicated: the state holds the single K=V head (no head axis to split).
        zeros = functools.partial(sharding.zeros, dtype=dtype or self.dtype, names=(), mesh=sharding.model_mesh(self))
        ring_w = a.sliding_window - 1 + rollback
        layers = []
        for i in range(a.num_layers):
            ratio = a.compress_ratio(i)
            window = zeros((rows, ring_w, a.head_dim))
            if ratio == 0:
                layers.append(V4LayerState(window, None, None, None, None))
                continue
            csa = a.layer_types[i] == "compressed_sparse_attention"
            span = 2 * ratio if csa else ratio
            ring_c = span - 1 + rollback
            entries = -(-max_context // ratio)
            width = 2 * a.head_dim if csa else a.head_dim
            comp_src = zeros((rows, ring_c, 2 * width))
            comp = zeros((rows, entries, a.head_dim))
            index_src = zeros((rows, ring_c, 4 * a.index_head_dim)) if csa else None
            index = zeros((rows, entries, a.index_head_dim)) if csa else None
            layers.append(V4LayerState(window, comp_src, comp, index_src, index))
        return V4State(layers, rollback)

    def state_bytes(self, context: int, *, rollback: int = 32) -> int:
        """Bytes of one row's decoding state sized for `context` positions (nothing is allocated)."""
        shapes = jax.eval_shape(lambda: self.init_state(1, context, rollback=rollback))
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


@functools.partial(jax.jit, static_argnames=("graph", "capture"), donate_argnames=("state",))
def v4_step(graph, params, state: V4State, tokens: jax.Array, layout: V4Layout, capture: tuple[int, ...] = ()):
    """One incremental step over a flat ragged batch (prefill chunks, decode tokens, verification).

    graph/params: `models.split_static(model)`; tokens [T] at `layout`. Returns (fp32 logits [T, V]
    at every token, the new state, {layer: output streams [T, hc·H]}). The state is donated.
    """
    model = graph.merge(params)
    ctx = V4Context(layout, state)
    hidden, captured = model(tokens, layout.positions, ctx, capture)
    return model.logits(hidden), ctx.new_state(), captured
