"""SPS profiling: rounds per second of the real speculative round at each verify-token budget.

The round's shapes come in buckets, so its cost is a step function of the verify batch size B:
every B inside one bucket costs the same. The profiler times draft + verify at each bucket on the
current device (medians after warm-up, synchronised) and expands that into the table
`sps[B]` the causal and async schedulers use. Tables are cached as JSON per device, target,
draft, rows and γ, so the profile runs once.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.cache import bucket
from dspark_jax.checkpoint.assets import cache_dir
from dspark_jax.speculative.decode import Session, _spec_draft
from dspark_jax.speculative.sampling import SamplingParams
from dspark_jax.speculative.schedule import SpecParams


def budget_buckets(rows: int, gamma: int) -> list[int]:
    return sorted({bucket(b, minimum=16) for b in range(rows, rows * (gamma + 1) + 1)})


def _spread(rows: int, gamma: int, extra: int) -> np.ndarray:
    """Verify lengths ℓ_r ≤ γ summing to `extra` (as evenly as possible)."""
    lengths = np.full(rows, extra // rows, np.int32)
    lengths[: extra % rows] += 1
    return np.minimum(lengths, gamma)


def measure_round_seconds(target, draft, *, rows: int, gamma: int, context: int = 256, repeats: int = 5,
                          seed: int = 0) -> dict[int, float]:
    """Median seconds of one round (draft + schedule + verify + commit) per verify-token bucket."""
    rng = np.random.default_rng(seed)
    vocab = target.arch.vocab_size
    prompts = [rng.integers(0, vocab, context).tolist() for _ in range(rows)]
    buckets = budget_buckets(rows, gamma)
    rounds = (repeats + 1) * len(buckets) + 1
    session = Session(target, draft, prompts, max_new_tokens=rounds * (gamma + 1), sampling=SamplingParams(),
                      spec=SpecParams(block_size=gamma), seed=seed, page_size=16, prefill_chunk=1024)
    table = session.page_table(context + rounds * (gamma + 1) + 1)
    seconds = {}
    for budget in buckets:
        lengths = jnp.asarray(_spread(rows, gamma, min(budget, rows * (gamma + 1)) - rows))
        times = []
        for rep in range(repeats + 1):  # the first run compiles
            start = time.perf_counter()
            proposal, _, _, session.dstate = _spec_draft(session.graphdefs, session.params, session.dstate,
                                                         session.state, table, session.sampling, session.keys,
                                                         session.sps, shape=session.shape)
            session.verify(proposal, lengths, table, budget=budget)
            jax.block_until_ready(session.state.lens)
            if rep:
                times.append(time.perf_counter() - start)
        seconds[budget] = statistics.median(times)
    return seconds


def sps_table(seconds: dict[int, float], rows: int, gamma: int) -> list[float]:
    """sps[B] for B = 0..R(γ+1): the rate of the bucket that a batch of B tokens runs in."""
    return [0.0] + [1.0 / seconds[bucket(max(b, rows), minimum=16)] for b in range(1, rows * (gamma + 1) + 1)]


def _cache_path(target, draft, rows: int, gamma: int, context: int) -> Path:
    signature = json.dumps([jax.devices()[0].device_kind, repr(target.arch), str(target.dtype),
                            repr(draft.config), rows, gamma, context])
    digest = hashlib.sha256(signature.encode()).hexdigest()[:16]
    return cache_dir() / "sps" / f"{digest}.json"


def profile_sps(target, draft, *, rows: int, gamma: int, context: int = 256, repeats: int = 5,
                refresh: bool = False) -> list[float]:
    """The SPS table for this device, target, draft, batch rows and γ (cached after the first run)."""
    path = _cache_path(target, draft, rows, gamma, context)
    if path.is_file() and not refresh:
        return json.loads(path.read_text())["sps"]
    seconds = measure_round_seconds(target, draft, rows=rows, gamma=gamma, context=context, repeats=repeats)
    table = sps_table(seconds, rows, gamma)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows, "gamma": gamma,
                               "context": context, "seconds_by_bucket": seconds, "sps": table}))
    os.replace(tmp, path)
    return table
