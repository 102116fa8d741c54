"""Schedulers against brute-force references, STS calibration, and the SPS profiler."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from dspark_jax.speculative.calibrate import apply_sts, fit_sts, survival_ece
from dspark_jax.speculative.schedule import (admit_top, best_capacity, causal_token_bound, schedule_prefix, survival,
                                             threshold_lengths)


def sorted_candidates(a):
    rows, gamma = a.shape
    cands = [(a[r, j], j, r) for r in range(rows) for j in range(gamma)]
    return sorted(cands, key=lambda c: (-c[0], c[1], c[2]))


def algorithm1(a, sps):
    """Algorithm 1 exactly as printed in the paper (loop with early stop)."""
    rows = a.shape[0]
    lengths = [0] * rows
    best_lengths = list(lengths)
    batch, expected = rows, float(rows)
    theta_best = rows * sps[rows]
    for value, j, r in sorted_candidates(a):
        if value <= 0:
            break
        lengths[r] = j + 1
        batch += 1
        expected += value
        theta = expected * sps[batch]
        if theta > theta_best:
            theta_best, best_lengths = theta, list(lengths)
        else:
            break
    return best_lengths


SHAPES = list(itertools.product((1, 3, 8), (1, 4, 7)))  # (rows, γ); few shapes keep compilation cheap


def random_case(rng, rows, gamma):
    conf = rng.uniform(0.05, 1.0, (rows, gamma)).astype(np.float32)
    conf[rng.random((rows, gamma)) < 0.1] = 1.0  # ties in survival
    valid = rng.integers(0, gamma + 1, rows)
    a = np.asarray(survival(conf, valid))
    # a jagged, decreasing step curve like real bucketed hardware
    steps = np.repeat(rng.uniform(0.3, 1.0, rows * (gamma + 1) // 4 + 2).cumsum(), 4)[: rows * (gamma + 1) + 1]
    sps = 100.0 / (10.0 + steps)
    return a, sps


def test_schedule_prefix_equals_algorithm_1():
    rng = np.random.default_rng(0)
    scheduler = jax.jit(schedule_prefix)
    for (rows, gamma), _ in itertools.product(SHAPES, range(40)):
        a, sps = random_case(rng, rows, gamma)
        assert np.asarray(scheduler(a, sps)).tolist() == algorithm1(a, sps)


def test_schedule_prefix_budget_prefixes_and_throughput():
    rng = np.random.default_rng(1)
    scheduler = jax.jit(schedule_prefix)
    for (rows, gamma), _ in itertools.product(SHAPES, range(20)):
        a, sps = random_case(rng, rows, gamma)
        lengths = np.asarray(scheduler(a, sps))
        assert np.all((0 <= lengths) & (lengths <= gamma))
        # only candidates with a > 0 are admitted, and admitted sets are prefixes by construction
        for r in range(rows):
            assert np.all(a[r, :lengths[r]] > 0)
        batch = rows + lengths.sum()
        theta = (rows + sum(a[r, :lengths[r]].sum() for r in range(rows))) * sps[batch]
        assert theta >= rows * sps[rows] - 1e-9  # never worse than verifying nothing


def test_early_stop_differs_from_global_search():
    # the path dips, then rises: the causal scheduler stops at the dip, the global search does not
    a = np.array([[0.9, 0.85, 0.8, 0.75]], np.float32)
    sps = np.array([0.0, 1.0, 0.5, 0.49, 0.48, 0.47])
    assert int(schedule_prefix(a, sps)[0]) == 0
    theta = [(1 + a[0, :n].sum()) * sps[1 + n] for n in range(5)]
    assert int(best_capacity(a, sps)) == int(np.argmax(theta)) == 4


def test_the_host_bound_holds_every_causal_schedule():
    """causal_token_bound, from the SPS table alone, is never below Algorithm 1's batch; capping the
    schedule at it changes nothing. Rows past `live` are finished (zero survival)."""
    rng = np.random.default_rng(4)
    scheduler = jax.jit(schedule_prefix)
    cut = 0
    for (rows, gamma), _ in itertools.product(SHAPES, range(30)):
        a, sps = random_case(rng, rows, gamma)
        if rng.random() < 0.3:  # memory-bound hardware: rates barely fall, the bound reaches the end
            sps = 100.0 - np.arange(rows * (gamma + 1) + 1) * rng.uniform(0.0, 0.5)
        live = int(rng.integers(1, rows + 1))
        a = np.where(np.arange(rows)[:, None] < live, a, 0.0).astype(np.float32)
        most = rows * (gamma + 1)
        bound = causal_token_bound(sps, live, most)
        lengths = np.asarray(scheduler(a, sps, live_rows=live))
        assert live <= live + lengths.sum() <= bound <= most
        assert np.asarray(scheduler(a, sps, live_rows=live, capacity=bound - live)).tolist() == lengths.tolist()
        assert causal_token_bound(sps, rows, most) >= bound  # counting finished rows as live stays safe
        cut += bound < most
    assert 0 < cut < len(SHAPES) * 30  # both a binding and a non-binding bound were exercised


def test_capacity_cuts_the_admission_path():
    a = np.array([[0.9, 0.8, 0.7], [0.95, 0.6, 0.5]], np.float32)
    sps = np.full(9, 10.0)  # flat rates: Algorithm 1 admits every candidate
    assert schedule_prefix(a, sps).tolist() == [3, 3]
    # sorted by survival: (1,0) .95, (0,0) .9, (0,1) .8, (0,2) .7, (1,1) .6, (1,2) .5
    assert schedule_prefix(a, sps, capacity=4).tolist() == [3, 1]
    assert schedule_prefix(a, sps, capacity=0).tolist() == [0, 0]


def test_admit_top_takes_the_highest_survivals():
    rng = np.random.default_rng(2)
    admit = jax.jit(admit_top)
    for (rows, gamma), _ in itertools.product(SHAPES, range(20)):
        a, _ = random_case(rng, rows, gamma)
        k = int(rng.integers(0, rows * gamma + 1))
        lengths = np.asarray(admit(a, k))
        chosen = [(v, j, r) for v, j, r in sorted_candidates(a) if v > 0][:k]
        expected = np.zeros(rows, int)
        for _, j, r in chosen:
            expected[r] += 1
        assert lengths.tolist() == expected.tolist()


def test_best_capacity_is_the_argmax_of_throughput():
    rng = np.random.default_rng(3)
    capacity = jax.jit(best_capacity)
    for (rows, gamma), _ in itertools.product(SHAPES, range(20)):
        a, sps = random_case(rng, rows, gamma)
        values = [v for v, _, _ in sorted_candidates(a) if v > 0]
        theta = [(rows + sum(values[:n])) * sps[rows + n] for n in range(len(values) + 1)]
        assert int(capacity(a, sps)) == int(np.argmax(theta))


def test_threshold_cuts_at_first_low_confidence():
    conf = np.array([[0.9, 0.4, 0.95], [0.8, 0.7, 0.6], [0.2, 0.9, 0.9]], np.float32)
    assert np.asarray(threshold_lengths(conf, 0.5, np.array([3, 2, 3]))).tolist() == [1, 2, 0]


def test_sps_table_too_short_is_an_error():
    with pytest.raises(ValueError, match=r"at least R\(γ\+1\)\+1 = 9"):
        schedule_prefix(np.ones((2, 3), np.float32), np.ones(5))


def synthetic_rounds(rng, n, gamma, true_temps):
    """Rounds whose real per-position acceptance is σ(z / T_true): raw logits are over-confident."""
    z = rng.normal(1.0, 2.0, (n, gamma))
    accept = rng.random((n, gamma)) < 1 / (1 + np.exp(-z / true_temps))
    accepted = np.argmin(np.concatenate([accept, np.zeros((n, 1), bool)], 1), axis=1)
    lengths = rng.integers(1, gamma + 1, n)
    return z, np.minimum(accepted, lengths), lengths


def test_sts_lowers_ece_on_held_out_data_and_keeps_order():
    rng = np.random.default_rng(4)
    gamma, true_temps = 5, np.array([2.0, 2.5, 1.5, 3.0, 2.0])
    fit_z, fit_acc, fit_len = synthetic_rounds(rng, 20000, gamma, true_temps)
    temps = fit_sts(fit_z, fit_acc, fit_len)
    test_z, test_acc, test_len = synthetic_rounds(rng, 20000, gamma, true_temps)
    before = survival_ece(test_z, test_acc, test_len)
    after = survival_ece(test_z, test_acc, test_len, temps)
    assert after < 0.02 < before
    assert after < 0.25 * before
    calibrated = apply_sts(test_z, temps)
    for k in range(gamma):
        assert np.array_equal(np.argsort(test_z[:, k], kind="stable"), np.argsort(calibrated[:, k], kind="stable"))


def test_apply_sts_checks_temperatures():
    with pytest.raises(ValueError, match="temps has shape"):
        apply_sts(np.zeros((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="must be > 0"):
        apply_sts(np.zeros((2, 3)), np.array([1.0, 0.0, 1.0]))
