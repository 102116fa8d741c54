"""The serving engine: continuous batching gives every request exactly what it gets alone.

Tiny fp32 models. The main target has its attention outputs zeroed, so its next token is a
function of the current one (a table we can read), and the DSpark draft's Markov head knows that
table for most tokens: drafts are often accepted and every path of a round runs. Requests
outnumber the engine's slots, so they are admitted, prefilled in chunks between rounds, and
retired while others run; after every test the KV page pool is whole again.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.engine import Engine, EngineClosed, EngineConfig, EngineFull, RequestParams, generate
from dspark_jax.engine.gate import PROBE_EVERY
from dspark_jax.engine.scheduler import Request, Scheduler
from dspark_jax.models import create_target, forward
from dspark_jax.speculative.decode import Core
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams

VOCAB = 61
ARCH = LlamaArch(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=12, qk_norm=True, tie_word_embeddings=False, model_type="qwen3", eos_token_ids=(),
                 max_position_embeddings=512)
GAMMA = 4
SPS = tuple(1.0 / (1.0 + 0.05 * b) for b in range(2 * (GAMMA + 1) + 1))
CONFIG = EngineConfig(max_batch=2, max_context=64, prefill_chunk=32, warmup=False, compilation_cache=False)
# (prompt length, max_tokens): more requests than slots, prompts longer than a prefill chunk
SHAPES = [(5, 12), (37, 9), (3, 20), (18, 6), (40, 15), (9, 1), (26, 17)]


def requests_of(seed: int, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB - 1, n).tolist(), m) for n, m in shapes]


REQUESTS = requests_of(0)


@pytest.fixture(scope="module")
def target():
    model = randomize_params(create_target(ARCH, dtype="float32"), seed=21)
    for layer in model.layers:  # attention adds nothing: the next token is a function of the current one
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
    return model


@pytest.fixture(scope="module")
def dspark(target):
    """A DSpark draft whose Markov bias knows the target's transitions for two thirds of the tokens."""
    config = DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0, 1), mask_token_id=VOCAB - 1,
                         markov_rank=VOCAB, block_size=GAMMA)
    draft = randomize_params(create_draft(config, target), seed=22)
    transition = np.asarray(forward(target, jnp.arange(VOCAB)[:, None])[0][:, 0])
    rng = np.random.default_rng(6)
    wrong = rng.random(VOCAB) < 1 / 3
    table = transition[np.where(wrong, rng.permutation(VOCAB), np.arange(VOCAB))]
    draft.markov_head.markov_w1.embedding[...] = jnp.eye(VOCAB, dtype=jnp.float32)
    draft.markov_head.markov_w2.kernel[...] = jnp.asarray(40.0 * table, jnp.float32)
    return draft


def started(engine: Engine) -> Engine:
    engine.start()
    return engine


def collect(handle):
    """(tokens, text, final output) of a request submitted without a loop."""
    outs = list(handle)
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1]


def run_all(engine: Engine, items):
    """Submit every (prompt, params) at once, then read each request's outputs."""
    handles = [engine.submit(prompt, params) for prompt, params in items]
    return [collect(h) for h in handles]


def assert_pool_whole(engine: Engine):
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["pages_used"]) == (0, 0, 0), stats
    assert engine.scheduler.allocator.free_pages == engine.core.num_pages


@pytest.fixture(scope="module")
def alone(target):
    """Greedy tokens of each request of REQUESTS run on its own through a plain engine."""
    engine = started(Engine(target, None, config=CONFIG))
    tokens = [collect(engine.submit(p, RequestParams(max_tokens=m)))[0] for p, m in REQUESTS]
    assert_pool_whole(engine)
    engine.shutdown(1.0)
    return tokens


@pytest.mark.parametrize("scheduler", ["none", "fixed", pytest.param("threshold", marks=pytest.mark.slow), "causal",
                                       pytest.param("async", marks=pytest.mark.slow)])
def test_concurrent_greedy_requests_equal_each_alone(target, dspark, alone, scheduler):
    draft = None if scheduler == "none" else dspark
    spec = SpecParams(block_size=GAMMA, scheduler=scheduler, threshold=0.3, sps=SPS) if draft else None
    engine = started(Engine(target, draft, spec=spec, config=CONFIG))
    results = run_all(engine, [(p, RequestParams(max_tokens=m)) for p, m in REQUESTS])
    for (tokens, _, final), expected, (prompt, m) in zip(results, alone, REQUESTS):
        assert tokens == expected
        assert len(tokens) == m and final.finish_reason == "length" and final.completion_tokens == m
        assert final.prompt_tokens == len(prompt)
    if scheduler == "fixed":  # multi-token commits really happened
        rounds = sum(f.stats.rounds for _, _, f in results)
        assert sum(f.stats.committed_tokens for _, _, f in results) > 1.5 * rounds
    assert_pool_whole(engine)
    assert engine.scheduler.preemptions == 0
    engine.shutdown(1.0)


