"""The sampling warp and token sampling, in fp32, identical for target and draft.

Warp order: logits / temperature → top-k → top-p (keep the most probable tokens until their mass
reaches top_p, the crossing token included). Temperature 0 means argmax; top_k=0 and top_p=1
disable those steps. Parameters are per request, so one batch mixes greedy and sampled requests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature={self.temperature}; expected >= 0")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k={self.top_k}; expected an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p}; expected a value in (0, 1]")

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per-request sampling parameters on device, plus a static flag for the sort they may need."""

    temperature: jax.Array  # [R] fp32
    top_k: jax.Array  # [R] int32
    top_p: jax.Array  # [R] fp32
    filters: bool = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def of(params: list[SamplingParams]) -> "SamplingArrays":
        return SamplingArrays(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            filters=any(p.filters for p in params))

    def rows(self, index) -> "SamplingArrays":
        return SamplingArrays(self.temperature[index], self.top_k[index], self.top_p[index], self.filters)


def _expand(x, ndim):
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def warp_logits(logits, sampling: SamplingArrays):
    """Warped logits [..., V] in fp32 (-inf outside top-k/top-p); leading dims start with R.

    Greedy rows are returned unscaled; `warp_probs` turns them into one-hot argmax.
    """
    x = logits.astype(jnp.float32)
    lead = x.ndim - 1
    temperature = _expand(sampling.temperature, lead)
    x = x / jnp.where(temperature > 0, temperature, 1.0)[..., None]
    if not sampling.filters:
        return x
    vocab = x.shape[-1]
    top_k = _expand(sampling.top_k, lead)
    top_p = _expand(sampling.top_p, lead)
    ordered = -jnp.sort(-x, axis=-1)  # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[..., None], axis=-1)
    k_floor = jnp.where(top_k[..., None] > 0, kth, -jnp.inf)
    ordered = jnp.where(ordered >= k_floor, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p[..., None]) & (ordered > -jnp.inf)
    # The smallest kept value; ties with it stay (the same rule for target and draft).
    p_floor = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    p_floor = jnp.where(top_p[..., None] < 1.0, p_floor, -jnp.inf)
    return jnp.where(x >= jnp.maximum(k_floor, p_floor), x, -jnp.inf)


def warp_probs(logits, sampling: SamplingArrays):
    """The distribution a token is drawn from: fp32 [..., V], one-hot argmax where temperature is 0."""
    lead = logits.ndim - 1
    greedy = _expand(sampling.temperature, lead) == 0
    probs = jax.nn.softmax(warp_logits(logits, sampling), axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy[..., None], one_hot, probs)


def sample_from_probs(probs, keys):
    """One draw per row of probs [R, ..., V] (fp32) with keys [R, ...], by inverse CDF.

    u is drawn from (0, 1] and scaled by the row's total mass, so the chosen index is the first
    whose cumulative mass reaches u: it always has positive probability.
    """
    u = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys.reshape(-1)).reshape(keys.shape)
    cdf = jnp.cumsum(probs, axis=-1)
    idx = jnp.sum(cdf < (u * cdf[..., -1])[..., None], axis=-1)
    return jnp.clip(idx, 0, probs.shape[-1] - 1).astype(jnp.int32)


def sample(logits, sampling: SamplingArrays, keys):
    """Sample from the warped distribution of logits [R, ..., V]; argmax rows are exact."""
    probs = warp_probs(logits, sampling)
    return sample_from_probs(probs, keys)


# Streams separate the random draws made for one position (plain sampling, drafting, acceptance).
TARGET_STREAM, DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 0, 1, 2, 3


def request_keys(seed: int, count: int):
    """Independent keys for `count` requests of one call; request i's key depends only on (seed, i)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(count))


def position_keys(req_keys, positions, stream: int):
    """The key for drawing the token at `positions` (same shape as req_keys or broadcast) in a stream."""
    positions = jnp.broadcast_to(positions, jnp.broadcast_shapes(req_keys.shape, jnp.shape(positions)))
    req_keys = jnp.broadcast_to(req_keys, positions.shape)
    fold = jax.vmap(lambda k, p: jax.random.fold_in(jax.random.fold_in(k, p), stream))
    return fold(req_keys.reshape(-1), positions.reshape(-1)).reshape(positions.shape)
