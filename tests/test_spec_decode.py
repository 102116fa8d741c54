"""Speculative generation end to end: greedy equality with plain decoding, stats, drafts' plumbing.

Random drafts are almost never accepted, which would leave multi-token commits untested. So the
main target here has its attention outputs zeroed: its next token then depends on the current
token only, through a table M we can read off, and a DSpark draft whose Markov head encodes M
(for part of the vocabulary) is accepted often — every path of the round runs for real.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import randomize_params
from dspark_jax.cache import ragged_layout
from dspark_jax.checkpoint.deepspec import load_deepspec_draft, save_deepspec_draft
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.loading import load_draft
from dspark_jax.drafts.base import CacheGeometry, ProposeInputs
from dspark_jax.models import create_target, forward
from dspark_jax.engine import generate
from dspark_jax.speculative.sampling import SamplingArrays, SamplingParams
from dspark_jax.speculative.decode import STASH_POSITIONS, Core, Piece, pack_chunk
from dspark_jax.speculative.schedule import SpecParams

VOCAB = 61
ARCH = LlamaArch(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=12, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=512)
GAMMA = 4
SPS = tuple(1.0 / (1.0 + 0.05 * b) for b in range(16 * (GAMMA + 1) + 1))


def draft_config(kind: str, **kw) -> DraftConfig:
    return DraftConfig(kind=kind, num_layers=1 if kind == "eagle3" else 2, target_layer_ids=(0, 1), mask_token_id=VOCAB - 1, markov_rank=VOCAB,
                       block_size=GAMMA, **kw)


@pytest.fixture(scope="module")
def target():
    model = randomize_params(create_target(ARCH, dtype="float32"), seed=11)
    for layer in model.layers:  # attention adds nothing: the next token is a function of the current one
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
    return model


@pytest.fixture(scope="module")
def transition(target):
    logits, _ = forward(target, jnp.arange(VOCAB)[:, None])
    return np.asarray(logits[:, 0])  # [V, V]: row x = the target's logits after token x


@pytest.fixture(scope="module")
def dspark(target, transition):
    """A DSpark draft whose Markov bias knows the target's transitions for two thirds of the tokens."""
    draft = randomize_params(create_draft(draft_config("dspark"), target), seed=12)
    rng = np.random.default_rng(13)
    rows = np.arange(VOCAB)
    wrong = rng.random(VOCAB) < 1 / 3
    table = transition[np.where(wrong, rng.permutation(VOCAB), rows)]
    draft.markov_head.markov_w1.embedding[...] = jnp.eye(VOCAB, dtype=jnp.float32)
    draft.markov_head.markov_w2.kernel[...] = jnp.asarray(40.0 * table, jnp.float32)
    return draft


def prompts_of(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB - 1, int(n)).tolist() for n in rng.integers(3, 40, batch)]


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("scheduler", ["fixed", "threshold", "causal", "async"])
def test_dspark_greedy_equals_plain(target, dspark, batch, scheduler):
    prompts = prompts_of(batch, seed=batch)
    plain = generate(target, None, prompts, max_new_tokens=20, prefill_chunk=64)
    spec = generate(target, dspark, prompts, max_new_tokens=20, prefill_chunk=64,
                    spec=SpecParams(block_size=GAMMA, scheduler=scheduler, threshold=0.3, sps=SPS))
    assert spec.tokens == plain.tokens
    assert spec.stats.committed_tokens == sum(map(len, spec.tokens)) - batch
    if scheduler == "fixed":
        assert spec.stats.acceptance_length > 2.0  # multi-token commits really happen
        assert spec.stats.verified_tokens == spec.stats.rounds * (GAMMA + 1)


