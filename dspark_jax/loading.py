"""Loading targets, drafts and tokenizers from paths, asset names or configs."""

from __future__ import annotations

import functools
from pathlib import Path

from dspark_jax.checkpoint.assets import ASSETS, resolve_source
from dspark_jax.checkpoint.hf import load_hf_target
from dspark_jax.config import Config, ConfigError, DraftConfig, TargetConfig
from dspark_jax.checkpoint.deepspec import load_deepspec_draft
from dspark_jax.drafts import create_draft
from dspark_jax.models import create_target
from dspark_jax.sharding import create_placed, model_mesh, place_model
from dspark_jax.tokenizer import Tokenizer
from dspark_jax.tokenizer import load_tokenizer as read_tokenizer

__all__ = ["load_target", "load_draft", "load_tokenizer", "target_folder", "checkpoint_folder"]


def target_folder(path_or_cfg) -> Path | None:
    """The HF folder behind a target source (an asset is fetched/converted once), None for random init."""
    if isinstance(path_or_cfg, Config):
        path_or_cfg = path_or_cfg.target
    if isinstance(path_or_cfg, TargetConfig):
        return resolve_source(path_or_cfg.source) if path_or_cfg.source else None
    return resolve_source(path_or_cfg)


def checkpoint_folder(cfg, purpose: str) -> Path:
    """The target's checkpoint folder, which `purpose` needs for its tokenizer; random weights are an error."""
    folder = target_folder(cfg)
    if folder is None:
        raise ConfigError(f"{purpose} needs a tokenizer: set target.source to a checkpoint "
                          "(this config builds random weights)")
    return folder


def load_tokenizer(path_or_cfg) -> Tokenizer:
    """The tokenizer of an HF folder, a .gguf file, an asset name (as `load_target` takes), or a config's target."""
    if isinstance(path_or_cfg, (Config, TargetConfig)) or str(path_or_cfg) in ASSETS:
        return read_tokenizer(checkpoint_folder(path_or_cfg, "load_tokenizer"))
    return read_tokenizer(path_or_cfg)


def load_target(path_or_cfg, dtype: str | None = None, *, mesh=None):
    """A target model from an HF folder, a .gguf file, an asset name, a TargetConfig or a Config.

    dtype defaults to the config's (or bfloat16 for a path). A config without a source builds
    random weights of its `arch` (for benchmarks at real sizes). With a mesh (see
    `dspark_jax.sharding.make_mesh`) the weights are read straight into their shards.
    """
    if isinstance(path_or_cfg, Config):
        path_or_cfg = path_or_cfg.target
    if isinstance(path_or_cfg, TargetConfig):
        dtype = dtype or path_or_cfg.dtype
        if not path_or_cfg.source:
            create = functools.partial(create_target, path_or_cfg.arch, dtype=dtype, seed=path_or_cfg.seed)
            return create() if mesh is None else create_placed(create, mesh)
    return load_hf_target(target_folder(path_or_cfg), dtype=dtype or "bfloat16", mesh=mesh)


def load_draft(path_or_cfg, target, *, dtype=None):
    """A draft for `target` from a DeepSpec-layout folder, "ngram", a DraftConfig or a Config.

    A target on a mesh gets its draft on the same mesh.
    """
    if isinstance(path_or_cfg, Config):
        path_or_cfg = path_or_cfg.draft
    if isinstance(path_or_cfg, DraftConfig):
        if path_or_cfg.source and path_or_cfg.kind not in ("none", "ngram"):  # those two take no weights
            draft = load_deepspec_draft(path_or_cfg.source, target, dtype=dtype)
            if draft.config.kind != path_or_cfg.kind:
                raise ValueError(f"DraftConfig.kind={path_or_cfg.kind!r} but draft.source={path_or_cfg.source!r} "
                                 f"holds a {draft.config.kind!r} draft; set draft.kind={draft.config.kind}")
        else:
            draft = create_draft(path_or_cfg, target, dtype=dtype)
    elif path_or_cfg in ("ngram", "none"):
        draft = create_draft(DraftConfig(kind=path_or_cfg), target, dtype=dtype)
    elif not Path(path_or_cfg).is_dir():
        raise FileNotFoundError(f"draft {path_or_cfg!r}: not a folder, 'ngram', or a draft config")
    else:
        draft = load_deepspec_draft(path_or_cfg, target, dtype=dtype)
    mesh = model_mesh(target)
    return draft if draft is None or mesh is None else place_model(draft, mesh)