def test_sampled_requests_ignore_the_batch_and_generate_is_one_of_them(target, dspark):
    """T > 0 with a seed: a request's tokens depend on its seed only, and generate(seed=s) is such a request."""
    spec = SpecParams(block_size=GAMMA)
    params = RequestParams(max_tokens=14, temperature=1.0, top_k=20, seed=7)
    prompt = REQUESTS[1][0]
    others = [(p, RequestParams(max_tokens=m, temperature=0.8, top_p=0.9, seed=i)) for i, (p, m) in
              enumerate(requests_of(1)[:3])]
    for draft in (dspark, None):
        engine = started(Engine(target, draft, spec=spec if draft else None, config=CONFIG))
        lone = collect(engine.submit(prompt, params))[0]
        crowded = run_all(engine, [others[0], (prompt, params)] + others[1:])
        assert crowded[1][0] == lone
        reseeded = collect(engine.submit(prompt, RequestParams(**{**params.__dict__, "seed": 8})))[0]
        assert reseeded != lone  # the seed matters: a stream per seed, not a constant
        assert_pool_whole(engine)
        engine.shutdown(1.0)
    # the last engine decoded plainly: generate's prompt 0 with seed 7 is that request
    res = generate(target, None, [prompt], max_new_tokens=14, sampling=SamplingParams(temperature=1.0, top_k=20),
                   seed=7, prefill_chunk=32)
    assert res.tokens[0] == lone


@pytest.mark.parametrize("kind", ["dspark", pytest.param("eagle3", marks=pytest.mark.slow)])
def test_preemption_under_a_tiny_page_budget_keeps_outputs(target, dspark, alone, kind):
    """5 pages of 16 positions for two slots: running requests outgrow the pool, the youngest is
    preempted and recomputed later; every output is still exactly its solo greedy output."""
    if kind == "dspark":
        draft = dspark
    else:
        config = DraftConfig(kind="eagle3", num_layers=1, target_layer_ids=(0, 1), block_size=GAMMA)
        draft = randomize_params(create_draft(config, target), seed=24)
    engine = started(Engine(target, draft, spec=SpecParams(block_size=GAMMA),
                            config=EngineConfig(**{**CONFIG.__dict__, "num_pages": 5})))
    results = run_all(engine, [(p, RequestParams(max_tokens=m)) for p, m in REQUESTS])
    assert [r[0] for r in results] == alone
    assert engine.stats()["preemptions"] > 0
    assert_pool_whole(engine)
    engine.shutdown(1.0)


def test_cancel_frees_the_pages_at_the_next_step(target, alone):
    engine = started(Engine(target, None, config=CONFIG))
    prompt = REQUESTS[0][0]
    handle = engine.submit(prompt, RequestParams(max_tokens=50))
    outputs = iter(handle)
    first = next(outputs)
    assert not first.finished and first.token_ids
    handle.cancel()
    rest = list(outputs)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert len(first.token_ids) + sum(len(o.token_ids) for o in rest) < 50
    assert_pool_whole(engine)
    assert collect(engine.submit(prompt, RequestParams(max_tokens=REQUESTS[0][1])))[0] == alone[0]
    engine.shutdown(1.0)


def test_admission_is_bounded_and_shutdown_is_idempotent(target, alone):
    engine = Engine(target, None, config=EngineConfig(**{**CONFIG.__dict__, "max_waiting": 2}))
    handles = [engine.submit(p, RequestParams(max_tokens=m)) for p, m in REQUESTS[:2]]
    with pytest.raises(EngineFull, match="2 requests are waiting"):
        engine.submit(REQUESTS[2][0], RequestParams(max_tokens=4))
    engine.start()
    assert [collect(h)[0] for h in handles] == alone[:2]
    long = engine.submit(REQUESTS[4][0], RequestParams(max_tokens=20))
    engine.shutdown(drain_timeout=0.0)  # the running request is aborted at once
    tokens, _, final = collect(long)
    assert final.finish_reason == "abort" and len(tokens) < 20
    engine.shutdown(drain_timeout=0.0)
    with pytest.raises(EngineClosed):
        engine.submit(REQUESTS[0][0], RequestParams(max_tokens=4))
    assert_pool_whole(engine)


def test_bad_requests_are_refused_with_the_field_named(target):
    engine = Engine(target, None, config=CONFIG)
    with pytest.raises(ValueError, match="with max_tokens=30 it exceeds max_context=64"):
        engine.submit([1] * 40, RequestParams(max_tokens=30))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 61\)"):
        engine.submit([1, 61], RequestParams(max_tokens=4))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.submit([1, 2], RequestParams(max_tokens=4, stop=("x",)))
    with pytest.raises(ValueError, match="RequestParams.top_p=1.5"):
        RequestParams(top_p=1.5)
    with pytest.raises(ValueError, match="RequestParams.seed=-1"):
        RequestParams(seed=-1)
    engine.shutdown(0.0)


