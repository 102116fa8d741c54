"""The device side of decoding: S request slots and the jitted programs that advance them.

`Core` holds what lives on the device for S slots: the target's paged KV cache, the draft's
state, and `SlotState` (per slot: the anchor token, the cache length, counters, sampling
parameters, stop ids and the token history). Its programs work on any subset of the slots: the
caller passes the slot ids of this step's rows ([R] int32, R a power of two; padding rows hold an
id ≥ S) and their page-table rows ([R, pages_per_row]); a program gathers those slots, advances
them and scatters them back. So a program's row count follows the requests that run, not S, and
which requests run, where their pages are and when they come and go is the caller's business
(dspark_jax.engine). The programs:
- prefill: a packed chunk of prompt pieces (admitting the slots whose piece starts a prompt,
  sampling the first token of those whose piece ends it), the target pass, the draft's ingest;
- decode: one token per row; with a draft, a plain step a speculative core runs where a round
  would pay less: it stashes the draft's inputs for the new position (`PlainStash`), and a flush
  (one ingest of every stashed position) runs before the slot's next round or when its stash is full;
- round: a whole speculative round (draft, schedule, verify, commit) for the fixed and async
  schedulers, whose verify budget is known before launch;
- draft + verify: the round split after scheduling, for threshold and causal, whose budget the
  host picks from the scheduled token total.
Every program donates the caches and the slot state. Shapes come in power-of-two buckets of
rows, tokens and verify budgets; the page-table width is fixed per Core.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import kernels as ops
from dspark_jax.cache import bucket, init_kv_caches, pages_for, ragged_layout
from dspark_jax.drafts.base import CacheGeometry, Proposal, ProposeInputs
from dspark_jax.models import split_static
from dspark_jax.models.attention import PagedKV
from dspark_jax.models.deepseek_v4 import DeepseekV4ForCausalLM, V4Context, v4_layout
from dspark_jax.sharding import model_mesh, replicated
from dspark_jax.speculative.compiles import CompileLog
from dspark_jax.speculative.sampling import (ACCEPT_STREAM, DRAFT_STREAM, TARGET_STREAM, SamplingArrays,
                                             position_keys, sample)
from dspark_jax.speculative.schedule import (SpecParams, admit_top, best_capacity, causal_token_bound, schedule_prefix,
                                             survival, threshold_lengths)
from dspark_jax.speculative.verify import verify

STOP_SLOTS = 16  # token ids per request that end it (its EOS ids included)
STASH_POSITIONS = 16  # plain steps a slot may run before the draft must ingest what they captured
MIN_LANE = 16  # shortest prompt piece slot of a prefill chunk
MIN_BUDGET = 16  # smallest verify-token bucket above one row


@dataclasses.dataclass(frozen=True)
class SpecStats:
    """Speculation metrics over a generation (bonus token counted in the accepted length)."""

    acceptance_length: float  # mean committed tokens per round (accepted drafts + 1, EOS-cut)
    accept_rate_per_position: list[float]  # P(draft k accepted | drafts < k accepted and k verified)
    survival_per_position: list[float]  # P(at least k drafts accepted) per round
    verified_tokens: int  # tokens the target ran in decode rounds
    committed_tokens: int  # tokens those rounds committed
    rounds: int  # request-rounds (one request advanced by one round)


@dataclasses.dataclass(frozen=True)
class RoundLog:
    """Every request-round of a generation (when asked for): what calibration and evaluation read."""

    request: np.ndarray  # [N] int32 prompt index
    lengths: np.ndarray  # [N] int32 draft tokens verified
    accepted: np.ndarray  # [N] int32 draft tokens accepted
    committed: np.ndarray  # [N] int32 tokens committed (accepted + 1, cut at EOS / the budget)
    confidence_logits: np.ndarray | None  # [N, γ] fp32 raw confidence logits; None without a confidence head


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: list[list[int]]  # generated tokens per prompt (prompt excluded, EOS included)
    stats: SpecStats
    seconds: float  # wall time of the whole call, compilation included
    decode_seconds: float  # wall time after every prompt has its first generated token
    rounds: RoundLog | None = None  # per request-round records (generate(record_rounds=True))


# --------------------------------------------------------------------------------------------
# per-slot state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decoding state on device. The anchor is the last committed token, not yet in the cache."""

    anchors: jax.Array  # [S] int32
    lens: jax.Array  # [S] int32 target cache length = the anchor's position
    generated: jax.Array  # [S] int32 tokens produced so far (the anchor included)
    max_new: jax.Array  # [S] int32 the request's token budget
    done: jax.Array  # [S] bool stop token or budget reached (or a slot never filled)
    rounds: jax.Array  # [S] int32 speculative rounds run (keys the round's random draws)
    keys: jax.Array  # [S, k] uint32 key data of the request's random stream
    temperature: jax.Array  # [S] fp32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] fp32
    stop_ids: jax.Array  # [S, STOP_SLOTS] int32 token ids that end the request (-1: none)
    history: jax.Array  # [S, W] int32 prompt + generated tokens (the anchor at index lens)

    @staticmethod
    def empty(slots: int, width: int, mesh=None) -> "SlotState":
        """Every slot empty (done). With a mesh, replicated on it: where the programs' outputs are, so
        the first call of a program does not compile it for other input placements than later calls."""
        device = replicated(mesh)

        def full(shape, value, dtype):  # a buffer of its own: every field is donated separately
            return jnp.full(shape, value, dtype, device=device)

        def z():
            return full((slots,), 0, jnp.int32)
        key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
        return SlotState(anchors=z(), lens=z(), generated=z(), max_new=z(), done=full((slots,), True, bool),
                         rounds=z(), keys=full((slots, *key_shape), 0, jnp.uint32),
                         temperature=full((slots,), 0.0, jnp.float32), top_k=z(),
                         top_p=full((slots,), 1.0, jnp.float32), stop_ids=full((slots, STOP_SLOTS), -1, jnp.int32),
                         history=full((slots, width), 0, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """The slots one program advances, gathered: row i is slot `slots[i]` (≥ S: padding, done)."""

    slots: jax.Array  # [R] int32
    anchors: jax.Array  # [R] int32
    lens: jax.Array  # [R] int32
    generated: jax.Array  # [R] int32
    max_new: jax.Array  # [R] int32
    done: jax.Array  # [R] bool
    rounds: jax.Array  # [R] int32
    keys: jax.Array  # [R] typed PRNG keys
    sampling: SamplingArrays
    stop_ids: jax.Array  # [R, STOP_SLOTS] int32


def _gather(state: SlotState, slots, filters: bool) -> Rows:
    num = state.anchors.shape[0]
    at = jnp.minimum(slots, num - 1)
    return Rows(slots=slots, anchors=state.anchors[at], lens=state.lens[at], generated=state.generated[at],
                max_new=state.max_new[at], done=state.done[at] | (slots >= num), rounds=state.rounds[at],
                keys=jax.random.wrap_key_data(state.keys[at]),
                sampling=SamplingArrays(state.temperature[at], state.top_k[at], state.top_p[at], filters),
                stop_ids=state.stop_ids[at])


def _scatter(state: SlotState, rows: Rows) -> SlotState:
    """Write the rows' progress back to their slots (padding rows are dropped)."""
    def put(full, part):
        return full.at[rows.slots].set(part, mode="drop")
    return dataclasses.replace(state, anchors=put(state.anchors, rows.anchors), lens=put(state.lens, rows.lens),
                               generated=put(state.generated, rows.generated), done=put(state.done, rows.done),
                               rounds=put(state.rounds, rows.rounds))


def _is_stop(tokens, stop_ids):
    """tokens [R, ...] against each row's stop ids [R, K] → bool [R, ...]."""
    stop = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    return jnp.any(tokens[..., None] == stop, axis=-1)


def _commit(rows: Rows, history, candidates, num_accepted):
    """Append each live row's committed tokens (accepted drafts + the next token, cut at a stop token/the budget).

    candidates [R, w]: x_1..x_n followed by the next token at index n. Returns (rows, history, count).
    """
    width = candidates.shape[1]
    live = ~rows.done
    slot = jnp.arange(width)[None, :]
    is_stop = _is_stop(candidates, rows.stop_ids) & (slot <= num_accepted[:, None])
    first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), width)
    count = jnp.minimum(jnp.minimum(num_accepted + 1, first_stop + 1), rows.max_new - rows.generated)
    count = jnp.where(live, count, 0).astype(jnp.int32)
    write_at = jnp.where(slot < count[:, None], rows.lens[:, None] + 1 + slot, history.shape[1])
    history = history.at[rows.slots[:, None], write_at].set(candidates, mode="drop")
    finished = (first_stop < count) | (rows.generated + count >= rows.max_new)
    last = jnp.take_along_axis(candidates, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0]
    rows = dataclasses.replace(rows, anchors=jnp.where(count > 0, last, rows.anchors), lens=rows.lens + count,
                               generated=rows.generated + count, done=rows.done | (live & finished),
                               rounds=rows.rounds + live)
    return rows, history, count


