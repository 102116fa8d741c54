"""Batched generation: chunked prefill, then plain decode steps or speculative rounds.

Every hot path is a `jax.jit` function of (graphs, params, caches, state, ...) that donates the
caches. Shapes come in buckets (rows, tokens, pages), so a generation compiles a handful of
programs and then replays them. A speculative round is one program — draft, schedule, verify
the flattened ragged batch through the target, commit — except for the schedulers whose token
budget depends on this round's confidences (threshold, causal): those split after scheduling so
the host can pick the budget bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax import kernels as ops
from dspark_jax.cache import bucket, init_kv_caches, pages_for, ragged_layout
from dspark_jax.drafts.base import CacheGeometry, Proposal, ProposeInputs
from dspark_jax.models import split_static
from dspark_jax.models.attention import PagedKV
from dspark_jax.speculative.sampling import (ACCEPT_STREAM, DRAFT_STREAM, TARGET_STREAM, SamplingArrays, SamplingParams,
                                      position_keys, request_keys, sample)
from dspark_jax.speculative.schedule import (SpecParams, admit_top, best_capacity, schedule_prefix, survival,
                                      threshold_lengths)
from dspark_jax.speculative.verify import verify


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
    decode_seconds: float  # wall time after the first generated token
    rounds: RoundLog | None = None  # per request-round records (generate(record_rounds=True))


# --------------------------------------------------------------------------------------------
# request layout


@dataclasses.dataclass
class _Requests:
    """Host-side layout of one generate() call: R prompts padded to a bucket of rows."""

    prompts: list[list[int]]
    rows: int
    geometry: CacheGeometry
    page_table: np.ndarray  # [rows, pages_per_row]; padding rows hold only the scratch page
    width: int  # history buffer length: longest prompt + budget + a draft block

    @property
    def page_size(self) -> int:
        return self.geometry.page_size


def _validate(model, prompts, max_new_tokens: int, margin: int):
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    vocab = model.arch.vocab_size
    limit = model.arch.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(p) + max_new_tokens + margin > limit:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the model's context of {limit} positions")


def _layout_requests(prompts, max_new_tokens: int, margin: int, page_size: int) -> _Requests:
    rows = bucket(len(prompts))
    longest = max(len(p) for p in prompts) + max_new_tokens + margin
    per_row = bucket(pages_for(longest, page_size))
    scratch = len(prompts) * per_row  # one shared page that padding rows write into
    table = np.full((rows, per_row), scratch, np.int32)
    for r in range(len(prompts)):
        table[r] = np.arange(r * per_row, (r + 1) * per_row)
    return _Requests(prompts=[list(map(int, p)) for p in prompts], rows=rows,
                     geometry=CacheGeometry(page_size=page_size, num_pages=scratch + 1), page_table=table,
                     width=bucket(longest + 1, minimum=16))


# --------------------------------------------------------------------------------------------
# prefill


@functools.partial(jax.jit, static_argnames=("graphdef", "max_q_len", "geometry", "capture", "backend"),
                   donate_argnames=("caches",))
def _prefill_step(graphdef, params, caches, tokens, page_table, start, q_lens, *, max_q_len, geometry, capture,
                  backend):
    """Run one packed chunk of prompts; logits at each row's last chunk token, captured features."""
    with ops.use(backend):
        return _prefill_body(graphdef, params, caches, tokens, page_table, start, q_lens, max_q_len, geometry,
                             capture)


def _prefill_body(graphdef, params, caches, tokens, page_table, start, q_lens, max_q_len, geometry, capture):
    model = graphdef.merge(params)
    layout = ragged_layout(page_table, start, q_lens, num_tokens=tokens.shape[0], max_q_len=max_q_len,
                           page_size=geometry.page_size, num_slots=geometry.num_slots)
    attn = PagedKV(caches, layout.meta)
    hidden, captured = model(tokens, layout.positions, attn, capture=capture)
    last = jnp.maximum(layout.meta.cu_q_lens[1:] - 1, 0)
    features = jnp.concatenate([captured[i] for i in capture], axis=-1) if capture else None
    return model.logits(hidden[last]), attn.caches, features


