"""Training drafts for SmolLM2-135M-Instruct (the recipe in train/smollm2.sh).

γ=7, five target layers spread over SmolLM2's 30 as DeepSpec spreads them over Qwen3's 36, and
DeepSpec's loss and optimizer settings. The drafts are one layer deep so that DSpark, DFlash and
Eagle3 (one layer by design) compare at about the same size (5.2M parameters of backbone each),
and the DSpark Markov head has rank 24 (2.4M more) so the DSpark export, stored in bf16 without
the target's shared embedding and head, fits the 16 MB the embedded default may take. The mask
token is <empty_output> (id 16), which chat text never contains.

500 steps of 32 sequences (≈4.8 passes over the 3,300 training conversations) in micro-batches of
8, so that the three drafts train side by side on one 80 GB GPU.
"""

from dspark_jax.config import Config, DraftConfig, ServeConfig, SpecConfig, TargetConfig, TrainConfig

config = Config(
    target=TargetConfig(source="smollm2-135m-instruct", dtype="bfloat16"),
    draft=DraftConfig(kind="dspark", block_size=7, num_layers=1, target_layer_ids=(1, 8, 15, 22, 28),
                      mask_token_id=16, markov_rank=24, markov_head="vanilla", confidence_head=True),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=2048, temperature=1.0, max_batch=64, max_context=8192),
    train=TrainConfig(data=("runs/smollm2/answers",), out_dir="runs/smollm2/dspark", steps=500, batch_size=8,
                      grad_accum=4, max_length=2560, min_length=512, anchors_per_sequence=256, checkpoint_every=50,
                      log_every=10, holdout_fraction=0.02),
)
