"""Supervised warm-up of the CPU trainer's policy: fresh problems of the task generator, a fixed seed and thread
count, cached by config hash (``warmup_cache``) so every run of a league starts from the same model.

On a shared machine the warm-up's fixed two torch threads must not spin-wait for a core another process holds:
:mod:`vipalloc.training` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch starts its thread pool (idle threads sleep;
the numbers do not change). Progress is reported every step (``progress``) and every tenth of the run with its mean
loss (``on_tenth``), so a slow warm-up is visible as it goes.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from vipalloc.training.config import TrainConfig
from vipalloc.training.generation import resolve_device, sequence_logprobs
from vipalloc.training.model import EOS, CharTokenizer, build_policy
from vipalloc.training.tasks import Problem, corrupt, corrupt_target, make_problems, target

__all__ = ["warmup_path", "warmup_policy"]


def warmup_path(cfg: TrainConfig) -> Path:
    """Where the warm-up model of ``cfg`` is cached (``warmup_cache/warmup-<config hash>.pt``)."""
    device = resolve_device(cfg.device)
    return Path(cfg.warmup_cache) / f"warmup-{cfg.warmup_key(device.type)}.pt"


def warmup_policy(
    cfg: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    on_tenth: Callable[[int, int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The warm-up model's state dict (CPU tensors): from the cache, else trained and cached.

    ``progress(step, total)`` is called after every warm-up step, ``on_tenth(step, total, loss)`` after every tenth
    of them with the mean supervised loss (nats per answer token) since the previous call."""
    device = resolve_device(cfg.device)
    cache = warmup_path(cfg)
    if cache.exists():
        return torch.load(cache, weights_only=True, map_location="cpu")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.warmup.threads)
    try:
        return _warmup(cfg, cache, progress, on_tenth, device)
    finally:
        torch.set_num_threads(prev_threads)


def _warmup_answers(cfg: TrainConfig, batch: list[Problem], noise_rng: random.Random) -> list[str]:
    """The supervised targets of a batch: the task's target text, a near miss with the level's label noise."""
    noise = cfg.level_noise
    if cfg.task == "chain_sum":  # the original draws, kept as they were: cached warm-ups stay valid
        return [corrupt(p.answer, noise_rng) if noise_rng.random() < noise[p.level] else p.answer for p in batch]
    return [
        corrupt_target(p, cfg.task, noise_rng) if noise_rng.random() < noise[p.level] else target(p, cfg.task)
        for p in batch
    ]


def _warmup(
    cfg: TrainConfig,
    cache: Path,
    progress: Callable[[int, int], None] | None,
    on_tenth: Callable[[int, int, float], None] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.warmup.seed)
    noise_rng = random.Random(cfg.warmup.seed)
    model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(device)
    tok = CharTokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.lr, weight_decay=0.01)
    total = cfg.warmup.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    chunk = max(cfg.warmup.batch_size * 50, 1)
    tenth = max(total // 10, 1)
    problems: list[Problem] = []
    loss_sum, loss_n = 0.0, 0
    for step in range(total):
        lo = (step * cfg.warmup.batch_size) % chunk
        if lo == 0:
            problems = make_problems(chunk, seed=cfg.warmup.seed + step, levels=cfg.level_tuples, tag="w")
            random.Random(step).shuffle(problems)
        batch = problems[lo : lo + cfg.warmup.batch_size]
        comps = [[*tok.encode(a), EOS] for a in _warmup_answers(cfg, batch, noise_rng)]
        loss = -sequence_logprobs(model, tok, [p.prompt for p in batch], comps).sum() / sum(len(c) for c in comps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if progress is not None:
            progress(step + 1, total)
        if on_tenth is not None and ((step + 1) % tenth == 0 or step + 1 == total):
            on_tenth(step + 1, total, loss_sum / loss_n)
            loss_sum, loss_n = 0.0, 0
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # CPU: shippable to workers
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, cache)
    return state