def _round_keys(keys, rounds, stream: int, width: int):
    """[R, width] keys for this round's draws; (request, round, stream, slot) never repeats."""
    per_round = position_keys(keys, rounds, stream)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(width)))(per_round)


def _merge(graphdefs, params):
    target_graph, draft_graph = graphdefs
    return target_graph.merge(params[0]), None if draft_graph is None else draft_graph.merge(params[1])


@dataclasses.dataclass(frozen=True)
class TargetCache:
    """Where the target keeps its context between programs.

    Dense families keep paged K/V (one pool of pages; each row reaches its pages through the page
    table). DeepSeek-V4 keeps a decoding state per slot (`V4State`: windows, compressor rings,
    compressed entries) that its layers read and write through `V4Context`; it has no pages (the
    page table is ignored) and rewinds by simply not advancing over rejected tokens.
    """

    per_slot: bool
    max_len: int  # positions a slot may reach: the anchor < max_context, then γ verified past it

    @staticmethod
    def of(target, max_len: int) -> "TargetCache":
        return TargetCache(per_slot=isinstance(target, DeepseekV4ForCausalLM), max_len=max_len)

    def init(self, target, *, slots: int, num_pages: int, page_size: int, mesh):
        """The empty cache; `mesh`: the target's (`model_mesh(target)`), where paged K/V is placed."""
        if self.per_slot:
            return target.init_state(slots, self.max_len)  # its default rollback (32) covers any γ ≤ 32
        return init_kv_caches(target.kv_heads_and_dims(), num_pages=num_pages, page_size=page_size,
                              dtype=target.dtype, mesh=mesh)

    def run(self, target, caches, tokens, layout, start, slots, capture):
        """The target over a flat token batch: (hidden, captured features [T, Σ], new caches).

        layout: the batch's RaggedLayout (rows' queries at positions start...); slots: each row's slot.
        """
        if self.per_slot:
            meta = layout.meta
            ctx = V4Context(v4_layout(start, meta.cu_q_lens[1:] - meta.cu_q_lens[:-1], slots, num_tokens=tokens.shape[0],
                                      max_q_len=meta.max_q_len, max_len=self.max_len), caches)
            hidden, captured = target(tokens, layout.positions, ctx, capture=capture)
            caches = ctx.new_state()
        else:
            attn = PagedKV(caches, layout.meta)
            hidden, captured = target(tokens, layout.positions, attn, capture=capture)
            caches = attn.caches
        features = jnp.concatenate([captured[i] for i in capture], axis=-1) if capture else None
        return hidden, features, caches


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutputs:
    """What one decode step or speculative round did per row (read by the host after the step)."""

    tokens: jax.Array  # [R, w] int32 committed tokens first (count of them)
    count: jax.Array  # [R] int32 tokens committed
    done: jax.Array  # [R] bool finished after this round
    live: jax.Array  # [R] bool took part (not finished before it)
    lengths: jax.Array  # [R] int32 draft tokens verified
    accepted: jax.Array  # [R] int32 draft tokens accepted
    confidence_logits: jax.Array | None  # [R, γ] fp32
    next_capacity: jax.Array  # int32: async scheduler's capacity for a later round


