"""Why RL does (not) move a warm-up policy: its headroom and the local shape of its objective.

* :func:`pool_profile`: the warm-up policy's success on training prompts (``n`` samples each), scored like the
  evaluation: mean@k, pass@k, maj@k per level and the U shape (shares of prompts below 0.05 / above 0.95).
* :func:`success_probability`: exact expected success of each prompt, ``P(gold answer + EOS)`` under the policy
  (no sampling noise; the sampler and this score agree, ``tests/test_training.py``).
* :func:`sharpening_headroom`: expected success when every logit is multiplied by ``s`` (the final layer norm's
  scale and shift times ``s``, through the tied output embedding): sampling at temperature ``1 / s``. How much RL
  could gain by sharpening alone, without learning anything new.
* :func:`gradient_line_search`: expected success after one step of the EXACT gradient of mean success, at several
  step norms, and after one Adam-like sign step: how far one perfect update can go before the curvature turns it
  back. ``benchmarks/warmup_diagnostics.py`` prints all four for a configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vipalloc.training.config import TrainConfig
from vipalloc.training.evaluation import eval_metrics
from vipalloc.training.generation import sample, sequence_logprobs
from vipalloc.training.model import EOS, CharTokenizer
from vipalloc.training.tasks import Problem

__all__ = ["gradient_line_search", "pool_profile", "sharpening_headroom", "success_probability"]


def pool_profile(
    model: torch.nn.Module, problems: Sequence[Problem], cfg: TrainConfig, samples: int = 16, seed: int = 0
) -> dict[str, float]:
    """:func:`~vipalloc.training.evaluation.eval_metrics` of ``samples`` temperature-``cfg.temperature`` samples of
    each problem (e.g. training prompts under the warm-up policy)."""
    tok = CharTokenizer()
    gen = torch.Generator().manual_seed(seed)
    comps = sample(
        model, tok, [p.prompt for p in problems for _ in range(samples)], cfg.max_new_tokens, cfg.temperature, gen
    )
    texts = [tok.decode(c).strip() for c in comps]
    answers = [texts[i * samples : (i + 1) * samples] for i in range(len(problems))]
    return eval_metrics(answers, [p.answer for p in problems], [p.level for p in problems], seed=seed)


def success_probability(model: torch.nn.Module, problems: Sequence[Problem]) -> torch.Tensor:
    """``P(gold answer then EOS | prompt)`` per problem, float ``(N,)``, differentiable in the model's parameters."""
    tok = CharTokenizer()
    gold = [[*tok.encode(p.answer), EOS] for p in problems]
    return sequence_logprobs(model, tok, [p.prompt for p in problems], gold).exp()


def _ln_f(model: torch.nn.Module) -> torch.nn.LayerNorm:
    ln = getattr(getattr(model, "transformer", None), "ln_f", None)
    if not isinstance(ln, torch.nn.LayerNorm):
        raise ValueError("sharpening_headroom needs a GPT-2 policy (model.transformer.ln_f), as build_policy makes")
    return ln


@torch.no_grad()
def sharpening_headroom(
    model: torch.nn.Module, problems: Sequence[Problem], scales: Sequence[float] = (1.0, 1.5, 2.0, 3.0)
) -> dict[float, float]:
    """Mean exact success with all logits multiplied by each scale (temperature ``1 / scale``); the model is left
    as it was."""
    ln = _ln_f(model)
    weight, bias = ln.weight.detach().clone(), ln.bias.detach().clone()
    out: dict[float, float] = {}
    try:
        for s in scales:
            ln.weight.copy_(weight * s)
            ln.bias.copy_(bias * s)
            out[float(s)] = float(success_probability(model, problems).mean())
    finally:
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    return out


def gradient_line_search(
    model: torch.nn.Module,
    problems: Sequence[Problem],
    step_norms: Sequence[float] = (0.0, 0.003, 0.01, 0.03, 0.1),
    sign_lr: float = 1e-4,
) -> dict[str, object]:
    """Mean exact success ``J`` after a step of norm ``eps`` along the exact gradient of ``J`` (for each ``eps``),
    and after the step ``sign_lr * sign(grad)`` (what Adam's first update does). The model is left as it was.

    Returns ``{"grad_norm": |dJ/dtheta|, "line": [(eps, J), ...], "sign_step": J}``."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    model.zero_grad()
    success_probability(model, problems).mean().backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad()
    norm = float(torch.sqrt(torch.stack([(g * g).sum() for g in grads]).sum()))
    line: list[tuple[float, float]] = []
    try:
        with torch.no_grad():
            for eps in step_norms:
                for p, b, g in zip(params, before, grads):
                    p.copy_(b + (eps / max(norm, 1e-30)) * g)
                line.append((float(eps), float(success_probability(model, problems).mean())))
            for p, b, g in zip(params, before, grads):
                p.copy_(b + sign_lr * torch.sign(g))
            sign_j = float(success_probability(model, problems).mean())
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
    return {"grad_norm": norm, "line": line, "sign_step": sign_j}
