"""fp32 models compute in fp32 whatever the process's default matmul precision.

XLA's default precision runs fp32 dots as TF32 on recent NVIDIA GPUs; the suite sets "highest"
globally (conftest), so these tests put the default back to see what a user's process gets.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from dspark_jax.config import LlamaArch
from dspark_jax.models import _dense_forward, create_target, split_static

ARCH = LlamaArch(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, eos_token_ids=(), max_position_embeddings=64)


def dot_precisions(dtype: str) -> list[str]:
    """The precision of every dot in the lowered full-sequence forward (layers, attention, output head)."""
    graph, params = split_static(create_target(ARCH, dtype=dtype))
    with jax.default_matmul_precision("default"):
        text = _dense_forward.lower(graph, params, jnp.zeros((1, 8), jnp.int32), layers=()).as_text()
    return re.findall(r"stablehlo\.dot_general .*precision = \[(\w+), \w+\]", text)


@pytest.mark.parametrize("dtype, expected", [("float32", "HIGHEST"), ("bfloat16", "DEFAULT")])
def test_fp32_models_trace_every_matmul_at_highest_precision(dtype, expected):
    precisions = dot_precisions(dtype)
    # 2 layers x (fused qkv, o, 2 attention, fused gate/up, down) + the output head
    assert len(precisions) == 2 * 6 + 1, precisions
    assert set(precisions) == {expected}, precisions