@dataclasses.dataclass
class _Chunk:
    """One prefill chunk, kept so the draft can ingest it once the first token is known."""

    tokens: np.ndarray  # [T] flat prompt tokens
    rows: np.ndarray  # [n] batch row of each chunk row (padding: the out-of-range row `reqs.rows`)
    start: np.ndarray  # [n] cache position of each chunk row's first token
    q_lens: np.ndarray  # [n]
    features: jax.Array | None  # [T, n·H] target features for the draft


def _prefill(graphdef, params, caches, reqs: _Requests, chunk: int, capture: tuple[int, ...], backend: str):
    """Chunked prefill of every prompt, packed `chunk` tokens at a time.

    Each call holds only the rows with tokens in it (padded to a bucket), so attention never
    spans idle rows. Returns (caches, {row: logits at its last prompt token}, chunks).
    """
    done = [0] * len(reqs.prompts)
    last_logits, chunks = {}, []
    while any(d < len(p) for d, p in zip(done, reqs.prompts)):
        pieces, budget = {}, chunk
        for r, p in enumerate(reqs.prompts):
            take = min(len(p) - done[r], budget)
            if take > 0:
                pieces[r] = p[done[r]:done[r] + take]
                budget -= take
        n = bucket(len(pieces))
        rows = np.full(n, reqs.rows, np.int32)
        rows[:len(pieces)] = list(pieces)
        start = np.zeros(n, np.int32)
        start[:len(pieces)] = [done[r] for r in pieces]
        q_lens = np.zeros(n, np.int32)
        q_lens[:len(pieces)] = [len(x) for x in pieces.values()]
        flat = np.concatenate(list(pieces.values()))
        tokens = np.zeros(bucket(len(flat), minimum=16), np.int32)
        tokens[:len(flat)] = flat
        pages = bucket(pages_for(int((start + q_lens).max()), reqs.page_size), maximum=reqs.page_table.shape[1])
        scratch_row = np.full((1, reqs.page_table.shape[1]), reqs.geometry.num_pages - 1, np.int32)
        table = np.concatenate([reqs.page_table, scratch_row])[np.minimum(rows, reqs.rows)]
        logits, caches, features = _prefill_step(
            graphdef, params, caches, jnp.asarray(tokens), jnp.asarray(table[:, :pages]), jnp.asarray(start),
            jnp.asarray(q_lens), max_q_len=bucket(int(q_lens.max())), geometry=reqs.geometry, capture=capture,
            backend=backend)
        chunks.append(_Chunk(tokens, rows, start, q_lens, features))
        for i, r in enumerate(pieces):
            done[r] += len(pieces[r])
            if done[r] == len(reqs.prompts[r]):
                last_logits[r] = logits[i]
    return caches, last_logits, chunks


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_q_len", "geometry", "backend"),
                   donate_argnames=("dstate",))
def _draft_ingest_prefill(graphdefs, params, dstate, features, tokens, boundary_tokens, page_table, rows, start,
                          q_lens, *, max_q_len, geometry, backend):
    """Let the draft absorb one prefill chunk.

    The token after each chunk row's last position is `boundary_tokens[i]`: the next prompt
    token, or the first generated token when the prompt ends in this chunk.
    """
    target, draft = (g.merge(p) for g, p in zip(graphdefs, params))
    layout = ragged_layout(page_table, start, q_lens, num_tokens=tokens.shape[0], max_q_len=max_q_len,
                           page_size=geometry.page_size, num_slots=geometry.num_slots)
    following = jnp.concatenate([tokens[1:], tokens[:1]])
    is_last = layout.token_slot == q_lens[layout.token_req] - 1
    next_tokens = jnp.where(is_last, boundary_tokens[layout.token_req], following)
    with ops.use(backend):
        return draft.ingest(target, dstate, features, next_tokens, layout, rows)


