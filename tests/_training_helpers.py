"""The tiny CPU-trainer configuration the training tests share (seconds a run, mixed groups)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vipalloc.training.config import TrainConfig


def tiny(run_dir: Path, cache: Path, **kw: Any) -> TrainConfig:
    """A validated config of a 2-layer policy on single-digit sums (the warm-up model gets some right, so groups
    are mixed), the warm-up cached at ``cache``; ``kw`` overrides any field."""
    base: dict[str, Any] = dict(
        run_dir=str(run_dir),
        steps=6,
        prompts_per_step=8,
        n_mean=4,
        n_max=8,
        pool_size=48,
        eval_size=16,
        eval_samples=2,
        eval_every=3,
        ckpt_every=2,
        model={"n_layer": 2, "n_embd": 32, "n_head": 2},
        levels=[[2, 1]],
        warmup={"steps": 60, "batch_size": 32},
        warmup_cache=str(cache),
        predictor="beta",
        tensorboard=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)
