"""Training objectives: anchors, block masks, the dense training forward and the losses.

Oracles: the inference paths (paged draft-context cache for DSpark blocks, paged Eagle3 cache
for the training-time test) and a direct NumPy computation of the DSpark loss.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_params
from dspark_jax.cache import ragged_layout
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.models.attention import PagedKV
from dspark_jax.train import losses
from dspark_jax.train.losses import LossWeights
from dspark_jax.train.step import target_features

VOCAB = 53
ARCH = LlamaArch(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=8, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=256)
GAMMA = 4
SEQ = 24


def draft_config(kind: str, **kw) -> DraftConfig:
    base = dict(kind=kind, num_layers=1 if kind == "eagle3" else 2, target_layer_ids=(0, 1),
                mask_token_id=VOCAB - 1, markov_rank=8, block_size=GAMMA)
    return DraftConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def target():
    return randomize_params(create_target(ARCH, dtype="float32"), seed=1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, VOCAB - 1, (2, SEQ)), jnp.int32)
    loss_mask = np.zeros((2, SEQ), bool)
    loss_mask[0, 6:20] = True
    loss_mask[1, 3:] = True
    return tokens, jnp.asarray(loss_mask)


def features_of(target, draft, tokens):
    return target_features(target, tokens, tuple(draft.config.target_layer_ids))


# --------------------------------------------------------------------------------------------
# anchors and masks


def test_anchors_are_sorted_distinct_candidates_with_dummies_last():
    mask = np.zeros(40, bool)
    mask[5:15] = True
    mask[30:33] = True
    candidates = {a for a in range(39) if mask[a] and mask[a + 1]}  # 5..13, 30, 31: 11 positions
    for seed in range(20):
        anchors, valid = losses.sample_anchors(jax.random.key(seed), jnp.asarray(mask), 6)
        anchors, valid = np.asarray(anchors), np.asarray(valid)
        assert valid.all() and set(anchors) <= candidates and len(set(anchors)) == 6
        assert (np.diff(anchors) > 0).all()
    anchors, valid = losses.sample_anchors(jax.random.key(0), jnp.asarray(mask), 16)
    assert valid.tolist() == [True] * 11 + [False] * 5
    assert set(np.asarray(anchors)[:11]) == candidates and (np.asarray(anchors)[11:] == 0).all()


def test_anchor_sampling_is_uniform():
    mask = jnp.asarray(np.arange(30) >= 10)  # candidates 10..28: 19 positions, 5 drawn
    draws = jax.vmap(lambda k: losses.sample_anchors(k, mask, 5)[0])(jax.random.split(jax.random.key(3), 4000))
    counts = np.bincount(np.asarray(draws).reshape(-1), minlength=30)[10:29]
    expected = 4000 * 5 / 19
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_block_supervision_by_hand():
    tokens = jnp.asarray([[10, 11, 12, 13, 14, 15, 16, 17]])
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 0, 1, 1]], bool)
    anchors = jnp.asarray([[2, 6, 0]])
    valid = jnp.asarray([[True, True, False]])
    labels, prev, positions, mask = losses.block_supervision(tokens, loss_mask, anchors, valid, 3)
    assert labels[0, 0].tolist() == [13, 14, 15] and prev[0, 0].tolist() == [12, 13, 14]
    assert mask[0, 0].tolist() == [True, True, False]  # x_5 is outside the loss mask
    assert mask[0, 1].tolist() == [True, False, False]  # x_8 is past the end; a prefix stays a prefix
    assert mask[0, 2].tolist() == [False] * 3  # dummy
    assert positions[0, 1].tolist() == [6, 7, 7]


# --------------------------------------------------------------------------------------------
# the dense training forward against the inference paths


def test_training_blocks_equal_the_paged_inference_backbone(target, batch):
    draft = randomize_params(create_draft(draft_config("dspark"), target), seed=3)
    tokens, _ = batch
    features, _ = features_of(target, draft, tokens)
    anchors = jnp.asarray([[1, 7, 15, 20], [0, 4, 11, 19]], jnp.int32)
    dense = draft.training_blocks(target, features, tokens, anchors, GAMMA)
    page_size, pages = 4, 8
    table = jnp.arange(pages, dtype=jnp.int32)[None]

    @jax.jit
    def paged(seq_features, a, first):
        state = draft.init_state(rows=1, num_pages=pages, page_size=page_size, dtype=jnp.float32)
        layout = ragged_layout(table, jnp.zeros((1,), jnp.int32), a[None], num_tokens=SEQ, max_q_len=SEQ,
                               page_size=page_size, num_slots=pages * page_size)
        state = draft.ingest(target, state, seq_features, jnp.zeros((SEQ,), jnp.int32), layout, jnp.arange(1))
        return draft.backbone(target, state, first[None], a[None], table, GAMMA)[0]

    for b in range(2):
        for n in range(4):
            a = anchors[b, n]
            np.testing.assert_allclose(np.asarray(dense[b, n]), np.asarray(paged(features[b], a, tokens[b, a])),
                                       rtol=2e-5, atol=2e-5)


def test_eagle3_training_time_test_equals_paged_drafting(target, batch):
    """Step s at origin t equals what the paged draft computes after ingesting 0..t and feeding s tokens."""
    draft = randomize_params(create_draft(draft_config("eagle3"), target), seed=4)
    tokens, loss_mask = batch
    features, final_hidden = features_of(target, draft, tokens)
    plan = losses.eagle3_plan(jax.random.split(jax.random.key(0), 2), tokens, loss_mask, GAMMA, SEQ)
    from dspark_jax.models.attention import TrainTimeTest

    attn, hidden, steps = TrainTimeTest(), draft.fc(features), []
    origin = jnp.arange(SEQ)
    for s in range(GAMMA):
        step_tokens = tokens[:, jnp.clip(origin + 1 + s, 0, SEQ - 1)]
        hidden = draft.layers[0](target.embed(step_tokens), hidden, jnp.broadcast_to(origin + s, (2, SEQ)), attn)
        steps.append(hidden)
    page_size, pages = 4, 8
    table = jnp.arange(pages, dtype=jnp.int32)[None]
    num_slots = page_size * pages

    @jax.jit
    def paged(seq_features, seq_tokens, t):
        """Hidden of origin t at steps 0..γ−1 through the paged cache, as drafting computes them."""
        state = draft.init_state(rows=1, num_pages=pages, page_size=page_size, dtype=jnp.float32)
        layout = ragged_layout(table, jnp.zeros((1,), jnp.int32), (t + 1)[None], num_tokens=SEQ, max_q_len=SEQ,
                               page_size=page_size, num_slots=num_slots)
        next_tokens = jnp.concatenate([seq_tokens[1:], seq_tokens[:1]])
        state = draft.ingest(target, state, seq_features, next_tokens, layout, jnp.arange(1))
        out, caches, outs = state.last_hidden, state.caches, [state.last_hidden[0]]
        for s in range(1, GAMMA):
            layout = ragged_layout(table, (t + s)[None], jnp.ones((1,), jnp.int32), num_tokens=1, max_q_len=1,
                                   page_size=page_size, num_slots=num_slots)
            attn = PagedKV(caches, layout.meta)
            out = draft.layers[0](target.embed(seq_tokens[t + 1 + s][None]), out, layout.positions, attn)
            caches = attn.caches
            outs.append(out[0])
        return jnp.stack(outs)

    for b, t in [(0, 0), (0, 9), (1, 5), (1, 17)]:
        expected = paged(features[b], tokens[b], jnp.int32(t))
        for s in range(GAMMA):
            np.testing.assert_allclose(np.asarray(steps[s][b, t]), np.asarray(expected[s]), rtol=2e-5, atol=2e-5,
                                       err_msg=f"origin {t} step {s}")
    # with as many origins as positions, every origin with a supervised step is drawn, in order;
    # the step-s label is x_{t+2+s}, supervised only inside the loss mask
    origins = plan["origins"][0].tolist()
    row = lambda t: origins.index(t)
    assert plan["labels"][0, row(9)].tolist() == tokens[0, 11:15].tolist()
    assert plan["mask"][0, row(15)].tolist() == [True, True, True, False]  # x_20 is outside sequence 0's mask

    # the per-step sums at the sampled origins, against NumPy over the steps' hidden states
    sums = losses.eagle3_sums(draft, target, tokens, features, final_hidden, plan, losses.LossWeights())
    logits = lambda h: np.asarray(target.logits(h), np.float64)
    for s in range(GAMMA):
        expected_soft_ce = expected_ce = 0.0
        for b in range(2):
            for n, t in enumerate(plan["origins"][b].tolist()):
                if not plan["mask"][b, n, s]:
                    continue
                log_q = logits(draft.norm(steps[s][b, t]))
                log_q = log_q - np.log(np.sum(np.exp(log_q - log_q.max()))) - log_q.max()
                p = logits(final_hidden[b, min(t + 1 + s, SEQ - 1)])
                p = np.exp(p - p.max()) / np.sum(np.exp(p - p.max()))
                expected_soft_ce -= np.sum(p * log_q)
                expected_ce -= log_q[int(plan["labels"][b, n, s])]
        np.testing.assert_allclose(float(sums["soft_ce"][s]), expected_soft_ce, rtol=1e-4)
        np.testing.assert_allclose(float(sums["ce"][s]), expected_ce, rtol=1e-4)


def test_eagle3_origins_are_a_uniform_subset_of_supervised_positions(batch):
    tokens, loss_mask = batch
    plan = losses.eagle3_plan(jax.random.split(jax.random.key(1), 2), tokens, loss_mask, GAMMA, 5)
    supervised = np.asarray(loss_mask)
    for b in range(2):
        origins = plan["origins"][b].tolist()
        assert origins == sorted(set(origins)) and len(origins) == 5
        for n, t in enumerate(origins):  # step 0 at origin t is supervised iff x_{t+2} is
            assert bool(plan["mask"][b, n, 0]) == (t + 2 < SEQ and bool(supervised[b, t + 2]))
            assert bool(plan["mask"][b, n].any())


# --------------------------------------------------------------------------------------------
# the loss against NumPy


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [5, 4096])
def test_dspark_loss_equals_numpy(target, batch, chunk_rows):
    draft = randomize_params(create_draft(draft_config("dspark"), target), seed=5)
    tokens, loss_mask = batch
    features, final_hidden = features_of(target, draft, tokens)
    weights = LossWeights(ce=0.3, l1=0.9, conf=1.2, position_decay=3.0, chunk_rows=chunk_rows)
    plan = losses.block_plan(jax.random.split(jax.random.key(6), 2), loss_mask, 6, GAMMA, tokens)
    counts = losses.block_counts(plan)

    @jax.jit
    def objective(plan):
        sums = losses.dspark_sums(draft, target, tokens, features, final_hidden, plan, weights)
        return losses.combine("dspark", sums, counts, weights)

    loss, means = objective(plan)

    # NumPy: every block row from the dense hidden, full-vocabulary math in float64
    hidden = np.asarray(draft.training_blocks(target, features, tokens, plan["anchors"], GAMMA), np.float64)
    lm_head = np.asarray(target.lm_head.kernel[...], np.float64)  # [H, V]
    w1 = np.asarray(draft.markov_head.markov_w1.embedding[...], np.float64)
    w2 = np.asarray(draft.markov_head.markov_w2.kernel[...], np.float64)
    conf_w = np.asarray(draft.confidence_head.proj.kernel[...], np.float64)[:, 0]
    conf_b = float(draft.confidence_head.proj.bias[...][0])
    tok, lm, fh = np.asarray(tokens), np.asarray(loss_mask), np.asarray(final_hidden, np.float64)
    anchors, valid = np.asarray(plan["anchors"]), np.asarray(jnp.any(plan["mask"], -1))
    total = {"ce": 0.0, "l1": 0.0, "conf": 0.0}
    count = 0.0
    for b in range(2):
        for n in range(anchors.shape[1]):
            a = anchors[b, n]
            alive = True
            for k in range(GAMMA):
                label_at = a + k + 1
                alive = alive and valid[b, n] and label_at < SEQ and lm[b, label_at]
                if not alive:
                    break
                w = np.exp(-k / 3.0)
                prev = tok[b, a + k]
                q = softmax(hidden[b, n, k] @ lm_head + w1[prev] @ w2)
                p = softmax(fh[b, a + k] @ lm_head)
                l1 = np.abs(q - p).sum()
                z = np.concatenate([hidden[b, n, k], w1[prev]]) @ conf_w + conf_b
                c = min(max(1 - l1 / 2, 0.0), 1.0)
                total["ce"] += w * -np.log(q[tok[b, label_at]])
                total["l1"] += w * l1
                total["conf"] += w * -(c * np.log(1 / (1 + np.exp(-z))) + (1 - c) * np.log(1 / (1 + np.exp(z))))
                count += w
    assert count > 10
    for name in total:
        assert float(means[name]) == pytest.approx(total[name] / count, rel=1e-4), name
    expected = 0.3 * total["ce"] / count + 0.9 * total["l1"] / count + 1.2 * total["conf"] / count
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def _grad_fn(draft, target, tokens, features, final_hidden, weights):
    """(loss, grads) of the DSpark objective as a function of a block plan and the step's counts."""
    graphdef, params = nnx.split(draft)

    def loss_fn(p, plan, counts):
        sums = losses.dspark_sums(nnx.merge(graphdef, p), target, tokens, features, final_hidden, plan, weights)
        return losses.combine("dspark", sums, counts, weights)[0]

    grad = jax.jit(jax.value_and_grad(loss_fn))
    return lambda plan, counts: grad(params, plan, counts)


