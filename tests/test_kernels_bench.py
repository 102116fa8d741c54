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
        self.out_path, self.sweep, self.timing = out_path, "quick", "none"
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


def test_sampling_checks_and_benchmark_rows(one_run, monkeypatch):
    from pallas_kernels import fused_verify as fv
    from pallas_kernels import markov_sample as ms
    from pallas_kernels import vocab_stats as vs

    # The real check and benchmark code, at a small vocabulary (a few small blocks and a tail).
    monkeypatch.setattr(vs, "BLOCK", 512)
    for module in (fv, ms, vs):
        monkeypatch.setattr(module, "VOCAB", 2 * 512 + 3)
    monkeypatch.setattr(ms, "RANK", 8)
    monkeypatch.setattr(fv, "MODES", {"filters": (0.7, 20, 0.8)})
    fv.gpu_checks(one_run)
    ms.gpu_checks(one_run)
    fv.benchmark(one_run)
    ms.benchmark(one_run)
    results = json.load(open(one_run.out_path))
    assert [c["status"] for c in results["checks"]] == ["PASS"] * 3, results["checks"]  # verify, floor vs sort, Markov
    rows = results["benchmarks"]
    assert [r["kernel"] for r in rows] == ["fused_verify", "markov_sample"]  # the quick sweep: R=64 only
    assert all(isinstance(r["alternatives"]["xla_reference"], float) and r["round_floor_ms"] > 0 for r in rows)
    assert all(isinstance(r["alternatives"]["sort_floor_path"], float) for r in rows)
    assert all(isinstance(t, float) for t in rows[0]["variants"].values()) and len(rows[0]["variants"]) == 3
