"""Procedurally generated arithmetic tasks with exact-match 0/1 rewards (reasoning-gym ``chain_sum``).

Prompts are the compact expression (``"42-25-73="``) so that a tiny character-level policy can read them; the
answer is reasoning-gym's gold answer. Rewards are binarised exact matches of the generated string against the gold
answer: reasoning-gym's own ``score_answer`` gives partial credit (gold ``-4`` vs ``-40`` scores 0.857) and is not used.
Several difficulty levels are mixed so per-prompt success rates spread over (0, 1).

Two tasks share the prompts (:data:`TASKS`): ``chain_sum``, whose completion is the answer alone (``"42-25-73="``
-> ``"-56"``), and ``chain_sum_steps``, whose completion writes every partial sum, the last one being the answer
(``"42-25-73="`` -> ``"17 -56"``), so a longer chain takes more tokens: response length grows with difficulty, as
in real RLVR. Both are rewarded by exact match on the final answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

# (terms, digits) per difficulty level, easiest first.
LEVELS: tuple[tuple[int, int], ...] = ((2, 1), (3, 1), (2, 2), (4, 1), (3, 2), (2, 3))

TaskName = Literal["chain_sum", "chain_sum_steps"]
TASKS: tuple[str, ...] = get_args(TaskName)


@dataclass(frozen=True)
class Problem:
    """One prompt: ``prompt_id`` (stable string), ``prompt`` text fed to the policy, gold ``answer``, ``level``."""

    prompt_id: str
    prompt: str
    answer: str
    level: int


def chain_sum_items(n: int, seed: int, levels: tuple[tuple[int, int], ...] = LEVELS) -> Iterator[tuple[int, Any]]:
    """``(level, reasoning-gym item)`` for ``n`` ``chain_sum`` problems spread evenly over ``levels`` (``(terms,
    digits)`` each; deterministic in ``seed``): the one generator the CPU tasks and the real-LM benchmark share."""
    import reasoning_gym  # heavy import (all task modules): only when problems are generated

    per = [n // len(levels) + (1 if i < n % len(levels) else 0) for i in range(len(levels))]
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
            yield lvl, item


def make_problems(n: int, seed: int, levels: tuple[tuple[int, int], ...] = LEVELS, tag: str = "p") -> list[Problem]:
    """``n`` problems spread evenly over ``levels`` (deterministic in ``seed``), ids ``f"{tag}{seed}-{i}"``."""
    out: list[Problem] = []
    for lvl, item in chain_sum_items(n, seed, levels):
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


def terms_of(prompt: str) -> list[int]:
    """The signed terms of a chain prompt: ``"42-25-73="`` -> ``[42, -25, -73]``."""
    return [int(t) for t in re.findall(r"[+-]?\d+", prompt.rstrip("="))]


def partial_sums(prompt: str) -> list[int]:
    """The running sums after the second, third, ... term: ``"42-25-73="`` -> ``[17, -56]`` (the last = answer)."""
    terms = terms_of(prompt)
    out, acc = [], terms[0]
    for t in terms[1:]:
        acc += t
        out.append(acc)
    return out


def target(problem: Problem, task: str = "chain_sum") -> str:
    """The warm-up's correct completion text (before the end-of-sequence): the answer (``chain_sum``) or the
    space-separated partial sums ending with it (``chain_sum_steps``)."""
    if task == "chain_sum":
        return problem.answer
    return " ".join(str(x) for x in partial_sums(problem.prompt))


def corrupt_target(problem: Problem, task: str, rng: random.Random) -> str:
    """A near-miss completion: ``chain_sum``, :func:`corrupt` of the answer; ``chain_sum_steps``, one partial sum
    corrupted and the slip carried through the later sums (so the final answer is wrong too)."""
    if task == "chain_sum":
        return corrupt(problem.answer, rng)
    sums = partial_sums(problem.prompt)
    j = rng.randrange(len(sums))
    shift = int(corrupt(str(sums[j]), rng)) - sums[j]  # nonzero: corrupt never returns its input
    return " ".join(str(x + shift if i >= j else x) for i, x in enumerate(sums))


def completion_tokens_bound(terms: int, digits: int, task: str = "chain_sum") -> int:
    """Most tokens a correct completion of a ``(terms, digits)`` chain can take, end-of-sequence included."""
    top = 10**digits - 1
    if task == "chain_sum":
        return len(str(terms * top)) + 2  # sign, digits, EOS
    # partial sum k (k = 2..terms) is at most k * top in size, with a sign; one space between sums; EOS
    return sum(len(str(k * top)) + 1 for k in range(2, terms + 1)) + (terms - 2) + 1


def final_answer(completion: str, task: str = "chain_sum") -> str:
    """The answer a completion gives: all of it (``chain_sum``) or its last space-separated item
    (``chain_sum_steps``; empty when the completion is)."""
    text = completion.strip()
    if task == "chain_sum":
        return text
    return text.split(" ")[-1] if text else ""


def reward(completion: str, answer: str, task: str = "chain_sum") -> float:
    """1.0 if the completion's final answer (:func:`final_answer`, up to the end-of-sequence) equals the gold
    answer exactly, else 0.0. ``chain_sum_steps`` does not check the partial sums, only the answer."""
    return 1.0 if final_answer(completion, task) == answer else 0.0