def _chunk_tables(reqs: _Requests, chunk: _Chunk, first_tokens: np.ndarray):
    """(page table rows, boundary tokens) of a chunk's rows, for the draft's prefill ingest."""
    scratch_row = np.full((1, reqs.page_table.shape[1]), reqs.geometry.num_pages - 1, np.int32)
    table = np.concatenate([reqs.page_table, scratch_row])[np.minimum(chunk.rows, reqs.rows)]
    boundary = np.zeros(len(chunk.rows), np.int32)
    for i, r in enumerate(chunk.rows):
        if r < reqs.rows and r < len(reqs.prompts):
            end = int(chunk.start[i] + chunk.q_lens[i])
            prompt = reqs.prompts[r]
            boundary[i] = prompt[end] if end < len(prompt) else first_tokens[r]
    return table, boundary


# --------------------------------------------------------------------------------------------
# decode state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row state on device. `anchors` is the last committed token, not yet in the target cache."""

    anchors: jax.Array  # [R] int32
    lens: jax.Array  # [R] int32 target cache length = position of the anchor
    generated: jax.Array  # [R] int32 tokens produced so far (including the anchor)
    done: jax.Array  # [R] bool (EOS, budget reached, or a padding row)
    rounds: jax.Array  # [R] int32 rounds this request has run (keys its random draws)
    history: jax.Array  # [R, L] int32 prompt + generated tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecCounters:
    """Running totals for SpecStats, accumulated on device."""

    rounds: jax.Array  # request-rounds
    committed: jax.Array
    verified: jax.Array
    reached: jax.Array  # [γ] rounds that verified position k with all earlier drafts accepted
    accepted: jax.Array  # [γ] rounds that accepted position k

    @staticmethod
    def zeros(gamma: int) -> "SpecCounters":
        z = jnp.zeros((), jnp.int32)
        return SpecCounters(z, z, z, jnp.zeros((gamma,), jnp.int32), jnp.zeros((gamma,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundRecord:
    """What one speculative round did per row; left on device unless the caller records rounds."""

    live: jax.Array  # [R] bool, the row took part
    lengths: jax.Array  # [R] int32
    accepted: jax.Array  # [R] int32
    committed: jax.Array  # [R] int32
    confidence_logits: jax.Array | None  # [R, γ] fp32


def _commit(state: DecodeState, counters: SpecCounters, candidates, num_accepted, lengths, eos_ids, max_new):
    """Append each live row's committed tokens (accepted drafts + the next token, cut at EOS/budget).

    candidates [R, γ+1]: x_1..x_n followed by the next token at index n.
    """
    width = candidates.shape[1]
    live = ~state.done
    slot = jnp.arange(width)[None, :]
    is_eos = jnp.isin(candidates, eos_ids) & (slot <= num_accepted[:, None])
    first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), width)
    count = jnp.minimum(jnp.minimum(num_accepted + 1, first_eos + 1), max_new - state.generated)
    count = jnp.where(live, count, 0).astype(jnp.int32)
    write_at = jnp.where(slot < count[:, None], state.lens[:, None] + 1 + slot, state.history.shape[1])
    history = state.history.at[jnp.arange(state.anchors.shape[0])[:, None], write_at].set(candidates, mode="drop")
    finished = (first_eos < count) | (state.generated + count >= max_new)
    last = jnp.take_along_axis(candidates, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0]
    new_state = DecodeState(
        anchors=jnp.where(count > 0, last, state.anchors), lens=state.lens + count,
        generated=state.generated + count, done=state.done | (live & finished), rounds=state.rounds + live,
        history=history)
    gamma = counters.reached.shape[0]
    position = jnp.arange(gamma)[None, :]
    reached = live[:, None] & (lengths[:, None] > position) & (num_accepted[:, None] >= position)
    accepted = live[:, None] & (num_accepted[:, None] > position)
    new_counters = SpecCounters(
        rounds=counters.rounds + jnp.sum(live), committed=counters.committed + jnp.sum(count),
        verified=counters.verified + jnp.sum(jnp.where(live, lengths + 1, 0)),
        reached=counters.reached + jnp.sum(reached, 0), accepted=counters.accepted + jnp.sum(accepted, 0))
    return new_state, new_counters, count


def _round_keys(req_keys, rounds, stream: int, width: int):
    """[R, width] keys for this round's draws; (request, round, stream, slot) never repeats."""
    per_round = position_keys(req_keys, rounds, stream)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(width)))(per_round)


