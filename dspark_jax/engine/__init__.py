"""The serving engine: continuous batching of requests over one set of device slots.

`generate` drives the machinery synchronously for a batch of prompts.
"""

from dspark_jax.engine.generate import generate
from dspark_jax.engine.params import EngineClosed, EngineConfig, EngineFull, RequestOutput, RequestParams, RequestStats

__all__ = ["EngineClosed", "EngineConfig", "EngineFull", "RequestOutput", "RequestParams", "RequestStats", "generate"]
