"""CPU cost of the verl plug-in per training step at the paper's scale (no GPU, no model): plan + expansion + feedback.

    python examples/verl/overhead.py --prompts 512 --rollouts 8 --steps 6 --embedder hashing

Each step draws ``--prompts`` prompts from a pool, plans ``prompts x rollouts`` rollouts with the GP predictor
(``vip`` strategy), expands a verl ``DataProto`` with prompt tensors of ``--prompt-len`` tokens by the plan, and feeds
Bernoulli rewards back. Prints one line per step (wall seconds, and the process CPU seconds of planning, which is
what a shared machine does not inflate) and the medians; the first step includes embedding the batch's prompts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from verl import DataProto

from vipalloc.integrations.verl import VIPConfig, VIPHook, divisible_budget, expand_by_counts, required_multiple


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=512, help="prompts per training batch")
    ap.add_argument("--rollouts", type=int, default=8, help="uniform rollouts per prompt (budget = prompts x this)")
    ap.add_argument("--pool", type=int, default=4096, help="distinct prompts in the dataset")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=1024, help="prompt tensor width in tokens")
    ap.add_argument("--embedder", default="hashing", choices=["hashing", "minilm", "auto"])
    ap.add_argument("--predictor", default="gp")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel size")
    ap.add_argument("--mini", type=int, default=64, help="ppo_mini_batch_size in prompts")
    args = ap.parse_args()
    torch.set_num_threads(2)

    rng = np.random.default_rng(0)
    true_p = rng.beta(0.6, 0.6, args.pool)
    texts = [
        f"Problem {i}: find x such that {i % 97} x + {i % 13} = {i % 31} (mod {101 + i % 7})." for i in range(args.pool)
    ]
    hook = VIPHook(VIPConfig(predictor=args.predictor, embedder=args.embedder, n_min=4, n_max=32), "drgrpo")
    multiple = required_multiple(args.dp, args.mini * args.rollouts)
    budget = divisible_budget(args.prompts * args.rollouts, multiple, args.prompts, 4, 32)
    times: list[dict[str, float]] = []
    for step in range(1, args.steps + 1):
        idx = rng.choice(args.pool, args.prompts, replace=False)
        uids = np.array([f"{step}-{i}" for i in range(args.prompts)], dtype=object)
        batch = DataProto.from_dict(
            tensors={"input_ids": torch.zeros(args.prompts, args.prompt_len, dtype=torch.long)},
            non_tensors={"index": idx.astype(object), "uid": uids, "raw_prompt": np.array([texts[i] for i in idx])},
        )
        t0, c0 = time.perf_counter(), time.process_time()
        ntb = batch.non_tensor_batch
        plan = hook.plan(hook.prompt_ids(ntb, args.prompts), hook.prompt_texts(ntb, args.prompts), uids, budget, step)
        t1, c1 = time.perf_counter(), time.process_time()
        out = expand_by_counts(batch, plan.counts)
        t2 = time.perf_counter()
        p_rows = true_p[np.asarray(out.non_tensor_batch["index"], dtype=np.int64)]
        success = (rng.random(len(out)) < p_rows).astype(np.float64)
        metrics = hook.observe(out.non_tensor_batch["uid"], success, exact=True, where="overhead benchmark")
        t3 = time.perf_counter()
        times.append({"plan": t1 - t0, "plan_cpu": c1 - c0, "expand": t2 - t1, "observe": t3 - t2})
        print(
            f"step {step}: rows {len(out)}  plan {t1 - t0:.3f}s (cpu {c1 - c0:.3f}s)  "
            f"expand {t2 - t1:.3f}s  observe {t3 - t2:.3f}s  "
            f"kept {int((plan.counts > 0).sum())}/{args.prompts}  max_n {int(plan.counts.max())}  "
            f"var_ratio {metrics['vip/expected_var_ratio_vs_uniform']:.3f}"
        )
    later = times[1:] or times
    print(
        "median over steps 2..: "
        + "  ".join(
            f"{k} {statistics.median(t[k] for t in later):.3f}s" for k in ("plan", "plan_cpu", "expand", "observe")
        )
    )


if __name__ == "__main__":
    main()
