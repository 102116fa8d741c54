"""DeepSeek-V4-Flash (284B total, 13B active) with its DSpark draft, as the DSpark revision ships it.

Random weights of the real architecture unless target.source names a checkpoint (then the
checkpoint's config.json defines the architecture). Weights in the official format: FP8 e4m3
linears with ue8m0 128x128 block scales, FP4 routed experts. The draft is the checkpoint's three
window-only V4 blocks `mtp.0..2` (γ = 5, 6 tokens verified), reading target layers 40-42.
"""

from dspark_jax.config import (Config, DeepseekV4Arch, DraftConfig, ServeConfig, SpecConfig, TargetConfig,
                               deepseek_v4_layer_types)

V4_FLASH = DeepseekV4Arch(
    vocab_size=129280, hidden_size=4096, num_layers=43, num_heads=64, head_dim=512, rope_head_dim=64,
    q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
    layer_types=deepseek_v4_layer_types((0, 0) + (4, 128) * 20 + (4,)), sliding_window=128,
    index_n_heads=64, index_head_dim=128, index_topk=512,
    n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=3,
    routed_scaling_factor=1.5, weight_format="fp8",
    dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(40, 41, 42), dspark_markov_rank=256,
)

config = Config(
    target=TargetConfig(arch=V4_FLASH, dtype="bfloat16"),
    draft=DraftConfig(kind="dspark", block_size=5, num_layers=3, target_layer_ids=(40, 41, 42), mask_token_id=128799,
                      markov_rank=256, markov_head="vanilla"),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_batch=64, max_context=65536),
)
