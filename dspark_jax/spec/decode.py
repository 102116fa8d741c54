"""Batched generation: chunked prefill, then plain decode steps over a paged KV cache.

Every hot path is a `jax.jit` function of (graphdef, params, caches, ...) that donates the caches.
Shapes come in buckets (requests, tokens, pages), so a long generation compiles a handful of
programs and then only replays them.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.cache import bucket, init_kv_caches, pages_for, ragged_layout
from dspark_jax.models.attention import PagedKV
from dspark_jax.spec.sampling import (TARGET_STREAM, SamplingArrays, SamplingParams, position_keys,
                                      request_keys, sample)


@dataclasses.dataclass(frozen=True)
class SpecStats:
    """Speculation metrics over a generation (bonus token counted in the accepted length)."""

    acceptance_length: float  # mean committed tokens per round (accepted drafts + 1)
    accept_rate_per_position: list[float]  # P(draft k accepted | drafts < k accepted)
    survival_per_position: list[float]  # P(drafts 1..k all accepted) per scheduled round
    verified_tokens: int  # tokens the target ran in decode rounds
    committed_tokens: int  # tokens those rounds committed
    rounds: int


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    tokens: list[list[int]]  # generated tokens per prompt (prompt excluded, EOS included)
    stats: SpecStats
    seconds: float  # wall time of the whole call, compilation included
    decode_seconds: float  # wall time after the first generated token


@dataclasses.dataclass
class _Requests:
    """Host-side bookkeeping of one generate() call: R requests padded to a bucket of rows."""

    prompts: list[list[int]]
    rows: int
    page_size: int
    page_table: np.ndarray  # [rows, pages_per_row]; padding rows hold only the scratch page
    num_pages: int

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size


def _validate(model, prompts, max_new_tokens: int, margin: int):
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")


def _layout_requests(prompts, max_new_tokens: int, margin: int, page_size: int) -> _Requests:
    rows = bucket(len(prompts))
    per_row = bucket(pages_for(max(len(p) for p in prompts) + max_new_tokens + margin, page_size))
    scratch = len(prompts) * per_row  # one shared page that padding rows write into
    table = np.full((rows, per_row), scratch, np.int32)
    for r in range(len(prompts)):
        table[r] = np.arange(r * per_row, (r + 1) * per_row)
    return _Requests(prompts=[list(map(int, p)) for p in prompts], rows=rows, page_size=page_size,
                     page_table=table, num_pages=scratch + 1)


# --------------------------------------------------------------------------------------------
# jitted steps


@functools.partial(jax.jit, static_argnames=("graphdef", "max_q_len", "page_size", "num_slots", "capture"),
                   donate_argnames=("caches",))
def _prefill_step(graphdef, params, caches, tokens, page_table, start, q_lens, *, max_q_len, page_size,
                  num_slots, capture):
    """Run one packed chunk of prompts; returns logits at each request's last chunk token."""
    model = nnx.merge(graphdef, params)
    layout = ragged_layout(page_table, start, q_lens, num_tokens=tokens.shape[0], max_q_len=max_q_len,
                           page_size=page_size, num_slots=num_slots)
    attn = PagedKV(caches, layout.meta)
    hidden, captured = model(tokens, layout.positions, attn, capture=capture)
    last = jnp.maximum(layout.meta.cu_q_lens[1:] - 1, 0)
    return model.logits(hidden[last]), attn.caches, captured


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row decode state on device. `tokens` is the last sampled token, not yet in the cache."""

    tokens: jax.Array  # [R] int32
    lens: jax.Array  # [R] int32 cache length = position of `tokens`
    generated: jax.Array  # [R] int32 tokens produced so far (including `tokens`)
    done: jax.Array  # [R] bool (EOS sampled, budget reached, or a padding row)


def _finished(tokens, generated, eos_ids, max_new_tokens):
    is_eos = jnp.isin(tokens, eos_ids) if eos_ids.size else jnp.zeros_like(tokens, bool)
    return is_eos | (generated >= max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "page_size", "num_slots"), donate_argnames=("caches",))
def _decode_step(graphdef, params, caches, state: DecodeState, page_table, sampling, req_keys, eos_ids,
                 max_new_tokens, *, page_size, num_slots):
    """Feed each row's last token, sample the next one. Finished rows stand still."""
    model = nnx.merge(graphdef, params)
    rows = state.tokens.shape[0]
    layout = ragged_layout(page_table, state.lens, jnp.ones((rows,), jnp.int32), num_tokens=rows, max_q_len=1,
                           page_size=page_size, num_slots=num_slots)
    attn = PagedKV(caches, layout.meta)
    hidden, _ = model(state.tokens, layout.positions, attn)
    keys = position_keys(req_keys, state.lens + 1, TARGET_STREAM)
    nxt = sample(model.logits(hidden), sampling, keys)
    live = ~state.done
    generated = state.generated + live
    new = DecodeState(tokens=jnp.where(live, nxt, state.tokens), lens=state.lens + live, generated=generated,
                      done=state.done | (live & _finished(nxt, generated, eos_ids, max_new_tokens)))
    return new, attn.caches, jnp.where(live, nxt, -1)


# --------------------------------------------------------------------------------------------
# driver