# --------------------------------------------------------------------------------------------
# prefill


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillChunk:
    """R prompt pieces flattened into T tokens (built on the host by `pack_chunk`).

    A piece is tokens start..start+q_len of its request's known tokens. The first piece of a
    request admits its slot; the last one sets the slot's anchor: sampled from the target when
    the request has generated nothing yet, else (a preempted request, recomputed) its last token.
    """

    tokens: jax.Array  # [T] int32
    slots: jax.Array  # [R] int32 (≥ S: padding)
    start: jax.Array  # [R] int32 position of the piece's first token
    q_lens: jax.Array  # [R] int32
    page_table: jax.Array  # [R, P] int32
    next_tokens: jax.Array  # [R] int32 the known token after the piece (the draft ingests it)
    admit: jax.Array  # [R] bool the piece starts its request: (re)initialise the slot
    seeds: jax.Array  # [R] uint32 (admit) the request's seed ...
    streams: jax.Array  # [R] uint32 ... and stream: its key is fold_in(key(seed), stream)
    temperature: jax.Array  # [R] fp32 (admit)
    top_k: jax.Array  # [R] int32 (admit)
    top_p: jax.Array  # [R] fp32 (admit)
    max_new: jax.Array  # [R] int32 (admit)
    stop_ids: jax.Array  # [R, STOP_SLOTS] int32 (admit)
    rounds: jax.Array  # [R] int32 (admit) rounds already run (a recomputed request keeps its count)
    completes: jax.Array  # [R] bool the piece ends its request's prefill
    generated: jax.Array  # [R] int32 (completes) tokens generated before; 0: sample the first one here
    anchors: jax.Array  # [R] int32 (completes, generated > 0) the request's last generated token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillOutputs:
    anchors: jax.Array  # [R] int32 anchor of each completing piece (the first token when sampled here)
    done: jax.Array  # [R] bool the request is finished already (a stop token first, or a budget of 1)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One request's share of a prefill chunk (host side)."""

    slot: int
    tokens: list[int]  # the piece's tokens
    start: int
    page_row: np.ndarray  # [pages_per_row] int32
    next_token: int  # the known token after the piece (0 when the piece completes a fresh prompt)
    admission: dict | None  # the slot's request fields when the piece starts its request (see PrefillChunk)
    completes: bool
    generated: int = 0
    anchor: int = 0


def pack_chunk(pieces: list[Piece], *, rows: int, lane: int, slots: int, scratch_row: np.ndarray) -> PrefillChunk:
    """The PrefillChunk of `pieces` padded to `rows` rows of `lane` tokens (T = rows × lane)."""
    n = len(pieces)
    flat = np.zeros(rows * lane, np.int32)
    offset = 0
    for p in pieces:
        flat[offset:offset + len(p.tokens)] = p.tokens
        offset += len(p.tokens)

    def column(get, dtype, pad=0):
        out = np.full(rows, pad, dtype)
        out[:n] = [get(p) for p in pieces]
        return out

    admitted = [p.admission or {} for p in pieces]
    stop_ids = np.full((rows, STOP_SLOTS), -1, np.int32)
    for i, a in enumerate(admitted):
        ids = a.get("stop_ids", ())
        stop_ids[i, :len(ids)] = ids
    table = np.tile(scratch_row, (rows, 1))
    for i, p in enumerate(pieces):
        table[i] = p.page_row

    def admitted_column(name, dtype, default):
        out = np.full(rows, default, dtype)
        out[:n] = [a.get(name, default) for a in admitted]
        return out

    return PrefillChunk(
        tokens=flat, slots=column(lambda p: p.slot, np.int32, slots), start=column(lambda p: p.start, np.int32),
        q_lens=column(lambda p: len(p.tokens), np.int32), page_table=table,
        next_tokens=column(lambda p: p.next_token, np.int32), admit=column(lambda p: p.admission is not None, bool),
        seeds=admitted_column("seed", np.uint32, 0), streams=admitted_column("stream", np.uint32, 0),
        temperature=admitted_column("temperature", np.float32, 0.0), top_k=admitted_column("top_k", np.int32, 0),
        top_p=admitted_column("top_p", np.float32, 1.0), max_new=admitted_column("max_new", np.int32, 0),
        stop_ids=stop_ids, rounds=admitted_column("rounds", np.int32, 0),
        completes=column(lambda p: p.completes, bool), generated=column(lambda p: p.generated, np.int32),
        anchors=column(lambda p: p.anchor, np.int32))


def _admit(state: SlotState, chunk: PrefillChunk) -> SlotState:
    num = state.anchors.shape[0]
    into = jnp.where(chunk.admit, chunk.slots, num)

    def put(full, value):
        return full.at[into].set(value, mode="drop")

    keys = jax.vmap(lambda s, i: jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)))(chunk.seeds,
                                                                                                 chunk.streams)
    return dataclasses.replace(
        state, keys=put(state.keys, keys), temperature=put(state.temperature, chunk.temperature),
        top_k=put(state.top_k, chunk.top_k), top_p=put(state.top_p, chunk.top_p),
        max_new=put(state.max_new, chunk.max_new), stop_ids=put(state.stop_ids, chunk.stop_ids),
        rounds=put(state.rounds, chunk.rounds), done=put(state.done, jnp.ones_like(chunk.admit)),
        history=put(state.history, jnp.zeros((chunk.slots.shape[0], state.history.shape[1]), jnp.int32)))