@pytest.mark.parametrize("kind", ["ngram", "dflash", "eagle3"])
@pytest.mark.parametrize("batch", [4, 16])
def test_other_drafts_greedy_equal_plain(target, kind, batch):
    draft = create_draft(draft_config(kind), target)
    if kind != "ngram":
        draft = randomize_params(draft, seed=14)
    prompts = prompts_of(batch, seed=100 + batch)
    plain = generate(target, None, prompts, max_new_tokens=20, prefill_chunk=64)
    spec = generate(target, draft, prompts, max_new_tokens=20, prefill_chunk=64,
                    spec=SpecParams(block_size=GAMMA))
    assert spec.tokens == plain.tokens


def test_stats_are_consistent(target, dspark):
    res = generate(target, dspark, prompts_of(4, seed=7), max_new_tokens=30, spec=SpecParams(block_size=GAMMA))
    s = res.stats
    assert s.acceptance_length == pytest.approx(s.committed_tokens / s.rounds)
    survival = np.array(s.survival_per_position)
    assert np.all(np.diff(survival) <= 1e-12) and 0 < survival[0] <= 1
    # unconditional survival is the running product of the conditional rates
    np.testing.assert_allclose(survival, np.cumprod(s.accept_rate_per_position), rtol=1e-9)
    # mean committed per round = 1 + Σ_k P(≥ k accepted), except where EOS/budget cut a round short
    assert s.acceptance_length <= 1 + survival.sum() + 1e-9


def test_scheduling_cuts_verification(target, dspark):
    prompts = prompts_of(8, seed=21)
    fixed = generate(target, dspark, prompts, max_new_tokens=20, spec=SpecParams(block_size=GAMMA))
    steep = tuple(1.0 / (1.0 + 0.5 * b) for b in range(8 * (GAMMA + 1) + 1))
    causal = generate(target, dspark, prompts, max_new_tokens=20,
                      spec=SpecParams(block_size=GAMMA, scheduler="causal", sps=steep))
    assert causal.tokens == fixed.tokens
    assert causal.stats.verified_tokens / causal.stats.rounds < fixed.stats.verified_tokens / fixed.stats.rounds


def test_causal_rounds_launch_at_the_budget_the_sps_table_bounds(target, dspark):
    """Rates flat up to 12 verify tokens, then a quarter: Algorithm 1 never schedules more than 12
    tokens for 8 rows, so a causal round launches whole at the 16-token bucket, never 32 or 40,
    and stays lossless."""
    knee = tuple(1.0 if b <= 12 else 0.25 for b in range(8 * (GAMMA + 1) + 1))
    spec = SpecParams(block_size=GAMMA, scheduler="causal", sps=knee)
    core = Core(target, dspark, spec, slots=8, max_context=64, page_size=16, num_pages=32)
    assert core.budgets(8) == [16] and core.budgets(1) == [GAMMA + 1]
    assert core.budget_buckets(8) == [16, 32, 40]  # what the round would need without the bound
    prompts = prompts_of(8, seed=22)
    causal = generate(target, dspark, prompts, max_new_tokens=20, spec=spec)
    assert causal.tokens == generate(target, None, prompts, max_new_tokens=20).tokens
    assert causal.stats.verified_tokens > causal.stats.rounds  # draft tokens were verified


