"""DeepSeek-V4-Pro (1.6T total, 49B active) with its DSpark draft, as the DSpark revision ships it.

Random weights of the real architecture unless target.source names a checkpoint. Weights in the
official format (FP8 linears, FP4 routed experts). The draft is the checkpoint's three window-only
V4 blocks `mtp.0..2` (γ = 5), reading target layers 58-60.
"""

from dspark_jax.config import (Config, DeepseekV4Arch, DraftConfig, ServeConfig, SpecConfig, TargetConfig,
                               deepseek_v4_layer_types)

V4_PRO = DeepseekV4Arch(
    vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, head_dim=512, rope_head_dim=64,
    q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
    layer_types=deepseek_v4_layer_types((128, 128) + (4, 128) * 29 + (4,)), sliding_window=128,
    index_n_heads=64, index_head_dim=128, index_topk=1024,
    n_routed_experts=384, num_experts_per_tok=6, moe_intermediate_size=3072, num_hash_layers=3,
    routed_scaling_factor=2.5, weight_format="fp8",
    dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(58, 59, 60), dspark_markov_rank=512,
)

config = Config(
    target=TargetConfig(arch=V4_PRO, dtype="bfloat16"),
    draft=DraftConfig(kind="dspark", block_size=5, num_layers=3, target_layer_ids=(58, 59, 60), mask_token_id=128799,
                      markov_rank=512, markov_head="vanilla"),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_batch=64, max_context=65536),
)