# --------------------------------------------------------------------------------------------
# plain decode


@functools.partial(jax.jit, static_argnames=("graphdef", "geometry", "backend"), donate_argnames=("caches",))
def _decode_step(graphdef, params, caches, state: DecodeState, counters, page_table, sampling, req_keys, eos_ids,
                 max_new, *, geometry, backend):
    """Feed each row's anchor, sample the next token. Finished rows stand still."""
    with ops.use(backend):
        return _decode_body(graphdef, params, caches, state, counters, page_table, sampling, req_keys, eos_ids,
                            max_new, geometry)


def _decode_body(graphdef, params, caches, state, counters, page_table, sampling, req_keys, eos_ids, max_new,
                 geometry):
    model = graphdef.merge(params)
    rows = state.anchors.shape[0]
    layout = ragged_layout(page_table, state.lens, jnp.ones((rows,), jnp.int32), num_tokens=rows, max_q_len=1,
                           page_size=geometry.page_size, num_slots=geometry.num_slots)
    attn = PagedKV(caches, layout.meta)
    hidden, _ = model(state.anchors, layout.positions, attn)
    nxt = sample(model.logits(hidden), sampling, position_keys(req_keys, state.lens + 1, TARGET_STREAM))
    zero = jnp.zeros((rows,), jnp.int32)
    state, counters, _ = _commit(state, counters, nxt[:, None], zero, zero, eos_ids, max_new)
    return state, counters, attn.caches


# --------------------------------------------------------------------------------------------
# speculative rounds


@dataclasses.dataclass(frozen=True)
class _RoundShape:
    """Static facts of a speculative round."""

    gamma: int
    scheduler: str
    threshold: float
    geometry: CacheGeometry
    backend: str  # kernel backend (see dspark_jax.kernels)


def _draft_and_schedule(target, draft, dstate, state: DecodeState, page_table, sampling, req_keys, sps, capacity,
                        shape: _RoundShape):
    inputs = ProposeInputs(anchors=state.anchors, lens=state.lens, page_table=page_table, history=state.history,
                           sampling=sampling, keys=_round_keys(req_keys, state.rounds, DRAFT_STREAM, shape.gamma),
                           gamma=shape.gamma, geometry=shape.geometry)
    proposal, dstate = draft.propose(target, dstate, inputs)
    valid = jnp.where(state.done, 0, proposal.valid)
    next_capacity = jnp.zeros((), jnp.int32)
    if shape.scheduler == "fixed":
        lengths = valid
    else:
        confidence = draft.calibrated_confidence(proposal.confidence_logits)
        a = survival(confidence, valid)
        if shape.scheduler == "threshold":
            lengths = threshold_lengths(confidence, shape.threshold, valid)
        elif shape.scheduler == "causal":
            lengths = schedule_prefix(a, sps)
        else:
            lengths = admit_top(a, capacity)
            next_capacity = best_capacity(a, sps)
    return proposal, jnp.where(state.done, 0, lengths).astype(jnp.int32), next_capacity, dstate


