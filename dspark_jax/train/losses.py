"""Training objectives of DSpark, DFlash and Eagle3 drafts against a frozen target.

Each objective returns per-position *sums* over its rows (unweighted), plus the per-position
supervised counts; `combine` turns them into the scalar loss with the recipe's position weights
and normalisation. Splitting it this way lets gradient accumulation and data parallelism
normalise by the global count exactly: the counts of a whole step are known before any model runs.

DSpark/DFlash (DeepSpec): anchors a with loss_mask[a] and loss_mask[a+1]; block [x_a, MASK…] at
a..a+γ−1; slot k's label is x_{a+k+1}, its target distribution softmax(lm_head(target final hidden
at a+k)); supervision mask = cumulative product over k of (label in range and in the loss mask).
Losses per slot: CE on the label, L1 = Σ_v |p_draft − p_target|, and BCE-with-logits of the
confidence logit against c* = clamp(1 − L1/2, 0, 1) (no gradient through c*), each weighted by
w_k = exp(−k/decay) and divided by Σ w_k · count_k.

Eagle3: training-time test of γ steps (see models.attention.TrainTimeTest); step s at origin t
predicts x_{t+2+s} and is matched to the target's distribution at t+1+s by soft CE; each step's
mean is weighted by decay^s (EAGLE-3's own normalisation). The losses are taken at sampled
origins, as many per sequence as DSpark has anchors.

Vocabulary-sized logits are never materialised for all rows at once: `vocab_losses` maps over
row chunks under `jax.checkpoint`, so the backward pass recomputes one chunk at a time too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dspark_jax.models.attention import TrainTimeTest

@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Static loss settings (hashable: part of the jitted step's identity)."""

    ce: float = 0.1
    l1: float = 0.9
    conf: float = 1.0
    position_decay: float = 4.0  # DSpark/DFlash: w_k = exp(−k / position_decay)
    step_decay: float = 0.8  # Eagle3: step s weighs step_decay ** s
    chunk_rows: int = 1024  # rows of [rows, V] logits formed at once


# --------------------------------------------------------------------------------------------
# anchors and block supervision


def sample_anchors(key, loss_mask, num: int):
    """Up to `num` block anchors of one sequence: positions a with loss_mask[a] and loss_mask[a+1]."""
    return sample_positions(key, loss_mask & jnp.concatenate([loss_mask[1:], jnp.zeros((1,), bool)]), num)


def sample_positions(key, candidate, num: int):
    """Up to `num` of the candidate positions [S] of one sequence, uniform without replacement, sorted.

    Returns (positions [num] int32, valid [num] bool); missing ones are dummies at position 0, last.
    """
    seq = candidate.shape[0]
    # The top `num` of iid uniform scores over the candidates is a uniform subset of them.
    scores = jnp.where(candidate, jax.random.uniform(key, (seq,)), -1.0)
    top, index = jax.lax.top_k(scores, num)
    valid = top >= 0
    order = jnp.argsort(jnp.where(valid, index, seq + index))
    return jnp.where(valid, index, 0)[order].astype(jnp.int32), valid[order]


def block_supervision(tokens, loss_mask, anchors, valid, gamma: int):
    """Per-slot (labels, previous tokens, slot positions, mask) [B, N, γ] of blocks at `anchors` [B, N].

    Slot k sits at position a+k, follows token x_{a+k} (the anchor for k=0: teacher forcing) and
    is labelled x_{a+k+1}; mask = cumulative product of (label in range & loss_mask[label]).
    """
    seq = tokens.shape[1]
    positions = anchors[..., None] + jnp.arange(gamma)
    label_pos = positions + 1
    flat = lambda x, pos: jnp.take_along_axis(x, jnp.clip(pos, 0, seq - 1).reshape(x.shape[0], -1),
                                              axis=1).reshape(pos.shape)
    labels = flat(tokens, label_pos)
    ok = (label_pos < seq) & flat(loss_mask, label_pos) & valid[..., None]
    mask = jnp.cumprod(ok.astype(jnp.int32), axis=-1).astype(bool)
    return labels, flat(tokens, positions), jnp.clip(positions, 0, seq - 1), mask


