"""The HTTP server as users run it: `python -m dspark_jax.serve` in its own process on 127.0.0.1,
driven by the openai client and raw httpx.

One server per module (a tiny GGUF target with a tokenizer and chat template, plus a random
one-layer DSpark draft; conftest keeps the module on one xdist worker). The last test stops it
with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import dspark_jax as dj
from dspark_jax.server.process import ServerProcess
from synthetic_gguf import tiny_gguf

KEY = "test-key"
# two slots keep the warm-up's program count (and CI time) small; 64 may wait, so 64 clients all get in
MAX_BATCH, MAX_WAITING, MAX_CONTEXT = 2, 64, 256
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    path, _ = tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", chat_template=CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, gguf):
    workdir = tmp_path_factory.mktemp("server")
    config = workdir / "tiny_serve.py"
    config.write_text(f"""
from dspark_jax.config import Config, DraftConfig, ServeConfig, SpecConfig, TargetConfig
config = Config(
    target=TargetConfig(source={str(gguf)!r}, dtype="float32"),
    draft=DraftConfig(kind="dspark", num_layers=1, target_layer_ids=(0,), mask_token_id=0, markov_rank=16,
                      block_size=4),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=16, max_batch={MAX_BATCH}, max_waiting={MAX_WAITING},
                      max_context={MAX_CONTEXT}, page_size=16, prefill_chunk=32, kernels="xla"),
)
""")
    server = ServerProcess(config, workdir / "server.log", "--api-key", KEY, "--drain-timeout", "20",
                           env={"JAX_PLATFORMS": "cpu"})
    yield server.wait_healthy()
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    if server.proc.poll() is not None:
        pytest.fail(f"the server has exited ({server.proc.returncode}):\n{server.log_tail()}")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server: ServerProcess, path: str, body, *, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=120)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=120)


def health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server: ServerProcess, timeout: float = 60) -> dict:
    """/health once nothing runs or waits and every KV page is back in the pool."""
    deadline = time.monotonic() + timeout
    while True:
        state = health(server)
        if state["running"] == 0 and state["waiting"] == 0 and state["pages_used"] == 0:
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout}s: {state}")
        time.sleep(0.2)


def metric_samples(server: ServerProcess) -> dict[tuple, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def http_count(samples: dict, route: str, status: int, method: str = "POST") -> float:
    key = ("dspark_http_requests_total", (("method", method), ("route", route), ("status", str(status))))
    return samples.get(key, 0.0)


# --------------------------------------------------------------------------------------------


def test_greedy_completion_equals_generate(client, server, gguf):
    """The served greedy completion (speculative, batched engine) is the target's own greedy decode."""
    tokenizer = dj.load_tokenizer(gguf)
    ids = tokenizer.encode("def add(a, b):\n    return")
    target = dj.load_target(str(gguf), dtype="float32")
    expected = dj.generate(target, None, [ids], max_new_tokens=12, sampling=dj.SamplingParams(temperature=0.0),
                           kernels="xla").tokens[0]

    res = client.completions.create(model="tiny.gguf", prompt=ids, max_tokens=12, temperature=0.0,
                                    extra_body={"return_token_ids": True})
    choice = res.choices[0]
    got = choice.model_extra["token_ids"]
    eos = set(target.arch.eos_token_ids)
    assert [t for t in got if t not in eos] == [t for t in expected if t not in eos]
    assert choice.finish_reason == ("stop" if expected[-1] in eos else "length")
    # the text is the tokens' decoding, less a last character whose UTF-8 bytes never completed
    decoded = tokenizer.decode(got)
    assert decoded.startswith(choice.text) and set(decoded[len(choice.text):]) <= {"\ufffd"}
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), len(got))
    assert res.usage.total_tokens == len(ids) + len(got)

    # a text prompt is tokenized as the tokenizer does it
    text = client.completions.create(model="tiny.gguf", prompt="def add(a, b):\n    return", max_tokens=12,
                                     temperature=0.0)
    assert text.choices[0].text == choice.text and text.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(client, server):
    kwargs = dict(model="tiny.gguf", prompt="The quick brown fox", max_tokens=10, temperature=0.0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    # the wire format: data events in OpenAI's chunk shape, closed by data: [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", json={**kwargs, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_completion_uses_the_chat_template(client, gguf):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 12 and 345."}]
    ids = dj.load_tokenizer(gguf).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat = client.chat.completions.create(model="tiny.gguf", messages=messages, max_completion_tokens=8,
                                          temperature=0.0, extra_body={"return_token_ids": True})
    plain = client.completions.create(model="tiny.gguf", prompt=ids, max_tokens=8, temperature=0.0,
                                      extra_body={"return_token_ids": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].model_extra["token_ids"] == plain.choices[0].model_extra["token_ids"]
    assert chat.usage.prompt_tokens == len(ids)

    stream = list(client.chat.completions.create(model="tiny.gguf", messages=messages, max_tokens=8,
                                                 temperature=0.0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_strings_and_max_tokens(client):
    kwargs = dict(model="tiny.gguf", prompt="In 2024 there were", temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs, max_tokens=16)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    text = full.choices[0].text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip())
    cut = client.completions.create(**kwargs, max_tokens=16, stop=[stop, "never-generated"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kwargs, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]
    short = client.completions.create(**kwargs, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10 ** 6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["one", "two"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * MAX_CONTEXT}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 100, "max_tokens": MAX_CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, client, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_body_and_unknown_route_and_the_server_keeps_serving(server, client):
    r = post(server, "/v1/completions", b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    ok = client.completions.create(model="tiny.gguf", prompt="hi", max_tokens=2, user="someone",
                                   extra_body={"metadata": {"x": 1}})  # harmless fields are ignored
    assert ok.usage.completion_tokens >= 1


def test_api_key(server):
    for path in ("/v1/models", "/metrics"):
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(server.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(server, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["tiny.gguf"]


def test_metrics_count_requests(server, client):
    before = metric_samples(server)
    res = client.completions.create(model="tiny.gguf", prompt="for i in range(100):", max_tokens=6,
                                    extra_body={"ignore_eos": True})
    post(server, "/v1/completions", {"prompt": "hi", "n": 3})
    after = metric_samples(server)
    assert http_count(after, "/v1/completions", 200) == http_count(before, "/v1/completions", 200) + 1
    assert http_count(after, "/v1/completions", 400) == http_count(before, "/v1/completions", 400) + 1
    generated = ("dspark_generation_tokens_total", ())
    assert after[generated] - before.get(generated, 0.0) == res.usage.completion_tokens
    assert after[("dspark_prompt_tokens_total", ())] - before.get(("dspark_prompt_tokens_total", ()), 0.0) == \
        res.usage.prompt_tokens


def test_client_disconnect_mid_stream_frees_the_request(server):
    body = {"prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
    # closed after the first event: the engine aborts the request and returns its pages
    state = wait_idle(server)
    assert state["pages_total"] > 0


def test_load_concurrent_streams_then_twice_the_admission_limit(server):
    async def stream_one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.completions.create(model="tiny.gguf", prompt=f"{i} + {i} =", max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True})
        reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
        return reasons[-1]

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"prompt": "naïve café", "max_tokens": 16, "ignore_eos": True}
            return await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body) for _ in range(n)))

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        reasons = await asyncio.gather(*(stream_one(client, i) for i in range(64)))
        await client.close()
        return reasons, await burst(2 * MAX_WAITING)

    before = metric_samples(server)
    reasons, responses = asyncio.run(run())
    assert reasons == ["length"] * 64
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= MAX_WAITING
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 16
        else:
            assert r.json()["error"]["type"] == "rate_limit_error"
    wait_idle(server)
    after = metric_samples(server)
    server_errors = {k: v - before.get(k, 0.0) for k, v in after.items()
                     if k[0] == "dspark_http_requests_total" and dict(k[1])["status"].startswith("5")}
    assert not any(server_errors.values()), server_errors
    assert http_count(after, "/v1/completions", 429) - http_count(before, "/v1/completions", 429) == \
        statuses.count(429)


def test_sigterm_drains_running_requests_then_exits(server):
    """Last in the module: SIGTERM lets a running stream finish, refuses new connections, exits 0."""
    body = {"prompt": "hi", "max_tokens": 48, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal it handled once it has shut down, so the status says SIGTERM
    assert server.proc.wait(60) == -signal.SIGTERM
    assert "Application shutdown complete." in server.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
