"""Timing shared by the benchmark scripts in serve/: synchronised medians and the copy-bandwidth ceiling."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() (which must return something to block on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device elementwise pass (read + write counted)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(256 * 2**20 // 4, np.float32))
    double = jax.jit(lambda a: a * 2.0)
    return 2 * x.nbytes / timed(lambda: double(x), repeats=30)
