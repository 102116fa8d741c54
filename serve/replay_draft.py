"""A draft whose greedy acceptance follows a given profile, at a real DSpark draft's full cost.

A random-weight target almost never accepts a random draft's tokens, so its speculative timings
show what rounds cost and never what they gain. `make_predictable(target)` zeroes every layer's
attention output projection (the same compute runs; each position's output becomes a function of
its own token) and tabulates the target's greedy next token for every vocabulary entry.
`ReplayDraft` runs the wrapped draft's whole proposal (backbone, Markov loop), then rewrites its
tokens: draft position k follows the table while every earlier one did and a uniform draw falls
under the profile's conditional acceptance rate p_k; the first position that draws above p_k gets
a token off the table (the draft's own where it differs), which greedy verification rejects. So at
temperature 0 the accepted lengths follow the profile (up to the target's own near-ties between
batch shapes), and the confidences are logit(p_k), as a perfectly calibrated head would give.
Used by serve/bench_e2e.py --replay.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.drafts.base import Proposal, ProposeInputs
from dspark_jax.models import forward

REPLAY_STREAM = 0x5E9  # folded into the round's draft keys for the profile's draws


def make_predictable(target, chunk: int = 1024) -> np.ndarray:
    """Zero the target's attention output projections in place; returns table[v] = its greedy token after v."""
    for layer in target.layers:
        o_proj = layer.self_attn.o_proj
        o_proj.kernel[...] = jnp.zeros_like(o_proj.kernel[...])
        if getattr(o_proj, "bias", None) is not None:
            o_proj.bias[...] = jnp.zeros_like(o_proj.bias[...])
    vocab = target.arch.vocab_size
    table = np.empty(vocab, np.int32)
    for start in range(0, vocab, chunk):
        ids = np.zeros(chunk, np.int32)  # one compiled shape: the last chunk is padded
        count = min(chunk, vocab - start)
        ids[:count] = np.arange(start, start + count)
        logits, _ = forward(target, ids[:, None])
        table[start:start + count] = np.asarray(jnp.argmax(logits[:, 0], axis=-1))[:count]
    return table


class ReplayTable(nnx.Variable):
    """The target's greedy next token per vocabulary entry (not trained, not a parameter)."""


class ReplayDraft(nnx.Module):
    def __init__(self, draft, table: np.ndarray, accept_rates):
        rates = tuple(float(p) for p in accept_rates)
        if not rates or not all(0.0 < p < 1.0 for p in rates):
            raise ValueError(f"accept_rates={accept_rates!r}; expected one or more rates in (0, 1)")
        self.inner = draft
        self.table = ReplayTable(jnp.asarray(table, jnp.int32))
        self.rates = rates  # position k ≥ len(rates) uses the last one

    @property
    def config(self):
        return self.inner.config

    @property
    def confidence_head(self):
        return self.inner.confidence_head

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.inner.capture_layers

    def init_state(self, **kwargs):
        return self.inner.init_state(**kwargs)

    def ingest(self, target, state, features, next_tokens, layout, rows):
        return self.inner.ingest(target, state, features, next_tokens, layout, rows)

    def calibrated_confidence(self, logits):
        return jax.nn.sigmoid(logits)

    def _rates(self, gamma: int) -> jax.Array:
        return jnp.asarray([self.rates[min(k, len(self.rates) - 1)] for k in range(gamma)], jnp.float32)

    def propose(self, target, state, inputs: ProposeInputs):
        proposal, state = self.inner.propose(target, state, inputs)
        rates = self._rates(inputs.gamma)
        draws = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, REPLAY_STREAM))))(inputs.keys)
        on_table = jnp.cumprod(draws < rates, axis=1).astype(bool)  # [R, γ]
        table, vocab = self.table[...], self.table.shape[0]
        tokens, previous = [], inputs.anchors
        for k in range(inputs.gamma):
            follow = table[previous]
            own = proposal.tokens[:, k]  # keeps the wrapped draft's sampling (and its cost) in the program
            off = jnp.where(own != follow, own, (follow + 1) % vocab)
            previous = jnp.where(on_table[:, k], follow, off)
            tokens.append(previous)
        tokens = jnp.stack(tokens, axis=1)
        logits = jnp.broadcast_to(jnp.log(rates) - jnp.log1p(-rates), tokens.shape)
        return Proposal(tokens=tokens, probs=jax.nn.one_hot(tokens, vocab, dtype=jnp.float32),
                        confidence_logits=logits, valid=proposal.valid), state


def expected_tau(accept_rates, gamma: int) -> float:
    """Mean tokens a round commits when every draft position is verified: 1 + Σ_k Π_{j≤k} p_j."""
    rates = [accept_rates[min(k, len(accept_rates) - 1)] for k in range(gamma)]
    return 1.0 + sum(math.prod(rates[:k + 1]) for k in range(gamma))