def _prefill(graphdef, params, caches, reqs: _Requests, chunk: int, capture: tuple[int, ...]):
    """Chunked, packed prefill of every prompt; yields (row ids, logits at last prompt token, captured)."""
    done = [0] * len(reqs.prompts)
    last_logits = {}
    captured_all = []
    while any(d < len(p) for d, p in zip(done, reqs.prompts)):
        rows, pieces, budget = [], [], chunk
        for r, p in enumerate(reqs.prompts):
            if done[r] < len(p) and budget > 0:
                take = min(len(p) - done[r], budget)
                rows.append(r)
                pieces.append(p[done[r]:done[r] + take])
                budget -= take
        n_rows = bucket(len(rows))
        tokens = np.zeros(bucket(sum(map(len, pieces)), minimum=16), np.int32)
        flat = np.concatenate(pieces)
        tokens[:len(flat)] = flat
        table = np.full((n_rows, reqs.page_table.shape[1]), reqs.num_pages - 1, np.int32)
        table[:len(rows)] = reqs.page_table[rows]
        start = np.zeros(n_rows, np.int32)
        q_lens = np.zeros(n_rows, np.int32)
        start[:len(rows)] = [done[r] for r in rows]
        q_lens[:len(rows)] = [len(x) for x in pieces]
        pages = bucket(pages_for(int((start + q_lens).max()), reqs.page_size), maximum=table.shape[1])
        logits, caches, captured = _prefill_step(
            graphdef, params, caches, jnp.asarray(tokens), jnp.asarray(table[:, :pages]), jnp.asarray(start),
            jnp.asarray(q_lens), max_q_len=bucket(int(q_lens.max())), page_size=reqs.page_size,
            num_slots=reqs.num_slots, capture=capture)
        captured_all.append((rows, start[:len(rows)].copy(), q_lens[:len(rows)].copy(), captured))
        for i, r in enumerate(rows):
            done[r] += len(pieces[i])
            if done[r] == len(reqs.prompts[r]):
                last_logits[r] = logits[i]
    return caches, last_logits, captured_all


def generate(target, draft, prompts, max_new_tokens: int = 128, sampling: SamplingParams | None = None,
             spec=None, seed: int = 0, *, page_size: int = 16, prefill_chunk: int = 512) -> GenerateResult:
    """Generate continuations for a batch of token-id prompts (different lengths welcome).

    draft=None decodes plainly. Request i's random stream depends only on (seed, i), so a
    request's output does not depend on what else is in the batch.
    """
    if draft is not None:
        raise NotImplementedError("speculative decoding arrives with the drafts (dspark_jax.drafts)")
    t0 = time.perf_counter()
    sampling = sampling or SamplingParams()
    _validate(target, prompts, max_new_tokens, margin=0)
    reqs = _layout_requests(prompts, max_new_tokens, margin=0, page_size=page_size)
    graphdef, params = nnx.split(target)
    caches = init_kv_caches(target.kv_heads_and_dims(), num_pages=reqs.num_pages, page_size=page_size,
                            dtype=target.dtype)
    caches, last_logits, _ = _prefill(graphdef, params, caches, reqs, prefill_chunk, capture=())

    n = len(prompts)
    samp = SamplingArrays.of([sampling] * reqs.rows)
    keys = request_keys(seed, reqs.rows)
    eos_ids = jnp.asarray(target.arch.eos_token_ids, jnp.int32)
    lens = np.array([len(p) for p in reqs.prompts] + [0] * (reqs.rows - n), np.int32)
    logits = jnp.stack([last_logits[r] for r in range(n)] + [last_logits[0]] * (reqs.rows - n))
    first = sample(logits, samp, position_keys(keys, jnp.asarray(lens), TARGET_STREAM))
    generated = jnp.asarray([1] * n + [0] * (reqs.rows - n), jnp.int32)
    pad = jnp.arange(reqs.rows) >= n
    state = DecodeState(tokens=first, lens=jnp.asarray(lens), generated=generated,
                        done=pad | _finished(first, generated, eos_ids, max_new_tokens))
    outputs = [jnp.where(pad, -1, first)]
    t_first = time.perf_counter()

    steps, max_len = 0, int(lens.max())
    while steps < max_new_tokens - 1:
        if steps % 8 == 0 and bool(jnp.all(state.done)):
            break
        max_len += 1
        pages = bucket(pages_for(max_len, page_size), maximum=reqs.page_table.shape[1])
        state, caches, out = _decode_step(
            graphdef, params, caches, state, jnp.asarray(reqs.page_table[:, :pages]), samp, keys, eos_ids,
            jnp.int32(max_new_tokens), page_size=page_size, num_slots=reqs.num_slots)
        outputs.append(out)
        steps += 1

    table = np.stack(jax.device_get(outputs), axis=1)[:n]
    tokens = [[int(t) for t in row if t >= 0] for row in table]
    committed = sum(len(t) for t in tokens)
    end = time.perf_counter()
    stats = SpecStats(acceptance_length=1.0, accept_rate_per_position=[], survival_per_position=[],
                      verified_tokens=committed - n, committed_tokens=committed - n, rounds=steps)
    return GenerateResult(tokens=tokens, stats=stats, seconds=end - t0, decode_seconds=end - t_first)
