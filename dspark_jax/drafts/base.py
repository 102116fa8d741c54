"""The interface every drafter offers the decode round, and what it hands back.

A drafter is an NNX module (parameters, if any, plus static settings) with four methods the
jitted round calls:
- `capture_layers`: target layer ids whose raw outputs it consumes (features [T, n·H]);
- `init_state(...)`: its per-request device state (context caches etc.);
- `ingest(target, state, features, next_tokens, layout, rows)`: absorb committed positions — after
  the prefill and after every verification (`next_tokens[t]` is the committed token at position
  t+1; `rows[i]` is the state row of the layout's row i, out of range for padding);
- `propose(target, state, inputs)`: draft γ tokens → (Proposal, state).

State rows are the engine's request slots; a round may run any subset of them (`ProposeInputs.rows`).
A slot is reused by later requests: whatever per-row state a drafter keeps must be rebuilt by the
prefill's ingest (every request ingests at least one position before its first proposal).
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Proposal:
    """γ draft tokens per request and the exact distributions they were drawn from."""

    tokens: jax.Array  # [R, γ] int32
    probs: jax.Array  # [R, γ, V] fp32, the distribution x_k was sampled from (after warping)
    confidence_logits: jax.Array | None  # [R, γ] fp32 raw logit of c_k, or None without a confidence head
    valid: jax.Array  # [R] int32, how many of the γ tokens are real proposals (n-gram may find fewer)


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
    """Static shape facts of the paged caches a round writes into."""

    page_size: int
    num_pages: int

    @property
    def num_slots(self) -> int:
        return self.page_size * self.num_pages


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProposeInputs:
    """Everything a drafter may look at when proposing (none of it depends on the draft tokens)."""

    anchors: jax.Array  # [R] int32 last committed token, at position lens
    lens: jax.Array  # [R] int32
    page_table: jax.Array  # [R, P] int32
    history: jax.Array  # [R, L] int32 prompt + committed tokens (anchor at index lens)
    sampling: object  # SamplingArrays
    keys: jax.Array  # [R, γ] keys for drawing x_1..x_γ
    gamma: int = dataclasses.field(metadata=dict(static=True))
    geometry: CacheGeometry = dataclasses.field(metadata=dict(static=True))
    rows: jax.Array | None = None  # [R] int32 row of the drafter's state each request uses (None: 0..R-1)
