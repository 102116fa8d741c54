"""The HTTP server on two processes of one multi-process job, as on two hosts.

Two `python -m dspark_jax.serve` processes on this machine join one JAX job (coordinator on a
free loopback port, CPU collectives over gloo), one CPU device each, with the target split over
both ("tensor" = 2): every program needs both processes. Process 0 opens the HTTP port and runs
the request loop; process 1 opens nothing and replays its steps (dspark_jax.engine.lockstep).
Concurrent greedy requests must give exactly what plain greedy decoding gives on one device, and
a SIGTERM to process 0 must end both with status 0.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import openai
import pytest

import dspark_jax as dj
from dspark_jax.server.process import ServerProcess

CONFIG = """
from dspark_jax.config import Config, LlamaArch, ServeConfig, TargetConfig
config = Config(
    target=TargetConfig(arch=LlamaArch(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=(2,)),
                        dtype="float32", seed=3),
    serve=ServeConfig(max_new_tokens=8, max_batch=2, max_context=64, page_size=16, prefill_chunk=16,
                      kernels="xla", mesh=(1, 2, 1)),
)
"""
pytestmark = pytest.mark.slow  # two processes compile five programs each: ~30 s on 2 idle cores

PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 7], [100, 1, 64, 12, 90, 33, 8], [11]]
MAX_TOKENS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost")
    config = workdir / "tiny_multihost.py"
    config.write_text(CONFIG)
    env = {"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    processes = [ServerProcess(config, workdir / f"process{i}.log", env={**env, "JAX_PROCESS_ID": str(i)})
                 for i in range(2)]
    try:
        yield processes
    finally:
        for process in processes:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def logs(processes) -> str:
    return "\n".join(f"--- process {i}:\n{p.log_tail()}" for i, p in enumerate(processes))


def test_two_processes_serve_greedy_decoding_and_stop_together(job):
    leader, follower = job
    try:
        leader.wait_healthy(timeout=240)
    except RuntimeError:
        raise AssertionError(logs(job)) from None
    assert follower.proc.poll() is None, logs(job)
    client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def complete(prompt):
        res = client.completions.create(model="tiny_multihost", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0.0)
        return res.choices[0].model_extra["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # more requests than the 2 slots
        got = list(pool.map(complete, PROMPTS))

    target = dj.load_target(dj.load_config(leader.config))
    expected = dj.generate(target, None, PROMPTS, max_new_tokens=MAX_TOKENS, kernels="xla").tokens
    assert got == expected, logs(job)
    health = httpx.get(leader.url + "/health", timeout=30).json()
    assert health["compiles_after_warmup"] == 0, logs(job)  # the warm-up compiled every program on the mesh

    # process 0 drains and stops; process 1 hears it and exits by itself
    start = time.monotonic()
    assert leader.stop(timeout=60) == 0, logs(job)
    assert follower.proc.wait(timeout=60) == 0, logs(job)
    assert time.monotonic() - start < 60
    follower_log = follower.log.read_text()
    assert "listening" not in follower_log and "compiled after warm-up" not in follower_log
