"""The serving engine: continuous batching of requests over one set of device slots.

    engine = Engine(target, draft, tokenizer=tok, spec=SpecParams(...), config=EngineConfig(...))
    engine.start()
    handle = engine.submit(prompt_ids, RequestParams(max_tokens=64, temperature=0.7, seed=1))
    for out in handle: print(out.text, end="")
    engine.shutdown(drain_timeout=10)

`generate` drives the same machinery synchronously for a batch of prompts.
"""

from dspark_jax.engine.engine import Engine, RequestHandle
from dspark_jax.engine.generate import generate
from dspark_jax.engine.params import EngineClosed, EngineConfig, EngineFull, RequestOutput, RequestParams, RequestStats

__all__ = ["Engine", "EngineClosed", "EngineConfig", "EngineFull", "RequestHandle", "RequestOutput", "RequestParams",
           "RequestStats", "generate"]