def test_async_iteration_through_an_event_loop(target, alone):
    engine = started(Engine(target, None, config=CONFIG))

    async def main():
        loop = asyncio.get_running_loop()
        handles = [engine.submit(p, RequestParams(max_tokens=m), loop=loop) for p, m in REQUESTS[:3]]

        async def tokens(h):
            return [t async for out in h for t in out.token_ids]
        return await asyncio.gather(*(tokens(h) for h in handles))

    assert asyncio.run(main()) == alone[:3]
    engine.shutdown(1.0)


def test_one_live_request_runs_a_one_row_round(target, dspark):
    engine = Engine(target, dspark, spec=SpecParams(block_size=GAMMA), config=CONFIG)
    rows = []
    begin = engine.core.begin_round

    def spy(slots, *args, **kwargs):
        rows.append(len(slots))
        return begin(slots, *args, **kwargs)

    engine.core.begin_round = spy
    started(engine)
    collect(engine.submit(REQUESTS[0][0], RequestParams(max_tokens=10)))
    assert rows and set(rows) == {1}
    run_all(engine, [(p, RequestParams(max_tokens=m)) for p, m in REQUESTS[:3]])
    assert 2 in rows
    engine.shutdown(1.0)


def test_a_warm_engine_does_not_compile_on_new_traffic(target, dspark, compile_counter):
    """Warm-up compiles every bucket; then new prompts, lengths and sampling settings compile nothing."""
    config = EngineConfig(**{**CONFIG.__dict__, "warmup": True})
    engine = started(Engine(target, dspark, spec=SpecParams(block_size=GAMMA), config=config))
    collect(engine.submit([1, 2, 3], RequestParams(max_tokens=2)))  # returns once warm-up is over
    assert engine.ready
    compile_counter.count = 0
    traffic = [(p, RequestParams(max_tokens=m, temperature=0.7 * (i % 2), top_k=5 * (i % 3), seed=i))
               for i, (p, m) in enumerate(requests_of(5))]
    run_all(engine, traffic)
    run_all(engine, traffic[2:5])
    assert compile_counter.count == 0
    assert engine.stats()["compiles_after_warmup"] == 0
    metrics = engine.registry.get_sample_value
    assert metrics("dspark_compilations_after_warmup_total") == 0
    assert metrics("dspark_requests_total", {"finish_reason": "length"}) == 1 + len(traffic) + 3
    assert metrics("dspark_generation_tokens_total") == 2 + sum(m for _, m in SHAPES) + sum(m for _, m in SHAPES[2:5])
    reached = metrics("dspark_position_reached_total", {"position": "1"})
    assert reached > 0 and metrics("dspark_position_accepted_total", {"position": "1"}) <= reached
    rates = engine.metrics.position_acceptance()  # what `serve --prompt` prints
    assert 1 <= len(rates) <= GAMMA and rates[0] == metrics("dspark_position_accepted_total", {"position": "1"}) / reached
    assert_pool_whole(engine)
    engine.shutdown(1.0)


