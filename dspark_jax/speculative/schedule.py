"""Verify-length schedulers: fixed, static threshold, Algorithm 1 (causal), and the async variant.

Survival a_{r,j} = Π_{i≤j} c_{r,i} is non-increasing in j, so sorting every (request, position)
by a (ties by position) admits prefixes only. Algorithm 1 adds tokens in that order while the
expected throughput Θ = (Σ_r 1 + Σ admitted a) · SPS(R + #admitted) keeps improving and stops at
the first non-improvement — the stop is what keeps it lossless: whether x_{r,k} is admitted never
depends on x_{r,k} itself (paper appendix A shows the retrospective global search failing that).

The host bounds Algorithm 1's batch from the SPS table alone (`causal_token_bound`), so a causal
round launches as one program with a verify budget fixed before the draft runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def survival(confidence, valid_lengths=None):
    """Cumulative products a [R, γ] of per-position confidences c [R, γ] (fp32), zero past valid_lengths."""
    a = jnp.cumprod(confidence.astype(jnp.float32), axis=-1)
    if valid_lengths is not None:
        a = jnp.where(jnp.arange(a.shape[-1])[None, :] < valid_lengths[:, None], a, 0.0)
    return a


def _admission_order(survival):
    """Flat indices of all (r, j) sorted by descending a, ties by position then request."""
    rows, gamma = survival.shape
    flat = survival.reshape(-1)
    position = jnp.tile(jnp.arange(gamma), rows)
    order = jnp.lexsort((jnp.arange(rows * gamma), position, -flat))
    return order, flat[order]


def _lengths_from_admitted(order, admitted, rows: int, gamma: int):
    return jax.ops.segment_sum(admitted.astype(jnp.int32), order // gamma, num_segments=rows).astype(jnp.int32)


def _throughput_path(survival, sps, live_rows):
    """Θ after admitting the first n sorted candidates, n = 0..Rγ, and the sorted candidates."""
    rows, gamma = survival.shape
    sps = jnp.asarray(sps, jnp.float32)
    if sps.shape[0] < rows * (gamma + 1) + 1:
        raise ValueError(f"sps has {sps.shape[0]} entries; expected at least R(γ+1)+1 = {rows * (gamma + 1) + 1}")
    live = rows if live_rows is None else live_rows
    order, a_sorted = _admission_order(survival)
    count = jnp.arange(rows * gamma + 1)
    expected = live + jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(a_sorted)])
    theta = expected * sps[live + count]
    return order, a_sorted, theta


def schedule_prefix(survival, sps, live_rows=None, capacity=None):
    """Algorithm 1 (hardware-aware prefix scheduler with early stop).

    survival [R, γ] = a_{r,j} (0 = not a candidate); sps[B] = rounds/s when the verify batch
    holds B tokens (sps[0] unused, len ≥ R(γ+1)+1). `live_rows` (≤ R, may be traced) is how many
    rows verify their anchor this round when the others are padding or finished rows (all zero
    survival); None means all R. `capacity` (may be traced) caps the admitted draft tokens: a
    bound fixed before the draft ran, so the cap cannot depend on the tokens it cuts. Returns
    lengths ℓ_r [R] int32.
    """
    rows, gamma = survival.shape
    order, a_sorted, theta = _throughput_path(survival, sps, live_rows)
    improves = (theta[1:] > theta[:-1]) & (a_sorted > 0)
    if capacity is not None:
        improves &= jnp.arange(rows * gamma) < capacity
    admitted = jnp.cumprod(improves.astype(jnp.int32)).astype(bool)
    return _lengths_from_admitted(order, admitted, rows, gamma)


# The device compares Θ in fp32; the host's walk forgives that much rounding so it never stops first.
_BOUND_SLACK = 1e-4


def causal_token_bound(sps, live_rows: int, max_tokens: int) -> int:
    """The most verify tokens (anchors included) Algorithm 1 can schedule for `live_rows` live rows.

    Admitting the token that grows the batch to B needs (E + a)·sps[B] > E·sps[B−1], with E the
    expected tokens so far. Candidates come sorted by a ≤ 1, so E ≥ live + (B−1−live)·a, and the
    ratio E/(E + a) is smallest at a = 1, where it is (B−1)/B: no data can admit that token unless
    B·sps[B] > (B−1)·sps[B−1]. The walk stops at the first B that fails; `max_tokens` caps it.
    A row that finished counts as live on the host but not on the device; fewer live rows only
    stop the walk earlier, so counting them keeps the bound safe.
    """
    sps = np.asarray(sps, np.float64)
    batch = live_rows
    while batch < max_tokens and (batch + 1) * sps[batch + 1] > batch * sps[batch] * (1.0 - _BOUND_SLACK):
        batch += 1
    return batch


def best_capacity(survival, sps, live_rows=None):
    """The token count K maximising Θ over the whole admission path (no early stop).

    Only for the async scheduler, which applies K two rounds later: then K cannot depend on the
    tokens it admits, and searching past local dips in a jagged SPS curve is safe. `live_rows`
    as in `schedule_prefix`.
    """
    _, a_sorted, theta = _throughput_path(survival, sps, live_rows)
    reachable = jnp.concatenate([jnp.ones((1,), bool), a_sorted > 0])
    return jnp.argmax(jnp.where(reachable, theta, -jnp.inf)).astype(jnp.int32)


def admit_top(survival, capacity):
    """Admit the `capacity` candidates with the highest current survival (prefix-valid)."""
    rows, gamma = survival.shape
    order, a_sorted = _admission_order(survival)
    admitted = (jnp.arange(rows * gamma) < capacity) & (a_sorted > 0)
    return _lengths_from_admitted(order, admitted, rows, gamma)


def threshold_lengths(confidence, threshold: float, valid_lengths):
    """Cut each draft at the first position whose own confidence is below the threshold."""
    keep = confidence >= threshold
    keep &= jnp.arange(confidence.shape[-1])[None, :] < valid_lengths[:, None]
    return jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


SCHEDULERS = ("fixed", "threshold", "causal", "async")


@dataclasses.dataclass(frozen=True)
class SpecParams:
    """How a generation speculates.

    block_size: draft tokens per round (γ). scheduler: "fixed" verifies every proposed token;
    "threshold" cuts at the first calibrated confidence below `threshold`; "causal" is Algorithm 1;
    "async" admits the top-K tokens by current survival with K from two rounds earlier.
    sps: rounds/s by verify-batch token count (index B; len ≥ R(γ+1)+1) for causal/async;
    None profiles the real round on this device on first use. plain_steps (causal, async): a
    serving engine runs a plain decode step instead of a round wherever its past rounds' accepted
    lengths and the step times it measured say a round gives fewer tokens per second (Algorithm 1
    chooses among rounds, which all draft; this is the option of not drafting).
    """

    block_size: int = 7
    scheduler: str = "fixed"
    threshold: float = 0.5
    sps: tuple[float, ...] | None = None
    plain_steps: bool = True

    def __post_init__(self):
        if not 1 <= self.block_size <= 32:
            raise ValueError(f"SpecParams.block_size={self.block_size}; expected 1..32")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"SpecParams.scheduler={self.scheduler!r}; expected one of {list(SCHEDULERS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"SpecParams.threshold={self.threshold}; expected 0..1")
        if self.sps is not None:
            object.__setattr__(self, "sps", tuple(float(s) for s in self.sps))
