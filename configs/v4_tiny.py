"""A tiny DeepSeek-V4 of the same architecture as v4_flash.py, for tests and quick experiments.

Every feature is on at a size a CPU runs in seconds: window-only, CSA and HCA layers (the HCA
ratio shrunk to 8 so short sequences complete several entries), an indexer keeping fewer entries
than exist, hash-routed then learned MoE layers, mHC streams, YaRN, FP8/FP4 weights, and three
DSpark draft blocks.
"""

from dspark_jax.config import Config, DeepseekV4Arch, DraftConfig, RopeScaling, ServeConfig, TargetConfig

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

V4_TINY = DeepseekV4Arch(
    vocab_size=96, hidden_size=32, num_layers=5, num_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=24,
    o_groups=2, o_lora_rank=8, layer_types=(S, C, H, C, H), sliding_window=8, csa_ratio=4, hca_ratio=8,
    index_n_heads=16, index_head_dim=12, index_topk=5, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=32, num_hash_layers=3,
    rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                             beta_slow=1.0, attention_factor=1.0),
    max_position_embeddings=4096, weight_format="fp8",
    dspark_block_size=5, dspark_noise_token_id=95, dspark_target_layer_ids=(2, 3, 4), dspark_markov_rank=16,
)

config = Config(
    target=TargetConfig(arch=V4_TINY, dtype="float32"),
    draft=DraftConfig(kind="dspark", block_size=5, num_layers=3, target_layer_ids=(2, 3, 4), mask_token_id=95,
                      markov_rank=16, markov_head="vanilla"),
    serve=ServeConfig(max_batch=4, max_context=256),
)
