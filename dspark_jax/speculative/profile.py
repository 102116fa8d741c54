"""SPS profiling: rounds per second of the real speculative round at each verify-token budget.

The round's shapes come in buckets, so its cost is a step function of the verify batch size B:
every B inside one bucket costs the same. The profiler runs a causal or async Core's own fused
round on its slots at each budget bucket of its largest row bucket (medians after warm-up,
synchronised) — the very programs serving launches, so profiling compiles nothing serving does
not use — and expands that into the table `sps[B]` the schedulers read for every row bucket
(they count only a round's live rows). Tables are cached as JSON per device, kernel backend,
target, draft, rows, γ and context, so the profile runs once.
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

from dspark_jax import kernels
from dspark_jax.cache import bucket, pages_for
from dspark_jax.checkpoint.assets import cache_dir
from dspark_jax.speculative.decode import MIN_LANE, Core, Piece, pack_chunk
from dspark_jax.speculative.schedule import SpecParams


def place_rows(core: Core, rows: int, context: int, table: np.ndarray, rng) -> np.ndarray:
    """Put `rows` requests with `context` cached positions in slots 0..rows−1, feeding one token each.

    Only the timing matters: the earlier positions hold whatever their pages hold. Returns the
    round's slot ids (padded to the row bucket).
    """
    vocab = core.target.arch.vocab_size
    admission = dict(seed=0, temperature=0.0, top_k=0, top_p=1.0, max_new=2 ** 30, stop_ids=(), rounds=0)
    pieces = [Piece(slot=i, tokens=[int(rng.integers(vocab))], start=context - 1, page_row=table[i], next_token=0,
                    admission=dict(admission, stream=i), completes=True, generated=1, anchor=int(rng.integers(vocab)))
              for i in range(rows)]
    width = bucket(rows)
    core.prefill(pack_chunk(pieces, rows=width, lane=MIN_LANE, slots=core.slots, scratch_row=core.scratch_row),
                 MIN_LANE)
    slots, _ = core.padding_rows(width)
    slots[:rows] = np.arange(rows)
    return slots


def usable_context(core: Core, context: int) -> int:
    """The profiling context that fits the core: a row's positions and one round past them in its pages."""
    page_size = core.geometry.page_size
    return max(1, min(context, core.max_context - 1, core.num_pages * page_size - core.gamma - 1))


def measure_round_seconds(core: Core, *, context: int = 256, repeats: int = 5, seed: int = 0) -> dict[int, float]:
    """Median seconds of one round (draft + schedule + verify + commit) per verify-token bucket.

    Runs on the core's slots and first pages, so nothing else may be running on it. `context`
    should come from `usable_context`. Each bucket's round schedules as many tokens as the bucket
    holds: async through its capacity, causal through a table flat up to that count and zero
    past it (Algorithm 1 admits while Θ grows).
    """
    if core.scheduler not in ("causal", "async"):
        raise ValueError(f"measure_round_seconds: the core's scheduler is {core.scheduler!r}; expected a causal or "
                         "async core (its fused rounds are what the table describes)")
    rng = np.random.default_rng(seed)
    width = bucket(core.slots)
    rows = min(width, core.slots)
    gamma, page_size = core.gamma, core.geometry.page_size
    per_row = pages_for(context + gamma + 1, page_size)
    shared = rows * per_row > core.num_pages  # too few pages: the rows read the same ones (timing only)
    table = np.tile(core.scratch_row, (width, 1))
    for r in range(rows):
        first = 0 if shared else r * per_row
        table[r, :per_row] = np.arange(first, first + per_row)
    seconds = {}
    for budget in core.budget_buckets(width):
        tokens = min(budget, rows * (gamma + 1))
        sps = jnp.asarray(np.arange(width * (gamma + 1) + 1) <= tokens, jnp.float32)
        times = []
        for rep in range(repeats + 1):  # the first run compiles
            slots = place_rows(core, rows, context, table, rng)
            jax.block_until_ready(core.state)
            start = time.perf_counter()
            out = core.fused_round(slots, table, filters=False, capacity=tokens - rows, budget=budget, sps=sps)
            jax.block_until_ready(out)
            if rep:
                times.append(time.perf_counter() - start)
        seconds[budget] = statistics.median(times)
    return seconds


def sps_table(core: Core, seconds: dict[int, float]) -> list[float]:
    """sps[B] for B = 0..R(γ+1), R the core's largest row bucket: the rate of the bucket B tokens run in."""
    rows = bucket(core.slots)
    return [0.0] + [1.0 / seconds[core.budget(rows, b)] for b in range(1, rows * (core.gamma + 1) + 1)]


def _cache_path(target, draft, rows: int, gamma: int, context: int, backend: str) -> Path:
    signature = json.dumps([jax.devices()[0].device_kind, backend, repr(target.arch), str(target.dtype),
                            repr(draft.config), rows, gamma, context])
    digest = hashlib.sha256(signature.encode()).hexdigest()[:16]
    return cache_dir() / "sps" / f"{digest}.json"


def profile_sps(target, draft, *, rows: int, gamma: int, context: int = 256, repeats: int = 5, refresh: bool = False,
                cached_only: bool = False, core: Core | None = None, backend: str = "auto") -> list[float] | None:
    """The SPS table for this device, target, draft, round rows (a power of two) and γ, cached after the first run.

    `core`: measure on this Core (idle: its slots and first pages are borrowed) with its own
    programs; by default a Core of `rows` slots is built for it. `refresh`: measure even when a
    table is cached; `cached_only`: the cached table, or None without measuring.
    """
    if core is not None:
        if bucket(core.slots) != rows or core.gamma != gamma:
            raise ValueError(f"profile_sps: rows={rows}, gamma={gamma} but the core runs {bucket(core.slots)} rows "
                             f"at γ={core.gamma}")
        context, backend = usable_context(core, context), core.backend
    path = _cache_path(target, draft, rows, gamma, context, kernels.resolve(backend))
    if path.is_file() and not refresh:
        return json.loads(path.read_text())["sps"]
    if cached_only:
        return None
    if core is None:
        core = Core(target, draft, SpecParams(block_size=gamma, scheduler="causal"), slots=rows,
                    max_context=context + 1, page_size=16, num_pages=rows * pages_for(context + gamma + 1, 16),
                    backend=backend)
    seconds = measure_round_seconds(core, context=context, repeats=repeats)
    table = sps_table(core, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"device": jax.devices()[0].device_kind, "backend": core.backend, "rows": rows,
                               "gamma": gamma, "context": context, "seconds_by_bucket": seconds, "sps": table}))
    os.replace(tmp, path)
    return table
