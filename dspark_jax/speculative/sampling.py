"""The sampling warp and token sampling, in fp32, identical for target and draft.

Warp order: logits / temperature → top-k → top-p (keep the most probable tokens until their mass
reaches top_p, the crossing token included). Temperature 0 means argmax; top_k=0 and top_p=1
disable those steps. Parameters are per request, so one batch mixes greedy and sampled requests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The warp and the inverse-CDF draw are shared with the kernels' references (pallas_kernels sits
# below spec in the import order); they read `sampling` through the SamplingArrays fields.
from pallas_kernels.common import (inverse_cdf, sample_from_probs, uniform_from_keys, warp_logits,  # noqa: F401
                                   warp_probs)


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