def test_plain_steps_between_rounds_keep_the_output_and_the_draft_context(target, dspark):
    """A speculative core's plain step commits the target's token and stashes the anchor's position
    for the draft, which ingests it before the next round (or when the stash is full): after plain
    steps mixed with rounds, and runs of plain steps longer than the stash, the tokens equal plain
    decoding and, after a last flush, the draft's context cache holds at every committed position the
    K/V a dense pass over the committed sequence gives (without the flushes those positions stay empty)."""
    prompt = prompts_of(1, seed=101)[0]
    new = 60
    core = Core(target, dspark, SpecParams(block_size=GAMMA, scheduler="causal", sps=SPS), slots=1, max_context=80,
                page_size=16, num_pages=6)
    table = np.arange(core.pages_per_row, dtype=np.int32)[None]
    admission = dict(seed=0, stream=0, temperature=0.0, top_k=0, top_p=1.0, max_new=new, stop_ids=(), rounds=0)
    piece = Piece(slot=0, tokens=prompt, start=0, page_row=table[0], next_token=0, admission=admission, completes=True)
    core.prefill(pack_chunk([piece], rows=1, lane=64, slots=1, scratch_row=core.scratch_row), 64)
    slots, kinds = np.zeros(1, np.int32), []
    while not bool(core.state.done[0]):
        plain = len(kinds) % 3 != 1 or len(kinds) > 10  # plain, round, plain, plain, round, ..., then plain only
        out = core.finish_round(core.begin_round(slots, table, False, plain=plain))
        kinds.append((plain, int(out.accepted[0])))
    assert any(p for p, _ in kinds) and any(a for p, a in kinds if not p)  # both kinds ran; drafts were accepted
    assert sum(p for p, _ in kinds[10:]) > STASH_POSITIONS  # the stash filled up at least once
    core.flush(slots, table)
    end = int(core.state.lens[0])  # the final anchor's position: every earlier one was ingested
    sequence = np.asarray(core.state.history[0, :end + 1])
    assert sequence[len(prompt):].tolist() == generate(target, None, [prompt], max_new_tokens=new).tokens[0]

    _, captured = forward(target, jnp.asarray(sequence[None, :end]), layers=dspark.capture_layers)
    context = dspark.context(jnp.concatenate([captured[i][0] for i in dspark.capture_layers], axis=-1))
    for layer, (k_pages, v_pages) in zip(dspark.layers, core.dstate.caches):
        k, v = layer.self_attn.project_kv(context, jnp.arange(end))
        flat = k_pages.shape[0] * k_pages.shape[1]
        np.testing.assert_allclose(np.asarray(k_pages).reshape(flat, *k.shape[1:])[:end], np.asarray(k), atol=1e-4)
        np.testing.assert_allclose(np.asarray(v_pages).reshape(flat, *v.shape[1:])[:end], np.asarray(v), atol=1e-4)


def test_threshold_rounds_split_only_where_the_budget_has_a_choice(target, dspark):
    """γ+1 = 5 tokens a row against a 16-token smallest bucket: 1–2 rows always launch 5–10 tokens, so
    their rounds run fused (no host read between draft and verify); from 4 rows on they split.
    test_dspark_greedy_equals_plain runs both paths (batch 1 and 4)."""
    core = Core(target, dspark, SpecParams(block_size=GAMMA, scheduler="threshold"), slots=8, max_context=64,
                page_size=16, num_pages=32)
    assert [core.splits(rows) for rows in (1, 2, 4, 8)] == [False, False, True, True]
    assert [core.budgets(rows) for rows in (1, 2, 4)] == [[5], [10], [16, 20]]


def test_greedy_outputs_do_not_depend_on_batch_neighbours(target, dspark):
    prompts = prompts_of(6, seed=31)
    together = generate(target, dspark, prompts, max_new_tokens=16, spec=SpecParams(block_size=GAMMA),
                        sampling=SamplingParams(temperature=0.0))
    alone = generate(target, dspark, prompts[2:3], max_new_tokens=16, spec=SpecParams(block_size=GAMMA))
    assert alone.tokens[0] == together.tokens[2]


def test_sampled_request_is_reproducible_across_batch_compositions(target, dspark):
    """T > 0: request i's draws depend on (seed, i, its own rounds) only."""
    prompts = prompts_of(4, seed=41)
    sampling = SamplingParams(temperature=1.0, top_k=20)
    a = generate(target, dspark, prompts, max_new_tokens=16, sampling=sampling, spec=SpecParams(block_size=GAMMA),
                 seed=5)
    b = generate(target, dspark, prompts[:2] + [prompts_of(1, seed=42)[0]], max_new_tokens=16, sampling=sampling,
                 spec=SpecParams(block_size=GAMMA), seed=5)
    assert a.tokens[:2] == b.tokens[:2]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["fixed", "causal"])