# --------------------------------------------------------------------------------------------
# vocabulary-sized losses, chunked


def vocab_losses(draft_logits, target_logits, rows: dict, labels, chunk_rows: int):
    """Per-row CE (labels), L1 to the target distribution, soft CE and argmax accuracy, fp32.

    rows: arrays with a leading row axis [M, ...]; draft_logits(rows_chunk) and
    target_logits(rows_chunk) give fp32 [c, V]. Target logits get no gradient.
    Returns dict of [M] arrays: ce, l1, soft_ce, correct.
    """
    count = labels.shape[0]
    chunk = min(chunk_rows, count)
    padded = -(-count // chunk) * chunk
    pad = lambda x: jnp.pad(x, [(0, padded - count)] + [(0, 0)] * (x.ndim - 1))
    chunks = jax.tree.map(lambda x: pad(x).reshape(padded // chunk, chunk, *x.shape[1:]),
                          {"rows": rows, "labels": labels})

    @jax.checkpoint
    def one(piece):
        log_q = jax.nn.log_softmax(draft_logits(piece["rows"]).astype(jnp.float32), axis=-1)
        p = jax.nn.softmax(jax.lax.stop_gradient(target_logits(piece["rows"]).astype(jnp.float32)), axis=-1)
        label = piece["labels"][:, None]
        return {
            "ce": -jnp.take_along_axis(log_q, label, axis=-1)[:, 0],
            "l1": jnp.sum(jnp.abs(jnp.exp(log_q) - p), axis=-1),
            "soft_ce": -jnp.sum(p * log_q, axis=-1),
            "correct": (jnp.argmax(log_q, axis=-1) == piece["labels"]).astype(jnp.float32),
        }

    out = jax.lax.map(one, chunks)
    return {k: v.reshape(padded)[:count] for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# objectives


def block_plan(keys, loss_mask, num_anchors: int, gamma: int, tokens):
    """Anchors and supervision of every sequence of a micro-batch (cheap: no model runs)."""
    anchors, valid = jax.vmap(lambda k, m: sample_anchors(k, m, num_anchors))(keys, loss_mask)
    labels, prev, positions, mask = block_supervision(tokens, loss_mask, anchors, valid, gamma)
    return dict(anchors=anchors, labels=labels, prev=prev, positions=positions, mask=mask)


def block_counts(plan) -> jax.Array:
    """Supervised slots per block position [γ]."""
    return jnp.sum(plan["mask"], axis=(0, 1)).astype(jnp.float32)


def dspark_sums(draft, target, tokens, features, final_hidden, plan, weights: LossWeights):
    """Per-position sums [γ] of every statistic for DSpark / DFlash blocks (see the module doc)."""
    gamma = plan["mask"].shape[-1]
    hidden = draft.training_blocks(target, features, tokens, plan["anchors"], gamma)  # [B, N, γ, H]
    target_hidden = jnp.take_along_axis(
        final_hidden, plan["positions"].reshape(tokens.shape[0], -1)[..., None], axis=1)
    rows = {"hidden": hidden.reshape(-1, hidden.shape[-1]),
            "target": target_hidden.reshape(-1, final_hidden.shape[-1])}
    markov = draft.markov_head
    if markov is not None:
        latents = markov.teacher_forced_latents(hidden, plan["prev"])
        rows["latent"] = latents.reshape(-1, latents.shape[-1])

    def draft_logits(r):
        base = target.logits(r["hidden"])
        return base + markov.bias(r["latent"]) if markov is not None else base

    stats = vocab_losses(draft_logits, lambda r: target.logits(r["target"]), rows, plan["labels"].reshape(-1),
                         weights.chunk_rows)
    stats = {k: v.reshape(plan["mask"].shape) for k, v in stats.items()}
    conf_logits = draft.confidence_logits(hidden, plan["prev"])
    if conf_logits is not None:
        c_star = jax.lax.stop_gradient(jnp.clip(1.0 - 0.5 * stats["l1"], 0.0, 1.0))
        stats["conf"] = optax.losses.sigmoid_binary_cross_entropy(conf_logits, c_star)
    mask = plan["mask"].astype(jnp.float32)
    return {k: jnp.sum(v * mask, axis=(0, 1)) for k, v in stats.items()}


def eagle3_plan(keys, tokens, loss_mask, gamma: int, num_origins: int):
    """Eagle3 supervision of a micro-batch: `num_origins` origins per sequence and their step masks.

    Step s at origin t is supervised when x_{t+2+s} is in the loss mask. Origins are drawn like
    DSpark's anchors (uniform among those with a supervised step), so both objectives form the
    same number of vocabulary-sized rows per sequence; the training-time test itself still runs
    over every position, since later steps attend to earlier origins. Returns origins [B, N],
    labels and mask [B, N, γ].
    """
    seq = tokens.shape[1]
    target_pos = jnp.arange(seq)[:, None] + 2 + jnp.arange(gamma)[None, :]  # [S, γ]: x_{t+2+s}
    label_pos = jnp.clip(target_pos, 0, seq - 1)
    mask = (target_pos < seq)[None] & loss_mask[:, label_pos]  # [B, S, γ]
    origins, valid = jax.vmap(lambda k, m: sample_positions(k, m.any(-1), num_origins))(keys, mask)
    at_origins = lambda x: jnp.take_along_axis(x, origins[..., None], axis=1)
    return dict(origins=origins, labels=at_origins(tokens[:, label_pos]), mask=at_origins(mask) & valid[..., None])


def eagle3_counts(plan) -> jax.Array:
    return jnp.sum(plan["mask"], axis=(0, 1)).astype(jnp.float32)


def eagle3_sums(draft, target, tokens, features, final_hidden, plan, weights: LossWeights):
    """Per-step sums [γ] of the training-time test (see the module doc and TrainTimeTest)."""
    batch, seq = tokens.shape
    gamma = plan["mask"].shape[-1]
    origin = jnp.arange(seq)
    origins = plan["origins"]  # [B, N]
    layer = draft.layers[0]
    attn = TrainTimeTest()
    hidden = draft.fc(features)
    sums = {k: [] for k in ("ce", "l1", "soft_ce", "correct")}
    for s in range(gamma):
        step_tokens = tokens[:, jnp.clip(origin + 1 + s, 0, seq - 1)]
        positions = jnp.broadcast_to(origin + s, (batch, seq))
        hidden = layer(target.embed(step_tokens), hidden, positions, attn)
        draft_rows = jnp.take_along_axis(hidden, origins[..., None], axis=1)
        target_rows = jnp.take_along_axis(final_hidden, jnp.clip(origins + 1 + s, 0, seq - 1)[..., None], axis=1)
        rows = {"hidden": draft_rows.reshape(-1, hidden.shape[-1]), "target": target_rows.reshape(-1, hidden.shape[-1])}
        stats = vocab_losses(lambda r: target.logits(draft.norm(r["hidden"])), lambda r: target.logits(r["target"]),
                             rows, plan["labels"][:, :, s].reshape(-1), weights.chunk_rows)
        mask = plan["mask"][:, :, s].reshape(-1).astype(jnp.float32)
        for k in sums:
            sums[k].append(jnp.sum(stats[k] * mask))
    return {k: jnp.stack(v) for k, v in sums.items()}


def combine(kind: str, sums: dict, counts, weights: LossWeights):
    """(scalar loss, per-statistic means) from per-position sums [γ] and the step's global counts [γ]."""
    gamma = counts.shape[0]
    k = jnp.arange(gamma, dtype=jnp.float32)
    if kind == "eagle3":
        per_step = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)
        coeff = weights.step_decay ** k * per_step
        loss = jnp.sum(coeff * sums["soft_ce"])
    else:
        w = jnp.exp(-k / weights.position_decay)
        coeff = w / jnp.maximum(jnp.sum(w * counts), 1.0)
        loss = weights.ce * jnp.sum(coeff * sums["ce"]) + weights.l1 * jnp.sum(coeff * sums["l1"])
        if "conf" in sums:
            loss = loss + weights.conf * jnp.sum(coeff * sums["conf"])
    means = {name: jnp.sum(coeff * v) for name, v in sums.items() if name != "correct"}
    means["accuracy"] = sums["correct"] / jnp.maximum(counts, 1.0)  # [γ], unweighted per position
    return loss, means
