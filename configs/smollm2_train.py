"""Training a DSpark draft for SmolLM2-135M-Instruct (the recipe in train/smollm2.sh).

DeepSpec's draft defaults (γ=7, 5 layers, vanilla Markov head of rank 256, confidence head) and
loss/optimizer settings; five target layers spread over SmolLM2's 30 like DeepSpec's over Qwen3's
36. The mask token is <empty_output> (id 16), which chat text never contains. DFlash and Eagle3
train from this file with `--set draft.kind=...` (see the recipe). Sizes fit an 80 GB GPU: 32
sequences per step in two micro-batches, 256 anchors per sequence, sequences up to 2560 tokens
(prompts ≤ 1536 + answers ≤ 1024 tokens).
"""

from dspark_jax.config import Config, DraftConfig, ServeConfig, SpecConfig, TargetConfig, TrainConfig

config = Config(
    target=TargetConfig(source="smollm2-135m-instruct", dtype="bfloat16"),
    draft=DraftConfig(kind="dspark", block_size=7, num_layers=5, target_layer_ids=(1, 8, 15, 22, 28),
                      mask_token_id=16, markov_rank=256, markov_head="vanilla", confidence_head=True),
    spec=SpecConfig(scheduler="fixed"),
    serve=ServeConfig(max_new_tokens=2048, temperature=1.0, max_batch=64, max_context=8192),
    train=TrainConfig(data=("runs/smollm2/answers",), out_dir="runs/smollm2/dspark", steps=1000, batch_size=16,
                      grad_accum=2, max_length=2560, min_length=512, anchors_per_sequence=256, checkpoint_every=50,
                      log_every=10, holdout_fraction=0.02),
)