def _verify_and_commit(target, draft, caches, dstate, state: DecodeState, counters, proposal: Proposal, lengths,
                       page_table, sampling, req_keys, eos_ids, max_new, shape: _RoundShape, budget: int):
    gamma, geometry = shape.gamma, shape.geometry
    q_lens = jnp.where(state.done, 0, lengths + 1)
    layout = ragged_layout(page_table, state.lens, q_lens, num_tokens=budget, max_q_len=gamma + 1,
                           page_size=geometry.page_size, num_slots=geometry.num_slots)
    block = jnp.concatenate([state.anchors[:, None], proposal.tokens], axis=1)  # [R, γ+1]
    tokens = block[layout.token_req, layout.token_slot]
    attn = PagedKV(caches, layout.meta)
    hidden, captured = target(tokens, layout.positions, attn, capture=draft.capture_layers)
    logits = target.logits(hidden)  # [T, V]
    cu = layout.meta.cu_q_lens
    grid = jnp.clip(cu[:-1, None] + jnp.arange(gamma + 1)[None, :], 0, budget - 1)
    keys = position_keys(req_keys, state.rounds, ACCEPT_STREAM)
    num_accepted, nxt = verify(logits[grid], proposal.tokens, proposal.probs, lengths, keys, sampling)

    slot = jnp.arange(gamma + 1)[None, :]
    padded = jnp.concatenate([proposal.tokens, jnp.zeros_like(proposal.tokens[:, :1])], axis=1)
    candidates = jnp.where(slot == num_accepted[:, None], nxt[:, None], padded)
    old = state
    state, counters, count = _commit(state, counters, candidates, num_accepted, lengths, eos_ids, max_new)

    # The draft absorbs the committed positions (anchor .. last accepted) from this verify pass.
    commit_layout = ragged_layout(page_table, old.lens, jnp.where(old.done, 0, num_accepted + 1),
                                  num_tokens=budget, max_q_len=gamma + 1, page_size=geometry.page_size,
                                  num_slots=geometry.num_slots)
    source = jnp.clip(cu[commit_layout.token_req] + commit_layout.token_slot, 0, budget - 1)
    features = (jnp.concatenate([captured[i] for i in draft.capture_layers], axis=-1)[source]
                if draft.capture_layers else None)
    next_tokens = candidates[commit_layout.token_req, commit_layout.token_slot]
    dstate = draft.ingest(target, dstate, features, next_tokens, commit_layout, jnp.arange(state.anchors.shape[0]))
    record = RoundRecord(live=~old.done, lengths=lengths, accepted=num_accepted, committed=count,
                         confidence_logits=proposal.confidence_logits)
    return state, counters, attn.caches, dstate, record


_ROUND_STATIC = ("graphdefs", "shape", "budget")


@functools.partial(jax.jit, static_argnames=_ROUND_STATIC, donate_argnames=("caches", "dstate"))
def _spec_round(graphdefs, params, caches, dstate, state, counters, page_table, sampling, req_keys, eos_ids, max_new,
                sps, capacity, *, shape, budget):
    """One whole speculative round for schedulers whose budget is known before launch (fixed, async)."""
    with ops.use(shape.backend):
        return _spec_round_body(graphdefs, params, caches, dstate, state, counters, page_table, sampling, req_keys,
                                eos_ids, max_new, sps, capacity, shape, budget)


def _spec_round_body(graphdefs, params, caches, dstate, state, counters, page_table, sampling, req_keys, eos_ids,
                     max_new, sps, capacity, shape, budget):
    target, draft = (g.merge(p) for g, p in zip(graphdefs, params))
    # async: the launched budget holds every live anchor plus at most `capacity` draft tokens.
    capacity = jnp.minimum(capacity, budget - jnp.sum(~state.done))
    proposal, lengths, next_capacity, dstate = _draft_and_schedule(
        target, draft, dstate, state, page_table, sampling, req_keys, sps, capacity, shape)
    state, counters, caches, dstate, record = _verify_and_commit(
        target, draft, caches, dstate, state, counters, proposal, lengths, page_table, sampling, req_keys, eos_ids,
        max_new, shape, budget)
    return state, counters, caches, dstate, next_capacity, record