def test_dummy_blocks_give_no_nan_and_no_gradient(target, batch):
    draft = randomize_params(create_draft(draft_config("dspark", markov_head="rnn"), target), seed=7)
    tokens, loss_mask = batch
    features, final_hidden = features_of(target, draft, tokens)
    weights = LossWeights()
    keys = jax.random.split(jax.random.key(8), 2)
    real = losses.block_plan(keys, loss_mask, 3, GAMMA, tokens)
    # the same real blocks plus dummies (anchor 0, fully masked) appended after them
    padded = dict(real)
    pad_valid = jnp.zeros((2, 5), bool)
    padded["anchors"] = jnp.concatenate([real["anchors"], jnp.zeros((2, 5), jnp.int32)], 1)
    rest = losses.block_supervision(tokens, loss_mask, jnp.zeros((2, 5), jnp.int32), pad_valid, GAMMA)
    for name, extra in zip(("labels", "prev", "positions", "mask"), rest):
        padded[name] = jnp.concatenate([real[name], extra], 1)
    counts = losses.block_counts(real)
    assert float(jnp.sum(losses.block_counts(padded))) == float(jnp.sum(counts))
    grads_of = _grad_fn(draft, target, tokens, features, final_hidden, weights)
    loss_a, grads_a = grads_of(real, counts)
    loss_b, grads_b = grads_of(padded, counts)
    assert np.isfinite(float(loss_b)) and float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads_a), nnx.to_flat_state(grads_b)):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        assert np.all(np.isfinite(b)), path
        # equal up to float summation order (the padded blocks add exact zeros in other places)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=str(path))

    # a sequence with no candidate anchor at all: only dummies, zero loss and zero gradient
    nothing = jnp.zeros_like(loss_mask)
    empty = losses.block_plan(keys, nothing, 8, GAMMA, tokens)  # the padded plan's shapes: no new compile
    loss, grads = grads_of(empty, losses.block_counts(empty))
    assert float(loss) == 0.0
    assert all(np.all(np.asarray(g[...]) == 0) for _, g in nnx.to_flat_state(grads))
