#!/usr/bin/env bash
# The main job: prepare the corpora, pretrain a small GPT-2 for a few minutes with a coordinator
# and two worker processes (data-parallel over a TCP/shared-memory ring), sample from it, then
# fine-tune the checkpoint on Twitter US Airline Sentiment and classify two new tweets.
# Data comes from $FERRY_DATA_DIR (default ../shared/data), fetched when absent. FERRY_MAIN_STEPS and
# FERRY_FINETUNE_STEPS shorten the two training stages (for a quick check).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

ferry=target/release/ferry
run=runs/gpt2-mini                        # job.run_dir in jobs/gpt2-mini-wikitext.toml
prepared=data-prepared/wikitext-books     # data.shards in the job file

# The data: $FERRY_DATA_DIR, else ../shared/data beside the checkout. Where neither holds the
# corpora, `ferry data fetch` downloads them (checked against pinned digests) into
# $FERRY_DATA_DIR, else into data/ in the checkout; it resumes if cut off, and does nothing
# once they are in place.
has_data() { [ -d "$1/wikitext" ] && [ -d "$1/books" ] && [ -f "$1/airline/Tweets.csv" ]; }
data=${FERRY_DATA_DIR:-../shared/data}
if ! has_data "$data" || [ -d "$data/.ferry-fetch" ]; then
    [ -n "${FERRY_DATA_DIR:-}" ] || has_data "$data" || data=data
    echo "== fetch the corpora into $data"
    $ferry data fetch --data-dir "$data"
fi
airline=$data/airline/Tweets.csv

echo "== prepare: tokenizer + shards from $data/wikitext and $data/books"
$ferry prepare --input "$data/wikitext" "$data/books" --output "$prepared"

echo "== pretrain GPT-2 (mini): coordinator + 2 worker processes, data-parallel"
job=jobs/gpt2-mini-wikitext.toml
if [ -n "${FERRY_MAIN_STEPS:-}" ]; then
    # Same job with fewer (or more) steps, in its own run directory.
    run=runs/gpt2-mini-$FERRY_MAIN_STEPS
    mkdir -p "$run"
    sed -e "s/^steps = .*/steps = $FERRY_MAIN_STEPS/" -e "s|^run_dir = .*|run_dir = \"$run\"|" \
        "$job" > "$run/job.toml"
    job=$run/job.toml
fi
# Running this again resumes the job from its coordinator state and checkpoints.
$ferry launch --local --workers 2 "$job"

echo "== sample"
$ferry generate --model "$run" --prompt "The history of the" --max-new-tokens 60 --seed 1

echo "== fine-tune on Twitter US Airline Sentiment (stratified 80/10/10 split, seed 0)"
finetuned=$run/finetune-airline
# --overwrite: running this again fine-tunes again, replacing the earlier output.
$ferry finetune --from "$run" --data "$airline" --text-column text --label-column airline_sentiment \
    --output "$finetuned" --epochs 2 --lr 3e-4 --max-steps "${FERRY_FINETUNE_STEPS:-0}" --overwrite
$ferry predict --model "$finetuned" "@united lost my bag again, two hours on hold" \
    "@SouthwestAir thank you for the smooth flight and the friendly crew!"
echo "== done: report in $finetuned/report.json and $finetuned/report.svg, model in $finetuned/model"
