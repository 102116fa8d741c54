"""serve/replay_draft.py: a draft whose greedy acceptance follows a profile, for end-to-end benchmarks
of random-weight targets (bench_e2e --replay)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import randomize_params
from dspark_jax.config import DraftConfig, LlamaArch
from dspark_jax.drafts import create_draft
from dspark_jax.engine import generate
from dspark_jax.models import create_target
from dspark_jax.speculative.schedule import SpecParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from replay_draft import ReplayDraft, expected_tau, make_predictable  # noqa: E402

VOCAB = 97
ARCH = LlamaArch(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=8, eos_token_ids=(), max_position_embeddings=256)
GAMMA = 4
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def setup():
    target = randomize_params(create_target(ARCH, dtype="float32"), seed=3)
    table = make_predictable(target, chunk=32)  # several chunks, the last one padded
    draft = randomize_params(create_draft(DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0, 1),
                                                      mask_token_id=VOCAB - 1, markov_rank=8, block_size=GAMMA),
                                          target), seed=4)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(4, 24, 8)]
    plain = generate(target, None, prompts, max_new_tokens=NEW_TOKENS).tokens
    return target, table, draft, prompts, plain


def test_the_table_is_the_predictable_targets_greedy_continuation(setup):
    _, table, _, prompts, plain = setup
    for prompt, tokens in zip(prompts, plain):
        sequence = prompt[-1:] + tokens
        assert all(table[a] == b for a, b in zip(sequence, sequence[1:]))


@pytest.mark.parametrize("rate", [0.3, 0.8])
def test_a_replay_draft_is_accepted_as_its_profile_says(setup, rate):
    """Greedy, every draft position verified (fixed γ): the output is plain decoding's, the first
    position's acceptance rate is the profile's (~8 prompts × 64 tokens: ≥ 100 rounds, 4 standard
    errors of slack) and τ is 1 + Σ_k rate^k up to the same slack and the last rounds' budget cut."""
    target, table, draft, prompts, plain = setup
    result = generate(target, ReplayDraft(draft, table, (rate,)), prompts, max_new_tokens=NEW_TOKENS,
                      spec=SpecParams(block_size=GAMMA))
    assert result.tokens == plain
    stats = result.stats
    assert stats.rounds >= 100
    assert abs(stats.accept_rate_per_position[0] - rate) < 4 * np.sqrt(rate * (1 - rate) / stats.rounds) + 0.01
    assert abs(stats.acceptance_length - expected_tau((rate,), GAMMA)) < 0.35, stats.acceptance_length


def test_a_replay_draft_refuses_rates_outside_the_open_interval(setup):
    _, table, draft, _, _ = setup
    with pytest.raises(ValueError, match="accept_rates"):
        ReplayDraft(draft, table, (1.0,))


REPLAY_CONFIG = """
from dspark_jax.config import Config, DraftConfig, LlamaArch, ServeConfig, SpecConfig, TargetConfig
config = Config(
    target=TargetConfig(arch=LlamaArch(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                       num_kv_heads=2, head_dim=8, eos_token_ids=(), max_position_embeddings=256),
                        dtype="float32", seed=3),
    draft=DraftConfig(kind="dspark", block_size=4, num_layers=1, target_layer_ids=(0, 1), mask_token_id=96,
                      markov_rank=8),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=32, max_batch=2, max_context=128, page_size=16, prefill_chunk=32,
                      kernels="xla", warmup=False),
)
"""


@pytest.mark.slow
def test_the_replay_server_serves_plain_decodings_tokens_at_the_profiles_acceptance(tmp_path):
    """serve/replay_server.py (bench_serve --replay): greedy completions over HTTP equal plain decoding
    of the predictable target, and the server's mean accepted length is the profile's (τ = 3.36 at
    rate 0.8, γ = 4; a random draft's would be ~1), over ≥ 16 rounds."""
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    import dspark_jax as dj
    from dspark_jax.server.process import ServerProcess

    config = tmp_path / "replay_tiny.py"
    config.write_text(REPLAY_CONFIG)
    script = Path(__file__).resolve().parents[1] / "serve" / "replay_server.py"
    server = ServerProcess(config, tmp_path / "server.log", env={"JAX_PLATFORMS": "cpu"},
                           program=(str(script), "--replay=0.8")).wait_healthy()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        prompts = [[5, 17, 60, 3, 42], [9, 9, 81, 30, 2, 77, 14]]
        got = [client.completions.create(model="replay_tiny", prompt=p, max_tokens=32, temperature=0.0)
               .choices[0].model_extra["token_ids"] for p in prompts]
        metrics = {s.name: s.value for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
                   for s in family.samples}
    finally:
        server.stop()
    target = dj.load_target(dj.load_config(config))
    make_predictable(target)
    assert got == generate(target, None, prompts, max_new_tokens=32, kernels="xla").tokens
    rounds = metrics["dspark_accepted_length_count"]
    assert rounds >= 16
    assert abs(metrics["dspark_accepted_length_sum"] / rounds - expected_tau((0.8,), 4)) < 0.9
