#!/usr/bin/env bash
# The main job: prepare the corpora, pretrain a small GPT-2 for a few minutes, sample from it.
# Data comes from $FERRY_DATA_DIR (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

data=${FERRY_DATA_DIR:-../shared/data}
ferry=target/release/ferry
run=${FERRY_RUN_DIR:-runs/gpt2-mini}
prepared=${FERRY_PREPARED_DIR:-data-prepared/wikitext-books}
steps=${FERRY_MAIN_STEPS:-600}   # a few minutes on two cores
for d in "$data/wikitext" "$data/books"; do
    [ -d "$d" ] || { echo "error: $d not found: set FERRY_DATA_DIR (see README, 'Data')" >&2; exit 1; }
done

echo "== prepare: tokenizer + shards from $data/wikitext and $data/books"
$ferry prepare --input "$data/wikitext" "$data/books" --output "$prepared"

echo "== pretrain GPT-2 (mini) in $run"
resume=()
if [ -d "$run/checkpoints" ] && [ -f "$run/train.json" ]; then resume=(--resume); fi
$ferry train --data "$prepared" --run-dir "$run" "${resume[@]}" \
    --size mini --seq-len 128 --global-batch 16 --micro-batch 16 --steps "$steps" \
    --lr 1e-3 --warmup-steps 50 --eval-interval 100 --checkpoint-interval 100

echo "== sample"
$ferry generate --model "$run" --prompt "The history of the" --max-new-tokens 60 --seed 1