@dataclasses.dataclass(frozen=True)
class _PrefillShape:
    lane: int  # max tokens of one piece
    geometry: CacheGeometry
    cache: TargetCache
    capture: tuple[int, ...]
    backend: str


@functools.partial(jax.jit, static_argnames=("graphdefs", "shape"), donate_argnames=("state", "caches", "dstate"))
def _prefill_program(graphdefs, params, state: SlotState, caches, dstate, chunk: PrefillChunk, *,
                     shape: _PrefillShape):
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        num = state.anchors.shape[0]
        state = _admit(state, chunk)
        geometry = shape.geometry
        layout = ragged_layout(chunk.page_table, chunk.start, chunk.q_lens, num_tokens=chunk.tokens.shape[0],
                               max_q_len=shape.lane, page_size=geometry.page_size, num_slots=geometry.num_slots)
        token_slots = jnp.where(layout.valid, chunk.slots[layout.token_req], num)
        history = state.history.at[token_slots, layout.positions].set(chunk.tokens, mode="drop")
        hidden, features, caches = shape.cache.run(target, caches, chunk.tokens, layout, chunk.start, chunk.slots,
                                                   shape.capture)

        # Pieces that end a prompt: sample its first token (or restore a recomputed request's anchor).
        at = jnp.minimum(chunk.slots, num - 1)
        logits = target.logits(hidden[jnp.maximum(layout.meta.cu_q_lens[1:] - 1, 0)])
        # filters on: sorting R rows of logits costs nothing next to a prefill pass, and one program serves all
        sampling = SamplingArrays(state.temperature[at], state.top_k[at], state.top_p[at], filters=True)
        end = chunk.start + chunk.q_lens
        keys = position_keys(jax.random.wrap_key_data(state.keys[at]), end, TARGET_STREAM)
        fresh = chunk.generated == 0
        anchors = jnp.where(fresh, sample(logits, sampling, keys), chunk.anchors)
        generated = chunk.generated + fresh
        done = (fresh & _is_stop(anchors, state.stop_ids[at])) | (generated >= state.max_new[at])
        into = jnp.where(chunk.completes, chunk.slots, num)

        def put(full, value):
            return full.at[into].set(value, mode="drop")

        state = dataclasses.replace(state, anchors=put(state.anchors, anchors), lens=put(state.lens, end),
                                    generated=put(state.generated, generated), done=put(state.done, done),
                                    history=history.at[into, end].set(anchors, mode="drop"))
        if draft is not None:
            # The token after each position: the next one in the piece, then the known or sampled next token.
            following = jnp.concatenate([chunk.tokens[1:], chunk.tokens[:1]])
            boundary = jnp.where(chunk.completes, anchors, chunk.next_tokens)
            is_last = layout.token_slot == chunk.q_lens[layout.token_req] - 1
            next_tokens = jnp.where(is_last, boundary[layout.token_req], following)
            dstate = draft.ingest(target, dstate, features, next_tokens, layout, chunk.slots)
        return state, caches, dstate, PrefillOutputs(anchors=anchors, done=done)


# --------------------------------------------------------------------------------------------
# plain decode


@dataclasses.dataclass(frozen=True)
class _RoundShape:
    """Static facts of a decode step or speculative round."""

    gamma: int
    scheduler: str
    threshold: float
    geometry: CacheGeometry
    cache: TargetCache
    backend: str  # kernel backend (see dspark_jax.kernels)
    filters: bool  # some row uses top-k/top-p


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PlainStash:
    """The draft's inputs that plain steps captured, per slot at position mod STASH_POSITIONS, until a
    flush ingests them: one ingest of many positions costs far less than one per step (launch-bound)."""

    features: jax.Array | None  # [S, P, Σ] the target's captured layers (None: the draft captures none)
    next_tokens: jax.Array  # [S, P] int32 the token after each position


