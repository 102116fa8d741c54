"""Drafters behind one interface (see base.py): DSpark / DFlash, Eagle3, n-gram."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from dspark_jax.config import Config, DraftConfig
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
    rngs = nnx.Rngs(config.seed)
    if config.kind == "eagle3":
        return Eagle3Draft(config, target.arch, dtype=dtype, rngs=rngs)
    return DSparkDraft(config, target.arch, dtype=dtype, rngs=rngs)


def load_draft(path_or_cfg, target, *, dtype=None):
    """A draft for `target` from a DeepSpec-layout folder, "ngram", a DraftConfig or a Config."""
    from dspark_jax.checkpoint.deepspec import load_deepspec_draft

    if isinstance(path_or_cfg, Config):
        path_or_cfg = path_or_cfg.draft
    if isinstance(path_or_cfg, DraftConfig):
        if path_or_cfg.source:
            return load_deepspec_draft(path_or_cfg.source, target, dtype=dtype)
        return create_draft(path_or_cfg, target, dtype=dtype)
    if path_or_cfg in ("ngram", "none"):
        return create_draft(DraftConfig(kind=path_or_cfg), target, dtype=dtype)
    if not Path(path_or_cfg).is_dir():
        raise FileNotFoundError(f"draft {path_or_cfg!r}: not a folder, 'ngram', or a draft config")
    return load_deepspec_draft(path_or_cfg, target, dtype=dtype)
