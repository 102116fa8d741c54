"""The GPU benchmark script's own code paths, on the CPU: tiny shapes, kernels forced into interpret mode.

Timing is replaced by one run; alternatives that need a GPU (cuDNN, Triton) must be recorded as
errors, not crash the run.
"""

from __future__ import annotations

import json

import jax
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import bench as bench_module
from pallas_kernels import draft_block_attention as dba
from pallas_kernels import ragged_paged_attention as rpa


class OneRun(bench_module.Bench):
    def __init__(self, out_path):
        self.out_path, self.quick, self.timing = out_path, True, "none"
        self.results = {"checks": [], "benchmarks": []}
        self.bandwidth = 1e12

    def time(self, fn, arg_sets, repeats: int = 1) -> float:
        jax.block_until_ready(fn(*arg_sets[0]))
        return 1.0

    @staticmethod
    def copies(make, bytes_per_copy):
        return [make(0)]


@pytest.fixture
def one_run(tmp_path):
    with plgpu.force_gpu_interpret_mode():
        yield OneRun(str(tmp_path / "bench.json"))


def test_attention_benchmark_rows(one_run):
    small = dict(heads=4, kv_heads=2, head_dim=64)
    rpa._bench_case(one_run, "decode", small, rows=2, q_len=1, context=40)
    rpa._bench_case(one_run, "prefill", small, rows=1, q_len=80, context=0)
    rpa._bench_case(one_run, "unsupported head_dim", dict(heads=4, kv_heads=1, head_dim=512, window=16, sinks=True),
                    rows=1, q_len=1, context=30)
    dba._bench_case(one_run, "draft", small, rows=2, gamma=3, context=50)
    rows = json.load(open(one_run.out_path))["benchmarks"]
    assert [r["kernel"] for r in rows] == ["ragged_paged_attention"] * 3 + ["draft_block_attention"]
    assert all(isinstance(r["alternatives"]["xla_reference"], float) for r in rows)
    assert rows[1]["bar"] == ">= 0.9x cuDNN" and rows[2]["bar_met"] is None
    assert rows[0]["bar_met"] is not None and rows[3]["bar_met"] is not None


def test_failed_check_is_recorded_with_its_error(one_run):
    one_run.check("k", "ok", lambda: (1e-4, 1e-3, "shape"))
    one_run.check("k", "bad", lambda: (1.0, 1e-3, "shape"))
    one_run.check("k", "raises", lambda: 1 / 0)
    statuses = [c["status"] for c in json.load(open(one_run.out_path))["checks"]]
    assert statuses == ["PASS", "FAIL", "ERROR"]


def test_norm_benchmark_and_check_rows(one_run):
    from pallas_kernels import add_rms_norm as arn

    arn._bench_case(one_run, "small", rows=3, width=256)
    one_run.check("add_rms_norm", "tiny", lambda: (0.0, 1e-3, "x"))
    rows = json.load(open(one_run.out_path))["benchmarks"]
    assert rows[0]["kernel"] == "add_rms_norm" and isinstance(rows[0]["alternatives"]["xla_fusion"], float)