@functools.partial(jax.jit, static_argnames=("graphdefs", "shape"), donate_argnames=("state", "caches", "stash"))
def _decode_program(graphdefs, params, state: SlotState, caches, stash, slots, page_table, *, shape: _RoundShape):
    """Feed each live row's anchor and sample the next token (a speculative core stashes the anchor's
    position for its draft, whose next token is now known). Finished and padding rows stand still."""
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        rows = _gather(state, slots, shape.filters)
        n = slots.shape[0]
        live = ~rows.done
        layout = ragged_layout(page_table, rows.lens, live.astype(jnp.int32), num_tokens=n, max_q_len=1,
                               page_size=shape.geometry.page_size, num_slots=shape.geometry.num_slots)
        capture = tuple(draft.capture_layers) if draft is not None else ()
        hidden, features, caches = shape.cache.run(target, caches, rows.anchors[layout.token_req], layout, rows.lens,
                                                   rows.slots, capture)
        logits = target.logits(hidden[jnp.minimum(layout.meta.cu_q_lens[:-1], n - 1)])
        nxt = sample(logits, rows.sampling, position_keys(rows.keys, rows.lens + 1, TARGET_STREAM))
        if stash is not None:
            into = jnp.where(layout.valid, rows.slots[layout.token_req], state.lens.shape[0])
            ring = layout.positions % stash.next_tokens.shape[1]
            stash = PlainStash(
                features=None if features is None else stash.features.at[into, ring].set(features, mode="drop"),
                next_tokens=stash.next_tokens.at[into, ring].set(nxt[layout.token_req], mode="drop"))
        zero = jnp.zeros((n,), jnp.int32)
        rows, history, count = _commit(rows, state.history, nxt[:, None], zero)
        state = _scatter(dataclasses.replace(state, history=history), rows)
        return state, caches, stash, RoundOutputs(tokens=nxt[:, None], count=count, done=rows.done, live=live,
                                                  lengths=zero, accepted=zero, confidence_logits=None,
                                                  next_capacity=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdefs", "shape"), donate_argnames=("dstate",))
def _flush_program(graphdefs, params, state: SlotState, dstate, stash: PlainStash, slots, page_table, counts, *,
                   shape: _RoundShape):
    """The draft ingests the `counts[i]` positions before row i's anchor that plain steps stashed."""
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        num, positions = state.lens.shape[0], stash.next_tokens.shape[1]
        at = jnp.minimum(slots, num - 1)
        lens = state.lens[at]
        counts = jnp.where(slots < num, jnp.minimum(counts, lens), 0)
        layout = ragged_layout(page_table, lens - counts, counts, num_tokens=slots.shape[0] * positions,
                               max_q_len=positions, page_size=shape.geometry.page_size,
                               num_slots=shape.geometry.num_slots)
        source, ring = at[layout.token_req], layout.positions % positions
        features = None if stash.features is None else stash.features[source, ring]
        return draft.ingest(target, dstate, features, stash.next_tokens[source, ring], layout, slots)


# --------------------------------------------------------------------------------------------
# speculative rounds


def _draft_and_schedule(target, draft, dstate, rows: Rows, history, page_table, sps, capacity, shape: _RoundShape):
    num = history.shape[0]
    inputs = ProposeInputs(anchors=rows.anchors, lens=rows.lens, page_table=page_table,
                           history=history[jnp.minimum(rows.slots, num - 1)], sampling=rows.sampling,
                           keys=_round_keys(rows.keys, rows.rounds, DRAFT_STREAM, shape.gamma), gamma=shape.gamma,
                           geometry=shape.geometry, rows=rows.slots)
    proposal, dstate = draft.propose(target, dstate, inputs)
    valid = jnp.where(rows.done, 0, proposal.valid)
    live = jnp.sum(~rows.done)
    next_capacity = jnp.zeros((), jnp.int32)
    if shape.scheduler == "fixed":
        lengths = valid
    else:
        confidence = draft.calibrated_confidence(proposal.confidence_logits)
        a = survival(confidence, valid)
        if shape.scheduler == "threshold":
            lengths = threshold_lengths(confidence, shape.threshold, valid)
        elif shape.scheduler == "causal":
            lengths = schedule_prefix(a, sps, live_rows=live, capacity=capacity)
        else:
            lengths = admit_top(a, capacity)
            next_capacity = best_capacity(a, sps, live_rows=live)
    return proposal, jnp.where(rows.done, 0, lengths).astype(jnp.int32), next_capacity, dstate


def _verify_and_commit(target, draft, caches, dstate, state: SlotState, rows: Rows, proposal: Proposal, lengths,
                       page_table, shape: _RoundShape, budget: int):
    gamma, geometry = shape.gamma, shape.geometry
    live = ~rows.done
    q_lens = jnp.where(live, lengths + 1, 0)
    layout = ragged_layout(page_table, rows.lens, q_lens, num_tokens=budget, max_q_len=gamma + 1,
                           page_size=geometry.page_size, num_slots=geometry.num_slots)
    block = jnp.concatenate([rows.anchors[:, None], proposal.tokens], axis=1)  # [R, γ+1]
    tokens = block[layout.token_req, layout.token_slot]
    hidden, features, caches = shape.cache.run(target, caches, tokens, layout, rows.lens, rows.slots,
                                               draft.capture_layers)
    logits = target.logits(hidden)  # [T, V]
    cu = layout.meta.cu_q_lens
    grid = jnp.clip(cu[:-1, None] + jnp.arange(gamma + 1)[None, :], 0, budget - 1)
    keys = position_keys(rows.keys, rows.rounds, ACCEPT_STREAM)
    num_accepted, nxt = verify(logits[grid], proposal.tokens, proposal.probs, lengths, keys, rows.sampling)

    slot = jnp.arange(gamma + 1)[None, :]
    padded = jnp.concatenate([proposal.tokens, jnp.zeros_like(proposal.tokens[:, :1])], axis=1)
    candidates = jnp.where(slot == num_accepted[:, None], nxt[:, None], padded)
    old = rows
    rows, history, count = _commit(rows, state.history, candidates, num_accepted)

    # The draft absorbs the committed positions (anchor .. last accepted) from this verify pass.
    commit_layout = ragged_layout(page_table, old.lens, jnp.where(live, num_accepted + 1, 0), num_tokens=budget,
                                  max_q_len=gamma + 1, page_size=geometry.page_size, num_slots=geometry.num_slots)
    source = jnp.clip(cu[commit_layout.token_req] + commit_layout.token_slot, 0, budget - 1)
    next_tokens = candidates[commit_layout.token_req, commit_layout.token_slot]
    dstate = draft.ingest(target, dstate, None if features is None else features[source], next_tokens,
                          commit_layout, rows.slots)
    state = _scatter(dataclasses.replace(state, history=history), rows)
    outputs = RoundOutputs(tokens=candidates, count=count, done=rows.done, live=live, lengths=lengths,
                           accepted=num_accepted, confidence_logits=proposal.confidence_logits,
                           next_capacity=jnp.zeros((), jnp.int32))
    return state, caches, dstate, outputs


_ROUND_STATIC = ("graphdefs", "shape", "budget")


@functools.partial(jax.jit, static_argnames=_ROUND_STATIC, donate_argnames=("state", "caches", "dstate"))
def _round_program(graphdefs, params, state, caches, dstate, slots, page_table, sps, capacity, *, shape, budget):
    """One whole speculative round for schedulers whose budget is known before launch (fixed, causal, async)."""
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        rows = _gather(state, slots, shape.filters)
        # causal, async: the launched budget holds every live anchor plus at most `capacity` draft tokens.
        capacity = jnp.minimum(capacity, budget - jnp.sum(~rows.done))
        proposal, lengths, next_capacity, dstate = _draft_and_schedule(target, draft, dstate, rows, state.history,
                                                                       page_table, sps, capacity, shape)
        state, caches, dstate, outputs = _verify_and_commit(target, draft, caches, dstate, state, rows, proposal,
                                                            lengths, page_table, shape, budget)
        return state, caches, dstate, dataclasses.replace(outputs, next_capacity=next_capacity)


@functools.partial(jax.jit, static_argnames=("graphdefs", "shape"), donate_argnames=("dstate",))
def _draft_program(graphdefs, params, state, dstate, slots, page_table, sps, *, shape):
    """Draft and schedule (threshold); the host reads the token total to pick the verify budget."""
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        rows = _gather(state, slots, shape.filters)
        uncapped = jnp.int32(slots.shape[0] * shape.gamma)  # the verify budget follows the schedule
        proposal, lengths, _, dstate = _draft_and_schedule(target, draft, dstate, rows, state.history, page_table,
                                                           sps, uncapped, shape)
        total = jnp.sum(jnp.where(rows.done, 0, lengths + 1))
        return proposal, lengths, total, dstate


@functools.partial(jax.jit, static_argnames=_ROUND_STATIC, donate_argnames=("state", "caches", "dstate"))
def _verify_program(graphdefs, params, state, caches, dstate, slots, page_table, proposal, lengths, *, shape, budget):
    with ops.use(shape.backend):
        target, draft = _merge(graphdefs, params)
        rows = _gather(state, slots, shape.filters)
        return _verify_and_commit(target, draft, caches, dstate, state, rows, proposal, lengths, page_table, shape,
                                  budget)


# --------------------------------------------------------------------------------------------
# the core


def check_spec(draft, spec: SpecParams):
    """The speculation settings a draft supports (block size, schedulers needing a confidence head)."""
    config = draft.config
    if config.kind in ("dspark", "dflash", "eagle3") and spec.block_size > config.block_size:
        raise ValueError(f"SpecParams.block_size={spec.block_size} exceeds the draft's trained block size "
                         f"{config.block_size}")
    if spec.scheduler != "fixed" and getattr(draft, "confidence_head", None) is None:
        raise ValueError(f"SpecParams.scheduler={spec.scheduler!r} needs a draft with a confidence head "
                         f"(this {config.kind} draft has none); use scheduler='fixed'")


@dataclasses.dataclass
class Drafted:
    """A split round between its draft and verify programs."""

    slots: np.ndarray
    page_table: jax.Array
    filters: bool
    proposal: Proposal
    lengths: jax.Array
    total: jax.Array  # scheduled tokens (anchors included)


class Core:
    """S request slots on the device and the programs that advance any subset of them.

    `max_context` bounds a request's prompt + generated tokens; pages 0..num_pages−1 are the
    caller's to hand out (page `num_pages` is a scratch page padding rows point at). Every
    program call is recorded in `compiles` when it compiled.
    """

    def __init__(self, target, draft, spec: SpecParams | None, *, slots: int, max_context: int, page_size: int,
                 num_pages: int, backend: str = "auto"):
        if slots < 1:
            raise ValueError(f"slots={slots}; expected >= 1")
        if draft is not None:
            spec = spec or SpecParams()
            check_spec(draft, spec)
        self.target, self.draft = target, draft
        self.spec = spec if draft is not None else None
        self.gamma = spec.block_size if draft is not None else 0
        self.backend = ops.resolve(backend)
        self.slots = slots
        self.max_context = max_context
        # A round verifies up to γ positions past the anchor, whose position is < max_context − 1.
        self.pages_per_row = pages_for(max_context + self.gamma, page_size)
        self.num_pages = num_pages
        self.geometry = CacheGeometry(page_size=page_size, num_pages=num_pages + 1)
        self.scratch_row = np.full(self.pages_per_row, num_pages, np.int32)
        self.eos_ids = tuple(int(i) for i in target.arch.eos_token_ids)

        target_graph, target_params = split_static(target)
        draft_graph, draft_params = split_static(draft) if draft is not None else (None, None)
        self.graphdefs, self.params = (target_graph, draft_graph), (target_params, draft_params)
        self.capture = tuple(draft.capture_layers) if draft is not None else ()
        self.cache = TargetCache.of(target, max_context + self.gamma)
        self.mesh = model_mesh(target)  # walks every variable: once per Core
        self.caches = self.cache.init(target, slots=slots, num_pages=num_pages + 1, page_size=page_size,
                                      mesh=self.mesh)
        self.dstate = (draft.init_state(rows=slots, num_pages=num_pages + 1, page_size=page_size, dtype=target.dtype)
                       if draft is not None else None)
        self.state = SlotState.empty(slots, max_context, self.mesh)
        self.stash: PlainStash | None = None  # a speculative core's, made by its first plain step
        self._stashed = np.zeros(slots, np.int32)  # positions stashed per slot since its last flush
        self.compiles = CompileLog()
        self._sps = None  # rounds/s by verify tokens (causal, async)
        self._tables: dict[int, jax.Array] = {}
        self._causal_budgets: dict[int, list[int]] = {}  # by rows, then live rows
        if self.scheduler in ("causal", "async") and self.spec.sps is not None:
            self.use_sps(self.spec.sps)

    # -- shapes

    @property
    def scheduler(self) -> str | None:
        return self.spec.scheduler if self.spec is not None else None

    def splits(self, rows: int) -> bool:
        """Rounds of `rows` rows run as draft + verify: the threshold scheduler's budget is known only
        after drafting, and is worth a host read only where the rows have more than one bucket
        (their full budget exceeds the smallest)."""
        return self.scheduler == "threshold" and rows * (self.gamma + 1) > MIN_BUDGET

    def row_buckets(self) -> list[int]:
        return [1 << i for i in range(bucket(self.slots).bit_length())]

    def budget(self, rows: int, tokens: int) -> int:
        """Verify-token bucket of a round of `rows` rows that schedules `tokens` tokens."""
        return min(bucket(tokens, minimum=MIN_BUDGET), rows * (self.gamma + 1))

    def budget_buckets(self, rows: int) -> list[int]:
        """Every verify-token bucket of a round of `rows` rows."""
        return sorted({self.budget(rows, t) for t in range(1, rows * (self.gamma + 1) + 1)})

    def causal_budget(self, rows: int, live: int) -> int:
        """The verify budget of a causal round of `rows` rows, `live` of them requests (bounded from the SPS table)."""
        if rows not in self._causal_budgets:
            self._sps_for(rows)  # says what is missing when no table was given
            self._causal_budgets[rows] = [
                self.budget(rows, causal_token_bound(self._sps, n, rows * (self.gamma + 1))) for n in range(rows + 1)]
        return self._causal_budgets[rows][live]

    def budgets(self, rows: int) -> list[int]:
        """The verify budgets this core's rounds of `rows` rows launch with (fixed: every draft token)."""
        if self.scheduler == "fixed":
            return [rows * (self.gamma + 1)]
        if self.scheduler == "causal" and self._sps is not None:
            return sorted({self.causal_budget(rows, live) for live in range(1, rows + 1)})
        return self.budget_buckets(rows)

    @staticmethod
    def chunk_tokens(prefill_chunk: int) -> int:
        """A prefill chunk's token budget: the power of two ≤ prefill_chunk (at least MIN_LANE)."""
        return max(MIN_LANE, 1 << (max(prefill_chunk, 1).bit_length() - 1))

    def prefill_shapes(self, prefill_chunk: int) -> list[tuple[int, int]]:
        """Every (rows, lane) a prefill chunk may have: rows × lane ≤ chunk_tokens, both powers of two."""
        limit = self.chunk_tokens(prefill_chunk)
        return [(rows, lane) for lane in (1 << i for i in range(MIN_LANE.bit_length() - 1, limit.bit_length()))
                for rows in self.row_buckets() if rows * lane <= limit]

    @property
    def plain_steps(self) -> bool:
        """Whether callers may run plain steps on this speculative core (`begin_round(plain=True)`): its
        scheduler is hardware-aware (causal, async) and SpecParams.plain_steps is on."""
        return self.scheduler in ("causal", "async") and self.spec.plain_steps

    @property
    def needs_sps(self) -> bool:
        """The scheduler reads a rounds/s table and none was given yet."""
        return self.scheduler in ("causal", "async") and self._sps is None

    def use_sps(self, sps) -> None:
        """The rounds/s table (index: verify tokens) causal and async scheduling read; sized for bucket(slots) rows."""
        needed = bucket(self.slots) * (self.gamma + 1) + 1
        if len(sps) < needed:
            raise ValueError(f"SpecParams.sps has {len(sps)} entries; {bucket(self.slots)} rows × "
                             f"(γ+1={self.gamma + 1}) tokens need at least {needed}")
        self._sps = np.asarray(sps, np.float32)
        self._tables.clear()
        self._causal_budgets.clear()

    def _sps_for(self, rows: int) -> jax.Array:
        if rows not in self._tables:
            if self.scheduler in ("causal", "async"):
                if self._sps is None:
                    raise ValueError(f"SpecParams.sps is required for scheduler={self.scheduler!r}: a rounds/s "
                                     "table by verify-batch token count (profile_sps measures one)")
                self._tables[rows] = jnp.asarray(self._sps[:rows * (self.gamma + 1) + 1])
            else:
                self._tables[rows] = jnp.ones((1,), jnp.float32)
        return self._tables[rows]

    def _round_shape(self, filters: bool) -> _RoundShape:
        spec = self.spec or SpecParams()
        return _RoundShape(gamma=self.gamma, scheduler=spec.scheduler, threshold=spec.threshold,
                           geometry=self.geometry, cache=self.cache, backend=self.backend, filters=filters)

    def _empty_stash(self) -> PlainStash:
        device = replicated(self.mesh)
        features = None
        if self.capture:  # the captured width depends on the family (V4 captures every mHC stream)
            one = ragged_layout(self.scratch_row[None], np.zeros(1), np.ones(1), num_tokens=1, max_q_len=1,
                                page_size=self.geometry.page_size, num_slots=self.geometry.num_slots)
            zeros = np.zeros(1, np.int32)
            with ops.use(self.backend):
                _, captured, _ = jax.eval_shape(
                    lambda caches: self.cache.run(self.target, caches, zeros, one, zeros, zeros, self.capture),
                    self.caches)
            features = jnp.zeros((self.slots, STASH_POSITIONS, captured.shape[-1]), captured.dtype, device=device)
        return PlainStash(features=features,
                          next_tokens=jnp.zeros((self.slots, STASH_POSITIONS), jnp.int32, device=device))

    # -- programs

    def prefill(self, chunk: PrefillChunk, lane: int) -> PrefillOutputs:
        shape = _PrefillShape(lane=lane, geometry=self.geometry, cache=self.cache, capture=self.capture,
                              backend=self.backend)
        admitted = chunk.slots[chunk.admit]
        self._stashed[admitted[admitted < self.slots]] = 0
        with self.compiles.track(f"prefill rows={chunk.slots.shape[0]} lane={lane}"):
            self.state, self.caches, self.dstate, out = _prefill_program(
                self.graphdefs, self.params, self.state, self.caches, self.dstate, chunk, shape=shape)
        for leaf in jax.tree_util.tree_leaves(out):
            leaf.copy_to_host_async()
        return out

    def decode(self, slots: np.ndarray, page_table: np.ndarray, filters: bool) -> RoundOutputs:
        """One plain step; a speculative core first flushes its stash where a row's is full."""
        real = slots[slots < self.slots]
        if self.draft is not None and self.stash is None:  # only engines run plain steps on speculative cores
            self.stash = self._empty_stash()
        if self.stash is not None and np.any(self._stashed[real] >= STASH_POSITIONS):
            self.flush(slots, page_table)
        with self.compiles.track(f"decode rows={len(slots)} filters={filters}"):
            self.state, self.caches, self.stash, out = _decode_program(
                self.graphdefs, self.params, self.state, self.caches, self.stash, slots, page_table,
                shape=self._round_shape(filters))
        self._stashed[real] += 1
        return out

    def flush(self, slots: np.ndarray, page_table: np.ndarray) -> None:
        """Let the draft ingest every position plain steps stashed for these rows (a no-op without any)."""
        real = slots < self.slots
        counts = np.where(real, self._stashed[np.minimum(slots, self.slots - 1)], 0).astype(np.int32)
        if counts.any():
            self._ingest_stash(slots, page_table, counts)
            self._stashed[slots[real]] = 0

    def _ingest_stash(self, slots: np.ndarray, page_table: np.ndarray, counts: np.ndarray) -> None:
        with self.compiles.track(f"flush rows={len(slots)}"):
            self.dstate = _flush_program(self.graphdefs, self.params, self.state, self.dstate, self.stash, slots,
                                         page_table, counts, shape=self._round_shape(False))

    def fused_round(self, slots: np.ndarray, page_table, filters: bool, capacity: int, budget: int,
                    sps=None) -> RoundOutputs:
        """One whole round; `sps` (the profiler's) replaces this core's table, shaped like `_sps_for(rows)`."""
        sps = self._sps_for(len(slots)) if sps is None else sps
        with self.compiles.track(f"round rows={len(slots)} budget={budget} filters={filters}"):
            self.state, self.caches, self.dstate, out = _round_program(
                self.graphdefs, self.params, self.state, self.caches, self.dstate, slots, page_table, sps,
                jnp.int32(capacity), shape=self._round_shape(filters), budget=budget)
        return out

    def draft_step(self, slots: np.ndarray, page_table, filters: bool) -> Drafted:
        page_table = jnp.asarray(page_table)
        with self.compiles.track(f"draft rows={len(slots)} filters={filters}"):
            proposal, lengths, total, self.dstate = _draft_program(
                self.graphdefs, self.params, self.state, self.dstate, slots, page_table, self._sps_for(len(slots)),
                shape=self._round_shape(filters))
        return Drafted(slots, page_table, filters, proposal, lengths, total)

    def verify(self, drafted: Drafted, budget: int) -> RoundOutputs:
        with self.compiles.track(f"verify rows={len(drafted.slots)} budget={budget} filters={drafted.filters}"):
            self.state, self.caches, self.dstate, out = _verify_program(
                self.graphdefs, self.params, self.state, self.caches, self.dstate, drafted.slots, drafted.page_table,
                drafted.proposal, drafted.lengths, shape=self._round_shape(drafted.filters), budget=budget)
        return out

    def _launch(self, rows: int, live: int, capacity: int | None) -> tuple[int, int]:
        """(draft-token capacity, verify budget) of a fused round of `rows` rows, `live` of them requests."""
        if self.scheduler in ("fixed", "threshold"):
            return rows * self.gamma, rows * (self.gamma + 1)
        if self.scheduler == "causal":
            return rows * self.gamma, self.causal_budget(rows, live)
        capacity = rows * self.gamma if capacity is None else capacity
        return capacity, self.budget(rows, rows + capacity)

    def begin_round(self, slots: np.ndarray, page_table: np.ndarray, filters: bool, capacity: int | None = None,
                    plain: bool = False):
        """Launch this step's round over `slots`; `finish_round` completes it.

        A split round (`splits`) stops after drafting (the host has not read the token total yet);
        the others launch the whole round. `capacity` (async) is the token count computed by an
        earlier round (None: every draft token may be admitted). `plain`: a plain decode step
        instead, whose position the draft ingests before the slot's next round (lossless either way;
        see engine.gate.PlainGate).
        """
        rows = len(slots)
        if self.draft is None or plain:
            return self.decode(slots, page_table, filters)
        self.flush(slots, page_table)
        if self.splits(rows):
            return self.draft_step(slots, page_table, filters)
        capacity, budget = self._launch(rows, int(np.sum(slots < self.slots)), capacity)
        return self.fused_round(slots, page_table, filters, capacity, budget)

    def finish_round(self, pending) -> RoundOutputs:
        if isinstance(pending, Drafted):
            pending = self.verify(pending, self.budget(len(pending.slots), int(pending.total)))
        for leaf in jax.tree_util.tree_leaves(pending):
            leaf.copy_to_host_async()
        return pending

    # -- compiling ahead

    def padding_rows(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, page table) of `rows` padding rows: a program run on them changes nothing."""
        return np.full(rows, self.slots, np.int32), np.tile(self.scratch_row, (rows, 1))

    def compile_all(self, prefill_chunk: int, stop=lambda: False) -> None:
        """Run every program shape once on padding rows, so serving never compiles a known bucket.

        `stop()` is asked between programs (a shutdown during warm-up).
        """
        for rows, lane in self.prefill_shapes(prefill_chunk):
            if stop():
                return
            self.prefill(pack_chunk([], rows=rows, lane=lane, slots=self.slots, scratch_row=self.scratch_row), lane)
        for rows in self.row_buckets():
            slots, table = self.padding_rows(rows)
            for filters in (False, True):
                if stop():
                    return
                if self.draft is None or self.plain_steps:
                    self.decode(slots, table, filters)
                if self.draft is None:
                    continue
                if self.plain_steps and not filters:
                    self._ingest_stash(slots, table, np.zeros(rows, np.int32))
                if self.splits(rows):
                    drafted = self.draft_step(slots, table, filters)
                for budget in self.budgets(rows):
                    if self.splits(rows):
                        self.verify(drafted, budget)
                    else:
                        self.fused_round(slots, table, filters, budget - rows if budget > rows else 0, budget)
        jax.block_until_ready(self.state)
