"""Side-by-side cost of one GRPO step on SmolLM2-135M-Instruct: today's league step vs the cheap step (issue 27
item 1), at equal work, alternating in ONE process so that machine load hits every variant alike.

Variants (all LoRA r=8 on q/k/v/o, fp32, the same prompts):

* ``today``: ``LMPolicy`` (peft LoRA on all 30 layers), HF ``generate`` over one row per rollout, the plain chat
  prompt (sentence replies, ``--old-tokens`` new tokens), full-vocabulary logits over every position, micro-batches
  of 16 (``vipalloc.bench.lm_league`` before this change);
* ``fast-all``: :class:`vipalloc.bench.lm_fast.FastPolicy` with LoRA on every layer (kept as an option), each
  prompt processed once for its group in the backward pass too (``FastPolicy.group_logprobs``);
* ``fast-top<k>``: the same with LoRA on the top ``k`` layers (lower layers under ``no_grad``).

Both fast variants: the short answer format (pre-filled "The answer is", ``--new-tokens``), prompt-once sampling,
logits at completion positions only. One step = sample ``prompts x n`` replies, then forward + backward over every
reply with fixed non-zero weights (the work of a step where every group is mixed, so reward luck does not change
the work), then Adam. Phases are timed separately in wall-clock (``sample``, ``fwd+bwd``, ``optim``), and the whole
step in CPU seconds of this process (``time.process_time``, one torch thread): on a shared machine the wall-clock of
one round swings with the other jobs' load, the CPU seconds much less.

Run (prints a markdown table, writes ``--out`` JSON)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lm_step.py --rounds 3 --prompts 16 --n 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs every variant once)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--top", type=int, default=4, help="LoRA layers of the top-k variant")
    ap.add_argument("--old-tokens", type=int, default=24, help="max new tokens of today's step")
    ap.add_argument("--new-tokens", type=int, default=8, help="max new tokens of the short format")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="reports/lm_step.json", help="JSON output")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from vipalloc.bench.lm_fast import FastPolicy, set_threads
    from vipalloc.bench.lm_model import chain_sum_problems
    from vipalloc.bench.lm_pool import LMPolicy
    from vipalloc.reporting import git_commit, md_table

    set_threads(args.threads)
    probs = chain_sum_problems(args.prompts, 11, levels=((2, 1),), tag="step")
    questions = [p.question for p in probs]
    t0 = time.perf_counter()
    variants = {
        "today": LMPolicy(0),
        "fast-all": FastPolicy(0, top_layers=None),
        f"fast-top{args.top}": FastPolicy(0, top_layers=args.top),
    }
    print(f"loaded 3 policies in {time.perf_counter() - t0:.0f} s", flush=True)
    opts = {k: torch.optim.Adam(v.params, lr=1e-6) for k, v in variants.items()}
    times: dict[str, dict[str, list[float]]] = {k: {"sample": [], "fwd+bwd": [], "optim": []} for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}  # CPU seconds of the whole step (this process)
    tokens: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for name in order:
            pol = variants[name]
            torch.manual_seed(rnd)
            c1 = time.process_time()
            t1 = time.perf_counter()
            if name == "today":
                rows = [q for q in questions for _ in range(args.n)]
                comps, _ = pol.sample_rows(rows, args.old_tokens, 1.0)
                prompts = [pol.prompt_ids(q) for q in rows]
                micro = 16
                score = pol.seq_logprobs
                pol.model.train()
            else:
                groups = pol.sample(questions, [args.n] * len(questions), args.new_tokens, 1.0)
                comps = [c for g in groups for c in g]
                uniq = [pol.prompt_ids(q) for q in questions]
                micro = len(comps)

                def score(_p: list[list[int]], cs: list[list[int]], pol: Any = pol, uniq: list = uniq) -> Any:
                    # every prompt once for its group (all rows of the step in one micro-batch)
                    return pol.group_logprobs(uniq, [(i // args.n, c) for i, c in enumerate(cs)])

                prompts = [[] for _ in comps]
            t2 = time.perf_counter()
            opts[name].zero_grad()
            w_all = torch.linspace(-1.0, 1.0, len(comps)) / len(comps)
            for k in range(0, len(comps), micro):
                lp = score(prompts[k : k + micro], comps[k : k + micro])
                (-(w_all[k : k + micro] * lp).sum()).backward()
            t3 = time.perf_counter()
            opts[name].step()
            t4 = time.perf_counter()
            cpu[name].append(time.process_time() - c1)
            times[name]["sample"].append(t2 - t1)
            times[name]["fwd+bwd"].append(t3 - t2)
            times[name]["optim"].append(t4 - t3)
            tokens[name].append(float(np.mean([len(c) for c in comps])))
            print(
                f"round {rnd + 1}/{args.rounds} {name}: sample {t2 - t1:.1f} s, fwd+bwd {t3 - t2:.1f} s, "
                f"optim {t4 - t3:.2f} s, {tokens[name][-1]:.1f} tokens a reply; CPU {cpu[name][-1]:.1f} s",
                flush=True,
            )
    step = {k: [sum(x) for x in zip(*v.values())] for k, v in times.items()}
    base = np.array(step["today"])
    base_cpu = np.array(cpu["today"])
    rows = []
    for name in variants:
        s = np.array(step[name])
        ratio = base / s  # paired by round
        c = np.array(cpu[name])
        c_ratio = base_cpu / c
        rows.append(
            [
                name,
                f"{np.median(c):.1f}",
                f"{np.median(c_ratio):.2f} (min {c_ratio.min():.2f}, max {c_ratio.max():.2f})",
                f"{np.median(s):.1f}",
                f"{np.median(times[name]['sample']):.1f}",
                f"{np.median(times[name]['fwd+bwd']):.1f}",
                f"{np.median(times[name]['optim']):.2f}",
                f"{np.mean(tokens[name]):.1f}",
                f"{np.median(ratio):.2f} (min {ratio.min():.2f}, max {ratio.max():.2f})",
            ]
        )
    commit = os.environ.get("VIPALLOC_COMMIT") or git_commit(os.getcwd())
    table = md_table(
        [
            "variant",
            "CPU s / step",
            "CPU speed-up vs today",
            "wall s / step",
            "sample s",
            "fwd+bwd s",
            "optim s",
            "tokens / reply",
            "wall speed-up vs today",
        ],
        rows,
    )
    print(
        f"\n{args.prompts} prompts x {args.n} rollouts a step, {args.rounds} alternating rounds, "
        f"{args.threads} thread(s), commit {commit}; medians over rounds, speed-up paired by round\n"
    )
    print(table)
    out = {"args": vars(args), "commit": commit, "times": times, "tokens": tokens, "step": step, "cpu": cpu}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
