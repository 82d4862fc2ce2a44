#!/usr/bin/env bash
# The CPU trainer's league on one GPU: `vipalloc bench train --device cuda` (the `gpu` preset: 6 x 256 policy,
# 128 prompts a step, 4096-prompt pool, 512 held-out prompts x 16 samples), same strategies and report as the CPU
# league. Writes reports/gpu/train.md (+ train.json, PNGs). Needs a CUDA build of torch; the project never does.
# Usage: benchmarks/gpu_train.sh [extra `bench train` options, e.g. --seeds 3 --strategies uniform,vip]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
"$BIN/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU visible to torch')"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
time "$BIN/vipalloc" bench train --device cuda --out reports/gpu "$@"
