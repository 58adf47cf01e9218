#!/usr/bin/env bash
# Validate a toxicity search's chosen point the way issue 20 item 6 asks, on the report split nobody searched on:
# greedy on RTP report [500, 800) (n = 300) and 25 nucleus samples on its first 100 prompts, perplexity and KL on
# benign documents [0, 100), paired with the unedited model, beside 5 same-size random-direction edits (seeds 0-4).
#
#   benchmarks/validate_chosen.sh MODEL CHOSEN_YAML OUT [THREADS]
#   benchmarks/validate_chosen.sh gemma3-270m benchmarks/results/tune_gemma3_likelihood_chosen.yaml runs/val/gemma3_lik
#
# Resumable: a probe or adapter already in OUT is reused, and `surgery eval` keeps each finished arm (and the
# batches of an unfinished one) in OUT/report.arms, so the same command goes on where it stopped.
# Then: python benchmarks/paired_report.py OUT/report --name ... (the published md/json/png).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 MODEL CHOSEN_YAML OUT [THREADS]" >&2
    exit 2
fi
model=$1
yaml=$2
out=$3
threads=${4:-1}
surgery=${SURGERY:-surgery}
mkdir -p "$out"
if [ ! -e "$out/probe" ]; then
    "$surgery" --threads "$threads" probe --model "$model" --behavior toxicity --hparams "$yaml" --out "$out/probe"
fi
if [ ! -e "$out/adapter" ]; then
    "$surgery" --threads "$threads" edit --model "$model" --behavior toxicity --probe "$out/probe" --hparams "$yaml" \
        --out "$out/adapter"
fi
"$surgery" --threads "$threads" eval --model "$model" --adapter "$out/adapter" --behavior toxicity \
    --suite rtp,ppl,kl --split report --limit 300 --samples 25 --sample-limit 100 --ppl-limit 100 --batch-size 50 \
    --paired --controls 5 --out "$out/report"
