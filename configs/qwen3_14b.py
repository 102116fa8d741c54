"""Qwen3-14B (random weights of the real architecture unless target.source names a checkpoint)
with a 5-layer DSpark draft as DeepSpec trains it (γ = 7)."""

from dspark_jax.config import Config, DraftConfig, LlamaArch, SpecConfig, TargetConfig

QWEN3_14B = LlamaArch(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40,
                      num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960, bos_token_id=151643,
                      eos_token_ids=(151645, 151643), model_type="qwen3")

config = Config(
    target=TargetConfig(arch=QWEN3_14B, dtype="bfloat16"),
    draft=DraftConfig(kind="dspark", block_size=7, num_layers=5, target_layer_ids=(1, 10, 19, 28, 37),
                      mask_token_id=151669, markov_rank=256, markov_head="vanilla"),
    spec=SpecConfig(scheduler="fixed"),
)
