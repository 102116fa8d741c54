"""Drafters behind one interface (see base.py): DSpark / DFlash, Eagle3, n-gram, and a DeepSeek-V4
checkpoint's own DSpark blocks."""

from __future__ import annotations

from flax import nnx

from dspark_jax.config import DeepseekV4Arch, DraftConfig
from dspark_jax.drafts.deepseek_v4 import V4DSparkDraft
from dspark_jax.drafts.dspark import DSparkDraft
from dspark_jax.drafts.eagle3 import Eagle3Draft
from dspark_jax.drafts.ngram import NgramDraft
from dspark_jax.models.common import as_dtype


def create_draft(config: DraftConfig, target, *, dtype=None):
    """A fresh draft for `target` (random init: N(0, 0.02) weights, unit norms), or None for kind="none"."""
    dtype = as_dtype(dtype or target.dtype)
    if config.kind == "none":
        return None
    if config.kind == "ngram":
        return NgramDraft(config, target.arch.vocab_size)
    if config.kind == "dspark" and isinstance(target.arch, DeepseekV4Arch):
        return V4DSparkDraft(config, target)  # the blocks the target checkpoint carries (their weights)
    rngs = nnx.Rngs(config.seed)
    if config.kind == "eagle3":
        return Eagle3Draft(config, target.arch, dtype=dtype, rngs=rngs)
    return DSparkDraft(config, target.arch, dtype=dtype, rngs=rngs)