@functools.partial(jax.jit, static_argnames=("graphdefs", "shape"), donate_argnames=("dstate",))
def _spec_draft(graphdefs, params, dstate, state, page_table, sampling, req_keys, sps, *, shape):
    """Draft and schedule; the host reads the token total to pick the verify budget."""
    target, draft = (g.merge(p) for g, p in zip(graphdefs, params))
    with ops.use(shape.backend):
        proposal, lengths, _, dstate = _draft_and_schedule(target, draft, dstate, state, page_table, sampling,
                                                           req_keys, sps, jnp.zeros((), jnp.int32), shape)
    total = jnp.sum(jnp.where(state.done, 0, lengths + 1))
    return proposal, lengths, total, dstate


@functools.partial(jax.jit, static_argnames=_ROUND_STATIC, donate_argnames=("caches", "dstate"))
def _spec_verify(graphdefs, params, caches, dstate, state, counters, proposal, lengths, page_table, sampling, req_keys,
                 eos_ids, max_new, *, shape, budget):
    target, draft = (g.merge(p) for g, p in zip(graphdefs, params))
    with ops.use(shape.backend):
        return _verify_and_commit(target, draft, caches, dstate, state, counters, proposal, lengths, page_table,
                                  sampling, req_keys, eos_ids, max_new, shape, budget)


# --------------------------------------------------------------------------------------------
# driver


def _check_spec(draft, spec: SpecParams):
    config = draft.config
    if config.kind in ("dspark", "dflash", "eagle3") and spec.block_size > config.block_size:
        raise ValueError(f"SpecParams.block_size={spec.block_size} exceeds the draft's trained block size "
                         f"{config.block_size}")
    if spec.scheduler != "fixed" and getattr(draft, "confidence_head", None) is None:
        raise ValueError(f"SpecParams.scheduler={spec.scheduler!r} needs a draft with a confidence head "
                         f"(this {config.kind} draft has none); use scheduler='fixed'")


def _sps_table(spec: SpecParams, rows: int, gamma: int):
    needed = rows * (gamma + 1) + 1
    if spec.scheduler not in ("causal", "async"):
        return jnp.ones((needed,), jnp.float32)
    if spec.sps is None:
        raise ValueError(f"SpecParams.sps is required for scheduler={spec.scheduler!r}: a rounds/s table by "
                         "verify-batch token count (generate() profiles one when given none)")
    if len(spec.sps) < needed:
        raise ValueError(f"SpecParams.sps has {len(spec.sps)} entries; {rows} rows × (γ+1={gamma + 1}) tokens "
                         f"need at least {needed}")
    return jnp.asarray(spec.sps[:needed], jnp.float32)


def _result(reqs: _Requests, state: DecodeState, counters: SpecCounters, gamma: int, t0: float,
            t_first: float) -> GenerateResult:
    history, generated = jax.device_get((state.history, state.generated))
    tokens = [history[r, len(p):len(p) + generated[r]].tolist() for r, p in enumerate(reqs.prompts)]
    c = jax.device_get(counters)
    rounds = max(int(c.rounds), 1)
    end = time.perf_counter()
    stats = SpecStats(
        acceptance_length=float(c.committed) / rounds,
        accept_rate_per_position=[float(a) / max(int(r), 1) for a, r in zip(c.accepted[:gamma], c.reached)],
        survival_per_position=[float(a) / rounds for a in c.accepted[:gamma]],
        verified_tokens=int(c.verified), committed_tokens=int(c.committed), rounds=int(c.rounds))
    return GenerateResult(tokens=tokens, stats=stats, seconds=end - t0, decode_seconds=end - t_first)