def test_a_causal_engine_profiles_its_rounds_at_warmup(target, dspark, alone, tmp_path, monkeypatch):
    """Without an SPS table the engine times its own rounds once (cached on disk), serves losslessly,
    and its warm-up covered every round budget the scheduler then picks. Profiling and serving
    launch the same fused rounds: no draft or verify program of a split round is ever compiled."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    config = EngineConfig(**{**CONFIG.__dict__, "warmup": True})
    engine = started(Engine(target, dspark, spec=SpecParams(block_size=GAMMA, scheduler="causal"), config=config))
    results = run_all(engine, [(p, RequestParams(max_tokens=m)) for p, m in REQUESTS])
    assert [r[0] for r in results] == alone
    assert len(list((tmp_path / "sps").glob("*.json"))) == 1
    assert engine.stats()["compiles_after_warmup"] == 0
    assert not [shape for shape in engine.core.compiles.shapes if shape.startswith(("draft", "verify"))]
    plain_steps = {"decode rows=1 filters=False", "decode rows=2 filters=True", "flush rows=1", "flush rows=2"}
    assert plain_steps <= set(engine.core.compiles.shapes)
    assert_pool_whole(engine)
    engine.shutdown(1.0)


def test_a_causal_engine_runs_plain_steps_where_rounds_pay_less(target, dspark, alone):
    """Step times saying a round costs ten plain steps (fed as a follower's gate is fed, so the
    choices do not depend on this machine's clock): a round commits at most γ+1 = 5 tokens a row,
    so after each row bucket's first round the engine runs plain steps, with a round every
    PROBE_EVERY of them. The probes still accept drafts (the draft ingests what plain steps stashed
    before each probe) and every output stays plain decoding's; /metrics shows the gate's means."""
    engine = Engine(target, dspark, spec=SpecParams(block_size=GAMMA, scheduler="causal", sps=SPS), config=CONFIG)
    engine.scheduler.clock = None
    for rows in engine.core.row_buckets():
        engine.scheduler.gate.observe_seconds(rows, True, 0.001)
        engine.scheduler.gate.observe_seconds(rows, False, 0.010)
    started(engine)
    long = [(REQUESTS[i][0], RequestParams(max_tokens=56)) for i in (0, 2)]  # short prompts, long outputs
    results = run_all(engine, [(p, RequestParams(max_tokens=m)) for p, m in REQUESTS] + long)
    assert [r[0] for r in results[:len(REQUESTS)]] == alone
    solo = started(Engine(target, None, config=CONFIG))
    assert [r[0] for r in results[len(REQUESTS):]] == [r[0] for r in run_all(solo, long)]
    solo.shutdown(1.0)
    metrics = engine.registry.get_sample_value
    plain, rounds = metrics("dspark_plain_steps_total"), metrics("dspark_verify_length_count")
    assert plain > 2 * PROBE_EVERY and 0 < rounds < plain / 2, (plain, rounds)  # mostly plain, still probing
    assert metrics("dspark_position_accepted_total", {"position": "1"}) > 0
    assert metrics("dspark_step_seconds", {"rows": "1", "kind": "plain"}) == 0.001  # nothing timed but what was fed
    assert metrics("dspark_step_seconds", {"rows": "2", "kind": "round"}) == 0.010
    assert 1.0 <= metrics("dspark_round_tokens", {"rows": "1"}) <= GAMMA + 1
    stats = [r[2].stats for r in results]
    assert sum(s.plain_steps for s in stats) == plain
    for s in stats:  # the acceptance length counts speculative rounds only
        rounds = s.rounds - s.plain_steps
        assert s.acceptance_length is None if not rounds else (
            s.acceptance_length == (s.committed_tokens - s.plain_steps) / rounds)
    assert max(s.acceptance_length or 0 for s in stats) > 1.5  # rounds that accepted drafts, not diluted
    assert_pool_whole(engine)
    engine.shutdown(1.0)


def test_the_scheduler_times_a_step_only_when_the_next_launch_is_of_its_kind(target, dspark):
    """A step's measured time ends with its read, which comes after the next launch: timing a plain
    step followed by a round (or by a prefill) would charge it the round's launch. The gate must
    see only steps whose following launch is of their kind; its two-step probes give both kinds."""
    core = Core(target, dspark, SpecParams(block_size=GAMMA, scheduler="causal", sps=SPS), slots=2, max_context=64,
                page_size=16, num_pages=8)
    core.compile_all(32)  # a compile between a launch and its read spoils the timing anyway
    ticks = itertools.count()
    scheduler = Scheduler(core, prefill_chunk=32, plain_steps=True, clock=lambda: float(next(ticks)))
    gate, launched, observed = scheduler.gate, {}, []
    choose, observe, prefill = gate.choose, gate.observe_seconds, core.prefill

    def choosing(rows):
        launched["kind"] = choose(rows)
        return launched["kind"]

    def prefilling(chunk, lane):
        launched["kind"] = "prefill"
        return prefill(chunk, lane)

    def observing(rows, plain, seconds):
        observed.append((plain, launched.get("kind", plain)))
        observe(rows, plain, seconds)
    gate.choose, gate.observe_seconds, core.prefill = choosing, observing, prefilling
    for i, (prompt, new) in enumerate([(REQUESTS[0][0], 60), (REQUESTS[2][0], 45)]):
        scheduler.add(Request(id=str(i), prompt=list(prompt), params=RequestParams(max_tokens=new), seed=0, stream=i,
                              stop_ids=()))
    while scheduler.has_work():
        launched.clear()
        scheduler.step()
    assert {plain for plain, _ in observed} == {True, False}, observed
    assert all(plain == following for plain, following in observed), observed


def test_a_request_that_exactly_fills_the_pool_still_runs(target, dspark):
    """28 prompt tokens + γ=4 verify positions fill two 16-position pages: a pool of two admits it."""
    engine = started(Engine(target, dspark, spec=SpecParams(block_size=GAMMA),
                            config=EngineConfig(**{**CONFIG.__dict__, "num_pages": 2})))
    outputs = []
    reader = threading.Thread(target=lambda: outputs.extend(engine.submit(list(range(28)), RequestParams(max_tokens=1))))
    reader.start()
    reader.join(120)
    assert outputs and outputs[-1].finish_reason == "length" and len(outputs[-1].token_ids) == 1
    assert_pool_whole(engine)
    engine.shutdown(1.0)
