"""Warm-up diagnostics of the CPU trainer's testbed (docs/training.md, "A regime where RL moves").

For a training configuration (the demo's defaults, with ``--set KEY=VALUE`` overrides as ``vipalloc demo`` takes
them) it loads (or trains and caches) the warm-up policy and prints, on ``--prompts`` training-pool prompts:

1. the U shape and the papers' metrics under the warm-up policy (``--samples`` samples a prompt): shares of prompts
   with success below 0.05 / above 0.95, mean@k, pass@k, maj@k, per level;
2. the sharpening headroom: exact expected success with every logit multiplied by 1, 1.5, 2, 3 (temperature 1/s);
3. one step of the exact gradient of expected success at several step norms, and one Adam-like sign step.

Run: ``.venv/bin/python benchmarks/warmup_diagnostics.py [--set warmup='{"label_noise": 0.5}'] [--prompts 384]``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from vipalloc.training.cli import parse_overrides
from vipalloc.training.demo import demo_config
from vipalloc.training.diagnostics import gradient_line_search, pool_profile, sharpening_headroom
from vipalloc.training.model import build_policy
from vipalloc.training.tasks import make_problems
from vipalloc.training.trainer import warmup_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="training option KEY=VALUE (JSON)")
    ap.add_argument("--prompts", type=int, default=384, help="training-pool prompts to profile")
    ap.add_argument("--samples", type=int, default=16, help="samples per prompt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = demo_config(**parse_overrides(args.sets))
    model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head)
    model.load_state_dict(warmup_policy(cfg))
    model.eval()
    pool = make_problems(cfg.pool_size, seed=cfg.pool_seed, levels=cfg.level_tuples, tag="t")
    idx = np.random.default_rng(0).choice(len(pool), size=min(args.prompts, len(pool)), replace=False)
    probs = [pool[i] for i in sorted(idx)]
    prof = pool_profile(model, probs, cfg, samples=args.samples)
    lo, hi = prof["eval/frac_below_0.05"], prof["eval/frac_above_0.95"]
    print(
        f"warm-up {cfg.warmup_key()}: {cfg.model.n_layer}x{cfg.model.n_embd} policy, levels {cfg.level_tuples}, "
        f"label noise {cfg.level_noise}"
    )
    print(
        f"training pool, {len(probs)} prompts x {args.samples} samples: mean@k {prof['eval_acc']:.3f}, "
        f"U share {lo + hi:.3f} (below 0.05: {lo:.3f}, above 0.95: {hi:.3f})"
    )
    ks = [k for k in (1, 4, 8, 16) if f"eval/pass@{k}" in prof]
    print("  pass@k " + ", ".join(f"{k}: {prof[f'eval/pass@{k}']:.3f}" for k in ks))
    print("  maj@k  " + ", ".join(f"{k}: {prof[f'eval/maj@{k}']:.3f}" for k in ks))
    for level, lt in enumerate(cfg.level_tuples):
        key = f"eval/level{level}"
        if f"{key}/mean" in prof:
            print(
                f"  level {level} {lt}: mean@k {prof[f'{key}/mean']:.3f}, pass@{ks[-1]} "
                f"{prof[f'{key}/pass@{ks[-1]}']:.3f}, maj@{ks[-1]} {prof[f'{key}/maj@{ks[-1]}']:.3f}"
            )
    head = sharpening_headroom(model, probs)
    print(
        "sharpening headroom (logit scale: exact mean success): "
        + json.dumps({str(k): round(v, 4) for k, v in head.items()})
    )
    ls = gradient_line_search(model, probs)
    line = ", ".join(f"{eps:g}: {j:.4f}" for eps, j in ls["line"])  # type: ignore[union-attr]
    print(
        f"exact-gradient step (|grad| {ls['grad_norm']:.3f}; step norm: mean success): {line}; "
        f"Adam-like sign step lr 1e-4: {ls['sign_step']:.4f}"
    )


if __name__ == "__main__":
    main()
