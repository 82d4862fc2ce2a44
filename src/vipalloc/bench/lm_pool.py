"""``vipalloc bench lm`` building blocks on SmolLM2: a LoRA policy (sampling, sequence log-probabilities, a
CountSketch of per-rollout score vectors) and the fixed-policy rollout pool of part (a).

Score vectors: for rollout ``y`` of prompt ``x`` the gradient of ``log pi(y | x)`` over the LoRA parameters, mapped
to ``sketch_dim`` numbers by a seeded CountSketch (each parameter goes to one bucket with a random sign). Inner
products, hence squared norms, variances and traces of covariances, are preserved in expectation
(``E <S a, S b> = <a, b>``), and the map is linear, so a sketched estimator is the sketch of the estimator.
At LoRA's initialisation ``B = 0`` the gradient with respect to ``A`` vanishes: the score vectors live in the
``B`` matrices (the policy's gradient restricted to the adapters' column space).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.lm_model import LMProblem, answer_reward, chat_prompt, load_smollm2, sample_completions

__all__ = ["CountSketch", "LMPolicy", "Pool", "build_pool"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LMPolicy:
    """SmolLM2-135M-Instruct with fresh LoRA adapters (r=8 on q/k/v/o; seeded), on ``device``."""

    def __init__(self, seed: int, device: str = "cpu", rank: int = 8) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        base, self.tok = load_smollm2(device=device)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        self.model = get_peft_model(base, cfg)
        self.device = device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt_cache:
            text = self.tok.apply_chat_template(chat_prompt(question), add_generation_prompt=True, tokenize=False)
            self._prompt_cache[question] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._prompt_cache[question]

    def sample_group(
        self, question: str, n: int, max_new_tokens: int, temperature: float, generator: Any
    ) -> tuple[list[list[int]], list[str]]:
        """``n`` replies to one prompt (prompt processed once): ``(completion ids, texts)``."""
        self.model.eval()
        ids, _, texts = sample_completions(self.model, self.tok, question, n, max_new_tokens, temperature, generator)
        return ids, texts

    def sample_rows(
        self, questions: Sequence[str], max_new_tokens: int, temperature: float
    ) -> tuple[list[list[int]], list[str]]:
        """One reply per row (rows may repeat a prompt), all rows in one batched ``generate`` (global torch RNG)."""
        import torch

        self.model.eval()
        eos, pad = int(self.tok.eos_token_id), int(self.tok.pad_token_id)
        prompts = [self.prompt_ids(q) for q in questions]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        comps: list[list[int]] = []
        for row in out[:, width:].tolist():
            seq: list[int] = []
            for t in row:
                seq.append(t)
                if t == eos:
                    break
            while seq and seq[-1] == pad and pad != eos:
                seq.pop()
            comps.append(seq)
        texts = [self.tok.decode([t for t in s if t != eos], skip_special_tokens=True) for s in comps]
        return comps, texts

    def seq_logprobs(self, prompts: Sequence[list[int]], completions: Sequence[list[int]]) -> Any:
        """``log pi(completion | prompt)`` per row (sum over completion tokens), a differentiable tensor ``(B,)``."""
        import torch

        rows = [p + c for p, c in zip(prompts, completions)]
        width = max(len(r) for r in rows)
        pad = int(self.tok.pad_token_id)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            target[i, len(p) : len(p) + len(c)] = True
        ids, mask, target = ids.to(self.device), mask.to(self.device), target.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * target[:, 1:]).sum(dim=1)


class CountSketch:
    """A seeded linear map from the concatenated parameter gradients to ``dim`` numbers (bucket + random sign)."""

    def __init__(self, params: Sequence[Any], dim: int, seed: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.buckets = [torch.randint(0, dim, (p.numel(),), generator=gen).to(p.device) for p in params]
        self.signs = [(torch.randint(0, 2, (p.numel(),), generator=gen) * 2 - 1).float().to(p.device) for p in params]

    def __call__(self, grads: Sequence[Any]) -> np.ndarray:
        import torch

        out = torch.zeros(self.dim, device=self.buckets[0].device)
        for g, b, s in zip(grads, self.buckets, self.signs):
            if g is not None:
                out.index_add_(0, b, g.reshape(-1).float() * s)
        return out.cpu().numpy().astype(np.float32)


@dataclass
class Pool:
    """Rollouts of ``M`` prompts at one fixed policy: the first ``prior_n`` of each prompt are history for the
    predictors, the next ``pool_n`` the pool that allocations are resampled from."""

    prompt_ids: list[str]
    questions: list[str]
    levels: np.ndarray  # int (M,)
    prior_rewards: np.ndarray  # float (M, prior_n)
    rewards: np.ndarray  # float (M, pool_n)
    sketches: np.ndarray  # float32 (M, pool_n, dim); zero rows for prompts whose pool rewards are all equal
    seconds: dict[str, float]

    @property
    def p(self) -> np.ndarray:
        return self.rewards.mean(axis=1)

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            prompt_ids=np.array(self.prompt_ids),
            questions=np.array(self.questions),
            levels=self.levels,
            prior_rewards=self.prior_rewards,
            rewards=self.rewards,
            sketches=self.sketches,
            seconds=np.array([self.seconds.get("sample", 0.0), self.seconds.get("grad", 0.0)]),
        )

    @classmethod
    def load(cls, path: Path) -> Pool:
        z = np.load(path)
        sec = z["seconds"]
        return cls(
            [str(x) for x in z["prompt_ids"]],
            [str(x) for x in z["questions"]],
            z["levels"],
            z["prior_rewards"],
            z["rewards"],
            z["sketches"],
            {"sample": float(sec[0]), "grad": float(sec[1])},
        )


def build_pool(
    problems: Sequence[LMProblem],
    *,
    prior_n: int,
    pool_n: int,
    max_new_tokens: int,
    temperature: float,
    sketch_dim: int,
    seed: int,
    device: str = "cpu",
    progress: Callable[[str], None] = print,
) -> Pool:
    """Sample ``prior_n + pool_n`` replies per problem at the LoRA-initialised policy (= the pretrained model), then
    the sketched score vector of every pool rollout of a prompt with mixed pool rewards."""
    import torch

    policy = LMPolicy(seed, device)
    sketch = CountSketch(policy.params, sketch_dim, seed + 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    m = len(problems)
    prior = np.zeros((m, prior_n))
    rewards = np.zeros((m, pool_n))
    comps: list[list[list[int]]] = []
    t0 = time.perf_counter()
    for i, prob in enumerate(problems):
        ids, texts = policy.sample_group(prob.question, prior_n + pool_n, max_new_tokens, temperature, gen)
        r = np.array([answer_reward(t, prob.answer) for t in texts])
        prior[i], rewards[i] = r[:prior_n], r[prior_n:]
        comps.append(ids[prior_n:])
        progress(f"pool: sampled prompt {i + 1}/{m} (pool success {rewards[i].mean():.2f})")
    policy.model.train()
    return _sketched_pool(problems, prior, rewards, comps, policy, policy.seq_logprobs, sketch, t0, progress)


def build_policy_pool(
    problems: Sequence[LMProblem],
    policy: Any,
    *,
    prior_n: int,
    pool_n: int,
    max_new_tokens: int,
    temperature: float,
    sketch_dim: int,
    seed: int,
    progress: Callable[[str], None] = print,
) -> Pool:
    """:func:`build_pool` at any policy: ``policy`` is a :class:`vipalloc.bench.lm_fast.FastPolicy` (pretrained
    or with a snapshot's adapters loaded). Replies are sampled prompt-once for all problems (in chunks of 8
    prompts), score vectors are the sketched gradients over the policy's adapter parameters (``A`` and ``B``; at
    the pretrained policy ``B = 0`` and only ``B`` carries gradient)."""
    import torch

    from vipalloc.bench.lm_fast import rewards_of

    sketch = CountSketch(policy.params, sketch_dim, seed + 1)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    m = len(problems)
    prior = np.zeros((m, prior_n))
    rewards = np.zeros((m, pool_n))
    comps: list[list[list[int]]] = []
    t0 = time.perf_counter()
    for k in range(0, m, 8):
        chunk = problems[k : k + 8]
        groups = policy.sample(
            [p.question for p in chunk], [prior_n + pool_n] * len(chunk), max_new_tokens, temperature, gen
        )
        for j, (g, r) in enumerate(zip(groups, rewards_of(policy, groups, [p.answer for p in chunk]))):
            prior[k + j], rewards[k + j] = r[:prior_n], r[prior_n:]
            comps.append(g[prior_n:])
        progress(f"pool: sampled {min(k + 8, m)}/{m} prompts (pool success so far {rewards[: k + 8].mean():.2f})")
    return _sketched_pool(problems, prior, rewards, comps, policy, policy.logprobs, sketch, t0, progress)


def _sketched_pool(
    problems: Sequence[LMProblem],
    prior: np.ndarray,
    rewards: np.ndarray,
    comps: list[list[list[int]]],
    policy: Any,
    logprobs: Callable[[list[list[int]], list[list[int]]], Any],
    sketch: CountSketch,
    t0: float,
    progress: Callable[[str], None],
) -> Pool:
    """The pool from sampled replies: the sketched score vector of every pool reply of a prompt with mixed pool
    rewards (``logprobs(prompts, completions)``: the policy's summed log-probabilities, with gradient), both pool
    builders' second half. ``prior`` / ``rewards``: float ``(M, prior_n)`` / ``(M, pool_n)``; ``t0``: when
    sampling started (seconds, ``time.perf_counter``)."""
    import torch

    t1 = time.perf_counter()
    m, pool_n = rewards.shape
    sketches = np.zeros((m, pool_n, sketch.dim), np.float32)
    for i, prob in enumerate(problems):
        if rewards[i].min() == rewards[i].max():
            continue  # every advantage of every resample is 0: the score vectors never enter an estimator
        prompt = policy.prompt_ids(prob.question)
        for j, c in enumerate(comps[i]):
            lp = logprobs([prompt], [c])[0]
            grads = torch.autograd.grad(lp, policy.params, allow_unused=True)
            sketches[i, j] = sketch(grads)
        progress(f"pool: score vectors of prompt {i + 1}/{m}")
    t2 = time.perf_counter()
    return Pool(
        [p.prompt_id for p in problems],
        [p.question for p in problems],
        np.array([p.level for p in problems]),
        prior,
        rewards,
        sketches,
        {"sample": t1 - t0, "grad": t2 - t1},
    )
