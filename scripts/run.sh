#!/usr/bin/env bash
# The main job: set up Python 3.11, then quantize SmolLM2-135M to W4A4 with every
# baseline (Hadamard also with GPTQ weights, the QuaRot recipe) and CAT on one
# calibration text and print the
# side-by-side table (see README).
# CPU-friendly budget: 8 x 512 calibration tokens, 4096 evaluation tokens; it prints
# how long it took (README: the time measured on 2 cores). Extra arguments go to
# `catjax compare` (e.g. --methods, --eval-max-tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh 3.11 | tail -n 1)
start=$(date +%s)
"$py" -m catjax compare --model smollm2-135m \
  --methods fp,none,smoothquant,hadamard,hadamard@gptq,cat,cat_full,none@w6a6 \
  --calib-windows 8 --seqlen 512 --eval-max-tokens 4096 --batch-size 4 \
  --json results/main/compare.json "$@"
echo "main job: $(( $(date +%s) - start )) s (setup excluded) on $(nproc) CPU cores"
