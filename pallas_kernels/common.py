"""Math shared by the kernels' pure-JAX references: masked attention, the sampling warp, inverse-CDF draws.

The sampling warp (identical for target and draft): logits / temperature → top-k → top-p (keep
the most probable tokens until their mass reaches top_p, the crossing token included);
temperature 0 means argmax; top_k=0 and top_p=1 disable those steps. `sampling` is any object
with per-request `temperature` [R] fp32, `top_k` [R] int32, `top_p` [R] fp32 and a static
`filters` flag (dspark_jax.speculative.sampling.SamplingArrays).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def masked_attention(q, k, v, mask, *, scale: float, sinks=None):
    """Softmax attention in fp32 over explicit masks, grouped-query aware.

    q [..., Q, H, D], k/v [..., K, KVH, D], mask [..., Q, K] bool, sinks [H] or None.
    Returns [..., Q, H, D] in q's dtype; fully masked rows give zeros.
    """
    *batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    group = num_heads // num_kv_heads
    qg = q.reshape(*batch, num_q, num_kv_heads, group, head_dim)
    scores = jnp.einsum("...qhgd,...khd->...hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask[..., None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("...hgqk,...khd->...qhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(*batch, num_q, num_heads, head_dim).astype(q.dtype)


def _expand(x, ndim):
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def warp_logits(logits, sampling):
    """Warped logits [..., V] in fp32 (-inf outside top-k/top-p); leading dims start with R.

    Greedy rows are returned unscaled; `warp_probs` turns them into one-hot argmax.
    """
    x = scaled_logits(logits, sampling)
    if not sampling.filters:
        return x
    return jnp.where(x >= warp_floor(x, sampling)[..., None], x, -jnp.inf)


def scaled_logits(logits, sampling):
    """logits / temperature in fp32 [..., V]; greedy rows (temperature 0) unscaled.

    Compute it once and share it: an fp32 division is not correctly rounded everywhere (XLA's
    vectorised CPU code), so two computations of it can differ in the last bit, and a token on
    the top-k/top-p threshold with them.
    """
    x = logits.astype(jnp.float32)
    temperature = _expand(sampling.temperature, x.ndim - 1)
    return x / jnp.where(temperature > 0, temperature, 1.0)[..., None]


# --------------------------------------------------------------------------------------------
# The top-k/top-p floor by an exact threshold select (no sort of the vocabulary)

SELECT_CANDIDATES = 7  # thresholds tried per pass: 6 spread evenly in value, 1 at the middle of the keys
# The mass search starts at s = fl(max − MASS_RANGE): a token x < s has weight exp(x − max) = 0
# exactly, in the reference's softmax as in the sums here. Rounding is monotone and leaves floats
# alone, so x < s means x < max − 128 (else s = fl(max − 128) ≤ fl(x) = x); then fl(x − max) ≤ −128
# and e^−128 < 2^−184, far below half the smallest subnormal (2^−150): it rounds to 0, also through
# an exp some ulps off (e^−104 would already be 0 in exact rounding; 128 leaves the margin) or one
# that flushes subnormals. Tokens of zero weight never move the cumulative mass, so the mass floor
# is never below s (see `warp_floor` for where rounding makes the sort keep them anyway).
MASS_RANGE = 128.0
# Each pass at least halves the key interval (the middle candidate): ≤ 32 passes per search, two
# searches; the bound only stops rows that cannot converge (NaN logits).
_MAX_PASSES = 66
_DONE, _COUNT, _MASS = 0, 1, 2


def warp_floor(x, sampling, *, candidates: int = SELECT_CANDIDATES):
    """The top-k/top-p threshold [...] (fp32) of x [..., V] = `scaled_logits`: a token survives iff x ≥ floor.

    The floor is max(k_floor, p_floor):
    - k_floor: the top_k-th largest x, ties kept (−inf for top_k = 0; top_k > V means V);
    - p_floor: among the tokens x ≥ k_floor, the smallest kept value under "keep the most
      probable tokens until their mass reaches top_p, the crossing token included; ties with the
      smallest kept value stay" (−inf for top_p = 1). With E(≥t) = Σ_{x ≥ max(t, k_floor)} e^(x − max)
      and Z = E(≥ k_floor), it is the largest token value t with E(≥t) ≥ top_p · Z.
    Both are what sorting each row would give: the k_floor always, to the bit. The p_floor is the
    sort's except where the cumulative mass at a boundary between two distinct values equals
    top_p within fp32 rounding: the masses here are sums in another order than a cumulative sum
    over the sorted row, so the boundary token can be kept by one and not the other. (Where the
    whole positive mass falls short of top_p by rounding, the sort also keeps tokens of
    probability 0; the floor here stops at max − MASS_RANGE; the probabilities are the same.)

    The select: a search over the order-preserving int32 image of the fp32 values for the largest
    t with W(≥t) ≥ target (W: token counts for k_floor, masses for p_floor), each pass one read of
    the rows that counts W at `candidates` thresholds inside the current interval and snaps the
    interval to the nearest token values on both sides; a row is done when its interval holds one
    value. On 151,936-token rows a search takes 2–5 passes (plus one for max/min at the start);
    any row at most 32.
    """
    lead, vocab = x.shape[:-1], x.shape[-1]
    if not sampling.filters:
        return jnp.full(lead, -jnp.inf, jnp.float32)

    def per_row(a):  # [R] → one value per row of x
        return jnp.broadcast_to(_expand(a, len(lead)), lead).reshape(-1)

    floor = _select_floor(x.reshape(-1, vocab), per_row(sampling.top_k), per_row(sampling.top_p),
                          candidates=candidates)
    return floor.reshape(lead)


def _key(v):
    """The int32 image of fp32 v that orders as the values do (v without NaN or −0)."""
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _value(key):
    bits = jnp.where(key < 0, key ^ 0x7FFFFFFF, key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _canonical(v):
    return jnp.where(v == 0, 0.0, v)  # −0 → +0: the two compare equal, so they must share a key


@functools.partial(jax.jit, static_argnames="candidates")  # compiled once per shape, also when called eagerly
def _select_floor(x, top_k, top_p, candidates):
    """max(k_floor, p_floor) [N] of the rows x [N, V] fp32 (see `warp_floor`)."""
    vocab = x.shape[1]
    x = _canonical(x)
    top = jnp.max(x, axis=1)
    low = jnp.min(jnp.where(x > -jnp.inf, x, jnp.inf), axis=1)
    n_finite = jnp.sum(x > -jnp.inf, axis=1)
    k = jnp.minimum(top_k, vocab)
    counting = (top_k > 0) & (k <= n_finite)  # else k_floor is −inf (more tokens asked than finite)
    massing = top_p < 1.0
    inf = jnp.full_like(top, jnp.inf)
    phase = jnp.where(counting, _COUNT, jnp.where(massing, _MASS, _DONE))
    state = dict(phase=jnp.where(n_finite > 0, phase, _DONE),
                 lo=_key(jnp.where(counting, low, _mass_start(-inf, low, top))),
                 hi=_key(jnp.where(n_finite > 0, top, 0.0)), target=jnp.zeros_like(top),
                 fresh=~counting & massing, k_floor=-inf, p_floor=-inf)
    state = _settle(state, massing, low, top)

    def step(carry):
        passes, s = carry
        thresholds = jnp.concatenate([_value(s["lo"])[:, None], _value(_candidates(s["lo"], s["hi"], candidates))], 1)
        weight = jnp.where((s["phase"] == _COUNT)[:, None], 1.0,
                           jnp.exp(x - jnp.where(n_finite > 0, top, 0.0)[:, None]))
        reached, above, below = _threshold_stats(x, weight, thresholds)
        target = jnp.where(s["phase"] == _COUNT, k.astype(jnp.float32),
                           jnp.where(s["fresh"], top_p * reached[:, 0], s["target"]))
        # W only falls as the threshold rises (also in fp32: the sums share one order), so t* is at or above
        # every threshold that reaches the target (thresholds[0] = lo does) and below every other one.
        reaches = (reached >= target[:, None]).at[:, 0].set(True)
        lo = jnp.max(jnp.where(reaches, above, -jnp.inf), axis=1)  # the smallest value ≥ the highest such threshold
        hi = jnp.minimum(jnp.min(jnp.where(reaches[:, 1:], jnp.inf, below), axis=1), _value(s["hi"]))
        searching = s["phase"] != _DONE
        s = dict(s, lo=jnp.where(searching, _key(lo), s["lo"]), hi=jnp.where(searching, _key(hi), s["hi"]),
                 target=target, fresh=jnp.zeros_like(s["fresh"]))
        return passes + 1, _settle(s, massing, low, top)

    _, state = jax.lax.while_loop(lambda c: (c[0] < _MAX_PASSES) & jnp.any(c[1]["phase"] != _DONE), step, (0, state))
    return jnp.maximum(state["k_floor"], state["p_floor"])


def _mass_start(k_floor, low, top):
    """Where the mass search starts: no kept token below k_floor, none of positive weight below top − MASS_RANGE."""
    return jnp.maximum(jnp.maximum(k_floor, low), top - MASS_RANGE)


def _settle(s, massing, low, top):
    """Record the rows whose interval holds one value; a finished count search hands over to the mass search."""
    for _ in range(2):  # a mass search may start on a single value (top_k = 1, or k_floor = max)
        done = (s["phase"] != _DONE) & (s["lo"] == s["hi"])
        found = _value(s["lo"])
        counted = done & (s["phase"] == _COUNT)
        k_floor = jnp.where(counted, found, s["k_floor"])
        to_mass = counted & massing
        s = dict(s, k_floor=k_floor, p_floor=jnp.where(done & (s["phase"] == _MASS), found, s["p_floor"]),
                 phase=jnp.where(done, jnp.where(to_mass, _MASS, _DONE), s["phase"]),
                 lo=jnp.where(to_mass, _key(_mass_start(k_floor, low, top)), s["lo"]),
                 hi=jnp.where(to_mass, _key(top), s["hi"]), fresh=s["fresh"] | to_mass)
    return s


def _candidates(lo, hi, count):
    """count thresholds (int32 keys) in (lo, hi]: count − 1 evenly spaced in value, one at the middle key."""
    lo_f, hi_f = _value(lo)[:, None], _value(hi)[:, None]
    t = jnp.arange(1, count, dtype=jnp.float32) / count
    spread = jnp.clip(_key(_canonical(lo_f * (1.0 - t) + hi_f * t)), lo[:, None] + 1, hi[:, None])
    lo_u, hi_u = (jax.lax.bitcast_convert_type(a, jnp.uint32) for a in (lo, hi))
    gap = hi_u - lo_u  # hi − lo without int32 overflow
    mid = jax.lax.bitcast_convert_type(lo_u + (gap - gap // 2), jnp.int32)
    return jnp.concatenate([spread, mid[:, None]], 1)


# The pass reduces blocks of STATS_BLOCK columns, then the blocks: its fp32 sums stay as accurate as
# a tree reduction's. One sequential sum over 151,936 terms (XLA's CPU code for a variadic reduction)
# drifts by ~1e-5, enough to move the top-p floor of a flat row by many tokens.
STATS_BLOCK = 4096


def _threshold_stats(x, weight, thresholds):
    """One read of x [N, V]: per threshold c_j [N, C], Σ weight over x ≥ c_j, min x ≥ c_j, max x < c_j (j > 0)."""
    rows, vocab = x.shape
    full = vocab // STATS_BLOCK * STATS_BLOCK
    parts = [_block_stats(x[:, full:], weight[:, full:], thresholds)] if full < vocab else []
    if full:
        shape = (rows, full // STATS_BLOCK, STATS_BLOCK)
        sums, above, below = _block_stats(x[:, :full].reshape(shape), weight[:, :full].reshape(shape),
                                          thresholds[:, None])
        parts.append((jnp.sum(sums, 1), jnp.min(above, 1), jnp.max(below, 1)))
    sums, above, below = zip(*parts)
    return sum(sums), functools.reduce(jnp.minimum, above), functools.reduce(jnp.maximum, below)


def _block_stats(x, weight, thresholds):
    """`_threshold_stats` over the last axis of x [..., W] (thresholds [..., C]): one variadic reduction, one read."""
    ge = [x >= thresholds[..., j:j + 1] for j in range(thresholds.shape[-1])]
    operands = ([jnp.where(g, weight, 0.0) for g in ge], [jnp.where(g, x, jnp.inf) for g in ge],
                [jnp.where(g, -jnp.inf, x) for g in ge[1:]])
    init = tuple([jnp.float32(v)] * len(ops) for v, ops in zip((0.0, jnp.inf, -jnp.inf), operands))

    def combine(a, b):
        return ([p + q for p, q in zip(a[0], b[0])], [jnp.minimum(p, q) for p, q in zip(a[1], b[1])],
                [jnp.maximum(p, q) for p, q in zip(a[2], b[2])])

    sums, above, below = jax.lax.reduce(operands, init, combine, (x.ndim - 1,))
    return jnp.stack(sums, -1), jnp.stack(above, -1), jnp.stack(below, -1)


def warp_probs(logits, sampling):
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
    return inverse_cdf(probs, uniform_from_keys(keys))


def uniform_from_keys(keys):
    """One u in (0, 1] per key (fp32), the draw `sample_from_probs` makes."""
    return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys.reshape(-1)).reshape(keys.shape)


def inverse_cdf(probs, u):
    """The first index whose cumulative mass reaches u × the row's total mass (probs [..., V], u [...])."""
    cdf = jnp.cumsum(probs, axis=-1)
    idx = jnp.sum(cdf < (u * cdf[..., -1])[..., None], axis=-1)
    return jnp.clip(idx, 0, probs.shape[-1] - 1).astype(jnp.int32)
