#!/usr/bin/env bash
# Regenerates every figure the README quotes, at the commit of this checkout (resumable: finished runs are reused).
#   bash benchmarks/readme_figures.sh [OUT]      (default OUT=reports/readme; SKIP_LM=1 skips steps 3 and 4)
# 1. The CPU trainer league: uniform, vip and vip_error at equal rollouts, 16 seeds (about a minute a run on an idle
#    2-core machine, two at a time; docs/results.md, "uniform, vip and vip_error on the CPU trainer").
# 2. Where each strategy puts a realistic batch's rollouts, and its modelled error ratio (3 s; docs/strategies.md).
# 3. The real-LM gradient error (SmolLM2-135M): two uniform league runs at lr 8e-3 (the league preset until 244cff7,
#    where the README's table was measured) for the policy snapshots (about 20 minutes),
#    then the variance part at three snapshots x two settings (about 70 minutes), then its summary
#    (docs/results.md, "Gradient error at three policy snapshots").
# 4. The real-LM learning league (SmolLM2-135M, 8 seeds, lr 4e-3, the preset; 8e-3 was unstable): uniform, vip_error,
#    vip, vip_pure, vip_two_phase and knapsack at equal rollouts, vip_error and vip at equal tokens (64 runs of about
#    10 CPU minutes, two at a time: about 5.5 hours on an idle 2-core machine; docs/results.md, "The league at
#    scale"). The runs the README quotes are committed under benchmarks/results/lm-244cff7:
#    LEAGUE_OUT=benchmarks/results/lm-244cff7 points step 4 there, which rewrites the report from them in seconds
#    (and runs only what is missing); SKIP_VARIANCE=1 skips step 3.
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
if [ -z "${SKIP_LM:-}" ] && [ -z "${SKIP_VARIANCE:-}" ]; then
    SNAP="$OUT/lm/lm/league-cpu-40-lr0.008/snapshots"
    "$BIN/vipalloc" bench lm --parts league --seeds 2 --strategies uniform --modes rollouts --jobs 2 --lr 8e-3 \
        --out "$OUT/lm"
    "$BIN/vipalloc" bench lm --parts variance --settings 2x1,3x1 --out "$OUT/lm" \
        --snapshots "pretrained,$SNAP/uniform-seed1-step10.pt,$SNAP/uniform-seed1-step40.pt" \
        --variance-strategies uniform,vip,vip_pure,vip_authors,knapsack,coba,vip_error,vip_two_phase,vip_error_two_phase
    "$BIN/python" benchmarks/variance_summary.py "$OUT/lm/lm_variance.json" | tee "$OUT/lm_variance_summary.md"
fi
if [ -z "${SKIP_LM:-}" ]; then
    LEAGUE=${LEAGUE_OUT:-$OUT/lm}
    "$BIN/vipalloc" bench lm --parts league --seeds 8 --jobs 2 --lr 4e-3 --out "$LEAGUE" \
        --strategies uniform,vip_error,vip,vip_pure,vip_two_phase,knapsack --token-strategies vip_error,vip
    "$BIN/python" benchmarks/lm_league_curves.py "$LEAGUE/lm/league-cpu-40-lr0.004" | tee "$OUT/lm_league_curves.md"
    echo "real-LM league report: $LEAGUE/lm_league.md"
fi