def test_sampled_first_tokens_follow_the_target(target, dspark, transition, scheduler):
    """Engine-level check at T=1: the first two sampled tokens after one prompt follow the target's law.

    (The toy-loop test in test_lossless.py is the high-powered one; this one runs the real round.)
    causal: rows reach their round 32 at a time (a 512-token prefill chunk of 16-token lanes); rates
    flat up to 48 verify tokens and a quarter past them bound each round at the 64-token bucket,
    where Algorithm 1 admits at most 16 drafts (fixed verifies 32 × γ).
    """
    from scipy import stats

    prompt = [5, 17, 3]
    rows, calls = 256, 12
    knee = tuple(1.0 if b <= 48 else 0.25 for b in range(rows * (GAMMA + 1) + 1))
    spec = SpecParams(block_size=GAMMA, scheduler=scheduler, sps=knee if scheduler == "causal" else None)
    counts = np.zeros((VOCAB, VOCAB), np.int64)
    for call in range(calls):
        res = generate(target, dspark, [prompt] * rows, max_new_tokens=2, sampling=SamplingParams(temperature=1.0),
                       spec=spec, seed=call)
        for t in res.tokens:
            counts[t[0], t[1]] += 1
        drafted = res.stats.verified_tokens - res.stats.rounds  # one round per row, 8 rounds of 32 rows
        assert 0 < drafted <= (8 * 16 if scheduler == "causal" else rows * GAMMA)
    first, _ = forward(target, jnp.asarray([prompt]))
    p1 = np.asarray(jax.nn.softmax(first[0, -1]), np.float64)
    p2 = np.asarray(jax.nn.softmax(jnp.asarray(transition)), np.float64)  # the target's next-token law
    law = p1[:, None] * p2
    expected = law.reshape(-1) * rows * calls
    big = expected >= 5
    obs = np.append(counts.reshape(-1)[big], counts.reshape(-1)[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_deepspec_checkpoint_round_trip(target, kind, tmp_path):
    draft = randomize_params(create_draft(draft_config(kind, markov_head="gated"), target), seed=51)
    if kind == "dspark":
        draft.sts_temperatures = (1.5, 1.0, 0.8, 2.0)
    save_deepspec_draft(draft, target, tmp_path / "draft")
    loaded = load_draft(str(tmp_path / "draft"), target)
    assert type(loaded) is type(draft)
    for field in ("kind", "block_size", "num_layers", "target_layer_ids"):
        assert getattr(loaded.config, field) == getattr(draft.config, field), field
    if kind != "eagle3":
        assert loaded.config.mask_token_id == draft.config.mask_token_id
    if kind == "dspark":
        assert (loaded.config.markov_rank, loaded.config.markov_head) == (VOCAB, "gated")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(draft, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    if kind == "dspark":
        assert loaded.sts_temperatures == draft.sts_temperatures
    prompts = prompts_of(3, seed=52)
    plain = generate(target, None, prompts, max_new_tokens=10)
    assert generate(target, loaded, prompts, max_new_tokens=10, spec=SpecParams(block_size=GAMMA)).tokens == plain.tokens


def test_deepspec_draft_for_another_target_is_rejected(target, tmp_path):
    draft = create_draft(draft_config("dspark"), target)
    save_deepspec_draft(draft, target, tmp_path / "draft")
    other = randomize_params(create_target(ARCH, dtype="float32"), seed=99)
    with pytest.raises(ValueError, match="embed_tokens differ from the target's embedding"):
        load_deepspec_draft(tmp_path / "draft", other)
    bigger = create_target(dataclasses.replace(ARCH, hidden_size=64, head_dim=16), dtype="float32")
    with pytest.raises(ValueError, match="hidden_size=48; the target has 64"):
        load_deepspec_draft(tmp_path / "draft", bigger)


def test_spec_params_errors(target, dspark):
    with pytest.raises(ValueError, match="block_size=8 exceeds the draft's trained block size 4"):
        generate(target, dspark, [[1, 2]], spec=SpecParams(block_size=8))
    dflash = create_draft(draft_config("dflash"), target)
    with pytest.raises(ValueError, match="needs a draft with a confidence head"):
        generate(target, dflash, [[1, 2]], spec=SpecParams(block_size=GAMMA, scheduler="causal", sps=SPS))
    with pytest.raises(ValueError, match="scheduler='best'"):
        SpecParams(scheduler="best")


def test_dspark_context_cache_matches_a_dense_computation(target, dspark):
    """The paged draft-context cache and block attention equal DeepSpec's dense formulation."""
    seq = np.random.default_rng(61).integers(0, VOCAB - 1, 23)
    anchor_pos = 17
    _, feats = forward(target, jnp.asarray([seq]), layers=dspark.capture_layers)
    features = jnp.concatenate([feats[i][0] for i in dspark.capture_layers], axis=-1)  # [S, 2H]

    # paged: ingest positions < anchor_pos in two uneven chunks, then run the block
    geometry = CacheGeometry(page_size=4, num_pages=8)
    table = jnp.arange(8, dtype=jnp.int32)[None]
    state = dspark.init_state(rows=1, num_pages=8, page_size=4, dtype=jnp.float32)
    for start, stop in ((0, 9), (9, anchor_pos)):
        layout = ragged_layout(table, [start], [stop - start], num_tokens=16, max_q_len=16, page_size=4,
                               num_slots=geometry.num_slots)
        padded = jnp.zeros((16, features.shape[1])).at[:stop - start].set(features[start:stop])
        state = dspark.ingest(target, state, padded, jnp.zeros((16,), jnp.int32), layout, jnp.arange(1))
    paged = dspark.backbone(target, state, jnp.asarray([seq[anchor_pos]]), jnp.asarray([anchor_pos]), table, GAMMA)

    # dense: per layer, keys/values = [context (positions < p) ; block], all visible to the block
    ctx = dspark.context(features[:anchor_pos])
    block = jnp.full((GAMMA,), dspark.config.mask_token_id).at[0].set(seq[anchor_pos])
    x = target.embed(block)[None]
    positions = anchor_pos + jnp.arange(GAMMA)

    class Dense:
        def __call__(self, layer, q, k, v, *, scale, sliding_window=None):
            kc, vc = dspark.layers[layer].self_attn.project_kv(ctx, jnp.arange(anchor_pos))
            keys = jnp.concatenate([kc[None], k], axis=1)
            values = jnp.concatenate([vc[None], v], axis=1)
            group = q.shape[2] // keys.shape[2]
            keys, values = jnp.repeat(keys, group, axis=2), jnp.repeat(values, group, axis=2)
            weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, keys) * scale, axis=-1)
            return jnp.einsum("bhqk,bkhd->bqhd", weights, values)

    for i, layer in enumerate(dspark.layers):
        x = layer(x, positions[None], Dense(), i)
    np.testing.assert_allclose(np.asarray(paged), np.asarray(dspark.norm(x)), rtol=2e-5, atol=2e-5)


def test_ngram_proposals_and_one_hot_probs(target):
    draft = create_draft(DraftConfig(kind="ngram", ngram_min=2, ngram_max=3), target)
    history = jnp.asarray([[7, 8, 9, 10, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0]], jnp.int32)
    inputs = ProposeInputs(anchors=jnp.asarray([8, 6]), lens=jnp.asarray([5, 5]), page_table=jnp.zeros((2, 1), jnp.int32),
                           history=history, sampling=SamplingArrays.of([SamplingParams()] * 2),
                           keys=jax.random.split(jax.random.key(0), 2 * GAMMA).reshape(2, GAMMA), gamma=GAMMA,
                           geometry=CacheGeometry(page_size=4, num_pages=1))
    proposal, _ = draft.propose(target, (), inputs)
    assert proposal.tokens[0, :2].tolist() == [9, 10] and int(proposal.valid[0]) == 4
    assert int(proposal.valid[1]) == 0
    np.testing.assert_array_equal(np.asarray(proposal.probs[0, 0]), np.eye(VOCAB)[9])


def test_sps_profile_is_a_bucketed_step_curve_and_is_cached(target, dspark, tmp_path, monkeypatch):
    from dspark_jax.speculative import profile

    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    table = profile.profile_sps(target, dspark, rows=4, gamma=GAMMA, repeats=2)
    assert len(table) == 4 * (GAMMA + 1) + 1 and all(s > 0 for s in table[1:])
    assert table[4] == table[16] and table[17] == table[20]  # buckets 16 and 32 each cost one price
    monkeypatch.setattr(profile, "measure_round_seconds", lambda *a, **k: pytest.fail("profiled twice"))
    assert profile.profile_sps(target, dspark, rows=4, gamma=GAMMA, repeats=2) == table
    # generate() uses the cached table when the scheduler needs one and none is given
    prompts = prompts_of(4, seed=71)
    res = generate(target, dspark, prompts, max_new_tokens=8, spec=SpecParams(block_size=GAMMA, scheduler="causal"))
    assert res.tokens == generate(target, None, prompts, max_new_tokens=8).tokens


@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_markov_head_variants_draft_losslessly(target, head):
    draft = randomize_params(create_draft(draft_config("dspark", markov_head=head), target), seed=81)
    prompts = prompts_of(4, seed=82)
    res = generate(target, draft, prompts, max_new_tokens=12, spec=SpecParams(block_size=GAMMA, scheduler="causal",
                                                                                sps=SPS))
    assert res.tokens == generate(target, None, prompts, max_new_tokens=12).tokens


def test_speculative_generation_does_not_recompile_in_steady_state(target, dspark, compile_counter):
    spec = SpecParams(block_size=GAMMA, scheduler="causal", sps=SPS)
    generate(target, dspark, prompts_of(4, seed=91), max_new_tokens=16, spec=spec)
    compile_counter.count = 0
    generate(target, dspark, prompts_of(4, seed=91), max_new_tokens=16, spec=spec, seed=3)
    assert compile_counter.count == 0


def test_a_batch_mixes_greedy_and_sampled_requests(target, dspark):
    prompts = prompts_of(3, seed=95)
    mixed = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9), SamplingParams()]
    res = generate(target, dspark, prompts, max_new_tokens=12, sampling=mixed, spec=SpecParams(block_size=GAMMA))
    greedy = generate(target, None, prompts, max_new_tokens=12)
    assert res.tokens[0] == greedy.tokens[0] and res.tokens[2] == greedy.tokens[2]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        generate(target, None, prompts, sampling=mixed[:2])


def test_decoding_states_over_one_model_share_its_static_graphs(target, dspark):
    """Each generate call builds a Core; jit finds the programs the first Core compiled by the
    graphs' identity only if the second Core holds the same StaticGraph objects (equality of
    large GraphDefs costs milliseconds per call). Another model of the same structure shares them
    too; one of another structure does not."""
    spec = SpecParams(block_size=GAMMA)
    first = Core(target, dspark, spec, slots=2, max_context=64, page_size=16, num_pages=16)
    second = Core(target, dspark, spec, slots=4, max_context=128, page_size=16, num_pages=40)
    assert all(a is b for a, b in zip(first.graphdefs, second.graphdefs))
    twin = create_target(ARCH, dtype="float32")
    assert Core(twin, None, None, slots=1, max_context=64, page_size=16, num_pages=8).graphdefs[0] is first.graphdefs[0]
    deeper = create_target(dataclasses.replace(ARCH, num_layers=2), dtype="float32")
    other = Core(deeper, None, None, slots=1, max_context=64, page_size=16, num_pages=8).graphdefs[0]
    assert other is not first.graphdefs[0] and other != first.graphdefs[0]
