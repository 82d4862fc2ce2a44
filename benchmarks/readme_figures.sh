#!/usr/bin/env bash
# Regenerates every figure the README quotes, at the commit of this checkout (resumable: finished runs are reused).
#   bash benchmarks/readme_figures.sh [OUT]      (default OUT=reports/readme)
# 1. The CPU trainer league: uniform, vip and vip_error at equal rollouts, 16 seeds (about a minute a run on an idle
#    2-core machine, two at a time; docs/results.md, "uniform, vip and vip_error on the CPU trainer").
# 2. Where each strategy puts a realistic batch's rollouts, and its modelled error ratio (3 s; docs/strategies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/readme}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
BIN=${VIPALLOC_BIN:-.venv/bin}
mkdir -p "$OUT"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' +dirty')"
"$BIN/vipalloc" bench train --seeds "${SEEDS:-16}" --n-mean 4 --strategies uniform,vip,vip_error --jobs 2 --reuse \
    --out "$OUT/league"
"$BIN/python" benchmarks/objective_table.py | tee "$OUT/objective_table.md"
echo "league report: $OUT/league/train.md"
