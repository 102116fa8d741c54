"""SmolLM2-135M-Instruct (fetched from PyPI, Q4_1-dequantized) — the embedded default."""

from dspark_jax.config import Config, DraftConfig, ServeConfig, TargetConfig

config = Config(
    target=TargetConfig(source="smollm2-135m-instruct", dtype="float32"),
    draft=DraftConfig(kind="none"),
    serve=ServeConfig(max_new_tokens=128, temperature=0.0, max_context=8192),
)
