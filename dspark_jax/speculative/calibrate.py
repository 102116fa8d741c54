"""Sequential Temperature Scaling (STS) of confidence logits, and calibration metrics.

The head's c_k estimates P(x_k accepted | x_<k accepted); the scheduler needs the cumulative
products a_k = Π_{i≤k} c_i to be calibrated in absolute terms. STS fits one temperature per
position, left to right, each minimising the ECE of a_k on held-out rounds with the earlier
temperatures fixed. Temperature scaling is monotone, so rankings are unchanged.
"""

from __future__ import annotations

import numpy as np

TEMPERATURE_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def apply_sts(conf_logits, temps):
    """Calibrated per-position confidences σ(z_k / T_k) for logits [..., γ] and temps [γ]."""
    conf_logits = np.asarray(conf_logits, np.float64)
    temps = np.asarray(temps, np.float64)
    if temps.shape != conf_logits.shape[-1:]:
        raise ValueError(f"apply_sts: temps has shape {temps.shape}; expected ({conf_logits.shape[-1]},)")
    if np.any(temps <= 0):
        raise ValueError(f"apply_sts: temperatures must be > 0, got {temps}")
    return sigmoid(conf_logits / temps)


def expected_calibration_error(probs, labels, num_bins: int = 20) -> float:
    """ECE with equal-width bins: Σ_b (n_b/N)·|mean(label) − mean(prob)| over non-empty bins."""
    probs = np.asarray(probs, np.float64).reshape(-1)
    labels = np.asarray(labels, np.float64).reshape(-1)
    if probs.size == 0:
        return 0.0
    bins = np.minimum((probs * num_bins).astype(int), num_bins - 1)
    gap = np.abs(np.bincount(bins, labels, num_bins) - np.bincount(bins, probs, num_bins))
    return float(gap.sum() / probs.size)


def survival_labels(accepted, lengths, gamma: int):
    """(labels, observed) [N, γ]: label_k = 1[≥ k accepted], observed where position k was verified."""
    accepted = np.asarray(accepted)[:, None]
    position = np.arange(1, gamma + 1)[None, :]
    return (accepted >= position).astype(np.float64), position <= np.asarray(lengths)[:, None]


def fit_sts(conf_logits, accepted, lengths, *, num_bins: int = 20, grid=TEMPERATURE_GRID):
    """Fit per-position temperatures [γ] on held-out rounds.

    conf_logits [N, γ]: raw confidence logits of N rounds; accepted [N]: drafts accepted in each
    round; lengths [N]: how many were verified (positions beyond are unobserved).
    A position with no observed rounds keeps temperature 1.
    """
    conf_logits = np.asarray(conf_logits, np.float64)
    n, gamma = conf_logits.shape
    labels, observed = survival_labels(accepted, lengths, gamma)
    temps = np.ones(gamma)
    prefix = np.ones(n)
    for k in range(gamma):
        rows = observed[:, k]
        if rows.any():
            candidates = prefix[rows, None] * sigmoid(conf_logits[rows, k, None] / grid[None, :])
            errors = [expected_calibration_error(candidates[:, g], labels[rows, k], num_bins)
                      for g in range(len(grid))]
            temps[k] = grid[int(np.argmin(errors))]
        prefix = prefix * sigmoid(conf_logits[:, k] / temps[k])
    return temps


def survival_ece(conf_logits, accepted, lengths, temps=None, *, num_bins: int = 20) -> float:
    """ECE of the cumulative products a_k over all observed (round, position) pairs."""
    conf_logits = np.asarray(conf_logits, np.float64)
    gamma = conf_logits.shape[1]
    temps = np.ones(gamma) if temps is None else temps
    a = np.cumprod(apply_sts(conf_logits, temps), axis=1)
    labels, observed = survival_labels(accepted, lengths, gamma)
    return expected_calibration_error(a[observed], labels[observed], num_bins)