class Session:
    """One batch of requests on device: layout, parameters, caches and per-row state.

    Built by prefilling every prompt and sampling its first token; then `plain_step()` or
    `spec_round()` advance all live rows. `generate()` drives it; the SPS profiler reuses it.
    """

    def __init__(self, target, draft, prompts, *, max_new_tokens: int, sampling, spec: SpecParams, seed: int,
                 page_size: int, prefill_chunk: int, backend: str = "auto", record_rounds: bool = False):
        self.t0 = time.perf_counter()
        self.records = [] if record_rounds else None  # RoundRecords on device, read once at the end
        self.backend = ops.resolve(backend)
        self.spec = spec
        self.gamma = spec.block_size if draft is not None else 0
        if draft is not None:
            _check_spec(draft, spec)
        _validate(target, prompts, max_new_tokens, margin=self.gamma + 1)
        per_request = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(per_request) != len(prompts):
            raise ValueError(f"sampling: {len(per_request)} SamplingParams for {len(prompts)} prompts; "
                             "pass one, or one each")
        self.reqs = reqs = _layout_requests(prompts, max_new_tokens, self.gamma + 1, page_size)
        self._tables = {}
        self.geometry = geometry = reqs.geometry
        graphdef, params = split_static(target)
        caches = init_kv_caches(target.kv_heads_and_dims(), num_pages=geometry.num_pages, page_size=page_size,
                                dtype=target.dtype)
        capture = tuple(draft.capture_layers) if draft is not None else ()
        caches, last_logits, chunks = _prefill(graphdef, params, caches, reqs, prefill_chunk, capture, self.backend)

        n = len(prompts)
        self.sampling = SamplingArrays.of(per_request + [SamplingParams()] * (reqs.rows - n))
        self.keys = request_keys(seed, reqs.rows)
        self.eos_ids = jnp.asarray(target.arch.eos_token_ids, jnp.int32)
        self.max_new = jnp.int32(max_new_tokens)
        lens = np.array([len(p) for p in reqs.prompts] + [0] * (reqs.rows - n), np.int32)
        logits = jnp.stack([last_logits[r] for r in range(n)] + [last_logits[0]] * (reqs.rows - n))
        first = sample(logits, self.sampling, position_keys(self.keys, jnp.asarray(lens), TARGET_STREAM))
        history = np.zeros((reqs.rows, reqs.width), np.int32)
        for r, p in enumerate(reqs.prompts):
            history[r, :len(p)] = p
        history = jnp.asarray(history).at[jnp.arange(reqs.rows), jnp.asarray(lens)].set(first)
        pad = jnp.arange(reqs.rows) >= n
        generated = jnp.where(pad, 0, 1).astype(jnp.int32)
        self.state = DecodeState(anchors=first, lens=jnp.asarray(lens), generated=generated,
                                 done=pad | jnp.isin(first, self.eos_ids) | (generated >= self.max_new),
                                 rounds=jnp.zeros((reqs.rows,), jnp.int32), history=history)
        self.counters = SpecCounters.zeros(max(self.gamma, 1))
        self.caches = caches
        self.max_len = int(lens.max())  # upper bound of any row's cache length

        if draft is None:
            self.graphdefs, self.params = graphdef, params
        else:
            draft_graphdef, draft_params = split_static(draft)
            self.graphdefs, self.params = (graphdef, draft_graphdef), (params, draft_params)
            self.dstate = draft.init_state(rows=reqs.rows, num_pages=geometry.num_pages, page_size=page_size,
                                           dtype=target.dtype)
            first_host = np.asarray(first)
            for chunk in chunks:
                table, boundary = _chunk_tables(reqs, chunk, first_host)
                pages = bucket(pages_for(int((chunk.start + chunk.q_lens).max()), page_size), maximum=table.shape[1])
                self.dstate = _draft_ingest_prefill(
                    self.graphdefs, self.params, self.dstate, chunk.features, jnp.asarray(chunk.tokens),
                    jnp.asarray(boundary), jnp.asarray(table[:, :pages]), jnp.asarray(chunk.rows),
                    jnp.asarray(chunk.start), jnp.asarray(chunk.q_lens), max_q_len=bucket(int(chunk.q_lens.max())),
                    geometry=geometry, backend=self.backend)
            self.shape = _RoundShape(gamma=self.gamma, scheduler=spec.scheduler, threshold=spec.threshold,
                                     geometry=geometry, backend=self.backend)
            self.sps = _sps_table(spec, reqs.rows, self.gamma)
            self.full_budget = bucket(reqs.rows * (self.gamma + 1), minimum=16)
            self.capacities = []  # async: the capacity each launched round computed, read two rounds later
        self.t_first = time.perf_counter()

    def page_table(self, length: int):
        """The page table cut to the bucket that covers `length` tokens per row (kept on device)."""
        pages = bucket(pages_for(length, self.geometry.page_size), maximum=self.reqs.page_table.shape[1])
        if pages not in self._tables:
            self._tables[pages] = jnp.asarray(self.reqs.page_table[:, :pages])
        return self._tables[pages]

    def sync(self) -> bool:
        """Read back whether every row is done, and tighten the length bound."""
        done, longest = jax.device_get((jnp.all(self.state.done), jnp.max(self.state.lens)))
        self.max_len = int(longest)
        return bool(done)

    def plain_step(self):
        self.max_len += 1
        self.state, self.counters, self.caches = _decode_step(
            self.graphdefs, self.params, self.caches, self.state, self.counters, self.page_table(self.max_len),
            self.sampling, self.keys, self.eos_ids, self.max_new, geometry=self.geometry, backend=self.backend)

    def spec_round(self):
        self.max_len += self.gamma + 1
        table = self.page_table(self.max_len + 1)
        if self.spec.scheduler in ("fixed", "async"):
            capacity = self.capacities[-2] if len(self.capacities) >= 2 else jnp.int32(self.reqs.rows * self.gamma)
            budget = self.full_budget
            if self.spec.scheduler == "async":
                budget = bucket(self.reqs.rows + int(capacity), minimum=16, maximum=self.full_budget)
            self.state, self.counters, self.caches, self.dstate, next_capacity, record = _spec_round(
                self.graphdefs, self.params, self.caches, self.dstate, self.state, self.counters, table, self.sampling,
                self.keys, self.eos_ids, self.max_new, self.sps, capacity, shape=self.shape, budget=budget)
            self.capacities = (self.capacities + [next_capacity])[-2:]
            self._record(record)
        else:
            proposal, lengths, total, self.dstate = _spec_draft(self.graphdefs, self.params, self.dstate, self.state,
                                                                table, self.sampling, self.keys, self.sps,
                                                                shape=self.shape)
            self.verify(proposal, lengths, table, budget=bucket(int(total), minimum=16))

    def verify(self, proposal, lengths, table, *, budget: int):
        self.state, self.counters, self.caches, self.dstate, record = _spec_verify(
            self.graphdefs, self.params, self.caches, self.dstate, self.state, self.counters, proposal, lengths, table,
            self.sampling, self.keys, self.eos_ids, self.max_new, shape=self.shape, budget=budget)
        self._record(record)

    def _record(self, record: RoundRecord):
        if self.records is not None:
            self.records.append(record)

    def round_log(self) -> RoundLog | None:
        """The recorded request-rounds (live rows only, in round order), or None when not recording."""
        if self.records is None:
            return None
        if not self.records:
            empty = np.zeros((0,), np.int32)
            return RoundLog(empty, empty, empty, empty, None)
        records = jax.device_get(self.records)
        live = np.stack([r.live for r in records])  # [rounds, R]
        take = lambda field: np.stack([getattr(r, field) for r in records])[live]
        request = np.broadcast_to(np.arange(live.shape[1]), live.shape)[live].astype(np.int32)
        conf = take("confidence_logits").astype(np.float32) if records[0].confidence_logits is not None else None
        return RoundLog(request=request, lengths=take("lengths"), accepted=take("accepted"),
                        committed=take("committed"), confidence_logits=conf)

    def result(self) -> GenerateResult:
        result = _result(self.reqs, self.state, self.counters, self.gamma, self.t0, self.t_first)
        return dataclasses.replace(result, rounds=self.round_log())
