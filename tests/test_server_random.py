"""The HTTP server for a random-weight config: no tokenizer, so token ids in and token ids out."""

from __future__ import annotations

import httpx
import openai
import pytest

import dspark_jax as dj
from dspark_jax.server.process import ServerProcess

pytestmark = pytest.mark.slow

CONFIG = """
from dspark_jax.config import Config, LlamaArch, ServeConfig, TargetConfig
config = Config(
    target=TargetConfig(arch=LlamaArch(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=(2,)),
                        dtype="float32", seed=3),
    serve=ServeConfig(max_new_tokens=8, max_batch=2, max_context=128, page_size=16, prefill_chunk=32,
                      kernels="xla"),
)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server_random")
    config = workdir / "tiny_random.py"
    config.write_text(CONFIG)
    server = ServerProcess(config, workdir / "server.log", env={"JAX_PLATFORMS": "cpu"})
    yield server.wait_healthy()
    server.stop()


def test_token_ids_in_token_ids_out_equal_generate(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny_random"]
    prompt = [5, 17, 99, 3, 42]
    res = client.completions.create(model="tiny_random", prompt=prompt, max_tokens=10, temperature=0.0)
    got = res.choices[0].model_extra["token_ids"]
    assert res.choices[0].text == "" and res.usage.completion_tokens == len(got)

    target = dj.load_target(dj.load_config(server.config))
    expected = dj.generate(target, None, [prompt], max_new_tokens=10, kernels="xla").tokens[0]
    eos = set(target.arch.eos_token_ids)
    assert [t for t in got if t not in eos] == [t for t in expected if t not in eos]

    streamed = client.completions.create(model="tiny_random", prompt=prompt, max_tokens=10, temperature=0.0,
                                         stream=True)
    assert [t for c in streamed for t in c.choices[0].model_extra["token_ids"]] == got


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "text needs a tokenizer"}, "prompt"),
    ("/v1/completions", {"prompt": [5, 6], "stop": ["x"]}, "stop"),
    ("/v1/completions", {"prompt": [5, 128]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
])
def test_text_is_refused_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
