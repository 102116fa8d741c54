"""Speculation pieces usable on their own: verification, scheduling, calibration."""

from dspark_jax.speculative.calibrate import apply_sts, fit_sts
from dspark_jax.speculative.schedule import schedule_prefix
from dspark_jax.speculative.verify import verify

__all__ = ["apply_sts", "fit_sts", "schedule_prefix", "verify"]
