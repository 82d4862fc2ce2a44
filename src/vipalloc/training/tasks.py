"""Procedurally generated arithmetic tasks with exact-match 0/1 rewards (reasoning-gym ``chain_sum``).

Prompts are the compact expression (``"42-25-73="``) so that a tiny character-level policy can read them; the
answer is reasoning-gym's gold answer. Rewards are binarised exact matches of the generated string against the gold
answer: reasoning-gym's own ``score_answer`` gives partial credit (gold ``-4`` vs ``-40`` scores 0.857) and is not used.
Several difficulty levels are mixed so per-prompt success rates spread over (0, 1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# (terms, digits) per difficulty level, easiest first.
LEVELS: tuple[tuple[int, int], ...] = ((2, 1), (3, 1), (2, 2), (4, 1), (3, 2), (2, 3))


@dataclass(frozen=True)
class Problem:
    """One prompt: ``prompt_id`` (stable string), ``prompt`` text fed to the policy, gold ``answer``, ``level``."""

    prompt_id: str
    prompt: str
    answer: str
    level: int


def make_problems(n: int, seed: int, levels: tuple[tuple[int, int], ...] = LEVELS, tag: str = "p") -> list[Problem]:
    """``n`` problems spread evenly over ``levels`` (deterministic in ``seed``), ids ``f"{tag}{seed}-{i}"``."""
    import reasoning_gym  # heavy import (all task modules): only when problems are generated

    per = [n // len(levels) + (1 if i < n % len(levels) else 0) for i in range(len(levels))]
    out: list[Problem] = []
    for lvl, ((terms, digits), k) in enumerate(zip(levels, per)):
        if k == 0:
            continue
        ds = reasoning_gym.create_dataset(
            "chain_sum",
            size=k,
            seed=seed * 1000 + lvl,
            min_terms=terms,
            max_terms=terms,
            min_digits=digits,
            max_digits=digits,
        )
        for item in ds:
            expr = item["metadata"]["expression"].replace(" ", "")
            out.append(Problem(f"{tag}{seed}-{len(out)}", expr + "=", str(item["answer"]).strip(), lvl))
    return out


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer near ``answer`` (an integer string): off by 1-10, or one digit replaced.

    Used for the warm-up's label noise: a base model trained on partly wrong answers knows the right answer
    (its mode) but also samples near misses, like a pretrained LLM that is right only part of the time.
    """
    value = int(answer)
    for _ in range(20):
        if rng.random() < 0.5:
            cand = str(value + rng.choice([-1, 1]) * rng.randint(1, 10))
        else:
            digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
            i = rng.choice(digits)
            cand = answer[:i] + str(rng.randint(0, 9)) + answer[i + 1 :]
            cand = str(int(cand))  # no leading zeros
        if cand != answer:
            return cand
    return str(value + 1)


def reward(completion: str, answer: str) -> float:
    """1.0 if the completion (up to the end-of-sequence) equals the gold answer exactly, else 0.0."""
    return 1.0 if completion.strip() == answer else 0.0
