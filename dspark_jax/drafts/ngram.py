"""Prompt-lookup (n-gram) drafting: no weights, works with any target.

The last n tokens of a request (n from ngram_max down to ngram_min) are searched for earlier in
its own history; the tokens that followed the latest earlier match are proposed. Proposals are
deterministic, so each is drawn from a one-hot distribution, which is what verification gets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.config import DraftConfig
from dspark_jax.drafts.base import Proposal, ProposeInputs


def lookup(history, lengths, *, gamma: int, ngram_min: int, ngram_max: int):
    """(tokens [R, γ], valid [R]) continuing the latest earlier match of the longest matching suffix.

    history [R, L] holds lengths[r] valid tokens per row; the suffix itself never counts as a match.
    """
    rows, width = history.shape
    start = jnp.arange(width)[None, :]
    best_start = jnp.full((rows,), -1, jnp.int32)
    for n in range(ngram_max, ngram_min - 1, -1):
        suffix_at = lengths - n  # where the last n tokens begin
        match = (start + n < lengths[:, None]) & (suffix_at[:, None] >= 0)
        for i in range(n):
            shifted = jnp.roll(history, -i, axis=1)
            wanted = jnp.take_along_axis(history, jnp.clip(suffix_at + i, 0, width - 1)[:, None], axis=1)
            match &= shifted == wanted
        latest = jnp.max(jnp.where(match, start, -1), axis=1)
        found = (best_start < 0) & (latest >= 0)
        best_start = jnp.where(found, latest + n, best_start)
    continuation = jnp.clip(best_start[:, None] + jnp.arange(gamma)[None, :], 0, width - 1)
    tokens = jnp.take_along_axis(history, continuation, axis=1)
    valid = jnp.where(best_start >= 0, jnp.clip(lengths - best_start, 0, gamma), 0).astype(jnp.int32)
    return tokens.astype(jnp.int32), valid


class NgramDraft(nnx.Module):
    def __init__(self, config: DraftConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size

    capture_layers = ()

    def init_state(self, *, rows: int, num_pages: int, page_size: int, dtype):
        return ()

    def ingest(self, target, state, features, next_tokens, layout, rows):
        return state

    def propose(self, target, state, inputs: ProposeInputs):
        tokens, valid = lookup(inputs.history, inputs.lens + 1, gamma=inputs.gamma, ngram_min=self.config.ngram_min,
                               ngram_max=self.config.ngram_max)
        probs = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
        return Proposal(tokens=tokens, probs=probs, confidence_logits=None, valid=valid), state
