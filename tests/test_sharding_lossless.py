"""Losslessness with the vocabulary split over a mesh: tests/test_lossless.py's toy target and draft,
whose logits and draft distributions reach `verify` split over 5 devices along the vocabulary.

Verification then runs under the SPMD partitioner (the XLA reference: softmax statistics, the
top-k/top-p sort and the inverse-CDF draw reduced across devices) or per shard on the gathered
vocabulary (the fused kernel in interpret mode). The joint law of the first three tokens must
match the target's exact law; a smaller sample than the unsharded test's, with the same
family-wise threshold, and a negative control showing that sample still catches a real bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

from conftest import REPO

SEQUENCES = 100_000
POSITIVE_RUNS = (("t1_topk2_topp09_threshold", "xla"), ("t1_topk2_topp09_threshold", "interpret"),
                 ("t05_async_group4", "xla"))
NEGATIVE_RUN = ("draft_ignores_temperature", "xla")


def worker() -> None:
    """On 5 virtual devices: p-values of every run, and the mesh `verify` saw."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import test_lossless as toy
    from dspark_jax import sharding

    mesh = sharding.make_mesh((1, toy.VOCAB, 1))
    vocab_split = NamedSharding(mesh, P(None, None, "tensor"))
    seen = {}
    unsplit_verify = toy.verify

    def vocab_split_verify(target_logits, tokens, q, lengths, key, samp):
        target_logits = jax.lax.with_sharding_constraint(target_logits, vocab_split)
        q = jax.lax.with_sharding_constraint(q, vocab_split)
        seen["mesh"] = dict(sharding.mesh_of(target_logits).shape)
        return unsplit_verify(target_logits, tokens, q, lengths, key, samp)

    toy.verify = vocab_split_verify  # run_round calls it with the toy's logits, now split by vocabulary
    toy.SEQUENCES = toy.CHUNK = SEQUENCES
    out = {}
    for name, backend in POSITIVE_RUNS + (NEGATIVE_RUN,):
        case = toy.POSITIVE.get(name) or toy.NEGATIVE[name]
        counts = toy.sample_first_three(case, zlib.crc32(name.encode()), backend)
        out[f"{name}/{backend}"] = toy.chi_square_pvalue(counts, toy.exact_law(case.sampling))
    out["mesh"] = seen["mesh"]
    print(json.dumps(out))


@pytest.fixture(scope="module")
def p_values():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=5", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "import test_sharding_lossless as t; t.worker()"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_vocabulary_split_verification_is_lossless(p_values):
    from test_lossless import ALPHA

    assert p_values["mesh"] == {"data": 1, "tensor": 5, "expert": 1}
    for name, backend in POSITIVE_RUNS:
        assert p_values[f"{name}/{backend}"] > ALPHA / len(POSITIVE_RUNS), (name, backend)
    name, backend = NEGATIVE_RUN
    assert p_values[f"{name}/{backend}"] < ALPHA / len(POSITIVE_RUNS), f"{name} was not detected"
